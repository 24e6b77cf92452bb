"""The evaluation set of a run, whatever its task: one record per prompt the model sees.

MMLU (docs/method.md §2) is scored from the logits of the answer letters; a generated task (§7) is
scored on the text the model generates. Both give :class:`EvalRecord` rows with the same fields, so
extraction, fine-tuning and analysis need no branch on the task beyond :func:`is_generated`:

- ``group``: what accuracy is broken down by (the subject, or the variant),
- ``answer``: the choice index for MMLU, -1 for generated tasks,
- ``target``: the answer as text (the letter for MMLU),
- ``labels``: the label columns the geometry analysis compares clusters with
  (:func:`label_columns`: subject and answer for MMLU; target and variant for generated tasks).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replandscape.config import BUILTIN_PREFIX, ExperimentConfig
from replandscape.errors import UserError

MMLU = "mmlu"
BUILTIN_TASK = BUILTIN_PREFIX + "task"
MMLU_LABELS = ("subject", "answer")
TASK_LABELS = ("target", "variant")


@dataclass(frozen=True)
class EvalRecord:
    """One prompt of the evaluation set and what it is scored against."""

    id: int
    group: str
    prompt: str
    answer: int
    target: str
    labels: dict[str, str] = field(default_factory=dict)
    # generated tasks: every label the item carries (stored as label.KEY columns), and its named
    # spans as character ranges of the prompt (the item is the prompt's last part)
    item_labels: dict[str, str] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)


def is_generated(cfg: ExperimentConfig) -> bool:
    """Whether the run's task is answered by generation (every task but MMLU)."""
    return cfg.task.name != MMLU


def label_columns(cfg: ExperimentConfig) -> tuple[str, ...]:
    return TASK_LABELS if is_generated(cfg) else MMLU_LABELS


def task_folder(cfg: ExperimentConfig) -> Path:
    """The folder of a generated task's splits: ``data.source``, or for ``builtin:task`` the
    splits generated once into the cache from (task, run.seed, sizes)."""
    from replandscape.tasks.data import MANIFEST, is_task_folder, make_task_data

    source = cfg.data.source
    if source == BUILTIN_TASK:
        from replandscape.data import cache_root

        t = cfg.task
        key = f"{t.name}-s{cfg.run.seed}-n{t.n_test}-{t.n_dev}-{t.n_train}-v1"
        folder = cache_root() / "data" / f"task-{key}"
        if not (folder / MANIFEST).is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"task-{t.name}.", dir=folder.parent))
            try:
                make_task_data(tmp / "d", t.name, n=t.n_test, seed=cfg.run.seed, n_dev=t.n_dev,
                               n_train=t.n_train)
                os.replace(tmp / "d", folder)
            except OSError:  # made concurrently by another rank or job
                pass
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return folder
    folder = Path(source)
    if not folder.is_dir() or not is_task_folder(folder):
        raise UserError(f"'{source}' is not a folder of '{cfg.task.name}' splits",
                        file=cfg.source_file or None, key="data.source",
                        fix=f"write one with 'replandscape make-data DIR --task {cfg.task.name}' "
                            "or use builtin:task")
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            made_for = json.loads(manifest.read_text()).get("task")
        except (OSError, ValueError, AttributeError):
            made_for = None
        if made_for not in (None, cfg.task.name):
            raise UserError(f"the folder holds task '{made_for}', the config asks for "
                            f"'{cfg.task.name}'", file=str(folder), key="task.name",
                            fix="point data.source at the task's own folder")
    return folder


def task_items(cfg: ExperimentConfig, split: str) -> list[Any]:
    """The items of a generated task's split, of the variants the run evaluates."""
    from replandscape.tasks.data import load_task_split

    items = load_task_split(task_folder(cfg), split)
    wrong = [i for i in items if i.task != cfg.task.name]
    if wrong:
        raise UserError(f"split '{split}' holds items of task '{wrong[0].task}'",
                        file=str(task_folder(cfg)), key="task.name",
                        fix="point data.source at the task's own folder")
    return [i for i in items if i.variant in cfg.task.variants]


def eval_records(cfg: ExperimentConfig, shots: int) -> list[EvalRecord]:
    """The prompts of the evaluation split at ``shots`` shots, in a fixed order."""
    if not is_generated(cfg):
        from replandscape.data import load_split, select_eval_questions, shots_by_subject
        from replandscape.prompts import LETTERS, build_prompts

        questions = select_eval_questions(load_split(cfg.data, cfg.data.eval_split), cfg.data,
                                          cfg.run.seed)
        pool = shots_by_subject(load_split(cfg.data, cfg.data.shot_split)) if shots else {}
        return [EvalRecord(r.id, r.subject, r.prompt, r.answer, LETTERS[r.answer],
                           {"subject": r.subject, "answer": str(r.answer)})
                for r in build_prompts(questions, pool, shots, cfg.prompts.seed)]
    from replandscape.tasks.prompts import build_task_prompts, shot_pool

    items = task_items(cfg, cfg.data.eval_split)
    if cfg.data.limit is not None:
        items = items[: cfg.data.limit]
    if not items:
        raise UserError(f"no '{cfg.data.eval_split}' items of the variants "
                        f"{', '.join(cfg.task.variants)}", file=str(task_folder(cfg)),
                        key="task.variants", fix="check the task folder and task.variants")
    task_pool = shot_pool(task_items(cfg, cfg.data.shot_split)) if shots else {}
    from replandscape.tasks import get_task

    spec = get_task(cfg.task.name, key="task.name")
    out = []
    for item, r in zip(items, build_task_prompts(items, task_pool, shots, cfg.prompts.seed)):
        base = len(r.prompt) - len(spec.query(item))
        labels, spans = {}, {}
        for key, value in item.labels.items():
            if key.startswith("span_"):
                if isinstance(value, str) and ":" in value:
                    a, b = (int(v) for v in value.split(":"))
                    spans[key[len("span_"):]] = (base + a, base + b)
            else:
                labels[key] = str(value)
        out.append(EvalRecord(r.id, r.variant, r.prompt, -1, r.target,
                              {"target": r.target, "variant": r.variant}, labels, spans))
    return out


def records_digest(records: Sequence[EvalRecord]) -> str:
    """sha256 of every prompt and target, in order: a change of any template field, shot, item
    or option changes it, so it belongs in the identity of an extraction."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.id}\x1f{r.group}\x1f{r.target}\x1f{r.prompt}\x1e".encode())
    return h.hexdigest()


def max_new_tokens(cfg: ExperimentConfig) -> int:
    """Tokens to generate per prompt: ``task.max_new_tokens``, else the task's own default."""
    if cfg.task.max_new_tokens is not None:
        return cfg.task.max_new_tokens
    from replandscape.tasks import get_task

    return int(get_task(cfg.task.name, key="task.name").max_new_tokens())


def check_task_against_data(cfg: ExperimentConfig) -> int:
    """Checks of a generated task's config against its splits; returns the points per site."""
    from replandscape.tasks.prompts import shot_pool

    records = eval_records(cfg, 0)
    need = max(cfg.prompts.shots)
    if need:
        pool = shot_pool(task_items(cfg, cfg.data.shot_split))
        for variant in cfg.task.variants:
            have = len(pool.get((cfg.task.name, variant), ()))
            if have < need:
                raise UserError(f"{need} shots asked but the '{cfg.data.shot_split}' pool of "
                                f"{cfg.task.name}/{variant} holds {have} items",
                                file=cfg.source_file or None, key="prompts.shots",
                                fix=f"use at most {have} shots or a larger pool (task.n_dev)")
    if cfg.analysis.maxk >= len(records):
        raise UserError(f"maxk={cfg.analysis.maxk} but the analysis sees {len(records)} points",
                        file=cfg.source_file or None, key="analysis.maxk",
                        fix=f"set analysis.maxk below {len(records)} or use more items")
    return len(records)
