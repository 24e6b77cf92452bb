"""One look for every figure: fonts, the colour of each condition, the Agg canvas, saving.

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas attached, never through
``pyplot``: no global figure registry, no GUI backend, and the caller's backend is left alone.
"""

from __future__ import annotations

import math
import re
import textwrap
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
# has the same colour in every figure and every report. The position grows with log2(1 + shots)
# up to 32 shots, so 0, 1, 2, 4, ..., 32 are evenly spread and MMLU's 0..5 stay apart. The top of
# viridis (yellow) is left out: it is unreadable on white.
_SHOTS_CMAP = "viridis"
_SHOTS_MAX = 32
_SHOTS_SPAN = (0.0, 0.82)
# Fine-tuned models by method: the final checkpoint has one fixed colour, far from every viridis
# hue; intermediate checkpoints run light to dark with the step on the method's own map.
_FINETUNED = {"full": ("#e377c2", "RdPu")}
_FINETUNED_DEFAULT = ("#d62728", "YlOrBr")  # LoRA, and a fine-tuned run of unrecorded method
_STEP_LOW, _STEP_DOUBLINGS, _STEP_SPAN = 10, 10, (0.4, 0.95)
FINETUNED_COLOR = _FINETUNED_DEFAULT[0]
METHOD_LABELS = {"lora": "LoRA", "full": "full"}
UNKNOWN_COLOR = "#7f7f7f"


@dataclass(frozen=True)
class Condition:
    """How one condition (``shots2``, ``ft-final``, ``ft-step000016``) is named, ordered and drawn.

    Everything here comes from a run's structured fields (``shots``, ``finetuned``, ``method``,
    ``checkpoint_step``); ``name`` is the display name the results carry, used only in file names.
    ``key`` identifies the condition: two runs with the same key are the same condition.
    """

    name: str
    label: str
    color: str
    marker: str
    linestyle: str
    sort_key: tuple[float, float, float, float, str]
    key: tuple[bool, str, int | None, int]
    shots: int
    finetuned: bool
    method: str
    checkpoint_step: int | None

    @property
    def slug(self) -> str:
        """A file-name fragment made from the fields alone (``shots5``, ``ft-final``,
        ``ft-step000100``, ``full-ft-final``, ``ft-final-shots2``): two different conditions never
        share one, whatever their display names."""
        if not self.finetuned:
            return f"shots{self.shots}" if self.key[3] >= 0 else safe_name(self.name)
        head = "" if self.method in ("", "lora") else f"{safe_name(self.method)}-"
        step = "ft-final" if self.checkpoint_step is None else f"ft-step{self.checkpoint_step:06d}"
        return f"{head}{step}" + (f"-shots{self.shots}" if self.shots else "")


def _hex(rgba: tuple[float, float, float, float]) -> str:
    return matplotlib.colors.to_hex(rgba)


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)


def shots_color(shots: int) -> str:
    """The fixed colour of ``shots`` in-context examples on the base model."""
    lo, hi = _SHOTS_SPAN
    frac = math.log2(1 + min(max(shots, 0), _SHOTS_MAX)) / math.log2(1 + _SHOTS_MAX)
    return _hex(matplotlib.colormaps[_SHOTS_CMAP](lo + (hi - lo) * frac))


def condition_of(info: Mapping[str, Any], name: str | None = None) -> Condition:
    """The condition of a run from its ``runs`` entry: ``shots``, ``finetuned``, ``method``,
    ``checkpoint_step`` and ``final``. The display name (``info["condition"]``, or ``name``) is never read for
    any of these: a run named oddly but with its fields set is drawn where its fields say.
    """
    shots = _int_or_none(info.get("shots"))
    finetuned = info.get("finetuned") is True
    method = str(info.get("method") or "") if finetuned else ""
    # the final checkpoint is drawn as such, whatever step it was saved at
    step = (_int_or_none(info.get("checkpoint_step"))
            if finetuned and info.get("final") is not True else None)
    display = str(info.get("condition") or name or "")
    shots_txt = f", {shots}-shot" if shots else ""
    key = (finetuned, method, step, shots if shots is not None else -1)

    if finetuned:
        final_color, cmap = _FINETUNED.get(method, _FINETUNED_DEFAULT)
        who = f"{METHOD_LABELS.get(method, method)} fine-tuned" if method else "fine-tuned"
        method_rank = 1.0 if method == "full" else 0.0
        if step is None:
            return Condition(display or "ft-final", who + shots_txt, final_color, "s", "-",
                             (1, method_rank, math.inf, float(shots or 0), display), key,
                             shots or 0, True, method, None)
        # Light to dark over steps 10 to 10240, each doubling an equal shade apart.
        frac = min(max(math.log2(max(step, 1) / _STEP_LOW) / _STEP_DOUBLINGS, 0.0), 1.0)
        lo, hi = _STEP_SPAN
        color = _hex(matplotlib.colormaps[cmap](lo + (hi - lo) * frac))
        return Condition(display or f"ft-step{step:06d}", f"{who}, step {step}{shots_txt}", color,
                         "s", "--", (1, method_rank, float(step), float(shots or 0), display),
                         key, shots or 0, True, method, step)
    if shots is not None:
        return Condition(display or f"shots{shots}", f"{shots}-shot", shots_color(shots), "o",
                         "-", (0, 0, float(shots), 0, display), key, shots, False, "", None)
    return Condition(display or "unknown", display or "unknown condition", UNKNOWN_COLOR, "^",
                     ":", (2, 0, 0, 0, display), key, 0, False, "", None)


def condition_color(info: Mapping[str, Any]) -> str:
    """The fixed colour of the condition of a run's ``runs`` entry, as a hex string."""
    return condition_of(info).color


# Tasks get fixed colours (the five released tasks and parity first, in a fixed order), so a task
# looks the same in every figure whatever else a file holds; other tasks follow in name order.
TASK_ORDER = ("mmlu", "expression", "relation", "boolean", "algebra", "code", "parity")
_TASK_PALETTE = ("#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                 "#e377c2", "#17becf", "#bcbd22")


def task_colors(tasks: Sequence[str]) -> dict[str, str]:
    """A colour per task: known tasks by :data:`TASK_ORDER`, others after them by name."""
    extra = sorted(t for t in set(tasks) if t not in TASK_ORDER)
    order = list(TASK_ORDER) + extra
    return {t: _TASK_PALETTE[order.index(t) % len(_TASK_PALETTE)] for t in tasks}


# The two variants of a generated task: the shortcut holds (solid) or misleads (dashed).
VARIANT_STYLES = {"pattern": "-", "misleading": "--"}


def variant_style(variant: str) -> str:
    """Line style of a task variant: pattern solid, misleading dashed, anything else dotted."""
    return VARIANT_STYLES.get(variant, ":")


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


def suptitle(fig: Figure, text: str, width_in: float) -> None:
    """A page title at the left, wrapped to ``width_in`` inches (the panels' width): centred on a
    figure with a legend at the right, a long title would run over the legend."""
    # About 11 characters an inch at the 11 pt title size.
    fig.suptitle(textwrap.fill(text, max(20, int(11 * width_in))), x=0.01, ha="left")


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
