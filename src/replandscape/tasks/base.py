"""What every implicit-pattern task shares: the item, the task description, the options.

A task is data: a :class:`TaskSpec` names its header, its variants, its options (a frozen
dataclass whose defaults are the documented choices) and a ``draw`` function that turns a seeded
random generator into one item. Everything else (splits, prompts, scoring) is generic.

An item's ``text`` is the item exactly as it stands in a prompt before its answer (the cue such as
``\\n The result is: `` included, the header excluded), so a solved shot is ``text + target +
separator`` and a query is ``text``: one rule for every task.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from replandscape.errors import UserError

VARIANTS = ("pattern", "misleading")

Label = str | int


@dataclass(frozen=True)
class Item:
    """One generated task item.

    Attributes:
        id: The item's row index in its split file (unique within the split).
        task: The task's name.
        variant: ``pattern`` (the shortcut decides the answer) or ``misleading``.
        text: The item as it stands in a prompt before its answer, without the header.
        target: The answer string the continuation is scored against.
        labels: Extra analysis labels (task specific, see the task's ``label_keys``).
    """

    id: int
    task: str
    variant: str
    text: str
    target: str
    labels: dict[str, Label] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "variant": self.variant, "text": self.text,
                "target": self.target, "labels": dict(self.labels)}


@dataclass(frozen=True)
class Drawn:
    """What a task's ``draw`` function returns: the item without its identity."""

    text: str
    target: str
    labels: dict[str, Label]


OptionsT = TypeVar("OptionsT")


@dataclass(frozen=True)
class TaskSpec(Generic[OptionsT]):
    """One task: its prompt data, its variants and its generator.

    Attributes:
        name: Registry name (``replandscape make-data --task NAME``).
        header: The prompt's first line(s), verbatim.
        variants: The variants the task has.
        options_type: Frozen dataclass of the task's choices; every field has a default.
        draw: ``draw(rng, split, variant, options) -> Drawn``; all randomness from ``rng``.
        longest_answer: Characters of the longest answer the options allow.
        label_keys: The keys every item's ``labels`` holds.
        separator: What follows a solved shot's answer.
    """

    name: str
    header: str
    variants: tuple[str, ...]
    options_type: type[OptionsT]
    draw: Callable[[random.Random, str, str, OptionsT], Drawn]
    longest_answer: Callable[[OptionsT], int]
    label_keys: tuple[str, ...]
    separator: str = "\n"

    def options(self, overrides: Mapping[str, object] | None = None) -> OptionsT:
        """The task's options: the defaults with ``overrides`` (field name -> value) applied."""
        return options_from_mapping(self.options_type, overrides or {}, task=self.name)

    def check_variant(self, variant: str, key: str = "--variant") -> str:
        if variant not in self.variants:
            raise UserError(f"task '{self.name}' has no variant '{variant}'", key=key,
                            fix=f"use one of {', '.join(self.variants)}")
        return variant

    def generate(self, split: str, variant: str, draw: int, seed: int,
                 options: OptionsT | None = None) -> Item:
        """Item number ``draw`` of (seed, split, variant): the same inputs give the same item."""
        self.check_variant(variant)
        opts = options if options is not None else self.options()
        # str seeds are hashed with SHA-512 by random.Random: stable across processes and runs
        rng = random.Random(f"{seed}:{self.name}:{split}:{variant}:{draw}")
        drawn = self.draw(rng, split, variant, opts)
        if set(drawn.labels) != set(self.label_keys):  # a generator bug, not a user error
            raise AssertionError(f"{self.name}: labels {sorted(drawn.labels)} != {self.label_keys}")
        return Item(id=draw, task=self.name, variant=variant, text=drawn.text,
                    target=drawn.target, labels=drawn.labels)

    def shot(self, item: Item) -> str:
        """A solved example: the item, its answer, the separator."""
        return item.text + item.target + self.separator

    def query(self, item: Item) -> str:
        """The item to be answered: its text, ending where the answer starts."""
        return item.text

    def training_text(self, item: Item) -> tuple[str, str]:
        """Fine-tuning sample (a single solved item, no header, no shots): prompt and answer."""
        return item.text, item.target

    def max_new_tokens(self, options: OptionsT | None = None) -> int:
        """Tokens to generate: the characters of the longest answer plus one. A token holds at
        least one character, and the extra one leaves room for a leading-space token."""
        return self.longest_answer(options if options is not None else self.options()) + 1

    @property
    def label_columns(self) -> tuple[str, ...]:
        """The per-item columns the analysis gets."""
        return ("target", "variant", *self.label_keys)


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------


def _coerce(value: object, default: object, task: str, name: str) -> object:
    """``value`` in the type of the field's default (YAML gives lists where tuples are meant)."""
    key = f"{task}.{name}"

    def bad(what: str) -> UserError:
        return UserError(f"option '{name}' of task '{task}' must be {what}, got {value!r}",
                         key=key, fix=f"e.g. --set {name}={_show(default)}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple):
            raise bad(f"a list like {_show(default)}")
        is_range = isinstance(default[0], int) and len(default) == 2
        if is_range and len(value) != 2:
            raise bad("a list of two integers [low, high]")
        element = default[0]
        return tuple(_coerce(v, element, task, name) for v in value)
    raise TypeError(f"unsupported option type for {key}")  # a task definition bug


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def options_from_mapping(options_type: type[OptionsT], overrides: Mapping[str, object], *,
                         task: str) -> OptionsT:
    """Build ``options_type`` from its defaults and ``overrides``, checking names and types."""
    fields = {f.name: f for f in dataclasses.fields(options_type)}  # type: ignore[arg-type]
    defaults = options_type()
    values: dict[str, object] = {}
    for name, value in overrides.items():
        if name not in fields:
            raise UserError(f"task '{task}' has no option '{name}'", key=f"{task}.{name}",
                            fix=f"use one of {', '.join(fields)}")
        values[name] = _coerce(value, getattr(defaults, name), task, name)
    return options_type(**values)


def check_range(task: str, name: str, pair: tuple[int, int], *, minimum: int | None = None,
                maximum: int | None = None) -> None:
    """Raise a user error unless ``pair`` is ``(low, high)`` with low <= high inside the bounds."""
    low, high = pair
    if low > high or (minimum is not None and low < minimum) or (
            maximum is not None and high > maximum):
        bounds = f" within [{minimum if minimum is not None else '...'}, " \
                 f"{maximum if maximum is not None else '...'}]"
        raise UserError(f"option '{name}' of task '{task}' is {list(pair)}: it must be "
                        f"[low, high] with low <= high{bounds}", key=f"{task}.{name}",
                        fix="give a valid range")


def check(condition: bool, task: str, name: str, message: str) -> None:
    """Raise a user error naming the option when ``condition`` is false."""
    if not condition:
        raise UserError(f"option '{name}' of task '{task}': {message}", key=f"{task}.{name}",
                        fix="change the option")


def signed_sum(terms: list[int]) -> str:
    """``[-10, -8, 4, 8]`` -> ``-10-8+4+8``: explicit signs, no leading ``+``."""
    out = str(terms[0])
    for t in terms[1:]:
        out += f"+{t}" if t >= 0 else f"-{-t}"
    return out
