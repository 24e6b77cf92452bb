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
    first = outs[1][("tiny/shots0", "input_layernorm.00")]
    assert first["skipped"] == "all rows identical" and first["id"] is None
    later = outs[1][("tiny/shots2", "norm")]
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
    assert "tiny/shots" in proc.stderr and " site " in proc.stderr  # names the run and site


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
    stored = data["runs"]["tiny/shots0"]["subsample"]
    assert stored["n"] == len(stored["question_ids"]) == data["rows"][1]["n_subsampled"]
    assert stored == data["runs"]["tiny/shots2"]["subsample"]  # the same questions per condition
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
