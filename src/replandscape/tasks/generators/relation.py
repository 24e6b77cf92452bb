"""Relation (graph connectivity): is city A connected with city Z?

A has one edge to a random city c; a chain runs through all the other cities in a shuffled order,
so A reaches every one of them. Pattern: with probability ``true_probability`` the edge (c, Z) is
added and the answer is ``True``, else Z never appears and the answer is ``False``: the answer is
True exactly when Z is mentioned. Misleading: Z always appears; one chain edge is removed, which
splits the cities into A's part and a cut-off part, and Z hangs on a city of A's part (answer
``True``) or of the cut-off part (``False``). Each edge is a line ``X is connected with Y``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from replandscape.tasks.base import Drawn, TaskSpec, check

NAME = "relation"
QUESTION = "\n\n So 'the city A and Z is connected' is "


@dataclass(frozen=True)
class RelationOptions:
    """Choices of the relation task.

    Attributes:
        cities: The chain's cities, one letter each (A and Z are the question's own).
        true_probability: Probability of the answer ``True`` in both variants.
        shuffle_edges: List the edges in a random order (else A's edge, the chain in order, then
            Z's edge).
    """

    cities: str = "BCDEFGHIJ"
    true_probability: float = 0.5
    shuffle_edges: bool = True

    def __post_init__(self) -> None:
        check(len(self.cities) >= 2 and len(set(self.cities)) == len(self.cities)
              and self.cities.isalpha() and not set(self.cities) & {"A", "Z"}, NAME, "cities",
              "must be at least two distinct letters other than A and Z")
        check(0.0 <= self.true_probability <= 1.0, NAME, "true_probability",
              "must lie in [0, 1]")


def draw(rng: random.Random, split: str, variant: str, opts: RelationOptions) -> Drawn:
    order = list(opts.cities)
    rng.shuffle(order)
    c = rng.choice(order)
    chain = [(order[i], order[i + 1]) for i in range(len(order) - 1)]
    connected = rng.random() < opts.true_probability
    if variant == "pattern":
        edges = [("A", c), *chain] + ([(c, "Z")] if connected else [])
        side = "a" if connected else "none"
    else:
        # a cut-off part of one city would have no edge and vanish from the text
        cuts = [i for i in range(len(chain))
                if len(order[i + 1:] if c in order[: i + 1] else order[: i + 1]) >= 2]
        cut = rng.choice(cuts or list(range(len(chain))))
        left, right = order[: cut + 1], order[cut + 1:]
        a_part, cut_off = (left, right) if c in left else (right, left)
        host = rng.choice(a_part if connected else cut_off)
        edges = [("A", c), *chain[:cut], *chain[cut + 1:], (host, "Z")]
        side = "a" if connected else "cut"
    if opts.shuffle_edges:
        rng.shuffle(edges)
    body = "\n".join(f"{x} is connected with {y}" for x, y in edges)
    z_present = int(any("Z" in edge for edge in edges))
    target = "True" if connected else "False"
    return Drawn(text=body + QUESTION, target=target,
                 labels={"z_present": z_present, "z_side": side,
                         "shortcut_holds": int(bool(z_present) == connected)})


def longest_answer(opts: RelationOptions) -> int:
    return len("False")


TASK = TaskSpec(
    name=NAME,
    header="Here are some cities expressed as A, B, C, etc. I will show some connection relations, "
           "and you need to tell me if city A and city Z are connected (Answer True or False). "
           "Here are some examples: \n",
    variants=("pattern", "misleading"),
    options_type=RelationOptions,
    draw=draw,
    longest_answer=longest_answer,
    label_keys=("z_present", "z_side", "shortcut_holds"),
)
