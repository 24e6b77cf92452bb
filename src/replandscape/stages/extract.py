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
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from replandscape.atomic import write_npz_atomic
from replandscape.capture import (
    AttentionMass,
    LastTokenCapture,
    collate,
    plan_batches,
    tokenize,
)
from replandscape.conditions import (
    Condition,
    code_version,
    finetune_test_accuracy,
    finetuned_conditions,
    shot_conditions,
)
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
from replandscape.loading import (
    LoadedModel,
    load_for_extraction,
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


@dataclass
class ExtractResult:
    files: dict[str, Path] = field(default_factory=dict)
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def check_context(cfg: ExperimentConfig, records: Mapping[int, Sequence[EvalRecord]]) -> None:
    """Refuse, before any model is loaded, a shot count whose prompts do not fit the model's
    context (with room for the generated tokens of a generated task)."""
    from replandscape.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model.revision)
    reserve = max_new_tokens(cfg) if is_generated(cfg) else 0
    for shots, recs in sorted(records.items()):
        tokenize(tokenizer, [r.prompt for r in recs], cfg.prompts.add_bos,
                 cfg.model.context_length, [r.id for r in recs], shots=shots, reserve=reserve)


# --------------------------------------------------------------------------------------------
# sites and hooks
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
    declared = sorted({name for r in records for name in r.spans})
    # "task" stands for every span the task declares (one experiment serves tasks with other spans)
    spans = declared if list(cfg.extract.spans) == ["task"] else list(cfg.extract.spans)
    att_spans = (declared if list(cfg.extract.attention_spans) == ["task"]
                 else list(cfg.extract.attention_spans))
    masked = sorted(set(spans) | set(att_spans))
    span_masks: dict[str, list[list[bool]]] = {}
    if masked:
        span_masks = check_spans(cfg, records, masked, tokenizer, tokens)
        extra_fields.update({f"has_span.{name}": np.bool_ for name in masked})
    capture = LastTokenCapture(loaded.model, cfg.extract.sites, cfg.extract.pooling,
                               spans=spans, span_pooling=cfg.extract.span_pooling)
    attention = AttentionMass(capture, att_spans) if att_spans else None
    att_dir = out_dir / f"{condition.name}.attention"
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
        with capture, torch.inference_mode(), (
                attention if attention is not None else contextlib.nullcontext()):
            for b in range(n_batches):
                rows = batches[b] if b < len(batches) else None
                seqs = [tokens[i] for i in rows] if rows is not None else [tokens[0][:1]]
                ids, mask = collate(seqs, pad_id, cfg.extract.padding_side)
                ids, mask = ids.to(loaded.device), mask.to(loaded.device)
                batch_spans = None
                if span_masks:
                    order: list[int] = [] if rows is None else [int(i) for i in rows]
                    batch_spans = {name: torch.as_tensor(
                        _pad_masks([span_masks[name][i] for i in order] or [[False]],
                                   ids.shape[1], cfg.extract.padding_side), device=ids.device)
                        for name in masked}
                out, logits, past = capture.run_with_cache(ids, mask, use_cache=generated,
                                                           span_masks=batch_spans)
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
                for name in masked:
                    row_values[f"has_span.{name}"] = np.asarray(
                        [any(span_masks[name][i]) for i in rows])
                if attention is not None:
                    # saved before the rows are marked done: a resumed run never lacks them
                    masses = {f"mass/{k}": v.cpu().numpy() for k, v in attention.take().items()}
                    write_npz_atomic(att_dir / f"rows{int(rows.min()):07d}.npz",
                                     {"rows": np.asarray(rows), **masses})
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
            "final_checkpoint": condition.final,
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
        if condition.final:
            # what the fine-tuning stage scored on the same questions: a later reader (status,
            # the report) can tell whether the extracted model is the one that was evaluated
            reference = finetune_test_accuracy(cfg)
            header["finetune_test_accuracy"] = -1.0 if reference is None else reference
        groups, prompts = [r.group for r in records], [r.prompt for r in records]
        derive = _decoded_rows(records, tokenizer, n_new, eos) if generated else None
        if att_spans:
            write_attention(cfg, condition, records, att_spans, att_dir, header)
        if comm is not None:
            finalize_mpio(final, specs, header, groups, prompts, extra_fields=extra_fields,
                          derive=derive)
        else:
            finalize_shards(final, info.world_size, specs, header, groups, prompts,
                            extra_fields=extra_fields, derive=derive)
    torchdist.barrier()
    return final


def check_spans(cfg: ExperimentConfig, records: Sequence[EvalRecord], spans: Sequence[str],
                tokenizer: Any, tokens: Sequence[Sequence[int]]) -> dict[str, list[list[bool]]]:
    """Token masks of the named spans of every prompt; a span the task never declares is one
    error naming the task (an item may lack a span its task declares, e.g. no distractor)."""
    from replandscape.capture import span_token_masks

    declared = sorted({name for r in records for name in r.spans})
    for name in spans:
        if name not in declared:
            raise UserError(f"task '{cfg.task.name}' declares no span '{name}' (its spans: "
                            f"{', '.join(declared) or 'none'})", key="extract.spans",
                            fix="list spans the task declares, or none")
    return span_token_masks(tokenizer, [r.prompt for r in records], tokens,
                            [r.spans for r in records], spans)


def write_attention(cfg: ExperimentConfig, condition: Condition, records: Sequence[EvalRecord],
                    spans: Sequence[str], parts: Path, header: Mapping[str, Any]) -> Path:
    """Join the ranks' attention masses into ``attention/CONDITION.h5`` (its own kind, never
    under ``/sites``): ``mass/SPAN`` [N, L, H] per row of the activation file, atomically."""
    import h5py

    masses: dict[str, np.ndarray] = {}
    seen = np.zeros(len(records), dtype=bool)
    for path in sorted(parts.glob("rows*.npz")):
        with np.load(path, allow_pickle=False) as z:
            rows = z["rows"]
            for span in spans:
                block = z[f"mass/{span}"]
                if span not in masses:
                    masses[span] = np.full((len(records), *block.shape[1:]), np.nan,
                                           dtype=np.float32)
                masses[span][rows] = block
            seen[rows] = True
    if not seen.all():
        raise UserError(f"attention masses of {int((~seen).sum())} rows are missing",
                        file=str(parts), fix="delete the condition's outputs and re-run it")
    out = ensure_dir(cfg.output_dir / "attention") / f"{condition.name}.h5"
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as fh:
        for span, value in masses.items():
            fh.create_dataset(f"mass/{span}", data=value)
        fh.create_dataset("rows/question_id", data=np.asarray([r.id for r in records]))
        fh.create_dataset("rows/has_span", data=np.asarray(
            [[name in r.spans for name in spans] for r in records]))
        keep = ("task", "model_name", "condition", "shots", "finetuned", "method",
                "checkpoint_step", "stage_hash", "code_version")
        for key in keep:
            if key in header:
                fh.attrs[key] = header[key]
        fh.attrs.update(kind="replandscape.attention", schema_version=1,
                        spans=json.dumps(list(spans)))
    tmp.replace(out)
    return out


def _pad_masks(masks: Sequence[Sequence[bool]], width: int, side: str) -> list[list[bool]]:
    pad = [[False] * (width - len(m)) for m in masks]
    return [p + list(m) if side == "left" else list(m) + p for p, m in zip(pad, masks)]


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
        # every label the items carry (the RSA conditions and probe targets among them)
        for key in sorted({k for r in records for k in r.item_labels}):
            strings[f"label.{key}"] = [r.item_labels.get(key, "") for r in records]
        return strings, {"accuracy_substring": json.dumps(substring)}

    return derive


def run(cfg: ExperimentConfig, *, finetuned: bool = False) -> ExtractResult:
    """Extract every condition of ``cfg`` (k-shot ones, or the fine-tuned checkpoints)."""
    from replandscape.loading import inference_memory

    device = torchdist.pick_device(cfg.extract.device, torchdist.rank_info())
    info = torchdist.init_distributed(device)
    with inference_memory(cfg):
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
    from replandscape.lock import rank0_stage_lock

    with rank0_stage_lock(cfg.output_dir / "activations", f"extract-{condition.name}"):
        yield
