"""Boolean expressions: three parenthesised groups of literals, then a tail.

Each group is a chain of ``True``/``False`` literals joined by ``and``/``or``; the groups are
joined by ``and``/``or``; the whole is wrapped in parentheses and followed by a tail. Pattern: the
tail is ``and False`` (answer False) or ``or True`` (answer True), which decides the value alone.
Misleading: the tail is ``or False`` or ``and True``, which looks alike and decides nothing. The
gold answer is Python's own evaluation of the generated expression (only literals, ``and``,
``or`` and parentheses, generated here, are ever evaluated).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from replandscape.tasks.base import Drawn, TaskSpec, check, check_range

NAME = "boolean"
CUE = "\n The result is: "
NEUTRAL_TAILS = ("or False", "and True")


@dataclass(frozen=True)
class BooleanOptions:
    """Choices of the boolean task.

    Attributes:
        groups: Number of parenthesised groups.
        literals: Number of literals per group (inclusive range).
        true_probability: Probability of the answer ``True`` (the pattern's tail is ``or True``
            with this probability; in the misleading variant see ``balance_misleading``).
        balance_misleading: In the misleading variant, draw the answer first and redraw the
            groups until they give it (at most 100 draws), so misleading answers are balanced
            like the pattern's; otherwise they are whatever the groups evaluate to.
    """

    groups: int = 3
    literals: tuple[int, int] = (2, 4)
    true_probability: float = 0.5
    balance_misleading: bool = True

    def __post_init__(self) -> None:
        check(self.groups >= 1, NAME, "groups", "must be at least 1")
        check_range(NAME, "literals", self.literals, minimum=1)
        check(0.0 <= self.true_probability <= 1.0, NAME, "true_probability",
              "must lie in [0, 1]")


def evaluate(expression: str) -> bool:
    """Python's value of a generated boolean expression (no names, no builtins reachable)."""
    return bool(eval(compile(expression, "<boolean task>", "eval"), {"__builtins__": {}}, {}))


def _inner(rng: random.Random, opts: BooleanOptions) -> str:
    groups = []
    for _ in range(opts.groups):
        k = rng.randint(*opts.literals)
        words = [rng.choice(("True", "False"))]
        for _ in range(k - 1):
            words += [rng.choice(("and", "or")), rng.choice(("True", "False"))]
        groups.append("(" + " ".join(words) + ")")
    joined = groups[0]
    for group in groups[1:]:
        joined += f" {rng.choice(('and', 'or'))} {group}"
    return joined


def draw(rng: random.Random, split: str, variant: str, opts: BooleanOptions) -> Drawn:
    want = rng.random() < opts.true_probability
    inner = _inner(rng, opts)
    if variant == "pattern":
        tail = "or True" if want else "and False"
    else:
        tail = rng.choice(NEUTRAL_TAILS)
        if opts.balance_misleading:
            for _ in range(100):
                if evaluate(inner) == want:
                    break
                inner = _inner(rng, opts)
    expression = f"({inner}) {tail}"
    value = evaluate(expression)
    shortcut = tail.endswith("True")  # what the tail's literal says, read as if it decided
    return Drawn(text=expression + CUE, target=str(value),
                 labels={"tail": tail, "inner_value": str(evaluate(inner)),
                         "shortcut_holds": int(shortcut == value)})


def longest_answer(opts: BooleanOptions) -> int:
    return len("False")


TASK = TaskSpec(
    name=NAME,
    header="Here are some boolean expressions, you need to directly tell me the result. If it is "
           "true, print True, else print False. Here are some examples: \n",
    variants=("pattern", "misleading"),
    options_type=BooleanOptions,
    draw=draw,
    longest_answer=longest_answer,
    label_keys=("tail", "inner_value", "shortcut_holds"),
)
