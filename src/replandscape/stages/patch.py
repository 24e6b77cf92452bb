"""Patching: which attention heads, MLPs and residual streams carry the answer, per condition, and
how much that circuit shifts between conditions (docs/method.md §7.7).

For every condition (base model at each shot count of ``patch.shots``, and each fine-tuned
checkpoint the extraction lists), the pairs of the run's task (a clean prompt and its corrupted twin
of equal token length, :mod:`replandscape.tasks.pairs`) go through exact activation patching
(:func:`replandscape.patching.activation_patching`) and, by option, attribution patching. Work is
(condition x pair batch): batches are spread over the torch ranks (each rank runs the whole model:
data-parallel), each batch is saved atomically as it finishes (``patching/CONDITION.parts/``), so a
killed job resumes without repeating or losing a pair, and rank 0 gathers them into
``patching/CONDITION.h5``::

    /                     attrs: kind "replandscape.patching", schema_version, condition fields
                                 (task, shots, finetuned, method, checkpoint_step,
                                 examples_seen, final), patch settings, stage_hash, config,
                                 code_version, pairs (JSON: kept and dropped counts)
    /effects/heads        [N, L, H]   exact effects (0: no change, 1: the corrupted run's LD)
    /effects/mlp          [N, L]
    /effects/resid        [N, L + 1]
    /attribution/...      the same shapes, attribution patching (when patch.attribution)
    /rows/pair_id, /rows/group, /rows/n_tokens, /rows/ld_clean, /rows/ld_corrupt, /rows/edit

These are effects, never under ``/sites``: the geometry analysis does not read them. Then
``patching/circuits.json`` holds, per task, the mean effect maps of every condition and the
circuit shift of every pair of conditions (1 - rank correlation, top-k overlap, components
entering and leaving the top-k), and per condition the rank correlation of attribution against
exact patching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from replandscape.atomic import write_npz_atomic, write_text_atomic
from replandscape.conditions import Condition, code_version, finetuned_conditions
from replandscape.config import ExperimentConfig
from replandscape.dist import torchdist
from replandscape.errors import UserError
from replandscape.outputs import ensure_dir

KIND = "replandscape.patching"
SCHEMA_VERSION = 1
EFFECTS = ("heads", "mlp", "resid")


def conditions(cfg: ExperimentConfig) -> list[Condition]:
    """The conditions patched: base shot counts, then the fine-tuned checkpoints."""
    shots = cfg.patch.shots if cfg.patch.shots is not None else cfg.prompts.shots
    out = [Condition(name=f"shots{k}", shots=k) for k in shots]
    if cfg.patch.finetuned and cfg.finetune.enabled and \
            (cfg.output_dir / "finetune" / "checkpoints.json").is_file():
        out += finetuned_conditions(cfg)
    return out


def pair_set(cfg: ExperimentConfig, shots: int, tokenizer: Any) -> Any:
    """The task's prompt pairs at ``shots`` shots under the model's tokenizer."""
    from replandscape.evalset import is_generated
    from replandscape.tasks.pairs import make_pairs

    if is_generated(cfg):
        from replandscape.evalset import task_items
        from replandscape.tasks.prompts import shot_pool

        items: Sequence[Any] = task_items(cfg, cfg.data.eval_split)
        pool: Any = shot_pool(task_items(cfg, cfg.data.shot_split)) if shots else {}
    else:
        from replandscape.data import load_split, select_eval_questions, shots_by_subject

        items = select_eval_questions(load_split(cfg.data, cfg.data.eval_split), cfg.data,
                                      cfg.run.seed)
        pool = shots_by_subject(load_split(cfg.data, cfg.data.shot_split)) if shots else {}
    pairs = make_pairs(items, cfg.task.name, tokenizer, shots=shots, pool=pool,
                       seed=cfg.run.seed, prompt_seed=cfg.prompts.seed,
                       add_bos=cfg.prompts.add_bos)
    if cfg.patch.limit is not None:
        pairs = dataclasses.replace(pairs, pairs=list(pairs.pairs[: cfg.patch.limit]))
    return pairs


def stage_hash(cfg: ExperimentConfig, condition: Condition, pairs: Any) -> str:
    """Identity of one condition's effects: the model, the pairs (every token) and the settings."""
    d = cfg.to_dict()
    digest = hashlib.sha256()
    for p in pairs.pairs:
        digest.update(json.dumps([p.id, list(p.clean_ids), list(p.corrupt_ids),
                                  p.clean_answer_id, p.corrupt_answer_id]).encode())
    key = {"task": d["task"], "model": d["model"], "patch": {k: v for k, v in d["patch"].items()
                                                             if k not in ("pair_batch",
                                                                          "top_k")},
           "condition": [condition.name, condition.shots, condition.checkpoint_step,
                         condition.method], "extract_adapter": d["extract"]["adapter"],
           "pairs": digest.hexdigest()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _engine_pairs(pairs: Sequence[Any]) -> list[Any]:
    from replandscape.patching import PromptPair

    return [PromptPair(p.clean_ids, p.corrupt_ids, p.clean_answer_id, p.corrupt_answer_id)
            for p in pairs]


def patch_condition(cfg: ExperimentConfig, condition: Condition, device: str,
                    info: torchdist.RankInfo) -> Path:
    """Patch every pair of one condition into ``patching/<name>.h5``; resumes a partial run."""
    import torch

    from replandscape.loading import load_for_extraction
    from replandscape.models import load_tokenizer, resolve_model_path
    from replandscape.patching import activation_patching, attribution_patching

    out = cfg.output_dir / "patching"
    final = out / f"{condition.name}.h5"
    path = condition.model_path or resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model.revision, "left")
    pairs = pair_set(cfg, condition.shots, tokenizer)
    s_hash = stage_hash(cfg, condition, pairs)
    if final.is_file():
        with _open(final) as fh:
            if fh.attrs.get("stage_hash") == s_hash:
                return final
        raise UserError("the output already holds the effects of another config",
                        file=str(final), key="stage_hash",
                        fix="use another run.output_dir or delete the file")
    parts = out / f"{condition.name}.parts"
    if info.is_main:
        ensure_dir(parts)
        stamp = parts / "stage.sha256"
        if stamp.is_file() and stamp.read_text().strip() != s_hash:
            raise UserError("a partial patching run of another config is here", file=str(parts),
                            fix="delete the folder to start over")
        write_text_atomic(stamp, s_hash + "\n")
    torchdist.barrier()
    batches = _batches(len(pairs.pairs), cfg.patch.pair_batch)
    mine = [b for i, b in enumerate(batches) if i % info.world_size == info.rank
            and not (parts / f"batch{b[0]:06d}.npz").is_file()]
    if mine:
        # data-parallel: every rank runs the whole model on its own pairs
        plain = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, zero_stage=0))
        loaded = load_for_extraction(plain, device, condition.adapter, condition.model_path)
        for start, stop in mine:
            engine_pairs = _engine_pairs(pairs.pairs[start:stop])
            exact = activation_patching(loaded.model, engine_pairs, method=cfg.patch.method,
                                        direction=cfg.patch.direction,
                                        pair_batch=cfg.patch.pair_batch)
            arrays = {f"effects/{k}": getattr(exact, k) for k in EFFECTS}
            arrays.update(ld_clean=exact.ld_base, ld_corrupt=exact.ld_source)
            if cfg.patch.attribution:
                with torch.enable_grad():
                    approx = attribution_patching(loaded.model, engine_pairs,
                                                  direction=cfg.patch.direction)
                arrays.update({f"attribution/{k}": getattr(approx, k) for k in EFFECTS})
            write_npz_atomic(parts / f"batch{start:06d}.npz", arrays)
        del loaded
    torchdist.barrier()
    if info.is_main:
        _finalize(cfg, condition, pairs, s_hash, batches, parts, final)
    torchdist.barrier()
    return final


def _open(path: Path) -> Any:
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError:
        raise UserError("not a readable HDF5 file (truncated or corrupt)", file=str(path),
                        fix="delete it and re-run the patch stage") from None
    if fh.attrs.get("kind") != KIND:
        fh.close()
        raise UserError("not a replandscape patching file", file=str(path), key="kind",
                        fix="delete it and re-run the patch stage")
    return fh


def _finalize(cfg: ExperimentConfig, condition: Condition, pairs: Any, s_hash: str,
              batches: Sequence[tuple[int, int]], parts: Path, final: Path) -> None:
    import h5py

    loaded = []
    for start, _stop in batches:
        path = parts / f"batch{start:06d}.npz"
        if not path.is_file():
            raise UserError(f"pair batch {start} has no result", file=str(parts),
                            fix="re-run the patch stage to resume it")
        with np.load(path, allow_pickle=False) as z:
            loaded.append({k: z[k] for k in z.files})
    joined = {k: np.concatenate([b[k] for b in loaded]) for k in loaded[0]} if loaded else {}
    tmp = final.with_name(final.name + ".tmp")
    with h5py.File(tmp, "w") as fh:
        for key, value in joined.items():
            if key.startswith(("effects/", "attribution/")):
                fh.create_dataset(key, data=value)
        rows = fh.create_group("rows")
        rows.create_dataset("pair_id", data=np.asarray([p.id for p in pairs.pairs]))
        str_dt = h5py.string_dtype()
        rows.create_dataset("group", data=np.asarray([p.group for p in pairs.pairs],
                                                     dtype=object), dtype=str_dt)
        rows.create_dataset("edit", data=np.asarray([p.edit for p in pairs.pairs],
                                                    dtype=object), dtype=str_dt)
        rows.create_dataset("n_tokens", data=np.asarray([len(p.clean_ids) for p in pairs.pairs]))
        for key in ("ld_clean", "ld_corrupt"):
            rows.create_dataset(key, data=joined.get(key, np.zeros(0)))
        attrs = {"kind": KIND, "schema_version": SCHEMA_VERSION, "stage_hash": s_hash,
                 "task": cfg.task.name, "model_name": cfg.model.name,
                 "condition": condition.name, "shots": condition.shots,
                 "finetuned": condition.finetuned, "method": condition.method,
                 "checkpoint_step": -1 if condition.checkpoint_step is None
                 else condition.checkpoint_step,
                 "examples_seen": -1 if condition.examples_seen is None
                 else condition.examples_seen, "final": condition.final,
                 "patch": json.dumps(dataclasses.asdict(cfg.patch)),
                 "pairs": json.dumps(pairs.to_json()), "config": cfg.to_yaml(),
                 "code_version": code_version(),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for key, value in attrs.items():
            fh.attrs[key] = value
    tmp.replace(final)


def circuits(cfg: ExperimentConfig, files: dict[str, Path]) -> Path:
    """Mean effect maps per condition, circuit shift between every pair of conditions, and the
    agreement of attribution with exact patching, into ``patching/circuits.json``."""
    from scipy.stats import spearmanr

    from replandscape.metrics.circuits import EffectMaps, pairwise_shift, shifts_to_json

    maps: dict[str, EffectMaps] = {}
    conditions_json: dict[str, Any] = {}
    for name, path in files.items():
        with _open(path) as fh:
            mean = {k: np.nanmean(fh[f"effects/{k}"][:], axis=0) for k in EFFECTS
                    if f"effects/{k}" in fh and len(fh[f"effects/{k}"])}
            entry: dict[str, Any] = {
                "shots": int(fh.attrs["shots"]), "finetuned": bool(fh.attrs["finetuned"]),
                "method": str(fh.attrs["method"]), "final": bool(fh.attrs["final"]),
                "checkpoint_step": int(fh.attrs["checkpoint_step"]),
                "examples_seen": int(fh.attrs["examples_seen"]),
                "pairs": json.loads(fh.attrs["pairs"]), "file": str(path),
                "mean_effects": {k: v.tolist() for k, v in mean.items()}}
            agreement = {}
            for k in EFFECTS:
                if f"attribution/{k}" in fh and len(fh[f"attribution/{k}"]):
                    a = np.nanmean(fh[f"attribution/{k}"][:], axis=0).ravel()
                    b = mean[k].ravel()
                    ok = np.isfinite(a) & np.isfinite(b)
                    rho = spearmanr(a[ok], b[ok]).statistic if ok.sum() > 2 else float("nan")
                    agreement[k] = None if not np.isfinite(rho) else float(rho)
            entry["attribution_rank_correlation"] = agreement
        conditions_json[name] = entry
        maps[name] = EffectMaps(heads=mean.get("heads"), mlp=mean.get("mlp"),
                                residual=mean.get("resid"))
    shifts = pairwise_shift(maps, k=cfg.patch.top_k)
    out = cfg.output_dir / "patching" / "circuits.json"
    data = {"kind": "replandscape.circuits", "schema_version": 1, "task": cfg.task.name,
            "model": cfg.model.name, "top_k": cfg.patch.top_k, "conditions": conditions_json,
            "shifts": shifts_to_json(shifts), "config_hash": cfg.hash,
            "code_version": code_version()}
    write_text_atomic(out, json.dumps(data, indent=1, default=_plain))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def run(cfg: ExperimentConfig) -> Path:
    """Patch every condition of ``cfg`` and compare their circuits; returns circuits.json."""
    device = torchdist.pick_device(cfg.extract.device, torchdist.rank_info())
    info = torchdist.init_distributed(device)
    files = {}
    for cond in conditions(cfg):
        files[cond.name] = patch_condition(cfg, cond, device, info)
        torchdist.print0(f"[patch] {cond.name}: {files[cond.name]}")
    path = cfg.output_dir / "patching" / "circuits.json"
    if info.is_main:
        path = circuits(cfg, files)
        torchdist.print0(f"[patch] circuit shift of {len(files)} condition(s) -> {path}")
    torchdist.barrier()
    return path
