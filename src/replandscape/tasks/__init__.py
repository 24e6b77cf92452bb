"""Generated tasks: the implicit-pattern tasks (expression, relation, boolean, algebra, code, parity)
and the tasks with designed conditions for RSA and probes (regression, reading).

Each task has a ``pattern`` variant (a hidden shortcut decides the answer) and a ``misleading``
one (the surface looks alike but the shortcut does not decide). A task is data: one module in
:mod:`replandscape.tasks.generators` defining a :class:`TaskSpec`; splits, prompts and scoring are
generic. Pure Python (no torch), so data can be made and inspected anywhere.
"""

from __future__ import annotations

from replandscape.tasks.base import VARIANTS, Drawn, Item, TaskSpec
from replandscape.tasks.data import (
    DEFAULT_N_DEV,
    DEFAULT_N_TEST,
    DEFAULT_N_TRAIN,
    SPLITS,
    generate_task_splits,
    is_task_folder,
    load_task_split,
    make_task_data,
)
from replandscape.tasks.prompts import (
    TaskPromptRecord,
    build_task_prompt,
    build_task_prompts,
    choose_shots,
    shot_pool,
)
from replandscape.tasks.registry import TASK_NAMES, TASKS, get_task
from replandscape.tasks.scoring import SCORERS, score, score_all, score_strict, score_substring

__all__ = [
    "DEFAULT_N_DEV", "DEFAULT_N_TEST", "DEFAULT_N_TRAIN", "SCORERS", "SPLITS", "TASKS",
    "TASK_NAMES", "VARIANTS", "Drawn", "Item", "TaskPromptRecord", "TaskSpec",
    "build_task_prompt", "build_task_prompts", "choose_shots", "generate_task_splits",
    "get_task", "is_task_folder", "load_task_split", "make_task_data", "score", "score_all",
    "score_strict", "score_substring", "shot_pool",
]
