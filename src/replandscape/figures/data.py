"""Read-only views on :class:`~replandscape.results.Results` that the figures share."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from replandscape.figures.style import Condition, condition_of
from replandscape.results import Results


class FiguresWarning(UserWarning):
    """Something was drawn differently from what was asked (e.g. results split by parameters)."""


@dataclass(frozen=True)
class RunInfo:
    """One run of a results file: its model and condition."""

    run: str
    model: str
    condition: Condition
    info: Mapping[str, Any]


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key that orders numbers by value: ``llama-3-8b`` before ``llama-3-70b``."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text))


def run_info(results: Results, run: str) -> RunInfo:
    """Model and condition of ``run``, falling back to its name ``MODEL/CONDITION``."""
    info = results.runs.get(run, {})
    model_from_name, _, cond_from_name = run.rpartition("/")
    model = info.get("model") or model_from_name or run
    cond_name = info.get("condition") or cond_from_name or run
    return RunInfo(run, str(model), condition_of(str(cond_name), info), info)


def all_runs(results: Results) -> list[RunInfo]:
    """Every run named in ``runs`` or in ``rows``, sorted by model then condition."""
    names = set(results.runs) | {r["run"] for r in results.rows}
    infos = [run_info(results, n) for n in names]
    return sorted(infos, key=lambda i: (natural_key(i.model), i.condition.sort_key, i.run))


def models(results: Results) -> list[str]:
    """Model names in sorted order."""
    return sorted({i.model for i in all_runs(results)}, key=natural_key)


def conditions(infos: list[RunInfo]) -> list[Condition]:
    """Distinct conditions of ``infos``: shots ascending, then fine-tuned checkpoints."""
    seen: dict[str, Condition] = {}
    for i in infos:
        seen.setdefault(i.condition.name, i.condition)
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
