"""Knockout: which tokens carry the in-context information to the answer (docs/method.md §7.7).

For every base condition with shots, the task's prompts (their character layout: header, shots,
separators, query) go through attention knockout (:mod:`replandscape.knockout`): what later
positions read from each position set is blocked through the attention mask, in each layer
window, and the change of accuracy and of the answer's first-token log-probability is recorded;
the scan knocks out one position at a time over the last ``knockout.scan_last`` positions and
names the single token that matters most. One JSON file per condition,
``knockout/CONDITION.json`` (written atomically by rank 0, with the settings and provenance); rank
0 decides which conditions are finished and tells every rank, so a re-run skips them on all.

The prompts are spread over the torch ranks: each rank takes a contiguous block of whole batches
(:func:`replandscape.knockout.shares`, batch counts differing by at most one), runs every position
set, window and scan offset on it, and rank 0 merges the ranks' per-prompt values into the result
a single rank gives (prompt order, means recomputed from them: the same numbers, since each
prompt is scored in the same batch). With ``extract.zero_stage`` other than 3 (or one rank) each
rank loads the whole model and runs on its own. With ``extract.zero_stage: 3`` over several ranks
the model is partitioned by DeepSpeed ZeRO-3 as it loads (as extraction does) and each module's
parameters are gathered from every rank as it runs, so every rank must make the same number of
forward passes: before any, each rank counts its own from its prompts' token lengths, position
sets, windows, scan offsets and batch size, the ranks agree on the largest, and a rank done
early runs one-token forward passes, their outputs discarded, until it reaches it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from replandscape.atomic import write_text_atomic
from replandscape.conditions import Condition, code_version
from replandscape.config import ExperimentConfig
from replandscape.dist import torchdist
from replandscape.errors import UserError
from replandscape.loading import LoadedModel

KIND = "replandscape.knockout"


def prompts_for(cfg: ExperimentConfig, shots: int) -> list[Any]:
    """The knockout prompts of the run's task at ``shots`` shots, with their layouts."""
    from replandscape.evalset import is_generated
    from replandscape.knockout import KnockoutPrompt
    from replandscape.tasks.pairs import mmlu_layout, task_layout

    out: list[Any] = []
    if is_generated(cfg):
        from replandscape.evalset import task_items
        from replandscape.tasks.prompts import shot_pool

        pool = shot_pool(task_items(cfg, cfg.data.shot_split))
        for item in task_items(cfg, cfg.data.eval_split):
            out.append(KnockoutPrompt(item.id, task_layout(item, pool, shots, cfg.prompts.seed),
                                      item.target))
    else:
        from replandscape.data import load_split, select_eval_questions, shots_by_subject
        from replandscape.prompts import LETTERS, answer_suffix

        questions = select_eval_questions(load_split(cfg.data, cfg.data.eval_split), cfg.data,
                                          cfg.run.seed)
        mmlu_pool = shots_by_subject(load_split(cfg.data, cfg.data.shot_split))
        for q in questions:
            out.append(KnockoutPrompt(q.id, mmlu_layout(q, mmlu_pool, shots, cfg.prompts.seed),
                                      answer_suffix(LETTERS[q.answer])))
    return out[: cfg.knockout.limit] if cfg.knockout.limit is not None else out


def knockout_shots(cfg: ExperimentConfig, where: str | None = None) -> tuple[int, ...]:
    """The shot counts knocked out: ``knockout.shots``, else every ``prompts.shots`` above 0.

    Raises:
        UserError: None above 0 (the position sets live in the shots).
    """
    k = cfg.knockout
    shots = k.shots if k.shots is not None else tuple(s for s in cfg.prompts.shots if s > 0)
    if not shots:
        raise UserError("no condition with shots to knock out", file=where, key="knockout.shots",
                        fix="list shot counts above 0 (the position sets live in the shots)")
    return tuple(shots)


def knockout_outputs(cfg: ExperimentConfig, where: str | None = None) -> list[Path]:
    """The files the stage writes, one per condition (what a sweep waits for)."""
    return [cfg.output_dir / "knockout" / f"shots{n}.json" for n in knockout_shots(cfg, where)]


def run(cfg: ExperimentConfig) -> list[Path]:
    """Knock out every position set and window of every base condition with shots."""
    from replandscape.loading import inference_memory
    from replandscape.lock import rank0_stage_lock

    k = cfg.knockout
    shots = knockout_shots(cfg)
    for i, window in enumerate(k.windows):
        if len(window) != 2:
            raise UserError(f"window {list(window)} is not [start, stop)",
                            key=f"knockout.windows[{i}]", fix="write e.g. [0, 16]")
    device = torchdist.pick_device(cfg.extract.device, torchdist.rank_info())
    torchdist.init_distributed(device)
    with rank0_stage_lock(cfg.output_dir / "knockout", "knockout"), inference_memory(cfg):
        return _run(cfg, shots, device)


def _run(cfg: ExperimentConfig, shots: tuple[int, ...], device: str) -> list[Path]:
    from replandscape.loading import load_for_extraction

    info = torchdist.rank_info() if torchdist.is_distributed() else torchdist.RankInfo(0, 1, 0)
    conditions = [Condition(name=f"shots{n}", shots=n) for n in shots]
    files = [cfg.output_dir / "knockout" / f"{c.name}.json" for c in conditions]
    # rank 0 decides what is finished: every rank then runs (and gathers for) the same ones
    done = torchdist.broadcast_object([p.is_file() for p in files] if info.is_main else None)
    todo = [(c, p) for c, p, finished in zip(conditions, files, done) if not finished]
    if todo:
        loaded = load_for_extraction(cfg, device, None)  # partitioned under ZeRO-3
        for cond, path in todo:
            data = knockout_condition(cfg, cond, loaded, info)
            if data is not None:
                write_text_atomic(path, json.dumps(data, indent=1, default=_plain))
                torchdist.print0(f"[knockout] {cond.name}: {path}")
    torchdist.barrier()
    return files


def knockout_condition(cfg: ExperimentConfig, cond: Condition, loaded: LoadedModel,
                       info: torchdist.RankInfo) -> dict[str, Any] | None:
    """This rank's share of one condition's knockout; on rank 0 the merged JSON content (None
    on the other ranks)."""
    from replandscape.knockout import (
        encode,
        idle_forward,
        merge_knockout,
        merge_scans,
        planned_forwards,
        run_knockout,
        scan_knockout,
        shares,
    )
    from replandscape.sites import resolve_sites

    k = cfg.knockout
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = prompts_for(cfg, cond.shots)
    windows = [(int(w[0]), int(w[1])) for w in k.windows] or [
        (0, resolve_sites(getattr(model, "module", model)).n_blocks)]
    share = shares(len(prompts), k.batch_size, info.world_size)[info.rank]
    in_step = loaded.engine is not None  # ZeRO-3: every rank in every forward pass
    planned = target = 0
    if in_step:
        lengths = [len(encode(tokenizer, p, cfg.prompts.add_bos).ids) for p in prompts]
        planned = planned_forwards(lengths, share, k.batch_size,
                                   len(k.position_sets) * len(windows), len(windows),
                                   k.scan_last)
        target = max(torchdist.all_gather_object(planned))
    with _counting(model) as count:
        result = run_knockout(model, tokenizer, prompts, k.position_sets, windows,
                              add_bos=cfg.prompts.add_bos, batch_size=k.batch_size, share=share)
        scans = scan_knockout(model, tokenizer, prompts, k.scan_last, windows,
                              add_bos=cfg.prompts.add_bos, batch_size=k.batch_size, share=share,
                              clean=result) if k.scan_last else []
        if in_step:
            if count[0] != planned:
                raise AssertionError(f"rank {info.rank} planned {planned} forward passes of "
                                     f"{cond.name} but ran {count[0]}")
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
                tokenizer.eos_token_id
            for _ in range(target - planned):
                idle_forward(model, pad)
    parts = torchdist.all_gather_object((result, scans))
    if not info.is_main:
        return None
    merged = merge_knockout([r for r, _ in parts])
    merged_scans = merge_scans([s for _, s in parts]) if k.scan_last else []
    return {"kind": KIND, "schema_version": 1, "task": cfg.task.name, "model": cfg.model.name,
            "condition": cond.name, "shots": cond.shots, "settings": dataclasses.asdict(k),
            "result": merged.to_json(), "scan": [s.to_json() for s in merged_scans],
            "config_hash": cfg.hash, "code_version": code_version()}


@contextlib.contextmanager
def _counting(model: Any) -> Iterator[list[int]]:
    """Counts the model's forward passes while open (in ``[0]``)."""
    count = [0]

    def hook(_module: Any, _args: Any) -> None:
        count[0] += 1

    handle = model.register_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
