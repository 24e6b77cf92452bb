"""pytest support for tests that need the real local Slurm cluster (slurm/cluster.sh).

Use it from a test module::

    import pytest
    from slurm_support import requires_slurm

    pytestmark = requires_slurm          # = [pytest.mark.slurm, skipif(no slurm binaries)]

    def test_something(slurm_cluster):
        job_id = slurm_cluster.sbatch("--wrap", "true")
        assert slurm_cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=30) == "COMPLETED"

``tests/conftest.py`` imports the fixture: ``from slurm_support import slurm_cluster  # noqa: F401``.

The fixture (session scope) starts the cluster with ``slurm/cluster.sh start`` unless it is
already running, exports ``SLURM_CONF`` into ``os.environ`` for the session, and stops the cluster
at the end only when it started it (set ``REPLANDSCAPE_SLURM_KEEP=1`` to leave it running for the
next session). A missing Slurm installation skips the test; a failing start fails it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO_ROOT / "slurm" / "cluster.sh"
PARTITION = "local"

# Programs the cluster needs; when any is missing the Slurm tests are skipped.
_DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")
_CLIENTS = ("sbatch", "srun", "squeue", "sacct", "scancel", "sinfo", "sacctmgr")


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return shutil.which(name, path=path)


def missing_slurm_programs() -> list[str]:
    """Names of the Slurm/munge/MariaDB programs that are not installed."""
    return [p for p in (*_DAEMONS, *_CLIENTS) if _which(p) is None]


def slurm_available() -> bool:
    """True when every program the local cluster needs is installed (it may still be stopped)."""
    return not missing_slurm_programs()


def _skip_reason() -> str:
    missing = missing_slurm_programs()
    return (
        "Slurm is not installed (missing: " + ", ".join(missing) + "); "
        "run scripts/bootstrap.sh as root to install it"
        if missing
        else ""
    )


# Marker-friendly helpers: `pytestmark = requires_slurm` in a module (the `slurm` mark, so that
# `-m "not slurm"` deselects it, plus a skip with a clear reason when Slurm is not installed), or
# decorate a single test with `@pytest.mark.slurm` and `@skip_without_slurm`.
skip_without_slurm = pytest.mark.skipif(not slurm_available(), reason=_skip_reason() or "n/a")
requires_slurm = [pytest.mark.slurm, skip_without_slurm]


def _run_script(action: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), action],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def _parse_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            env[key.strip()] = value.strip().strip("'\"")
    return env


@dataclass
class SlurmCluster:
    """Handle on the running local cluster."""

    conf: Path
    state_dir: Path
    partition: str = PARTITION
    started_here: bool = False

    def run(
        self, *args: str, timeout_s: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (e.g. ``run("squeue", "-h")``) with a deadline."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        proc = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def sbatch(self, *args: str, timeout_s: float = 30) -> str:
        """Submit with ``sbatch --parsable -p <partition> ARGS``; returns the job id."""
        out = self.run(
            "sbatch", "--parsable", "-p", self.partition, *args, timeout_s=timeout_s
        ).stdout
        return out.strip().split(";")[0]

    def state(self, job_id: str | int) -> str:
        """The job's state from accounting (``sacct``), e.g. ``COMPLETED`` or ``CANCELLED by 0``;
        empty while accounting has not recorded it yet."""
        proc = self.run(
            "sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State", check=False, timeout_s=20
        )
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def wait_for_state(
        self, job_id: str | int, states: Iterable[str] | str, timeout_s: float = 60
    ) -> str:
        """Poll ``sacct -j ID -X -n -P -o State`` until the state's first word (``CANCELLED by 0``
        counts as ``CANCELLED``) is one of ``states``; returns the full state string.
        Raises ``TimeoutError`` (with the last state and the queue) after ``timeout_s``."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout_s
        state = ""
        while True:
            state = self.state(job_id)
            if state and state.split()[0] in wanted:
                return state
            if time.monotonic() >= deadline:
                queue = self.run("squeue", "-j", str(job_id), check=False).stdout
                raise TimeoutError(
                    f"job {job_id}: state {state or '(unknown to sacct)'!r} after {timeout_s:.0f} s, "
                    f"wanted one of {sorted(wanted)}\n{queue}"
                )
            time.sleep(0.2)

    def release(self, job_id: str | int) -> None:
        """Start a held/requeued job now (Slurm holds a requeued job about 120 s). A job that
        started meanwhile needs no release."""
        proc = self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        if proc.returncode != 0 and "no longer pending" not in proc.stderr:
            raise AssertionError(f"cannot release job {job_id}: {proc.stderr.strip()}")

    def log_tail(self, daemon: str = "slurmctld", lines: int = 40) -> str:
        path = self.state_dir / "log" / f"{daemon}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _status_ok() -> bool:
    try:
        return _run_script("status", timeout_s=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The local Slurm cluster, started for the session if it is not running (see module doc)."""
    if not slurm_available():
        pytest.skip(_skip_reason())
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster (slurm/cluster.sh) needs root")

    started_here = False
    if not _status_ok():
        proc = _run_script("start")
        if proc.returncode != 0:
            _run_script("stop", timeout_s=120)  # do not leave half a cluster running
            pytest.fail(
                f"slurm/cluster.sh start failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
                pytrace=False,
            )
        started_here = True

    env = _parse_env(_run_script("env", timeout_s=30).stdout)
    conf = Path(env["SLURM_CONF"])
    state_dir = Path(env.get("REPLANDSCAPE_SLURM_DIR", conf.parent.parent))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield SlurmCluster(
            conf=conf, state_dir=state_dir, partition=PARTITION, started_here=started_here
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if started_here and os.environ.get("REPLANDSCAPE_SLURM_KEEP", "0") != "1":
            proc = _run_script("stop", timeout_s=120)
            if proc.returncode != 0:
                print(
                    f"slurm/cluster.sh stop failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                )
