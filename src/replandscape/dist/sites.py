"""The per-site stages' loop over MPI ranks: the geometry analysis and the rsa stage run on it.

Rank 0 holds the stage's lock in its output folder for the whole run and plans the tasks (one per
site of one activation file); ranks take tasks dynamically (:func:`replandscape.dist.mpi.
dynamic_tasks`) and write one JSON per finished task, ``OUT/tasks/KEY.json``, atomically, holding
the stage's parameter hash, the identity of the task's input and the task's results row. A re-run
skips the tasks whose file holds a row computed with these parameters on this input, so a killed
job keeps what it had and a replaced activation file is computed again (and the run says which).
Rank 0 then gathers the rows, in the planned order, and the stage writes ``OUT/results.json``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol, TypeVar

from replandscape.atomic import write_text_atomic
from replandscape.dist import mpi
from replandscape.errors import UserError
from replandscape.lock import stage_lock
from replandscape.progress import progress as make_progress


class SiteTask(Protocol):
    """What the loop reads of a per-site task (the geometry's or the rsa stage's)."""

    @property
    def key(self) -> str: ...

    @property
    def run(self) -> str: ...

    @property
    def site(self) -> str: ...

    @property
    def input_id(self) -> str: ...


T = TypeVar("T", bound=SiteTask)


def task_key(run: str, site: str) -> str:
    """The name of a task's file (without ``.json``): the run and the site, file-name safe."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run}__{site}")


def load_task_file(path: Path) -> dict[str, Any] | None:
    """A task file's content, or None when it is absent, unreadable or of the wrong shape (a
    JSON object holding a ``row`` object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("row"), dict):
        return None
    return data


def read_task(path: Path, phash: str, task: SiteTask) -> dict[str, Any] | None:
    """The row of a finished task computed with these parameters on this input, else None."""
    data = load_task_file(path)
    if data is None or data.get("params_hash") != phash or data.get("input_id") != task.input_id:
        return None
    return dict(data["row"])


def save_task(path: Path, phash: str, task: SiteTask, row: dict[str, Any]) -> None:
    """Write a finished task's row with what it was computed with and on, atomically."""
    record = {"params_hash": phash, "input_id": task.input_id, "row": row}
    write_text_atomic(path, json.dumps(record, allow_nan=True))


def report_changed_inputs(task_dir: Path, phash: str, tasks: Sequence[SiteTask],
                          stage: str) -> str | None:
    """One line naming the tasks to be computed again because their activation file changed
    since their result was written (same parameters, other input), or None."""
    changed: dict[str, int] = {}
    unrecorded = False
    for task in tasks:
        data = load_task_file(task_dir / f"{task.key}.json")
        if data is not None and data.get("params_hash") == phash \
                and data.get("input_id") != task.input_id:
            changed[task.run] = changed.get(task.run, 0) + 1
            unrecorded = unrecorded or "input_id" not in data
    if not changed:
        return None
    what = ", ".join(f"{run} ({n} site{'s' if n > 1 else ''})" for run, n in sorted(changed.items()))
    since = " (or is not recorded)" if unrecorded else ""
    return (f"[{stage}] recomputing {sum(changed.values())} task(s) whose activation file "
            f"changed since they were analysed{since}: {what}")


def run_sites(stage: str, out: Path, phash: str, *,
              plan: Callable[[], tuple[list[T], dict[str, Any]]],
              compute: Callable[[T, int], dict[str, Any] | None],
              write: Callable[[dict[str, Any], list[dict[str, Any]], Path], None],
              threads_per_rank: int | None, check: Callable[[], None] | None = None,
              collective: bool = False) -> Path:
    """Run a per-site stage over the ranks of :func:`replandscape.dist.mpi.world`; every rank
    calls this and gets ``out / "results.json"``.

    Args:
        stage: The stage's name: its lock in ``out``, its progress bar and the ``[stage]`` of its
            messages.
        out: The stage's output folder (``tasks/`` and ``results.json`` in it).
        phash: The hash of the parameters that change the numbers; a task file of other
            parameters is computed again.
        plan: Rank 0, holding the lock: the tasks and the per-run metadata handed to ``write``.
        compute: One task's results row, given the threads this rank may run.
        write: Rank 0, after every task is done: writes the results file from the per-run
            metadata and every task's row (in the planned order) to the path it is given.
        threads_per_rank: The configured threads per rank (None: this rank's share of its CPUs,
            :func:`replandscape.dist.mpi.threads_per_rank`).
        check: Every rank, once rank 0 holds the lock, before planning (e.g. what each rank's
            node must have).
        collective: Every rank takes part in every task, one task after another (``compute`` is
            called on every rank and rank 0's row is kept), instead of each task going to one
            rank.
    """
    comm = mpi.world()
    task_dir = out / "tasks"
    with ExitStack() as held:
        with mpi.abort_on_error(comm, "planning"):
            if comm.rank == 0:
                # one run of the stage per output at a time, held until the results are written
                held.enter_context(stage_lock(out, stage))
            if check is not None:
                check()
            if comm.rank == 0:
                tasks, runs = plan()
                task_dir.mkdir(parents=True, exist_ok=True)
                changed = report_changed_inputs(task_dir, phash, tasks, stage=stage)
                if changed:
                    print(changed, file=sys.stderr, flush=True)
                planned: Any = (tasks, runs)
            else:
                planned = None
            tasks, runs = comm.bcast(planned, root=0)
        threads = mpi.threads_per_rank(comm, threads_per_rank)
        done_here = 0
        progress = make_progress(len(tasks), stage, show=comm.rank == 0, unit="site")
        try:
            mine = range(len(tasks)) if collective else mpi.dynamic_tasks(comm, len(tasks))
            for index in mine:
                task = tasks[index]
                path = task_dir / f"{task.key}.json"
                finished = (comm.rank == 0 or not collective) \
                    and read_task(path, phash, task) is not None
                if collective:
                    finished = comm.bcast(finished, root=0)
                if not finished:
                    with mpi.abort_on_error(comm, f"{task.run} site {task.site}"):
                        row = compute(task, threads)
                    if comm.rank == 0 or not collective:
                        assert row is not None, "compute gave no row where one is kept"
                        save_task(path, phash, task, row)
                        done_here += 1
                progress.update(1)
        finally:
            # the bar leaves its line, so that an error is a line of its own
            progress.close()
        counts = comm.gather(done_here, root=0)
        results_path = out / "results.json"
        if comm.rank == 0:
            rows = []
            with mpi.abort_on_error(comm, "gathering the results"):  # the others wait in Barrier
                for task in tasks:
                    found = read_task(task_dir / f"{task.key}.json", phash, task)
                    if found is None:
                        raise UserError(f"task {task.key} has no result", file=str(task_dir),
                                        fix=f"re-run the {stage} stage")
                    rows.append(found)
                write(runs, rows, results_path)
            print(f"[{stage}] {len(rows)} tasks ({sum(counts)} computed now, over {comm.size} "
                  f"rank(s)) -> {results_path}", file=sys.stderr, flush=True)
        comm.Barrier()
    return results_path
