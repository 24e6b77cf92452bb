"""Accuracy tables, model x condition for each task, as Markdown and LaTeX (docs/method.md §6).

Accuracies use the strict rule (:func:`~replandscape.figures.data.accuracy_value`); macro
accuracy is the mean over the groups the results store (MMLU's subjects, a generated task's
variants).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from replandscape.figures.data import accuracy_value, all_runs, conditions, natural_key, tasks
from replandscape.figures.style import Condition
from replandscape.results import Results

KINDS = (("macro", "Macro accuracy (%)"), ("micro", "Micro accuracy (%)"))
MISSING_MD = "–"
MISSING_TEX = "--"


@dataclass(frozen=True)
class AccuracyTable:
    """Accuracies of one task in percent: ``values[kind][model][condition key]`` (None where not
    measured)."""

    task: str
    models: list[str]
    conditions: list[Condition]
    values: dict[str, dict[str, dict[tuple[object, ...], float | None]]]

    def value(self, kind: str, model: str, condition: Condition) -> float | None:
        return self.values[kind][model].get(condition.key)


def accuracy_table(results: Results, task: str | None = None,
                   rule: str = "strict") -> AccuracyTable:
    """Macro and micro accuracy (stored as fractions) in percent per model and condition of
    ``task`` (which may be left out when the results hold one task), under ``rule``."""
    every = all_runs(results)
    if task is None:
        names = tasks(every)
        if len(names) > 1:
            raise ValueError(f"results hold {len(names)} tasks ({', '.join(names)}); pass task=")
        task = names[0] if names else ""
    runs = [i for i in every if i.task == task]
    conds = conditions(runs)
    names = sorted({i.model for i in runs}, key=natural_key)
    values: dict[str, dict[str, dict[tuple[object, ...], float | None]]] = {
        kind: {m: {c.key: None for c in conds} for m in names} for kind, _ in KINDS}
    for info in runs:
        for kind, _ in KINDS:
            v = accuracy_value(info.info, rule, kind)
            values[kind][info.model][info.condition.key] = None if math.isnan(v) else 100.0 * v
    return AccuracyTable(task, names, conds, values)


def accuracy_tables(results: Results, rule: str = "strict") -> list[AccuracyTable]:
    """:func:`accuracy_table` of every task of ``results``, MMLU first."""
    return [accuracy_table(results, t, rule) for t in tasks(results)]


def caption(kind_caption: str, task: str) -> str:
    """``Macro accuracy (%), mmlu``."""
    return f"{kind_caption}, {task}" if task else kind_caption


def _fmt(v: float | None, missing: str) -> str:
    return missing if v is None else f"{v:.1f}"


def accuracy_markdown(results: Results, *, heading_level: int = 3) -> str:
    """Per task, two Markdown tables (macro, then micro accuracy in %), models as rows."""
    hashes = "#" * heading_level
    out = []
    for t in accuracy_tables(results):
        for kind, kind_caption in KINDS:
            out.append(f"{hashes} {caption(kind_caption, t.task)}\n")
            out.append("| model | " + " | ".join(c.label for c in t.conditions) + " |")
            out.append("|---|" + "---:|" * len(t.conditions))
            for m in t.models:
                cells = [_fmt(t.value(kind, m, c), MISSING_MD) for c in t.conditions]
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}


def tex(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def tex_label(text: str) -> str:
    """A fragment of a ``\\label``: letters, digits and dashes only."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-") or "x"


def accuracy_latex(results: Results) -> str:
    """Per task, two booktabs tables (macro, then micro accuracy in %), ready to ``\\input``."""
    out = ["% replandscape accuracy table; needs \\usepackage{booktabs}"]
    for t in accuracy_tables(results):
        for kind, kind_caption in KINDS:
            out += [r"\begin{table}[t]", r"\centering",
                    f"\\caption{{{tex(caption(kind_caption, t.task))}}}",
                    f"\\label{{tab:accuracy-{tex_label(t.task)}-{kind}}}",
                    r"\begin{tabular}{l" + "r" * len(t.conditions) + "}", r"\toprule",
                    "model & " + " & ".join(tex(c.label) for c in t.conditions) + r" \\",
                    r"\midrule"]
            for m in t.models:
                cells = [_fmt(t.value(kind, m, c), MISSING_TEX) for c in t.conditions]
                out.append(f"{tex(m)} & " + " & ".join(cells) + r" \\")
            out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)
