"""Extraction: last-token representations at every site, the model's answer, per condition.

For each condition (k-shot prompts, or a fine-tuned checkpoint with 0-shot prompts) every eval
question is run once, whatever the number of ranks: rows are split into contiguous blocks balanced
by tokens, each rank runs its block in length-sorted batches and writes it with the storage
contract. Forward hooks keep only the last real token's vector at each site (or the mean over
prompt tokens), so no [batch, tokens, width] tensor outlives its layer. Logits are computed only
for the kept token, by applying the output head to the final-norm vector.

With several ranks and ``extract.zero_stage: 3`` the model is partitioned by DeepSpeed ZeRO-3
(parameters gathered layer by layer), so every rank must run the same number of forward passes;
ranks with fewer batches run small padding batches whose outputs are discarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from replandscape import __version__
from replandscape.config import ExperimentConfig
from replandscape.dist import torchdist
from replandscape.errors import UserError
from replandscape.evalset import (
    EvalRecord,
    eval_records,
    is_generated,
    label_columns,
    max_new_tokens,
    records_digest,
)
from replandscape.outputs import ensure_dir
from replandscape.progress import progress as make_progress
from replandscape.prompts import letter_token_ids
from replandscape.storage import (
    MpioWriter,
    ShardWriter,
    SiteSpec,
    accuracy_summary,
    encode_rows,
    finalize_mpio,
    finalize_shards,
    mpio_available,
    open_activations,
    split_rows,
)


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

    @property
    def finetuned(self) -> bool:
        return bool(self.method) or self.adapter is not None or self.model_path is not None


@dataclass
class ExtractResult:
    files: dict[str, Path] = field(default_factory=dict)
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


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
        final = entry.name == "adapter-final"
        if cfg.extract.checkpoints == "final" and not final:
            continue
        name = "ft-final" if final else f"ft-step{entry.step:06d}"
        kind = str(getattr(entry, "kind", "lora") or "lora")
        seen = getattr(entry, "examples_seen", None)
        seen = entry.step * cfg.finetune.effective_batch if seen is None else int(seen)
        if kind == "full":
            conds.append(Condition(name=name, shots=0, model_path=str(path),
                                   checkpoint_step=entry.step, method="full",
                                   examples_seen=seen))
        else:
            conds.append(Condition(name=name, shots=0, adapter=str(path),
                                   checkpoint_step=entry.step, method="lora", examples_seen=seen))
    if not conds:
        raise UserError("no usable fine-tuned checkpoint listed", file=str(index),
                        fix="re-run the finetune stage")
    return conds


def check_context(cfg: ExperimentConfig, records: Mapping[int, Sequence[EvalRecord]]) -> None:
    """Refuse, before any model is loaded, a shot count whose prompts do not fit the model's
    context (with room for the generated tokens of a generated task)."""
    from replandscape.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model.revision)
    reserve = max_new_tokens(cfg) if is_generated(cfg) else 0
    for shots, recs in sorted(records.items()):
        tokenize(tokenizer, [r.prompt for r in recs], cfg.prompts.add_bos,
                 cfg.model.context_length, [r.id for r in recs], shots=shots, reserve=reserve)


def finetune_test_accuracy(cfg: ExperimentConfig) -> float | None:
    """The test accuracy the fine-tuning stage measured on its final adapter (None when the
    stage has not finished or did not score a test split)."""
    from replandscape.stored import read_finetune_result

    path = cfg.output_dir / "finetune" / "result.json"
    if not path.is_file():
        return None
    value = read_finetune_result(path).get("test_accuracy")
    return None if value is None else float(value)


# --------------------------------------------------------------------------------------------
# sites and hooks
# --------------------------------------------------------------------------------------------


def decoder_parts(model: Any) -> tuple[Any, Sequence[Any], Any, Any]:
    """(decoder, blocks, final norm, output head) of a causal LM of a supported family."""
    from replandscape.sites import resolve_sites

    found = resolve_sites(model)
    return found.decoder, found.blocks, found.final_norm, found.head


def site_names(kinds: Sequence[str], n_blocks: int) -> list[str]:
    width = max(2, len(str(n_blocks - 1)))
    names = []
    for kind in kinds:
        if kind in ("norm", "logits"):
            names.append(kind)
        else:
            names.extend(f"{kind}.{i:0{width}d}" for i in range(n_blocks))
    return names


class LastTokenCapture:
    """Forward hooks that keep, per site, only the kept token's vector (or the prompt mean).

    Sites are found through the shared site vocabulary (:mod:`replandscape.sites`), so every
    supported family is read at the same places that patching and knockout use.
    """

    def __init__(self, model: Any, kinds: Sequence[str], pooling: str) -> None:
        from replandscape.sites import resolve_sites

        self.root = model
        self.sites = resolve_sites(model)
        self.decoder, self.blocks = self.sites.decoder, self.sites.blocks
        self.norm, self.head = self.sites.final_norm, self.sites.head
        self.kinds = list(kinds)
        self.pooling = pooling
        self.names = site_names(kinds, len(self.blocks))
        self.out: dict[str, Any] = {}
        self.positions: Any = None
        self.mask: Any = None
        self.last_norm: Any = None
        self.handles: list[Any] = []
        # off while a batch is continued by generation: the decoding steps are not prompt sites
        self.enabled = True

    def _reduce(self, hidden: Any) -> Any:
        import torch

        if isinstance(hidden, (tuple, list)):
            hidden = hidden[0]
        if self.pooling == "mean":
            m = self.mask.to(hidden.dtype).unsqueeze(-1)
            summed = torch.where(m > 0, hidden, torch.zeros_like(hidden)).float().sum(1)
            return summed / self.mask.sum(1, keepdim=True).float()
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), self.positions]

    def _output_hook(self, name: str) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            if self.enabled:
                self.out[name] = self._reduce(output)

        return hook

    def _input_hook(self, name: str) -> Any:
        def hook(_module: Any, args: Any, kwargs: Any) -> None:
            if self.enabled:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.out[name] = self._reduce(hidden)

        return hook

    def _norm_hook(self, _module: Any, _args: Any, output: Any) -> None:
        import torch

        if not self.enabled:
            return
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        self.last_norm = hidden[torch.arange(hidden.shape[0], device=hidden.device),
                                self.positions]
        if "norm" in self.kinds:
            self.out["norm"] = self._reduce(hidden)

    def __enter__(self) -> LastTokenCapture:
        from replandscape.sites import site_modules

        width = max(2, len(str(len(self.blocks) - 1)))
        for kind in self.kinds:
            if kind in ("norm", "logits"):
                continue
            for i in range(len(self.blocks)):
                name = f"{kind}.{i:0{width}d}"
                module, side = site_modules(self.sites, kind, i)
                if side == "input":
                    self.handles.append(module.register_forward_pre_hook(
                        self._input_hook(name), with_kwargs=True))
                else:
                    self.handles.append(module.register_forward_hook(self._output_hook(name)))
        self.handles.append(self.norm.register_forward_hook(self._norm_hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _head_input_hook(self, _module: Any, args: Any) -> Any:
        # the head sees only the kept token of each prompt (whatever the padding side), so the
        # logits of the other positions are never computed
        return (self.last_norm.unsqueeze(1),) + tuple(args[1:])

    def run(self, input_ids: Any, attention_mask: Any) -> tuple[dict[str, Any], Any]:
        """One batch: returns (site -> [B, D] tensor, last-token logits [B, V])."""
        out, logits, _ = self.run_with_cache(input_ids, attention_mask, use_cache=False)
        return out, logits

    def run_with_cache(self, input_ids: Any, attention_mask: Any,
                       use_cache: bool) -> tuple[dict[str, Any], Any, Any]:
        """One batch: (site -> [B, D] tensor, last-token logits [B, V], key/value cache or None).

        The forward goes through the root module (the model DeepSpeed was given), never its
        decoder or head alone, so ZeRO-3's start- and end-of-forward hooks run on every batch.
        With ``use_cache`` the cache of the prompt is returned, for generation to continue from.
        """
        import torch

        self.out = {}
        self.mask = attention_mask
        idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        self.positions = (attention_mask * idx).argmax(1)
        # explicit positions: left padding must not shift a prompt's positions
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        handle = self.head.register_forward_pre_hook(self._head_input_hook)
        try:
            output = self.root(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=use_cache)
        finally:
            handle.remove()
        logits = output.logits[:, -1]
        if "logits" in self.kinds:
            self.out["logits"] = logits
        return self.out, logits, (output.past_key_values if use_cache else None)


# --------------------------------------------------------------------------------------------
# tokens and batches
# --------------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, prompts: Sequence[str], add_bos: bool, context_length: int,
             ids: Sequence[int], *, shots: int | None = None,
             reserve: int = 0) -> list[list[int]]:
    """Token ids of each prompt (BOS first when asked); a prompt that does not fit the model's
    context (with ``reserve`` tokens left for generation) is one error naming the shot count."""
    encoded = tokenizer(list(prompts), add_special_tokens=add_bos)["input_ids"]
    bos = tokenizer.bos_token_id
    out = []
    for qid, tokens in zip(ids, encoded):
        tokens = list(tokens)
        if add_bos and bos is not None and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        if len(tokens) + reserve > context_length:
            at = f" at {shots} shots" if shots is not None else ""
            plus = f" + {reserve} to generate" if reserve else ""
            raise UserError(f"item {qid}: the prompt{at} has {len(tokens)} tokens{plus}, over the "
                            f"model's context of {context_length}", key="prompts.shots",
                            fix="use fewer shots or a model with a longer context")
        out.append(tokens)
    return out


def plan_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int,
                 max_batch_tokens: int) -> list[np.ndarray]:
    """Length-sorted batches (longest first) under a size and a padded-token budget."""
    order = rows[np.argsort(-lengths[rows], kind="stable")]
    batches: list[np.ndarray] = []
    current: list[int] = []
    longest = 0
    for row in order:
        n = int(lengths[row])
        width = max(longest, n)
        if current and (len(current) >= batch_size or width * (len(current) + 1) > max_batch_tokens):
            batches.append(np.asarray(current, dtype=np.int64))
            current, width = [], n
        current.append(int(row))
        longest = width
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return batches


def collate(token_lists: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[Any, Any]:
    import torch

    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        t = torch.as_tensor(tokens, dtype=torch.long)
        if side == "left":
            ids[i, width - len(t):] = t
            mask[i, width - len(t):] = 1
        else:
            ids[i, : len(t)] = t
            mask[i, : len(t)] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def stage_hash(cfg: ExperimentConfig, condition: Condition,
               records: Sequence[EvalRecord] | None = None) -> str:
    """Identity of one condition's output: what changes the stored rows, and nothing else.

    Besides the config sections that matter, it covers a digest of every prompt and target the
    model sees (:func:`evalset.records_digest`), so any change of a prompt-template field, a shot,
    an item or a generator option redoes the extraction.
    """
    if records is None:
        records = prepare_records(cfg, condition.shots)
    d = cfg.to_dict()
    key = {"task": d["task"], "data": d["data"],
           "prompts": {"seed": d["prompts"]["seed"], "add_bos": d["prompts"]["add_bos"]},
           "model": d["model"], "extract": {k: v for k, v in d["extract"].items()
                                            if k not in ("batch_size", "max_batch_tokens",
                                                         "device", "checkpoints")},
           "condition": [condition.name, condition.shots, condition.checkpoint_step],
           "prompts_digest": records_digest(records)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


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
    zero3 = cfg.extract.zero_stage == 3 and torchdist.is_distributed()
    if not zero3:
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


def _store_dtype(cfg: ExperimentConfig, model_dtype: str) -> str:
    return model_dtype if cfg.extract.store_dtype == "model" else cfg.extract.store_dtype


def prepare_records(cfg: ExperimentConfig, shots: int) -> list[EvalRecord]:
    """The prompts of one shot count, for the run's task (:mod:`replandscape.evalset`)."""
    return eval_records(cfg, shots)


def mpio_comm(cfg: ExperimentConfig, info: torchdist.RankInfo) -> Any:
    """The MPI communicator to write through MPI-IO, or None for per-rank shards."""
    choice = cfg.extract.writer
    if choice == "shards":
        return None
    from replandscape.dist import mpi

    usable = mpio_available() and mpi.launched_by_mpi()
    comm = mpi.world() if usable else None
    if comm is not None and comm.size != info.world_size:
        comm = None  # the MPI world is not the torch world (e.g. ranks from another launcher)
    if comm is None and choice == "mpio":
        raise UserError("MPI-IO needs h5py built with MPI and ranks launched by srun/mpiexec",
                        key="extract.writer", fix="use extract.writer=auto or shards")
    return comm


def existing_output(cfg: ExperimentConfig, condition: Condition,
                    records: Sequence[EvalRecord] | None = None) -> Path | None:
    """The finished file of a condition, if any; one holding another config is refused."""
    final = cfg.output_dir / "activations" / f"{condition.name}.h5"
    if not final.exists():
        return None
    with open_activations(final) as af:
        if af.attrs.get("stage_hash") != stage_hash(cfg, condition, records):
            raise UserError("the output already holds a different config", file=str(final),
                            key="stage_hash", fix="use another run.output_dir or delete the file")
    return final


def generated_token_fields(n: int) -> dict[str, Any]:
    """Row fields holding the generated token ids while ranks write (decoded at the end)."""
    return {f"gen_token_{j:02d}": np.int32 for j in range(n)}


def extract_condition(cfg: ExperimentConfig, condition: Condition, loaded: LoadedModel,
                      records: Sequence[EvalRecord] | None = None) -> Path:
    """Extract one condition into ``activations/<name>.h5``; resumes a partial run.

    MMLU prompts are scored from the answer-letter logits of the prompt's forward pass; a
    generated task's prompts are continued greedily from the same forward pass (its key/value
    cache) and scored on the text (docs/method.md §7).
    """
    import torch

    from replandscape.generation import decode_continuations, eos_token_ids, greedy_continue
    from replandscape.tasks.scoring import score_strict, score_substring

    info = torchdist.rank_info() if torchdist.is_distributed() else torchdist.RankInfo(0, 1, 0)
    out_dir = cfg.output_dir / "activations"
    final = out_dir / f"{condition.name}.h5"
    if records is None:
        records = prepare_records(cfg, condition.shots)
    s_hash = stage_hash(cfg, condition, records)
    existing = existing_output(cfg, condition, records)
    if existing is not None:
        return existing
    generated = is_generated(cfg)
    if generated and cfg.extract.padding_side != "left":
        raise UserError("generation continues every prompt from its last position: it needs "
                        "left padding", key="extract.padding_side", fix="set it to left")
    tokenizer = loaded.tokenizer
    tokens = tokenize(tokenizer, [r.prompt for r in records], cfg.prompts.add_bos,
                      cfg.model.context_length, [r.id for r in records], shots=condition.shots,
                      reserve=max_new_tokens(cfg) if is_generated(cfg) else 0)
    lengths = np.asarray([len(t) for t in tokens], dtype=np.int64)
    letter_ids = [] if generated else letter_token_ids(tokenizer, cfg.data.num_choices)
    n_new = max_new_tokens(cfg) if generated else 0
    extra_fields = {**generated_token_fields(n_new), "correct_substring": np.bool_} \
        if generated else {}
    eos = eos_token_ids(loaded.model, tokenizer) if generated else []
    capture = LastTokenCapture(loaded.model, cfg.extract.sites, cfg.extract.pooling)
    store = _store_dtype(cfg, loaded.dtype)
    head_dim = loaded.model.config.vocab_size
    hidden = loaded.model.config.hidden_size
    specs = [SiteSpec(n, head_dim if n == "logits" else hidden, store) for n in capture.names]
    start, stop = split_rows(lengths.tolist(), info.world_size)[info.rank]
    if info.is_main:
        ensure_dir(out_dir)
    torchdist.barrier()
    comm = mpio_comm(cfg, info)
    writer: ShardWriter | MpioWriter
    if comm is not None:
        writer = MpioWriter(final, comm, len(records), specs, s_hash, extra_fields=extra_fields)
        done = writer.done_rows(start, stop)
    else:
        writer = ShardWriter(final, info.rank, info.world_size, start, stop, specs, s_hash,
                             extra_fields=extra_fields)
        done = writer.done_mask()
    todo = np.arange(start, stop)[~done]
    batches = plan_batches(todo, lengths, cfg.extract.batch_size, cfg.extract.max_batch_tokens)
    n_batches = len(batches)
    in_step = loaded.engine is not None or comm is not None
    if in_step:
        # ZeRO-3 gathers parameters and MPI-IO flushes collectively: every rank runs the
        # same number of steps (and, generating, the same number of decoding steps)
        n_batches = max(torchdist.all_gather_object(len(batches)))
    pad_id = tokenizer.pad_token_id
    letters = torch.as_tensor(letter_ids, device=loaded.device)
    progress = make_progress(n_batches, f"extract {condition.name}", show=info.is_main,
                             unit="batch")
    answers = np.asarray([r.answer for r in records], dtype=np.int64)
    targets = [r.target for r in records]
    batch_lines = os.environ.get("REPLANDSCAPE_BATCH_LINES") == "1"
    try:
        with capture, torch.inference_mode():
            for b in range(n_batches):
                rows = batches[b] if b < len(batches) else None
                seqs = [tokens[i] for i in rows] if rows is not None else [tokens[0][:1]]
                ids, mask = collate(seqs, pad_id, cfg.extract.padding_side)
                ids, mask = ids.to(loaded.device), mask.to(loaded.device)
                out, logits, past = capture.run_with_cache(ids, mask, use_cache=generated)
                new_ids = None
                if generated:
                    capture.enabled = False  # the decoding steps are not sites of the prompt
                    try:
                        new_ids = greedy_continue(
                            capture.root, ids, mask, n_new, pad_token_id=pad_id,
                            eos_token_id=eos, stop_in_step=in_step, first_logits=logits,
                            past=past)
                    finally:
                        capture.enabled = True
                progress.update(1)
                if rows is None:
                    if comm is not None:
                        writer.write(np.zeros(0, dtype=np.int64), {}, {})  # the collective flush
                    continue
                site_values = {n: encode_rows(out[n].detach().cpu(), store) for n in capture.names}
                row_values: dict[str, Any] = {
                    "question_id": np.asarray([records[i].id for i in rows]),
                    "answer": answers[rows], "n_tokens": lengths[rows]}
                if new_ids is not None:
                    texts = decode_continuations(tokenizer, new_ids, eos)
                    strict = np.asarray([score_strict(t, targets[i]) for t, i in zip(texts, rows)])
                    loose = np.asarray([score_substring(t, targets[i])
                                        for t, i in zip(texts, rows)])
                    row_values.update(
                        predicted=np.full(len(rows), -1),
                        correct=strict if cfg.task.scoring == "strict" else loose,
                        correct_substring=loose)
                    new_np = new_ids.cpu().numpy()
                    for j in range(n_new):
                        row_values[f"gen_token_{j:02d}"] = (new_np[:, j] if j < new_np.shape[1]
                                                            else np.full(len(rows), pad_id))
                else:
                    predicted = logits[:, letters].float().argmax(-1).cpu().numpy()
                    row_values.update(predicted=predicted, correct=predicted == answers[rows])
                writer.write(rows, site_values, row_values)
                if batch_lines:
                    print(f"[extract] rank {info.rank} wrote batch {b + 1}/{len(batches)} "
                          f"({condition.name})", file=sys.stderr, flush=True)
    finally:
        progress.close()
        writer.close()
    torchdist.barrier()
    if info.is_main:
        header = {
            "site_names": capture.names, "model_name": cfg.model.name,
            "model_path": cfg.model.path, "model_revision": cfg.model.revision or "",
            "task": cfg.task.name, "label_columns": list(label_columns(cfg)),
            "condition": condition.name, "shots": condition.shots,
            "checkpoint": condition.adapter or condition.model_path or "", "checkpoint_step": (
                -1 if condition.checkpoint_step is None else condition.checkpoint_step),
            "examples_seen": -1 if condition.examples_seen is None else condition.examples_seen,
            "finetuned": condition.finetuned, "method": condition.method,
            "config": cfg.to_yaml(), "config_hash": cfg.hash, "stage_hash": s_hash,
            "code_version": code_version(), "pooling": cfg.extract.pooling,
            "letter_token_ids": letter_ids, "padding_side": cfg.extract.padding_side,
            "dtype": loaded.dtype, "store_dtype": store,
            "zero_stage": 3 if loaded.engine is not None else 0,
            "world_size": info.world_size, "adapter_mode": (
                cfg.extract.adapter if condition.adapter is not None else ""),
        }
        if generated:
            header.update(scoring=cfg.task.scoring, max_new_tokens=n_new,
                          generation="greedy, KV cache, left padding")
        if condition.name == "ft-final":
            # what the fine-tuning stage scored on the same questions: a later reader (status,
            # the report) can tell whether the extracted model is the one that was evaluated
            reference = finetune_test_accuracy(cfg)
            header["finetune_test_accuracy"] = -1.0 if reference is None else reference
        groups, prompts = [r.group for r in records], [r.prompt for r in records]
        derive = _decoded_rows(records, tokenizer, n_new, eos) if generated else None
        if comm is not None:
            finalize_mpio(final, specs, header, groups, prompts, extra_fields=extra_fields,
                          derive=derive)
        else:
            finalize_shards(final, info.world_size, specs, header, groups, prompts,
                            extra_fields=extra_fields, derive=derive)
    torchdist.barrier()
    return final


def _decoded_rows(records: Sequence[EvalRecord], tokenizer: Any, n_new: int,
                  eos: Sequence[int]) -> Any:
    """Finalisation of a generated task: the continuations as text, the target and label
    columns, and the substring-rule accuracy beside the strict one."""

    def derive(numeric: Mapping[str, np.ndarray]) -> tuple[dict[str, list[str]], dict[str, Any]]:
        import torch

        from replandscape.generation import decode_continuations

        new_ids = np.stack([numeric[f"gen_token_{j:02d}"] for j in range(n_new)], axis=1) \
            if n_new else np.zeros((len(records), 0), dtype=np.int64)
        texts = decode_continuations(tokenizer, torch.as_tensor(new_ids, dtype=torch.long), eos)
        groups = [r.group for r in records]
        substring = accuracy_summary(groups, np.asarray(numeric["correct_substring"], dtype=bool))
        strings = {"continuation": texts, "target": [r.target for r in records],
                   "variant": [r.labels.get("variant", r.group) for r in records]}
        return strings, {"accuracy_substring": json.dumps(substring)}

    return derive


def run(cfg: ExperimentConfig, *, finetuned: bool = False) -> ExtractResult:
    """Extract every condition of ``cfg`` (k-shot ones, or the fine-tuned checkpoints)."""
    from replandscape.allocator import return_freed_memory

    device = torchdist.pick_device(cfg.extract.device, torchdist.rank_info())
    info = torchdist.init_distributed(device)
    if cfg.extract.zero_stage == 3 and torchdist.is_distributed():
        # ZeRO-3 gathers each layer's full weights and frees them after use, layer after
        # layer: the freed copies must leave the process (see allocator.return_freed_memory)
        with return_freed_memory():
            return _run(cfg, finetuned, device, info)
    return _run(cfg, finetuned, device, info)


def _run(cfg: ExperimentConfig, finetuned: bool, device: str,
         info: torchdist.RankInfo) -> ExtractResult:
    conditions = finetuned_conditions(cfg) if finetuned else shot_conditions(cfg)
    result = ExtractResult()
    # every condition's prompts are built (and the data checked) before a model is loaded:
    # a bad data row, or a prompt over the model's context, is reported in seconds, not after
    # loading a 70B model
    by_shots = {k: prepare_records(cfg, k) for k in sorted({c.shots for c in conditions})}
    todo = [c for c in conditions if existing_output(cfg, c, by_shots[c.shots]) is None]
    records = {c.name: by_shots[c.shots] for c in todo}
    if todo:
        check_context(cfg, {c.shots: by_shots[c.shots] for c in todo})
    base: LoadedModel | None = None
    t0 = time.perf_counter()
    for cond in conditions:
        if cond not in todo:
            path = cfg.output_dir / "activations" / f"{cond.name}.h5"
            result.skipped.append(cond.name)
        else:
            with condition_lock(cfg, cond, info):
                if cond.adapter is not None or cond.model_path is not None:
                    loaded = load_for_extraction(cfg, device, cond.adapter, cond.model_path)
                else:
                    base = base or load_for_extraction(cfg, device, None)
                    loaded = base
                path = extract_condition(cfg, cond, loaded, records[cond.name])
                del loaded
        with open_activations(path) as af:
            result.accuracy[cond.name] = af.accuracy
            reference = af.attrs.get("finetune_test_accuracy")
        result.files[cond.name] = path
        if info.is_main:
            acc = result.accuracy[cond.name]
            torchdist.print0(f"[extract] {cond.name}: {path} accuracy micro={acc['micro']:.3f} "
                             f"macro={acc['macro']:.3f} ({time.perf_counter() - t0:.1f} s)")
            if reference is not None and float(reference) >= 0 and not math.isclose(
                    float(reference), acc["micro"], abs_tol=1e-9):
                torchdist.print0(f"[extract] warning: {cond.name} scores {acc['micro']:.4f} but "
                                 f"the fine-tuning stage measured {float(reference):.4f} on the "
                                 "same questions: the extracted model is not the evaluated one")
    return result


@contextlib.contextmanager
def condition_lock(cfg: ExperimentConfig, condition: Condition,
                   info: torchdist.RankInfo) -> Iterator[None]:
    """One live writer per condition's output (the conditions of a sweep run side by side as
    array tasks in one folder): rank 0 holds the lock, every rank learns whether it got it."""
    from replandscape.lock import stage_lock

    with contextlib.ExitStack() as stack:
        problem: str | None = None
        if info.is_main:
            try:
                folder = ensure_dir(cfg.output_dir / "activations")
                stack.enter_context(stage_lock(folder, f"extract-{condition.name}"))
            except UserError as exc:
                problem = str(exc)
        problem = torchdist.broadcast_object(problem)
        if problem is not None:
            raise UserError(problem)
        yield
