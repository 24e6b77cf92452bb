"""Expression (a reducible term): ``(S)+(Z)*(C)=``.

Pattern: Z sums to 0, so the answer is the value of S whatever C is. Misleading: Z has a random
(by default non-zero) total, so the answer is S + Z*C and needs the whole computation. A sum is
written with explicit signs and no leading ``+``; a sum with a forced total is drawn as k-1 free
terms and a last term equal to the total minus the others (so that last term can leave the range).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from replandscape.tasks.base import Drawn, TaskSpec, check_range, signed_sum

NAME = "expression"


@dataclass(frozen=True)
class ExpressionOptions:
    """Choices of the expression task.

    Attributes:
        s_terms: Number of terms of S (inclusive range).
        s_range: Range of the magnitudes of S's terms; S is written so that its value is >= 0
            (with a negative value the magnitudes are put in descending order, and if that is
            still negative every sign is ``+``).
        z_terms: Number of terms of Z in the dev and test splits (the evaluation setting).
        z_range: Range of Z's free terms in the dev and test splits.
        train_z_terms: Number of terms of Z in the train split (the fine-tuning setting).
        train_z_range: Range of Z's free terms in the train split.
        c_terms: Number of terms of C.
        c_range: Range of C's terms (C's total is whatever they add up to).
        misleading_z_nonzero: In the misleading variant, redraw Z while its total is 0, so no
            misleading item is a pattern item in disguise.
    """

    s_terms: tuple[int, int] = (1, 2)
    s_range: tuple[int, int] = (0, 10)
    z_terms: tuple[int, int] = (2, 4)
    z_range: tuple[int, int] = (-20, 20)
    train_z_terms: tuple[int, int] = (1, 3)
    train_z_range: tuple[int, int] = (-10, 10)
    c_terms: tuple[int, int] = (4, 4)
    c_range: tuple[int, int] = (-10, 10)
    misleading_z_nonzero: bool = True

    def __post_init__(self) -> None:
        check_range(NAME, "s_terms", self.s_terms, minimum=1)
        check_range(NAME, "s_range", self.s_range, minimum=0)
        check_range(NAME, "z_terms", self.z_terms, minimum=1)
        check_range(NAME, "z_range", self.z_range)
        check_range(NAME, "train_z_terms", self.train_z_terms, minimum=1)
        check_range(NAME, "train_z_range", self.train_z_range)
        check_range(NAME, "c_terms", self.c_terms, minimum=1)
        check_range(NAME, "c_range", self.c_range)


def _s_terms(rng: random.Random, opts: ExpressionOptions) -> list[int]:
    k = rng.randint(*opts.s_terms)
    magnitudes = [rng.randint(*opts.s_range) for _ in range(k)]
    signs = [1] + [rng.choice((1, -1)) for _ in range(k - 1)]
    terms = [s * m for s, m in zip(signs, magnitudes)]
    if sum(terms) < 0:
        terms = [s * m for s, m in zip(signs, sorted(magnitudes, reverse=True))]
    if sum(terms) < 0:
        terms = magnitudes
    return terms


def _z_setting(split: str, opts: ExpressionOptions) -> tuple[tuple[int, int], tuple[int, int]]:
    if split == "train":
        return opts.train_z_terms, opts.train_z_range
    return opts.z_terms, opts.z_range


def draw(rng: random.Random, split: str, variant: str, opts: ExpressionOptions) -> Drawn:
    s = _s_terms(rng, opts)
    z_terms, z_range = _z_setting(split, opts)
    k = rng.randint(*z_terms)
    z = [rng.randint(*z_range) for _ in range(k - 1)]
    if variant == "pattern":
        z.append(-sum(z))
    else:
        z.append(rng.randint(*z_range))
        # a bounded redraw: with a one-term Z of range [0, 0] a non-zero total cannot exist
        for _ in range(100):
            if sum(z) != 0 or not opts.misleading_z_nonzero:
                break
            z = [rng.randint(*z_range) for _ in range(k)]
    c = [rng.randint(*opts.c_range) for _ in range(rng.randint(*opts.c_terms))]
    s_value, z_value, c_value = sum(s), sum(z), sum(c)
    answer = s_value + z_value * c_value
    text = f"({signed_sum(s)})+({signed_sum(z)})*({signed_sum(c)})="
    return Drawn(text=text, target=str(answer),
                 labels={"s_value": s_value, "z_value": z_value, "c_value": c_value,
                         "shortcut_holds": int(answer == s_value)})


def longest_answer(opts: ExpressionOptions) -> int:
    def widest(r: tuple[int, int]) -> int:
        return max(abs(r[0]), abs(r[1]))

    s_max = opts.s_terms[1] * widest(opts.s_range)
    # a pattern Z totals 0; a misleading Z is k free terms, so |Z| <= k * widest
    z_max = max(terms[1] * widest(z_range)
                for terms, z_range in ((opts.z_terms, opts.z_range),
                                       (opts.train_z_terms, opts.train_z_range)))
    c_max = opts.c_terms[1] * widest(opts.c_range)
    return len(str(-(s_max + z_max * c_max)))


TASK = TaskSpec(
    name=NAME,
    header="Now you need to calculate the answer of some mathematic equations. "
           "Here are some examples: \n",
    variants=("pattern", "misleading"),
    options_type=ExpressionOptions,
    draw=draw,
    longest_answer=longest_answer,
    label_keys=("s_value", "z_value", "c_value", "shortcut_holds"),
)
