"""Submit one stage of one experiment to Slurm (submitit), without its neighbours.

    python jobs/submit_stage.py STAGE CONFIG [KEY=VALUE ...] [--wait]
"""

from __future__ import annotations

import argparse
import sys

from replandscape.errors import UserError
from replandscape.pipeline import STAGES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--wait", action="store_true")
    args = parser.parse_args(argv)
    try:
        from replandscape.launch import submit_plan, wait_for
        from replandscape.sweep import plan_sweep, single_experiment

        sweep = single_experiment(args.config, args.overrides)
        chosen = [j for j in plan_sweep(sweep) if j.stage == args.stage]
        for job in chosen:  # alone: no dependencies, run even if outputs exist (stages resume)
            job.depends_on = ()
            job.done = False
        record = submit_plan(sweep, chosen, sweep.output_root / "slurm-logs")
        print(" ".join(i for j in record["jobs"] for i in j["job_ids"]))
        return wait_for(record, 24 * 3600) if args.wait else 0
    except UserError as exc:
        print(f"replandscape: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
