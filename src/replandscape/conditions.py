"""The conditions of a run: what the model is and what it is shown (docs/method.md §3.1).

A condition is k shots of the base model, or a fine-tuned checkpoint (a LoRA adapter, or a whole
fine-tuned model) at 0 shots. Conditions are structured: their shots, method, checkpoint step and
training examples seen are fields, stored as attributes with every output, never parsed from names.
Every stage that runs a model over conditions (extraction, patching, knockout) lists them here.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from replandscape import __version__
from replandscape.config import ExperimentConfig
from replandscape.errors import UserError

# the folder names the fine-tuning stage gives its last checkpoint (LoRA adapter, whole model)
FINAL_CHECKPOINTS = ("adapter-final", "checkpoint-final")
# the fine-tuning folder's name under run.output_dir when finetune.output_dir is null
FINETUNE_DIR = "finetune"


def finetune_dir(cfg: ExperimentConfig) -> Path:
    """The fine-tuning stage's folder: ``finetune.output_dir``, else ``<run.output_dir>/finetune``.

    Every reader and writer of the fine-tuning outputs (the stage, extraction and patching of its
    checkpoints, sweeps, ``ls``) goes through here, so runs whose fine-tuning is the same (a
    sweep's task experiments on one mixture, docs/method.md §7.6) can share one folder.
    """
    if cfg.finetune.output_dir is not None:
        return Path(cfg.finetune.output_dir)
    return cfg.output_dir / FINETUNE_DIR


def finetune_dir_key(cfg: ExperimentConfig) -> str:
    """The config key that chose :func:`finetune_dir` (named in errors about the folder)."""
    return "finetune.output_dir" if cfg.finetune.output_dir is not None else "run.output_dir"


@dataclass(frozen=True)
class Condition:
    """What the model is and what it is shown: k shots, or a fine-tuned checkpoint at 0 shots."""

    name: str
    shots: int
    adapter: str | None = None
    checkpoint_step: int | None = None
    # fine-tuned conditions: "lora" or "full" (empty for the base model) and the training
    # examples seen at the checkpoint; stored as attributes, never parsed from the name
    method: str = ""
    examples_seen: int | None = None
    # a fully fine-tuned checkpoint: a save_pretrained folder that replaces the base model
    model_path: str | None = None
    # the fine-tuning stage's last checkpoint (the model its result.json scored)
    final: bool = False

    @property
    def finetuned(self) -> bool:
        return bool(self.method) or self.adapter is not None or self.model_path is not None


def code_version() -> str:
    """The checkout's git description, else the package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def shot_conditions(cfg: ExperimentConfig) -> list[Condition]:
    return [Condition(name=f"shots{k}", shots=k) for k in cfg.prompts.shots]


def finetuned_conditions(cfg: ExperimentConfig) -> list[Condition]:
    """The saved adapters of the finetune stage (final, or all log-spaced ones)."""
    from replandscape.stored import read_checkpoint_index

    folder = finetune_dir(cfg)
    index = folder / "checkpoints.json"
    if not index.is_file():
        raise UserError("no fine-tuned checkpoints", file=str(index),
                        fix="run the finetune stage first (replandscape run finetune CONFIG)")
    conds = []
    for entry in read_checkpoint_index(index).adapters:
        path = folder / entry.name  # adapters live beside the index, wherever it was moved
        final = entry.name in FINAL_CHECKPOINTS
        if cfg.extract.checkpoints == "final" and not final:
            continue
        name = "ft-final" if final else f"ft-step{entry.step:06d}"
        kind = str(getattr(entry, "kind", "lora") or "lora")
        seen = getattr(entry, "examples_seen", None)
        seen = entry.step * cfg.finetune.effective_batch if seen is None else int(seen)
        if kind == "full":
            conds.append(Condition(name=name, shots=0, model_path=str(path),
                                   checkpoint_step=entry.step, method="full",
                                   examples_seen=seen, final=final))
        else:
            conds.append(Condition(name=name, shots=0, adapter=str(path),
                                   checkpoint_step=entry.step, method="lora", examples_seen=seen,
                                   final=final))
    if not conds:
        raise UserError("no usable fine-tuned checkpoint listed", file=str(index),
                        fix="re-run the finetune stage")
    return conds


def finetune_test_accuracy(cfg: ExperimentConfig) -> float | None:
    """The test accuracy the fine-tuning stage measured on its final checkpoint for this run's
    own task (None when the stage has not finished or did not score a test split).

    A generated task's accuracy is read from the result's per-task scores where they hold the
    run's task, so a run reading a fine-tuning shared with other tasks' runs (whose
    ``test_accuracy`` is the task of the run that trained it) gets its own task's number."""
    from replandscape.stored import read_finetune_result

    path = finetune_dir(cfg) / "result.json"
    if not path.is_file():
        return None
    data = read_finetune_result(path)
    own = task_test_accuracy(data.get("task_accuracy"), cfg.task.name, cfg.task.scoring)
    if own is not None:
        return own
    value = data.get("test_accuracy")
    return None if value is None else float(value)


def task_test_accuracy(scores: object, task: str, rule: str) -> float | None:
    """One task's 0-shot test accuracy from a fine-tuning result's ``task_accuracy``
    (``{task: {variant: {"strict", "substring", "n"}}}``): the ``rule`` score of its variants
    weighted by their items, as extraction counts them; None when ``scores`` lacks the task."""
    if not isinstance(scores, dict) or not isinstance(scores.get(task), dict):
        return None
    own = scores[task]
    n = sum(int(v["n"]) for v in own.values())
    return sum(float(v[rule]) * int(v["n"]) for v in own.values()) / max(1, n)
