"""Analysis: the geometry of every (run, site), spread over MPI ranks, gathered into one file.

Serial (``replandscape run analyze CONFIG``) or under ``mpiexec``/``srun --mpi=pmix``. Each task is
one site of one activation file; ranks take tasks dynamically, read only the site they work on, and
write one small JSON per task (atomically), so a re-run skips finished tasks and an aborted job keeps
what it had. A task file records the analysis parameters and the identity of its input (see
:func:`input_id`): a task whose activation file was replaced since (another extraction into the
same folder) is computed again, and the run says which. Rank 0 holds the folder's ``analyze`` lock
for the whole run, so two analyses never write one output. Rank 0 then gathers the task files into
``analysis/results.json`` with the provenance of each run. The per-point arrays of each task
(question id, ADP cluster without and with halo, kNN log-density) go to
``analysis/points/TASK.npz``, named by the row's ``points`` entry. The relative depth of a site is
:func:`replandscape.results.relative_depth`, the same for every site kind. The metrics themselves
are pure functions (:mod:`replandscape.metrics.geometry`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from replandscape import __version__
from replandscape.allocator import retain_freed_memory
from replandscape.atomic import write_npz_atomic, write_text_atomic
from replandscape.config import AnalysisConfig, ExperimentConfig
from replandscape.dist import mpi
from replandscape.errors import UserError
from replandscape.lock import stage_lock
from replandscape.progress import progress as make_progress
from replandscape.results import (
    Results,
    n_blocks_from_sites,
    params_hash,
    site_depths,
    write_results,
)

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


@dataclass(frozen=True)
class Task:
    run: str
    condition: str
    path: str
    site: str
    site_index: int
    n_sites: int
    relative_depth: float
    input_id: str

    @property
    def key(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.run}__{self.site}")


def analysis_params(cfg: AnalysisConfig) -> dict[str, Any]:
    """What changes the numbers (not how many ranks or threads computed them)."""
    d = dataclasses.asdict(cfg)
    for key in ("threads_per_rank", "ranks", "sites", "engine", "device", "split_site_rows"):
        d.pop(key, None)
    return d


def geometry_params(cfg: AnalysisConfig, compute_dendrogram: bool, threads: int | None) -> Any:
    from replandscape.metrics.geometry import GeometryParams

    return GeometryParams(maxk=cfg.maxk, range_max=cfg.range_max,
                          id_scale_index=cfg.id_scale_index, density_k=cfg.density_k, Z=cfg.z,
                          overlap_fraction=cfg.overlap_fraction,
                          dendrogram_min_size=cfg.dendrogram_min_size,
                          dendrogram_label_fraction=cfg.dendrogram_label_fraction,
                          engine=cfg.engine, device=cfg.device, threads=threads,
                          compute_dendrogram=compute_dendrogram)


def activation_files(cfg: ExperimentConfig) -> list[Path]:
    folder = cfg.output_dir / "activations"
    files = sorted(p for p in folder.glob("*.h5") if not p.name.endswith(".mpio.h5"))
    if not files:
        raise UserError("no activation files", file=str(folder),
                        fix="run the extract stage first (replandscape run extract CONFIG)")
    return files


def input_id(path: Path, attrs: Mapping[str, Any]) -> str:
    """Identity of one activation file's content, for telling a replaced file from the one a task
    was computed on.

    The extraction's ``stage_hash`` (what produced the rows) with the per-dataset checksums
    (``digests``, JSON) when the file carries them; without them, the file's size, modification
    time (ns) and ``created`` stamp stand in for its content (a copy that does not keep the
    modification time is then analysed again, never wrongly kept).
    """
    key: dict[str, Any] = {"stage_hash": str(attrs.get("stage_hash", ""))}
    digests = attrs.get("digests")
    parsed = None
    if digests:
        try:
            parsed = json.loads(digests)
        except (TypeError, ValueError):
            parsed = None
    if isinstance(parsed, dict) and parsed:
        key["digests"] = parsed
    else:
        st = Path(path).stat()
        key.update(size=st.st_size, mtime_ns=st.st_mtime_ns, created=str(attrs.get("created", "")))
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def n_blocks_of(attrs: Mapping[str, Any]) -> int | None:
    """The number of decoder blocks recorded in the file's config (``model.n_layers``)."""
    import yaml

    try:
        cfg = yaml.safe_load(str(attrs.get("config", "")))
        value = cfg["model"]["n_layers"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def balanced_subsample(question_ids: np.ndarray, subjects: np.ndarray, cap: int | None,
                       seed: int) -> np.ndarray:
    """Row mask keeping at most ``cap`` questions per subject, chosen from (seed, subject)."""
    keep = np.zeros(len(question_ids), dtype=bool)
    for subject in sorted(set(subjects.tolist())):
        rows = np.flatnonzero(subjects == subject)
        if cap is not None and len(rows) > cap:
            order = sorted(rows.tolist(), key=lambda r: int(question_ids[r]))
            rows = np.asarray(sorted(random.Random(f"{seed}:{subject}").sample(order, cap)))
        keep[rows] = True
    return keep


def plan_tasks(cfg: ExperimentConfig, files: Sequence[Path]) -> tuple[list[Task], dict[str, Any]]:
    """Tasks for every file and site, plus per-run metadata (accuracy, provenance)."""
    from replandscape.storage import open_activations

    tasks: list[Task] = []
    runs: dict[str, Any] = {}
    for path in files:
        with open_activations(path) as af:
            attrs = af.attrs
            names = af.site_names
            condition = str(attrs["condition"])
            task_name = str(attrs.get("task", "mmlu"))
            # a run is identified by (model, task, condition), so tasks of one model never meet
            run = f"{attrs['model_name']}/{task_name}/{condition}"
            step = int(attrs.get("checkpoint_step", -1))
            seen = int(attrs.get("examples_seen", -1))
            identity = input_id(path, attrs)
            # per-block sites name their block; the config's count serves files with none
            depths = site_depths(names, n_blocks_from_sites(names) or n_blocks_of(attrs))
            accuracy = af.accuracy
            if "accuracy_substring" in attrs:
                accuracy["substring"] = json.loads(attrs["accuracy_substring"])
                accuracy["scoring"] = str(attrs.get("scoring", "strict"))
            reference = float(attrs.get("finetune_test_accuracy", -1.0))
            runs[run] = {
                "model": str(attrs["model_name"]), "task": task_name, "condition": condition,
                "shots": int(attrs["shots"]), "finetuned": bool(attrs.get("finetuned", False)),
                "method": str(attrs.get("method", "lora" if attrs.get("finetuned") else "")),
                "checkpoint_step": None if step < 0 else step,
                # the fine-tuning stage's last checkpoint (older files: named ft-final)
                "final": bool(attrs.get("final_checkpoint", condition == "ft-final")),
                "examples_seen": None if seen < 0 else seen, "n_sites": len(names),
                "site_names": names, "label_columns": label_columns_of(attrs),
                "accuracy": accuracy,
                "provenance": {"activations": str(path), "config_hash": attrs.get("config_hash"),
                               "model_path": attrs.get("model_path"),
                               "model_revision": attrs.get("model_revision"),
                               "checkpoint": attrs.get("checkpoint"),
                               "code_version": attrs.get("code_version"),
                               "n_rows": int(attrs["n_rows"]), "input_id": identity,
                               "finetune_test_accuracy": reference if reference >= 0 else None},
            }
            qids = af.rows("question_id")
            keep = balanced_subsample(qids, af.rows("subject"), cfg.analysis.per_subject_cap,
                                      cfg.run.seed)
            runs[run]["subsample"] = {"n": int(keep.sum()),
                                      "question_ids": [int(q) for q in qids[keep]]}
        wanted = cfg.analysis.sites
        for i, name in enumerate(names):
            if wanted is not None and i not in wanted and (i - len(names)) not in wanted:
                continue
            if "@" in name:
                # span states (SITE@SPAN.POOL) are for the rsa stage, which keeps the items that
                # have the span; the geometry is that of the kept token
                continue
            tasks.append(Task(run, condition, str(path), name, i, len(names), depths[i],
                              identity))
    if cfg.analysis.sites is not None:
        bad = [s for s in cfg.analysis.sites if not -len(names) <= s < len(names)]
        if bad:
            raise UserError(f"site index {bad[0]} does not exist (the files hold {len(names)} "
                            "sites)", key="analysis.sites",
                            fix=f"use indices 0..{len(names) - 1} (or negative from the end)")
    return tasks, runs


def label_columns_of(attrs: Mapping[str, Any]) -> list[str]:
    """The row columns a file's clusters are compared with (its task's labels; MMLU's subject
    and answer for files that do not name them)."""
    raw = attrs.get("label_columns")
    return list(json.loads(raw)) if isinstance(raw, str) and raw else ["subject", "answer"]


def load_site(task: Task, cfg: ExperimentConfig) -> tuple[np.ndarray, dict[str, np.ndarray],
                                                          dict[str, list[str]], np.ndarray]:
    """The subsampled [n, D] array of one site, its label codes per label column, the names of
    the codes per column, and the question id of each row."""
    from replandscape.storage import open_activations

    with open_activations(task.path) as af:
        groups = af.rows("subject")
        qids = af.rows("question_id")
        keep = balanced_subsample(qids, groups, cfg.analysis.per_subject_cap, cfg.run.seed)
        rows = np.flatnonzero(keep)
        x = af.site(task.site, rows)
        columns = {name: af.rows(name)[rows] for name in label_columns_of(af.attrs)}
    labels: dict[str, np.ndarray] = {}
    names: dict[str, list[str]] = {}
    for column, values in columns.items():
        if values.dtype.kind in "iub":
            labels[column] = values.astype(np.int64)
            continue
        text = [str(v) for v in values.tolist()]
        names[column] = sorted(set(text))
        index = {n: i for i, n in enumerate(names[column])}
        labels[column] = np.asarray([index[t] for t in text], dtype=np.int64)
    return x, labels, names, qids[rows]


def all_identical(x: np.ndarray) -> bool:
    # e.g. the input of the first block: the kept token is always the same ':' embedding
    return bool(len(x)) and bool((x == x[0]).all())


def run_task(task: Task, cfg: ExperimentConfig, threads: int, dendrogram: bool,
             neighbours: Any = None) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Load one site, subsample, compute the geometry; returns the results row and the
    per-point arrays (None for a site with nothing to measure)."""
    from threadpoolctl import threadpool_limits

    from replandscape.metrics.geometry import compute_geometry

    t0 = time.perf_counter()
    x, labels, names, qids = load_site(task, cfg)
    if all_identical(x):
        return _degenerate_row(task, len(x), "all rows identical", time.perf_counter() - t0), None
    params = geometry_params(cfg.analysis, dendrogram, threads)
    with threadpool_limits(limits=threads), warnings.catch_warnings():
        # labels with classes of one or two points (a generated task's targets) make DADApy's
        # overlap say so once per class; the overlap of such classes is what it is
        warnings.filterwarnings("ignore", message=".*max_k < 1 for label.*")
        result = compute_geometry(x, labels, params, label_names=names,
                                  neighbours=neighbours)
    row = result.to_json_dict()
    row.update(run=task.run, site=task.site, site_index=task.site_index,
               relative_depth=task.relative_depth, n_subsampled=int(len(x)),
               seconds_total=time.perf_counter() - t0)
    points = result.point_arrays()
    points["question_id"] = np.asarray(qids, dtype=np.int64)[points.pop("kept_rows")]
    return row, points


def run_task_split(task: Task, cfg: ExperimentConfig, threads: int, comm: Any) -> Any:
    """One site with its neighbour search split over every rank by row blocks. Every rank calls
    this; rank 0 runs the estimators and returns what :func:`run_task` returns, the others
    return None."""
    from threadpoolctl import threadpool_limits

    from replandscape.metrics.neighbors import deduplicate

    if comm.rank == 0:
        def search(xu: np.ndarray, k: int) -> Any:
            comm.bcast(k, root=0)
            return mpi.distributed_knn(comm, xu, k, threads, cfg.analysis.device)

        return run_task(task, cfg, threads, cfg.analysis.dendrogram, neighbours=search)
    x = load_site(task, cfg)[0]
    if all_identical(x):
        return None
    xu = deduplicate(np.asarray(x, dtype=np.float64))[0]  # the same rows rank 0 searches
    k = comm.bcast(None, root=0)
    with threadpool_limits(limits=threads):
        mpi.distributed_knn(comm, xu, k, threads, cfg.analysis.device)
    return None


def _degenerate_row(task: Task, n: int, reason: str, seconds: float) -> dict[str, Any]:
    """A site with nothing to measure: recorded, with its reason, and drawn as a gap."""
    return {"run": task.run, "site": task.site, "site_index": task.site_index,
            "relative_depth": task.relative_depth, "n_points": 1,
            "n_subsampled": n, "n_duplicates": n - 1, "id_twonn": None, "id_gride": [],
            "id": None, "n_peaks": None, "core_fraction": None, "peaks": None, "ari": {},
            "overlap": {},
            "dendrogram": None, "skipped": reason, "seconds_total": seconds}


def _atomic_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, allow_nan=True))


def _save_task(out: Path, task: Task, phash: str, row: dict[str, Any],
               points: dict[str, np.ndarray] | None) -> None:
    """The per-point arrays first, then the task's row: a row on disk means both are there."""
    if points is not None:
        rel = f"points/{task.key}.npz"
        write_npz_atomic(out / rel, points)
        row = {**row, "points": rel}
    _atomic_json(out / "tasks" / f"{task.key}.json",
                 {"params_hash": phash, "input_id": task.input_id, "row": row})


def _load_task_file(path: Path) -> dict[str, Any] | None:
    """A task file's content, or None when it is absent, unreadable or of the wrong shape (a
    JSON object holding a ``row`` object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("row"), dict):
        return None
    return data


def _read_task(path: Path, phash: str, task: Task) -> dict[str, Any] | None:
    """The row of a finished task computed with these parameters on this input, else None."""
    data = _load_task_file(path)
    if data is None or data.get("params_hash") != phash or data.get("input_id") != task.input_id:
        return None
    return dict(data["row"])


class InputTask(Protocol):
    """What :func:`report_changed_inputs` reads of a per-site task (the geometry's or the rsa
    stage's)."""

    @property
    def key(self) -> str: ...

    @property
    def run(self) -> str: ...

    @property
    def input_id(self) -> str: ...


def report_changed_inputs(task_dir: Path, phash: str, tasks: Sequence[InputTask],
                          stage: str = "analyze") -> str | None:
    """One line naming the tasks to be computed again because their activation file changed
    since their result was written (same parameters, other input), or None."""
    changed: dict[str, int] = {}
    unrecorded = False
    for task in tasks:
        data = _load_task_file(task_dir / f"{task.key}.json")
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


def check_device(cfg: AnalysisConfig) -> None:
    """``device: cuda`` needs a GPU this process can see (``auto`` falls back to the CPU)."""
    if cfg.device != "cuda" or cfg.engine != "fast":
        return
    try:
        import torch

        seen = bool(torch.cuda.is_available())
    except ImportError:
        seen = False
    if not seen:
        raise UserError("analysis.device is cuda but this job sees no CUDA GPU",
                        key="analysis.device",
                        fix="set analysis.device=auto (or cpu), or give the analysis job a GPU")


def run(cfg: ExperimentConfig) -> Path:
    """Analyse every (run, site) of ``cfg``'s activations; returns the results file path."""
    retain_freed_memory()  # every site allocates the same large arrays again
    comm = mpi.world()
    out = cfg.output_dir / "analysis"
    task_dir = out / "tasks"
    params = analysis_params(cfg.analysis)
    phash = params_hash(params)
    with ExitStack() as held:
        with mpi.abort_on_error(comm, "planning"):
            if comm.rank == 0:
                # one analysis per output at a time, held until the results file is written
                held.enter_context(stage_lock(out, "analyze"))
            check_device(cfg.analysis)
            if comm.rank == 0:
                task_dir.mkdir(parents=True, exist_ok=True)
                tasks, runs = plan_tasks(cfg, activation_files(cfg))
                changed = report_changed_inputs(task_dir, phash, tasks)
                if changed:
                    print(changed, file=sys.stderr, flush=True)
                plan = (tasks, runs)
            else:
                plan = None
            tasks, runs = comm.bcast(plan, root=0)
        return _run_planned(cfg, comm, tasks, runs, params, phash)


def _run_planned(cfg: ExperimentConfig, comm: Any, tasks: list[Task], runs: dict[str, Any],
                 params: dict[str, Any], phash: str) -> Path:
    """Compute the unfinished tasks over the ranks, then gather every row on rank 0."""
    out = cfg.output_dir / "analysis"
    task_dir = out / "tasks"
    threads = mpi.threads_per_rank(comm, cfg.analysis.threads_per_rank)
    done_here = 0
    progress = make_progress(len(tasks), "analyze", show=comm.rank == 0, unit="site")
    if cfg.analysis.split_site_rows and comm.size > 1:
        # every rank on every site, one site after another
        for task in tasks:
            path = task_dir / f"{task.key}.json"
            finished = comm.bcast(_read_task(path, phash, task) is not None
                                  if comm.rank == 0 else None, root=0)
            if not finished:
                with mpi.abort_on_error(comm, f"{task.run} site {task.site}"):
                    outcome = run_task_split(task, cfg, threads, comm)
                if comm.rank == 0:
                    _save_task(out, task, phash, *outcome)
                    done_here += 1
            progress.update(1)
    else:
        for index in mpi.dynamic_tasks(comm, len(tasks)):
            task = tasks[index]
            path = task_dir / f"{task.key}.json"
            if _read_task(path, phash, task) is not None:
                progress.update(1)
                continue
            with mpi.abort_on_error(comm, f"{task.run} site {task.site}"):
                outcome = run_task(task, cfg, threads, cfg.analysis.dendrogram)
            _save_task(out, task, phash, *outcome)
            done_here += 1
            progress.update(1)
    progress.close()
    counts = comm.gather(done_here, root=0)
    results_path = out / "results.json"
    if comm.rank == 0:
        rows = []
        with mpi.abort_on_error(comm, "gathering the results"):  # the others wait in Barrier
            for task in tasks:
                found = _read_task(task_dir / f"{task.key}.json", phash, task)
                if found is None:
                    raise UserError(f"task {task.key} has no result", file=str(task_dir),
                                    fix="re-run the analysis")
                rows.append(found)
            results = Results(analysis_params=params, runs=runs, rows=rows,
                              code_version=__version__)
            write_results(results, results_path)
        print(f"[analyze] {len(rows)} tasks ({sum(counts)} computed now, over {comm.size} "
              f"rank(s)) -> {results_path}", file=sys.stderr, flush=True)
    comm.Barrier()
    return results_path
