"""LoRA adapters saved by the fine-tuning stage: checked reading and a float32 merge that works on
a model partitioned by ZeRO-3.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's format).
:func:`read_lora` refuses a folder that is not one, or whose weights are truncated or damaged, in
one line naming the file. :func:`merge_lora_float32` adds ``scale * B @ A`` to each target weight
in float32 and casts the sum back once, one module at a time; under ZeRO-3 each weight is gathered
for its own update only (rank 0 writes, DeepSpeed re-partitions), so no rank holds more than one
layer's weight beyond its share.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replandscape.errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FIX = "re-run the finetune stage to rewrite this checkpoint, or point at another one"


@dataclass(frozen=True)
class LoraWeights:
    """One adapter: its config and its tensors (as saved, on the CPU)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, Any]

    @property
    def scale(self) -> float:
        r, alpha = int(self.config["r"]), float(self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def pairs(self) -> dict[str, tuple[Any, Any]]:
        """Module name in the base model -> (A [r, in], B [out, r])."""
        out: dict[str, tuple[Any, Any]] = {}
        for key, a in self.tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            b = self.tensors.get(module + ".lora_B.weight")
            if b is None:
                raise UserError(f"'{key}' has no matching lora_B weight",
                                file=str(self.path / WEIGHTS_FILE), fix=FIX)
            for prefix in ("base_model.model.",):
                if module.startswith(prefix):
                    module = module[len(prefix):]
            out[module] = (a, b)
        return out


def read_lora(folder: str | Path) -> LoraWeights:
    """Read and check an adapter folder; every problem is one :class:`UserError` line."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(f"not a LoRA adapter folder (no {CONFIG_FILE})", file=str(folder),
                        key="checkpoint", fix="point at an adapter saved by the finetune stage")
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"adapter config is not valid JSON ({type(exc).__name__})",
                        file=str(cfg_path), fix=FIX) from None
    if not isinstance(config, dict) or not isinstance(config.get("r"), int) or not isinstance(
            config.get("lora_alpha"), (int, float)):
        raise UserError("adapter config lacks an integer 'r' and a numeric 'lora_alpha'",
                        file=str(cfg_path), fix=FIX)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"adapter weights are missing ({WEIGHTS_FILE})", file=str(folder), fix=FIX)
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for truncated headers/data
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"adapter weights cannot be read, truncated or damaged ({first})",
                        file=str(weights), fix=FIX) from None
    if not any(k.endswith(".lora_A.weight") for k in tensors):
        raise UserError("adapter weights hold no LoRA matrices", file=str(weights), fix=FIX)
    return LoraWeights(folder, config, tensors)


def merge_lora_float32(model: Any, lora: LoraWeights) -> int:
    """Add every LoRA update of ``lora`` into ``model``'s weights in float32, then cast back.

    Works on a plain model and on one whose parameters ZeRO-3 has partitioned (every rank must
    call it: gathering is collective). Returns the number of weights updated.
    """
    import torch

    if lora.config.get("use_dora") or lora.config.get("rank_pattern") or lora.config.get(
            "alpha_pattern"):
        raise UserError("this adapter (DoRA or per-module ranks) cannot be merged here",
                        file=str(lora.path / CONFIG_FILE), key="extract.adapter",
                        fix="use extract.adapter=unmerged")
    transpose = bool(lora.config.get("fan_in_fan_out"))
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 0
    updated = 0
    for name, (a, b) in sorted(lora.pairs().items()):
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise UserError(f"the adapter targets '{name}', which the model lacks",
                            file=str(lora.path / WEIGHTS_FILE), key="model.path",
                            fix="extract with the base model the adapter was trained on") from None
        delta = lora.scale * (b.to(torch.float32) @ a.to(torch.float32))
        if transpose:
            delta = delta.T
        if hasattr(weight, "ds_id"):  # partitioned by ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
                if rank == 0:
                    _add_in_float32(weight, delta)
        else:
            _add_in_float32(weight, delta)
        updated += 1
    return updated


def _add_in_float32(weight: Any, delta: Any) -> None:
    import torch

    with torch.no_grad():
        if tuple(weight.shape) != tuple(delta.shape):
            raise UserError(f"adapter update of shape {tuple(delta.shape)} does not fit a weight "
                            f"of shape {tuple(weight.shape)}", key="model.path",
                            fix="extract with the base model the adapter was trained on")
        summed = weight.data.to(torch.float32) + delta.to(weight.device)
        weight.data.copy_(summed.to(weight.dtype))
