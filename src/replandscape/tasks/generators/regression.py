"""In-context linear regression: pairs of one line y = a*x + b, then a query x.

``Examples:\\n3 -> 7\\n5 -> 11\\n9 -> 19\\n1 -> 3\\nQuery: 8 -> `` -> ``17`` (a = 2, b = 1).

The slope a and intercept b are drawn from a grid (``slopes`` x ``intercepts``): each cell is a
designed condition (``slope=2,intercept=1``). Integer x, a and b keep y an exact integer string,
scored by exact match (the generic scorers) and by absolute error against the true y
(:func:`absolute_error`, :func:`score_tolerance`). ``pattern``: the query x is one of the
examples' x, so copying that example's y (a shortcut) gives the answer; ``misleading``: the query
x is new, so only the function gives it. Spans: ``examples`` (the pairs) and ``query`` (the query x
and its arrow), character offsets into the item text.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from replandscape.tasks.base import Drawn, Label, TaskSpec, check, check_range
from replandscape.tasks.generators.reading import SPAN_PREFIX, PairHypothesis, format_span

if TYPE_CHECKING:
    import numpy as np

NAME = "regression"
_NUMBER = re.compile(r"\s*(-?\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class RegressionOptions:
    """Choices of the regression task.

    Attributes:
        slopes: The slopes a of the grid (each item draws one uniformly).
        intercepts: The intercepts b of the grid (each item draws one uniformly).
        x_range: The integer x values of examples and query (inclusive range).
        examples: Example pairs per item (inclusive range).
        tolerance: An answer within this absolute error of the true y counts as correct under
            the tolerance rule (:func:`score_tolerance`).
    """

    slopes: tuple[int, ...] = (-2, -1, 1, 2, 3)
    intercepts: tuple[int, ...] = (-5, 0, 5)
    x_range: tuple[int, int] = (0, 20)
    examples: tuple[int, int] = (4, 4)
    tolerance: int = 1

    def __post_init__(self) -> None:
        check(bool(self.slopes) and len(set(self.slopes)) == len(self.slopes), NAME, "slopes",
              "must be a non-empty list of distinct integers")
        check(bool(self.intercepts) and len(set(self.intercepts)) == len(self.intercepts), NAME,
              "intercepts", "must be a non-empty list of distinct integers")
        check_range(NAME, "examples", self.examples, minimum=1)
        check_range(NAME, "x_range", self.x_range)
        width = self.x_range[1] - self.x_range[0] + 1
        check(width > self.examples[1], NAME, "x_range",
              f"needs more than {self.examples[1]} values (distinct example x plus a new query x)")
        check(self.tolerance >= 0, NAME, "tolerance", "must be 0 or more")


def condition_name(slope: int, intercept: int) -> str:
    """The condition label of a (slope, intercept) cell."""
    return f"slope={slope},intercept={intercept}"


def draw(rng: random.Random, split: str, variant: str, opts: RegressionOptions) -> Drawn:
    a = rng.choice(opts.slopes)
    b = rng.choice(opts.intercepts)
    k = rng.randint(*opts.examples)
    values = list(range(opts.x_range[0], opts.x_range[1] + 1))
    xs = rng.sample(values, k)
    # pattern: the query repeats an example's x; misleading: a new x
    unseen = [v for v in values if v not in xs]
    x = rng.choice(xs if variant == "pattern" else unseen)
    pairs = "\n".join(f"{v} -> {a * v + b}" for v in xs)
    head = "Examples:\n"
    query = f"{x} ->"
    text = head + pairs + "\nQuery: " + query + " "
    y = a * x + b
    query_start = len(text) - len(query) - 1
    labels: dict[str, Label] = {
        "slope": a, "intercept": b, "condition": condition_name(a, b), "y": y, "x": x,
        "shortcut_holds": int(x in xs),
        SPAN_PREFIX + "examples": format_span(len(head), len(head) + len(pairs)),
        SPAN_PREFIX + "query": format_span(query_start, query_start + len(query)),
    }
    return Drawn(text=text, target=str(y), labels=labels)


def longest_answer(opts: RegressionOptions) -> int:
    return max(len(str(a * x + b)) for a in opts.slopes for b in opts.intercepts
               for x in range(opts.x_range[0], opts.x_range[1] + 1))


# --------------------------------------------------------------------------------------------
# scoring by absolute error
# --------------------------------------------------------------------------------------------


def parse_answer(continuation: str) -> float | None:
    """The number a continuation starts with (leading spaces skipped), or None."""
    match = _NUMBER.match(continuation)
    return float(match.group(1)) if match else None


def absolute_error(continuation: str, target: str) -> float | None:
    """``|answer - y|``, or None when the continuation does not start with a number."""
    answer = parse_answer(continuation)
    return None if answer is None else abs(answer - int(target))


def score_tolerance(continuation: str, target: str, tolerance: float | None = None) -> bool:
    """True when the answer lies within ``tolerance`` (default: the task's default option) of
    the true y; a continuation without a number is wrong."""
    limit = RegressionOptions().tolerance if tolerance is None else tolerance
    error = absolute_error(continuation, target)
    return error is not None and error <= limit


# --------------------------------------------------------------------------------------------
# hypotheses over conditions
# --------------------------------------------------------------------------------------------

#: Item-pair similarity predicted by each hypothesis (larger: more alike). ``near_slope`` is the
#: negated slope difference, so that every hypothesis is a similarity and alignment is a
#: positive correlation.
HYPOTHESES: dict[str, PairHypothesis] = {
    "same_slope": lambda a, b: float(a["slope"] == b["slope"]),
    "same_intercept": lambda a, b: float(a["intercept"] == b["intercept"]),
    "near_slope": lambda a, b: -abs(float(a["slope"]) - float(b["slope"])),
}


def hypotheses(labels: Sequence[Mapping[str, Label]], level: str = "condition"
               ) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """The task's hypothesis matrices over the conditions (or items) of ``labels``; see
    :func:`replandscape.tasks.generators.reading.hypotheses`."""
    from replandscape.metrics.rsa import hypothesis_matrices

    return hypothesis_matrices(HYPOTHESES, labels, level=level, task=NAME)


TASK = TaskSpec(
    name=NAME,
    header="Each block lists pairs x -> y of one function y = a*x + b. Give y for the query x. "
           "Here are some examples: \n",
    variants=("pattern", "misleading"),
    options_type=RegressionOptions,
    draw=draw,
    longest_answer=longest_answer,
    label_keys=("slope", "intercept", "condition", "y", "x", "shortcut_holds",
                SPAN_PREFIX + "examples", SPAN_PREFIX + "query"),
)
