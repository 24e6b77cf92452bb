"""The real local Slurm cluster (slurm/cluster.sh) with accounting, MPI and submitit."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from slurm_support import CLUSTER_SH, requires_slurm

pytestmark = requires_slurm

# States after which a job will not change any more (a requeued job goes back to PENDING).
FINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def test_sbatch_job_completes(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job_id = slurm_cluster.sbatch("-o", str(out), "--wrap", "echo hello from $SLURM_JOB_ID")
    assert slurm_cluster.wait_for_state(job_id, FINAL, timeout_s=30) == "COMPLETED"
    assert out.read_text().strip() == f"hello from {job_id}"


def test_failing_job_reads_failed(slurm_cluster, tmp_path):
    job_id = slurm_cluster.sbatch("-o", str(tmp_path / "job.out"), "--wrap", "exit 3")
    assert slurm_cluster.wait_for_state(job_id, FINAL, timeout_s=30) == "FAILED"
    exit_code = slurm_cluster.run("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "ExitCode").stdout
    assert exit_code.strip() == "3:0"


def test_srun_pmix_mpi4py_two_ranks(slurm_cluster):
    code = (
        "from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "print(f'rank {c.Get_rank()} size {c.Get_size()}', flush=True)"
    )
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(
        ["srun", "--mpi=pmix", "-p", slurm_cluster.partition, "-n", "2", "-N", "1", "-t", "2",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"srun failed:\n{proc.stdout}\n{proc.stderr}\n{slurm_cluster.log_tail('slurmd')}"
    )
    lines = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("rank "))
    assert lines == ["rank 0 size 2", "rank 1 size 2"], proc.stdout + proc.stderr


def test_submitit_result_and_cancel(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")

    # AutoExecutor: a stdlib function (importable in the job's process), run under Slurm.
    executor = submitit.AutoExecutor(folder=tmp_path / "auto", cluster="slurm")
    executor.update_parameters(
        slurm_partition=slurm_cluster.partition, timeout_min=5, cpus_per_task=1
    )
    job = executor.submit(os.getenv, "SLURM_JOB_ID")
    assert slurm_cluster.wait_for_state(job.job_id, FINAL, timeout_s=45) == "COMPLETED", (
        job.stderr()
    )
    assert job.result() == job.job_id

    # SlurmExecutor: a long job, cancelled while it runs.
    executor = submitit.SlurmExecutor(folder=tmp_path / "slurm")
    executor.update_parameters(partition=slurm_cluster.partition, time=5, cpus_per_task=1)
    job = executor.submit(time.sleep, 300)
    slurm_cluster.wait_for_state(job.job_id, {"RUNNING"} | FINAL, timeout_s=30)
    job.cancel()
    assert slurm_cluster.wait_for_state(job.job_id, FINAL, timeout_s=30).startswith("CANCELLED")
    assert job.get_info(mode="force")["State"].startswith("CANCELLED")
    assert job.state.startswith("CANCELLED")
    assert job.done(force_check=True)


def test_cluster_script_is_idempotent(slurm_cluster):
    run_dir = slurm_cluster.state_dir / "run"
    pids = {p.name: p.read_text() for p in run_dir.glob("*.pid")}
    t0 = time.monotonic()
    for _ in range(2):
        proc = subprocess.run(
            ["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "already running" in proc.stderr
    assert time.monotonic() - t0 < 10
    assert {p.name: p.read_text() for p in run_dir.glob("*.pid")} == pids  # nothing restarted

    status = subprocess.run(
        ["bash", str(CLUSTER_SH), "status"], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stdout + status.stderr

    env = subprocess.run(
        ["bash", str(CLUSTER_SH), "env"], capture_output=True, text=True, timeout=30
    ).stdout
    assert f"export SLURM_CONF={slurm_cluster.conf}" in env.splitlines()
    assert stat.S_IMODE((slurm_cluster.conf.parent / "slurmdbd.conf").stat().st_mode) == 0o600
    conf = slurm_cluster.conf.read_text()
    assert "ClusterName=replandscape" in conf and "PartitionName=local" in conf
