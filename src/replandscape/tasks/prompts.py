"""k-shot prompts of the generated tasks.

A prompt is the task's header, k solved shots of the same task and variant from the shot pool
(the dev split), then the query. The shots are the first k of a permutation of the pool drawn from
(seed, task, variant, item id) alone: any worker builds the same text, and the shots of a k-shot
prompt are the first shots of the 2k-shot prompt of the same item, so accuracy curves over k are
paired item by item. A pool item whose text equals the query's is never its shot.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from replandscape.errors import UserError
from replandscape.tasks.base import Item, Label
from replandscape.tasks.registry import get_task

PoolKey = tuple[str, str]


def shot_pool(items: Iterable[Item]) -> dict[PoolKey, list[Item]]:
    """Shot candidates by (task, variant), in id order."""
    pool: dict[PoolKey, list[Item]] = defaultdict(list)
    for item in sorted(items, key=lambda i: i.id):
        pool[(item.task, item.variant)].append(item)
    return dict(pool)


def shot_order(seed: int, item: Item, pool_size: int) -> list[int]:
    """A permutation of the pool's positions, fixed by (seed, task, variant, item id)."""
    order = list(range(pool_size))
    random.Random(f"{seed}:{item.task}:{item.variant}:{item.id}").shuffle(order)
    return order


def choose_shots(item: Item, pool: Mapping[PoolKey, Sequence[Item]], k: int,
                 seed: int) -> list[Item]:
    """The k shots of ``item``, in prompt order."""
    if k < 0:
        raise UserError(f"{k} shots is negative", key="--shots", fix="use 0 or more shots")
    if k == 0:
        return []
    candidates = [s for s in pool.get((item.task, item.variant), ()) if s.text != item.text]
    if len(candidates) < k:
        raise UserError(f"task '{item.task}' variant '{item.variant}' has {len(candidates)} "
                        f"shot items in its pool but {k} shots were asked", key="--shots",
                        fix=f"use at most {len(candidates)} shots, or a larger pool "
                            "(make-data --n-dev)")
    order = shot_order(seed, item, len(candidates))
    return [candidates[i] for i in order[:k]]


def build_task_prompt(item: Item, pool: Mapping[PoolKey, Sequence[Item]], k: int,
                      seed: int) -> str:
    """Header + k shots (task's shot format) + query."""
    spec = get_task(item.task, key="task")
    shots = choose_shots(item, pool, k, seed)
    return spec.header + "".join(spec.shot(s) for s in shots) + spec.query(item)


@dataclass(frozen=True)
class TaskPromptRecord:
    """What the model sees for one item and what it is scored against."""

    id: int
    task: str
    variant: str
    prompt: str
    target: str
    labels: dict[str, Label] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "task": self.task, "variant": self.variant, "prompt": self.prompt,
                "target": self.target, "labels": dict(self.labels)}


def build_task_prompts(items: Iterable[Item], pool: Mapping[PoolKey, Sequence[Item]], k: int,
                       seed: int) -> list[TaskPromptRecord]:
    return [TaskPromptRecord(item.id, item.task, item.variant,
                             build_task_prompt(item, pool, k, seed), item.target,
                             dict(item.labels))
            for item in items]
