"""Read-only views on :class:`~replandscape.results.Results` that the figures share."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from replandscape.errors import UserError
from replandscape.figures.style import TASK_ORDER, Condition, condition_of
from replandscape.results import Results


class FiguresWarning(UserWarning):
    """Something was drawn differently from what was asked (e.g. results split by parameters)."""


# The label columns of a run whose entry does not list them (the ARI and overlap keys).
MMLU_TASK = "mmlu"
DEFAULT_LABEL_COLUMNS = {MMLU_TASK: ("subject", "answer")}
GENERATED_LABEL_COLUMNS = ("target", "variant")


@dataclass(frozen=True)
class RunInfo:
    """One run of a results file: its model, task, condition and label columns, all read from
    its ``runs`` entry (never from its name)."""

    run: str
    model: str
    task: str
    condition: Condition
    label_columns: tuple[str, ...]
    info: Mapping[str, Any]

    @property
    def examples_seen(self) -> int | None:
        """Training examples the fine-tuned checkpoint had seen, where recorded."""
        value = self.info.get("examples_seen")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return int(value) if math.isfinite(value) and value >= 0 else None

    @property
    def is_generated(self) -> bool:
        """A generated task (pattern and misleading variants), not MMLU."""
        return self.task != MMLU_TASK


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key that orders numbers by value: ``llama-3-8b`` before ``llama-3-70b``."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text))


def _bad_field(results: Results, run: str, key: str, what: str) -> UserError:
    return UserError(f"run {run} has no {what} {key}", file=str(results.path or "results"),
                     key=f"runs.{run}.{key}",
                     fix="re-run the analysis stage with this version of replandscape")


def run_info(results: Results, run: str) -> RunInfo:
    """Model, task, condition and label columns of ``run`` from its ``runs`` entry.

    Raises:
        UserError: the entry lacks its model or task (a string), ``shots`` (an integer) or
            ``finetuned`` (a boolean): the run could not be placed without guessing from its name.
    """
    info = results.runs.get(run)
    if not isinstance(info, Mapping):
        raise UserError(f"run {run} is in the rows but not in runs", file=str(results.path or
                        "results"), key=f"runs.{run}", fix="re-run the analysis stage")
    for key in ("model", "task"):
        if not isinstance(info.get(key), str) or not info[key]:
            raise _bad_field(results, run, key, "string")
    shots = info.get("shots")
    if isinstance(shots, bool) or not isinstance(shots, int):
        raise _bad_field(results, run, "shots", "integer")
    if not isinstance(info.get("finetuned"), bool):
        raise _bad_field(results, run, "finetuned", "boolean")
    task = str(info["task"])
    columns = info.get("label_columns")
    if isinstance(columns, list) and columns and all(isinstance(c, str) for c in columns):
        labels = tuple(columns)
    else:
        labels = DEFAULT_LABEL_COLUMNS.get(task, GENERATED_LABEL_COLUMNS)
    return RunInfo(run, str(info["model"]), task, condition_of(info), labels, info)


def all_runs(results: Results) -> list[RunInfo]:
    """Every run of ``runs``, sorted by model, task, then condition.

    Rows of a run that has no ``runs`` entry cannot be placed (its model, task and condition are
    not known) and are left out (:func:`orphan_runs` names them).
    """
    infos = [run_info(results, n) for n in results.runs]
    return sorted(infos, key=lambda i: (natural_key(i.model), task_key(i.task),
                                        i.condition.sort_key, i.run))


def orphan_runs(results: Results) -> list[str]:
    """Runs that have rows but no ``runs`` entry: not drawn."""
    return sorted({r["run"] for r in results.rows} - set(results.runs))


def task_key(task: str) -> tuple[int, tuple[Any, ...]]:
    """Tasks in a fixed order: MMLU, the generated tasks as :data:`TASK_ORDER`, then by name."""
    return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), natural_key(task))


def models(results: Results | Sequence[RunInfo]) -> list[str]:
    """Model names in sorted order."""
    infos = all_runs(results) if isinstance(results, Results) else results
    return sorted({i.model for i in infos}, key=natural_key)


def tasks(results: Results | Sequence[RunInfo]) -> list[str]:
    """Task names in :func:`task_key` order."""
    infos = all_runs(results) if isinstance(results, Results) else results
    return sorted({i.task for i in infos}, key=task_key)


def label_columns(infos: Sequence[RunInfo]) -> list[str]:
    """The label columns of ``infos``, in the order the runs list them."""
    return list(dict.fromkeys(c for i in infos for c in i.label_columns))


def conditions(infos: Sequence[RunInfo]) -> list[Condition]:
    """Distinct conditions of ``infos``: shots ascending, then fine-tuned checkpoints."""
    seen: dict[tuple[Any, ...], Condition] = {}
    for i in infos:
        seen.setdefault(i.condition.key, i.condition)
    return sorted(seen.values(), key=lambda c: c.sort_key)


def number(value: Any) -> float:
    """A finite float, or NaN for a missing (None), non-numeric or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def metric(row: Mapping[str, Any], key: str) -> float:
    """``row[key]``, or ``row[a][b]`` for ``key = "a.b"`` (e.g. ``ari.subject``); NaN if missing."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return math.nan
        value = value.get(part)
    return number(value)


def series(results: Results, run: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Relative depth and ``key`` along the sites of ``run``, ordered by site.

    A site whose depth is missing is dropped; a missing value stays as NaN so the line shows a gap
    there instead of bridging it.
    """
    xs, ys = [], []
    for row in results.rows_for(run):
        x = number(row.get("relative_depth"))
        if math.isnan(x):
            continue
        xs.append(x)
        ys.append(metric(row, key))
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


# How a generated task's answer is scored: ``strict`` (the answer at the start of the output) or
# ``substring`` (anywhere in it). MMLU runs carry one rule, counted as strict.
SCORING_RULES = ("strict", "substring")


def accuracy_part(info: Mapping[str, Any], rule: str = "strict") -> Mapping[str, Any] | None:
    """The ``{"micro", "macro", "per_subject"}`` of a run's accuracy under ``rule``, or None.

    ``accuracy["scoring"]`` names the rule the top-level values used (strict when absent); the
    other rule, where stored, sits under ``accuracy[RULE]``.
    """
    if rule not in SCORING_RULES:
        raise ValueError(f"rule must be one of {SCORING_RULES}, not {rule!r}")
    acc = info.get("accuracy")
    if not isinstance(acc, Mapping):
        return None
    used = acc.get("scoring")
    if rule == (used if used in SCORING_RULES else "strict"):
        return acc
    other = acc.get(rule)
    return other if isinstance(other, Mapping) else None


def accuracy_value(info: Mapping[str, Any], rule: str = "strict", kind: str = "micro",
                   group: str | None = None) -> float:
    """Accuracy (a fraction) of a run under ``rule``: ``kind`` (micro or macro) over all items,
    or the accuracy within ``group`` (an MMLU subject, a task's variant); NaN when not stored."""
    part = accuracy_part(info, rule)
    if part is None:
        return math.nan
    if group is None:
        return number(part.get(kind))
    per = part.get("per_subject")
    return number(per.get(group)) if isinstance(per, Mapping) else math.nan


def variants(infos: Sequence[RunInfo]) -> list[str]:
    """The groups of the runs' accuracies (a generated task's variants): pattern, misleading,
    then any other in name order."""
    names: set[str] = set()
    for i in infos:
        part = accuracy_part(i.info, "strict") or accuracy_part(i.info, "substring") or {}
        per = part.get("per_subject")
        if isinstance(per, Mapping):
            names |= {str(k) for k in per}
    fixed = [v for v in ("pattern", "misleading") if v in names]
    return fixed + sorted(names - set(fixed), key=natural_key)
