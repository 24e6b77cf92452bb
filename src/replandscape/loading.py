"""Loading the model of a condition on this rank, partitioned by ZeRO-3 when ranks share it
(docs/method.md §3.7-3.8): no rank ever holds the whole model, base or fine-tuned."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from replandscape.config import ExperimentConfig
from replandscape.dist import torchdist


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    engine: Any = None


def load_for_extraction(cfg: ExperimentConfig, device: str, adapter: str | None,
                        model_path: str | None = None) -> LoadedModel:
    """The model of one condition, ready for extraction on this rank.

    Under ZeRO-3 the base model is partitioned while it loads (``zero.Init`` through
    ``HfDeepSpeedConfig``), with or without an adapter: no rank ever holds the whole model. A
    LoRA adapter is applied as ``extract.adapter`` says: beside the base weights (``unmerged``,
    the default: exactly the model the fine-tuning stage evaluated) or added into them in float32
    one layer at a time under gathered parameters (``merged``).
    """
    from replandscape.models import load_causal_lm, load_tokenizer, resolve_model_path

    path = model_path or resolve_model_path(cfg.model)
    dtype = cfg.model.dtype if device.startswith("cuda") else cfg.model.cpu_dtype
    if device == "cpu":
        import torch

        # merged LoRA weights can push activations into float32 denormals, which x86 CPUs
        # compute tens of times slower (seen: 1.7 s instead of 0.1 s a batch); values below
        # 1e-38 change nothing that is stored
        torch.set_flush_denormal(True)
    tokenizer = load_tokenizer(path, cfg.model.revision, cfg.extract.padding_side)
    if not partitioned(cfg):
        model = load_causal_lm(path, revision=cfg.model.revision, dtype=dtype, device="cpu")
        if adapter is not None:
            model = apply_adapter(model, adapter, cfg.extract.adapter)
        model.to(device)
        model.eval()
        return LoadedModel(model, tokenizer, device, dtype)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = zero3_inference_config(dtype, torchdist.model_hidden_size(path, cfg.model.revision))
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - from_pretrained partitions while alive
    model = load_causal_lm(path, revision=cfg.model.revision, dtype=dtype, device="cpu")
    if adapter is not None:
        model = apply_adapter(model, adapter, cfg.extract.adapter)
    engine = deepspeed.initialize(model=model, config=ds_config)[0]
    engine.module.eval()
    del keep
    return LoadedModel(engine.module, tokenizer, device, dtype, engine)


def partitioned(cfg: ExperimentConfig) -> bool:
    """Whether this run's model is partitioned by ZeRO-3 over its ranks (``extract.zero_stage``
    3 with more than one rank); the ranks must then run every forward pass together."""
    return cfg.extract.zero_stage == 3 and torchdist.is_distributed()


def inference_memory(cfg: ExperimentConfig) -> contextlib.AbstractContextManager[Any]:
    """What a stage running the model holds open: under ZeRO-3, which gathers each layer's full
    weights and frees them after use layer after layer, the freed copies must leave the process
    (:func:`replandscape.allocator.return_freed_memory`); otherwise nothing."""
    from replandscape.allocator import return_freed_memory

    return return_freed_memory() if partitioned(cfg) else contextlib.nullcontext()


def apply_adapter(model: Any, adapter: str, mode: str) -> Any:
    """Put the LoRA adapter saved in ``adapter`` on ``model`` (see :func:`load_for_extraction`)."""
    from replandscape.adapters import merge_lora_float32, read_lora

    lora = read_lora(adapter)
    if mode == "merged":
        merge_lora_float32(model, lora)
        return model
    from peft import PeftModel

    # adapter weights keep their own precision (float32 beside a bf16 base), as in training
    peft_model = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=True)
    peft_model.eval()
    return peft_model


def zero3_inference_config(dtype: str, hidden_size: int | None = None) -> dict[str, Any]:
    """DeepSpeed ZeRO-3 settings for inference: each rank holds its share of the weights plus the
    layer being computed and a bounded prefetch (:func:`torchdist.zero3_bounded_memory`)."""
    zero = {**torchdist.zero3_bounded_memory(hidden_size),
            "stage3_param_persistence_threshold": 0, "overlap_comm": False}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
