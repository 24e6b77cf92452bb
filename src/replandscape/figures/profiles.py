"""Geometry along depth: profiles of one model, and ARI of every model (docs/method.md §6)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from replandscape.figures.data import (
    RunInfo,
    all_runs,
    conditions,
    label_columns,
    models,
    series,
    tasks,
)
from replandscape.figures.style import Condition, context, new_figure, suptitle
from replandscape.results import Results

DEPTH_LABEL = "relative depth (blocks passed / (blocks + 1))"

# (row key, y-axis label): the three quantities of the profile figure, in panel order.
PROFILE_QUANTITIES: tuple[tuple[str, str], ...] = (
    ("id", "intrinsic dimension"),
    ("n_peaks", "number of peaks"),
    ("core_fraction", "core-point fraction"),
)

# How a label column reads in a title ("ARI with subjects"); other columns read "COLUMN labels".
ARI_TARGETS = {"subject": "subjects", "answer": "answers", "target": "targets",
               "variant": "variants"}


def column_label(column: str) -> str:
    """A label column as it reads after "ARI with"."""
    return ARI_TARGETS.get(column, f"{column} labels")


def pick_task(infos: Sequence[RunInfo], task: str | None, what: str) -> str:
    """``task``, or the only task of ``infos`` when None (ValueError when there are several)."""
    names = tasks(infos)
    if task is not None:
        return task
    if len(names) != 1:
        raise ValueError(f"{what} has runs of {len(names)} tasks ({', '.join(names) or 'none'}); "
                         "pass task=")
    return names[0]


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


def plot_profiles(results: Results, model: str, task: str | None = None, *,
                  title: str | None = None) -> Figure:
    """Intrinsic dimension, number of density peaks and core-point fraction along relative depth.

    One panel per quantity, one line per condition of ``model`` on ``task`` (shots ascending, then
    fine-tuned). ``task`` may be left out when the model has runs of one task only. Missing values
    leave a gap in the line.
    """
    mine = [i for i in all_runs(results) if i.model == model]
    task = pick_task(mine, task, f"model {model}")
    runs = [i for i in mine if i.task == task]
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
        suptitle(fig, title or f"{model}, {task}", 3.0 * len(PROFILE_QUANTITIES))
        _legend(fig, conditions(runs))
    return fig


def plot_ari(results: Results, target: str, *, task: str | None = None, title: str | None = None,
             max_cols: int = 3) -> Figure:
    """ARI of the density-peak assignment with the label column ``target`` along depth.

    ``target`` is one of the label columns of the runs of ``task`` (``subject`` or ``answer`` for
    MMLU, ``target`` or ``variant`` for a generated task); ``task`` may be left out when the
    results hold one task with that column. One panel per model that has runs of the task (shared
    y axis, so models compare), one line per condition.
    """
    every = all_runs(results)
    with_target = [i for i in every if target in i.label_columns]
    if task is None:
        task = pick_task(with_target, None, f"label column {target!r}") if with_target else None
    runs = [i for i in every if i.task == task]
    if task is None or target not in label_columns(runs):
        raise ValueError(f"target must be one of the label columns "
                         f"{label_columns(runs) or label_columns(every)} of task {task}, "
                         f"not {target!r}")
    names = models(runs)
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
                ax.set_ylabel(f"ARI with {column_label(target)}")
            else:
                ax.tick_params(labelleft=False)
        if first is not None:  # ARI is read against 0 (chance): keep 0 in view
            lo, hi = first.get_ylim()
            first.set_ylim(min(lo, 0.0), hi)
        suptitle(fig, title or f"ARI of density peaks with {column_label(target)}, {task}",
                 3.3 * ncols)
        _legend(fig, conditions(runs))
    return fig
