"""Submitting a plan to Slurm with submitit: one callable per stage, requeued on preemption.

:class:`StageJob` is what runs on the nodes: it loads the config and calls the stage in-process
(ranks come from Slurm: one task per GPU for extraction and fine-tuning, one MPI rank per task for
the analysis). It is ``Checkpointable``: on a timeout or preemption submitit requeues the same call,
and every stage resumes from what it has written (done masks, DeepSpeed checkpoints, task files).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from replandscape.config import config_root, load_config, save_resolved
from replandscape.errors import UserError
from replandscape.sweep import (
    JobSpec,
    Sweep,
    check_outputs_free,
    check_partition,
    output_complete,
    plan_sweep,
    single_experiment,
    slurm_fix,
)

TERMINAL_OK = ("COMPLETED",)
TERMINAL_BAD = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")


class StageJob(submitit.helpers.Checkpointable):
    """Run one stage of one experiment on the allocated nodes."""

    def __call__(self, stage: str, config_file: str, overrides: Sequence[str]) -> str:
        from replandscape.pipeline import run_stage

        try:
            cfg = load_config(config_file, list(overrides))
            run_stage(stage, cfg)
        except UserError as exc:  # the one line that `replandscape status` shows
            print(f"replandscape: error: {exc}", file=sys.stderr, flush=True)
            raise
        return str(cfg.output_dir)


class SweepFiguresJob(submitit.helpers.Checkpointable):
    """Draw the figures of every experiment of a sweep together."""

    def __call__(self, results: Sequence[str], out_dir: str, what: Sequence[str],
                 formats: Sequence[str]) -> list[str]:
        from replandscape.figures import render_all
        from replandscape.results import read_results

        loaded = [read_results(p) for p in results]
        return [str(p) for p in render_all(loaded, Path(out_dir), what=tuple(what),
                                            formats=tuple(formats))]


def _executor(job: JobSpec, folder: Path, dependency: str | None) -> Any:
    c = job.cluster
    ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=3)
    setup = list(c.get("setup") or ())
    setup.append(f"export PYTHONPATH={config_root().parent / 'src'}:${{PYTHONPATH:-}}")
    setup += ["export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}", "export HDF5_USE_FILE_LOCKING=FALSE"]
    params: dict[str, Any] = dict(
        job_name=f"rl-{job.key.replace('/', '-')}", partition=c["partition"],
        time=job.timeout_min, nodes=job.nodes, ntasks_per_node=job.tasks_per_node,
        cpus_per_task=job.cpus_per_task, mem=f"{job.mem_gb}GB", setup=setup,
        array_parallelism=c.get("max_array_parallel", 16), signal_delay_s=120)
    if job.gpus_per_node:
        params["gpus_per_node"] = job.gpus_per_node
    for key in ("account", "qos", "constraint"):
        if c.get(key):
            params[key] = c[key]
    if c.get("exclusive"):
        params["exclusive"] = True
    if dependency:
        params["dependency"] = dependency
    if job.stage in ("analyze", "rsa") and c.get("mpi") in ("pmix", "pmi2"):
        # since Slurm 22.05 srun no longer inherits --cpus-per-task from the allocation: without
        # it a cluster that binds tasks to CPUs gives each analysis rank one CPU
        params["srun_args"] = [f"--mpi={c['mpi']}", f"--cpus-per-task={job.cpus_per_task}"]
    ex.update_parameters(**params)
    return ex


class _SubmitFailed(Exception):
    """sbatch refused a job: the record of what was queued before it, and why."""

    def __init__(self, record: dict[str, Any], key: str, reason: str) -> None:
        super().__init__(reason)
        self.record, self.key, self.reason = record, key, reason


def submit_plan(sweep: Sweep, jobs: Sequence[JobSpec], folder: Path) -> dict[str, Any]:
    """Submit every incomplete job, chained with afterok; returns the record written to disk.

    Raises:
        _SubmitFailed: sbatch refused a job (or is missing); carries the record so far.
    """
    from submitit.core.utils import FailedJobError

    ids: dict[str, list[str]] = {}
    record: dict[str, Any] = {"sweep": sweep.name, "source": sweep.source,
                              "output_root": str(sweep.output_root), "submitted": time.time(),
                              "jobs": []}
    for job in jobs:
        entry = record_entry(job)
        record["jobs"].append(entry)
        if job.done:
            continue
        parents = [i.split("_")[0] for d in job.depends_on for i in ids.get(d, [])]
        dependency = f"afterok:{':'.join(dict.fromkeys(parents))}" if parents else None
        ex = _executor(job, folder, dependency)
        try:
            handles = _submit_job(ex, job, jobs, sweep)
        except (FailedJobError, OSError) as exc:
            said = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise _SubmitFailed(record, job.key, said[-1] if said else type(exc).__name__) \
                from None
        entry["job_ids"] = [h.job_id for h in handles]
        entry["task_outputs"] = list(job.array_outputs) if job.array else list(job.outputs[:1])
        entry["logs"] = [str(h.paths.stderr) for h in handles]
        ids[job.key] = entry["job_ids"]
    return record


def _submit_job(ex: Any, job: JobSpec, jobs: Sequence[JobSpec], sweep: Sweep) -> list[Any]:
    """Queue one job (each task of an array) through its executor; the submitit handles."""
    if job.stage == "figures":
        results = [str(Path(j.outputs[0])) for j in jobs if j.stage == "analyze"]
        cfg = sweep.experiments[0].cfg
        return [ex.submit(SweepFiguresJob(), results, job.outputs[0],
                          list(cfg.figures.what), list(cfg.figures.formats))]
    if job.array:
        with ex.batch():
            handles = [ex.submit(StageJob(), job.stage, job.config_file,
                                 [*job.overrides, *extra]) for extra in job.array]
        return handles
    return [ex.submit(StageJob(), job.stage, job.config_file, list(job.overrides))]


def record_entry(job: JobSpec) -> dict[str, Any]:
    """A job's entry in the sweep record, before submission (no job ids yet). It keeps the
    config file and overrides so ``status`` can check each output against its config."""
    return {"key": job.key, "stage": job.stage, "outputs": list(job.outputs),
            "done_before": job.done, "job_ids": [], "labels": list(job.array_labels),
            "config_file": job.config_file, "overrides": list(job.overrides)}


def sweep_record_path(output_root: Path, name: str) -> Path:
    return output_root / f"sweep-{name}.json"


def submit(sweep: Sweep, *, dry_run: bool = False, wait: bool = False,
           wait_timeout_s: float = 24 * 3600) -> int:
    """Validate, plan and (unless dry) submit a sweep; optionally wait for it to end."""
    jobs = plan_sweep(sweep)
    cluster = sweep.experiments[0].cfg.cluster
    where = sweep.experiments[0].config_file
    if dry_run:
        print(f"sweep {sweep.name}: {len(jobs)} job(s) on '{cluster.name}' "
              f"(partition {cluster.partition})")
        for job in jobs:
            print("  " + job.describe())
        return 0
    if cluster.executor != "slurm":
        raise UserError(f"cluster profile '{cluster.name}' does not submit to Slurm",
                        file=where, key="cluster.executor",
                        fix="add cluster=local-slurm (or your site's profile) to the command")
    assert cluster.partition is not None
    check_partition(cluster.partition, where, cluster.name)
    check_outputs_free(sweep)
    check_not_running(sweep)
    from replandscape.data import check_config_against_data

    for exp in sweep.experiments:  # shots per subject, maxk against the points: before queueing
        check_config_against_data(exp.cfg)
    sweep.output_root.mkdir(parents=True, exist_ok=True)
    folder = sweep.output_root / "slurm-logs"
    for exp in sweep.experiments:  # the experiment's own config, not an array task's
        save_resolved(exp.cfg, exp.cfg.output_dir)
    path = sweep_record_path(sweep.output_root, sweep.name)
    try:
        record = submit_plan(sweep, jobs, folder)
    except _SubmitFailed as failed:
        # what was queued is recorded, so that status and a re-submission see it
        path.write_text(json.dumps(failed.record, indent=1))
        queued = sum(len(j["job_ids"]) for j in failed.record["jobs"])
        raise UserError(f"sbatch refused job {failed.key} ({failed.reason}); {queued} job(s) "
                        "were queued before it", file=where, key="cluster",
                        fix=slurm_fix(cluster.name)) from None
    path.write_text(json.dumps(record, indent=1))
    queued = sum(len(j["job_ids"]) for j in record["jobs"])
    print(f"submitted {queued} job(s) of sweep {sweep.name}; status: replandscape status "
          f"{sweep.output_root}")
    if not wait:
        return 0
    return wait_for(record, wait_timeout_s)


def check_not_running(sweep: Sweep) -> None:
    """Refuse a second submission while jobs of a sweep on the same outputs are still queued or
    running: both would write the same files."""
    roots = {sweep.output_root, *(e.cfg.output_dir for e in sweep.experiments)}
    for root in roots:
        for path in sorted(root.glob("sweep-*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            ids = [i for j in record.get("jobs", []) for i in j.get("job_ids", [])]
            live = queued_jobs(ids)
            if live:
                raise UserError(f"sweep '{record.get('sweep')}' still has {len(live)} job(s) "
                                f"queued or running on these outputs (e.g. {live[0]})",
                                file=str(path), key="output_root",
                                fix=f"wait (replandscape status {root}) or scancel them")


def queued_jobs(ids: Sequence[str]) -> list[str]:
    """The ids still in the queue (pending, running, completing), from squeue: it knows a job
    the moment it is submitted, before accounting does."""
    import subprocess

    if not ids:
        return []
    masters = sorted({i.split("_")[0] for i in ids})
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(masters)],
                         capture_output=True, text=True, timeout=60)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def job_states(ids: Sequence[str]) -> dict[str, str]:
    """State of each job id from sacct (array tasks as 123_4)."""
    import subprocess

    if not ids:
        return {}
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j",
                          ",".join(dict.fromkeys(i.split("_")[0] for i in ids))],
                         capture_output=True, text=True, timeout=60)
    states: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            states[jid.strip()] = state.strip().split(" ")[0]
    return {i: states.get(i, "PENDING" if i.split("_")[0] in states else "UNKNOWN") for i in ids}


def wait_for(record: dict[str, Any], timeout_s: float, poll_s: float = 3.0) -> int:
    """Wait until every job ends; a failure cancels what depends on it. 0 when all completed."""
    import subprocess

    ids = [i for j in record["jobs"] for i in j["job_ids"]]
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        states = job_states(ids)
        summary = ", ".join(f"{j['key']}={'/'.join(states[i] for i in j['job_ids'])}"
                            for j in record["jobs"] if j["job_ids"])
        if summary != last:
            print(f"[submit] {summary}", file=sys.stderr, flush=True)
            last = summary
        bad = [i for i, s in states.items() if s in TERMINAL_BAD]
        if bad:
            rest = [i for i, s in states.items() if s not in TERMINAL_OK + TERMINAL_BAD]
            if rest:
                subprocess.run(["scancel", *dict.fromkeys(i.split("_")[0] for i in rest)],
                               timeout=60)
            for job in record["jobs"]:
                for jid, log in zip(job["job_ids"], job.get("logs", [])):
                    if jid in bad:
                        print(f"[submit] {job['key']} ({jid}) {states[jid]}: "
                              f"{last_error_line(Path(log))}", file=sys.stderr)
            return 1
        if all(s in TERMINAL_OK for s in states.values()):
            missing = missing_outputs(record)
            for key, jid, path in missing:
                print(f"[submit] {key} ({jid}) COMPLETED but left no {path}: see its log",
                      file=sys.stderr)
            return 1 if missing else 0
        if time.monotonic() > deadline:
            print("[submit] timed out waiting for the jobs", file=sys.stderr)
            return 1
        time.sleep(poll_s)


def missing_outputs(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(job, id, path) of every finished task whose output is absent or incomplete: Slurm can
    report a job as completed when its step never launched."""
    out = []
    for job in record["jobs"]:
        cfg = job_config(job)
        for jid, path in zip(job["job_ids"], job.get("task_outputs", [])):
            if not output_complete(job.get("stage", ""), path, cfg):
                out.append((job["key"], jid, path))
    return out


def job_config(entry: dict[str, Any]) -> Any:
    """The config a recorded job ran with (an ``ExperimentConfig``), or None when the record
    predates it or the config no longer loads (moved, edited into an error): the outputs are
    then checked without it."""
    file = entry.get("config_file")
    if not file or entry.get("stage") == "figures":
        return None
    try:
        return load_config(file, list(entry.get("overrides", [])))
    except (UserError, OSError):
        return None


def last_error_line(log: Path) -> str:
    """The line of a job's stderr that says what went wrong."""
    if not log.is_file():
        return f"(no log at {log})"
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("replandscape: error:"):
            return ln
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]:
            return ln
    return lines[-1] if lines else "(empty log)"


def submit_experiment(config_file: str, overrides: Sequence[str], *, wait: bool = True,
                      studies: Sequence[str] = ()) -> int:
    """Run one experiment's stages, and those of ``studies`` (patch, knockout, rsa), as Slurm
    jobs (the demo with cluster=local-slurm)."""
    return submit(single_experiment(config_file, overrides, studies=studies), wait=wait)
