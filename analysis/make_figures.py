#!/usr/bin/env python
"""Draw the figures, accuracy tables and report of analysis results (same as ``replandscape figures``).

    python analysis/make_figures.py analysis/results.json [MORE.json...] --out figures/ \\
        [--what profiles,ari,dendrogram,accuracy,report] [--formats png,pdf]

Runs are drawn per model and task from their fields; for generated tasks ``accuracy`` adds the
in-context vs fine-tuned figure and table (see analysis/README.md).

Needs only matplotlib, numpy, scipy and the replandscape package (no extras): no torch, no MPI.
"""

from __future__ import annotations

import sys

from replandscape.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["figures", *sys.argv[1:]]))
