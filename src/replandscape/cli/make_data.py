"""``replandscape make-data OUT``: write the bundled MMLU-shaped demo set (JSON lines per split)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("make-data", help="write the bundled demo data set to a folder",
                            description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--test-per-subject", type=int, default=60)
    parser.add_argument("--validation-per-subject", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replandscape.data import generate_demo_mmlu

    folder = generate_demo_mmlu(Path(args.out), n_test=args.test_per_subject,
                                n_validation=args.validation_per_subject, seed=args.seed)
    print(f"demo data -> {folder}")
    return 0
