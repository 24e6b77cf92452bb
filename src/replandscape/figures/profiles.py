"""Geometry along depth: profiles of one model, and ARI of every model (METHOD.md section 5)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from replandscape.figures.data import RunInfo, all_runs, conditions, models, series
from replandscape.figures.style import Condition, context, new_figure
from replandscape.results import Results

DEPTH_LABEL = "relative depth (layer / number of sites)"

# (row key, y-axis label): the three quantities of the profile figure, in panel order.
PROFILE_QUANTITIES: tuple[tuple[str, str], ...] = (
    ("id", "intrinsic dimension"),
    ("n_peaks", "number of peaks"),
    ("core_fraction", "core-point fraction"),
)

ARI_TARGETS = {"subject": "subjects", "answer": "answers"}


def _draw_runs(ax: Axes, results: Results, runs: Sequence[RunInfo], key: str) -> None:
    """One line per run, in condition order, styled by condition."""
    for info in sorted(runs, key=lambda i: i.condition.sort_key):
        x, y = series(results, info.run, key)
        c = info.condition
        ax.plot(x, y, color=c.color, marker=c.marker, linestyle=c.linestyle, label=c.label)


def _legend(fig: Figure, conds: Sequence[Condition]) -> None:
    """A figure legend outside the axes, on the right: it never covers data."""
    handles = [Line2D([], [], color=c.color, marker=c.marker, linestyle=c.linestyle)  # type: ignore[arg-type]
               for c in conds]
    if handles:
        fig.legend(handles, [c.label for c in conds], loc="outside right upper",
                   title="condition", frameon=False)


def _depth_axis(ax: Axes) -> None:
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel(DEPTH_LABEL)


def plot_profiles(results: Results, model: str, *, title: str | None = None) -> Figure:
    """Intrinsic dimension, number of density peaks and core-point fraction along relative depth.

    One panel per quantity, one line per condition of ``model`` (shots ascending, then fine-tuned).
    Missing values leave a gap in the line.
    """
    runs = [i for i in all_runs(results) if i.model == model]
    with context():
        fig = new_figure(11.5, 3.5)
        axes = fig.subplots(1, len(PROFILE_QUANTITIES), sharex=True)
        for ax, (key, ylabel) in zip(axes, PROFILE_QUANTITIES):
            _draw_runs(ax, results, runs, key)
            _depth_axis(ax)
            ax.set_ylabel(ylabel)
            if key == "n_peaks":
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_ylim(bottom=0)
            elif key == "core_fraction":
                ax.set_ylim(-0.02, 1.02)
        fig.suptitle(title or model)
        _legend(fig, conditions(runs))
    return fig


def plot_ari(results: Results, target: str, *, title: str | None = None,
             max_cols: int = 3) -> Figure:
    """ARI of the density-peak assignment with ``target`` (``subject`` or ``answer``) along depth.

    One panel per model (shared y axis, so models compare), one line per condition.
    """
    if target not in ARI_TARGETS:
        raise ValueError(f"target must be one of {sorted(ARI_TARGETS)}, not {target!r}")
    names = models(results)
    runs = all_runs(results)
    n = max(len(names), 1)
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    with context():
        fig = new_figure(2.6 + 3.6 * ncols, 0.5 + 3.0 * nrows)  # room for the legend
        grid = fig.add_gridspec(nrows, ncols)
        first: Axes | None = None
        for k, model in enumerate(names):
            ax = fig.add_subplot(grid[k // ncols, k % ncols], sharey=first)
            first = first or ax
            _draw_runs(ax, results, [i for i in runs if i.model == model], f"ari.{target}")
            _depth_axis(ax)
            ax.set_title(model)
            if k % ncols == 0:
                ax.set_ylabel(f"ARI with {ARI_TARGETS[target]}")
            else:
                ax.tick_params(labelleft=False)
        if first is not None:  # ARI is read against 0 (chance): keep 0 in view
            lo, hi = first.get_ylim()
            first.set_ylim(min(lo, 0.0), hi)
        fig.suptitle(title or f"ARI of density peaks with {ARI_TARGETS[target]}")
        _legend(fig, conditions(runs))
    return fig
