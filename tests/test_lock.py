"""The per-folder stage lock: a second live run is refused in one line; a killed holder frees it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from helpers import PYTHON, REPO, env
from replandscape.errors import UserError
from replandscape.lock import lock_path, read_holder, stage_lock

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from replandscape.lock import stage_lock
    with stage_lock(Path(sys.argv[1]), sys.argv[2]):
        print("held", flush=True)
        time.sleep(600)
""")

TRY = textwrap.dedent("""
    import sys
    from pathlib import Path
    from replandscape.errors import UserError
    from replandscape.lock import stage_lock
    try:
        with stage_lock(Path(sys.argv[1]), sys.argv[2]):
            print("acquired", flush=True)
    except UserError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
""")


def _holder(folder: Path, stage: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([PYTHON, "-c", HOLD, str(folder), stage], stdout=subprocess.PIPE,
                            text=True, env=env(), cwd=REPO)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def _try(folder: Path, stage: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", TRY, str(folder), stage], capture_output=True, text=True,
                          env=env(), cwd=REPO, timeout=120)


def test_second_process_is_refused_in_one_line_and_sigkill_frees_the_lock(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    holder = _holder(folder, "finetune")
    try:
        record = read_holder(lock_path(folder, "finetune"))
        assert record is not None
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        assert record["stage"] == "finetune"

        refused = _try(folder, "finetune")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        line = refused.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert f"pid {holder.pid}" in line and socket.gethostname() in line and "since" in line
        assert str(lock_path(folder, "finetune")) in line and "fix:" in line

        # Another stage in the same folder is a different lock.
        assert _try(folder, "extract").returncode == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)

    # The killed holder left its file (and its record) behind, but not its lock.
    assert lock_path(folder, "finetune").exists()
    after = _try(folder, "finetune")
    assert after.returncode == 0 and after.stdout.strip() == "acquired", after.stderr


def test_same_process_second_lock_is_refused_and_release_removes_the_file(tmp_path: Path) -> None:
    with stage_lock(tmp_path, "analyze"):
        data = json.loads(lock_path(tmp_path, "analyze").read_text())
        assert data["pid"] == os.getpid() and data["stage"] == "analyze"
        with pytest.raises(UserError, match="already running"), stage_lock(tmp_path, "analyze"):
            pass
    assert not lock_path(tmp_path, "analyze").exists()
    with stage_lock(tmp_path, "analyze"):
        pass


def test_a_second_finetune_on_a_held_folder_is_refused(tmp_path: Path) -> None:
    from helpers import cli, one_line_error, tiny_config

    cfg = tiny_config(tmp_path)
    holder = _holder(tmp_path / "out" / "finetune", "finetune")
    try:
        line = one_line_error(cli("run", "finetune", str(cfg)))
        assert "already running" in line and f"pid {holder.pid}" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert not (tmp_path / "out" / "finetune" / "result.json").exists()
