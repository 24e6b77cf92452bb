"""Accuracy table, model x condition, as Markdown and LaTeX (METHOD.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass

from replandscape.figures.data import all_runs, conditions, natural_key, number
from replandscape.figures.style import Condition
from replandscape.results import Results

KINDS = (("macro", "Macro accuracy (%)"), ("micro", "Micro accuracy (%)"))
MISSING_MD = "–"
MISSING_TEX = "--"


@dataclass(frozen=True)
class AccuracyTable:
    """Accuracies in percent: ``values[kind][model][condition]`` (None where not measured)."""

    models: list[str]
    conditions: list[Condition]
    values: dict[str, dict[str, dict[str, float | None]]]


def accuracy_table(results: Results) -> AccuracyTable:
    """Collect macro and micro accuracy (stored as fractions) in percent per model and condition."""
    runs = [i for i in all_runs(results) if i.run in results.runs]
    conds = conditions(runs)
    names = sorted({i.model for i in runs}, key=natural_key)
    values: dict[str, dict[str, dict[str, float | None]]] = {
        kind: {m: {c.name: None for c in conds} for m in names} for kind, _ in KINDS}
    for info in runs:
        acc = info.info.get("accuracy") or {}
        for kind, _ in KINDS:
            v = number(acc.get(kind)) if isinstance(acc, dict) else float("nan")
            values[kind][info.model][info.condition.name] = None if v != v else 100.0 * v
    return AccuracyTable(names, conds, values)


def _fmt(v: float | None, missing: str) -> str:
    return missing if v is None else f"{v:.1f}"


def accuracy_markdown(results: Results, *, heading_level: int = 3) -> str:
    """Two Markdown tables (macro, then micro accuracy in %), models as rows."""
    t = accuracy_table(results)
    hashes = "#" * heading_level
    out = []
    for kind, caption in KINDS:
        out.append(f"{hashes} {caption}\n")
        out.append("| model | " + " | ".join(c.label for c in t.conditions) + " |")
        out.append("|---|" + "---:|" * len(t.conditions))
        for m in t.models:
            cells = [_fmt(t.values[kind][m][c.name], MISSING_MD) for c in t.conditions]
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def accuracy_latex(results: Results) -> str:
    """Two booktabs tables (macro, then micro accuracy in %), ready to ``\\input``."""
    t = accuracy_table(results)
    out = ["% replandscape accuracy table; needs \\usepackage{booktabs}"]
    for kind, caption in KINDS:
        out += [r"\begin{table}[t]", r"\centering",
                f"\\caption{{{_tex(caption)}}}",
                f"\\label{{tab:accuracy-{kind}}}",
                r"\begin{tabular}{l" + "r" * len(t.conditions) + "}", r"\toprule",
                "model & " + " & ".join(_tex(c.label) for c in t.conditions) + r" \\",
                r"\midrule"]
        for m in t.models:
            cells = [_fmt(t.values[kind][m][c.name], MISSING_TEX) for c in t.conditions]
            out.append(f"{_tex(m)} & " + " & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)
