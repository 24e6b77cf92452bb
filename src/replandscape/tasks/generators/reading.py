"""Reading comprehension with a distractor: a short story, a question about it.

``Story: It was a rainy day. Mia put the key in the garden. Leo put the cup in the attic.``
``\\n Question: Who put the key in the garden?\\n The answer is: `` -> ``Mia``.

The relevant sentence names a person, an object and a place; the question asks for one of them
(``who``, ``where`` or ``what``). In the ``misleading`` variant a distractor sentence about someone
else (another person, another object, another place) stands before or after the relevant one; the
``pattern`` variant has no distractor, so the story's only person, object and place answer the
question. The designed conditions are question type x distractor present (``who,distractor=1``
...), recorded in the labels with the spans the span analyses read (character offsets into the
item text, ``"start:end"``; an absent span is ``""``).

The module also holds the span-label helpers shared by the generated tasks with named spans
(:func:`format_span`, :func:`parse_span`, :func:`item_spans`) and the task's hypotheses over
conditions (:data:`HYPOTHESES`, :func:`hypotheses`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from replandscape.tasks.base import Drawn, Item, Label, TaskSpec, check

if TYPE_CHECKING:
    import numpy as np

NAME = "reading"
CUE = "\n The answer is: "
SPAN_PREFIX = "span_"
QUESTION_TYPES = ("who", "where", "what")
NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Lia", "Dan",
         "Amy", "Kai", "Ada", "Eli", "Ana", "Jon", "Uma", "Rex")
OBJECTS = ("key", "book", "cup", "ball", "hat", "pen", "lamp", "coin", "map", "box")
PLACES = ("kitchen", "garden", "garage", "office", "library", "bedroom", "attic", "cellar",
          "hall", "shed")
WEATHER = ("rainy", "sunny", "cold", "windy", "quiet", "warm")
POSITIONS = ("random", "before", "after")


# --------------------------------------------------------------------------------------------
# span labels (shared by every generated task with named spans)
# --------------------------------------------------------------------------------------------


def format_span(start: int, end: int) -> str:
    """The label value of the span ``text[start:end]``: ``"start:end"``."""
    return f"{start}:{end}"


def parse_span(value: Label) -> tuple[int, int] | None:
    """``"start:end"`` -> ``(start, end)``; ``""`` (the span is absent from this item) -> None.

    Raises:
        ValueError: The value is not a span label.
    """
    if value == "":
        return None
    if not isinstance(value, str) or value.count(":") != 1:
        raise ValueError(f"not a span label: {value!r}")
    start, end = (int(v) for v in value.split(":"))
    if not 0 <= start <= end:
        raise ValueError(f"not a span label: {value!r}")
    return start, end


def item_spans(item: Item) -> dict[str, tuple[int, int]]:
    """The named spans an item has (``span_NAME`` labels), by name; absent spans left out."""
    out: dict[str, tuple[int, int]] = {}
    for key, value in item.labels.items():
        if key.startswith(SPAN_PREFIX):
            span = parse_span(value)
            if span is not None:
                out[key[len(SPAN_PREFIX):]] = span
    return out


def _span(text: str, part: str, start_at: int = 0) -> str:
    """The span label of the first ``part`` in ``text`` at or after ``start_at``."""
    start = text.index(part, start_at)
    return format_span(start, start + len(part))


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadingOptions:
    """Choices of the reading task.

    Attributes:
        names: The people; an item's person and its distractor's person differ.
        objects: The objects; the distractor's object differs from the relevant one.
        places: The places; the distractor's place differs from the relevant one.
        question_types: The question types drawn (uniformly): ``who`` (answer: the person),
            ``where`` (the place), ``what`` (the object).
        distractor_position: Misleading variant: the distractor sentence comes ``before`` or
            ``after`` the relevant one, or either with probability 1/2 (``random``).
        scene: Open the story with a sentence about the weather that names nobody.
    """

    names: tuple[str, ...] = NAMES
    objects: tuple[str, ...] = OBJECTS
    places: tuple[str, ...] = PLACES
    question_types: tuple[str, ...] = QUESTION_TYPES
    distractor_position: str = "random"
    scene: bool = True

    def __post_init__(self) -> None:
        for field_name in ("names", "objects", "places"):
            values = getattr(self, field_name)
            check(len(set(values)) >= 2 and all(v and v.strip() == v and " " not in v
                                                 for v in values),
                  NAME, field_name, "needs at least two different single words")
        check(bool(self.question_types) and set(self.question_types) <= set(QUESTION_TYPES)
              and len(set(self.question_types)) == len(self.question_types), NAME,
              "question_types", f"must be distinct values among {', '.join(QUESTION_TYPES)}")
        check(self.distractor_position in POSITIONS, NAME, "distractor_position",
              f"must be one of {', '.join(POSITIONS)}")


def condition_name(question_type: str, distractor: int) -> str:
    """The condition label of a (question type, distractor present) cell."""
    return f"{question_type},distractor={distractor}"


def draw(rng: random.Random, split: str, variant: str, opts: ReadingOptions) -> Drawn:
    name, other = rng.sample(list(dict.fromkeys(opts.names)), 2)
    obj, obj2 = rng.sample(list(dict.fromkeys(opts.objects)), 2)
    place, place2 = rng.sample(list(dict.fromkeys(opts.places)), 2)
    question_type = rng.choice(opts.question_types)
    distractor = int(variant == "misleading")
    relevant = f"{name} put the {obj} in the {place}."
    sentences = [relevant]
    distracting = f"{other} put the {obj2} in the {place2}."
    if distractor:
        position = opts.distractor_position
        if position == "random":
            position = rng.choice(("before", "after"))
        sentences = [distracting, relevant] if position == "before" else [relevant, distracting]
    if opts.scene:
        sentences.insert(0, f"It was a {rng.choice(WEATHER)} day.")
    question, answer = {
        "who": (f"Who put the {obj} in the {place}?", name),
        "where": (f"Where did {name} put the {obj}?", place),
        "what": (f"What did {name} put in the {place}?", obj),
    }[question_type]
    story = "Story: " + " ".join(sentences)
    text = story + "\n Question: " + question + CUE
    labels: dict[str, Label] = {
        "question_type": question_type, "distractor": distractor, "answer": answer,
        "name": name, "condition": condition_name(question_type, distractor),
        SPAN_PREFIX + "relevant": _span(text, relevant),
        SPAN_PREFIX + "distractor": _span(text, distracting) if distractor else "",
        SPAN_PREFIX + "question": _span(text, question, len(story)),
    }
    return Drawn(text=text, target=answer, labels=labels)


def longest_answer(opts: ReadingOptions) -> int:
    pools = {"who": opts.names, "where": opts.places, "what": opts.objects}
    return max(len(v) for q in opts.question_types for v in pools[q])


# --------------------------------------------------------------------------------------------
# hypotheses over conditions
# --------------------------------------------------------------------------------------------

PairHypothesis = Callable[[Mapping[str, Label], Mapping[str, Label]], float]

#: Item-pair similarity predicted by each hypothesis (1: alike, 0: unlike). Over conditions, the
#: hypothesis matrix holds the mean over the item pairs of the two conditions
#: (:func:`replandscape.metrics.rsa.hypothesis_matrices`).
HYPOTHESES: dict[str, PairHypothesis] = {
    "same_answer": lambda a, b: float(a["answer"] == b["answer"]),
    "same_name": lambda a, b: float(a["name"] == b["name"]),
    "same_question_type": lambda a, b: float(a["question_type"] == b["question_type"]),
}


def hypotheses(labels: Sequence[Mapping[str, Label]], level: str = "condition"
               ) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """The task's hypothesis matrices over the conditions (or items) of ``labels``.

    Args:
        labels: The labels of the analysed items, in row order.
        level: ``condition`` (a matrix over the sorted condition labels) or ``item``.

    Returns:
        The row names (conditions, or item positions as strings) and each hypothesis's
        symmetric matrix.
    """
    from replandscape.metrics.rsa import hypothesis_matrices

    return hypothesis_matrices(HYPOTHESES, labels, level=level, task=NAME)


TASK = TaskSpec(
    name=NAME,
    header="Read each story and answer the question about it with one word. Here are some "
           "examples: \n",
    variants=("pattern", "misleading"),
    options_type=ReadingOptions,
    draw=draw,
    longest_answer=longest_answer,
    label_keys=("question_type", "distractor", "answer", "name", "condition",
                SPAN_PREFIX + "relevant", SPAN_PREFIX + "distractor", SPAN_PREFIX + "question"),
)
