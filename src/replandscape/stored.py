"""Readers of the state a run stores in its output folder, each checked against a small schema.

A file in an output folder may be damaged (a disk that filled up, a copy cut short, a hand edit),
and a later stage or a resumed run would otherwise fail deep inside with a ``KeyError`` or a
``JSONDecodeError``. Each reader here parses one kind of file, checks its required keys and their
types, and raises a one-line :class:`~replandscape.errors.UserError` naming the file and the fix.

Nothing here unpickles: stored state is JSON, ``.npz`` (read with ``allow_pickle=False``) or
safetensors, so opening an output folder never runs code found in it.

Kinds:

* ``finetune/checkpoints.json``: the index of saved checkpoints, LoRA adapters or whole models
  (:func:`read_checkpoint_index`).
* ``finetune/result.json``: the fine-tuning result (:func:`read_finetune_result`).
* ``finetune/ds/resume.json``: the pointer to the DeepSpeed resume checkpoint
  (:func:`read_resume_record`).
* ``finetune/train_log.jsonl``: one JSON object per optimiser step (:func:`read_train_log`).
* ``adapter-*/adapter_model.safetensors``: checked whole before a load (:func:`check_adapter_dir`);
  ``checkpoint-*/`` (full fine-tuning) likewise (:func:`check_model_dir`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replandscape.errors import UserError

__all__ = [
    "AdapterCheckpoint",
    "CheckpointIndex",
    "ResumeRecord",
    "check_adapter_dir",
    "check_model_dir",
    "check_safetensors",
    "read_checkpoint_index",
    "read_finetune_result",
    "read_resume_record",
    "read_train_log",
]

# A type of a schema entry: a JSON value must be an instance of one of these. ``bool`` is never
# accepted for ``int``/``float`` (JSON true is not a step count).
_NONE = type(None)
Schema = Mapping[str, type | tuple[type, ...]]

FIX_FINETUNE = ("delete the finetune folder and re-run the finetune stage "
                "(replandscape run finetune CONFIG)")
FIX_RESUME = "delete the finetune/ds folder: the run then starts over from step 0"

INDEX_SCHEMA: Schema = {"adapters": list}
INDEX_OPTIONAL: Schema = {"config_hash": str, "stage_hash": str, "total_steps": int}
ADAPTER_SCHEMA: Schema = {"name": str, "step": int, "path": str}
# an entry without kind is a LoRA adapter (indexes written before full fine-tuning existed)
ADAPTER_OPTIONAL: Schema = {"kind": str, "examples_seen": (int, _NONE)}
CHECKPOINT_KINDS = ("lora", "full")
RESULT_SCHEMA: Schema = {
    "output_dir": str, "adapter_dir": str, "config_hash": str,
    "total_steps": int, "train_samples": int, "train_subjects": int, "effective_batch": int,
    "world_size": int, "zero_stage": int, "final_loss": (float, _NONE), "train_tokens": int,
    "train_seconds": float, "val_accuracy": (float, _NONE), "val_history": list,
    "test_accuracy": (float, _NONE), "test_questions": int, "test_per_subject": dict,
    "checkpoints": list}
# written by every run since they were introduced; a result without them is simply not reused
RESULT_OPTIONAL: Schema = {"resumed_from_step": (int, _NONE), "stage_hash": str,
                           "method": str, "loss": str, "train_tasks": list,
                           "task_accuracy": (dict, _NONE), "task_history": list}
TASK_SCORE_SCHEMA: Schema = {"strict": float, "substring": float, "n": int}
RESUME_SCHEMA: Schema = {"tag": str, "step": int, "stage_hash": str, "world_size": int}
LOG_SCHEMA: Schema = {"step": int}


@dataclass(frozen=True)
class AdapterCheckpoint:
    """One saved checkpoint: its folder name, the optimiser step it holds, where it was saved,
    its kind (``lora``: a PEFT adapter folder; ``full``: a whole model saved with
    ``save_pretrained``, loadable as a model path) and the training examples seen by then
    (step x effective batch; None in indexes written before it was recorded)."""

    name: str
    step: int
    path: str
    kind: str = "lora"
    examples_seen: int | None = None


@dataclass(frozen=True)
class CheckpointIndex:
    """``finetune/checkpoints.json``: the adapters saved so far (log-spaced steps, then final).
    The hashes and step count are empty/0 in an index written before they were recorded."""

    config_hash: str
    stage_hash: str
    total_steps: int
    adapters: tuple[AdapterCheckpoint, ...]


@dataclass(frozen=True)
class ResumeRecord:
    """``finetune/ds/resume.json``: which DeepSpeed checkpoint a resumed run loads."""

    tag: str
    step: int
    stage_hash: str
    world_size: int


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", _NONE: "null", bool: "true/false"}
    items = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in items)


def _is(value: Any, types: type | tuple[type, ...]) -> bool:
    items = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in items
    if isinstance(value, int) and float in items:
        return True  # JSON writes 2.0 as 2 in some writers
    return isinstance(value, items)


def check_schema(data: Any, schema: Schema, path: Path, what: str, fix: str,
                 where: str = "", optional: Schema | None = None) -> dict[str, Any]:
    """Return ``data`` if it is an object with every key of ``schema`` (and any key of
    ``optional`` it has) of its type; else raise one line naming ``path``, the key (``where``
    prefixes it) and ``fix``."""
    if not isinstance(data, dict):
        raise UserError(f"{what} holds {json.dumps(data)[:40]}, not a JSON object",
                        file=str(path), key=where or None, fix=fix)
    for key, types in {**(optional or {}), **schema}.items():
        name = f"{where}.{key}" if where else key
        if key not in data:
            if key in schema:
                raise UserError(f"missing from {what}", file=str(path), key=name, fix=fix)
            continue
        if not _is(data[key], types):
            raise UserError(f"is {json.dumps(data[key])[:40]} in {what}, expected "
                            f"{_type_name(types)}", file=str(path), key=name, fix=fix)
    return data


def _load_json(path: Path, what: str, fix: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} is missing", file=str(path), fix=fix) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} cannot be read ({exc})", file=str(path), fix=fix) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                        f"{exc.colno})", file=str(path), fix=fix) from None


def _checkpoint_entry(entry: Any, path: Path, what: str, where: str) -> AdapterCheckpoint:
    row = check_schema(entry, ADAPTER_SCHEMA, path, what, FIX_FINETUNE, where,
                       optional=ADAPTER_OPTIONAL)
    kind = row.get("kind", "lora")
    if kind not in CHECKPOINT_KINDS:
        raise UserError(f"is {json.dumps(kind)[:40]} in {what}, expected one of "
                        f"{', '.join(CHECKPOINT_KINDS)}", file=str(path), key=f"{where}.kind",
                        fix=FIX_FINETUNE)
    return AdapterCheckpoint(name=row["name"], step=row["step"], path=row["path"], kind=kind,
                             examples_seen=row.get("examples_seen"))


def read_checkpoint_index(path: str | Path) -> CheckpointIndex:
    """Read ``finetune/checkpoints.json`` (the adapter index that extraction of fine-tuned
    conditions and ``ls`` read).

    Raises:
        UserError: The file is missing, is not JSON, or lacks a key or has one of another type.
    """
    path = Path(path)
    what = "the fine-tuning checkpoint index"
    data = check_schema(_load_json(path, what, FIX_FINETUNE), INDEX_SCHEMA, path, what,
                        FIX_FINETUNE, optional=INDEX_OPTIONAL)
    adapters = [_checkpoint_entry(entry, path, what, f"adapters[{i}]")
                for i, entry in enumerate(data["adapters"])]
    return CheckpointIndex(config_hash=data.get("config_hash", ""),
                           stage_hash=data.get("stage_hash", ""),
                           total_steps=data.get("total_steps", 0), adapters=tuple(adapters))


def read_finetune_result(path: str | Path) -> dict[str, Any]:
    """Read ``finetune/result.json`` checked against the result schema (the caller builds its
    ``FinetuneResult`` from the returned object).

    Raises:
        UserError: The file is missing, is not JSON, or does not have the result's shape.
    """
    path = Path(path)
    what = "the fine-tuning result"
    data = check_schema(_load_json(path, what, FIX_FINETUNE), RESULT_SCHEMA, path, what,
                        FIX_FINETUNE, optional=RESULT_OPTIONAL)
    for i, item in enumerate(data["val_history"]):
        if not (isinstance(item, list) and len(item) == 2 and _is(item[0], int)
                and _is(item[1], float)):
            raise UserError(f"is {json.dumps(item)[:40]} in {what}, expected [step, accuracy]",
                            file=str(path), key=f"val_history[{i}]",
                            fix=FIX_FINETUNE)
    for i, entry in enumerate(data["checkpoints"]):
        _checkpoint_entry(entry, path, what, f"checkpoints[{i}]")
    for subject, acc in data["test_per_subject"].items():
        if not _is(acc, float):
            raise UserError(f"is not a number in {what}",
                            file=str(path), key=f"test_per_subject.{subject}", fix=FIX_FINETUNE)
    if data.get("task_accuracy") is not None:
        _check_task_accuracy(data["task_accuracy"], path, what, "task_accuracy")
    for i, item in enumerate(data.get("task_history", [])):
        where = f"task_history[{i}]"
        check_schema(item, {"step": int, "task_accuracy": dict}, path, what, FIX_FINETUNE, where)
        _check_task_accuracy(item["task_accuracy"], path, what, f"{where}.task_accuracy")
    return data


def _check_task_accuracy(data: dict[str, Any], path: Path, what: str, where: str) -> None:
    """``{task: {variant: {"strict": acc, "substring": acc, "n": n}}}``."""
    for task, variants in data.items():
        if not isinstance(variants, dict):
            raise UserError(f"is {json.dumps(variants)[:40]} in {what}, expected an object of "
                            "variants", file=str(path), key=f"{where}.{task}", fix=FIX_FINETUNE)
        for variant, scores in variants.items():
            check_schema(scores, TASK_SCORE_SCHEMA, path, what, FIX_FINETUNE,
                         f"{where}.{task}.{variant}")


def read_resume_record(path: str | Path) -> ResumeRecord:
    """Read ``finetune/ds/resume.json``, the pointer to the DeepSpeed checkpoint to resume from.

    Raises:
        UserError: The file is missing, is not JSON, or does not have the record's shape.
    """
    path = Path(path)
    what = "the fine-tuning resume record"
    data = check_schema(_load_json(path, what, FIX_RESUME), RESUME_SCHEMA, path, what, FIX_RESUME)
    if "/" in data["tag"] or data["tag"] in ("", ".", ".."):
        raise UserError(f"{data['tag']!r} in {what} is not a checkpoint folder name",
                        file=str(path), key="tag", fix=FIX_RESUME)
    return ResumeRecord(tag=data["tag"], step=data["step"], stage_hash=data["stage_hash"],
                        world_size=data["world_size"])


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """Read ``finetune/train_log.jsonl``: one object with an integer ``step`` per line.

    A missing file is an empty log. The last line may be cut by a kill (the log is appended to
    line by line) and is then dropped; a damaged line before it means the file was altered.

    Raises:
        UserError: A line other than the last is not a JSON object with an integer step.
    """
    path = Path(path)
    if not path.is_file():
        return []
    fix = f"delete {path.name} (it is only a log) or restore it"
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8",
                                                                errors="replace").splitlines(), 1)
             if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if k == len(lines) - 1:
                break  # the line a kill cut short
            raise UserError(f"line {n} of the training log is not JSON ({exc.msg})",
                            file=str(path), key=f"line {n}", fix=fix) from None
        rows.append(check_schema(row, LOG_SCHEMA, path, f"line {n} of the training log", fix))
    return rows


def check_safetensors(path: str | Path, fix: str) -> None:
    """Check that a ``.safetensors`` file is whole: its header parses and the file is exactly as
    long as the tensors the header lists (a copy cut short fails here, not inside a load).

    Raises:
        UserError: The file is missing, its header is damaged, or it is shorter or longer than
            its header says.
    """
    path = Path(path)
    what = "the safetensors file"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError(f"{what} is truncated ({size} bytes, no header)", file=str(path),
                                fix=fix)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise UserError(f"{what} is truncated (header of {n} bytes, file of {size})",
                                file=str(path), fix=fix)
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise UserError(f"{what} is missing", file=str(path), fix=fix) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} has a damaged header ({exc})", file=str(path), fix=fix) from None
    if not isinstance(header, dict):
        raise UserError(f"{what} has a damaged header", file=str(path), fix=fix)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise UserError(f"{what} has a damaged header (tensor {name})", file=str(path),
                            fix=fix)
        end = max(end, offsets[1])
    if size != 8 + n + end:
        state = "truncated" if size < 8 + n + end else "longer than its header says"
        raise UserError(f"{what} is {state} ({size} bytes, its header needs {8 + n + end})",
                        file=str(path), fix=fix)


def check_adapter_dir(folder: str | Path, fix: str = FIX_FINETUNE) -> Path:
    """Check a saved LoRA adapter folder before it is loaded: ``adapter_config.json`` is a JSON
    object and ``adapter_model.safetensors`` is whole. Returns the folder.

    Raises:
        UserError: Either file is missing or damaged (one line naming it and ``fix``).
    """
    folder = Path(folder)
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise UserError("not a LoRA adapter folder (no adapter_config.json)", file=str(folder),
                        fix=fix)
    data = _load_json(config, "the adapter config", fix)
    if not isinstance(data, dict):
        raise UserError("the adapter config is not a JSON object", file=str(config), fix=fix)
    check_safetensors(folder / "adapter_model.safetensors", fix)
    return folder


def check_model_dir(folder: str | Path, fix: str = FIX_FINETUNE) -> Path:
    """Check a whole-model checkpoint folder (full fine-tuning) before it is loaded:
    ``config.json`` is a JSON object and every safetensors file of the weights is whole (one
    ``model.safetensors``, or the shards a ``model.safetensors.index.json`` lists). Returns the
    folder.

    Raises:
        UserError: The config, the index or a weights file is missing or damaged.
    """
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise UserError("not a model checkpoint folder (no config.json)", file=str(folder),
                        fix=fix)
    if not isinstance(_load_json(config, "the model config", fix), dict):
        raise UserError("the model config is not a JSON object", file=str(config), fix=fix)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = _load_json(index, "the weights index", fix)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and "/" not in v for v in weight_map.values()):
            raise UserError("the weights index has no valid weight_map", file=str(index), fix=fix)
        for shard in sorted(set(weight_map.values())):
            check_safetensors(folder / shard, fix)
    else:
        check_safetensors(folder / "model.safetensors", fix)
    return folder
