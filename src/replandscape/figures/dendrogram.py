"""Dendrogram of the density peaks at the site where ARI with the run's first label column (subjects
for MMLU, targets for a generated task) is highest (docs/method.md §5-6).

The analysis stage stores, for some sites, the linkage of the peaks (``scipy`` ``method="weighted"``
on max log-density minus saddle log-density) and one label per peak; this module only draws it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.cluster import hierarchy

from replandscape.figures.data import FiguresWarning, metric, number, run_info
from replandscape.figures.profiles import column_label
from replandscape.figures.style import context, new_figure
from replandscape.results import Results

DISSIMILARITY_LABEL = "dissimilarity (peak log density − saddle log density)"


@dataclass(frozen=True)
class DendrogramSite:
    """The site chosen for a run's dendrogram and why."""

    row: Mapping[str, Any]
    column: str  # the label column the site was chosen by
    ari: float
    best_overall: bool  # False: the best site has no dendrogram, this is the best one that has


def _leaf_count(dendro: Any) -> int:
    if not isinstance(dendro, Mapping):
        return 0
    link = dendro.get("linkage")
    return len(link) + 1 if isinstance(link, list) and link else 0


def dendrogram_site(results: Results, run: str) -> DendrogramSite | None:
    """The site of ``run`` with the highest ARI with its first label column (``subject`` for MMLU,
    ``target`` for a generated task) among those with a stored dendrogram of at least two peaks;
    None when no site has one."""
    column = run_info(results, run).label_columns[0]
    rows = results.rows_for(run)
    scored = [(metric(r, f"ari.{column}"), r) for r in rows]
    scored = [(a, r) for a, r in scored if not math.isnan(a)]
    if not scored:
        return None
    best_ari = max(a for a, _ in scored)
    drawable = [(a, r) for a, r in scored if _leaf_count(r.get("dendrogram")) >= 2]
    if not drawable:
        return None
    a, row = max(drawable, key=lambda ar: ar[0])
    return DendrogramSite(row=row, column=column, ari=a, best_overall=a >= best_ari)


def _leaf_labels(dendro: Mapping[str, Any], n_leaves: int, where: str) -> list[str]:
    labels = dendro.get("leaf_labels")
    sizes = dendro.get("peak_sizes")
    if not isinstance(labels, Sequence) or len(labels) != n_leaves:
        warnings.warn(f"{where}: {n_leaves} peaks but leaf_labels has "
                      f"{len(labels) if isinstance(labels, Sequence) else 'no'} entries; "
                      "leaves are numbered instead", FiguresWarning, stacklevel=3)
        labels = [f"peak {k}" for k in range(n_leaves)]
    out = []
    for k, label in enumerate(labels):
        text = ", ".join(map(str, label)) if isinstance(label, (list, tuple)) else str(label)
        if isinstance(sizes, Sequence) and len(sizes) == n_leaves and not math.isnan(number(sizes[k])):
            text = f"{text} (n={int(number(sizes[k]))})"
        out.append(text)
    return out


def plot_dendrogram(results: Results, run: str, *, title: str | None = None) -> Figure | None:
    """The dendrogram of the density peaks of ``run`` at its best site for ARI with its first
    label column.

    Leaves carry the stored ``leaf_labels`` (the dominant labels of each peak) and the peak sizes.
    Returns None when no site of ``run`` has a drawable dendrogram (fewer than two peaks, or none
    stored); an invalid linkage matrix is skipped with a :class:`FiguresWarning`.
    """
    site = dendrogram_site(results, run)
    if site is None:
        return None
    row, dendro = site.row, site.row["dendrogram"]
    where = f"{run} at {row.get('site')}"
    try:
        linkage = np.asarray(dendro["linkage"], dtype=float)
        hierarchy.is_valid_linkage(linkage, throw=True)
    except (TypeError, ValueError) as exc:
        warnings.warn(f"{where}: invalid linkage matrix ({exc}); dendrogram skipped",
                      FiguresWarning, stacklevel=2)
        return None
    n_leaves = linkage.shape[0] + 1
    labels = _leaf_labels(dendro, n_leaves, where)
    info = run_info(results, run)
    color = info.condition.color
    depth = number(row.get("relative_depth"))
    depth_txt = "" if math.isnan(depth) else f", relative depth {depth:.2f}"
    pick = "" if site.best_overall else " (best site with a dendrogram)"
    with context():
        longest = max(len(s) for s in labels)
        fig = new_figure(min(5.0 + 0.075 * longest, 11.0), 1.6 + 0.32 * n_leaves)
        ax = fig.add_subplot()
        hierarchy.dendrogram(linkage, labels=labels, orientation="right", ax=ax,
                             link_color_func=lambda _k: color, leaf_font_size=9)
        ax.set_xlabel(DISSIMILARITY_LABEL)
        ax.grid(axis="y", visible=False)
        ax.spines["left"].set_visible(False)
        ax.tick_params(axis="y", length=0)
        head = title or f"{info.model}, {info.task}, {info.condition.label}"
        # Three short lines: a long single line would run past the figure's right edge.
        ax.set_title(f"{head}\nsite {row.get('site')}{depth_txt}\n"
                     f"ARI with {column_label(site.column)} {site.ari:.2f}{pick}", loc="left")
    return fig
