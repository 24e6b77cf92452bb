"""``replandscape make-data OUT [--task NAME [--n N] [--seed S] [--set KEY=VALUE ...]]``.

Without ``--task``: write the bundled MMLU-shaped demo set (JSON lines per split). With
``--task``: generate an implicit-pattern task's splits (test: N items per variant; dev: the shot
pool; train: fine-tuning items) and its task.json; ``--set`` overrides one of the task's options
(values in YAML, e.g. ``--set z_range=[-5,5]``). Nothing is written when any split cannot be made.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from replandscape.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from replandscape.tasks import DEFAULT_N_DEV, DEFAULT_N_TEST, DEFAULT_N_TRAIN, TASK_NAMES

    parser = sub.add_parser("make-data", help="write the bundled demo data set or a generated "
                                              "task's splits to a folder",
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--test-per-subject", type=int, default=60, help="demo set only")
    parser.add_argument("--validation-per-subject", type=int, default=24, help="demo set only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default=None,
                        help=f"generate this task instead of the demo set ({', '.join(TASK_NAMES)})")
    parser.add_argument("--n", type=int, default=None,
                        help=f"test items per variant (default {DEFAULT_N_TEST})")
    parser.add_argument("--n-dev", type=int, default=None,
                        help=f"shot-pool items per variant (default {DEFAULT_N_DEV})")
    parser.add_argument("--n-train", type=int, default=None,
                        help=f"fine-tuning items per variant (default {DEFAULT_N_TRAIN})")
    parser.add_argument("--variant", action="append", default=None,
                        help="only this variant (repeatable; default: all of the task's)")
    parser.add_argument("--set", dest="options", action="append", default=[],
                        metavar="KEY=VALUE", help="override a task option (repeatable)")
    parser.set_defaults(func=run)


def parse_option_overrides(pairs: list[str]) -> dict[str, object]:
    """``["z_range=[-5,5]", "shuffle_edges=false"]`` -> values parsed as YAML."""
    import yaml

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"'{pair}' is not KEY=VALUE", key="--set",
                            fix="write e.g. --set z_range=[-5,5]")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise UserError(f"the value of '{pair}' is not valid YAML", key="--set",
                            fix="quote strings, write lists as [a,b]") from None
        out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    if args.task is None:
        task_only = [flag for flag, value in (("--n", args.n), ("--n-dev", args.n_dev),
                                              ("--n-train", args.n_train),
                                              ("--variant", args.variant),
                                              ("--set", args.options)) if value]
        if task_only:
            raise UserError(f"{task_only[0]} applies to generated tasks only", key=task_only[0],
                            fix="add --task NAME, or drop the flag for the demo set")
        from replandscape.data import generate_demo_mmlu

        folder = generate_demo_mmlu(Path(args.out), n_test=args.test_per_subject,
                                    n_validation=args.validation_per_subject, seed=args.seed)
        print(f"demo data -> {folder}")
        return 0

    from replandscape.tasks import (
        DEFAULT_N_DEV,
        DEFAULT_N_TEST,
        DEFAULT_N_TRAIN,
        get_task,
        make_task_data,
    )

    spec = get_task(args.task)
    options = spec.options(parse_option_overrides(args.options))
    n = DEFAULT_N_TEST if args.n is None else args.n
    n_dev = DEFAULT_N_DEV if args.n_dev is None else args.n_dev
    n_train = DEFAULT_N_TRAIN if args.n_train is None else args.n_train
    folder = make_task_data(Path(args.out), spec.name, n, args.seed, options, n_dev=n_dev,
                            n_train=n_train, variants=args.variant)
    variants = args.variant or list(spec.variants)
    print(f"task {spec.name} ({', '.join(variants)}): {n} test, {n_dev} dev, {n_train} train "
          f"items per variant -> {folder}")
    return 0
