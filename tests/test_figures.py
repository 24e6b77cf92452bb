"""Offline figures: files, panels, colours, tables, parameter groups, CLI errors, no torch/MPI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.colors as mcolors
import matplotlib.image as mimage
import numpy as np
import pytest
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import pdist

from replandscape.cli.main import main
from replandscape.figures import (
    FiguresWarning,
    accuracy_latex,
    accuracy_markdown,
    condition_color,
    dendrogram_site,
    plot_ari,
    plot_dendrogram,
    plot_profiles,
    render_all,
)
from replandscape.results import Results, read_results, write_results

MODELS = ("llama-3-8b", "mistral-7b")
CONDITIONS = ("shots0", "shots1", "shots2", "shots5", "ft-final")
LABELS = ["0-shot", "1-shot", "2-shot", "5-shot", "fine-tuned"]
N_SITES = 10
SUBJECTS = ["anatomy", "astronomy", "college_biology", "high_school_european_history",
            "world_religions", "virology", "econometrics"]
PARAMS = {"maxk": 1000, "id_range_max": 100, "id_scale_index": 4, "density_k": 16, "adp_z": 1.6}


def accuracy(model_idx: int, cond_idx: int) -> dict[str, float]:
    macro = round(0.40 + 0.05 * cond_idx + 0.02 * model_idx, 4)
    return {"macro": macro, "micro": round(macro + 0.013, 4)}


def make_dendrogram(rng: np.random.Generator, n_peaks: int = 5) -> dict:
    centres = rng.normal(size=(n_peaks, 3))
    z = linkage(pdist(centres), method="weighted")
    return {"linkage": z.tolist(),
            "leaf_labels": [", ".join(rng.choice(SUBJECTS, size=1 + k % 2, replace=False))
                            for k in range(n_peaks)],
            "peak_sizes": [int(s) for s in rng.integers(31, 400, size=n_peaks)]}


def make_results(params: dict | None = None, models: tuple[str, ...] = MODELS,
                 seed: int = 0) -> Results:
    """Two models x five conditions x ten sites, with the shapes of METHOD.md section 4."""
    rng = np.random.default_rng(seed)
    runs, rows = {}, []
    for mi, model in enumerate(models):
        for ci, cond in enumerate(CONDITIONS):
            run = f"{model}/{cond}"
            ft = cond.startswith("ft")
            runs[run] = {
                "model": model, "condition": cond, "shots": 0 if ft else int(cond[5:]),
                "finetuned": ft, "checkpoint_step": None, "n_sites": N_SITES,
                "site_names": [f"input_layernorm.{s:02d}" for s in range(N_SITES)],
                "accuracy": {**accuracy(mi, ci), "per_subject": {"anatomy": 0.5}},
                "provenance": {"activations": f"/scratch/act/{model}/{cond}.h5",
                               "config_hash": f"{mi}{ci}" * 8, "model_path": f"/models/{model}",
                               "code_version": "0.1.0+g1234abc", "n_questions": 300},
            }
            for s in range(N_SITES):
                depth = s / N_SITES
                ari_subject = 0.1 + 0.05 * ci + 0.3 * np.exp(-((depth - 0.3) / 0.15) ** 2)
                rows.append({
                    "run": run, "site": f"input_layernorm.{s:02d}", "site_index": s,
                    "relative_depth": depth, "n_points": 300, "n_duplicates": 0,
                    "id_twonn": 8.0, "id_gride": [9.0] * 6, "id_gride_ranks": [1, 2, 4, 8, 16, 32],
                    "id": 6 + 10 * np.sin(np.pi * depth) + ci + rng.normal(0, 0.3),
                    "n_peaks": int(3 + 4 * (depth > 0.55) + ci % 2),
                    "core_fraction": float(np.clip(0.3 + 0.5 * depth + 0.02 * ci, 0, 1)),
                    "ari": {"subject": float(ari_subject),
                            "answer": float(0.02 + (0.4 * depth if ft else 0.05 * depth))},
                    "overlap": {"subject": 0.5, "answer": 0.3},
                    "dendrogram": make_dendrogram(rng) if s in (2, 3, 7) else None,
                    "seconds": 1.0,
                })
    return Results(analysis_params=dict(params or PARAMS), runs=runs, rows=rows,
                   code_version="0.1.0+g1234abc")


@pytest.fixture(scope="module")
def results() -> Results:
    return make_results()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, results: Results) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("figs")
    return out, render_all([results], out)


def line_colors(fig) -> dict[str, str]:
    """Legend label -> line colour, over every panel of ``fig``."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out.setdefault(line.get_label(), mcolors.to_hex(line.get_color()))
    return out


def legend_labels(fig) -> list[str]:
    assert len(fig.legends) == 1
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_render_all_writes_every_file(rendered: tuple[Path, list[Path]]) -> None:
    out, written = rendered
    stems = [f"profiles_{m}" for m in MODELS] + ["ari_subject", "ari_answer"]
    stems += [f"dendrogram_{m}_{c}" for m in MODELS for c in CONDITIONS]
    expected = {f"{s}.{fmt}" for s in stems for fmt in ("png", "pdf")}
    expected |= {"accuracy.md", "accuracy.tex", "report.md", "report.html"}
    assert {p.name for p in written} == expected
    assert all(p.parent == out and p.stat().st_size > 0 for p in written)
    for p in written:
        if p.suffix == ".png":
            img = mimage.imread(p)
            assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 500, p.name
            assert float(img[..., :3].var()) > 0, f"{p.name} is blank"
        elif p.suffix == ".pdf":
            assert p.read_bytes()[:4] == b"%PDF"


def test_report_embeds_figures_table_and_provenance(rendered: tuple[Path, list[Path]]) -> None:
    out, _ = rendered
    md = (out / "report.md").read_text()
    for png in sorted(out.glob("*.png")):
        assert f"]({png.name})" in md
    assert "| llama-3-8b | 40.0 | 45.0 | 50.0 | 55.0 | 60.0 |" in md
    assert "/models/mistral-7b" in md and "/scratch/act/llama-3-8b/shots2.h5" in md
    assert "0.1.0+g1234abc" in md and '"adp_z": 1.6' in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<img ") == len(list(out.glob("*.png")))


def test_profiles_one_panel_per_quantity_one_line_per_condition(results: Results) -> None:
    fig = plot_profiles(results, "llama-3-8b")
    assert len(fig.axes) == 3
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "intrinsic dimension", "number of peaks", "core-point fraction"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "relative depth (layer / number of sites)"
        assert [ln.get_label() for ln in ax.get_lines()] == LABELS
        assert all(len(ln.get_xdata()) == N_SITES for ln in ax.get_lines())
    assert legend_labels(fig) == LABELS


def test_ari_one_panel_per_model(results: Results) -> None:
    for target in ("subject", "answer"):
        fig = plot_ari(results, target)
        assert len(fig.axes) == len(MODELS)
        assert [ax.get_title() for ax in fig.axes] == list(MODELS)
        for ax in fig.axes:
            assert len(ax.get_lines()) == len(CONDITIONS)
        assert legend_labels(fig) == LABELS
    four = make_results(models=("a", "b", "c", "d"))
    assert len(plot_ari(four, "subject").axes) == 4  # wraps into two rows, no empty panels


def test_condition_colour_is_the_same_in_every_figure(results: Results) -> None:
    figs = [plot_profiles(results, m) for m in MODELS] + [plot_ari(results, "subject"),
                                                          plot_ari(results, "answer")]
    expected = {label: condition_color(c) for label, c in zip(LABELS, CONDITIONS)}
    for fig in figs:
        assert line_colors(fig) == expected
        handles = fig.legends[0].legend_handles
        assert [mcolors.to_hex(h.get_color()) for h in handles] == list(expected.values())
    assert len(set(expected.values())) == len(expected)
    dendro = plot_dendrogram(results, "mistral-7b/ft-final")
    link_colors = {mcolors.to_hex(c.get_colors()[0]) for c in dendro.axes[0].collections}
    assert link_colors == {condition_color("ft-final")}


def test_dendrogram_at_best_ari_site(results: Results) -> None:
    run = "llama-3-8b/shots2"
    site = dendrogram_site(results, run)
    # ARI with subjects peaks at depth 0.3 (site 3), which stores a dendrogram.
    assert site is not None and site.row["site_index"] == 3 and site.best_overall
    fig = plot_dendrogram(results, run)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    dendro = site.row["dendrogram"]
    assert sorted(ticks) == sorted(f"{lab} (n={n})" for lab, n in
                                   zip(dendro["leaf_labels"], dendro["peak_sizes"]))
    assert "input_layernorm.03" in fig.axes[0].get_title(loc="left")


def test_dendrogram_falls_back_and_skips(results: Results) -> None:
    res = make_results()
    for row in res.rows:
        if row["site_index"] == 3:
            row["dendrogram"] = None
    site = dendrogram_site(res, "llama-3-8b/shots0")
    assert site is not None and site.row["site_index"] == 2 and not site.best_overall
    for row in res.rows:
        row["dendrogram"] = None
    assert plot_dendrogram(res, "llama-3-8b/shots0") is None


def test_missing_sites_and_metrics_leave_gaps(tmp_path: Path) -> None:
    res = make_results()
    run = "llama-3-8b/shots1"
    res.rows = [r for r in res.rows if not (r["run"] == run and r["site_index"] == 5)]
    for r in res.rows:
        if r["run"] == run and r["site_index"] in (1, 2):
            r["id"] = None
            r["ari"] = {"subject": None, "answer": 0.1}
        if r["run"] == "mistral-7b/shots0":
            r["core_fraction"] = None
    fig = plot_profiles(res, "llama-3-8b")
    line = fig.axes[0].get_lines()[LABELS.index("1-shot")]
    y = np.asarray(line.get_ydata(), dtype=float)
    assert len(y) == N_SITES - 1 and np.isnan(y).sum() == 2 and np.isfinite(y).sum() == 7
    written = render_all([res], tmp_path, formats=("png",))
    assert (tmp_path / "profiles_mistral-7b.png").is_file() and len(written) == 18


def test_accuracy_tables_hold_the_numbers(results: Results) -> None:
    md = accuracy_markdown(results)
    assert "| model | 0-shot | 1-shot | 2-shot | 5-shot | fine-tuned |" in md
    macro, micro = md.split("Micro accuracy")
    assert "| llama-3-8b | 40.0 | 45.0 | 50.0 | 55.0 | 60.0 |" in macro
    assert "| mistral-7b | 42.0 | 47.0 | 52.0 | 57.0 | 62.0 |" in macro
    assert "| llama-3-8b | 41.3 | 46.3 | 51.3 | 56.3 | 61.3 |" in micro
    tex = accuracy_latex(results)
    assert r"model & 0-shot & 1-shot & 2-shot & 5-shot & fine-tuned \\" in tex
    assert r"mistral-7b & 42.0 & 47.0 & 52.0 & 57.0 & 62.0 \\" in tex
    assert r"llama-3-8b & 41.3 & 46.3 & 51.3 & 56.3 & 61.3 \\" in tex
    assert tex.count(r"\begin{tabular}") == 2 and tex.count(r"\end{tabular}") == 2


def test_missing_accuracy_is_a_dash() -> None:
    res = make_results()
    res.runs["llama-3-8b/shots1"]["accuracy"] = {"macro": None, "micro": None}
    assert "| llama-3-8b | 40.0 | – | 50.0 |" in accuracy_markdown(res)
    assert r"llama-3-8b & 40.0 & -- & 50.0" in accuracy_latex(res)


def test_mixed_params_warn_and_draw_separately(tmp_path: Path) -> None:
    a = make_results(models=("llama-3-8b",))
    b = make_results({**PARAMS, "adp_z": 2.0}, models=("llama-3-8b",))
    with pytest.warns(FiguresWarning, match="2 different sets of analysis parameters"):
        written = render_all([a, b], tmp_path, what=("profiles", "ari", "accuracy"),
                             formats=("png",))
    names = {p.name for p in written}
    for res in (a, b):
        h = res.params_hash[:8]
        assert {f"profiles_llama-3-8b__params-{h}.png", f"ari_subject__params-{h}.png",
                f"accuracy__params-{h}.md"} <= names
    assert not (tmp_path / "profiles_llama-3-8b.png").exists()
    assert len(names) == 2 * 5


def test_cli_prints_the_params_warning_on_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    a = write_results(make_results(models=("m",)), tmp_path / "a.json")
    b = write_results(make_results({**PARAMS, "maxk": 300}, models=("m",)), tmp_path / "b.json")
    assert main(["figures", str(a), str(b), "--out", str(tmp_path / "f"), "--what", "accuracy"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("replandscape: warning: results use 2 different")


def test_cli_old_schema_one_line_others_drawn(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = write_results(make_results(models=("llama-3-8b",)), tmp_path / "good.json")
    old = tmp_path / "old.json"
    data = json.loads(good.read_text())
    data["schema_version"] = 0
    old.write_text(json.dumps(data))
    with pytest.raises(Exception, match="schema version 0"):
        read_results(old)
    out = tmp_path / "figs"
    rc = main(["figures", str(old), str(good), "--out", str(out), "--formats", "png"])
    captured = capsys.readouterr()
    assert rc == 1
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "old.json" in err[0] and "schema version 0" in err[0]
    printed = [Path(p) for p in captured.out.split()]
    assert (out / "profiles_llama-3-8b.png") in printed and (out / "report.md") in printed
    assert all(p.is_file() for p in printed)


def test_cli_happy_path_and_bad_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = write_results(make_results(models=("m",)), tmp_path / "r.json")
    assert main(["figures", str(good), "--out", str(tmp_path / "f"), "--what", "accuracy"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "f" / n)
                                               for n in ("accuracy.md", "accuracy.tex")]
    assert main(["figures", str(good), "--out", str(tmp_path), "--what", "violins"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "violins" in err[0]


def test_make_figures_script(tmp_path: Path) -> None:
    good = write_results(make_results(models=("m",)), tmp_path / "r.json")
    script = Path(__file__).resolve().parents[1] / "analysis" / "make_figures.py"
    proc = subprocess.run([sys.executable, str(script), str(good), "--out", str(tmp_path / "f"),
                           "--what", "accuracy,report"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "f" / "report.md").is_file() and (tmp_path / "f" / "accuracy.tex").is_file()


def test_figures_import_neither_torch_nor_mpi4py() -> None:
    code = ("import sys, replandscape.figures, replandscape.cli.figures; "
            "bad = [m for m in ('torch', 'mpi4py') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
