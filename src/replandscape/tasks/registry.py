"""The task registry: every module of :mod:`replandscape.tasks.generators` that defines ``TASK``."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from replandscape.errors import UserError
from replandscape.tasks import generators
from replandscape.tasks.base import TaskSpec


def _discover() -> dict[str, TaskSpec[Any]]:
    found: dict[str, TaskSpec[Any]] = {}
    for module_info in sorted(pkgutil.iter_modules(generators.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{generators.__name__}.{module_info.name}")
        spec = getattr(module, "TASK", None)
        if isinstance(spec, TaskSpec):
            if spec.name in found:  # two modules claiming one name is a programming error
                raise RuntimeError(f"task name '{spec.name}' defined twice")
            found[spec.name] = spec
    return found


TASKS: dict[str, TaskSpec[Any]] = _discover()
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str, key: str = "--task") -> TaskSpec[Any]:
    """The task called ``name``; a user error listing the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task '{name}'", key=key,
                        fix=f"use one of {', '.join(TASK_NAMES)}") from None
