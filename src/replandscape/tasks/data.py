"""Task data folders: writing the splits of a generated task and loading them back, checked.

A task folder holds ``test.jsonl`` (the fixed evaluation items, ``n`` per variant), ``dev.jsonl``
(the shot pool) and ``train.jsonl`` (fine-tuning items), one JSON object a line with ``id``,
``task``, ``variant``, ``text``, ``target`` and ``labels``, plus ``task.json`` (what made them:
task, seed, sizes, options). An item's id is its row index in its split. The splits share no item
text: test is drawn first, dev skips test texts, train skips both, and duplicates within a split
are skipped, all deterministically, so the test set does not change when train or dev sizes do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from replandscape.errors import UserError
from replandscape.tasks.base import Item, TaskSpec
from replandscape.tasks.registry import TASKS, get_task

SPLITS = ("test", "dev", "train")
DEFAULT_N_TEST = 200
DEFAULT_N_DEV = 64
DEFAULT_N_TRAIN = 1000
# a split gives up after this many draws in a row that add nothing new (the item space is spent)
DRAW_PATIENCE = 2000
MANIFEST = "task.json"
FORMAT_VERSION = 1
_SIZE_FLAGS = {"test": "--n", "dev": "--n-dev", "train": "--n-train"}


def _draw_distinct(spec: TaskSpec[Any], split: str, variant: str, n: int, seed: int,
                   options: Any, taken: set[str]) -> list[Item]:
    """Up to ``n`` items of (split, variant) whose texts are not in ``taken`` (which grows)."""
    items: list[Item] = []
    misses = 0
    draw = 0
    cap = 100 * n + 10 * DRAW_PATIENCE
    while len(items) < n and misses < DRAW_PATIENCE and draw < cap:
        item = spec.generate(split, variant, draw, seed, options)
        draw += 1
        if item.text in taken:
            misses += 1
            continue
        misses = 0
        taken.add(item.text)
        items.append(item)
    return items


def generate_task_splits(task: str, n: int = DEFAULT_N_TEST, seed: int = 0,
                         options: Any = None, *, n_dev: int = DEFAULT_N_DEV,
                         n_train: int = DEFAULT_N_TRAIN,
                         variants: Sequence[str] | None = None) -> dict[str, list[Item]]:
    """The items of every split (``n``, ``n_dev``, ``n_train`` per variant), ids assigned.

    Raises:
        UserError: A size is negative, a variant is unknown, or fewer distinct items exist than
            asked (the message gives the largest size that can be made).
    """
    spec = get_task(task)
    opts = options if options is not None else spec.options()
    chosen = tuple(variants if variants else spec.variants)
    for variant in chosen:
        spec.check_variant(variant)
    if len(set(chosen)) != len(chosen):
        raise UserError("a variant is named twice", key="--variant", fix="name each variant once")
    sizes = {"test": n, "dev": n_dev, "train": n_train}
    for split, size in sizes.items():
        if size < 0 or (split == "test" and size == 0):
            raise UserError(f"{split} size {size} is not allowed", key=_SIZE_FLAGS[split],
                            fix="use a positive number" if split == "test" else "use 0 or more")
    taken: set[str] = set()
    out: dict[str, list[Item]] = {}
    for split in SPLITS:
        made = {v: _draw_distinct(spec, split, v, sizes[split], seed, opts, taken) for v in chosen}
        short = {v: len(items) for v, items in made.items() if len(items) < sizes[split]}
        if short:
            largest = min(short.values())
            others = "" if split == "test" else " besides the items of the splits drawn before it"
            raise UserError(f"task '{task}' can make only {largest} distinct {split} items per "
                            f"variant{others} ({sizes[split]} asked; variant(s) "
                            f"{', '.join(short)})", key=_SIZE_FLAGS[split],
                            fix=f"use {_SIZE_FLAGS[split]} {largest} or less, or widen the "
                                "task's options with --set")
        rows = [item for v in chosen for item in made[v]]
        out[split] = [dataclasses.replace(item, id=i) for i, item in enumerate(rows)]
    return out


def _jsonl(items: Iterable[Item]) -> str:
    return "".join(json.dumps(item.to_json()) + "\n" for item in items)


def make_task_data(folder: str | os.PathLike[str], task: str, n: int = DEFAULT_N_TEST,
                   seed: int = 0, options: Any = None, *, n_dev: int = DEFAULT_N_DEV,
                   n_train: int = DEFAULT_N_TRAIN,
                   variants: Sequence[str] | None = None) -> Path:
    """Write the splits of ``task`` to ``folder``; nothing is written unless all of them can be.

    The files are written to a temporary folder beside ``folder`` and then moved into place, so
    a failure leaves ``folder`` as it was (absent, if it was).
    """
    folder = Path(folder)
    spec = get_task(task)
    opts = options if options is not None else spec.options()
    splits = generate_task_splits(task, n, seed, opts, n_dev=n_dev, n_train=n_train,
                                  variants=variants)
    manifest = {
        "format_version": FORMAT_VERSION, "task": task, "seed": seed,
        "variants": sorted({item.variant for item in splits["test"]},
                           key=spec.variants.index),
        "sizes_per_variant": {"test": n, "dev": n_dev, "train": n_train},
        "options": dataclasses.asdict(opts), "header": spec.header,
        "max_new_tokens": spec.max_new_tokens(opts), "label_columns": list(spec.label_columns),
    }
    if folder.exists() and not folder.is_dir():
        raise UserError("exists and is not a folder", file=str(folder), fix="choose another DIR")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise UserError(f"cannot write the task folder ({exc.strerror})", file=str(folder),
                        fix="choose a writable DIR") from None
    try:
        for split, items in splits.items():
            (tmp / f"{split}.jsonl").write_text(_jsonl(items))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if folder.exists():
            for path in sorted(tmp.iterdir()):
                os.replace(path, folder / path.name)
        else:
            os.replace(tmp, folder)
    except OSError as exc:
        raise UserError(f"cannot write the task folder ({exc.strerror})", file=str(folder),
                        fix="choose a writable DIR with free space") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

_FIELDS: dict[str, type] = {"id": int, "task": str, "variant": str, "text": str, "target": str}


def split_path(folder: str | os.PathLike[str], split: str) -> Path:
    return Path(folder) / f"{split}.jsonl"


def is_task_folder(folder: str | os.PathLike[str]) -> bool:
    """A folder made by :func:`make_task_data` (or shaped like one): it has a ``task.json`` or a
    split file whose first line has ``task``, ``text`` and ``target``."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if (folder / MANIFEST).is_file():
        return True
    for split in SPLITS:
        path = split_path(folder, split)
        if not path.is_file():
            continue
        with open(path) as fh:
            first = next((line for line in fh if line.strip()), "")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and {"task", "text", "target"} <= set(row):
            return True
    return False


def _item(row: object, path: Path, line: int) -> Item:
    where = f"line {line}"
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object", file=str(path), fix="one object a line")
    for name, kind in _FIELDS.items():
        if name not in row:
            raise UserError(f"{where} lacks the field '{name}'", file=str(path), key=name,
                            fix="give id, task, variant, text and target on every line")
        value = row[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: '{name}' is {type(value).__name__}, expected "
                            f"{kind.__name__}", file=str(path), key=name,
                            fix=f"make '{name}' a {kind.__name__}")
    labels = row.get("labels", {})
    if not isinstance(labels, dict) or not all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in labels.values()):
        raise UserError(f"{where}: 'labels' must map names to strings or integers",
                        file=str(path), key="labels", fix="fix or drop the labels")
    spec = TASKS.get(row["task"])
    if spec is None:
        raise UserError(f"{where}: unknown task '{row['task']}'", file=str(path), key="task",
                        fix=f"use one of {', '.join(TASKS)}")
    if row["variant"] not in spec.variants:
        raise UserError(f"{where}: task '{spec.name}' has no variant '{row['variant']}'",
                        file=str(path), key="variant", fix=f"use one of {', '.join(spec.variants)}")
    return Item(id=row["id"], task=row["task"], variant=row["variant"], text=row["text"],
                target=row["target"], labels=dict(labels))


def load_task_split(folder: str | os.PathLike[str], split: str) -> list[Item]:
    """The items of one split, every line checked (JSON, fields, types, known task and variant,
    unique ids).

    Raises:
        UserError: Naming the file and the line number.
    """
    path = split_path(folder, split)
    if not path.is_file():
        raise UserError(f"no '{split}' split", file=str(path),
                        fix="make the folder with replandscape make-data DIR --task NAME, or "
                            "choose another split")
    items: list[Item] = []
    seen: dict[int, int] = {}
    with open(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"line {number} is not valid JSON ({exc.msg})", file=str(path),
                                fix="one JSON object a line") from None
            item = _item(row, path, number)
            if item.id in seen:
                raise UserError(f"line {number}: id {item.id} already used on line "
                                f"{seen[item.id]}", file=str(path), key="id",
                                fix="give every item its own id")
            seen[item.id] = number
            items.append(item)
    if not items:
        raise UserError(f"the '{split}' split is empty", file=str(path), fix="regenerate it")
    return items
