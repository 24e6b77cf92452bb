"""``replandscape prompts DATA --split test --shots K [--limit N] --jsonl OUT``.

Writes one JSON object per question: exactly the text the model sees. DATA is a hub id
(cais/mmlu), a folder of per-split parquet/json files, builtin:demo-mmlu (lines with id, subject,
answer, prompt), or a generated task's folder from ``make-data --task`` (lines with id, task,
variant, prompt, target, labels; shots from --shot-split of the same task and variant; --limit
keeps the first N items of each variant). Nothing is written when a prompt cannot be built.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from replandscape.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("prompts", help="write the k-shot prompts of a data set as JSON lines",
                            description=__doc__)
    parser.add_argument("data", help="hub id, local folder, task folder, or builtin:demo-mmlu")
    parser.add_argument("--split", default="test")
    parser.add_argument("--shot-split", default="dev")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-choices", type=int, default=4, help="MMLU-shaped data only")
    parser.add_argument("--variant", action="append", default=None,
                        help="task folders only: only this variant (repeatable)")
    parser.add_argument("--jsonl", default="-", help="output file ('-' for stdout)")
    parser.set_defaults(func=run)


def _mmlu_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    from replandscape.config import DataConfig
    from replandscape.data import load_split, select_eval_questions, shots_by_subject
    from replandscape.prompts import build_prompts

    if args.variant:
        raise UserError("--variant applies to generated task folders only", key="--variant",
                        fix="drop --variant for MMLU-shaped data")
    cfg = DataConfig(source=args.data, eval_split=args.split, shot_split=args.shot_split,
                     limit=args.limit, num_choices=args.num_choices)
    questions = select_eval_questions(load_split(cfg, args.split), cfg, args.seed)
    pool = shots_by_subject(load_split(cfg, args.shot_split)) if args.shots else {}
    return [record.to_json() for record in build_prompts(questions, pool, args.shots, args.seed)]


def _task_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    from replandscape.tasks import build_task_prompts, get_task, load_task_split, shot_pool

    items = load_task_split(args.data, args.split)
    if args.variant:
        for task in sorted({item.task for item in items}):
            for variant in args.variant:
                get_task(task).check_variant(variant)
        items = [item for item in items if item.variant in args.variant]
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit {args.limit} keeps nothing", key="--limit",
                            fix="use a positive limit")
        kept: dict[tuple[str, str], int] = {}
        chosen = []
        for item in items:
            key = (item.task, item.variant)
            if kept.get(key, 0) < args.limit:
                kept[key] = kept.get(key, 0) + 1
                chosen.append(item)
        items = chosen
    pool = shot_pool(load_task_split(args.data, args.shot_split)) if args.shots else {}
    return [record.to_json() for record in build_task_prompts(items, pool, args.shots, args.seed)]


def run(args: argparse.Namespace) -> int:
    from replandscape.atomic import write_text_atomic
    from replandscape.tasks import is_task_folder

    if args.shots < 0:
        raise UserError(f"--shots {args.shots} is negative", key="--shots",
                        fix="use 0 or more shots")
    rows = _task_rows(args) if is_task_folder(args.data) else _mmlu_rows(args)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if args.jsonl == "-":
        sys.stdout.write(text)
    else:
        try:
            write_text_atomic(Path(args.jsonl), text)
        except OSError as exc:
            raise UserError(f"cannot write the prompts ({exc.strerror})", file=args.jsonl,
                            key="--jsonl", fix="choose a writable path") from None
        print(f"{len(rows)} prompts -> {args.jsonl}", file=sys.stderr)
    return 0
