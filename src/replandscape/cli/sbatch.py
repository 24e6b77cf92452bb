"""``replandscape sbatch STAGE CONFIG [KEY=VALUE ...]``: print a plain sbatch script.

For users who do not use submitit: the script of STAGE (extract, finetune, analyze) for one
experiment, with resources from the same cluster profile and plan as ``replandscape submit``.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("sbatch", help="print the sbatch script of a stage", description=__doc__)
    parser.add_argument("stage", choices=("extract", "finetune", "analyze"))
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replandscape.sbatch import render

    print(render(args.stage, args.config, args.overrides), end="")
    return 0
