"""Offline figures of the analysis results (docs/method.md §6).

Reads only ``analysis/results.json`` through :mod:`replandscape.results` and needs matplotlib,
numpy and scipy: it imports neither torch nor mpi4py, so figures can be made on a laptop.

Runs are placed by their structured fields (model, task, shots, fine-tuned, method, checkpoint
step, examples seen), never by their names. Entry point: :func:`render_all`. The plotting functions return :class:`matplotlib.figure.Figure`
objects on an Agg canvas (no pyplot), for notebooks and tests.
"""

from replandscape.figures.data import FiguresWarning
from replandscape.figures.dendrogram import dendrogram_site, plot_dendrogram
from replandscape.figures.icl_vs_ft import (
    plot_icl_vs_ft,
    released_latex,
    released_markdown,
    released_table,
)
from replandscape.figures.profiles import plot_ari, plot_profiles
from replandscape.figures.render import DEFAULT_FORMATS, WHAT, render_all
from replandscape.figures.report import finetune_mismatches
from replandscape.figures.style import Condition, condition_color, condition_of
from replandscape.figures.tables import accuracy_latex, accuracy_markdown, accuracy_table

__all__ = [
    "DEFAULT_FORMATS",
    "WHAT",
    "Condition",
    "FiguresWarning",
    "accuracy_latex",
    "accuracy_markdown",
    "accuracy_table",
    "condition_color",
    "condition_of",
    "dendrogram_site",
    "finetune_mismatches",
    "plot_ari",
    "plot_dendrogram",
    "plot_icl_vs_ft",
    "plot_profiles",
    "released_latex",
    "released_markdown",
    "released_table",
    "render_all",
]
