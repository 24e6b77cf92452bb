"""Prompts follow the reference format exactly; shot order depends on (seed, id) alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import cli, one_line_error
from replandscape.config import DataConfig
from replandscape.data import Question, load_split, shots_by_subject
from replandscape.errors import UserError
from replandscape.prompts import build_prompt, build_prompts, header, question_block, shot_order

Q = Question(id=7, subject="high_school_physics", question="  What is g?  ",
             choices=(" 9.8 m/s^2", "1", "0 ", "42"), answer=0)


def test_exact_zero_shot_text() -> None:
    assert header("high_school_physics") == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n")
    assert build_prompt(Q, {}, 0, 42) == (
        "The following are multiple choice questions (with answers) about high school physics."
        "\n\nWhat is g?\nA. 9.8 m/s^2\nB. 1\nC. 0\nD. 42\nAnswer:")


def test_shots_are_the_first_k_of_the_subject_in_a_seeded_order() -> None:
    dev = [Question(id=i, subject="high_school_physics", question=f"q{i}",
                    choices=("a", "b", "c", "d"), answer=i % 4) for i in range(5)]
    other = [Question(id=9, subject="law", question="nope", choices=("a", "b", "c", "d"), answer=0)]
    pool = shots_by_subject(dev + other)
    text = build_prompt(Q, pool, 3, 42)
    order = shot_order(42, Q.id, 3)
    blocks = [question_block(dev[i]) + f" {'ABCD'[dev[i].answer]}\n\n" for i in order]
    assert text == header(Q.subject) + "".join(blocks) + question_block(Q)
    assert "nope" not in text and "q3" not in text and "q4" not in text
    assert sorted(order) == [0, 1, 2]
    # same (seed, id) -> same order, whatever else was built before or in parallel
    assert shot_order(42, Q.id, 5) == shot_order(42, Q.id, 5)
    orders = {tuple(shot_order(42, qid, 5)) for qid in range(50)}
    assert len(orders) > 10  # the order varies across questions


def test_prompts_are_identical_however_the_questions_are_split() -> None:
    cfg = DataConfig(source="builtin:demo-mmlu")
    test = load_split(cfg, "test")[:60]
    pool = shots_by_subject(load_split(cfg, "dev"))
    whole = build_prompts(test, pool, 5, 42)
    parts = build_prompts(test[1::2], pool, 5, 42) + build_prompts(test[0::2], pool, 5, 42)
    assert sorted(parts, key=lambda r: r.id) == whole


def test_too_few_shot_questions_is_a_user_error() -> None:
    pool = {Q.subject: [Q]}
    with pytest.raises(UserError, match="has 1 shot questions but 2 shots"):
        build_prompt(Q, pool, 2, 42)


def test_prompts_command_writes_what_the_model_sees(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    proc = cli("prompts", "builtin:demo-mmlu", "--split", "test", "--shots", "2", "--limit", "10",
               "--jsonl", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and set(rows[0]) == {"id", "subject", "answer", "prompt"}
    assert all(r["prompt"].endswith("\nAnswer:") and r["prompt"].count("Answer: ") == 2
               for r in rows)


def test_local_parquet_and_missing_split(tmp_path: Path) -> None:
    import pandas as pd

    rows = [{"question": f"q{i}", "choices": ["w", "x", "y", "z"], "answer": i % 4,
             "subject": "law" if i % 2 else "music"} for i in range(12)]
    pd.DataFrame(rows).to_parquet(tmp_path / "test.parquet")
    pd.DataFrame(rows[:10]).to_parquet(tmp_path / "dev.parquet")
    loaded = load_split(DataConfig(source=str(tmp_path)), "test")
    assert [q.question for q in loaded] == [r["question"] for r in rows]
    assert loaded[3] == Question(id=3, subject="law", question="q3", choices=("w", "x", "y", "z"),
                                 answer=3)
    line = one_line_error(cli("prompts", str(tmp_path), "--split", "validation"))
    assert "no 'validation' split" in line
