"""Prompt pairs: every task's twin has the answer recomputed independently from its text, differs
from the clean answer, shares the clean prompt's header and shots, and tokenises to the same length
under the model's tokenizer (or is dropped and counted)."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

import pytest

from helpers import TINY_MODEL
from replandscape.config import ModelConfig
from replandscape.data import DataConfig, load_split, resolve_builtin_data, shots_by_subject
from replandscape.errors import UserError
from replandscape.models import load_tokenizer, resolve_model_path
from replandscape.prompts import LETTERS, build_prompt
from replandscape.tasks import Item, build_task_prompt, get_task, shot_pool
from replandscape.tasks.generators.boolean import evaluate
from replandscape.tasks.generators.code import run_program
from replandscape.tasks.pairs import (
    CORRUPTORS,
    DROP_REASONS,
    check_pair,
    corrupt_item,
    encode_prompt,
    make_pairs,
    mmlu_layout,
    task_layout,
)

GENERATED = sorted(CORRUPTORS)


@pytest.fixture(scope="module")
def tok() -> Any:
    shape: dict[str, Any] = {**TINY_MODEL, "path": "builtin:tiny-llama"}
    path = resolve_model_path(ModelConfig(**shape))
    return load_tokenizer(path)


def items(task: str, n: int = 60, split: str = "test", seed: int = 5) -> list[Item]:
    spec = get_task(task)
    return [spec.generate(split, v, i, seed) for v in spec.variants for i in range(n)]


# --------------------------------------------------------------------------------------------
# the answers of the twins, recomputed from their text alone
# --------------------------------------------------------------------------------------------


def _expression(text: str) -> str:
    assert re.fullmatch(r"[0-9+\-*()]+=", text)
    return str(eval(text[:-1], {"__builtins__": {}}, {}))  # digits, signs and brackets only


def _relation(text: str) -> str:
    parent: dict[str, str] = {}

    def find(c: str) -> str:
        parent.setdefault(c, c)
        while parent[c] != c:
            c = parent[c]
        return c

    for x, y in re.findall(r"^([A-Z]) is connected with ([A-Z])$", text, flags=re.M):
        parent[find(x)] = find(y)
    return str("Z" in parent and find("A") == find("Z"))


def _parity(text: str) -> str:
    heads = text.startswith("A coin is heads up.")
    assert heads or text.startswith("A coin is tails up.")
    for sentence in re.findall(r"\w+ (?:flips|does not flip) the coin\.", text):
        if " flips " in sentence:
            heads = not heads
    return "yes" if heads else "no"


def _algebra(text: str) -> str:
    eqs = [(Fraction(p or 1), Fraction(q or 1), Fraction(r)) for p, q, r in
           re.findall(r"^(\d*)a \+ (\d*)b = (-?\d+)$", text, flags=re.M)]
    (p1, q1, r1), (p2, q2, r2) = eqs[:2]
    det = p1 * q2 - p2 * q1
    a, b = (r1 * q2 - r2 * q1) / det, (p1 * r2 - p2 * r1) / det
    assert all(p * a + q * b == r for p, q, r in eqs)
    assert f"a = {a}, b = " in text
    return str(b)


def _code(text: str) -> str:
    program = text[len("The code is: \n"): text.index("The input is: ")]
    x = int(re.search(r"The input is: (-?\d+),", text).group(1))  # type: ignore[union-attr]
    return run_program(program, x)[0]


RECOMPUTE = {"expression": _expression, "relation": _relation, "parity": _parity,
             "algebra": _algebra, "code": _code,
             "boolean": lambda t: str(evaluate(t[: -len("\n The result is: ")]))}


@pytest.mark.parametrize("task", GENERATED)
def test_twins_answer_correctly_and_differently(task: str) -> None:
    made = 0
    for item in items(task):
        assert RECOMPUTE[task](item.text) == item.target  # the checker agrees on clean items
        twin = corrupt_item(item, seed=0)
        if twin is None:
            continue
        made += 1
        assert twin.target == RECOMPUTE[task](twin.text), (item.text, twin)
        assert twin.target != item.target and twin.text != item.text
    assert made >= 0.9 * 120  # almost every item has a twin


def test_twin_edits_are_local_and_keep_the_shortcut_broken() -> None:
    for item in items("boolean"):
        twin = corrupt_item(item, 0)
        assert twin is not None
        if item.variant == "pattern":  # and False <-> or True
            assert {item.text.split(")")[-1][:10], twin.text.split(")")[-1][:10]} == {
                " and False", " or True\n "}
    for item in items("expression"):
        twin = corrupt_item(item, 0)
        if twin is not None:  # only Z's last term changed, same length in characters
            assert len(twin.text) == len(item.text)
            s_group = item.text.split(")")[0]
            assert twin.text.startswith(s_group) and twin.text.endswith(item.text.split("*")[1])
    for item in items("parity"):
        twin = corrupt_item(item, 0)
        assert twin is not None and len(twin.text) == len(item.text)
    for item in items("relation"):
        twin = corrupt_item(item, 0)
        assert twin is not None and len(twin.text) == len(item.text)
        assert sum(a != b for a, b in zip(item.text, twin.text)) == 1  # one letter


def test_twins_are_deterministic_from_seed_and_item() -> None:
    pool = items("expression")
    first = [corrupt_item(i, 3) for i in pool]
    assert first == [corrupt_item(i, 3) for i in pool]
    assert first != [corrupt_item(i, 4) for i in pool]


def test_an_item_with_no_twin_is_none() -> None:
    # C totals 0: no change of Z changes the answer
    assert corrupt_item(Item(0, "expression", "pattern", "(5)+(3-3)*(2-2)=", "5"), 0) is None


# --------------------------------------------------------------------------------------------
# pairs under the model's tokenizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["expression", "relation", "algebra", "code", "boolean"])
def test_make_pairs_keeps_only_aligned_pairs_with_the_clean_shots(task: str, tok: Any) -> None:
    test, pool = items(task, 20), shot_pool(items(task, 12, split="dev"))
    result = make_pairs(test, task, tok, shots=2, pool=pool, seed=1, prompt_seed=7)
    assert set(result.dropped) == set(DROP_REASONS)
    assert len(result.pairs) + sum(result.dropped.values()) == len(test) == result.n_items
    by_id = {(i.variant, i.id): i for i in test}
    for pair in result.pairs:
        item = by_id[(pair.group, pair.id)]
        assert pair.clean_prompt == build_task_prompt(item, pool, 2, 7)
        start = pair.layout.query[0]
        assert pair.corrupt_prompt[:start] == pair.clean_prompt[:start]  # same header and shots
        assert pair.corrupt_layout.shots == pair.layout.shots and len(pair.layout.shots) == 2
        assert pair.corrupt_prompt[start:] == corrupt_item(item, 1).text  # type: ignore[union-attr]
        assert len(pair.clean_ids) == len(pair.corrupt_ids)
        assert list(pair.clean_ids) == encode_prompt(tok, pair.clean_prompt, True)
        assert pair.clean_ids[0] == tok.bos_token_id
        assert pair.clean_answer_id != pair.corrupt_answer_id
        assert tok.decode([pair.clean_answer_id]).strip() == pair.clean_target[
            : len(tok.decode([pair.clean_answer_id]).strip())]
    assert result.pairs, result.dropped
    again = make_pairs(test, task, tok, shots=2, pool=pool, seed=1, prompt_seed=7)
    assert [p.to_json() for p in again.pairs] == [p.to_json() for p in result.pairs]


def test_check_pair_drops_length_and_shared_first_token(tok: Any) -> None:
    reason, _ = check_pair(tok, "(1+2)*3=", "(1+2)*3 and then some more=", "9", "8", True)
    assert reason == "length"
    reason, _ = check_pair(tok, "Is it? yes or no:", "Is it? yes or no:", " yes", " yes", True)
    assert reason == "same_first_token"
    reason, kept = check_pair(tok, "Answer:", "Answer:", " A", " B", True)
    assert reason is None and kept[2] != kept[3]


def test_mmlu_pairs_rotate_the_options(tok: Any) -> None:
    cfg = DataConfig(source=str(resolve_builtin_data("builtin:demo-mmlu")))
    questions = load_split(cfg, "test")[:30]
    pool = shots_by_subject(load_split(cfg, "dev"))
    result = make_pairs(questions, "mmlu", tok, shots=2, pool=pool, seed=0)
    assert len(result.pairs) + sum(result.dropped.values()) == 30 and result.pairs
    by_id = {q.id: q for q in questions}
    for pair in result.pairs:
        q = by_id[pair.id]
        assert pair.clean_prompt == build_prompt(q, pool, 2, 0)
        assert pair.clean_prompt == mmlu_layout(q, pool, 2, 0).text
        assert pair.clean_target == f" {LETTERS[q.answer]}"
        assert pair.corrupt_target == f" {LETTERS[(q.answer + 1) % len(q.choices)]}"
        moved = f"{LETTERS[(q.answer + 1) % len(q.choices)]}. {q.choices[q.answer].strip()}\n"
        assert moved in pair.corrupt_prompt[pair.layout.query[0]:]
        assert len(pair.clean_ids) == len(pair.corrupt_ids)


def test_layouts_place_header_shots_and_separators() -> None:
    test, pool = items("relation", 3), shot_pool(items("relation", 8, split="dev"))
    layout = task_layout(test[0], pool, 3, 0)
    spans = layout.spans()
    text = layout.text
    assert text[slice(*spans["header"])] == get_task("relation").header
    for i in range(3):
        assert text[slice(*spans[f"separator.{i}"])] == "\n"
        shot = text[slice(*spans[f"shot.{i}"])]
        assert shot.endswith(("True\n", "False\n"))
    assert text[slice(*spans["query"])] == test[0].text
    assert layout.query[1] == len(text)


def test_bad_input_is_one_line(tok: Any) -> None:
    with pytest.raises(UserError, match="task 'nope' has no prompt-pair kind") as err:
        make_pairs([], "nope", tok)
    assert "\n" not in str(err.value)
    lone = [Item(0, "expression", "pattern", "(5)+(3-3)*(2-2)=", "5")]
    with pytest.raises(UserError, match=r"task 'expression' at 0 shots: no prompt pair kept of "
                                        r"1 items \(dropped: no_twin=1, length=0, "
                                        r"same_first_token=0\)") as err:
        make_pairs(lone, "expression", tok)
    assert "\n" not in str(err.value)
