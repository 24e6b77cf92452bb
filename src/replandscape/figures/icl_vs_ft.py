"""In-context learning against fine-tuning on the generated tasks (docs/method.md §7).

For each model, one page of two panels sharing the accuracy axis:

* *in context*: accuracy of the base model against the number of shots, on a symmetric-log axis
  of base 2 (0 at the left, then 1, 2, 4, ..., 32 evenly spaced);
* *fine-tuned*: accuracy of the fine-tuning checkpoints (0-shot) against the training examples
  each had seen, on a log axis; the final checkpoint is the larger marker.

One colour per task (:func:`~replandscape.figures.style.task_colors`), the pattern variant solid
and the misleading variant dashed. And one table, per model x task x variant: the fine-tuned model
at 0 shots (the final checkpoint), the base model at 0 shots, and the base model's best accuracy
over 1 to 16 shots with the shot count that gave it, under the strict and the substring rule.

Every position comes from a run's fields (``task``, ``shots``, ``finetuned``, ``method``,
``checkpoint_step``, ``examples_seen``), never from its name.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from replandscape.figures.data import (
    SCORING_RULES,
    FiguresWarning,
    RunInfo,
    accuracy_part,
    accuracy_value,
    all_runs,
    natural_key,
    task_key,
    variants,
)
from replandscape.figures.style import (
    METHOD_LABELS,
    context,
    new_figure,
    suptitle,
    task_colors,
    variant_style,
)
from replandscape.figures.tables import MISSING_MD, MISSING_TEX, tex, tex_label
from replandscape.results import Results

# The base model's best is taken over this many shots, both ends included.
BEST_SHOTS = (1, 16)
RULE_CAPTIONS = {"strict": "strict scoring", "substring": "substring scoring"}
_METHOD_MARKERS = {"full": "D"}  # LoRA, and an unrecorded method, draw squares


def generated_runs(results: Results) -> list[RunInfo]:
    """The runs of generated tasks (every task but MMLU)."""
    return [i for i in all_runs(results) if i.is_generated]


def available_rule(results: Results, preferred: str = "strict") -> str:
    """``preferred`` when some generated run has accuracies under it, else the other rule (a run
    scored by substring alone stores no strict accuracy)."""
    runs = generated_runs(results)
    if any(accuracy_part(i.info, preferred) is not None for i in runs) or not runs:
        return preferred
    return next((r for r in SCORING_RULES if r != preferred), preferred)


def _percent(value: float) -> float:
    return 100.0 * value if not math.isnan(value) else math.nan


def _shots_axis(ax: Axes, shots: Sequence[int]) -> None:
    """Base-2 symmetric-log x axis with a tick at every shot count drawn (0 at the left)."""
    # Linear within [-1, 1] and logarithmic beyond: 0 sits one step left of 1, and 1, 2, 4, ...
    # are evenly spaced.
    ax.set_xscale("symlog", base=2, linthresh=1, linscale=0.5)
    ticks = sorted(set(shots)) or [0]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FixedFormatter([str(t) for t in ticks]))
    hi = max(ticks)
    ax.set_xlim(-0.25, hi * 1.25 if hi > 0 else 1)
    ax.set_xlabel("shots (in-context examples)")


def plot_icl_vs_ft(results: Results, model: str, *, rule: str = "strict",
                   title: str | None = None) -> Figure:
    """Accuracy of ``model`` on the generated tasks: base model against shots (left) and the
    fine-tuning checkpoints against training examples seen (right), per task and variant.

    Args:
        results: the analysis results.
        model: the model drawn.
        rule: ``strict`` (default) or ``substring`` scoring.
        title: the page title (default: the model and the rule).

    Fine-tuned runs at 0 shots are drawn; a checkpoint without ``examples_seen`` cannot be placed
    and is left out with a :class:`FiguresWarning`.
    """
    runs = [i for i in generated_runs(results) if i.model == model]
    names = sorted({i.task for i in runs}, key=task_key)
    colors = task_colors(names)
    groups = variants(runs)
    base = [i for i in runs if not i.condition.finetuned]
    tuned = [i for i in runs if i.condition.finetuned and i.condition.shots == 0]
    unplaced = sorted(i.run for i in tuned if i.examples_seen is None)
    if unplaced:
        warnings.warn(f"{', '.join(unplaced)}: no examples_seen recorded; left out of the "
                      "fine-tuning panel", FiguresWarning, stacklevel=2)
    tuned = [i for i in tuned if i.examples_seen is not None]
    methods = sorted({i.condition.method for i in tuned})

    with context():
        fig = new_figure(12.0, 4.4)
        axes = fig.subplots(1, 2, sharey=True)
        left, right = axes[0], axes[1]
        for task in names:
            for group in groups:
                style = variant_style(group)
                pts = sorted((i.condition.shots,
                              _percent(accuracy_value(i.info, rule, group=group)))
                             for i in base if i.task == task)
                if pts and not all(math.isnan(y) for _, y in pts):
                    left.plot([x for x, _ in pts], [y for _, y in pts], color=colors[task],
                              linestyle=style, marker="o")
                for method in methods:
                    mine = [i for i in tuned if i.task == task and i.condition.method == method]
                    marker = _METHOD_MARKERS.get(method, "s")
                    line = sorted((i.examples_seen or 0, i.condition.checkpoint_step is None,
                                   _percent(accuracy_value(i.info, rule, group=group)))
                                  for i in mine)
                    if not line or all(math.isnan(y) for *_, y in line):
                        continue
                    # The line joins the intermediate checkpoints; the final one is its own
                    # marker, so a final adapter that scores apart from the last step shows.
                    steps = [(x, y) for x, is_final, y in line if not is_final]
                    if steps:
                        right.plot([x for x, _ in steps], [y for _, y in steps],
                                   color=colors[task], linestyle=style, marker=marker)
                    final = [(x, y) for x, is_final, y in line if is_final]
                    if final:
                        right.plot([x for x, _ in final], [y for _, y in final], linestyle="none",
                                   marker=marker, markersize=9, color=colors[task],
                                   markeredgecolor="black")
        _shots_axis(left, [i.condition.shots for i in base])
        left.set_title("base model, in context", loc="left")
        left.set_ylabel(f"accuracy (%), {RULE_CAPTIONS[rule]}")
        left.set_ylim(-3, 103)
        if tuned:
            right.set_xscale("log")
            seen = sorted({i.examples_seen or 0 for i in tuned})
            if len(seen) <= 8:  # few checkpoints: label each with its plain count
                right.xaxis.set_major_locator(FixedLocator(seen))
                right.xaxis.set_minor_locator(NullLocator())
                right.xaxis.set_major_formatter(FixedFormatter([str(x) for x in seen]))
                right.set_xlim(seen[0] / 1.4, seen[-1] * 1.4)
        right.set_xlabel("training examples seen")
        right.set_title("fine-tuned, 0-shot (large marker: final checkpoint)", loc="left")
        if not base:
            left.text(0.5, 0.5, "no base-model runs", ha="center", transform=left.transAxes)
        if not tuned:
            right.text(0.5, 0.5, "no fine-tuned runs", ha="center", transform=right.transAxes)

        handles: list[Line2D] = [Line2D([], [], color=colors[t], marker="o") for t in names]
        labels = list(names)
        handles += [Line2D([], [], color="black", linestyle=variant_style(g))  # type: ignore[arg-type]
                    for g in groups]
        labels += groups
        if len(methods) > 1:
            handles += [Line2D([], [], color="black", linestyle="none",
                               marker=_METHOD_MARKERS.get(m, "s")) for m in methods]
            labels += [METHOD_LABELS.get(m, m or "fine-tuned") for m in methods]
        fig.legend(handles, labels, loc="outside right upper", title="task / variant",
                   frameon=False)
        suptitle(fig, title or f"{model}: in-context learning and fine-tuning "
                               f"({RULE_CAPTIONS[rule]})", 10.0)
    return fig


@dataclass(frozen=True)
class ReleasedRow:
    """One model x task x variant of :func:`released_table`, accuracies in percent (None where
    not measured)."""

    model: str
    task: str
    variant: str
    finetuned: dict[str, float | None]  # per fine-tuning method: final checkpoint, 0 shots
    base_zero: float | None
    base_best: float | None
    base_best_shots: int | None


@dataclass(frozen=True)
class ReleasedTable:
    """The table under one scoring rule; ``methods`` are the fine-tuning methods it holds."""

    rule: str
    methods: list[str]
    best_shots: tuple[int, int]
    rows: list[ReleasedRow]

    def row(self, model: str, task: str, variant: str) -> ReleasedRow:
        """The row of ``model``, ``task`` and ``variant`` (KeyError when absent)."""
        for r in self.rows:
            if (r.model, r.task, r.variant) == (model, task, variant):
                return r
        raise KeyError((model, task, variant))


def _value(info: RunInfo, rule: str, group: str) -> float | None:
    v = accuracy_value(info.info, rule, group=group)
    return None if math.isnan(v) else 100.0 * v


def released_table(results: Results, rule: str = "strict",
                   best_shots: tuple[int, int] = BEST_SHOTS) -> ReleasedTable:
    """Per model x task x variant of the generated tasks: the final fine-tuned checkpoint at 0
    shots (per method), the base model at 0 shots, and the base model's best over ``best_shots``
    (both ends included; the fewest shots win a tie) with its shot count, in percent."""
    runs = generated_runs(results)
    methods = sorted({i.condition.method for i in runs
                      if i.condition.finetuned and i.condition.checkpoint_step is None})
    rows = []
    lo, hi = best_shots
    for model in sorted({i.model for i in runs}, key=natural_key):
        for task in sorted({i.task for i in runs if i.model == model}, key=task_key):
            mine = [i for i in runs if i.model == model and i.task == task]
            base = sorted((i for i in mine if not i.condition.finetuned),
                          key=lambda i: i.condition.shots)
            for group in variants(mine):
                ft = {}
                for method in methods:
                    final = [i for i in mine if i.condition.finetuned and i.condition.shots == 0
                             and i.condition.checkpoint_step is None
                             and i.condition.method == method]
                    ft[method] = _value(final[0], rule, group) if final else None
                zero = [_value(i, rule, group) for i in base if i.condition.shots == 0]
                scored = [(v, i.condition.shots) for i in base if lo <= i.condition.shots <= hi
                          for v in [_value(i, rule, group)] if v is not None]
                best = max(scored, key=lambda vs: (vs[0], -vs[1])) if scored else None
                rows.append(ReleasedRow(model, task, group, ft, zero[0] if zero else None,
                                        best[0] if best else None, best[1] if best else None))
    return ReleasedTable(rule, methods, best_shots, rows)


def _headers(t: ReleasedTable) -> list[str]:
    ft = [f"{METHOD_LABELS.get(m, m) + ' ' if m else ''}fine-tuned, 0-shot" for m in t.methods]
    lo, hi = t.best_shots
    return (["model", "task", "variant"] + ft
            + ["base, 0-shot", f"base, best of {lo}–{hi} shots", "best shots"])


def _cells(t: ReleasedTable, r: ReleasedRow, missing: str) -> list[str]:
    def fmt(v: float | None) -> str:
        return missing if v is None else f"{v:.1f}"
    return ([fmt(r.finetuned.get(m)) for m in t.methods]
            + [fmt(r.base_zero), fmt(r.base_best),
               missing if r.base_best_shots is None else str(r.base_best_shots)])


def released_caption(rule: str) -> str:
    """The caption of the table under ``rule``."""
    return f"Fine-tuned and in-context accuracy (%), {RULE_CAPTIONS[rule]}"


def released_blocks(results: Results,
                    best_shots: tuple[int, int] = BEST_SHOTS) -> list[tuple[str, list[str],
                                                                           list[list[str]]]]:
    """(caption, header, rows of cells) of the strict and the substring table, for the report."""
    out = []
    for rule in ("strict", "substring"):
        t = released_table(results, rule, best_shots)
        out.append((released_caption(rule), _headers(t),
                    [[r.model, r.task, r.variant, *_cells(t, r, MISSING_MD)] for r in t.rows]))
    return out


def released_markdown(results: Results, *, heading_level: int = 3,
                      best_shots: tuple[int, int] = BEST_SHOTS) -> str:
    """The table under the strict rule, then under the substring rule, as Markdown."""
    hashes = "#" * heading_level
    out = []
    for caption, header, rows in released_blocks(results, best_shots):
        out += [f"{hashes} {caption}\n", "| " + " | ".join(header) + " |",
                "|---|---|---|" + "---:|" * (len(header) - 3)]
        out += ["| " + " | ".join(cells) + " |" for cells in rows]
        out.append("")
    return "\n".join(out)


def released_latex(results: Results, best_shots: tuple[int, int] = BEST_SHOTS) -> str:
    """The table under the strict rule, then under the substring rule, as booktabs LaTeX."""
    out = ["% replandscape fine-tuned vs in-context table; needs \\usepackage{booktabs}"]
    for rule in ("strict", "substring"):
        t = released_table(results, rule, best_shots)
        header = _headers(t)
        out += [r"\begin{table}[t]", r"\centering",
                f"\\caption{{{tex(released_caption(rule))}}}",
                f"\\label{{tab:icl-vs-ft-{tex_label(rule)}}}",
                r"\begin{tabular}{lll" + "r" * (len(header) - 3) + "}", r"\toprule",
                " & ".join(tex(h).replace("–", "--") for h in header) + r" \\", r"\midrule"]
        for r in t.rows:
            cells = [tex(r.model), tex(r.task), tex(r.variant), *_cells(t, r, MISSING_TEX)]
            out.append(" & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)
