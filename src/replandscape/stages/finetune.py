"""Fine-tuning under DeepSpeed ZeRO, LoRA or full-parameter (docs/method.md §4 and §7.6): the
SFT condition.

MMLU (the default task): a training sample is the bare question block followed by `` {letter}``;
with ``finetune.loss: answer`` the loss is the cross-entropy of the answer-letter token alone
(every other position is labelled -100), weighted by the inverse frequency of the sample's subject.
Training data are the config's train splits (MMLU ``dev`` + ``validation``), balanced per subject,
never the evaluation split.

A generated task (``task.name`` not ``mmlu``): a sample is one solved item without header or shots
(``text + answer``, :meth:`TaskSpec.training_text`), ``finetune.samples_per_task`` items from the
``train`` split of each task of ``finetune.tasks`` (default: the run's own task), mixed in a
seeded order. The fine-tuned model is scored at 0 shots by greedy generation on the test split of
every task of the mixture, of ``finetune.eval_tasks`` and of the run's own task, both variants,
strict and substring.

Shared runs: with a mixture (``finetune.tasks``) the training data do not depend on the run's own
task, so a sweep's task experiments on one mixture fine-tune once. The sweep points them at one
folder (``finetune.output_dir``) and sets ``finetune.eval_tasks`` to every task of its axis; with
both set, the stage hash keys the run by the task section without its name plus the set of
scored tasks, so those experiments share one identity. Each reads its own task's accuracy from
``task_accuracy`` (``test_accuracy`` is the task of the experiment that trained).

``finetune.method: full`` trains every weight (ZeRO-3 partitions weights, gradients and optimizer
states over the ranks, the model partitioned while it loads); its checkpoints are whole models
saved with ``save_pretrained`` (float32, gathered one weight at a time, tokenizer beside), which
load as a model path. ``finetune.loss: all`` takes the loss on every token of the sample (the
released implicit-task recipe), a token mean over the effective batch.

The process group comes from the environment (:mod:`replandscape.dist.torchdist`); this module
knows nothing about launching.

Output layout under ``<run.output_dir>/finetune/`` (or ``finetune.output_dir``)::

    config.yaml, config.sha256     the resolved config and its hash (provenance)
    stage.sha256                   what identifies this run: data, task (generated tasks), prompt
                                   seed and BOS, model, fine-tuning settings and run seed (a resume
                                   or a re-run must match it; analysis, figures or cluster settings
                                   may change)
    train_log.jsonl                one line per optimiser step: step, epoch, loss, lr, tokens,
                                   seconds (this step), elapsed_s; val_accuracy (MMLU) or
                                   task_accuracy (generated tasks) on eval steps
    adapter-step000012/            LoRA adapter (PEFT format) at the checkpoint steps
    adapter-final/                 LoRA adapter at the end of training
    checkpoint-step000010/         full fine-tuning: the whole model (config.json, safetensors,
    checkpoint-final/              tokenizer, finetune.json) at the checkpoint steps and the end
    checkpoints.json               {"config_hash", "stage_hash", "total_steps",
                                    "adapters": [{name, step, path, kind, examples_seen}]}
                                   (kind "lora" or "full"; a missing kind means lora)
    ds/step000010/                 the latest DeepSpeed checkpoint (every save_every steps), with
                                   per-rank RNG states (rng_rank00000.npz: plain arrays);
                                   ds/resume.json points at it (removed once the run has finished)
    result.json                    :class:`FinetuneResult`, written last: the stage's completion
                                   marker (a finished run returns it again; submit and status
                                   count the stage done only when it is there)

Checkpoint steps: every ``finetune.checkpoint_every`` steps, or (0) ``log_checkpoints``
geometrically spaced steps; the final one always. A run that finds ``ds/resume.json`` resumes from
it and, on CPU with the same seed, ends with the same weights as an uninterrupted run: data order
depends on (seed, epoch) only, and the model, optimiser, scheduler and RNG states are restored.

Nothing read back from the folder is unpickled: the JSON files go through the schema-checked
readers of :mod:`replandscape.stored`, the RNG states are ``.npz`` arrays read with
``allow_pickle=False``, and DeepSpeed's own checkpoint files are loaded with
``torch.load(weights_only=True)``, allowing only the few DeepSpeed record types they hold
(:data:`DEEPSPEED_SAFE_GLOBALS`). The recovery scripts DeepSpeed copies beside its checkpoints
(``zero_to_fp32.py``) are removed: no output folder holds code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from replandscape.atomic import write_npz_atomic, write_text_atomic
from replandscape.conditions import finetune_dir, finetune_dir_key, task_test_accuracy
from replandscape.config import ExperimentConfig, save_resolved
from replandscape.data import Question, load_split, select_eval_questions
from replandscape.dist import torchdist
from replandscape.errors import UserError
from replandscape.lock import stage_lock
from replandscape.models import load_causal_lm, load_tokenizer, resolve_model_path, torch_dtype
from replandscape.outputs import ensure_dir
from replandscape.prompts import build_prompt, letter_token_ids, training_text
from replandscape.stored import (
    FIX_RESUME,
    AdapterCheckpoint,
    check_adapter_dir,
    check_model_dir,
    read_checkpoint_index,
    read_finetune_result,
    read_resume_record,
    read_train_log,
)

# the stage's name (its lock); its folder is conditions.finetune_dir(cfg)
STAGE_DIR = "finetune"
FINAL_ADAPTER = "adapter-final"
# full fine-tuning saves whole models, loadable as a model path
FINAL_MODEL = "checkpoint-final"
FINAL_NAMES = (FINAL_ADAPTER, FINAL_MODEL)
# the split of a generated task that fine-tuning draws from (test is scored, dev holds shots)
TASK_TRAIN_SPLIT = "train"
IGNORE_INDEX = -100
RESULT_FILE = "result.json"
CHECKPOINTS_FILE = "checkpoints.json"
TRAIN_LOG = "train_log.jsonl"
RESUME_FILE = "resume.json"
STAGE_STAMP = "stage.sha256"
RNG_FILE = "rng_rank{rank:05d}.npz"
# DeepSpeed's recovery scripts, copied beside every ZeRO checkpoint; not needed to resume
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run produced (also written to ``finetune/result.json``)."""

    output_dir: str
    adapter_dir: str
    config_hash: str
    total_steps: int
    train_samples: int
    train_subjects: int
    effective_batch: int
    world_size: int
    zero_stage: int
    final_loss: float | None
    train_tokens: int
    train_seconds: float
    val_accuracy: float | None
    val_history: tuple[tuple[int, float], ...]
    test_accuracy: float | None
    test_questions: int
    test_per_subject: dict[str, float]
    checkpoints: tuple[AdapterCheckpoint, ...]
    resumed_from_step: int | None = None
    stage_hash: str = ""
    # "lora" or "full"; adapter_dir is the final checkpoint's folder either way
    method: str = "lora"
    loss: str = "answer"
    # generated tasks: the tasks trained on, the 0-shot accuracy on the test split of each
    # ({task: {variant: {"strict", "substring", "n"}}}) at the end and on eval steps
    train_tasks: tuple[str, ...] = ()
    task_accuracy: dict[str, dict[str, dict[str, float | int]]] | None = None
    task_history: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["val_history"] = [list(item) for item in self.val_history]
        data["train_tasks"] = list(self.train_tasks)
        data["task_history"] = [dict(item) for item in self.task_history]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FinetuneResult:
        """Build from the object :func:`replandscape.stored.read_finetune_result` checked
        (keys this version does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["val_history"] = tuple((int(s), float(a)) for s, a in data["val_history"])
        data["checkpoints"] = tuple(AdapterCheckpoint(**c) for c in data["checkpoints"])
        data["train_tasks"] = tuple(data.get("train_tasks", ()))
        data["task_history"] = tuple(data.get("task_history", ()))
        return cls(**data)


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------


# fine-tuning options added after runs were stored: at these values they stay out of the stage
# hash, so a folder written before them keeps its identity (and resumes)
_LATER_DEFAULTS: dict[str, Any] = {
    "method": "lora", "loss": "answer", "tasks": [], "samples_per_task": 1000,
    "train_variants": ["pattern", "misleading"], "schedule": "cosine", "warmup_steps": None,
    "max_steps": None, "checkpoint_every": 0, "eval_tasks": []}


def stage_hash(cfg: ExperimentConfig) -> str:
    """Identity of a fine-tuning run: only what changes its weights and their evaluation, so a
    config that differs in its analysis, figures, extraction or cluster settings reuses it. Where
    the folder is (``finetune.output_dir``) is no part of it.

    A generated task's run is keyed by its task section. With a mixture (``finetune.tasks``) and
    ``finetune.eval_tasks`` both set, the run's own task changes only which tasks are scored: it
    is keyed by the task section without its name plus the set of scored tasks
    (:func:`scored_tasks`), so a sweep's task experiments on one mixture, scoring every task of
    the axis, are one run. Every other run keeps the identity it had before that option."""
    d = cfg.to_dict()
    finetune = {k: v for k, v in d["finetune"].items()
                if k != "output_dir" and not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k])}
    key = {"data": d["data"],
           "prompts": {"seed": d["prompts"]["seed"], "add_bos": d["prompts"]["add_bos"]},
           "model": d["model"], "finetune": finetune, "seed": d["run"]["seed"]}
    if cfg.task.name != "mmlu":  # MMLU runs keep the identity they had before the task axis
        if cfg.finetune.tasks and cfg.finetune.eval_tasks:
            finetune.pop("eval_tasks")
            key["task"] = {k: v for k, v in d["task"].items() if k != "name"}
            key["scored_tasks"] = sorted(scored_tasks(cfg))
        else:
            key["task"] = d["task"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float,
              schedule: str = "cosine") -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warm-up over
    ``warmup_steps`` steps, then cosine decay reaching ``min_lr_ratio`` at the last step
    (``schedule="cosine"``) or the peak lr to the end (``"constant"``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, ratio: float, cap: int, absolute: int | None = None) -> int:
    """Warm-up steps: ``absolute`` when given, else ceil(ratio x steps) capped at ``cap``."""
    if absolute is not None:
        return max(0, absolute)
    return max(0, min(math.ceil(ratio * total_steps), cap))


def checkpoint_steps(total_steps: int, every: int, log_count: int) -> list[int]:
    """The steps whose weights are saved besides the final ones: every ``every`` steps (the
    last included when it falls on one), or with ``every`` 0 ``log_count`` log-spaced steps."""
    if every > 0:
        return list(range(every, total_steps + 1, every))
    return log_spaced_steps(total_steps, log_count)


def log_spaced_steps(total_steps: int, count: int) -> list[int]:
    """``count`` geometrically spaced steps in 1..total (duplicates merged), always with the last."""
    if count <= 0 or total_steps <= 0:
        return []
    if count == 1:
        return [total_steps]
    ratio = total_steps ** (1.0 / (count - 1))
    steps = {min(total_steps, max(1, round(ratio**i))) for i in range(count)}
    steps.add(total_steps)
    return sorted(steps)


def balance_per_subject(questions: Sequence[Question], cap: int | None, seed: int) -> list[Question]:
    """Keep at most ``cap`` questions per subject (seeded choice); keeps the input order."""
    if cap is None:
        return list(questions)
    by_subject: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_subject.setdefault(q.subject, []).append(i)
    keep: set[int] = set()
    for subject, idx in by_subject.items():
        if len(idx) > cap:
            idx = random.Random(f"{seed}:train:{subject}").sample(idx, cap)
        keep.update(idx)
    return [q for i, q in enumerate(questions) if i in keep]


def inverse_frequency_weights(subjects: Sequence[str]) -> list[float]:
    """Per-sample weights proportional to 1 / (samples of its subject), normalised to mean 1, so
    every subject carries the same total weight."""
    counts = Counter(subjects)
    n, k = len(subjects), len(counts)
    return [n / (k * counts[s]) for s in subjects]


def epoch_order(n_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch, from (seed, epoch) alone, so a resumed run sees the same."""
    order = list(range(n_samples))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return order


def rank_shard(global_batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's disjoint share of one global batch."""
    return list(global_batch[rank::world_size])


def build_labels(ids: Sequence[int], n_prompt: int, loss: str) -> list[int]:
    """Labels of one sample whose first ``n_prompt`` tokens are the prompt and the rest the
    answer: ``loss="answer"`` labels the answer tokens alone, ``"all"`` every token but the
    first (which nothing predicts); -100 elsewhere."""
    if loss == "all":
        return [IGNORE_INDEX] + list(ids[1:])
    if loss == "answer":
        return [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:])
    raise ValueError(f"unknown loss {loss!r}")  # the config allows only the two


def masked_token_ce(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Per-sample sum of the token cross-entropy over labelled positions, and their count.

    ``logits`` holds the last K positions of the sequence ([B, K, V]), ``labels`` the whole
    sequence ([B, T], -100 where no loss is taken). Position t predicts token t+1, so K must
    reach one position before the first label.
    """
    import torch
    import torch.nn.functional as F

    batch, kept, vocab = logits.shape
    targets = labels[:, labels.shape[1] - kept + 1:]
    targets = torch.cat([targets, torch.full((batch, 1), IGNORE_INDEX, dtype=targets.dtype,
                                             device=targets.device)], dim=1)
    ce = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(batch, kept)
    return ce.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def answer_token_loss(logits: Any, labels: Any, weights: Any) -> tuple[Any, Any]:
    """Weighted token cross-entropy of a causal LM restricted to labelled positions.

    ``logits`` holds the last K positions of the sequence ([B, K, V]), ``labels`` the whole
    sequence ([B, T], -100 where no loss is taken). Position t predicts token t+1. Returns the sum
    over the batch of ``weight x per-sample mean CE`` divided by B, and the per-sample CE.
    """
    ce_sum, counted = masked_token_ce(logits, labels)
    per_sample = ce_sum / counted.clamp(min=1)
    return (weights.to(per_sample) * per_sample).sum() / logits.shape[0], per_sample


def collate_left(sequences: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None,
                 pad_id: int) -> dict[str, Any]:
    """Left-pad a batch; position ids count real tokens only, so padding changes nothing."""
    import torch

    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    lab = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, length - len(seq):] = 1
        if labels is not None:
            lab[i, length - len(seq):] = torch.tensor(labels[i], dtype=torch.long)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
    if labels is not None:
        batch["labels"] = lab
    return batch


def model_module_names(model_path: str) -> list[str]:
    """Dotted names of the modules LoRA can wrap (Linear, Embedding, Conv1D), from the config
    alone: the model is built on the meta device, so nothing is loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def check_target_modules(targets: Sequence[str], module_names: Sequence[str]) -> None:
    """Refuse LoRA targets that match no module (PEFT's rule: equal name or dotted suffix)."""
    missing = [t for t in targets
               if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in module_names})
        raise UserError(f"target module(s) {', '.join(missing)} not in the model, which has: "
                        f"{', '.join(short)}", key="finetune.target_modules",
                        fix="list module names the model has")


def train_tasks(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The generated tasks fine-tuning mixes: ``finetune.tasks``, else the run's own task."""
    return tuple(cfg.finetune.tasks) or (cfg.task.name,)


def scored_tasks(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The generated tasks whose 0-shot test accuracy the stage measures, each once: the run's
    own task (``test_accuracy`` is its), the mixture, then ``finetune.eval_tasks``."""
    return tuple(dict.fromkeys((cfg.task.name, *train_tasks(cfg), *cfg.finetune.eval_tasks)))


def task_config(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """``cfg`` with the task ``name`` in place of its own (the same sizes, variants and seed), so
    :func:`replandscape.evalset.task_folder` and ``eval_records`` give that task's splits; the
    run's own task gives ``cfg`` itself.

    Raises:
        UserError: Another task is asked while ``data.source`` is a folder of the run's task.
    """
    if name == cfg.task.name:
        return cfg
    from replandscape.evalset import BUILTIN_TASK

    if cfg.data.source != BUILTIN_TASK:
        raise UserError(f"finetune.tasks lists '{name}', but data.source is a folder of "
                        f"'{cfg.task.name}' items", file=cfg.source_file or None,
                        key="finetune.tasks",
                        fix=f"use data.source {BUILTIN_TASK} (every task generated), or train on "
                            "the run's own task alone")
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name=name))


def mixture_items(cfg: ExperimentConfig) -> list[Any]:
    """The training items of a generated task's run: ``samples_per_task`` items of the
    ``train_variants`` from the ``train`` split of each task of :func:`train_tasks` (a choice
    seeded by (run.seed, task)), then shuffled together (seeded by run.seed).

    Raises:
        UserError: A task's train split holds fewer items than asked.
    """
    from replandscape.evalset import task_folder
    from replandscape.tasks.data import load_task_split

    f = cfg.finetune
    mixture: list[Any] = []
    for name in train_tasks(cfg):
        folder = task_folder(task_config(cfg, name))
        items = [i for i in load_task_split(folder, TASK_TRAIN_SPLIT)
                 if i.task == name and i.variant in f.train_variants]
        if len(items) < f.samples_per_task:
            raise UserError(f"the '{TASK_TRAIN_SPLIT}' split of '{name}' holds {len(items)} items "
                            f"of the variants {', '.join(f.train_variants)}, "
                            f"{f.samples_per_task} asked", file=str(folder),
                            key="finetune.samples_per_task",
                            fix=f"use at most {len(items)} or more train items (task.n_train)")
        mixture += random.Random(f"{cfg.run.seed}:train:{name}").sample(items, f.samples_per_task)
    random.Random(f"{cfg.run.seed}:mixture").shuffle(mixture)
    return mixture


def cut_to_length(ids: list[int], n_prompt: int, max_len: int, add_bos: bool) -> tuple[list[int], int]:
    """Cut a sample to ``max_len`` tokens, keeping BOS and the end (the answer); returns the ids
    and the new prompt length."""
    if len(ids) <= max_len:
        return ids, n_prompt
    head = ids[:1] if add_bos else []
    tail = ids[len(ids) - (max_len - len(head)):]
    return head + tail, max(len(head), n_prompt - (len(ids) - max_len))


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# resume state without pickle
# --------------------------------------------------------------------------------------------


def save_rng_state(path: Path) -> None:
    """Write this process's torch, CUDA and Python RNG states to ``path`` as plain arrays."""
    import torch

    version, words, gauss = random.getstate()
    arrays = {"torch": torch.get_rng_state().numpy(),
              "python_version": np.asarray(version, dtype=np.int64),
              "python_state": np.asarray(words, dtype=np.int64),
              "python_gauss": np.asarray([] if gauss is None else [gauss], dtype=np.float64)}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            arrays[f"cuda{i}"] = state.cpu().numpy()
    write_npz_atomic(path, arrays)


def load_rng_state(path: Path) -> None:
    """Restore the RNG states :func:`save_rng_state` wrote (``numpy.load`` without pickle).

    Raises:
        UserError: The file is missing or damaged.
    """
    import torch

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        gauss = arrays["python_gauss"]
        python_state = (int(arrays["python_version"]),
                        tuple(int(w) for w in arrays["python_state"]),
                        float(gauss[0]) if gauss.size else None)
        torch_state = torch.from_numpy(np.ascontiguousarray(arrays["torch"], dtype=np.uint8))
        random.setstate(python_state)
        torch.set_rng_state(torch_state)
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise UserError(f"the saved RNG state cannot be read ({type(exc).__name__}: {exc})",
                        file=str(path), fix=FIX_RESUME) from None
    cuda = [arrays[k] for k in sorted((k for k in arrays if k.startswith("cuda")),
                                      key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.from_numpy(np.ascontiguousarray(c)) for c in cuda])


def _deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed record types its checkpoints hold besides tensors and plain containers
    (ZeRO stage tag, loss scaler, fp32 partition addresses); nothing that runs code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                          "deepspeed.utils.tensor_fragment.fragment_address")


class WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose ``load`` unpickles nothing but tensors, plain
    containers and :data:`DEEPSPEED_SAFE_GLOBALS` (DeepSpeed's own ``TorchCheckpointEngine``
    calls ``torch.load(weights_only=False)``); every other call goes to the wrapped engine."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        import pickle

        import torch

        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling error"
            raise UserError(f"the DeepSpeed checkpoint holds more than tensors and DeepSpeed's "
                            f"records, refused unread ({first})", file=path,
                            fix=FIX_RESUME) from None
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise UserError(f"the DeepSpeed checkpoint cannot be read ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})",
                            file=path, fix=FIX_RESUME) from None


def _quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    input_ids: list[int]
    labels: list[int]
    weight: float
    subject: str  # the MMLU subject, or the generated task's name

    @property
    def keep(self) -> int:
        """Logit positions the loss needs: from just before the first label to the end."""
        first = next((i for i, t in enumerate(self.labels) if t != IGNORE_INDEX),
                     len(self.labels))
        return max(1, len(self.labels) - first + 1)

    @property
    def n_targets(self) -> int:
        """Labelled tokens that something predicts (the first position never is one)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    last_loss: float | None = None
    val_history: list[tuple[int, float]] = field(default_factory=list)
    task_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None


TaskScores = dict[str, dict[str, dict[str, float | int]]]


class Finetuner:
    """One fine-tuning run, LoRA or full. ``run(cfg)`` is the usual entry point; tests and
    benchmarks use the pieces (``setup``, ``train``, ``evaluate``, ``evaluate_tasks``,
    ``engine``).

    All user errors (batch arithmetic, splits, task data, target modules, a foreign resume folder)
    are raised by the constructor, before the process group, the model or DeepSpeed are touched.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        from replandscape.evalset import eval_records, is_generated

        self.cfg = cfg
        self.stage_hash = stage_hash(cfg)
        f = cfg.finetune
        self.method = f.method
        self.generated = is_generated(cfg)
        self.info = torchdist.rank_info()
        self.out = finetune_dir(cfg)
        world = self.info.world_size
        if f.effective_batch % (f.micro_batch * world):
            raise UserError(f"effective batch {f.effective_batch} does not divide over micro-batch "
                            f"{f.micro_batch} x {world} rank(s)", key="finetune.effective_batch",
                            fix=f"use a multiple of {f.micro_batch * world} or change micro_batch "
                                "or the number of ranks")
        self.grad_accum = f.effective_batch // (f.micro_batch * world)
        self._check_output_folder()
        self.train_questions: list[Question] = []
        self.train_items: list[Any] = []
        # generated tasks: the 0-shot test prompts of each task of the mixture; the run's own
        # are exactly the ones extraction scores, so ft-final can be checked against them
        self.task_records: dict[str, list[Any]] = {}
        self.task_new_tokens: dict[str, int] = {}
        if self.generated:
            from replandscape.evalset import max_new_tokens

            self.train_items = mixture_items(cfg)
            n_train = len(self.train_items)
            for name in scored_tasks(cfg):
                sub = task_config(cfg, name)
                self.task_records[name] = eval_records(sub, 0)
                self.task_new_tokens[name] = max_new_tokens(sub)
        else:
            if not cfg.data.train_splits:
                raise UserError("no training splits", key="data.train_splits",
                                fix="list the splits to train on, e.g. [dev, validation]")
            questions: list[Question] = []
            for split in cfg.data.train_splits:
                questions += load_split(cfg.data, split)
            if cfg.data.subjects is not None:
                questions = [q for q in questions if q.subject in cfg.data.subjects]
            self.train_questions = balance_per_subject(questions, f.samples_per_subject,
                                                       cfg.run.seed)
            n_train = len(self.train_questions)
        self.steps_per_epoch = n_train // f.effective_batch
        if self.steps_per_epoch < 1:
            raise UserError(f"{n_train} training samples do not fill one batch of "
                            f"{f.effective_batch}", key="finetune.effective_batch",
                            fix="lower effective_batch or train on more data")
        self.total_steps = self.steps_per_epoch * f.epochs
        if f.max_steps is not None:
            self.total_steps = min(self.total_steps, f.max_steps)
        # the evaluation questions are read now, so a missing split fails before training
        self.val_questions = [] if self.generated else self._eval_questions("validation")
        self.test_questions = [] if self.generated else self._eval_questions(cfg.data.eval_split)
        self.model_path = resolve_model_path(cfg.model)
        if self.method == "lora":
            check_target_modules(f.target_modules, model_module_names(self.model_path))
        self.engine: Any = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.samples: list[_Sample] = []
        self.letter_ids: list[int] = []
        self.eos_ids: list[int] = []
        self.state = _State()

    # ---------------------------------------------------------------------------- set-up

    def _check_output_folder(self) -> None:
        check_output_folder(self.cfg)

    def init_process_group(self) -> None:
        """Pick the device and join the process group (once; ``setup`` calls it too)."""
        if getattr(self, "device", None) is not None:
            return
        self.device = torchdist.pick_device("auto", self.info)
        self.on_cuda = self.device.startswith("cuda")
        _quiet_deepspeed()
        # without RANK etc. DeepSpeed would look for MPI; a single process needs them too
        torchdist.export_rendezvous(self.info)
        torchdist.init_distributed(self.device)

    def setup(self) -> None:
        """Process group, tokenizer, samples, the model (LoRA-wrapped or whole) and the DeepSpeed
        engine."""
        import deepspeed
        import torch

        from replandscape.generation import eos_token_ids

        cfg, f = self.cfg, self.cfg.finetune
        self.init_process_group()

        self.tokenizer = load_tokenizer(self.model_path, cfg.model.revision, padding_side="left")
        if not self.generated:
            self.letter_ids = letter_token_ids(self.tokenizer, cfg.data.num_choices)
        self.samples = self._build_samples()

        dtype = cfg.model.dtype if self.on_cuda else "float32"
        # one rank has nothing to partition: ZeRO-2/3 would only add copies (measured 0.91x and
        # 0.64x the tokens/s of plain PEFT on one CPU process; stage 0 0.97x)
        self.zero_stage = f.zero_stage if self.info.world_size > 1 else 0
        ds_config = {
            "train_batch_size": f.effective_batch,
            "train_micro_batch_size_per_gpu": f.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": f.grad_clip,
            "zero_optimization": (
                torchdist.zero3_bounded_memory(torchdist.model_hidden_size(
                    self.model_path, cfg.model.revision))
                if self.zero_stage == 3 else {"stage": self.zero_stage}),
            "bf16": {"enabled": self.on_cuda and dtype == "bfloat16"},
            "fp16": {"enabled": self.on_cuda and dtype == "float16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        # ZeRO-3: parameters are partitioned as they load (deepspeed.zero.Init through
        # transformers), so no rank ever holds the whole model (70B = 141 GB in bf16)
        partition_on_load = None
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            partition_on_load = HfDeepSpeedConfig(ds_config)
        model = load_causal_lm(self.model_path, revision=cfg.model.revision, dtype=dtype)
        model.config.use_cache = False
        self.eos_ids = eos_token_ids(model, self.tokenizer)
        if self.method == "lora":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(cfg.run.seed)  # the same LoRA initialisation on every rank
            lora = LoraConfig(r=f.lora_rank, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout,
                              target_modules=list(f.target_modules), bias="none",
                              task_type="CAUSAL_LM")
            self.model = get_peft_model(model, lora)
        else:
            for param in model.parameters():
                param.requires_grad_(True)
            self.model = model
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=f.lr, weight_decay=f.weight_decay)
        warmup = warmup_steps_for(self.total_steps, f.warmup_ratio, f.warmup_max_steps,
                                  f.warmup_steps)
        total, min_ratio, schedule = self.total_steps, f.min_lr_ratio, f.schedule

        def factor(step: int) -> float:
            return lr_factor(step, total, warmup, min_ratio, schedule)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        # resume loads through torch.load(weights_only=True), never a full unpickle
        self.engine.checkpoint_engine = WeightsOnlyLoads(self.engine.checkpoint_engine)
        del partition_on_load
        # dropout masks differ between ranks but are reproducible per (seed, rank)
        torch.manual_seed(cfg.run.seed * 1000 + 7919 * self.info.rank + 1)

    def _build_samples(self) -> list[_Sample]:
        if self.generated:
            return self._task_samples()
        add_bos = self.cfg.prompts.add_bos
        max_len = self.cfg.finetune.max_seq_len
        loss = self.cfg.finetune.loss
        weights = inverse_frequency_weights([q.subject for q in self.train_questions])
        samples = []
        truncated = 0
        for q, w in zip(self.train_questions, weights):
            block, _suffix = training_text(q)
            ids = self.tokenizer.encode(block, add_special_tokens=add_bos)
            letter = self.letter_ids[q.answer]
            if len(ids) + 1 > max_len:
                truncated += 1
                # keep BOS and the end of the block, which holds the choices and "Answer:"
                head = ids[:1] if add_bos else []
                ids = head + ids[len(ids) - (max_len - 1 - len(head)):]
            full = ids + [letter]
            samples.append(_Sample(input_ids=full, labels=build_labels(full, len(ids), loss),
                                   weight=w, subject=q.subject))
        if truncated:
            torchdist.print0(f"finetune: {truncated} training samples cut to max_seq_len={max_len}")
        return samples

    def _task_samples(self) -> list[_Sample]:
        """One sample per item: ``text + answer`` tokenized whole (as the text reads), the answer
        being the tokens after the longest common prefix with the text alone."""
        from replandscape.tasks import get_task

        add_bos = self.cfg.prompts.add_bos
        max_len = self.cfg.finetune.max_seq_len
        loss = self.cfg.finetune.loss
        samples = []
        truncated = 0
        for item in self.train_items:
            text, answer = get_task(item.task).training_text(item)
            ids = self.tokenizer.encode(text + answer, add_special_tokens=add_bos)
            prompt = self.tokenizer.encode(text, add_special_tokens=add_bos)
            n_prompt = 0
            while n_prompt < min(len(ids) - 1, len(prompt)) and ids[n_prompt] == prompt[n_prompt]:
                n_prompt += 1
            if len(ids) > max_len:
                truncated += 1
                ids, n_prompt = cut_to_length(ids, n_prompt, max_len, add_bos)
            samples.append(_Sample(input_ids=ids, labels=build_labels(ids, n_prompt, loss),
                                   weight=1.0, subject=item.task))
        if truncated:
            torchdist.print0(f"finetune: {truncated} training samples cut to max_seq_len={max_len}")
        return samples

    # ---------------------------------------------------------------------------- data order

    def global_batch(self, step: int) -> list[int]:
        """Sample indices of optimiser step ``step`` (0-based), all ranks together."""
        f = self.cfg.finetune
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.samples), self.cfg.run.seed, epoch)
        return order[within * f.effective_batch:(within + 1) * f.effective_batch]

    def micro_batches(self, step: int) -> Iterator[list[_Sample]]:
        """This rank's micro-batches of optimiser step ``step`` (0-based)."""
        f = self.cfg.finetune
        mine = rank_shard(self.global_batch(step), self.info.rank, self.info.world_size)
        for i in range(0, len(mine), f.micro_batch):
            yield [self.samples[j] for j in mine[i:i + f.micro_batch]]

    # ---------------------------------------------------------------------------- training

    def _batch_loss(self, micro: Sequence[_Sample], global_norm: float | None,
                    train: bool) -> tuple[Any, float, float, int]:
        """Forward one micro-batch; returns the loss to back-propagate, this batch's share of
        the reported loss (numerator, denominator) and its real tokens.

        ``loss: answer``: ``sum(weight x per-sample mean CE) / B`` (DeepSpeed averages it over
        accumulation steps and ranks, giving the mean over the effective batch). ``loss: all``:
        ``sum(weight x token CE) x (accumulation x ranks) / global_norm``, so the gradient is the
        token mean over the effective batch, however it is split over ranks and micro-batches.
        """
        import torch

        batch = collate_left([s.input_ids for s in micro], [s.labels for s in micro],
                             self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        weights = torch.tensor([s.weight for s in micro], dtype=torch.float32,
                               device=self.device)
        keep = max(s.keep for s in micro)
        out = self.engine(**batch, logits_to_keep=keep, use_cache=False)
        ce_sum, counted = masked_token_ce(out.logits, labels)
        tokens = int(batch["attention_mask"].sum())
        if self.cfg.finetune.loss == "all":
            weighted = (weights * ce_sum).sum()
            norm = global_norm if global_norm is not None else float(
                (weights * counted.to(weights)).sum())
            scale = self.grad_accum * self.info.world_size if train else 1
            return (weighted * scale / norm, float(weighted.detach()),
                    float((weights * counted.to(weights)).sum()), tokens)
        per_sample = ce_sum / counted.clamp(min=1)
        weighted = (weights * per_sample).sum()
        return weighted / len(micro), float(weighted.detach()), float(len(micro)), tokens

    def train_step(self, step: int) -> dict[str, float]:
        """One optimiser step (all micro-batches of this rank); returns global loss and tokens."""
        import torch

        engine = self.engine
        engine.train()
        lr = float(self.scheduler.get_last_lr()[0])
        # every rank knows the whole batch: the token-mean normaliser needs no communication
        norm = sum(self.samples[j].weight * self.samples[j].n_targets
                   for j in self.global_batch(step)) or 1.0
        loss_sum = torch.zeros(3, dtype=torch.float64)  # loss numerator, denominator, tokens
        for micro in self.micro_batches(step):
            loss, num, den, tokens = self._batch_loss(micro, norm, train=True)
            engine.backward(loss)
            engine.step()
            loss_sum += torch.tensor([num, den, float(tokens)], dtype=torch.float64)
        if torchdist.is_distributed():
            torch.distributed.all_reduce(loss_sum)
        return {"loss": float(loss_sum[0] / loss_sum[1]), "lr": lr, "tokens": int(loss_sum[2])}

    def train(self) -> FinetuneResult:
        """Train to the end (resuming if a checkpoint exists), evaluate, save; returns the result."""
        from tqdm import tqdm

        f = self.cfg.finetune
        is_main = self.info.is_main
        if is_main:
            ensure_dir(self.out, finetune_dir_key(self.cfg))
            save_resolved(self.cfg, self.out)
            write_text_atomic(self.out / STAGE_STAMP, self.stage_hash + "\n")
        torchdist.barrier()
        self._maybe_resume()
        saved_steps = set(checkpoint_steps(self.total_steps, f.checkpoint_every,
                                           f.log_checkpoints))
        val_questions = self.val_questions
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="finetune",
                   disable=not is_main, dynamic_ncols=True)
        log_path = self.out / TRAIN_LOG
        while self.state.step < self.total_steps:
            t0 = time.perf_counter()
            stats = self.train_step(self.state.step)
            seconds = time.perf_counter() - t0
            self.state.step += 1
            step = self.state.step
            self.state.tokens += int(stats["tokens"])
            self.state.elapsed_s += seconds
            self.state.last_loss = stats["loss"]
            record: dict[str, Any] = {"step": step, "epoch": (step - 1) // self.steps_per_epoch,
                                      "loss": stats["loss"], "lr": stats["lr"],
                                      "tokens": stats["tokens"], "seconds": round(seconds, 4),
                                      "elapsed_s": round(self.state.elapsed_s, 3)}
            if f.eval_every > 0 and step % f.eval_every == 0 and step < self.total_steps:
                if self.generated:
                    scores = self.evaluate_tasks()
                    self.state.task_history.append({"step": step, "task_accuracy": scores})
                    record["task_accuracy"] = scores
                elif val_questions:
                    acc, _ = self.evaluate(val_questions)
                    self.state.val_history.append((step, acc))
                    record["val_accuracy"] = acc
            if is_main:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if step in saved_steps:
                self.save_weights(self._step_name(step), step)
            if f.save_every > 0 and step % f.save_every == 0 and step < self.total_steps:
                self.save_resume_checkpoint()
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
        bar.close()
        return self.finish()

    def finish(self) -> FinetuneResult:
        """Final weights, validation and test accuracy, result.json."""
        f = self.cfg.finetune
        step = self.state.step
        final = self.save_weights(self._final_name(), step)
        val_acc = None
        task_scores: TaskScores | None = None
        if self.generated:
            task_scores = self.evaluate_tasks()
            if self.info.is_main:
                with open(self.out / TRAIN_LOG, "a") as fh:
                    fh.write(json.dumps({"step": step, "task_accuracy": task_scores}) + "\n")
            own = task_scores[self.cfg.task.name]
            rule = self.cfg.task.scoring
            n_test = sum(int(v["n"]) for v in own.values())
            test_acc = task_test_accuracy(task_scores, self.cfg.task.name, rule)
            per_subject = {variant: float(v[rule]) for variant, v in own.items()}
        else:
            val_questions = self.val_questions
            if val_questions:
                val_acc, _ = self.evaluate(val_questions)
                self.state.val_history.append((step, val_acc))
                if self.info.is_main:
                    with open(self.out / TRAIN_LOG, "a") as fh:
                        fh.write(json.dumps({"step": step, "val_accuracy": val_acc,
                                             "val_questions": len(val_questions)}) + "\n")
            test_acc, per_subject = self.evaluate(self.test_questions)
            n_test = len(self.test_questions)
        result = FinetuneResult(
            output_dir=str(self.out), adapter_dir=str(final),
            config_hash=self.cfg.hash, stage_hash=self.stage_hash, total_steps=step,
            train_samples=len(self.samples),
            train_subjects=len({s.subject for s in self.samples}),
            effective_batch=f.effective_batch, world_size=self.info.world_size,
            zero_stage=self.zero_stage, final_loss=self.state.last_loss,
            train_tokens=self.state.tokens, train_seconds=round(self.state.elapsed_s, 3),
            val_accuracy=val_acc, val_history=tuple(self.state.val_history),
            test_accuracy=test_acc, test_questions=n_test,
            test_per_subject=per_subject, checkpoints=tuple(self._read_checkpoints()),
            resumed_from_step=self.state.resumed_from_step, method=self.method, loss=f.loss,
            train_tasks=train_tasks(self.cfg) if self.generated else (),
            task_accuracy=task_scores, task_history=tuple(self.state.task_history))
        if self.info.is_main:
            _write_json(self.out / RESULT_FILE, result.to_json())
            # the resume state (optimiser moments included) is of no use once result.json exists
            shutil.rmtree(self.out / "ds", ignore_errors=True)
        torchdist.barrier()
        return result

    # ---------------------------------------------------------------------------- evaluation

    def mean_loss(self, samples: Sequence[_Sample]) -> float:
        """The training loss of ``samples`` (per ``finetune.loss``) in eval mode (no dropout);
        every rank must pass the same samples (under ZeRO-3 the forwards are collective)."""
        import torch

        was_training = self.engine.training
        self.engine.eval()
        num = den = 0.0
        size = max(1, self.cfg.finetune.micro_batch)
        with torch.no_grad():
            for i in range(0, len(samples), size):
                _loss, n, d, _tokens = self._batch_loss(samples[i:i + size], None, train=False)
                num, den = num + n, den + d
        if was_training:
            self.engine.train()
        return num / max(den, 1e-12)

    def _eval_questions(self, split: str) -> list[Question]:
        """The questions scored on ``split`` (subjects, max_per_subject and limit applied); a data
        set without a validation split gets no validation accuracy."""
        cfg = self.cfg
        try:
            questions = load_split(cfg.data, split)
        except UserError:
            if split == "validation":
                return []
            raise
        return select_eval_questions(questions, cfg.data, cfg.run.seed)

    def _my_rows(self, n: int, batch_size: int) -> tuple[list[int], int]:
        """This rank's rows of ``n`` (every world-th), padded with its last row so that every
        rank runs the same number of batches (ZeRO-3 forwards are collective)."""
        rank, world = self.info.rank, self.info.world_size
        mine = list(range(rank, n, world))
        n_batches = math.ceil(math.ceil(n / world) / batch_size)
        return mine + [mine[-1] if mine else 0] * (n_batches * batch_size - len(mine)), n_batches

    def evaluate(self, questions: Sequence[Question]) -> tuple[float, dict[str, float]]:
        """0-shot accuracy (header + question block, argmax over the letter tokens); every rank
        scores its share and all ranks run the same number of forwards (ZeRO-3 needs that)."""
        import torch
        from tqdm import tqdm

        if not questions:
            return float("nan"), {}
        batch_size = max(1, self.cfg.extract.batch_size)
        mine = list(range(self.info.rank, len(questions), self.info.world_size))
        padded, n_batches = self._my_rows(len(questions), batch_size)
        letters = torch.tensor(self.letter_ids, device=self.device)
        add_bos = self.cfg.prompts.add_bos
        correct: dict[int, bool] = {}
        was_training = self.engine.training
        self.engine.eval()
        with torch.no_grad():
            for b in tqdm(range(n_batches), desc="evaluate", leave=False,
                          disable=not self.info.is_main):
                idx = padded[b * batch_size:(b + 1) * batch_size]
                texts = [build_prompt(questions[i], {}, 0, self.cfg.prompts.seed) for i in idx]
                seqs = [self.tokenizer.encode(t, add_special_tokens=add_bos) for t in texts]
                batch = collate_left(seqs, None, self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits = self.engine(**batch, logits_to_keep=1, use_cache=False).logits[:, -1]
                pred = logits.index_select(-1, letters).argmax(-1).tolist()
                for j, i in enumerate(idx):
                    if b * batch_size + j < len(mine):
                        correct[i] = pred[j] == questions[i].answer
        if was_training:
            self.engine.train()
        merged: dict[int, bool] = {}
        for part in torchdist.all_gather_object(correct):
            merged.update(part)
        hits: dict[str, list[int]] = {}
        for i, ok in merged.items():
            hits.setdefault(questions[i].subject, []).append(int(ok))
        per_subject = {s: sum(v) / len(v) for s, v in sorted(hits.items())}
        return sum(merged.values()) / len(merged), per_subject

    def evaluate_tasks(self) -> TaskScores:
        """0-shot accuracy of every task of the mixture on its test split, per variant, strict
        and substring, by greedy generation (as extraction generates: the same prompts, token ids,
        end-of-sequence ids and token count). Every rank decodes its share in lock step: the
        same number of batches and of decoding steps (ZeRO-3 forwards are collective)."""
        from tqdm import tqdm

        from replandscape.capture import tokenize
        from replandscape.generation import decode_continuations, greedy_continue
        from replandscape.tasks.scoring import score_all

        cfg = self.cfg
        batch_size = max(1, cfg.extract.batch_size)
        pad_id = self.tokenizer.pad_token_id
        was_training = self.engine.training
        self.engine.eval()
        scores: TaskScores = {}
        for name, records in self.task_records.items():
            n_new = self.task_new_tokens[name]
            tokens = tokenize(self.tokenizer, [r.prompt for r in records], cfg.prompts.add_bos,
                              cfg.model.context_length, [r.id for r in records], shots=0,
                              reserve=n_new)
            mine = list(range(self.info.rank, len(records), self.info.world_size))
            padded, n_batches = self._my_rows(len(records), batch_size)
            verdicts: dict[int, dict[str, bool]] = {}
            for b in tqdm(range(n_batches), desc=f"evaluate {name}", leave=False,
                          disable=not self.info.is_main):
                idx = padded[b * batch_size:(b + 1) * batch_size]
                batch = collate_left([tokens[i] for i in idx], None, pad_id)
                new_ids = greedy_continue(
                    self.engine.module, batch["input_ids"].to(self.device),
                    batch["attention_mask"].to(self.device), n_new, pad_token_id=pad_id,
                    eos_token_id=self.eos_ids, stop_in_step=True)
                texts = decode_continuations(self.tokenizer, new_ids, self.eos_ids)
                for j, i in enumerate(idx):
                    if b * batch_size + j < len(mine):
                        verdicts[i] = score_all(texts[j], records[i].target)
            merged: dict[int, dict[str, bool]] = {}
            for part in torchdist.all_gather_object(verdicts):
                merged.update(part)
            per_variant: dict[str, list[dict[str, bool]]] = {}
            for i in sorted(merged):
                per_variant.setdefault(records[i].group, []).append(merged[i])
            scores[name] = {
                variant: {"strict": sum(v["strict"] for v in rows) / len(rows),
                          "substring": sum(v["substring"] for v in rows) / len(rows),
                          "n": len(rows)}
                for variant, rows in per_variant.items()}
        if was_training:
            self.engine.train()
        return scores

    # ---------------------------------------------------------------------------- saving

    def _step_name(self, step: int) -> str:
        return f"{'adapter' if self.method == 'lora' else 'checkpoint'}-step{step:06d}"

    def _final_name(self) -> str:
        return FINAL_ADAPTER if self.method == "lora" else FINAL_MODEL

    def _trainable_state_dict(self) -> dict[str, Any] | None:
        """Full (gathered) trainable weights on rank 0, in float32 on the CPU; collective under
        ZeRO-3, one weight gathered at a time, so no rank holds the whole model on the device."""
        import deepspeed

        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        state: dict[str, Any] = {}
        for name, param in named:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.info.is_main:
                    value = param.detach().to("cpu", copy=True)
                    state[name] = value.float() if self.method == "full" else value
        return state if self.info.is_main else None

    def save_weights(self, name: str, step: int) -> Path:
        """Save the weights as ``finetune/<name>`` (a LoRA adapter in PEFT format, or the whole
        model with its tokenizer) and list them in ``checkpoints.json``."""
        state = self._trainable_state_dict()
        target = self.out / name
        seen = step * self.cfg.finetune.effective_batch
        if self.info.is_main:
            assert state is not None
            tmp = self.out / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if self.method == "full":
                self._save_model(tmp, state)
            else:
                self.engine.module.save_pretrained(str(tmp), state_dict=state,
                                                   safe_serialization=True)
            (tmp / "finetune.json").write_text(json.dumps(
                {"step": step, "config_hash": self.cfg.hash, "stage_hash": self.stage_hash,
                 "base_model": self.model_path, "kind": self.method,
                 "examples_seen": seen}) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            entries = [c for c in self._read_checkpoints() if c.name != name]
            entries.append(AdapterCheckpoint(name=name, step=step, path=str(target),
                                             kind=self.method, examples_seen=seen))
            entries.sort(key=lambda c: (c.step, c.name in FINAL_NAMES))
            self._write_checkpoints(entries)
        torchdist.barrier()
        return target

    def save_adapter(self, name: str, step: int) -> Path:
        """Kept for callers of the LoRA-only version: :meth:`save_weights`."""
        return self.save_weights(name, step)

    def _save_model(self, folder: Path, state: dict[str, Any]) -> None:
        """Write a whole model (float32 weights, config, generation config, tokenizer) that
        ``AutoModelForCausalLM.from_pretrained`` loads."""
        import copy

        import torch

        module = self.engine.module
        config = copy.deepcopy(module.config)
        config.dtype = torch.float32  # what the saved weights are, whatever trained them
        config.use_cache = True  # switched off for training only
        module.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
        config.save_pretrained(str(folder))
        load_tokenizer(self.model_path, self.cfg.model.revision).save_pretrained(str(folder))

    def _read_checkpoints(self) -> list[AdapterCheckpoint]:
        path = self.out / CHECKPOINTS_FILE
        if not path.is_file():
            return []
        return list(read_checkpoint_index(path).adapters)

    def _write_checkpoints(self, entries: Sequence[AdapterCheckpoint]) -> None:
        _write_json(self.out / CHECKPOINTS_FILE, {
            "config_hash": self.cfg.hash, "stage_hash": self.stage_hash,
            "total_steps": self.total_steps,
            "adapters": [dataclasses.asdict(c) for c in entries]})

    def save_resume_checkpoint(self) -> Path:
        """Full DeepSpeed checkpoint + per-rank RNG + position; older ones are removed after the
        pointer ``ds/resume.json`` names the new one, so a kill never leaves no checkpoint."""
        ds_dir = self.out / "ds"
        tag = f"step{self.state.step:06d}"
        client_state = {"replandscape": {
            "step": self.state.step, "tokens": self.state.tokens,
            "elapsed_s": self.state.elapsed_s, "last_loss": self.state.last_loss,
            "val_history": self.state.val_history, "stage_hash": self.stage_hash,
            # JSON text: the checkpoint loads weights-only, which takes plain containers, but
            # one string is simpler to check than nested dicts of scores
            "task_history": json.dumps(self.state.task_history)}}
        self.engine.save_checkpoint(str(ds_dir), tag=tag, client_state=client_state,
                                    save_latest=False, exclude_frozen_parameters=True)
        save_rng_state(ds_dir / tag / RNG_FILE.format(rank=self.info.rank))
        torchdist.barrier()
        if self.info.is_main:
            for script in DEEPSPEED_SCRIPTS:
                (ds_dir / script).unlink(missing_ok=True)
            _write_json(ds_dir / RESUME_FILE, {"tag": tag, "step": self.state.step,
                                               "stage_hash": self.stage_hash,
                                               "world_size": self.info.world_size})
            for old in ds_dir.glob("step*"):
                if old.name != tag and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
        torchdist.barrier()
        return ds_dir / tag

    def _maybe_resume(self) -> None:
        ds_dir = self.out / "ds"
        pointer = ds_dir / RESUME_FILE
        if not pointer.is_file():
            self._truncate_logs(0)
            return
        info = read_resume_record(pointer)
        if info.stage_hash != self.stage_hash:
            raise UserError("the resume checkpoint was written by another config",
                            file=str(pointer), key=finetune_dir_key(self.cfg),
                            fix=f"use a new {finetune_dir_key(self.cfg)}, or delete the folder "
                                "to start over")
        if info.world_size != self.info.world_size:
            raise UserError(f"the resume checkpoint was written by {info.world_size} "
                            f"rank(s), this run has {self.info.world_size}", file=str(pointer),
                            key="model.gpus", fix="resume with the same number of ranks")
        load_path, client = self.engine.load_checkpoint(str(ds_dir), tag=info.tag,
                                                        load_module_strict=False)
        if load_path is None:
            raise UserError("the resume checkpoint cannot be read", file=str(ds_dir / info.tag),
                            key=finetune_dir_key(self.cfg), fix=FIX_RESUME)
        saved = (client or {}).get("replandscape")
        if not isinstance(saved, dict) or not {"step", "tokens", "elapsed_s", "last_loss",
                                               "val_history"} <= saved.keys():
            raise UserError("the resume checkpoint lacks the run's position",
                            file=str(ds_dir / info.tag), key=finetune_dir_key(self.cfg),
                            fix=FIX_RESUME)
        try:
            task_history = json.loads(saved.get("task_history", "[]"))
        except (TypeError, ValueError):
            task_history = None
        if not isinstance(task_history, list):
            raise UserError("the resume checkpoint holds a damaged task_history",
                            file=str(ds_dir / info.tag), key=finetune_dir_key(self.cfg),
                            fix=FIX_RESUME)
        self.state = _State(step=int(saved["step"]), tokens=int(saved["tokens"]),
                            elapsed_s=float(saved["elapsed_s"]), last_loss=saved["last_loss"],
                            val_history=[(int(s), float(a)) for s, a in saved["val_history"]],
                            task_history=task_history, resumed_from_step=int(saved["step"]))
        load_rng_state(ds_dir / info.tag / RNG_FILE.format(rank=self.info.rank))
        self._truncate_logs(self.state.step)
        torchdist.print0(f"finetune: resumed from step {self.state.step} ({ds_dir / info.tag})")

    def _truncate_logs(self, step: int) -> None:
        """Forget log lines and checkpoints listed after ``step`` (work a kill threw away)."""
        if self.info.is_main:
            rows = [r for r in read_train_log(self.out / TRAIN_LOG) if r.get("step", 0) <= step
                    and not (step == 0 and r.get("step", 0) == 0)]
            if rows or (self.out / TRAIN_LOG).exists():
                write_text_atomic(self.out / TRAIN_LOG,
                                  "".join(json.dumps(r) + "\n" for r in rows))
            entries = [c for c in self._read_checkpoints()
                       if c.step <= step and c.name not in FINAL_NAMES]
            if (self.out / CHECKPOINTS_FILE).exists():
                self._write_checkpoints(entries)
        torchdist.barrier()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        self.engine = None
        self.model = None


# the name of the class when it trained LoRA alone (tests and benchmarks patch it by that name)
LoraFinetuner = Finetuner


def check_output_folder(cfg: ExperimentConfig) -> None:
    """Refuse a fine-tuning folder that a run of another config wrote."""
    out = finetune_dir(cfg)
    key = finetune_dir_key(cfg)
    stamp, mine = out / STAGE_STAMP, stage_hash(cfg)
    if not stamp.is_file():  # a folder written before stage stamps: the whole config
        stamp, mine = out / "config.sha256", cfg.hash
    if stamp.is_file():
        old = stamp.read_text().strip()
        if old != mine:
            raise UserError(f"the folder holds a fine-tuning run of another config (hash "
                            f"{old[:12]}, this config {mine[:12]}; data, prompts, model, "
                            f"finetune or run.seed differ)", file=str(out), key=key,
                            fix=f"use a new {key}, or delete the folder to start over")
    check_stored_state(out)


def check_stored_state(out: Path) -> None:
    """Read every JSON state file of the fine-tuning folder ``out`` that exists (result, adapter
    index, resume record, training log) through its schema, so damage is one line before any
    work (and before a submit queues anything).

    Raises:
        UserError: A file is not JSON or does not have its kind's shape.
    """
    if (out / RESULT_FILE).is_file():
        read_finetune_result(out / RESULT_FILE)
    if (out / CHECKPOINTS_FILE).is_file():
        read_checkpoint_index(out / CHECKPOINTS_FILE)
    if (out / "ds" / RESUME_FILE).is_file():
        read_resume_record(out / "ds" / RESUME_FILE)
    read_train_log(out / TRAIN_LOG)


def result_complete(path: Path, expected_stage_hash: str | None = None) -> bool:
    """Whether ``path`` (a ``finetune/result.json``) marks a finished fine-tuning run: the
    stage's completion marker, written after everything else. With ``expected_stage_hash``,
    the run must also be of that configuration. A damaged file is not complete."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        data = read_finetune_result(path)
    except UserError:
        return False
    if expected_stage_hash is not None and data.get("stage_hash") != expected_stage_hash:
        return False
    if data.get("method", "lora") == "full":
        try:
            check_model_dir(path.parent / FINAL_MODEL)
        except UserError:
            return False
        return True
    return (path.parent / FINAL_ADAPTER / "adapter_config.json").is_file()


def is_complete(cfg: ExperimentConfig) -> bool:
    """Whether the fine-tuning stage of ``cfg`` has finished (see :func:`result_complete`)."""
    return result_complete(finetune_dir(cfg) / RESULT_FILE, stage_hash(cfg))


def _finished_result(cfg: ExperimentConfig) -> FinetuneResult | None:
    """The stored result of a finished run of ``cfg`` (None when there is none), its test
    accuracy that of ``cfg``'s own task: a shared run stores the trainer's task's."""
    path = finetune_dir(cfg) / RESULT_FILE
    if not path.is_file():
        return None
    data = read_finetune_result(path)  # damaged: one line, not a retrain over it
    if not result_complete(path, stage_hash(cfg)):
        return None
    result = FinetuneResult.from_json(data)
    scores, name = result.task_accuracy, cfg.task.name
    own = task_test_accuracy(scores, name, cfg.task.scoring)
    if own is None or scores is None:
        return result
    return dataclasses.replace(
        result, test_accuracy=own, test_questions=sum(int(v["n"]) for v in scores[name].values()),
        test_per_subject={v: float(s[cfg.task.scoring]) for v, s in scores[name].items()})


def run(cfg: ExperimentConfig) -> FinetuneResult:
    """Fine-tune ``cfg.model`` (LoRA or full) under DeepSpeed and evaluate it (docs/method.md §4).

    Ranks come from the environment (torchrun, the deepspeed launcher, Slurm tasks, or one
    process). A finished run returns its stored result (a run shared by several configs,
    ``finetune.output_dir``, trains once: the others find it finished); an interrupted one
    resumes. Rank 0 holds ``.finetune.lock`` in the folder (:func:`replandscape.lock.stage_lock`)
    while it trains, so a second live run on the same folder is refused in one line.

    Raises:
        UserError: Bad input, damaged stored state, or another live run on the folder.
    """
    trainer = Finetuner(cfg)  # refuses bad input before any work
    done = _finished_result(cfg)
    if done is not None:
        return done
    from replandscape.allocator import return_freed_memory

    # under ZeRO-3 every layer's full weights are gathered and freed in each forward and backward
    # pass: the freed copies must leave the process (allocator.return_freed_memory)
    partitioned = cfg.finetune.zero_stage == 3 and trainer.info.world_size > 1
    trainer.init_process_group()
    with contextlib.ExitStack() as held:
        # one run per fine-tuning folder: rank 0 holds the lock, every rank learns the outcome
        problem: str | None = None
        if trainer.info.is_main:
            try:
                held.enter_context(stage_lock(trainer.out, STAGE_DIR))
            except UserError as exc:
                problem = str(exc)
        problem = torchdist.broadcast_object(problem)
        if problem is not None:
            raise UserError(problem)
        held.enter_context(return_freed_memory() if partitioned else contextlib.nullcontext())
        trainer.setup()
        try:
            return trainer.train()
        finally:
            trainer.close()


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def export_merged(cfg: ExperimentConfig, adapter_dir: str | os.PathLike[str],
                  out_dir: str | os.PathLike[str], dtype: str | None = None) -> Path:
    """Merge a LoRA adapter into the base model and save it for plain ``from_pretrained``.

    The merge is done in float32; the saved weights take ``dtype`` (default: the base
    checkpoint's own dtype). The tokenizer is saved beside them.

    Raises:
        UserError: ``adapter_dir`` is not a whole adapter (no config, a damaged config, or an
            ``adapter_model.safetensors`` cut short).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter = check_adapter_dir(Path(adapter_dir), fix=(
        "point at a whole adapter saved by the finetune stage (re-run it if the copy was cut)"))
    base_path = resolve_model_path(cfg.model)
    base_dtype = getattr(AutoConfig.from_pretrained(base_path, revision=cfg.model.revision),
                         "dtype", None)
    if dtype is not None:
        save_dtype = torch_dtype(dtype)
    elif isinstance(base_dtype, torch.dtype):
        save_dtype = base_dtype
    elif isinstance(base_dtype, str):
        save_dtype = torch_dtype(base_dtype)
    else:
        save_dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_path, revision=cfg.model.revision,
                                                 dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged = merged.to(save_dtype)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(tmp))
    load_tokenizer(base_path, cfg.model.revision).save_pretrained(str(tmp))
    (tmp / "merged_from.json").write_text(json.dumps(
        {"base_model": base_path, "adapter": str(adapter.resolve()),
         "config_hash": cfg.hash}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
