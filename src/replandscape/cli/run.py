"""``replandscape run STAGE CONFIG [KEY=VALUE ...]``: one stage in this process (no Slurm).

Under ``mpiexec``/``srun`` the analysis stage spreads its work over the ranks; extraction and
fine-tuning take their ranks from the launcher's environment (RANK/WORLD_SIZE or Slurm's).
"""

from __future__ import annotations

import argparse

from replandscape.cli.common import add_config_args, load_from_args
from replandscape.config import save_resolved
from replandscape.dist import torchdist
from replandscape.pipeline import EXTRA_STAGES, STAGE_HELP, STAGES, run_stage


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("run", help="run one stage in-process",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="stages:\n" + "\n".join(f"  {k:11s} {v}" for k, v in STAGE_HELP.items()))
    parser.add_argument("stage", choices=STAGES + EXTRA_STAGES + ("all",), metavar="STAGE",
                        help=f"one of {', '.join(STAGES + EXTRA_STAGES)}, or all")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_from_args(args)
    if torchdist.rank_info().is_main:
        save_resolved(cfg, cfg.output_dir)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage == "extract-ft" and not cfg.finetune.enabled:
            continue
        run_stage(stage, cfg)
    return 0
