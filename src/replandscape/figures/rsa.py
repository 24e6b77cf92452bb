"""Figures of the similarity study (docs/method.md §7.7), from ``rsa/results.json`` alone.

Per model and task: the alignment with each hypothesis along depth (one line per shot count, the
0-shot run and the in-context runs; span sites drawn in their own panels), the probes' score and
selectivity along depth, the similarity matrix over conditions at the site and shot count where
the first hypothesis aligns best in context (beside the 0-shot matrix), and, where attention
masses were kept, the attention ratio
along depth per shot count with the correlation of its change (and of the alignment's change)
with the gain in accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from replandscape.errors import UserError
from replandscape.figures.style import (
    context,
    new_figure,
    safe_name,
    save_figure,
    shots_color,
    suptitle,
)


def read_rsa_results(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"not a readable JSON file ({type(exc).__name__})", file=str(path),
                        fix="re-run the rsa stage") from None
    if not isinstance(data, dict) or data.get("kind") != "replandscape.rsa-results":
        raise UserError("not an rsa results file", file=str(path), key="kind",
                        fix="pass rsa/results.json written by 'replandscape run rsa'")
    return data


def _groups(data: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for run, meta in data["runs"].items():
        if not meta["finetuned"]:
            out.setdefault((meta["model"], meta["task"]), []).append(run)
    return {k: sorted(v, key=lambda r: data["runs"][r]["shots"]) for k, v in out.items()}


def _series(data: dict[str, Any], run: str, span: str | None) -> list[dict[str, Any]]:
    rows = [r for r in data["rows"] if r["run"] == run and r.get("span") == span]
    return sorted(rows, key=lambda r: r["relative_depth"])


def plot_alignment(data: dict[str, Any], model: str, task: str) -> Any:
    """Alignment with each hypothesis along depth, one line per shot count; one row of panels
    per span (the kept token first)."""
    runs = _groups(data).get((model, task), [])
    hyps = sorted({h for r in data["rows"] if r["run"] in runs for h in (r["alignment"] or {})})
    spans = [None] + sorted({r["span"] for r in data["rows"] if r["run"] in runs and r["span"]})
    if not hyps:
        return None
    with context():
        fig = new_figure(3.0 * len(hyps) + 1.2, 2.4 * len(spans) + 0.6)
        axes = fig.subplots(len(spans), len(hyps), squeeze=False, sharex=True, sharey=True)
        for i, span in enumerate(spans):
            for j, hyp in enumerate(hyps):
                ax = axes[i][j]
                for run in runs:
                    shots = data["runs"][run]["shots"]
                    rows = _series(data, run, span)
                    ax.plot([r["relative_depth"] for r in rows],
                            [np.nan if (r["alignment"] or {}).get(hyp) is None
                             else r["alignment"][hyp] for r in rows],
                            color=shots_color(shots), marker="o", markersize=3,
                            label=f"{shots}-shot")
                ax.axhline(0, color="0.7", linewidth=0.6)
                ax.set_title(f"{hyp}" + (f", {span}" if span else ", kept token"), fontsize=9)
                if i == len(spans) - 1:
                    ax.set_xlabel("relative depth")
            axes[i][0].set_ylabel("alignment (Spearman)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize=8)
        suptitle(fig, f"{model}, {task}: similarity to the hypotheses", 3.0 * len(hyps))
    return fig


def plot_probes(data: dict[str, Any], model: str, task: str) -> Any:
    """Each probe's score (solid) and selectivity (dashed) along depth, one line per shot
    count (the kept token's sites)."""
    runs = _groups(data).get((model, task), [])
    labels = sorted({lab for r in data["rows"] if r["run"] in runs
                     for lab in (r.get("probes") or {})})
    if not labels:
        return None
    with context():
        fig = new_figure(3.2 * len(labels) + 1.2, 2.8)
        axes = fig.subplots(1, len(labels), squeeze=False, sharey=True)[0]
        for ax, label in zip(axes, labels):
            metric = ""
            for run in runs:
                shots = data["runs"][run]["shots"]
                rows = [r for r in _series(data, run, None) if label in (r.get("probes") or {})]
                depth = [r["relative_depth"] for r in rows]
                probes = [r["probes"][label] for r in rows]
                metric = probes[0]["metric"] if probes else metric
                ax.plot(depth, [p["score"] for p in probes], color=shots_color(shots),
                        marker="o", markersize=3, label=f"{shots}-shot")
                ax.plot(depth, [p["selectivity"] for p in probes], color=shots_color(shots),
                        linestyle="--", linewidth=1)
            ax.set_title(f"{label} ({metric}; dashed: selectivity)", fontsize=9)
            ax.set_xlabel("relative depth")
        axes[0].set_ylabel("probe score")
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside right upper", frameon=False, fontsize=8)
        suptitle(fig, f"{model}, {task}: linear probes", 3.2 * len(labels))
    return fig


def plot_similarity(data: dict[str, Any], model: str, task: str) -> Any:
    """The similarity matrix over conditions of the run with the most shots, at the site where
    the first hypothesis aligns best, beside the 0-shot run's matrix at the same site."""
    runs = _groups(data).get((model, task), [])
    rows = [r for r in data["rows"] if r["run"] in runs and r.get("span") is None
            and r["rsa"] and r["rsa"].get("similarity") and r["alignment"]]
    if not rows:
        return None
    hyp = sorted(rows[0]["alignment"])[0]
    most = max(data["runs"][r["run"]]["shots"] for r in rows)
    best = max((r for r in rows if data["runs"][r["run"]]["shots"] == most),
               key=lambda r: -np.inf if r["alignment"].get(hyp) is None
               else r["alignment"][hyp])
    zero = next((r for r in rows if data["runs"][r["run"]]["shots"] == 0
                 and r["site"] == best["site"]), None) if most else None
    shown = [r for r in (zero, best) if r is not None]
    with context():
        fig = new_figure(4.2 * len(shown) + 1.0, 4.2)
        axes = fig.subplots(1, len(shown), squeeze=False)[0]
        image = None
        for ax, r in zip(axes, shown):
            m = np.asarray(r["rsa"]["similarity"], dtype=float)
            image = ax.imshow(m, cmap="viridis", vmin=-1, vmax=1)
            names = r["rsa"]["rows"]
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
            ax.set_yticks(range(len(names)), names, fontsize=6)
            ax.set_title(f"{data['runs'][r['run']]['shots']}-shot, {r['site']}\n{hyp}: "
                         f"{r['alignment'][hyp]:.2f}", fontsize=8)
        if image is not None:
            fig.colorbar(image, ax=list(axes), label="cosine similarity")
        suptitle(fig, f"{model}, {task}: similarity over conditions", 4.2 * len(shown))
    return fig


def plot_attention(data: dict[str, Any], model: str, task: str) -> Any:
    """The attention ratio along depth per shot count, and per layer the correlation over
    conditions between the gain in accuracy and the change of the ratio from 0 shots."""
    entries = sorted((a for a in data.get("attention") or [] if a["model"] == model
                      and a["task"] == task and not a["finetuned"]), key=lambda a: a["shots"])
    if not entries:
        return None
    with context():
        fig = new_figure(8.5, 3.0)
        axes = fig.subplots(1, 2)
        for a in entries:
            layers = np.arange(len(a["ratio_per_layer"]))
            axes[0].plot(layers, a["ratio_per_layer"], color=shots_color(a["shots"]), marker="o",
                         markersize=3, label=f"{a['shots']}-shot")
            corr = a.get("gain_correlation")
            if corr:
                axes[1].plot(layers, [np.nan if v is None else v for v in corr["pearson"]],
                             color=shots_color(a["shots"]), marker="o", markersize=3,
                             label=f"{a['shots']}-shot")
        span_a, span_b = entries[0]["spans"]
        axes[0].set_title(f"attention to {span_a} / to {span_b}", fontsize=9)
        axes[0].set_xlabel("layer")
        axes[0].axhline(1, color="0.7", linewidth=0.6)
        axes[1].set_title("correlation of its change with the accuracy gain", fontsize=9)
        axes[1].set_xlabel("layer")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1].axhline(0, color="0.7", linewidth=0.6)
        axes[0].legend(frameon=False, fontsize=8)
        suptitle(fig, f"{model}, {task}: attention ratio", 8.0)
    return fig


def render_rsa(results_file: Path, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Every similarity figure ``rsa/results.json`` allows."""
    data = read_rsa_results(results_file)
    written: list[Path] = []
    for model, task in sorted(_groups(data)):
        stem = f"{safe_name(model)}_{safe_name(task)}"
        for name, fig in (("rsa_alignment", plot_alignment(data, model, task)),
                          ("rsa_probes", plot_probes(data, model, task)),
                          ("rsa_similarity", plot_similarity(data, model, task)),
                          ("rsa_attention", plot_attention(data, model, task))):
            if fig is not None:
                written += save_figure(fig, out_dir / f"{name}_{stem}", formats)
    return written
