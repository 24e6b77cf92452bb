"""The rsa stage: a planted same-slope structure is found at its site and not at a noise site;
the same results serially and over 2 MPI ranks; a re-run skips finished tasks; the ICL change and
its correlation with the accuracy gain are what the rows and the files say."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers import PYTHON, REPO, cli, env, one_line_error, tiny_config
from replandscape.metrics.rsa import alignment_gain_correlation
from replandscape.storage import ShardWriter, SiteSpec, finalize_shards

SLOPES = (-2, -1, 1, 2, 3)
INTERCEPTS = (-5, 0, 5)
PER_CONDITION = 8
DIM = 16
SITES = [SiteSpec("input_layernorm.00", DIM, "float32"),
         SiteSpec("input_layernorm.01", DIM, "float32"),
         SiteSpec("input_layernorm.01@query.mean", DIM, "float32"),
         SiteSpec("norm", DIM, "float32")]
PLANTED = "input_layernorm.01"
NOISE = "input_layernorm.00"


def planted(slopes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Items whose condition means are alike exactly when their slopes are: one dimension per
    slope, plus noise that cancels within each condition (antithetic pairs)."""
    n = len(slopes)
    x = np.zeros((n, DIM), dtype=np.float32)
    for i, s in enumerate(slopes):
        x[i, SLOPES.index(int(s))] = 3.0
    noise = rng.standard_normal((n // 2, DIM - len(SLOPES))).astype(np.float32)
    x[0::2, len(SLOPES):] = noise
    x[1::2, len(SLOPES):] = -noise
    return x


def write_file(folder: Path, shots: int, correct_rate: dict[str, float], *,
               planted_here: bool = True) -> Path:
    """An activation file of the regression task as the extraction writes it."""
    rng = np.random.default_rng(shots + 1)
    items = [(a, b) for a in SLOPES for b in INTERCEPTS for _ in range(PER_CONDITION)]
    n = len(items)
    slopes = np.asarray([a for a, _ in items])
    conditions = [f"slope={a},intercept={b}" for a, b in items]
    structure = planted(slopes, rng)
    sites = {NOISE: rng.standard_normal((n, DIM)).astype(np.float32),
             PLANTED: structure if planted_here else rng.standard_normal(
                 (n, DIM)).astype(np.float32),
             "norm": rng.standard_normal((n, DIM)).astype(np.float32)}
    has_query = np.ones(n, dtype=bool)
    # an antithetic pair per condition lacks the span (the others' noise still cancels)
    has_query[np.arange(n) % PER_CONDITION < 2] = False
    sites["input_layernorm.01@query.mean"] = np.where(has_query[:, None], structure, 0.0)
    # per condition: the first round(rate * 8) items are correct
    correct = np.zeros(n, dtype=bool)
    for c in sorted(set(conditions)):
        rows = [i for i, k in enumerate(conditions) if k == c]
        correct[rows[:round(correct_rate[c] * PER_CONDITION)]] = True
    row_values = {"question_id": np.arange(n, dtype=np.int64), "answer": np.zeros(n, np.int8),
                  "predicted": np.zeros(n, np.int8), "correct": correct,
                  "n_tokens": np.full(n, 20, np.int32), "has_span.query": has_query}
    final = folder / f"shots{shots}.h5"
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(final, 0, 1, 0, n, SITES, f"stage-{shots}",
                         extra_fields={"has_span.query": np.bool_})
    writer.write(np.arange(n), sites, row_values)
    writer.close()
    header = {"site_names": [s.name for s in SITES], "stage_hash": f"stage-{shots}",
              "world_size": 1, "model_name": "toy", "task": "regression",
              "condition": f"shots{shots}", "shots": shots, "finetuned": False}
    strings = {"label.condition": conditions, "label.slope": [str(a) for a, _ in items],
               "label.intercept": [str(b) for _, b in items],
               "target": ["0"] * n, "variant": ["misleading"] * n}
    return finalize_shards(final, 1, SITES, header, conditions, [f"p{i}" for i in range(n)],
                           extra_fields={"has_span.query": np.bool_}, extra_strings=strings)


CONDITIONS = sorted(f"slope={a},intercept={b}" for a in SLOPES for b in INTERCEPTS)


@pytest.fixture(scope="module")
def activations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rsa") / "activations"
    rng = np.random.default_rng(3)
    before = {c: float(rng.integers(0, 5)) / 8 for c in CONDITIONS}
    after = {c: min(1.0, before[c] + float(rng.integers(0, 4)) / 8) for c in CONDITIONS}
    write_file(folder, 0, before, planted_here=False)
    write_file(folder, 2, after)
    return folder


def config(tmp: Path, activations: Path, **rsa: Any) -> Path:
    import shutil

    if not (tmp / "out" / "activations").exists():
        shutil.copytree(activations, tmp / "out" / "activations")
    return tiny_config(tmp, task={"name": "regression", "n_test": 16, "n_dev": 8,
                                  "n_train": 32},
                       data={"source": "builtin:task", "train_splits": ["train"]},
                       analysis={"per_subject_cap": None},
                       rsa={"n_permutations": 200, "threads_per_rank": 1, **rsa})


def _mpi(n: int, cfg: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["mpiexec", "-n", str(n), "--oversubscribe", "--bind-to", "none", PYTHON, "-m",
           "replandscape.cli.main", "run", "rsa", str(cfg)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(), cwd=REPO)


def _results(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "out" / "rsa" / "results.json").read_text())


def _rows(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["run"], r["site"]): r for r in results["rows"]}


def test_planted_site_aligns_and_noise_does_not(activations: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, activations)
    proc = cli("run", "rsa", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 tasks (8 computed now, over 1 rank(s))" in proc.stderr
    results = _results(tmp_path)
    rows = _rows(results)
    assert len(rows) == 2 * len(SITES)
    hit = rows[("toy/regression/shots2", PLANTED)]
    assert hit["alignment"]["same_slope"] == pytest.approx(1.0, abs=1e-9)
    assert hit["p_value"]["same_slope"] == pytest.approx(1 / 201)
    assert hit["alignment"]["same_intercept"] < 0.2
    assert hit["probes"]["slope"]["kind"] == "regression"
    assert hit["probes"]["slope"]["score"] > 0.95 and hit["probes"]["slope"]["selectivity"] > 0.5
    assert hit["probes"]["intercept"]["score"] < 0.3
    noise = rows[("toy/regression/shots2", NOISE)]
    assert noise["alignment"]["same_slope"] < 0.5 and noise["p_value"]["same_slope"] > 0.05
    assert noise["probes"]["slope"]["score"] < 0.3
    # the span site keeps the items that have the span, at the depth of the site it pools
    span = rows[("toy/regression/shots2", "input_layernorm.01@query.mean")]
    assert span["n_items"] == len(CONDITIONS) * (PER_CONDITION - 2)
    assert (span["base_site"], span["span"], span["pooling"]) == (PLANTED, "query", "mean")
    assert span["relative_depth"] == hit["relative_depth"]
    assert span["alignment"]["same_slope"] == pytest.approx(1.0, abs=1e-9)
    run = results["runs"]["toy/regression/shots2"]
    assert run["shots"] == 2 and len(run["condition_accuracy"]) == len(CONDITIONS)

    # before and after ICL: the changes and the gain correlation follow from rows and files
    icl = {(e["hypothesis"]): e for e in results["icl"]}
    entry = icl["same_slope"]
    assert entry["baseline"] == "toy/regression/shots0" and entry["shots"] == 2
    i = entry["sites"].index(PLANTED)
    before = rows[("toy/regression/shots0", PLANTED)]["alignment"]["same_slope"]
    assert entry["delta_alignment"][i] == pytest.approx(1.0 - before)
    assert entry["delta_alignment"][i] > 0.5
    acc0 = results["runs"]["toy/regression/shots0"]["condition_accuracy"]
    assert entry["conditions"] == CONDITIONS
    assert entry["accuracy_gain"] == pytest.approx([run["condition_accuracy"][c] - acc0[c]
                                                    for c in CONDITIONS])
    expected = alignment_gain_correlation(entry["accuracy_gain"], entry["delta_per_condition"])
    got = entry["gain_correlation"]
    assert got["n"] == len(CONDITIONS)
    for a, b in zip(got["spearman"], expected.spearman):
        assert (a is None and np.isnan(b)) or a == pytest.approx(b)

    # a re-run computes nothing and keeps the task files as they were
    task_files = sorted((tmp_path / "out" / "rsa" / "tasks").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in task_files]
    again = cli("run", "rsa", str(cfg))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(0 computed now" in again.stderr
    assert [p.stat().st_mtime_ns for p in task_files] == stamps
    assert _rows(_results(tmp_path)).keys() == rows.keys()


@pytest.mark.mpi
def test_serial_and_two_ranks_agree(activations: Path, tmp_path: Path) -> None:
    outs = {}
    for n in (1, 2):
        cfg = config(tmp_path / f"n{n}", activations)
        proc = cli("run", "rsa", str(cfg)) if n == 1 else _mpi(n, cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"over {n} rank(s)" in proc.stderr
        outs[n] = _results(tmp_path / f"n{n}")
    one, two = _rows(outs[1]), _rows(outs[2])
    assert one.keys() == two.keys()
    for key, row in one.items():
        for field in ("alignment", "p_value", "probes", "rsa", "relative_depth", "n_items"):
            assert two[key][field] == row[field], (key, field)
    assert outs[1]["icl"] == outs[2]["icl"]


def test_a_task_without_hypotheses_is_one_line(activations: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, activations)
    line = one_line_error(cli("run", "rsa", str(cfg), "task.name=expression"))
    assert "task.name" in line and "expression" in line and "hypotheses" in line, line


def test_too_many_probe_folds_is_one_line(activations: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, activations, probe_labels=["condition"], folds=9, sites=[0])
    line = one_line_error(cli("run", "rsa", str(cfg)))
    assert "fewer than the probe's 9 folds" in line and "probes.folds" in line, line


def test_rsa_sweep_plans_an_rsa_job_after_extraction() -> None:
    from helpers import REPO
    from replandscape.sweep import load_sweep, plan_sweep

    sweep = load_sweep(REPO / "configs" / "sweeps" / "rsa.yaml", ["cluster=example-gpu"])
    jobs = {j.key: j for j in plan_sweep(sweep)}
    assert {e.cfg.task.name for e in sweep.experiments} == {"regression", "reading"}
    rsa = jobs["rsa-vicuna-13b-reading/rsa"]
    assert rsa.depends_on == ("rsa-vicuna-13b-reading/extract",) and rsa.gpus_per_node == 0
    assert all(e.cfg.extract.spans == ("task",) for e in sweep.experiments)


@pytest.mark.slow
def test_rsa_from_a_real_extraction_with_spans_and_attention_ratio(tmp_path: Path) -> None:
    """Extraction of the reading task keeping span states and attention masses, then the rsa
    stage: every span site is analysed, and the attention ratio (relevant over distractor) per
    layer equals a direct computation from the attention file."""
    import h5py

    cfg = tiny_config(
        tmp_path,
        task={"name": "reading", "n_test": 30, "n_dev": 8, "n_train": 8},
        data={"source": "builtin:task", "train_splits": ["train"]},
        prompts={"shots": [0, 2], "max_shots": 8},
        extract={"sites": ["norm"], "spans": ["task"], "span_pooling": ["max"],
                 "attention_spans": ["task"], "store_dtype": "float32"},
        rsa={"n_permutations": 50, "folds": 3},
        analysis={"maxk": 20, "range_max": 16, "id_scale_index": 2, "density_k": 8,
                  "per_subject_cap": None})
    for stage in ("extract", "rsa"):
        proc = cli("run", stage, str(cfg))
        assert proc.returncode == 0, (stage, proc.stderr[-3000:])
    results = json.loads((tmp_path / "out" / "rsa" / "results.json").read_text())
    sites = {r["site"] for r in results["rows"] if r["run"] == "tiny/reading/shots2"}
    assert sites == {"norm", "norm@relevant.max", "norm@distractor.max", "norm@question.max"}
    ratios = {a["run"]: a for a in results["attention"]}
    assert set(ratios) == {"tiny/reading/shots0", "tiny/reading/shots2"}
    entry = ratios["tiny/reading/shots2"]
    assert entry["spans"] == ["relevant", "distractor"]
    with h5py.File(tmp_path / "out" / "attention" / "shots2.h5", "r") as fh:
        a, b = fh["mass/relevant"][:], fh["mass/distractor"][:]
    both = b.sum(axis=(1, 2)) > 0
    assert entry["n_items"] == int(both.sum()) > 0
    np.testing.assert_allclose(entry["ratio_per_layer"],
                               a[both].mean((0, 2)) / b[both].mean((0, 2)), rtol=1e-6)
    assert np.asarray(entry["ratio_per_head"]).shape == (3, 4)
    assert entry["gain_correlation"] is not None  # three conditions carry a distractor
    # parameterized probing: the distractor probed within each question type
    norm = next(r for r in results["rows"] if r["run"] == "tiny/reading/shots2"
                and r["site"] == "norm")
    within = norm["parameterized"]["distractor|question_type"]
    assert within["bins"] == ["what", "where", "who"] and len(within["probes"]) == 3
    assert all(0 <= p["score"] <= 1 and p["n_classes"] == 2 for p in within["probes"])
    # the figures stage draws the similarity study from the results alone
    from replandscape.figures.rsa import render_rsa

    drawn = render_rsa(tmp_path / "out" / "rsa" / "results.json", tmp_path / "fig", ["png"])
    assert sorted(p.name for p in drawn) == [f"rsa_{kind}_tiny_reading.png" for kind in
                                             ("alignment", "attention", "probes", "similarity")]


@pytest.mark.slurm
@pytest.mark.slow
def test_rsa_sweep_runs_on_the_local_slurm_cluster(slurm_cluster: object, tmp_path: Path) -> None:
    import yaml

    cfg = tiny_config(
        tmp_path,
        task={"name": "reading", "n_test": 30, "n_dev": 8, "n_train": 8},
        data={"source": "builtin:task", "train_splits": ["train"]},
        prompts={"shots": [0, 2], "max_shots": 8},
        extract={"sites": ["norm"], "spans": ["task"], "span_pooling": ["max"],
                 "attention_spans": ["task"], "store_dtype": "float32"},
        rsa={"n_permutations": 50, "folds": 3},
        analysis={"maxk": 20, "range_max": 16, "id_scale_index": 2, "density_k": 8,
                  "per_subject_cap": None, "ranks": 2})
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"sweep": {
        "name": "sim", "output_root": str(tmp_path / "root"), "experiments": [str(cfg)],
        "tasks": ["reading"], "finetune": False, "rsa": True}}))
    proc = cli("submit", str(sweep), "cluster=local-slurm", "--wait", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "root" / "t-reading" / "rsa" / "results.json").read_text())
    assert set(results["runs"]) == {"tiny/reading/shots0", "tiny/reading/shots2"}
    assert results["attention"] and results["icl"]
    record = json.loads((tmp_path / "root" / "sweep-sim.json").read_text())
    rsa_job = next(j for j in record["jobs"] if j["key"] == "t-reading/rsa")
    assert "over 2 rank(s)" in Path(rsa_job["logs"][0]).read_text()
