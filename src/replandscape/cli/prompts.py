"""``replandscape prompts DATA --split test --shots K [--limit N] --jsonl OUT``.

Writes one JSON object per question (id, subject, answer, prompt): exactly the text the model sees.
DATA is a hub id (cais/mmlu), a folder of per-split parquet/json files, or builtin:demo-mmlu.
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
    parser.add_argument("data", help="hub id, local folder, or builtin:demo-mmlu")
    parser.add_argument("--split", default="test")
    parser.add_argument("--shot-split", default="dev")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-choices", type=int, default=4)
    parser.add_argument("--jsonl", default="-", help="output file ('-' for stdout)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replandscape.config import DataConfig
    from replandscape.data import load_split, select_eval_questions, shots_by_subject
    from replandscape.prompts import build_prompts

    if args.shots < 0:
        raise UserError(f"--shots {args.shots} is negative", key="--shots", fix="use 0..5")
    cfg = DataConfig(source=args.data, eval_split=args.split, shot_split=args.shot_split,
                     limit=args.limit, num_choices=args.num_choices)
    questions = select_eval_questions(load_split(cfg, args.split), cfg, args.seed)
    pool = shots_by_subject(load_split(cfg, args.shot_split)) if args.shots else {}
    records = build_prompts(questions, pool, args.shots, args.seed)
    out = sys.stdout if args.jsonl == "-" else open(Path(args.jsonl), "w")  # noqa: SIM115
    try:
        for record in records:
            out.write(json.dumps(record.to_json()) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
            print(f"{len(records)} prompts -> {args.jsonl}", file=sys.stderr)
    return 0
