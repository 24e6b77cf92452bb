"""Threads per analysis rank: counted per node and per task, under mpiexec and under srun."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import PYTHON, REPO, env
from replandscape.dist import mpi

# Writes what one rank sees as JSON into the folder given first (a file per rank: the launcher
# may interleave the ranks' stdout); with "pin" each rank first binds itself to one CPU of its
# own (rank r on the r-th CPU it may use), as a binding launcher would.
PROBE = """
import json, os, pathlib, sys
from replandscape.dist import mpi
comm = mpi.world()
if "pin" in sys.argv[2:]:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[comm.rank % len(cpus)]})
cpus = frozenset(os.sched_getaffinity(0))
report = {"rank": comm.rank, "size": comm.size, "cpus": len(cpus),
          "sharing": mpi.ranks_sharing_cpus(comm, cpus),
          "threads": mpi.threads_per_rank(comm, None)}
pathlib.Path(sys.argv[1], f"rank{comm.rank}.json").write_text(json.dumps(report))
"""

N_CPUS = len(os.sched_getaffinity(0))


def _env(**extra: str) -> dict[str, str]:
    out = env(**extra)
    for key in list(out):
        if key.startswith(("SLURM_", "OMPI_COMM_WORLD", "PMIX_", "PMI_")) and key not in extra:
            out.pop(key)
    return out


def _reports(proc: subprocess.CompletedProcess[str], folder: Path, n: int) -> list[dict]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    assert [r["rank"] for r in reports] == list(range(n)), proc.stdout + proc.stderr
    assert all(r["size"] == n for r in reports)
    return reports


def _mpiexec(folder: Path, n: int, *args: str, **extra_env: str) -> list[dict]:
    cmd = ["mpiexec", "-n", str(n), "--oversubscribe", "--bind-to", "none"]
    for key in extra_env:
        cmd += ["-x", key]
    cmd += [PYTHON, "-c", PROBE, str(folder), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=_env(**extra_env), cwd=REPO)
    return _reports(proc, folder, n)


@pytest.mark.parametrize(
    ("affinity", "slurm_cpus", "sharing", "expected"),
    [
        (8, None, 1, 8),     # 16 ranks on 4 nodes, each task bound to its own 8 CPUs
        (8, 8, 1, 8),        # the same under srun with --cpus-per-task=8
        (32, None, 4, 8),    # unbound: 4 ranks share a 32-CPU node
        (32, 8, 4, 8),
        (64, 8, 4, 8),       # the affinity is the whole node, the allocation bounds it
        (64, 2, 1, 2),       # one task, task/none plugin: 2 allocated CPUs of 64
        (2, None, 2, 1),
        (2, None, 3, 1),     # more ranks than CPUs: still one thread each
        (1, 4, 1, 1),        # an allocation larger than the affinity does not raise it
        (0, None, 1, 1),
    ],
)
def test_threads_for_arithmetic(affinity: int, slurm_cpus: int | None, sharing: int,
                                expected: int) -> None:
    assert mpi.threads_for(affinity, slurm_cpus, sharing) == expected


def test_serial_comm_uses_the_whole_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    comm = mpi._SerialComm()
    assert mpi.ranks_sharing_cpus(comm, frozenset(os.sched_getaffinity(0))) == 1
    assert mpi.threads_per_rank(comm, None) == N_CPUS
    assert mpi.threads_per_rank(comm, 3) == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert mpi.threads_per_rank(comm, None) == 1


@pytest.mark.mpi
def test_two_unbound_ranks_share_the_node(tmp_path: Path) -> None:
    for report in _mpiexec(tmp_path, 2):
        assert report["cpus"] == N_CPUS
        assert report["sharing"] == 2
        assert report["threads"] == max(1, N_CPUS // 2)


@pytest.mark.mpi
def test_ranks_bound_to_their_own_cpus_do_not_divide(tmp_path: Path) -> None:
    if N_CPUS < 2:
        pytest.skip("needs 2 CPUs")
    for report in _mpiexec(tmp_path, 2, "pin"):
        assert report["cpus"] == 1 and report["sharing"] == 1 and report["threads"] == 1


@pytest.mark.mpi
def test_one_rank_is_bounded_by_slurm_cpus_per_task(tmp_path: Path) -> None:
    if N_CPUS < 2:
        pytest.skip("needs 2 CPUs")
    (tmp_path / "alone").mkdir()
    (tmp_path / "bounded").mkdir()
    [alone] = _mpiexec(tmp_path / "alone", 1)
    assert alone["sharing"] == 1 and alone["threads"] == N_CPUS
    [bounded] = _mpiexec(tmp_path / "bounded", 1, SLURM_CPUS_PER_TASK="1")
    assert bounded["threads"] == 1


@pytest.mark.slurm
@pytest.mark.parametrize(("ranks", "cpus_per_task"), [(2, 1), (1, 1), (1, 2)])
def test_srun_ranks_get_their_allocation(slurm_cluster, tmp_path: Path, ranks: int,
                                        cpus_per_task: int) -> None:
    node_cpus = int(slurm_cluster.run("sinfo", "-h", "-p", slurm_cluster.partition, "-o",
                                      "%c").stdout.split()[0])
    if ranks * cpus_per_task > node_cpus:
        pytest.skip(f"the node has {node_cpus} CPUs")
    extra = {k: v for k, v in os.environ.items() if k.startswith("SLURM_CONF")}
    proc = subprocess.run(
        ["srun", "--mpi=pmix", "-p", slurm_cluster.partition, "-N", "1", "-n", str(ranks),
         "-c", str(cpus_per_task), "-t", "2", PYTHON, "-c", PROBE, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO, stdin=subprocess.DEVNULL,
        env=_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra))
    for report in _reports(proc, tmp_path, ranks):
        # the local cluster does not bind tasks (task/none): every task sees the whole node,
        # so the threads come from the task's allocation, not from the node's CPUs
        assert report["threads"] == cpus_per_task, report
