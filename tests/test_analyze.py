"""The analysis stage: same results serially and over 2 or 3 MPI ranks, resumable, prompt aborts."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import PYTHON, REPO, cli, env, one_line_error, tiny_config
from replandscape.results import read_results
from replandscape.stages.analyze import balanced_subsample


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One extraction (2 conditions, 5 sites each) shared by the tests, copied per test."""
    tmp = tmp_path_factory.mktemp("analysis")
    cfg = tiny_config(tmp, data={"source": "builtin:demo-mmlu", "limit": 150})
    proc = cli("run", "extract", str(cfg))
    assert proc.returncode == 0, proc.stderr
    return tmp


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "out" / "activations", dst / "out" / "activations")
    return tiny_config(dst, data={"source": "builtin:demo-mmlu", "limit": 150},
                       analysis={"maxk": 40, "range_max": 32, "id_scale_index": 3,
                                 "density_k": 8, "dendrogram_min_size": 5})


def _mpi(n: int, cfg: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = ["mpiexec", "-n", str(n), "--oversubscribe", "--bind-to", "none", PYTHON, "-m",
           "replandscape.cli.main", "run", "analyze", str(cfg), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(),
                          cwd=REPO)


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    return {(r["run"], r["site"]): r for r in read_results(path).rows}


@pytest.mark.mpi
def test_serial_and_mpi_ranks_agree(extracted: Path, tmp_path: Path) -> None:
    outs = {}
    for n in (1, 2, 3):
        cfg = _copy(extracted, tmp_path / f"n{n}")
        proc = cli("run", "analyze", str(cfg)) if n == 1 else _mpi(n, cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"over {n} rank(s)" in proc.stderr
        outs[n] = _rows(tmp_path / f"n{n}" / "out" / "analysis" / "results.json")
    assert len(outs[1]) == 2 * 5
    for n in (2, 3):
        assert outs[n].keys() == outs[1].keys()
        for key, row in outs[1].items():
            other = outs[n][key]
            for metric in ("n_points", "n_peaks", "core_fraction", "ari", "id_gride", "id"):
                assert other[metric] == row[metric], (key, metric)
    first = outs[1][("tiny/mmlu/shots0", "input_layernorm.00")]
    assert first["skipped"] == "all rows identical" and first["id"] is None
    later = outs[1][("tiny/mmlu/shots2", "norm")]
    assert later["n_points"] > 40 and later["id"] > 0 and later["n_peaks"] >= 1
    assert set(later["ari"]) == {"subject", "answer"}


@pytest.mark.mpi
def test_site_split_over_ranks_by_row_blocks_gives_the_same_results(extracted: Path,
                                                                   tmp_path: Path) -> None:
    outs = {}
    for name, extra in (("whole", ()), ("split", ("analysis.split_site_rows=true",))):
        cfg = _copy(extracted, tmp_path / name)
        proc = _mpi(2, cfg, *extra) if extra else cli("run", "analyze", str(cfg))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = _rows(tmp_path / name / "out" / "analysis" / "results.json")
    assert outs["whole"].keys() == outs["split"].keys()
    for key, row in outs["whole"].items():
        for metric in ("n_points", "n_peaks", "core_fraction", "ari", "id"):
            expected = row[metric] if row[metric] in (None, {}) else pytest.approx(row[metric],
                                                                                 rel=1e-9)
            assert outs["split"][key][metric] == expected, (key, metric)


def test_row_blocks_join_to_the_whole_search() -> None:
    from replandscape.dist.mpi import row_block
    from replandscape.metrics.neighbors import exact_knn, exact_knn_rows

    rng = np.random.default_rng(3)
    x = rng.normal(size=(301, 17))
    dist, ind = exact_knn(x, 25)
    parts = [exact_knn_rows(x, row_block(301, r, 3), 25) for r in range(3)]
    assert np.array_equal(np.concatenate([p[1] for p in parts]), ind)
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), dist, rtol=1e-12)


@pytest.mark.mpi
def test_rerun_skips_finished_tasks_and_keeps_them(extracted: Path, tmp_path: Path) -> None:
    cfg = _copy(extracted, tmp_path)
    assert _mpi(2, cfg).returncode == 0
    tasks = sorted((tmp_path / "out" / "analysis" / "tasks").glob("*.json"))
    assert len(tasks) == 10
    stamp = {p: p.stat().st_mtime_ns for p in tasks}
    tasks[0].unlink()
    again = _mpi(2, cfg)
    assert again.returncode == 0
    assert "(1 computed now, over 2 rank(s))" in again.stderr
    for p in tasks[1:]:
        assert p.stat().st_mtime_ns == stamp[p]


@pytest.mark.mpi
def test_failing_rank_aborts_every_rank_promptly(extracted: Path, tmp_path: Path) -> None:
    cfg = _copy(extracted, tmp_path)
    t0 = time.monotonic()
    proc = _mpi(2, cfg, "analysis.per_subject_cap=5", timeout=120)  # 30 points < maxk
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "replandscape: error:" in proc.stderr and "maxk" in proc.stderr
    assert "tiny/mmlu/shots" in proc.stderr and " site " in proc.stderr  # names the run and site


def test_site_that_does_not_exist_is_refused(extracted: Path, tmp_path: Path) -> None:
    cfg = _copy(extracted, tmp_path)
    line = one_line_error(cli("run", "analyze", str(cfg), "analysis.sites=[99]"))
    assert "analysis.sites" in line and "99" in line


def test_cuda_device_without_a_gpu_is_refused(extracted: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = _copy(extracted, tmp_path)
    line = one_line_error(cli("run", "analyze", str(cfg), "analysis.device=cuda"))
    assert "analysis.device" in line and "no CUDA GPU" in line
    assert not (tmp_path / "out" / "analysis" / "results.json").exists()


def test_missing_activations_are_refused(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    line = one_line_error(cli("run", "analyze", str(cfg)))
    assert "no activation files" in line


def test_subsample_is_balanced_fixed_and_stored(extracted: Path, tmp_path: Path) -> None:
    subjects = np.asarray(["a"] * 50 + ["b"] * 10, dtype=object)
    ids = np.arange(60)
    mask = balanced_subsample(ids, subjects, 20, 42)
    assert mask[:50].sum() == 20 and mask[50:].sum() == 10
    assert np.array_equal(mask, balanced_subsample(ids, subjects, 20, 42))
    cfg = _copy(extracted, tmp_path)
    assert cli("run", "analyze", str(cfg), "analysis.per_subject_cap=20").returncode == 0
    data = json.loads((tmp_path / "out" / "analysis" / "results.json").read_text())
    assert data["analysis_params"]["per_subject_cap"] == 20
    assert all(r["n_subsampled"] <= 20 * 6 for r in data["rows"])
    # the subset is stored with the results: which questions every site was measured on
    stored = data["runs"]["tiny/mmlu/shots0"]["subsample"]
    assert stored["n"] == len(stored["question_ids"]) == data["rows"][1]["n_subsampled"]
    assert stored == data["runs"]["tiny/mmlu/shots2"]["subsample"]  # the same questions per condition
    # each measured site's per-point arrays: which question fell in which peak
    measured = [r for r in data["rows"] if not r.get("skipped")]
    assert measured and all(r["points"] == f"points/{r['run'].replace('/', '_')}__{r['site']}.npz"
                            for r in measured)
    for row in measured:
        points = np.load(tmp_path / "out" / "analysis" / row["points"])
        n = row["n_points"]
        assert points["question_id"].shape == points["assignment"].shape == (n,)
        assert set(points["question_id"].tolist()) <= set(stored["question_ids"])
        assert np.bincount(points["assignment"]).tolist() == row["peaks"]["sizes"]
        assert np.mean(points["assignment_halo"] != -1) == pytest.approx(row["core_fraction"])


# --------------------------------------------------------------------------------------------
# relative depth per site kind
# --------------------------------------------------------------------------------------------


def test_relative_depth_is_the_same_for_every_site_kind() -> None:
    from replandscape.results import (
        BLOCK_SITE_OFFSET,
        n_blocks_from_sites,
        relative_depth,
        site_depths,
    )
    from replandscape.sites import BLOCK_SITE_KINDS

    assert relative_depth("input_layernorm.05", 32) == relative_depth("residual.05", 32) == 5 / 33
    assert relative_depth("post_attention_layernorm.05", 32) == 5.5 / 33
    assert relative_depth("block_output.31", 32) == relative_depth("norm", 32) == 32 / 33
    assert relative_depth("logits", 32) == 1.0 and relative_depth("input_layernorm.00", 32) == 0
    assert relative_depth("embeddings", 32) is None
    assert set(BLOCK_SITE_OFFSET) == set(BLOCK_SITE_KINDS)  # every kind has its place
    default = ["input_layernorm.00", "input_layernorm.01", "input_layernorm.02", "norm", "logits"]
    assert site_depths(default) == pytest.approx([i / 4 for i in range(5)])
    two_kinds = [f"{k}.{i:02d}" for k in ("input_layernorm", "residual") for i in range(32)]
    depths = site_depths([*two_kinds, "norm", "logits"])
    assert depths[:32] == depths[32:64] == [i / 33 for i in range(32)]
    assert depths[64:] == [32 / 33, 1.0]
    assert n_blocks_from_sites(two_kinds) == 32 and n_blocks_from_sites(["norm"]) is None
    assert site_depths(["norm", "logits"], 3) == [0.75, 1.0]
    assert site_depths(["norm", "logits"]) == [0.0, 1.0]  # no block count known: by index


def test_planned_depths_follow_the_site_names(extracted: Path, tmp_path: Path) -> None:
    from replandscape.config import load_config
    from replandscape.stages.analyze import activation_files, plan_tasks

    cfg = load_config(_copy(extracted, tmp_path))
    tasks, runs = plan_tasks(cfg, activation_files(cfg))
    assert [t.relative_depth for t in tasks if t.run == "tiny/mmlu/shots0"] == [0, 0.25, 0.5, 0.75, 1]
    assert all(len(r["provenance"]["input_id"]) == 64 for r in runs.values())


# --------------------------------------------------------------------------------------------
# task files keyed by their input; wrong shapes
# --------------------------------------------------------------------------------------------


def test_input_id_follows_the_content(tmp_path: Path) -> None:
    import os

    from replandscape.stages.analyze import input_id

    path = tmp_path / "a.h5"
    path.write_bytes(b"x" * 10)
    attrs = {"stage_hash": "s1", "created": "2024-01-01T00:00:00"}
    first = input_id(path, attrs)
    assert input_id(path, attrs) == first
    assert input_id(path, {**attrs, "stage_hash": "s2"}) != first
    os.utime(path, ns=(1, 1))
    assert input_id(path, attrs) != first  # no checksums: a rewritten file counts as new
    digests = {**attrs, "digests": json.dumps({"sites/norm": "ab", "rows/subject": "cd"})}
    with_digests = input_id(path, digests)
    os.utime(path, ns=(2, 2))
    assert input_id(path, digests) == with_digests  # checksums: only the content counts
    other = {**attrs, "digests": json.dumps({"sites/norm": "ef", "rows/subject": "cd"})}
    assert input_id(path, other) != with_digests


def test_site_runner_resumes_and_recomputes_what_changed(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The loop both per-site stages run: rows in planned order, finished tasks kept, a task
    whose input changed computed again and named, other parameters computing everything."""
    from dataclasses import dataclass

    from replandscape.dist.sites import run_sites, task_key

    @dataclass(frozen=True)
    class Toy:
        run: str
        site: str
        input_id: str

        @property
        def key(self) -> str:
            return task_key(self.run, self.site)

    computed: list[str] = []

    def go(ids: str, phash: str = "p1") -> dict:
        tasks = [Toy("m/t/shots0", f"s/{i}", c) for i, c in enumerate(ids)]
        got: dict = {}

        def compute(task: Toy, threads: int) -> dict:
            computed.append(task.site)
            return {"site": task.site, "input": task.input_id, "threads": threads}

        def write(runs: dict, rows: list, path: Path) -> None:
            got.update(runs=runs, rows=rows, path=path)

        path = run_sites("toy", tmp_path, phash, plan=lambda: (tasks, {"m/t/shots0": {}}),
                         compute=compute, write=write, threads_per_rank=2)
        assert path == got["path"] == tmp_path / "results.json"
        return got

    first = go("abc")
    assert computed == ["s/0", "s/1", "s/2"] and [r["site"] for r in first["rows"]] == computed
    assert first["rows"][0] == {"site": "s/0", "input": "a", "threads": 2}
    record = json.loads((tmp_path / "tasks" / "m_t_shots0__s_0.json").read_text())
    assert record == {"params_hash": "p1", "input_id": "a", "row": first["rows"][0]}
    assert "3 tasks (3 computed now, over 1 rank(s))" in capsys.readouterr().err
    computed.clear()
    assert go("abc")["rows"] == first["rows"] and computed == []
    err = capsys.readouterr().err
    assert "(0 computed now" in err and "recomputing" not in err
    again = go("aXc")
    assert computed == ["s/1"] and again["rows"][1]["input"] == "X"
    assert ("[toy] recomputing 1 task(s) whose activation file changed since they were "
            "analysed: m/t/shots0 (1 site)") in capsys.readouterr().err
    computed.clear()
    go("aXc", phash="p2")
    assert computed == ["s/0", "s/1", "s/2"] and "recomputing" not in capsys.readouterr().err


def test_task_files_of_the_wrong_shape_are_computed_again(extracted: Path,
                                                          tmp_path: Path) -> None:
    cfg = _copy(extracted, tmp_path)
    assert cli("run", "analyze", str(cfg), "analysis.sites=[1,2]").returncode == 0
    task_dir = tmp_path / "out" / "analysis" / "tasks"
    tasks = sorted(task_dir.glob("*.json"))
    assert len(tasks) == 4
    good = json.loads(tasks[0].read_text())
    tasks[0].write_text("[]")
    tasks[1].write_text(json.dumps({**good, "row": [1, 2]}))
    tasks[2].write_text(json.dumps({k: v for k, v in good.items() if k != "row"}))
    again = cli("run", "analyze", str(cfg), "analysis.sites=[1,2]")
    assert again.returncode == 0, again.stderr
    assert "(3 computed now, over 1 rank(s))" in again.stderr
    assert "recomputing" not in again.stderr  # nothing to say: those files were not results
    rows = read_results(tmp_path / "out" / "analysis" / "results.json").rows
    assert len(rows) == 4 and all(isinstance(json.loads(p.read_text())["row"], dict)
                                  for p in tasks)


def test_results_rows_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    from replandscape.errors import UserError
    from replandscape.results import Results, write_results

    row = {"run": "m/shots0", "site": "norm", "site_index": 3, "relative_depth": 0.75,
           "n_points": 40, "id": 4.5, "n_peaks": None, "core_fraction": 0.5,
           "ari": {"subject": 0.1}}
    path = write_results(Results(analysis_params={}, rows=[row]), tmp_path / "r.json")
    assert read_results(path).rows[0]["site"] == "norm"
    data = json.loads(path.read_text())
    bad_rows = [
        ("x", "row 1 is a JSON str"),
        ({**row, "site_index": "3"}, "site_index"),
        ({**row, "relative_depth": None}, "relative_depth"),
        ({**row, "n_points": True}, "n_points"),
        ({**row, "ari": [0.1]}, "ari"),
        ({k: v for k, v in row.items() if k != "run"}, "lacks run"),
    ]
    for bad, words in bad_rows:
        path.write_text(json.dumps({**data, "rows": [row, bad]}))
        with pytest.raises(UserError) as err:
            read_results(path)
        message = str(err.value)
        assert str(path) in message and "\n" not in message
        assert words in message and "rows[1]" in message, message
    path.write_text(json.dumps({**data, "rows": {"0": row}}))
    with pytest.raises(UserError, match="rows is not a list"):
        read_results(path)


def test_replaced_activations_are_analysed_again(tmp_path: Path) -> None:
    """Another extraction into the same folder: the old rows go, the new equal a fresh run."""
    work = tmp_path / "work"
    work.mkdir()
    cfg = tiny_config(work, data={"source": "builtin:demo-mmlu", "limit": 150},
                      prompts={"shots": [0]},
                      analysis={"maxk": 40, "range_max": 32, "id_scale_index": 3,
                                "density_k": 8, "dendrogram_min_size": 5})
    assert cli("run", "extract", str(cfg)).returncode == 0
    assert cli("run", "analyze", str(cfg)).returncode == 0
    results = work / "out" / "analysis" / "results.json"
    before = _rows(results)
    activations = work / "out" / "activations"
    for old in activations.iterdir():  # as a user would: the old file and its shards
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    proc = cli("run", "extract", str(cfg), "extract.pooling=mean")
    assert proc.returncode == 0, proc.stderr
    again = cli("run", "analyze", str(cfg))
    assert again.returncode == 0, again.stderr
    changed = [ln for ln in again.stderr.splitlines() if "recomputing" in ln]
    assert changed == ["[analyze] recomputing 5 task(s) whose activation file changed since "
                       "they were analysed: tiny/mmlu/shots0 (5 sites)"], again.stderr
    after = _rows(results)
    assert after.keys() == before.keys()
    assert any(after[k]["id"] != before[k]["id"] for k in after)
    fresh = tmp_path / "fresh"
    shutil.copytree(activations, fresh / "out" / "activations")
    fresh_cfg = tiny_config(fresh, data={"source": "builtin:demo-mmlu", "limit": 150},
                            prompts={"shots": [0]},
                            analysis={"maxk": 40, "range_max": 32, "id_scale_index": 3,
                                      "density_k": 8, "dendrogram_min_size": 5})
    assert cli("run", "analyze", str(fresh_cfg)).returncode == 0
    expected = _rows(fresh / "out" / "analysis" / "results.json")
    for key, row in expected.items():
        for metric in ("n_points", "n_peaks", "core_fraction", "ari", "id", "id_gride",
                       "relative_depth", "skipped"):
            assert after[key].get(metric) == row.get(metric), (key, metric)
    # nothing changed since: nothing is recomputed
    third = cli("run", "analyze", str(cfg))
    assert "recomputing" not in third.stderr and "(0 computed now" in third.stderr


def test_second_analysis_on_one_output_is_refused(extracted: Path, tmp_path: Path) -> None:
    import os

    from replandscape.lock import stage_lock

    cfg = _copy(extracted, tmp_path)
    with stage_lock(tmp_path / "out" / "analysis", "analyze"):
        line = one_line_error(cli("run", "analyze", str(cfg)))
        assert "already running" in line and f"pid {os.getpid()}" in line
        assert not (tmp_path / "out" / "analysis" / "results.json").exists()
    assert cli("run", "analyze", str(cfg), "analysis.sites=[4]").returncode == 0


@pytest.mark.mpi
def test_second_analysis_is_refused_over_ranks_too(extracted: Path, tmp_path: Path) -> None:
    from replandscape.lock import stage_lock

    cfg = _copy(extracted, tmp_path)
    t0 = time.monotonic()
    with stage_lock(tmp_path / "out" / "analysis", "analyze"):
        proc = _mpi(2, cfg, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    assert "already running" in proc.stderr
