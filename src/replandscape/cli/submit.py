"""``replandscape submit SWEEP.yaml|CONFIG.yaml [KEY=VALUE ...] [--dry-run] [--wait]``.

Expands a sweep (models x shots x fine-tuned checkpoints) into Slurm jobs through submitit:
extraction as job arrays sized from the model (one task per GPU), fine-tuning, the MPI analysis
and the figures, chained with afterok dependencies. Everything is validated before anything is
queued; outputs that are complete are skipped. ``--dry-run`` prints the jobs without submitting.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from replandscape.config import read_yaml


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("submit", help="submit a sweep or one experiment to Slurm",
                            description=__doc__)
    parser.add_argument("file", help="sweep file (configs/sweeps/) or experiment config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="e.g. cluster=example-gpu analysis.ranks=8")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait until every job has ended")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replandscape.sweep import load_sweep, single_experiment

    if "sweep" in read_yaml(Path(args.file)):
        sweep = load_sweep(args.file, args.overrides)
    else:
        sweep = single_experiment(args.file, args.overrides)
    if args.dry_run:
        from replandscape.sweep import check_outputs_free, plan_sweep

        check_outputs_free(sweep)  # what would be refused is not shown as complete
        jobs = plan_sweep(sweep)
        cluster = sweep.experiments[0].cfg.cluster
        print(f"sweep {sweep.name}: {len(jobs)} job(s) on '{cluster.name}' "
              f"(partition {cluster.partition}) -> {sweep.output_root}")
        for job in jobs:
            print("  " + job.describe())
        return 0
    from replandscape.launch import submit

    return submit(sweep, wait=args.wait)
