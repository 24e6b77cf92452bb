"""The two tasks with designed conditions: in-context linear regression and reading with a
distractor. Gold answers recomputed from the text, spans, conditions, hypotheses, scoring."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from replandscape.errors import UserError
from replandscape.tasks import (
    Item,
    build_task_prompt,
    get_task,
    load_task_split,
    make_task_data,
    shot_pool,
)
from replandscape.tasks.generators import reading, regression
from replandscape.tasks.generators.reading import format_span, item_spans, parse_span

N = 300


def items(task: str, variant: str, n: int = N, seed: int = 3) -> list[Item]:
    spec = get_task(task)
    return [spec.generate("test", variant, i, seed) for i in range(n)]


# --------------------------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------------------------

PAIR = re.compile(r"^(-?\d+) -> (-?\d+)$", flags=re.M)


def test_regression_gold_spans_and_conditions() -> None:
    opts = regression.RegressionOptions()
    cells: Counter[str] = Counter()
    for variant in ("pattern", "misleading"):
        for item in items("regression", variant):
            m = re.fullmatch(r"Examples:\n((?:-?\d+ -> -?\d+\n)+)Query: (-?\d+) -> ", item.text)
            assert m, item.text
            pairs = [(int(x), int(y)) for x, y in PAIR.findall(m.group(1))]
            x = int(m.group(2))
            a, b = item.labels["slope"], item.labels["intercept"]
            assert a in opts.slopes and b in opts.intercepts
            # every example lies on the line, and the answer too
            assert all(y == a * xx + b for xx, y in pairs) and len(pairs) == 4
            assert len({xx for xx, _ in pairs}) == 4
            assert all(0 <= xx <= 20 for xx, _ in pairs) and 0 <= x <= 20
            assert item.target == str(a * x + b) == str(item.labels["y"])
            assert item.labels["x"] == x
            assert item.labels["condition"] == f"slope={a},intercept={b}"
            seen = x in {xx for xx, _ in pairs}
            assert seen == (variant == "pattern") == bool(item.labels["shortcut_holds"])
            spans = item_spans(item)
            s, e = spans["examples"]
            assert item.text[s:e] == m.group(1).rstrip("\n")
            s, e = spans["query"]
            assert item.text[s:e] == f"{x} ->"
            cells[item.labels["condition"]] += 1
    # every cell of the grid is drawn, about equally often
    assert len(cells) == 15 and min(cells.values()) > 2 * N / 15 * 0.5


def test_regression_options_and_scoring() -> None:
    spec = get_task("regression")
    opts = spec.options({"slopes": [7], "intercepts": [-3, 3], "x_range": [-4, 4],
                         "examples": [2, 3], "tolerance": 2})
    got = [spec.generate("dev", "misleading", i, 0, opts) for i in range(60)]
    assert {i.labels["slope"] for i in got} == {7}
    assert {len(PAIR.findall(i.text)) for i in got} == {2, 3}
    assert all(-31 <= i.labels["y"] <= 31 for i in got)
    assert spec.max_new_tokens(opts) == len("-31") + 1
    with pytest.raises(UserError, match="option 'x_range' of task 'regression'"):
        spec.options({"x_range": [0, 3], "examples": [4, 4]})
    with pytest.raises(UserError, match="option 'slopes' of task 'regression'"):
        spec.options({"slopes": [1, 1]})
    assert regression.absolute_error(" 17\n", "17") == 0
    assert regression.absolute_error("-3 and", "2") == 5
    assert regression.absolute_error("seventeen", "17") is None
    assert regression.score_tolerance(" 18", "17") and not regression.score_tolerance("19", "17")
    assert regression.score_tolerance("19", "17", tolerance=2)
    assert not regression.score_tolerance("", "17")


def test_regression_hypotheses_over_conditions() -> None:
    labels = [i.labels for v in ("pattern", "misleading") for i in items("regression", v, 200)]
    rows, mats = regression.hypotheses(labels)
    assert rows == tuple(sorted({lab["condition"] for lab in labels}))
    slope = {r: int(re.match(r"slope=(-?\d+)", r).group(1)) for r in rows}
    intercept = {r: int(re.search(r"intercept=(-?\d+)", r).group(1)) for r in rows}
    for i, r in enumerate(rows):
        for j, s in enumerate(rows):
            assert mats["same_slope"][i, j] == (slope[r] == slope[s])
            assert mats["same_intercept"][i, j] == (intercept[r] == intercept[s])
            assert mats["near_slope"][i, j] == -abs(slope[r] - slope[s])
    for m in mats.values():
        assert np.array_equal(m, m.T)
    item_rows, item_mats = regression.hypotheses(labels[:12], level="item")
    assert item_rows == tuple(str(i) for i in range(12)) and item_mats["same_slope"].shape == (12, 12)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

SENTENCE = re.compile(r"(\w+) put the (\w+) in the (\w+)\.")


def test_reading_gold_spans_and_conditions() -> None:
    conditions: Counter[str] = Counter()
    for variant in ("pattern", "misleading"):
        positions = Counter()
        for item in items("reading", variant):
            story, question = re.fullmatch(r"Story: It was a \w+ day\. (.*)\n Question: (.*)\n"
                                           r" The answer is: ", item.text).groups()
            events = SENTENCE.findall(story)
            assert len(events) == (2 if variant == "misleading" else 1)
            lab = item.labels
            spans = item_spans(item)
            relevant = SENTENCE.fullmatch(item.text[slice(*spans["relevant"])]).groups()
            name, obj, place = relevant
            assert item.text[slice(*spans["question"])] == question
            if variant == "misleading":
                other = SENTENCE.fullmatch(item.text[slice(*spans["distractor"])]).groups()
                # the distractor is about someone else, with another object and place
                assert all(o != r for o, r in zip(other, relevant))
                positions[events.index(relevant)] += 1
                assert lab["distractor"] == 1
            else:
                assert "distractor" not in spans and lab["span_distractor"] == ""
                assert lab["distractor"] == 0
            qtype = lab["question_type"]
            expected = {"who": (f"Who put the {obj} in the {place}?", name),
                        "where": (f"Where did {name} put the {obj}?", place),
                        "what": (f"What did {name} put in the {place}?", obj)}[qtype]
            assert (question, item.target) == expected
            assert lab["answer"] == item.target and lab["name"] == name
            assert lab["condition"] == f"{qtype},distractor={lab['distractor']}"
            conditions[lab["condition"]] += 1
        if variant == "misleading":  # the distractor stands before or after, about 50/50
            assert 0.35 < positions[0] / N < 0.65
    assert len(conditions) == 6 and min(conditions.values()) > N / 3 * 0.7


def test_reading_options() -> None:
    spec = get_task("reading")
    opts = spec.options({"question_types": ["where"], "distractor_position": "before",
                         "scene": False, "places": ["moon", "sea"]})
    for i in range(20):
        item = spec.generate("test", "misleading", i, 0, opts)
        assert item.text.startswith("Story: ") and "day." not in item.text
        assert item.labels["question_type"] == "where" and item.target in ("moon", "sea")
        assert item_spans(item)["distractor"][0] < item_spans(item)["relevant"][0]
    assert spec.max_new_tokens(opts) == len("moon") + 1
    with pytest.raises(UserError, match="option 'question_types' of task 'reading'"):
        spec.options({"question_types": ["why"]})
    with pytest.raises(UserError, match="option 'distractor_position' of task 'reading'"):
        spec.options({"distractor_position": "middle"})
    with pytest.raises(UserError, match="option 'names' of task 'reading'"):
        spec.options({"names": ["Mia"]})


def test_reading_hypotheses_over_conditions() -> None:
    labels = [i.labels for v in ("pattern", "misleading") for i in items("reading", v, 120)]
    rows, mats = reading.hypotheses(labels)
    assert len(rows) == 6
    qtype = [r.split(",")[0] for r in rows]
    same_type = np.array([[float(a == b) for b in qtype] for a in qtype])
    off = ~np.eye(6, dtype=bool)
    assert np.array_equal(mats["same_question_type"][off], same_type[off])
    # same answer across question types never happens (names, places and objects differ);
    # within a type it is the share of agreeing item pairs, recomputed here
    by = {r: [lab for lab in labels if lab["condition"] == r] for r in rows}
    for i, r in enumerate(rows):
        for j, s in enumerate(rows):
            pairs = [(a, b) for a in by[r] for b in by[s] if a is not b]
            share = np.mean([a["answer"] == b["answer"] for a, b in pairs])
            assert mats["same_answer"][i, j] == pytest.approx(share)
            if qtype[i] != qtype[j]:
                assert mats["same_answer"][i, j] == 0
    for m in mats.values():
        assert np.allclose(m, m.T)


# --------------------------------------------------------------------------------------------
# shared: spans, data folders, prompts
# --------------------------------------------------------------------------------------------


def test_span_labels_round_trip_and_reject_garbage() -> None:
    assert parse_span(format_span(3, 9)) == (3, 9) and parse_span("") is None
    for bad in ("3-9", "9:3", "a:b", 4):
        with pytest.raises(ValueError):
            parse_span(bad)


@pytest.mark.parametrize("task", ["regression", "reading"])
def test_task_folders_and_prompts_keep_spans(task: str, tmp_path: Path) -> None:
    folder = make_task_data(tmp_path / task, task, n=20, seed=1, n_dev=10, n_train=0)
    test = load_task_split(folder, "test")
    assert {i.variant for i in test} == {"pattern", "misleading"}
    pool = shot_pool(load_task_split(folder, "dev"))
    spec = get_task(task)
    for item in test:
        prompt = build_task_prompt(item, pool, 3, 42)
        offset = len(prompt) - len(item.text)
        assert prompt[offset:] == item.text
        for start, end in item_spans(item).values():
            assert prompt[offset + start:offset + end] == item.text[start:end] != ""
        # a shot ends with its answer and the separator, so the items do not run together
        assert prompt.count(spec.header) == 1
