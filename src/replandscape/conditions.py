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

    folder = cfg.output_dir / "finetune"
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
    """The test accuracy the fine-tuning stage measured on its final adapter (None when the
    stage has not finished or did not score a test split)."""
    from replandscape.stored import read_finetune_result

    path = cfg.output_dir / "finetune" / "result.json"
    if not path.is_file():
        return None
    value = read_finetune_result(path).get("test_accuracy")
    return None if value is None else float(value)
