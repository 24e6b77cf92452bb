"""Generated implicit-pattern tasks: gold answers recomputed independently, shortcuts, splits,
prompts, scoring and the CLI's errors."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
from collections import deque
from fractions import Fraction
from pathlib import Path

import pytest

from helpers import cli, one_line_error
from replandscape.errors import UserError
from replandscape.tasks import (
    TASK_NAMES,
    Item,
    build_task_prompt,
    choose_shots,
    generate_task_splits,
    get_task,
    load_task_split,
    make_task_data,
    score_all,
    score_strict,
    score_substring,
    shot_pool,
)

N = 150  # items per variant for the statistical checks


def items(task: str, variant: str, n: int = N, split: str = "test", seed: int = 3) -> list[Item]:
    spec = get_task(task)
    return [spec.generate(split, variant, i, seed) for i in range(n)]


# --------------------------------------------------------------------------------------------
# registry, headers, shot formats
# --------------------------------------------------------------------------------------------


def test_registry_knows_every_task_and_names_them_on_error() -> None:
    # the six implicit-pattern tasks and the two with designed conditions (RSA and probes)
    assert set(TASK_NAMES) == {"expression", "relation", "boolean", "algebra", "code", "parity",
                               "regression", "reading"}
    for name in TASK_NAMES:
        spec = get_task(name)
        assert spec.name == name and spec.variants == ("pattern", "misleading")
    with pytest.raises(UserError, match="unknown task 'nope'.*algebra, boolean, code"):
        get_task("nope")
    with pytest.raises(UserError, match="task 'code' has no variant 'odd'"):
        get_task("code").generate("test", "odd", 0, 0)


def test_headers_are_verbatim() -> None:
    assert get_task("expression").header == (
        "Now you need to calculate the answer of some mathematic equations. Here are some "
        "examples: \n")
    assert get_task("code").header == (
        "Now you need to give me the printed result after running this python code . Here are "
        "some examples: \n")
    assert get_task("relation").header == (
        "Here are some cities expressed as A, B, C, etc. I will show some connection relations, "
        "and you need to tell me if city A and city Z are connected (Answer True or False). "
        "Here are some examples: \n")
    assert get_task("boolean").header == (
        "Here are some boolean expressions, you need to directly tell me the result. If it is "
        "true, print True, else print False. Here are some examples: \n")
    assert get_task("algebra").header == (
        "Here are some equations, you need to find all solutions of given variables. Here are "
        "some examples: \n")


def test_shot_and_query_formats() -> None:
    example = Item(0, "expression", "pattern", "(9-4)+(5-5)*(-10-8+4+8)=", "5")
    spec = get_task("expression")
    assert spec.shot(example) == "(9-4)+(5-5)*(-10-8+4+8)=5\n"
    assert spec.query(example) == "(9-4)+(5-5)*(-10-8+4+8)="
    expression = re.compile(r"\(\d+([+-]\d+)?\)\+\(-?\d+([+-]\d+)+\)\*\(-?\d+([+-]\d+){3}\)=")
    assert all(expression.fullmatch(i.text) for v in ("pattern", "misleading")
               for i in items("expression", v, 40))
    relation = items("relation", "pattern", 5)[0]
    assert re.fullmatch(r"([A-J] is connected with [B-JZ]\n)*[A-J] is connected with [B-JZ]"
                        r"\n\n So 'the city A and Z is connected' is ", relation.text)
    assert get_task("relation").shot(relation) == relation.text + relation.target + "\n"
    for item in items("boolean", "pattern", 10) + items("boolean", "misleading", 10):
        assert re.fullmatch(r"\(.*\) (and|or) (True|False)\n The result is: ", item.text)
        assert item.target in ("True", "False")
    for item in items("algebra", "pattern", 10):
        assert re.fullmatch(r"(\d*a \+ \d*b = \d+\n){3} The solutions are: a = \d, b = ",
                            item.text)
    for item in items("code", "misleading", 10):
        assert item.text.startswith("The code is: \nimport math\n\ndef function1(x):\n")
        assert re.search(r"\nprint\(function2\(x, function1\(x\)\)\)\n"
                         r"The input is: \d+, so the output is: $", item.text)
    for item in items("parity", "pattern", 10):
        assert re.fullmatch(r"A coin is heads up\.( \w+ flips the coin\.){3,9} Is the coin still "
                            r"heads up\?\n The answer is: ", item.text)


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generation_is_deterministic_and_varied(task: str, tmp_path: Path) -> None:
    spec = get_task(task)
    for variant in spec.variants:
        assert spec.generate("test", variant, 7, 1) == spec.generate("test", variant, 7, 1)
        texts = {spec.generate("test", variant, i, 1).text for i in range(40)}
        assert len(texts) >= 38
        assert spec.generate("test", variant, 7, 1).text != spec.generate("test", variant, 7, 2).text
        assert spec.generate("test", variant, 7, 1).text != spec.generate("dev", variant, 7, 1).text
    sizes = {"n": 20, "n_dev": 33, "n_train": 25}
    first = make_task_data(tmp_path / "a", task, seed=5, **sizes)
    second = make_task_data(tmp_path / "b", task, seed=5, **sizes)
    for name in ("test.jsonl", "dev.jsonl", "train.jsonl", "task.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    other = make_task_data(tmp_path / "c", task, seed=6, **sizes)
    assert (first / "test.jsonl").read_bytes() != (other / "test.jsonl").read_bytes()
    # the test set does not depend on the sizes of the splits drawn after it
    bigger = make_task_data(tmp_path / "d", task, seed=5, n=20, n_dev=40, n_train=80)
    assert (first / "test.jsonl").read_bytes() == (bigger / "test.jsonl").read_bytes()


# --------------------------------------------------------------------------------------------
# gold answers, recomputed independently; shortcuts
# --------------------------------------------------------------------------------------------


def _arith(node: ast.AST) -> int:
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_arith(node.operand)
    if isinstance(node, ast.BinOp):
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
    raise AssertionError(f"unexpected node {ast.dump(node)}")


def test_expression_gold_and_shortcut() -> None:
    for variant in ("pattern", "misleading"):
        broken = 0
        for item in items("expression", variant):
            assert item.text.endswith("=")
            assert int(item.target) == _arith(ast.parse(item.text[:-1], mode="eval"))
            s, z, c = re.fullmatch(r"\((.*)\)\+\((.*)\)\*\((.*)\)=", item.text).groups()
            s_value = _arith(ast.parse(s, mode="eval"))
            z_value = _arith(ast.parse(z, mode="eval"))
            assert 0 <= s_value <= 20 and len(re.findall(r"\d+", c)) == 4
            if variant == "pattern":
                assert z_value == 0 and item.target == str(s_value)
                assert 2 <= len(re.findall(r"\d+", z)) <= 4
            else:
                assert z_value != 0
            broken += item.target != str(s_value)
        assert broken == 0 if variant == "pattern" else broken > 0.8 * N
    # the fine-tuning split uses 1-3 terms of Z in [-10, 10]
    for item in items("expression", "pattern", split="train"):
        z = re.fullmatch(r"\((.*)\)\+\((.*)\)\*\((.*)\)=", item.text).group(2)
        terms = [int(t) for t in re.findall(r"-?\d+", z.replace("+", " ").replace("-", " -"))]
        assert 1 <= len(terms) <= 3 and all(-10 <= t <= 10 for t in terms[:-1])


def _edges(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^([A-Z]) is connected with ([A-Z])$", text, flags=re.M)


def _connected(edges: list[tuple[str, str]], start: str, goal: str) -> bool:
    graph: dict[str, set[str]] = {}
    for x, y in edges:
        graph.setdefault(x, set()).add(y)
        graph.setdefault(y, set()).add(x)
    seen, queue = {start}, deque([start])
    while queue:
        for nxt in graph.get(queue.popleft(), ()):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return goal in seen


def test_relation_gold_and_shortcut() -> None:
    for variant in ("pattern", "misleading"):
        answers = []
        for item in items("relation", variant):
            edges = _edges(item.text)
            cities = {c for edge in edges for c in edge} - {"A", "Z"}
            assert cities == set("BCDEFGHIJ")
            gold = _connected(edges, "A", "Z")
            assert item.target == str(gold)
            mentions_z = any("Z" in edge for edge in edges)
            if variant == "pattern":
                assert mentions_z == gold and all(_connected(edges, "A", c) for c in cities)
            else:
                assert mentions_z and len(edges) == 9  # A's edge, 7 of 8 chain edges, Z's edge
            answers.append(gold)
        assert 0.3 < sum(answers) / N < 0.7  # the shortcut 'Z appears' is wrong on the False half


def _bool(node: ast.AST) -> bool:
    if isinstance(node, ast.Expression):
        return _bool(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is bool:
        return node.value
    if isinstance(node, ast.BoolOp):
        values = [_bool(v) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    raise AssertionError(f"unexpected node {ast.dump(node)}")


def test_boolean_gold_and_shortcut() -> None:
    for variant in ("pattern", "misleading"):
        broken = 0
        trues = 0
        for item in items("boolean", variant):
            expression = item.text.removesuffix("\n The result is: ")
            assert item.target == str(_bool(ast.parse(expression, mode="eval")))
            inner, tail = re.fullmatch(r"\((.*)\) ((?:and|or) (?:True|False))", expression).groups()
            groups = re.findall(r"\(([^()]*)\)", inner)
            assert len(groups) == 3
            assert all(2 <= len(re.findall("True|False", g)) <= 4 for g in groups)
            if variant == "pattern":
                assert tail in ("and False", "or True")
            else:
                assert tail in ("or False", "and True")
            broken += item.target != tail.split()[1]
            trues += item.target == "True"
        assert 0.3 < trues / N < 0.7
        assert broken == 0 if variant == "pattern" else broken > 0.3 * N


def test_boolean_pattern_shots_keep_false_answers() -> None:
    # a false item's shot is the whole expression followed by 'False', never a collapsed '0'
    item = next(i for i in items("boolean", "pattern") if i.target == "False")
    assert get_task("boolean").shot(item).endswith("and False\n The result is: False\n")


def test_algebra_gold_and_structure() -> None:
    pattern = re.compile(r"(\d*)a \+ (\d*)b = (\d+)")
    for variant in ("pattern", "misleading"):
        for item in items("algebra", variant):
            rows = [tuple(int(x or 1) for x in m) for m in pattern.findall(item.text)]
            assert len(rows) == 3
            (p1, q1, r1), (p2, q2, r2), (p3, q3, r3) = rows
            det = p1 * q2 - p2 * q1
            assert det != 0  # collinear draws are rejected
            a = Fraction(r1 * q2 - r2 * q1, det)
            b = Fraction(p1 * r2 - p2 * r1, det)
            assert p3 * a + q3 * b == r3  # the third equation holds too
            assert re.search(rf"a = {a}, b = $", item.text) and item.target == str(b)
            assert 1 <= a <= 5 and 1 <= b <= 5
            combination = any((m * p1 + n * p2, m * q1 + n * q2) == (p3, q3)
                              for m in range(1, 4) for n in range(1, 4))
            assert combination == (variant == "pattern")


def _run(program: str, x: int) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(program, {"x": x})  # the program the generator wrote, run with full Python
    return out.getvalue().strip()


def test_code_gold_and_shortcut() -> None:
    for variant in ("pattern", "misleading"):
        depends = 0
        for item in items("code", variant, 80):
            program, x = re.fullmatch(r"The code is: \n(.*)The input is: (\d+), so the output is: ",
                                      item.text, flags=re.S).groups()
            assert 0 <= int(x) <= 10 and item.target == _run(program, int(x))
            # integer results only: true division appears only inside math.floor/ceil
            rest = re.sub(r"math\.(floor|ceil)\(y / \d+\)", "", program)
            assert not re.search(r"(?<!/)/(?!/)", rest) and re.fullmatch(r"-?\d+", item.target)
            op, operand = re.search(r"def function2\(z, a\):\n    return z (\S+) (\S+)\n",
                                    program).groups()
            assert op in ("+", "-", "*", "//")
            if variant == "pattern":
                assert operand.isdigit()
                assert item.target == str(eval(f"{x} {op} {operand}"))
            else:
                assert operand == "a"
                # replacing function1 by another routine changes the answer: it matters
                swapped = program.replace("    return y\n", "    return y + 1\n", 1)
                try:
                    depends += _run(swapped, int(x)) != item.target
                except ZeroDivisionError:
                    depends += 1
        if variant == "misleading":
            assert depends > 0.5 * 80


def test_parity_gold_and_shortcut() -> None:
    for variant in ("pattern", "misleading"):
        broken = 0
        for item in items("parity", variant):
            flips = len(re.findall(r"\w+ flips the coin\.", item.text))
            non_flips = len(re.findall(r"\w+ does not flip the coin\.", item.text))
            assert 3 <= flips + non_flips <= 9
            assert item.target == ("yes" if flips % 2 == 0 else "no")
            if variant == "pattern":
                assert non_flips == 0
            else:
                assert non_flips >= 1
            sentences = flips + non_flips
            broken += item.target != ("yes" if sentences % 2 == 0 else "no")
        assert broken == 0 if variant == "pattern" else broken > 0.3 * N


@pytest.mark.parametrize("task", TASK_NAMES)
def test_labels_and_max_new_tokens_cover_every_answer(task: str) -> None:
    spec = get_task(task)
    for split in ("test", "train"):
        for variant in spec.variants:
            for item in items(task, variant, 200, split=split):
                assert set(item.labels) == set(spec.label_keys)
                # a token holds at least one character; one more for a leading-space token
                assert len(item.target) + 1 <= spec.max_new_tokens()


def test_options_are_overridable_and_checked() -> None:
    spec = get_task("parity")
    opts = spec.options({"actions": [4, 4], "names": ["Ann", "Bo", "Cy", "Di"]})
    item = spec.generate("test", "pattern", 0, 0, opts)
    assert item.text.count("flips the coin.") == 4
    assert set(re.findall(r"(\w+) flips", item.text)) == {"Ann", "Bo", "Cy", "Di"}
    with pytest.raises(UserError, match="has no option 'colour'"):
        spec.options({"colour": 1})
    with pytest.raises(UserError, match="'actions' of task 'parity' must be a list"):
        spec.options({"actions": 3})
    with pytest.raises(UserError, match="option 'actions' of task 'parity' is \\[5, 3\\]"):
        spec.options({"actions": [5, 3]})
    relation = get_task("relation").options({"cities": "BCD"})
    text = get_task("relation").generate("test", "pattern", 0, 0, relation).text
    assert {c for e in _edges(text) for c in e} - {"A", "Z"} == set("BCD")


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def test_strict_and_substring_scoring() -> None:
    assert score_strict("5", "5") and score_strict("  5\n(1)+", "5") and score_strict("5.", "5")
    assert not score_strict("15", "5") and not score_strict("51", "5")
    assert not score_strict("-5", "5") and score_strict(" -5\n", "-5")
    assert score_strict(" True\n", "True") and not score_strict("Trueish", "True")
    assert not score_strict("\n5", "5") and not score_strict("", "5")
    assert score_substring("15", "5") and score_substring("the answer is 5", "5")
    assert not score_substring("4", "5")
    assert score_all("15", "5") == {"strict": False, "substring": True}


# --------------------------------------------------------------------------------------------
# splits, loading, prompts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_NAMES)
def test_splits_are_sized_and_disjoint(task: str, tmp_path: Path) -> None:
    folder = make_task_data(tmp_path / task, task, n=30, seed=0, n_dev=40, n_train=50)
    splits = {s: load_task_split(folder, s) for s in ("test", "dev", "train")}
    for split, size in (("test", 30), ("dev", 40), ("train", 50)):
        rows = splits[split]
        assert [r.id for r in rows] == list(range(len(rows)))
        assert [r.variant for r in rows].count("pattern") == size
        assert [r.variant for r in rows].count("misleading") == size
        assert len({r.text for r in rows}) == len(rows)
    test_texts = {r.text for r in splits["test"]}
    assert not test_texts & {r.text for r in splits["dev"] + splits["train"]}
    manifest = json.loads((folder / "task.json").read_text())
    assert manifest["task"] == task and manifest["max_new_tokens"] == get_task(task).max_new_tokens()


def test_too_many_items_is_a_user_error_naming_the_largest_n() -> None:
    options = get_task("parity").options({"names": ["Mia"], "actions": [3, 4],
                                          "distinct_names": False})
    with pytest.raises(UserError, match=r"only 2 distinct test items.*use --n 2 or less"):
        generate_task_splits("parity", n=3, options=options, n_dev=0, n_train=0)
    # 2 test items per variant leave nothing for the shot pool
    with pytest.raises(UserError, match=r"only 0 distinct dev items.*--n-dev 0"):
        generate_task_splits("parity", n=2, options=options, n_dev=1, n_train=0,
                             variants=["pattern"])


def test_prompt_is_header_shots_query_in_a_paired_order(tmp_path: Path) -> None:
    folder = make_task_data(tmp_path / "b", "boolean", n=10, seed=0, n_train=0)
    test, pool = load_task_split(folder, "test"), shot_pool(load_task_split(folder, "dev"))
    spec = get_task("boolean")
    item = test[12]
    assert item.variant == "misleading"
    prompt = build_task_prompt(item, pool, 4, seed=42)
    shots = choose_shots(item, pool, 4, seed=42)
    assert prompt == spec.header + "".join(s.text + s.target + "\n" for s in shots) + item.text
    assert all(s.variant == "misleading" and s.task == "boolean" for s in shots)
    assert len({s.id for s in shots}) == 4
    # the shots of k are the first shots of 2k; the order depends on (seed, item id) alone
    assert choose_shots(item, pool, 8, 42)[:4] == shots
    assert choose_shots(item, pool, 4, 43) != shots
    assert len({tuple(s.id for s in choose_shots(i, pool, 4, 42)) for i in test[10:]}) > 5
    assert build_task_prompt(item, pool, 0, 42) == spec.header + item.text
    assert prompt.count("The result is: ") == 5
    assert len(choose_shots(item, pool, 32, 42)) == 32  # the default pool allows 32 shots
    with pytest.raises(UserError, match="task 'boolean' variant 'misleading' has 64 shot items "
                                        "in its pool but 65 shots"):
        build_task_prompt(item, pool, 65, 42)


@pytest.mark.parametrize(("line", "message"), [
    ('{"id": 0, "task": "boolean"', "line 2 is not valid JSON"),
    ('{"id": 1, "task": "boolean", "variant": "pattern", "text": "x"}',
     "line 2 lacks the field 'target'"),
    ('{"id": "1", "task": "boolean", "variant": "pattern", "text": "x", "target": "True"}',
     "line 2: 'id' is str, expected int"),
    ('{"id": 1, "task": "boolean", "variant": "odd", "text": "x", "target": "True"}',
     "line 2: task 'boolean' has no variant 'odd'"),
    ('{"id": 1, "task": "chess", "variant": "pattern", "text": "x", "target": "True"}',
     "line 2: unknown task 'chess'"),
    ('{"id": 0, "task": "boolean", "variant": "pattern", "text": "y", "target": "True"}',
     "line 2: id 0 already used on line 1"),
    ('[1, 2]', "line 2 is not a JSON object"),
])
def test_loading_checks_every_line(tmp_path: Path, line: str, message: str) -> None:
    good = '{"id": 0, "task": "boolean", "variant": "pattern", "text": "x", "target": "True"}'
    (tmp_path / "test.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(UserError) as info:
        load_task_split(tmp_path, "test")
    assert message in str(info.value) and str(tmp_path / "test.jsonl") in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="no 'dev' split"):
        load_task_split(tmp_path, "dev")


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------


def test_cli_makes_a_task_folder_and_its_prompts(tmp_path: Path) -> None:
    folder = tmp_path / "expr"
    proc = cli("make-data", str(folder), "--task", "expression", "--n", "12", "--seed", "4",
               "--n-train", "20", "--set", "c_range=[-3,3]")
    assert proc.returncode == 0, proc.stderr
    test = load_task_split(folder, "test")
    assert len(test) == 24 and len(load_task_split(folder, "train")) == 40
    assert json.loads((folder / "task.json").read_text())["options"]["c_range"] == [-3, 3]
    out = tmp_path / "p.jsonl"
    proc = cli("prompts", str(folder), "--split", "test", "--shots", "3", "--jsonl", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24
    assert {"id", "task", "variant", "prompt", "target"} <= set(rows[0])
    pool = shot_pool(load_task_split(folder, "dev"))
    for row, item in zip(rows, test):
        assert row["id"] == item.id and row["target"] == item.target
        assert row["prompt"] == build_task_prompt(item, pool, 3, 42)
        assert row["prompt"].count("=") == 4
    proc = cli("prompts", str(folder), "--shots", "0", "--variant", "misleading", "--limit", "2",
               "--jsonl", "-")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["variant"] for r in rows] == ["misleading"] * 2 and rows[0]["id"] == 12
    # without --task, the MMLU-shaped demo set as before
    proc = cli("make-data", str(tmp_path / "demo"), "--test-per-subject", "2")
    assert proc.returncode == 0, proc.stderr
    assert "question" in json.loads((tmp_path / "demo" / "test.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "chess"], "unknown task 'chess'"),
    (["--task", "code", "--variant", "odd"], "task 'code' has no variant 'odd'"),
    (["--task", "parity", "--set", "names=[Mia]", "--set", "distinct_names=false",
      "--set", "actions=[3,3]", "--n", "3"], "can make only 1 distinct test items"),
    (["--task", "parity", "--set", "colour=red"], "task 'parity' has no option 'colour'"),
    (["--task", "relation", "--set", "shuffle_edges=maybe"], "must be true or false"),
    (["--n", "5"], "--n applies to generated tasks only"),
])
def test_cli_make_data_errors_write_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    folder = tmp_path / "new"
    line = one_line_error(cli("make-data", str(folder), *args))
    assert message in line
    assert not folder.exists() and list(tmp_path.iterdir()) == []
    # an existing folder is left as it was
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    one_line_error(cli("make-data", str(folder), *args))
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_cli_prompts_errors_write_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "rel"
    assert cli("make-data", str(folder), "--task", "relation", "--n", "4", "--n-dev", "5",
               "--n-train", "0").returncode == 0
    out = tmp_path / "p.jsonl"
    line = one_line_error(cli("prompts", str(folder), "--shots", "6", "--jsonl", str(out)))
    assert "task 'relation' variant 'pattern' has 5 shot items in its pool but 6 shots" in line
    line = one_line_error(cli("prompts", str(folder), "--variant", "odd", "--jsonl", str(out)))
    assert "task 'relation' has no variant 'odd'" in line
    line = one_line_error(cli("prompts", str(folder), "--split", "validation", "--jsonl",
                              str(out)))
    assert "validation.jsonl" in line and "no 'validation' split" in line
    lines = (folder / "test.jsonl").read_text().splitlines()
    (folder / "test.jsonl").write_text("\n".join([lines[0], lines[1][:-3], *lines[2:]]) + "\n")
    line = one_line_error(cli("prompts", str(folder), "--jsonl", str(out)))
    assert "test.jsonl" in line and "line 2 is not valid JSON" in line
    assert not out.exists()


def test_cli_unwritable_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    line = one_line_error(cli("make-data", str(tmp_path / "file" / "sub"), "--task", "boolean"))
    assert "file/sub" in line and "cannot write the task folder" in line
    assert (tmp_path / "file").read_text() == "x"
