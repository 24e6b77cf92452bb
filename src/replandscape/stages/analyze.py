"""Analysis: the geometry of every (run, site), spread over MPI ranks, gathered into one file.

Serial (``replandscape run analyze CONFIG``) or under ``mpiexec``/``srun --mpi=pmix``. Each task is
one site of one activation file; ranks take tasks dynamically, read only the site they work on, and
write one small JSON per task (atomically), so a re-run skips finished tasks and an aborted job keeps
what it had. A task file records the analysis parameters and the identity of its input (see
:func:`input_id`): a task whose activation file was replaced since (another extraction into the
same folder) is computed again, and the run says which. Rank 0 holds the folder's ``analyze`` lock
for the whole run, so two analyses never write one output. Rank 0 then gathers the task files into
``analysis/results.json`` with the provenance of each run. The loop is the one the rsa stage runs
too (:func:`replandscape.dist.sites.run_sites`). The per-point arrays of each task
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
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from replandscape import __version__
from replandscape.allocator import retain_freed_memory
from replandscape.atomic import write_npz_atomic
from replandscape.config import AnalysisConfig, ExperimentConfig
from replandscape.dist import mpi
from replandscape.dist.sites import run_sites, task_key
from replandscape.errors import UserError
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
        return task_key(self.run, self.site)


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


def _with_points(out: Path, task: Task, row: dict[str, Any],
                 points: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """The task's row, its per-point arrays written first: a row on disk means both are there."""
    if points is None:
        return row
    rel = f"points/{task.key}.npz"
    write_npz_atomic(out / rel, points)
    return {**row, "points": rel}


def run(cfg: ExperimentConfig) -> Path:
    """Analyse every (run, site) of ``cfg``'s activations; returns the results file path."""
    retain_freed_memory()  # every site allocates the same large arrays again
    comm = mpi.world()
    out = cfg.output_dir / "analysis"
    params = analysis_params(cfg.analysis)
    # every rank on every site, one site after another
    split = bool(cfg.analysis.split_site_rows) and comm.size > 1

    def compute(task: Task, threads: int) -> dict[str, Any] | None:
        if split:
            outcome = run_task_split(task, cfg, threads, comm)
            return None if outcome is None else _with_points(out, task, *outcome)
        return _with_points(out, task, *run_task(task, cfg, threads, cfg.analysis.dendrogram))

    def write(runs: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
        write_results(Results(analysis_params=params, runs=runs, rows=rows,
                              code_version=__version__), path)

    return run_sites("analyze", out, params_hash(params),
                     plan=lambda: plan_tasks(cfg, activation_files(cfg)), compute=compute,
                     write=write, threads_per_rank=cfg.analysis.threads_per_rank,
                     check=lambda: check_device(cfg.analysis), collective=split)
