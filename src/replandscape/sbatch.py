"""Plain sbatch scripts for users who do not use submitit, rendered from the same configs.

The templates live in ``slurm/templates/``; resources come from the same plan as ``submit``.
"""

from __future__ import annotations

import shlex
import string
from collections.abc import Sequence
from pathlib import Path

from replandscape.config import config_root
from replandscape.errors import UserError
from replandscape.sweep import plan_sweep, single_experiment

TEMPLATES = ("extract", "finetune", "analyze")


def template_dir() -> Path:
    return config_root().parent / "slurm" / "templates"


def render(stage: str, config_file: str, overrides: Sequence[str]) -> str:
    """The sbatch script of ``stage`` for one experiment."""
    if stage not in TEMPLATES:
        raise UserError(f"no sbatch template for '{stage}'", key="STAGE",
                        fix=f"use one of {', '.join(TEMPLATES)}")
    sweep = single_experiment(config_file, overrides)
    cfg = sweep.experiments[0].cfg
    if cfg.cluster.executor != "slurm" or not cfg.cluster.partition:
        raise UserError("the cluster profile is not a Slurm one", file=config_file,
                        key="cluster.executor", fix="add cluster=<your profile> to the command")
    jobs = {j.stage: j for j in plan_sweep(sweep)}
    job = jobs[stage]
    c = cfg.cluster
    hours, minutes = divmod(job.timeout_min, 60)
    values = {
        "run_name": cfg.run.name, "model_name": cfg.model.name, "config_file": config_file,
        "overrides": " ".join(shlex.quote(o) for o in overrides),
        "partition": c.partition, "nodes": job.nodes, "tasks_per_node": job.tasks_per_node,
        "cpus_per_task": job.cpus_per_task, "mem_gb": job.mem_gb,
        "time": f"{hours:02d}:{minutes:02d}:00", "ranks": cfg.analysis.ranks, "mpi": c.mpi,
        "account_line": f"#SBATCH --account={c.account}\n" if c.account else "",
        "qos_line": f"#SBATCH --qos={c.qos}\n" if c.qos else "",
        "gpu_line": f"#SBATCH --gpus-per-node={job.gpus_per_node}\n" if job.gpus_per_node else "",
        "setup": "\n".join(c.setup), "log_dir": str(cfg.output_dir / "slurm-logs"),
        "shots": " ".join(str(k) for k in cfg.prompts.shots),
        "array": f"0-{len(cfg.prompts.shots) - 1}",
    }
    text = (template_dir() / f"{stage}.sbatch.in").read_text()
    return string.Template(text).substitute(values)
