"""Algebra (linear equations in a and b): three equations, the value of a given, b asked.

Two independent equations with small positive integer coefficients, then a third. Pattern: the
third is a linear combination of the first two with coefficients in ``multipliers`` (it adds
nothing). Misleading: the third has freshly drawn coefficients (consistent with the same solution)
and is neither such a combination nor a multiple of either of the first two. Draws whose first two
equations are collinear are rejected (small coefficients would otherwise make the system singular
now and then). The text ends ``\\n The solutions are: a = A, b = `` and the scored answer is b.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from replandscape.errors import UserError
from replandscape.tasks.base import Drawn, TaskSpec, check, check_range

NAME = "algebra"


@dataclass(frozen=True)
class AlgebraOptions:
    """Choices of the algebra task.

    Attributes:
        values: Range of the unknowns a and b.
        coefficients: Range of the coefficients of the independent equations.
        multipliers: Range of the coefficients of the pattern's linear combination.
        write_unit_coefficient: Write a coefficient 1 as ``1a`` (else ``a``).
    """

    values: tuple[int, int] = (1, 5)
    coefficients: tuple[int, int] = (1, 4)
    multipliers: tuple[int, int] = (1, 3)
    write_unit_coefficient: bool = False

    def __post_init__(self) -> None:
        check_range(NAME, "values", self.values)
        check_range(NAME, "coefficients", self.coefficients, minimum=1)
        # one coefficient value makes every pair of equations collinear
        check(self.coefficients[0] < self.coefficients[1], NAME, "coefficients",
              "needs at least two values")
        check_range(NAME, "multipliers", self.multipliers, minimum=1)


Row = tuple[int, int]


def _term(coefficient: int, name: str, opts: AlgebraOptions) -> str:
    if coefficient == 1 and not opts.write_unit_coefficient:
        return name
    return f"{coefficient}{name}"


def equation(p: int, q: int, a: int, b: int, opts: AlgebraOptions) -> str:
    """``p a + q b = r`` written like ``2a + 4b = 10``."""
    return f"{_term(p, 'a', opts)} + {_term(q, 'b', opts)} = {p * a + q * b}"


def _collinear(u: Row, v: Row) -> bool:
    return u[0] * v[1] == u[1] * v[0]


def _is_combination(w: Row, u: Row, v: Row, opts: AlgebraOptions) -> bool:
    lo, hi = opts.multipliers
    return any((m * u[0] + n * v[0], m * u[1] + n * v[1]) == w
               for m in range(lo, hi + 1) for n in range(lo, hi + 1))


def _row(rng: random.Random, opts: AlgebraOptions) -> Row:
    return rng.randint(*opts.coefficients), rng.randint(*opts.coefficients)


def _rows(rng: random.Random, variant: str, opts: AlgebraOptions) -> tuple[Row, Row, Row] | None:
    u, v = _row(rng, opts), _row(rng, opts)
    if _collinear(u, v):
        return None
    if variant == "pattern":
        m, n = rng.randint(*opts.multipliers), rng.randint(*opts.multipliers)
        return u, v, (m * u[0] + n * v[0], m * u[1] + n * v[1])
    w = _row(rng, opts)
    if _collinear(w, u) or _collinear(w, v) or _is_combination(w, u, v, opts):
        return None
    return u, v, w


def draw(rng: random.Random, split: str, variant: str, opts: AlgebraOptions) -> Drawn:
    a, b = rng.randint(*opts.values), rng.randint(*opts.values)
    for _ in range(1000):  # rejection of collinear (or, misleading, dependent-looking) draws
        rows = _rows(rng, variant, opts)
        if rows is not None:
            break
    else:
        raise UserError(f"the options of task '{NAME}' allow no {variant} system of three "
                        f"equations", key=f"{NAME}.coefficients",
                        fix="widen the coefficients range")
    assert rows is not None
    u, v, w = rows
    lines = [equation(*row, a, b, opts) for row in (u, v, w)]
    text = "\n".join(lines) + f"\n The solutions are: a = {a}, b = "
    return Drawn(text=text, target=str(b),
                 labels={"a": a, "third_is_combination": int(_is_combination(w, u, v, opts))})


def longest_answer(opts: AlgebraOptions) -> int:
    return max(len(str(opts.values[0])), len(str(opts.values[1])))


TASK = TaskSpec(
    name=NAME,
    header="Here are some equations, you need to find all solutions of given variables. "
           "Here are some examples: \n",
    variants=("pattern", "misleading"),
    options_type=AlgebraOptions,
    draw=draw,
    longest_answer=longest_answer,
    label_keys=("a", "third_is_combination"),
)
