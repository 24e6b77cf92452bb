"""Knockout: which tokens carry the in-context information to the answer (docs/method.md §7.7).

For every base condition with shots, the task's prompts (their character layout: header, shots,
separators, query) go through attention knockout (:mod:`replandscape.knockout`): what later
positions read from each position set is blocked through the attention mask, in each layer
window, and the change of accuracy and of the answer's first-token log-probability is recorded;
the scan knocks out one position at a time over the last ``knockout.scan_last`` positions and
names the single token that matters most. One JSON file per condition,
``knockout/CONDITION.json`` (written atomically; a finished condition is skipped on a re-run),
with the settings and provenance; ranks share nothing (rank 0 runs it: one model, few prompts).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from replandscape.atomic import write_text_atomic
from replandscape.conditions import Condition, code_version
from replandscape.config import ExperimentConfig
from replandscape.dist import torchdist
from replandscape.errors import UserError

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


def run(cfg: ExperimentConfig) -> list[Path]:
    """Knock out every position set and window of every base condition with shots."""
    from replandscape.knockout import run_knockout, scan_knockout
    from replandscape.loading import load_for_extraction

    k = cfg.knockout
    shots = k.shots if k.shots is not None else tuple(s for s in cfg.prompts.shots if s > 0)
    if not shots:
        raise UserError("no condition with shots to knock out", key="knockout.shots",
                        fix="list shot counts above 0 (the position sets live in the shots)")
    for i, window in enumerate(k.windows):
        if len(window) != 2:
            raise UserError(f"window {list(window)} is not [start, stop)",
                            key=f"knockout.windows[{i}]", fix="write e.g. [0, 16]")
    device = torchdist.pick_device(cfg.extract.device, torchdist.rank_info())
    info = torchdist.init_distributed(device)
    files = []
    if info.is_main:
        plain = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, zero_stage=0))
        loaded = None
        for n_shots in shots:
            cond = Condition(name=f"shots{n_shots}", shots=n_shots)
            path = cfg.output_dir / "knockout" / f"{cond.name}.json"
            files.append(path)
            if path.is_file():
                continue
            prompts = prompts_for(cfg, n_shots)
            loaded = loaded or load_for_extraction(plain, device, None)
            windows = [(int(w[0]), int(w[1])) for w in k.windows]
            result = run_knockout(loaded.model, loaded.tokenizer, prompts, k.position_sets,
                                  windows, add_bos=cfg.prompts.add_bos, batch_size=k.batch_size)
            scans = scan_knockout(loaded.model, loaded.tokenizer, prompts, k.scan_last, windows,
                                  add_bos=cfg.prompts.add_bos, batch_size=k.batch_size) \
                if k.scan_last else []
            data = {"kind": KIND, "schema_version": 1, "task": cfg.task.name,
                    "model": cfg.model.name, "condition": cond.name, "shots": n_shots,
                    "settings": dataclasses.asdict(k), "result": result.to_json(),
                    "scan": [s.to_json() for s in scans], "config_hash": cfg.hash,
                    "code_version": code_version()}
            write_text_atomic(path, json.dumps(data, indent=1, default=_plain))
            torchdist.print0(f"[knockout] {cond.name}: {path}")
    torchdist.barrier()
    return files


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
