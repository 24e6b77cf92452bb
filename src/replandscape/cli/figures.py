"""``replandscape figures``: draw the figures, tables and report of analysis results files.

    replandscape figures analysis/results.json [MORE.json...] --out figures/ \\
        [--what profiles,ari,dendrogram,accuracy,report] [--formats png,pdf]

``accuracy`` also draws, for generated tasks, the in-context vs fine-tuned figure of each model and
its table. For a results file in a run's folder (``RUN/analysis/results.json``), the figures of the
run's patching, knockout and rsa stages are drawn too, where those ran, and given their sections
in the report. A file that cannot be read (missing, not JSON, an older schema) is reported on one line
and the others are still drawn; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from replandscape.errors import UserError

# Kept literal here so that ``replandscape --help`` does not import matplotlib.
_WHAT_HELP = "profiles,ari,dendrogram,accuracy,report"
_FORMATS_HELP = "png,pdf,svg"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "figures",
        help="draw figures, accuracy tables and a report from analysis results (no torch, no MPI)",
        description="Draw the profiles, ARI, dendrogram figures, accuracy tables (and, for "
                    "generated tasks, the in-context vs fine-tuned figure and table) and a "
                    "report from analysis results files. Imports neither torch nor mpi4py.",
    )
    parser.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json",
                        help="results files written by the analysis stage")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder for the figures and the report (created)")
    parser.add_argument("--what", default=_WHAT_HELP, metavar="LIST",
                        help=f"comma-separated subset of {_WHAT_HELP} (default: all; accuracy "
                             "includes the generated tasks' in-context vs fine-tuned figure "
                             "and table)")
    parser.add_argument("--formats", default="png,pdf", metavar="LIST",
                        help=f"comma-separated image formats out of {_FORMATS_HELP} "
                             "(default: png,pdf)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replandscape.figures import render_all
    from replandscape.pipeline import study_figures, study_sections
    from replandscape.results import read_results

    loaded = []
    failed = 0
    for path in args.results:
        try:
            loaded.append(read_results(path))
        except UserError as exc:
            # One line per unreadable file; the others are still drawn.
            print(f"replandscape: error: {exc}", file=sys.stderr)
            failed += 1
    if not loaded:
        return 1

    # a run's own folder (results in RUN/analysis/) may hold the further studies' results too
    run_dirs = [p.parent.parent for p in args.results if p.parent.name == "analysis"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        studies = study_figures(run_dirs, args.out, args.formats.split(","))
        written = [*studies, *render_all(loaded, args.out, what=args.what.split(","),
                                         formats=args.formats.split(","),
                                         studies=study_sections(studies))]
    for w in caught:
        if issubclass(w.category, UserWarning) and w.category.__module__.startswith("replandscape"):
            print(f"replandscape: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for path in written:
        print(path)
    return 1 if failed else 0
