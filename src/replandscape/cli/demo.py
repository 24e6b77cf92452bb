"""``replandscape demo [--out DIR] [KEY=VALUE ...]``: the whole pipeline on the embedded default.

Offline, on CPU: the bundled MMLU-shaped data, a tiny Llama built on first use, prompts at
0/1/2/5 shots, extraction, a short LoRA fine-tune and the extraction of its checkpoints, the
analysis on 2 MPI ranks, and the figures, all in one output folder. With ``cluster=local-slurm``
every stage runs as a real Slurm job instead (start the cluster with ``slurm/cluster.sh start``).
Re-running resumes: finished outputs are kept and skipped.
"""

from __future__ import annotations

import argparse
import sys
import time

from replandscape.config import config_root, load_config, save_resolved


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the whole pipeline on the bundled demo",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--config", default=None, help="config file (default configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replandscape.pipeline import run_analyze_mpi, run_stage

    config_file = args.config or str(config_root() / "demo.yaml")
    overrides = [f"run.output_dir={args.out}", *args.overrides]
    cfg = load_config(config_file, overrides)
    if cfg.cluster.executor == "slurm":
        from replandscape.launch import submit_experiment

        return submit_experiment(config_file, overrides, wait=True)
    save_resolved(cfg, cfg.output_dir)
    t0 = time.perf_counter()
    timings = {}
    for stage in ("extract", "finetune", "extract-ft", "analyze", "figures"):
        if stage in ("finetune", "extract-ft") and not cfg.finetune.enabled:
            continue
        t = time.perf_counter()
        print(f"== {stage}", file=sys.stderr, flush=True)
        if stage == "analyze" and cfg.analysis.ranks > 1:
            run_analyze_mpi(config_file, overrides, cfg.analysis.ranks)
        else:
            run_stage(stage, cfg)
        timings[stage] = time.perf_counter() - t
    total = time.perf_counter() - t0
    print("\n".join(f"  {k:11s} {v:7.1f} s" for k, v in timings.items()), file=sys.stderr)
    print(f"demo finished in {total:.0f} s: {cfg.output_dir}/figures/report.md")
    return 0
