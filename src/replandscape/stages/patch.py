"""Patching: which attention heads, MLPs and residual streams carry the answer, per condition, and
how much that circuit shifts between conditions (docs/method.md §7.7).

For every condition (base model at each shot count of ``patch.shots``, and each fine-tuned
checkpoint the extraction lists), the pairs of the run's task (a clean prompt and its corrupted twin
of equal token length, :mod:`replandscape.tasks.pairs`) go through exact activation patching
(:func:`replandscape.patching.activation_patching`) and, by option, attribution patching.

Work is (condition x work unit), a unit being up to ``patch.pair_batch`` pairs of one token length
(the engine runs them as one batch). Units are spread three ways:

- over Slurm array tasks (``patch.parts``; task I runs with ``patch.part=I`` and takes the units
  ``(unit + condition index) % parts == I``; a later run without ``patch.part`` gathers);
- over torch ranks, data-parallel when the model fits one device (each rank loads it whole and
  takes every world-size-th unit), or partitioned by ZeRO-3 (``extract.zero_stage: 3``, as
  extraction): then every rank runs every round with exactly ``pair_batch`` pairs (a unit padded by
  repeating its last pair, a rank short of units running a copy whose rows are dropped), because
  ZeRO-3 gathers each module's weights collectively and the engine's forward calls depend only on
  the number of pairs;
- in time: each unit is saved atomically as it finishes (``patching/CONDITION.parts/unitU.npz``
  with its pair indices), so a killed job resumes without repeating or losing a pair.

Rank 0 of the gathering run puts the rows back in pair order into
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
from replandscape.conditions import Condition, code_version, finetune_dir, finetuned_conditions
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
            (finetune_dir(cfg) / "checkpoints.json").is_file():
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
                                                                          "top_k", "parts",
                                                                          "part",
                                                                          "layer_groups")},
           "condition": [condition.name, condition.shots, condition.checkpoint_step,
                         condition.method], "extract_adapter": d["extract"]["adapter"],
           "pairs": digest.hexdigest()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _engine_pairs(pairs: Sequence[Any]) -> list[Any]:
    from replandscape.patching import PromptPair

    return [PromptPair(p.clean_ids, p.corrupt_ids, p.clean_answer_id, p.corrupt_answer_id)
            for p in pairs]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One work unit: pairs of one token length and the blocks whose components it patches.

    ``layer_group`` 0 also runs attribution patching (one backward covers every block)."""

    index: tuple[int, ...]
    layers: tuple[int, int]  # [start, stop) of the decoder blocks
    layer_group: int


def layer_slices(n_blocks: int, groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous slices of the decoder blocks, as even as possible."""
    bounds = [round(i * n_blocks / groups) for i in range(groups + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(groups)]


def work_units(pairs: Sequence[Any], pair_batch: int, n_blocks: int,
               layer_groups: int = 1) -> list[Unit]:
    """The condition's work units: (pair group x layer group), a pair group being up to
    ``pair_batch`` pairs of one token length, a layer group a contiguous slice of the blocks."""
    from replandscape.patching import length_groups

    slices = layer_slices(n_blocks, layer_groups)
    return [Unit(tuple(index), layers, g)
            for index in length_groups([len(p.clean_ids) for p in pairs], pair_batch)
            for g, layers in enumerate(slices)]


def _n_blocks(path: str, revision: str | None) -> int:
    """The model's decoder block count, from its config (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=revision)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def in_part(unit: int, condition_index: int, cfg: ExperimentConfig) -> bool:
    """Whether ``unit`` of the ``condition_index``-th condition is this run's share: units go
    round-robin over ``patch.parts`` array tasks, shifted per condition so that conditions of
    few units spread too; with ``patch.part`` null every unit is."""
    part, parts = cfg.patch.part, cfg.patch.parts
    return part is None or (unit + condition_index) % parts == part


def _unit_file(parts: Path, unit: int) -> Path:
    return parts / f"unit{unit:06d}.npz"


def _unit_done(parts: Path, number: int, unit: Unit) -> bool:
    """A unit's file exists and holds these pairs and blocks (``patch.pair_batch`` or
    ``patch.layer_groups`` may have changed since it was written)."""
    path = _unit_file(parts, number)
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return bool(np.array_equal(z["index"], np.asarray(unit.index))
                        and np.array_equal(z["layers"], np.asarray(unit.layers)))
    except (OSError, ValueError, KeyError):
        return False  # a damaged unit file is computed again (written atomically: rare)


def _lockstep_schedule(todo: Sequence[int], units: Sequence[Unit], pair_batch: int,
                       info: torchdist.RankInfo) -> list[tuple[int | None, Unit]]:
    """This rank's rounds under ZeRO-3: (unit number or None for a dummy round, unit run).

    ZeRO-3 gathers each module's parameters collectively, so every rank must run the same
    forward calls. The engine's calls depend only on the number of pairs, the blocks patched
    and whether attribution runs, so: rounds go layer group by layer group, every round runs
    exactly ``pair_batch`` pairs of one length (a unit padded by repeating its last pair), and a
    rank without a unit in a round runs a copy of the group's first unit, whose results are
    dropped.
    """
    out: list[tuple[int | None, Unit]] = []
    for group in sorted({units[u].layer_group for u in todo}):
        mine = [u for u in todo if units[u].layer_group == group]
        for r in range(-(-len(mine) // info.world_size)):
            i = r * info.world_size + info.rank
            number = mine[i] if i < len(mine) else None
            unit = units[mine[0] if number is None else number]
            padded = unit.index + (unit.index[-1],) * (pair_batch - len(unit.index))
            out.append((number, dataclasses.replace(unit, index=padded)))
    return out


def patch_condition(cfg: ExperimentConfig, condition: Condition, condition_index: int,
                    device: str, info: torchdist.RankInfo, n_blocks: int) -> Path | None:
    """Patch this run's share of one condition's pairs (every pair without ``patch.part``) and,
    without ``patch.part``, gather them into ``patching/<name>.h5``; resumes a partial run.

    Returns the condition's file, or None when this run (an array task) only computed its share.
    ``n_blocks`` is the model's decoder block count (for the block groups).
    """
    import torch

    from replandscape.loading import load_for_extraction, partitioned
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
    units = work_units(pairs.pairs, cfg.patch.pair_batch, n_blocks, cfg.patch.layer_groups)
    todo: list[int] = []
    if info.is_main:
        ensure_dir(parts)
        stamp = parts / "stage.sha256"
        if stamp.is_file() and stamp.read_text().strip() != s_hash:
            raise UserError("a partial patching run of another config is here", file=str(parts),
                            fix="delete the folder to start over")
        write_text_atomic(stamp, s_hash + "\n")
        # decided once, on rank 0: a rank checking later could see a unit another just wrote
        todo = [u for u, unit in enumerate(units) if in_part(u, condition_index, cfg)
                and not _unit_done(parts, u, unit)]
    todo = torchdist.broadcast_object(todo)
    zero3 = partitioned(cfg)
    schedule: list[tuple[int | None, Unit]]
    if zero3:  # every rank holds a share of the weights and runs every round
        schedule = _lockstep_schedule(todo, units, cfg.patch.pair_batch, info) if todo else []
    else:  # data-parallel: every rank runs the whole model on its own units
        schedule = [(u, units[u]) for u in todo[info.rank::info.world_size]]
    if todo:
        how = ("ZeRO-3, ranks in step" if zero3 else
               "data-parallel" if info.world_size > 1 else "one rank")
        share = "" if cfg.patch.part is None else f" (share {cfg.patch.part} of {cfg.patch.parts})"
        torchdist.print0(f"[patch] {condition.name}: {len(todo)} of {len(units)} unit(s) to run"
                         f"{share} over {info.world_size} rank(s), {how}")
    if schedule:
        model_cfg = cfg if zero3 else dataclasses.replace(
            cfg, extract=dataclasses.replace(cfg.extract, zero_stage=0))
        loaded = load_for_extraction(model_cfg, device, condition.adapter, condition.model_path)
        for number, unit in schedule:
            engine_pairs = _engine_pairs([pairs.pairs[i] for i in unit.index])
            exact = activation_patching(loaded.model, engine_pairs, method=cfg.patch.method,
                                        direction=cfg.patch.direction,
                                        pair_batch=len(engine_pairs),
                                        layers=range(*unit.layers))
            arrays = {f"effects/{k}": getattr(exact, k) for k in EFFECTS}
            arrays.update(ld_clean=exact.ld_base, ld_corrupt=exact.ld_source)
            if cfg.patch.attribution and unit.layer_group == 0:
                with torch.enable_grad():
                    approx = attribution_patching(loaded.model, engine_pairs,
                                                  direction=cfg.patch.direction)
                arrays.update({f"attribution/{k}": getattr(approx, k) for k in EFFECTS})
            if number is None:
                continue  # a dummy round that kept this rank in step
            n = len(units[number].index)  # padded rows dropped
            arrays = {k: v[:n] for k, v in arrays.items()}
            arrays["index"] = np.asarray(units[number].index, dtype=np.int64)
            arrays["layers"] = np.asarray(unit.layers, dtype=np.int64)
            write_npz_atomic(_unit_file(parts, number), arrays)
        del loaded
    torchdist.barrier()
    if cfg.patch.part is not None:
        return None
    if info.is_main:
        _finalize(cfg, condition, pairs, s_hash, units, parts, final)
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
              units: Sequence[Unit], parts: Path, final: Path) -> None:
    """Every unit's rows and blocks put back in place, into the condition's file (atomically):
    exact effects from each unit's own blocks (the residual leaving the last block with the
    last group), attribution and the unpatched LDs from the units that ran them."""
    import h5py

    joined: dict[str, np.ndarray] = {}
    for number, unit in enumerate(units):
        if not _unit_done(parts, number, unit):
            raise UserError(f"work unit {number} (pairs {list(unit.index)}, blocks "
                            f"{unit.layers[0]}-{unit.layers[1] - 1}) has no result",
                            file=str(parts), fix="re-run the patch stage to resume it")
        rows = np.asarray(unit.index)
        start, stop = unit.layers
        with np.load(_unit_file(parts, number), allow_pickle=False) as z:
            for key in z.files:
                if key in ("index", "layers"):
                    continue
                value = z[key]
                if key not in joined:
                    joined[key] = np.full((len(pairs.pairs), *value.shape[1:]), np.nan)
                if key.startswith("effects/"):
                    # the residual's extra column L (leaving the last block) ends the last group
                    end = stop + 1 if key == "effects/resid" and stop == value.shape[1] - 1 \
                        else stop
                    joined[key][rows, start:end] = value[:, start:end]
                else:
                    joined[key][rows] = value
    tmp = final.with_name(final.name + ".tmp")
    with h5py.File(tmp, "w") as fh:
        for key, array in joined.items():
            if key.startswith(("effects/", "attribution/")):
                fh.create_dataset(key, data=array)
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


def part_marker(cfg: ExperimentConfig, part: int) -> Path:
    """What array task ``part`` leaves last: its share of every condition is computed."""
    return cfg.output_dir / "patching" / f"part{part}of{cfg.patch.parts}.done"


def run(cfg: ExperimentConfig) -> Path:
    """Patch every condition of ``cfg`` and compare their circuits; returns circuits.json (or,
    for an array task with ``patch.part``, the marker of its finished share)."""
    from replandscape.loading import inference_memory
    from replandscape.lock import rank0_stage_lock
    from replandscape.models import resolve_model_path

    n_blocks = _n_blocks(resolve_model_path(cfg.model), cfg.model.revision)
    if cfg.patch.layer_groups > n_blocks:
        raise UserError(f"{cfg.patch.layer_groups} groups of blocks asked of a model of "
                        f"{n_blocks} blocks", key="patch.layer_groups", fix=f"use 1..{n_blocks}")
    device = torchdist.pick_device(cfg.extract.device, torchdist.rank_info())
    info = torchdist.init_distributed(device)
    part = cfg.patch.part
    lock = "patch" if part is None else f"patch-part{part}"
    with rank0_stage_lock(cfg.output_dir / "patching", lock), inference_memory(cfg):
        files: dict[str, Path] = {}
        for i, cond in enumerate(conditions(cfg)):
            # every condition is the experiment's model, fine-tuned or not: its block count
            done = patch_condition(cfg, cond, i, device, info, n_blocks)
            if done is not None:
                files[cond.name] = done
                torchdist.print0(f"[patch] {cond.name}: {done}")
        if part is not None:
            marker = part_marker(cfg, part)
            if info.is_main:
                write_text_atomic(marker, json.dumps({"part": part, "parts": cfg.patch.parts,
                                                      "config_hash": cfg.hash}) + "\n")
            torchdist.print0(f"[patch] share {part} of {cfg.patch.parts} done -> {marker}")
            torchdist.barrier()
            return marker
        path = cfg.output_dir / "patching" / "circuits.json"
        if info.is_main:
            path = circuits(cfg, files)
            torchdist.print0(f"[patch] circuit shift of {len(files)} condition(s) -> {path}")
        torchdist.barrier()
    return path
