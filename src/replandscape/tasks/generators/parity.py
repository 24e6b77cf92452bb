"""Parity, in its coin-flip form: is the coin still heads up after the actions?

``A coin is heads up. Mia flips the coin. Leo flips the coin. ... Is the coin still heads up?``
The answer is ``yes`` when the number of flips is even. Pattern: every action is a flip, so the
answer is the parity of the number of sentences. Misleading: some actions are
``NAME does not flip the coin.``, so the sentence count no longer decides; the answer needs the
count of the flips alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from replandscape.tasks.base import Drawn, TaskSpec, check, check_range

NAME = "parity"
CUE = "\n The answer is: "
NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Lia", "Dan",
         "Amy", "Kai", "Ada", "Eli", "Ana", "Jon", "Uma", "Rex")


@dataclass(frozen=True)
class ParityOptions:
    """Choices of the parity task.

    Attributes:
        actions: Number of action sentences (inclusive range).
        names: The people who act; each item draws its actors from this list.
        distinct_names: Every actor of an item is a different person (needs at least as many
            names as the largest number of actions).
        non_flip_probability: Misleading variant: the probability that an action is
            ``NAME does not flip the coin.``
        min_non_flips: Misleading variant: at least this many actions are not flips (at least 1,
            so every misleading item differs from a pattern item).
    """

    actions: tuple[int, int] = (3, 9)
    names: tuple[str, ...] = NAMES
    distinct_names: bool = True
    non_flip_probability: float = 0.5
    min_non_flips: int = 1

    def __post_init__(self) -> None:
        check_range(NAME, "actions", self.actions, minimum=1)
        check(bool(self.names) and all(n.strip() == n and n for n in self.names), NAME, "names",
              "must be a non-empty list of names")
        check(not self.distinct_names or len(set(self.names)) >= self.actions[1], NAME, "names",
              f"distinct_names needs at least {self.actions[1]} different names")
        check(0.0 <= self.non_flip_probability <= 1.0, NAME, "non_flip_probability",
              "must lie in [0, 1]")
        check(1 <= self.min_non_flips <= self.actions[0], NAME, "min_non_flips",
              f"must lie in [1, {self.actions[0]}] (the fewest actions)")


def draw(rng: random.Random, split: str, variant: str, opts: ParityOptions) -> Drawn:
    k = rng.randint(*opts.actions)
    if opts.distinct_names:
        people = rng.sample(sorted(set(opts.names), key=opts.names.index), k)
    else:
        people = [rng.choice(opts.names) for _ in range(k)]
    flips = [True] * k
    if variant == "misleading":
        flips = [rng.random() >= opts.non_flip_probability for _ in range(k)]
        missing = opts.min_non_flips - flips.count(False)
        if missing > 0:
            for i in rng.sample([i for i, f in enumerate(flips) if f], missing):
                flips[i] = False
    sentences = [f"{p} flips the coin." if f else f"{p} does not flip the coin."
                 for p, f in zip(people, flips)]
    n_flips = sum(flips)
    target = "yes" if n_flips % 2 == 0 else "no"
    shortcut = "yes" if k % 2 == 0 else "no"
    text = "A coin is heads up. " + " ".join(sentences) + " Is the coin still heads up?" + CUE
    return Drawn(text=text, target=target,
                 labels={"flips": n_flips, "actions": k, "shortcut_holds": int(shortcut == target)})


def longest_answer(opts: ParityOptions) -> int:
    return len("yes")


TASK = TaskSpec(
    name=NAME,
    header="Here are some stories about a coin, you need to tell me if the coin is still heads up "
           "(Answer yes or no). Here are some examples: \n",
    variants=("pattern", "misleading"),
    options_type=ParityOptions,
    draw=draw,
    longest_answer=longest_answer,
    label_keys=("flips", "actions", "shortcut_holds"),
)
