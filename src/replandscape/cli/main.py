"""Entry point of the ``replandscape`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers) -> None`` (adds its parser and sets ``func``) .
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from replandscape import __version__
from replandscape.errors import UserError
from replandscape.outputs import environment_error

SUBCOMMANDS = (
    "validate",
    "run",
    "submit",
    "status",
    "ls",
    "prompts",
    "metrics",
    "make-data",
    "make-model",
    "figures",
    "demo",
    "sbatch",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replandscape",
        description="Representation landscape of few-shot learning and fine-tuning in LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"replandscape {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"replandscape.cli.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:  # a subcommand whose module is not written yet
            if exc.name == f"replandscape.cli.{name.replace('-', '_')}":
                continue
            raise
        module.register(sub)
    return parser


def _quiet_library_warnings() -> None:
    """Deprecation notices from torch/transformers/DeepSpeed internals say nothing a user can act
    on; they would bury the suite's own messages."""
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # numpy notices that float32 denormals are flushed to zero (extraction on CPU asks for it)
    warnings.filterwarnings("ignore", message=".*smallest subnormal.*")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_library_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"replandscape: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("replandscape: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # a full disk or a read-only mount met by a writer outside replandscape.atomic (h5py,
        # log appends): still one line; any other OSError may be a bug and keeps its traceback
        error = environment_error(exc)
        if error is None:
            raise
        print(f"replandscape: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
