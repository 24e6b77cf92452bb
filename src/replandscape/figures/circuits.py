"""Figures of the circuit studies (docs/method.md §7.7), from their result files alone.

From ``patching/circuits.json``: the mean effect of every attention head (layer x head heat map,
one panel per condition), the MLP and residual-stream effects along depth (one line per
condition, coloured as everywhere else), and the circuit shift of every pair of conditions (bars:
1 - rank correlation, and the top-k overlap). From ``knockout/CONDITION.json``: the change of the
answer's log-probability per position set and layer window, and the one-token scan.
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
    condition_of,
    context,
    new_figure,
    safe_name,
    save_figure,
    suptitle,
)


def read_json(path: Path, kind: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"not a readable JSON file ({type(exc).__name__})", file=str(path),
                        fix="re-run the stage that wrote it") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise UserError(f"not a {kind} file", file=str(path), key="kind",
                        fix="pass a file written by the patch or knockout stage")
    return data


def _info(entry: dict[str, Any]) -> dict[str, Any]:
    step = entry.get("checkpoint_step", -1)
    return {**entry, "checkpoint_step": None if step is None or step < 0 else step}


def _ordered(conditions: dict[str, Any]) -> list[tuple[str, Any]]:
    return sorted(conditions.items(), key=lambda kv: condition_of(_info(kv[1]), kv[0]).sort_key)


def plot_head_effects(circuits: dict[str, Any]) -> Any:
    """Mean effect of each head, layer x head, one panel per condition, one colour scale."""
    conds = [(n, e) for n, e in _ordered(circuits["conditions"])
             if e["mean_effects"].get("heads")]
    if not conds:
        return None
    maps = [np.asarray(e["mean_effects"]["heads"], dtype=float) for _, e in conds]
    limit = max(float(np.nanmax(np.abs(m))) for m in maps) or 1.0
    width = 2.6 * len(conds) + 1.0
    with context():
        fig = new_figure(width, 3.4)
        axes = fig.subplots(1, len(conds), squeeze=False)[0]
        images = []
        for ax, (name, entry), m in zip(axes, conds, maps):
            images.append(ax.imshow(m, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                              origin="lower", interpolation="nearest"))
            ax.set_title(condition_of(_info(entry), name).label, fontsize=9)
            ax.set_xlabel("head")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].set_ylabel("layer")
        fig.colorbar(images[-1], ax=list(axes), label="mean effect (0: none, 1: answer flipped)")
        suptitle(fig, f"{circuits['model']}, {circuits['task']}: attention heads", width - 1)
    return fig


def plot_depth_effects(circuits: dict[str, Any]) -> Any:
    """MLP outputs and residual stream along depth, one line per condition."""
    conds = _ordered(circuits["conditions"])
    with context():
        fig = new_figure(8.0, 3.2)
        axes = fig.subplots(1, 2)
        for ax, kind, title in ((axes[0], "mlp", "MLP outputs"),
                                (axes[1], "resid", "residual stream")):
            for name, entry in conds:
                values = entry["mean_effects"].get(kind)
                if not values:
                    continue
                c = condition_of(_info(entry), name)
                ax.plot(np.arange(len(values)), values, color=c.color, linestyle=c.linestyle,
                        marker=c.marker, markersize=3, label=c.label)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.axhline(0, color="0.7", linewidth=0.6)
        axes[0].set_ylabel("mean effect")
        handles, labels = axes[1].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize=8)
        suptitle(fig, f"{circuits['model']}, {circuits['task']}: effects along depth", 7.0)
    return fig


def plot_shifts(circuits: dict[str, Any]) -> Any:
    """Circuit shift (1 - rank correlation) and top-k overlap for every pair of conditions: one
    row of bars per pair (conditions in their drawing order), so many pairs stay legible."""
    shifts = circuits.get("shifts") or []
    if not shifts:
        return None
    kinds = sorted({s["kind"] for s in shifts})
    order = {name: i for i, (name, _) in enumerate(_ordered(circuits.get("conditions") or {}))}
    pairs = sorted({(s["condition_a"], s["condition_b"]) for s in shifts},
                   key=lambda p: (order.get(p[0], len(order)), order.get(p[1], len(order)), p))
    y = np.arange(len(pairs))
    height = 0.8 / len(kinds)
    with context():
        fig = new_figure(8.0, max(2.4, 0.32 * len(pairs) * max(1, len(kinds) / 2) + 1.2))
        axes = fig.subplots(1, 2, sharey=True)
        for j, kind in enumerate(kinds):
            by_pair = {(s["condition_a"], s["condition_b"]): s for s in shifts
                       if s["kind"] == kind}
            for ax, key in ((axes[0], "shift"), (axes[1], "overlap")):
                vals = [by_pair[p].get(key) if p in by_pair else None for p in pairs]
                ax.barh(y + (j - (len(kinds) - 1) / 2) * height,
                        [np.nan if v is None else v for v in vals], height, label=kind)
        axes[0].set_yticks(y, [f"{a} vs {b}" for a, b in pairs], fontsize=7)
        axes[0].invert_yaxis()  # the first pair on top
        for ax, title in ((axes[0], "shift (1 - rank correlation)"),
                          (axes[1], f"top-{circuits.get('top_k')} overlap")):
            ax.set_title(title, fontsize=9)
        axes[1].set_xlim(0, 1)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=len(kinds), frameon=False,
                   fontsize=8)
        suptitle(fig, f"{circuits['model']}, {circuits['task']}: circuit shift", 8.0)
    return fig


def plot_knockout(files: Sequence[dict[str, Any]]) -> Any:
    """Change of the answer's log-probability per position set (and window), per condition, and
    the one-token scan."""
    if not files:
        return None
    with context():
        fig = new_figure(9.0, 3.4)
        axes = fig.subplots(1, 2)
        labels: list[str] = []
        for i, data in enumerate(sorted(files, key=lambda d: d["shots"])):
            effects = data["result"]["effects"]
            names = [f"{e['position_set']} {e['window']}" for e in effects]
            labels = names
            width = 0.8 / len(files)
            axes[0].bar(np.arange(len(effects)) + (i - (len(files) - 1) / 2) * width,
                        [e["delta_logprob"] for e in effects], width,
                        label=f"{data['shots']}-shot")
            for scan in data.get("scan", [])[:1]:
                axes[1].plot(scan["offsets"], scan["delta_logprob"], marker="o", markersize=3,
                             label=f"{data['shots']}-shot {scan['window']}")
        axes[0].set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        axes[0].set_ylabel("change of log p(answer)")
        axes[0].axhline(0, color="0.7", linewidth=0.6)
        axes[0].legend(frameon=False, fontsize=8)
        axes[1].set_xlabel("position knocked out (tokens before the last)")
        axes[1].axhline(0, color="0.7", linewidth=0.6)
        axes[1].legend(frameon=False, fontsize=8)
        first = files[0]
        suptitle(fig, f"{first['model']}, {first['task']}: attention knockout", 8.0)
    return fig


def render_circuits(run_dir: Path, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Every circuit figure a run folder's patching and knockout results allow."""
    written: list[Path] = []
    circuits_file = run_dir / "patching" / "circuits.json"
    if circuits_file.is_file():
        circuits = read_json(circuits_file, "replandscape.circuits")
        stem = f"{safe_name(circuits['model'])}_{safe_name(circuits['task'])}"
        for name, fig in (("patching_heads", plot_head_effects(circuits)),
                          ("patching_depth", plot_depth_effects(circuits)),
                          ("circuit_shift", plot_shifts(circuits))):
            if fig is not None:
                written += save_figure(fig, out_dir / f"{name}_{stem}", formats)
    knockouts = [read_json(p, "replandscape.knockout")
                 for p in sorted((run_dir / "knockout").glob("*.json"))]
    if knockouts:
        stem = f"{safe_name(knockouts[0]['model'])}_{safe_name(knockouts[0]['task'])}"
        fig = plot_knockout(knockouts)
        written += save_figure(fig, out_dir / f"knockout_{stem}", formats)
    return written
