"""One look for every figure: fonts, the colour of each condition, the Agg canvas, saving.

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas attached, never through
``pyplot``: no global figure registry, no GUI backend, and the caller's backend is left alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Every text is at least 9 pt; saved PNGs at 150 dpi stay readable when shrunk into a report.
RC: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "figure.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "savefig.dpi": 150,
    "pdf.fonttype": 42,  # TrueType in PDFs: text stays editable and searchable
}

SUPPORTED_FORMATS = ("png", "pdf", "svg")

# Shots take a fixed position on a sequential map, whatever conditions a file holds, so "2-shot"
# has the same colour in every figure and every report. The top of viridis (yellow) is left out:
# it is unreadable on white.
_SHOTS_CMAP = "viridis"
_SHOTS_MAX = 5
_SHOTS_SPAN = (0.0, 0.82)
FINETUNED_COLOR = "#d62728"  # the final fine-tuned checkpoint: red, far from every viridis hue
_CHECKPOINT_CMAP = "Oranges"  # intermediate fine-tuning checkpoints: light to dark with the step
UNKNOWN_COLOR = "#7f7f7f"

_SHOTS_RE = re.compile(r"^shots(\d+)$")
_STEP_RE = re.compile(r"^ft-step(\d+)$")


@dataclass(frozen=True)
class Condition:
    """How one condition (``shots2``, ``ft-final``, ``ft-step000016``) is named, ordered and drawn."""

    name: str
    label: str
    color: str
    marker: str
    linestyle: str
    sort_key: tuple[float, float, float, str]


def _hex(rgba: tuple[float, float, float, float]) -> str:
    return matplotlib.colors.to_hex(rgba)


def condition_of(name: str, info: Mapping[str, Any] | None = None) -> Condition:
    """The condition of a run, from its ``runs`` entry where present, else from its name."""
    info = info or {}
    finetuned = info.get("finetuned")
    shots = info.get("shots")
    step = info.get("checkpoint_step")
    m_shots, m_step = _SHOTS_RE.match(name), _STEP_RE.match(name)
    if finetuned is None:
        finetuned = name.startswith("ft-")
    if shots is None and m_shots:
        shots = int(m_shots.group(1))
    if step is None and m_step:
        step = int(m_step.group(1))

    if finetuned:
        if name == "ft-final" or step is None:
            return Condition(name, "fine-tuned", FINETUNED_COLOR, "s", "-",
                             (1, math.inf, 0, name))
        frac = min(math.log10(max(int(step), 1)) / 5.0, 1.0)
        color = _hex(matplotlib.colormaps[_CHECKPOINT_CMAP](0.35 + 0.45 * frac))
        return Condition(name, f"fine-tuned, step {int(step)}", color, "s", "--",
                         (1, float(step), 0, name))
    if shots is not None:
        shots = int(shots)
        lo, hi = _SHOTS_SPAN
        pos = lo + (hi - lo) * min(shots, _SHOTS_MAX) / _SHOTS_MAX
        color = _hex(matplotlib.colormaps[_SHOTS_CMAP](pos))
        return Condition(name, f"{shots}-shot", color, "o", "-", (0, float(shots), 0, name))
    return Condition(name, name, UNKNOWN_COLOR, "^", ":", (2, 0, 0, name))


def condition_color(name: str, info: Mapping[str, Any] | None = None) -> str:
    """The fixed colour of a condition, as a hex string."""
    return condition_of(name, info).color


@contextmanager
def context() -> Iterator[None]:
    """Fonts and line widths of the suite, for building and for saving a figure."""
    with matplotlib.rc_context(RC):  # type: ignore[arg-type]
        yield


def new_figure(width_in: float, height_in: float) -> Figure:
    """A constrained-layout figure on an Agg canvas (no pyplot, no GUI)."""
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def safe_name(text: str) -> str:
    """A file-name fragment: model ids like ``meta-llama/Meta-Llama-3-8B`` lose their slashes."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def save_figure(fig: Figure, stem: Path, formats: Sequence[str]) -> list[Path]:
    """Save ``fig`` as ``stem.FORMAT`` for each format; returns the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        # No creation date in PDFs/SVGs: the same results give byte-identical files.
        metadata = {"CreationDate": None} if fmt == "pdf" else ({"Date": None} if fmt == "svg" else None)
        with context():
            fig.savefig(path, format=fmt, metadata=metadata)
        written.append(path)
    return written
