"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from replandscape.config import ExperimentConfig, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides, e.g. prompts.shots=[0,5] analysis.maxk=100 "
                             "cluster=local-slurm")


def load_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> ExperimentConfig:
    return load_config(args.config, [*args.overrides, *extra])
