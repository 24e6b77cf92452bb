"""``replandscape validate FILE... [-o KEY=VALUE]``: check configs (or sweeps) without running.

Each file is composed (group defaults, the file, overrides), type-checked and value-checked; the
first problem of each file is printed as one line naming the file, the key and the fix.
"""

from __future__ import annotations

import argparse
import sys

from replandscape.config import load_config, read_yaml
from replandscape.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("validate", help="check config files without running anything",
                            description=__doc__)
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every file (repeatable)")
    parser.add_argument("--print", dest="show", action="store_true",
                        help="print the resolved config of each valid file")
    parser.set_defaults(func=run)


def validate_file(path: str, overrides: list[str]) -> str:
    """Returns a one-line summary; raises UserError on the first problem."""
    from pathlib import Path

    data = read_yaml(Path(path))
    if "sweep" in data:
        from replandscape.data import check_config_against_data
        from replandscape.sweep import load_sweep

        sweep = load_sweep(path, overrides)
        for exp in sweep.experiments:
            check_config_against_data(exp.cfg)
        return f"sweep {sweep.name}: {len(sweep.experiments)} experiment(s)"
    group = Path(path).parent.name
    if group in ("cluster", "model"):
        from replandscape.config import ClusterConfig, ModelConfig, build_dataclass

        cls = ClusterConfig if group == "cluster" else ModelConfig
        build_dataclass(cls, data, group, path)
        return f"{group} profile"
    cfg = load_config(path, overrides)
    from replandscape.data import check_config_against_data
    from replandscape.sweep import check_model_fits

    check_model_fits(cfg, path)

    n_points = check_config_against_data(cfg)
    points = f", {n_points} points per site" if n_points >= 0 else ""
    return f"config {cfg.run.name} (sha256 {cfg.hash[:12]}{points})"


def run(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            summary = validate_file(path, args.override)
        except UserError as exc:
            print(f"replandscape: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"ok  {path}: {summary}")
        if args.show and not summary.startswith(("sweep", "cluster", "model")):
            print(load_config(path, args.override).to_yaml())
    return 1 if failed else 0
