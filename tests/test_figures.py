"""Offline figures: files, panels, colours, tables, parameter groups, CLI errors, no torch/MPI;
the task axis, the in-context vs fine-tuned figure and table, the fine-tuning mismatch flag."""

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
from replandscape.errors import UserError
from replandscape.figures import (
    FiguresWarning,
    accuracy_latex,
    accuracy_markdown,
    condition_color,
    condition_of,
    dendrogram_site,
    finetune_mismatches,
    plot_ari,
    plot_dendrogram,
    plot_icl_vs_ft,
    plot_profiles,
    released_latex,
    released_markdown,
    released_table,
    render_all,
)
from replandscape.results import RESULTS_SCHEMA_VERSION, Results, read_results, write_results

MODELS = ("llama-3-8b", "mistral-7b")
CONDITIONS = ("shots0", "shots1", "shots2", "shots5", "ft-final")
LABELS = ["0-shot", "1-shot", "2-shot", "5-shot", "LoRA fine-tuned"]
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
    """Two models x five conditions x ten sites, with the shapes of docs/method.md §5."""
    rng = np.random.default_rng(seed)
    runs, rows = {}, []
    for mi, model in enumerate(models):
        for ci, cond in enumerate(CONDITIONS):
            run = f"{model}/mmlu/{cond}"
            ft = cond.startswith("ft")
            runs[run] = {
                "model": model, "task": "mmlu", "condition": cond,
                "shots": 0 if ft else int(cond[5:]), "finetuned": ft,
                "method": "lora" if ft else "", "checkpoint_step": None, "examples_seen": None,
                "n_sites": N_SITES, "label_columns": ["subject", "answer"],
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
    stems = [f"profiles_{m}_mmlu" for m in MODELS] + ["ari_mmlu_subject", "ari_mmlu_answer"]
    stems += [f"dendrogram_{m}_mmlu_{c}" for m in MODELS for c in CONDITIONS]
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
        assert ax.get_xlabel() == "relative depth (blocks passed / (blocks + 1))"
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
    infos = [results.runs[f"llama-3-8b/mmlu/{c}"] for c in CONDITIONS]
    expected = {label: condition_color(info) for label, info in zip(LABELS, infos)}
    for fig in figs:
        assert line_colors(fig) == expected
        handles = fig.legends[0].legend_handles
        assert [mcolors.to_hex(h.get_color()) for h in handles] == list(expected.values())
    assert len(set(expected.values())) == len(expected)
    dendro = plot_dendrogram(results, "mistral-7b/mmlu/ft-final")
    link_colors = {mcolors.to_hex(c.get_colors()[0]) for c in dendro.axes[0].collections}
    assert link_colors == {condition_color(results.runs["mistral-7b/mmlu/ft-final"])}


def test_dendrogram_at_best_ari_site(results: Results) -> None:
    run = "llama-3-8b/mmlu/shots2"
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
    site = dendrogram_site(res, "llama-3-8b/mmlu/shots0")
    assert site is not None and site.row["site_index"] == 2 and not site.best_overall
    for row in res.rows:
        row["dendrogram"] = None
    assert plot_dendrogram(res, "llama-3-8b/mmlu/shots0") is None


def test_missing_sites_and_metrics_leave_gaps(tmp_path: Path) -> None:
    res = make_results()
    run = "llama-3-8b/mmlu/shots1"
    res.rows = [r for r in res.rows if not (r["run"] == run and r["site_index"] == 5)]
    for r in res.rows:
        if r["run"] == run and r["site_index"] in (1, 2):
            r["id"] = None
            r["ari"] = {"subject": None, "answer": 0.1}
        if r["run"] == "mistral-7b/mmlu/shots0":
            r["core_fraction"] = None
    fig = plot_profiles(res, "llama-3-8b")
    line = fig.axes[0].get_lines()[LABELS.index("1-shot")]
    y = np.asarray(line.get_ydata(), dtype=float)
    assert len(y) == N_SITES - 1 and np.isnan(y).sum() == 2 and np.isfinite(y).sum() == 7
    written = render_all([res], tmp_path, formats=("png",))
    assert (tmp_path / "profiles_mistral-7b_mmlu.png").is_file() and len(written) == 18


def test_accuracy_tables_hold_the_numbers(results: Results) -> None:
    md = accuracy_markdown(results)
    assert "| model | 0-shot | 1-shot | 2-shot | 5-shot | LoRA fine-tuned |" in md
    macro, micro = md.split("Micro accuracy")
    assert "| llama-3-8b | 40.0 | 45.0 | 50.0 | 55.0 | 60.0 |" in macro
    assert "| mistral-7b | 42.0 | 47.0 | 52.0 | 57.0 | 62.0 |" in macro
    assert "| llama-3-8b | 41.3 | 46.3 | 51.3 | 56.3 | 61.3 |" in micro
    tex = accuracy_latex(results)
    assert r"model & 0-shot & 1-shot & 2-shot & 5-shot & LoRA fine-tuned \\" in tex
    assert r"mistral-7b & 42.0 & 47.0 & 52.0 & 57.0 & 62.0 \\" in tex
    assert r"llama-3-8b & 41.3 & 46.3 & 51.3 & 56.3 & 61.3 \\" in tex
    assert tex.count(r"\begin{tabular}") == 2 and tex.count(r"\end{tabular}") == 2


def test_missing_accuracy_is_a_dash() -> None:
    res = make_results()
    res.runs["llama-3-8b/mmlu/shots1"]["accuracy"] = {"macro": None, "micro": None}
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
        assert {f"profiles_llama-3-8b_mmlu__params-{h}.png", f"ari_mmlu_subject__params-{h}.png",
                f"accuracy__params-{h}.md"} <= names
    assert not (tmp_path / "profiles_llama-3-8b_mmlu.png").exists()
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
    assert (out / "profiles_llama-3-8b_mmlu.png") in printed and (out / "report.md") in printed
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


# --- generated tasks: the task axis, in-context vs fine-tuned -------------------------------------

GEN_MODEL = "Qwen/Qwen1.5-0.5B"  # a slash in the model name: nothing splits run keys
GEN_TASKS = ("expression", "parity")
SHOTS = (0, 1, 2, 4, 8, 16, 32)
# Strict accuracy of the base model per variant and shot count; parity adds TASK_OFFSET.
BASE_ACC = {"pattern": dict(zip(SHOTS, (0.10, 0.30, 0.45, 0.60, 0.70, 0.65, 0.90))),
            "misleading": dict(zip(SHOTS, (0.05, 0.20, 0.20, 0.15, 0.10, 0.05, 0.30)))}
TASK_OFFSET = {"expression": 0.0, "parity": 0.02}
STEPS = (50, 100, 200)  # then the final checkpoint (examples seen as step 200)
FT_ACC = {"pattern": {50: 0.50, 100: 0.70, 200: 0.90, None: 0.95},
          "misleading": {50: 0.30, 100: 0.40, 200: 0.60, None: 0.62}}
SUBSTRING_BONUS = 0.05


def gen_accuracy(strict: dict[str, float], scoring: str = "strict") -> dict:
    """The accuracy entry of a generated-task run, two variants of equal size: the top level
    holds the rule ``scoring`` names, ``substring`` always the substring rule."""
    substring = {v: round(min(a + SUBSTRING_BONUS, 1.0), 4) for v, a in strict.items()}
    top = strict if scoring == "strict" else substring
    acc = {"micro": round(sum(top.values()) / 2, 4), "macro": round(sum(top.values()) / 2, 4),
           "per_subject": top, "n": 400, "scoring": scoring}
    acc["substring"] = {"micro": round(sum(substring.values()) / 2, 4),
                        "macro": round(sum(substring.values()) / 2, 4), "per_subject": substring}
    return acc


def gen_run(task: str, condition: str, *, shots: int, finetuned: bool, step: int | None,
            acc: dict, examples_seen: int | None = None, reference: float | None = None) -> dict:
    prov = {"activations": f"/scratch/{task}/{condition}.h5", "model_path": "/models/qwen"}
    if finetuned and step is None:
        prov["finetune_test_accuracy"] = reference
    return {"model": GEN_MODEL, "task": task, "condition": condition, "shots": shots,
            "finetuned": finetuned, "method": "lora" if finetuned else "",
            "checkpoint_step": step, "examples_seen": examples_seen, "n_sites": 4,
            "site_names": [f"input_layernorm.{s:02d}" for s in range(3)] + ["norm"],
            "label_columns": ["target", "variant"], "accuracy": acc, "provenance": prov,
            "subsample": {"n": 400}}


def make_generated(with_mmlu: bool = True) -> Results:
    """MMLU runs of two models plus one model on two generated tasks: base 0..32 shots, three
    fine-tuning checkpoints and the final one."""
    base = make_results() if with_mmlu else Results(analysis_params=dict(PARAMS))
    rng = np.random.default_rng(1)
    for task in GEN_TASKS:
        off = TASK_OFFSET[task]
        runs = {}
        for k in SHOTS:
            strict = {v: round(BASE_ACC[v][k] + off, 4) for v in BASE_ACC}
            runs[f"shots{k}"] = gen_run(task, f"shots{k}", shots=k, finetuned=False, step=None,
                                        acc=gen_accuracy(strict))
        for step in (*STEPS, None):
            strict = {v: round(FT_ACC[v][step] + off, 4) for v in FT_ACC}
            name = "ft-final" if step is None else f"ft-step{step:06d}"
            acc = gen_accuracy(strict)
            runs[name] = gen_run(task, name, shots=0, finetuned=True, step=step, acc=acc,
                                 examples_seen=8 * (step or STEPS[-1]), reference=acc["micro"])
        for name, info in runs.items():
            run = f"{GEN_MODEL}/{task}/{name}"
            base.runs[run] = info
            for s, site in enumerate(info["site_names"]):
                base.rows.append({
                    "run": run, "site": site, "site_index": s, "relative_depth": s / 4,
                    "n_points": 400, "n_duplicates": 0, "id": 5.0 + s + rng.normal(0, 0.2),
                    "n_peaks": 2 + s, "core_fraction": 0.4 + 0.1 * s,
                    "ari": {"target": 0.1 * s, "variant": 0.05 * s},
                    "overlap": {"target": 0.5, "variant": 0.3},
                    "dendrogram": make_dendrogram(rng, 3) if s == 2 else None, "seconds": 1.0})
    return base


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """The generated-task results, written and read back through the results contract."""
    path = write_results(make_generated(), tmp_path_factory.mktemp("gen") / "results.json")
    return read_results(path)


def test_generated_results_round_trip_at_schema_2(generated: Results) -> None:
    assert RESULTS_SCHEMA_VERSION == 2
    assert json.loads(generated.path.read_text())["schema_version"] == 2
    assert f"{GEN_MODEL}/parity/ft-step000100" in generated.runs


def test_icl_vs_ft_figure_places_runs_by_their_fields(generated: Results) -> None:
    fig = plot_icl_vs_ft(generated, GEN_MODEL)
    left, right = fig.axes[:2]
    assert left.get_xscale() == "symlog" and right.get_xscale() == "log"
    assert [t.get_text() for t in left.get_xticklabels()] == [str(k) for k in SHOTS]
    colors = {mcolors.to_hex(ln.get_color()) for ln in left.get_lines()}
    assert len(colors) == len(GEN_TASKS)  # one colour per task
    # two tasks x two variants on the left; on the right the same plus the final markers
    lines = left.get_lines()
    assert len(lines) == 4
    assert [ln.get_linestyle() for ln in lines] == ["-", "--", "-", "--"]
    assert list(lines[0].get_xdata()) == list(SHOTS)
    assert np.allclose(lines[0].get_ydata(), [100 * BASE_ACC["pattern"][k] for k in SHOTS])
    assert np.allclose(lines[3].get_ydata(),
                       [100 * (BASE_ACC["misleading"][k] + 0.02) for k in SHOTS])
    joined = [ln for ln in right.get_lines() if ln.get_linestyle() != "None"]
    finals = [ln for ln in right.get_lines() if ln.get_linestyle() == "None"]
    assert len(joined) == 4 and len(finals) == 4
    assert list(joined[0].get_xdata()) == [400, 800, 1600]
    assert np.allclose(joined[0].get_ydata(), [50, 70, 90])
    assert list(finals[1].get_xdata()) == [1600] and np.allclose(finals[1].get_ydata(), [62])
    assert [t.get_text() for t in right.get_xticklabels()] == ["400", "800", "1600"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["expression", "parity", "pattern", "misleading"]
    sub = plot_icl_vs_ft(generated, GEN_MODEL, rule="substring")
    assert np.allclose(sub.axes[0].get_lines()[0].get_ydata(),
                       [100 * (BASE_ACC["pattern"][k] + SUBSTRING_BONUS) for k in SHOTS])
    assert "substring" in sub.axes[0].get_ylabel()


def test_released_table_cells(generated: Results) -> None:
    t = released_table(generated)
    assert t.methods == ["lora"] and len(t.rows) == 4
    row = t.row(GEN_MODEL, "expression", "pattern")
    # the best over 1..16 shots is 70.0 at 8 shots (32 shots give 90.0 but are out of range)
    assert row.finetuned == {"lora": pytest.approx(95.0)}
    assert (row.base_zero, row.base_best, row.base_best_shots) == (
        pytest.approx(10.0), pytest.approx(70.0), 8)
    tie = t.row(GEN_MODEL, "parity", "misleading")  # 22.0 at 1 and 2 shots: the fewest win
    assert (tie.base_best, tie.base_best_shots) == (pytest.approx(22.0), 1)
    md = released_markdown(generated)
    strict, substring = md.split("substring scoring")
    assert ("| model | task | variant | LoRA fine-tuned, 0-shot | base, 0-shot | "
            "base, best of 1–16 shots | best shots |") in strict
    assert f"| {GEN_MODEL} | expression | pattern | 95.0 | 10.0 | 70.0 | 8 |" in strict
    assert f"| {GEN_MODEL} | parity | misleading | 64.0 | 7.0 | 22.0 | 1 |" in strict
    assert f"| {GEN_MODEL} | expression | pattern | 100.0 | 15.0 | 75.0 | 8 |" in substring
    tex = released_latex(generated)
    assert r"Qwen/Qwen1.5-0.5B & expression & pattern & 95.0 & 10.0 & 70.0 & 8 \\" in tex
    assert r"base, best of 1--16 shots" in tex and tex.count(r"\begin{tabular}") == 2
    # MMLU runs never enter this table
    assert "llama" not in md


def test_render_all_draws_what_the_results_hold(tmp_path: Path, generated: Results) -> None:
    written = render_all([generated], tmp_path, formats=("png",))
    names = {p.name for p in written}
    model = "Qwen_Qwen1.5-0.5B"
    assert {f"profiles_{model}_expression.png", f"profiles_{model}_parity.png",
            "profiles_llama-3-8b_mmlu.png", "ari_mmlu_subject.png", "ari_mmlu_answer.png",
            "ari_expression_target.png", "ari_expression_variant.png", "ari_parity_target.png",
            f"icl_vs_ft_{model}.png", "icl_vs_ft.md", "icl_vs_ft.tex",
            f"dendrogram_{model}_parity_ft-step000050.png"} <= names
    assert not any(n.startswith("icl_vs_ft_llama") for n in names)  # MMLU-only models
    assert not any(n.startswith("ari_mmlu_target") for n in names)
    md = (tmp_path / "report.md").read_text()
    assert "## In-context learning and fine-tuning" in md
    assert f"]({'icl_vs_ft_' + model}.png)" in md
    assert f"| {GEN_MODEL} | expression | pattern | 95.0 | 10.0 | 70.0 | 8 |" in md
    assert "| llama-3-8b | 40.0 | 45.0 | 50.0 | 55.0 | 60.0 |" in md
    assert "Warning" not in md  # every ft-final matches what fine-tuning measured
    acc = (tmp_path / "accuracy.md").read_text()
    assert "### Macro accuracy (%), expression" in acc and "### Micro accuracy (%), mmlu" in acc
    # ARI panels use the runs' own label columns
    fig = plot_ari(generated, "variant", task="parity")
    assert [ax.get_title() for ax in fig.axes] == [GEN_MODEL]
    assert "ARI with variants" in fig.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="label columns"):
        plot_ari(generated, "subject", task="parity")


def test_report_flags_a_mismatched_ft_final(tmp_path: Path) -> None:
    res = make_generated(with_mmlu=False)
    bad = f"{GEN_MODEL}/expression/ft-final"
    res.runs[bad]["provenance"]["finetune_test_accuracy"] = 0.85
    res.runs[f"{GEN_MODEL}/parity/ft-final"]["provenance"]["finetune_test_accuracy"] = -1.0
    # a checkpoint's provenance is not compared (only the final adapter was measured)
    res.runs[f"{GEN_MODEL}/parity/ft-step000050"]["provenance"]["finetune_test_accuracy"] = 0.1
    mismatches = finetune_mismatches(res)
    assert [m.run for m in mismatches] == [bad]
    render_all([res], tmp_path, what=("accuracy", "report"), formats=("png",))
    md = (tmp_path / "report.md").read_text()
    extracted = res.runs[bad]["accuracy"]["micro"]
    assert (f"**Warning:** `{bad}`: the extracted model scores {extracted:.4f} but fine-tuning "
            "measured 0.8500") in md
    assert md.count("**Warning:**") == 1
    accuracy_at = md.index("## Accuracy")
    assert accuracy_at < md.index("the extracted model scores") < md.index("## Provenance")
    assert "the extracted model scores" in (tmp_path / "report.html").read_text()


def test_conditions_come_from_fields_never_from_names(tmp_path: Path) -> None:
    res = make_generated(with_mmlu=False)
    # The 4-shot base run, stored under a misleading key and display name
    info = res.runs.pop(f"{GEN_MODEL}/expression/shots4")
    info["condition"] = "ft-final"
    res.runs[f"{GEN_MODEL}/expression/ft-final-looking"] = info
    for row in res.rows:
        if row["run"] == f"{GEN_MODEL}/expression/shots4":
            row["run"] = f"{GEN_MODEL}/expression/ft-final-looking"
    # A checkpoint named like a base run
    ck = res.runs.pop(f"{GEN_MODEL}/parity/ft-step000100")
    ck["condition"] = "shots2"
    res.runs["odd key without slashes"] = ck
    for row in res.rows:
        if row["run"] == f"{GEN_MODEL}/parity/ft-step000100":
            row["run"] = "odd key without slashes"

    cond = condition_of(info)
    assert (cond.label, cond.finetuned, cond.shots) == ("4-shot", False, 4)
    assert cond.color == condition_of({"shots": 4, "finetuned": False}).color
    assert condition_of(ck).label == "LoRA fine-tuned, step 100"
    fig = plot_icl_vs_ft(res, GEN_MODEL)
    left, right = fig.axes[:2]
    assert np.allclose(left.get_lines()[0].get_ydata(), [100 * BASE_ACC["pattern"][k] for k in SHOTS])
    parity_pattern = [ln for ln in right.get_lines() if ln.get_linestyle() == "-"][1]
    assert list(parity_pattern.get_xdata()) == [400, 800, 1600]
    t = released_table(res)
    row = t.row(GEN_MODEL, "expression", "pattern")
    assert row.finetuned["lora"] == pytest.approx(95.0)  # the real final checkpoint
    profiles = plot_profiles(res, GEN_MODEL, "parity")
    assert "LoRA fine-tuned, step 100" in legend_labels(profiles)
    assert "shots2" not in legend_labels(profiles)
    written = render_all([res], tmp_path, what=("dendrogram",), formats=("png",))
    names = {p.name for p in written}
    # file names are made from the fields too: the misnamed runs neither collide nor mislead
    assert {"dendrogram_Qwen_Qwen1.5-0.5B_parity_ft-step000100.png",
            "dendrogram_Qwen_Qwen1.5-0.5B_expression_shots4.png",
            "dendrogram_Qwen_Qwen1.5-0.5B_expression_ft-final.png"} <= names
    assert len(names) == len(written) == 2 * (len(SHOTS) + len(STEPS) + 1)


def test_run_without_its_fields_is_refused(tmp_path: Path) -> None:
    res = make_generated(with_mmlu=False)
    del res.runs[f"{GEN_MODEL}/parity/shots8"]["shots"]
    path = write_results(res, tmp_path / "r.json")
    with pytest.raises(UserError, match=r"r\.json: runs\..*parity/shots8\.shots: .*no integer"):
        render_all([read_results(path)], tmp_path / "f", what=("accuracy",))
    res = make_generated(with_mmlu=False)
    res.rows.append({**res.rows[0], "run": "ghost/mmlu/shots0"})
    with pytest.warns(FiguresWarning, match="ghost/mmlu/shots0 have no entry in runs"):
        render_all([res], tmp_path / "g", what=("accuracy",))


def test_substring_only_results_draw_substring(tmp_path: Path) -> None:
    res = make_generated(with_mmlu=False)
    for info in res.runs.values():
        strict = info["accuracy"]["per_subject"]
        info["accuracy"] = gen_accuracy(strict, scoring="substring")
    t = released_table(res)
    assert t.row(GEN_MODEL, "expression", "pattern").base_zero is None  # no strict stored
    sub = released_table(res, "substring")
    assert sub.row(GEN_MODEL, "expression", "pattern").base_zero == pytest.approx(15.0)
    written = render_all([res], tmp_path, what=("accuracy",), formats=("png",))
    assert (tmp_path / "icl_vs_ft_Qwen_Qwen1.5-0.5B.png") in written
