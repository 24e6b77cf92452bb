"""Models and tokenizers: resolving paths, building tiny offline ones, loading through
``from_pretrained`` exactly as real checkpoints are loaded.

``builtin:tiny-llama``, ``builtin:tiny-mistral``, ``builtin:tiny-qwen2``, ``builtin:tiny-gpt-neox`` and
``builtin:tiny-gpt-neo`` name small randomly initialised causal LMs of each supported family (shape
from the model config) sharing one byte-level BPE tokenizer trained on the bundled data. They are
built once into the cache and then loaded like any saved checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from replandscape.config import BUILTIN_PREFIX, ModelConfig, looks_like_hub_id
from replandscape.data import cache_root, resolve_builtin_data
from replandscape.errors import UserError

TINY_FAMILIES = {"tiny-llama": "llama", "tiny-mistral": "mistral", "tiny-qwen2": "qwen2",
                 "tiny-gpt-neox": "gpt_neox", "tiny-gpt-neo": "gpt_neo"}
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


def _tokenizer_corpus() -> list[str]:
    from replandscape.data import DataConfig, load_split
    from replandscape.prompts import header, shot_block

    folder = resolve_builtin_data("builtin:demo-mmlu")
    cfg = DataConfig(source=str(folder))
    texts = []
    for split in ("dev", "validation", "test"):
        for q in load_split(cfg, split):
            texts.append(header(q.subject) + shot_block(q))
    return texts


def build_tokenizer(folder: Path, vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE tokenizer (Llama-3-like: BOS added, answer letters after a space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=8192)
    fast.save_pretrained(folder)
    return fast


def tiny_model_config(cfg: ModelConfig, family: str, tokenizer: Any) -> Any:
    """A transformers config of ``family`` with ``cfg``'s tiny shape and ``tokenizer``'s ids.

    Llama-style families get grouped-query attention (half as many key/value heads) so that the
    sites code meets ``n_kv_heads < n_heads``; GPT-NeoX keeps its default parallel residual and
    GPT-Neo alternates global and local attention like the released checkpoints.
    """
    from transformers import GPTNeoConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    ids: dict[str, Any] = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if family == "gpt_neo":
        n = cfg.n_layers
        layers: list[Any] = [[["global", "local"], n // 2]] + ([[["global"], 1]] if n % 2 else [])
        return GPTNeoConfig(**ids, hidden_size=cfg.hidden_size, num_layers=n,
                            num_heads=cfg.tiny_heads, intermediate_size=cfg.tiny_intermediate_size,
                            max_position_embeddings=cfg.context_length, attention_types=layers)
    common: dict[str, Any] = dict(
        **ids, hidden_size=cfg.hidden_size, intermediate_size=cfg.tiny_intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.tiny_heads,
        max_position_embeddings=cfg.context_length)
    if family == "gpt_neox":
        return GPTNeoXConfig(**common, use_parallel_residual=True)
    common["num_key_value_heads"] = max(1, cfg.tiny_heads // 2)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if family == "llama":
        return LlamaConfig(**common)
    raise UserError(f"no tiny model of family '{family}'", key="model.family",
                    fix=f"use one of {', '.join(sorted(set(TINY_FAMILIES.values())))}")


def build_tiny_model(folder: Path, cfg: ModelConfig, family: str = "llama", seed: int = 0) -> Path:
    """Save a randomly initialised causal LM of ``cfg``'s shape and a tokenizer to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    config = tiny_model_config(cfg, family, tokenizer)
    # transformers loads some families' tokenizers with their own class (a qwen2 folder gets
    # Qwen2Tokenizer, which adds <|endoftext|>): size the embeddings to the tokenizer the folder
    # will actually be loaded with, as a real checkpoint's are
    config.save_pretrained(folder)
    config.vocab_size = max(config.vocab_size, len(AutoTokenizer.from_pretrained(folder)))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


def _builtin_key(cfg: ModelConfig, name: str) -> str:
    shape = {"name": name, "layers": cfg.n_layers, "hidden": cfg.hidden_size,
             "inter": cfg.tiny_intermediate_size, "heads": cfg.tiny_heads,
             "ctx": cfg.context_length, "v": 2}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]


def resolve_model_path(cfg: ModelConfig) -> str:
    """A loadable folder or hub id for ``cfg.path``; builds builtin models on first use."""
    path = cfg.path
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in TINY_FAMILIES:
            raise UserError(f"unknown builtin model '{name}'", key="model.path",
                            fix=f"use one of {', '.join('builtin:' + n for n in TINY_FAMILIES)}")
        folder = cache_root() / "models" / f"{name}-{_builtin_key(cfg, name)}"
        if not (folder / "config.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=folder.parent))
            build_tiny_model(tmp, cfg, TINY_FAMILIES[name])
            try:
                os.replace(tmp, folder)
            except OSError:  # built concurrently by another rank
                shutil.rmtree(tmp, ignore_errors=True)
        return str(folder)
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"'{path}' has no config.json", file=path, key="model.path",
                            fix="point model.path at a folder written by save_pretrained")
        return path
    if looks_like_hub_id(path):
        return path
    raise UserError(f"model folder '{path}' does not exist", file=path, key="model.path",
                    fix="point model.path at a folder made by save_pretrained, a hub id, or "
                        "builtin:tiny-llama")


def load_tokenizer(path: str, revision: str | None = None, padding_side: str = "left") -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
    except OSError as exc:
        raise UserError(f"cannot load a tokenizer: {str(exc).splitlines()[0][:160]}", file=path,
                        key="model.path", fix="check the model folder or hub id") from None
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _adapter_error(adapter: str, exc: BaseException) -> UserError:
    """One line naming the adapter's weights file and what is wrong with it."""
    folder = Path(adapter)
    weights = next((folder / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                    if (folder / n).is_file()), folder / "adapter_model.safetensors")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    if "size mismatch" in str(exc):
        return UserError(f"the adapter does not fit this model: {first}", file=str(weights),
                         key="checkpoint", fix="use an adapter trained on the configured model")
    return UserError(f"cannot read the adapter weights ({type(exc).__name__}: {first})",
                     file=str(weights), key="checkpoint",
                     fix="the file is truncated or corrupt: re-run the finetune stage or copy it "
                         "again")


def load_causal_lm(path: str, *, revision: str | None = None, dtype: str = "float32",
                   device: str = "cpu", adapter: str | None = None) -> Any:
    """Load a causal LM (and optionally a LoRA adapter on top) in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision,
                                                     dtype=torch_dtype(dtype))
    except OSError as exc:
        raise UserError(f"cannot load the model: {str(exc).splitlines()[0][:160]}", file=path,
                        key="model.path", fix="check the model folder or hub id") from None
    if adapter:
        from peft import PeftModel
        from safetensors import SafetensorError

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError("not a LoRA adapter folder (no adapter_config.json)", file=adapter,
                            key="checkpoint", fix="point at an adapter saved by the finetune stage")
        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (SafetensorError, OSError, EOFError, ValueError, RuntimeError) as exc:
            # a truncated or corrupt weights file (SafetensorError; torch.load's EOF and
            # unpickling errors for .bin) or an adapter saved for another model's shapes
            raise _adapter_error(adapter, exc) from None
    model.to(device)  # type: ignore[arg-type]  # transformers' stub types .to() too narrowly
    model.eval()
    return model
