"""Prompt pairs for patching: an item (clean) and its corrupted twin.

The twin is the same item with one local edit that breaks the task's shortcut or changes the
quantity the answer depends on, so that its answer differs (docs/method.md §7.7). The edit keeps the
item's surface (same words, one letter, number or operator exchanged for another of the same
written width where the task allows) so that both prompts tokenise to the same length under most
tokenizers; :func:`make_pairs` checks that under the model's own tokenizer and drops, and counts,
every pair that does not, so a patched position always holds the same token slot in both runs.

Every edit is drawn from ``random.Random(f"{seed}:pair:{task}:{variant}:{item id}")`` alone: any
rank or job builds the same twin. The pair kinds (one per task):

- ``expression``: the last term of Z gets another magnitude with the same number of digits (its
  sign kept), so Z's total moves away from its value (a pattern item's 0 becomes non-zero) and the
  answer S + Z*C changes; among the magnitudes (in seeded order) one whose answer starts with
  another character is preferred, since tokenizers that split digits one by one would give both
  answers the same first token. An item whose C totals 0 has no twin (no Z changes the answer).
- ``boolean``: the tail becomes the deciding tail of the opposite answer (``and False`` when the
  value is True, ``or True`` when it is False): a pattern item's ``and False`` <-> ``or True``.
- ``relation``: one city letter is exchanged: if Z is reachable from A, Z is renamed to a letter
  the item does not use (Z vanishes: the answer becomes False); if Z is present but cut off, its
  edge's other end moves to a city of A's part (True); if Z is absent, the first endpoint (in
  seeded order, A excepted) whose renaming to Z connects Z to A is renamed (True). Adding or
  removing an edge line would change the length, so the edge is renamed instead.
- ``parity``: the coin starts ``tails up`` instead of ``heads up``. One flip more or less would
  add or remove words (``does not flip``), so the length-preserving edit that breaks the shortcut
  (the parity of the number of sentences) and flips the answer is the starting side.
- ``algebra``: b (the answer) takes another value with as many digits (1-9 for one digit), the
  right-hand sides recomputed; a value keeping every right-hand side's width is preferred.
- ``code``: function2's operator is exchanged (``+ - * //``; a one-character operator for a
  one-character one first, then one whose answer starts with another character), the answer
  recomputed from x, function2's constant or the item's
  ``function1_value`` label; never a division by zero, never the same answer.
- ``mmlu``: the same question with its options rotated by one (option i moves to i+1, the last to
  A), so the correct letter moves to the next one; the shots are unchanged.

Both prompts of a pair share the header and the shots exactly (the clean prompt's, chosen as
:func:`~replandscape.tasks.prompts.build_task_prompt` or
:func:`~replandscape.prompts.build_prompt` would); only the query differs.
"""

from __future__ import annotations

import operator
import random
import re
import string
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from replandscape.errors import UserError
from replandscape.tasks.base import Item

MMLU = "mmlu"
DROP_REASONS = ("no_twin", "length", "same_first_token")


# --------------------------------------------------------------------------------------------
# prompt layout: where the header, the shots and the query sit in the prompt's characters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptLayout:
    """Character spans of a k-shot prompt's parts (half-open ``[start, end)``).

    Attributes:
        text: The prompt.
        header: The header's span.
        shots: Per solved shot, ``(start, separator_start, end)``: the shot runs from ``start`` to
            ``end``, its separator (what follows its answer) from ``separator_start`` to ``end``.
        query: The query's span (to the end of the prompt).
    """

    text: str
    header: tuple[int, int]
    shots: tuple[tuple[int, int, int], ...]
    query: tuple[int, int]

    def spans(self) -> dict[str, tuple[int, int]]:
        """Named spans: ``header``, ``shots`` (all of them), ``shot.i``, ``separator.i``,
        ``query``."""
        out: dict[str, tuple[int, int]] = {"header": self.header}
        if self.shots:
            out["shots"] = (self.shots[0][0], self.shots[-1][2])
        for i, (start, sep, end) in enumerate(self.shots):
            out[f"shot.{i}"] = (start, end)
            out[f"separator.{i}"] = (sep, end)
        out["query"] = self.query
        return out


def _layout(header: str, shots: Sequence[tuple[str, str]], query: str) -> PromptLayout:
    """``shots`` as (shot without separator, separator) pairs."""
    spans = []
    at = len(header)
    for body, sep in shots:
        spans.append((at, at + len(body), at + len(body) + len(sep)))
        at += len(body) + len(sep)
    text = header + "".join(b + s for b, s in shots) + query
    return PromptLayout(text=text, header=(0, len(header)), shots=tuple(spans),
                        query=(at, len(text)))


def task_layout(item: Item, pool: Mapping[tuple[str, str], Sequence[Item]], k: int,
                seed: int, query: str | None = None) -> PromptLayout:
    """The layout of a generated task's k-shot prompt for ``item`` (its query replaced by
    ``query`` when given: the shots stay the clean item's)."""
    from replandscape.tasks.prompts import choose_shots
    from replandscape.tasks.registry import get_task

    spec = get_task(item.task, key="task.name")
    shots = [(s.text + s.target, spec.separator) for s in choose_shots(item, pool, k, seed)]
    return _layout(spec.header, shots, spec.query(item) if query is None else query)


def mmlu_layout(q: Any, pool: Mapping[str, Sequence[Any]], k: int, seed: int,
                query: str | None = None) -> PromptLayout:
    """The layout of an MMLU k-shot prompt for question ``q`` (see :mod:`replandscape.prompts`)."""
    from replandscape.prompts import (
        LETTERS,
        answer_suffix,
        build_prompt,
        header,
        question_block,
        shot_order,
    )

    shots: list[tuple[str, str]] = []
    if k:
        build_prompt(q, pool, k, seed)  # the same checks (enough shot questions) and errors
        first = list(pool.get(q.subject, ())[:k])
        shots = [(question_block(s) + answer_suffix(LETTERS[s.answer]), "\n\n")
                 for s in (first[i] for i in shot_order(seed, q.id, k))]
    return _layout(header(q.subject), shots, question_block(q) if query is None else query)


# --------------------------------------------------------------------------------------------
# corruptions, one per task
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    """A corrupted query: its text, its answer and what was changed (for the record)."""

    text: str
    target: str
    edit: str


Corruptor = Callable[[Item, random.Random], Corruption | None]

_EXPRESSION = re.compile(r"^\((?P<s>[^()]+)\)\+\((?P<z>[^()]+)\)\*\((?P<c>[^()]+)\)=$")
_TERM = re.compile(r"[+-]?\d+")


def _terms(written: str) -> list[str] | None:
    parts = _TERM.findall(written)
    return parts if "".join(parts) == written else None


def _same_width_values(value: int, lowest: int = 0) -> list[int]:
    digits = len(str(value))
    lo = max(lowest, 10 ** (digits - 1) if digits > 1 else 0)
    return [v for v in range(lo, 10 ** digits) if v != value]


def corrupt_expression(item: Item, rng: random.Random) -> Corruption | None:
    m = _EXPRESSION.match(item.text)
    if m is None:
        return None
    s, z, c = (_terms(m.group(g)) for g in ("s", "z", "c"))
    if s is None or z is None or c is None:
        return None
    s_value, c_value = sum(int(t) for t in s), sum(int(t) for t in c)
    if c_value == 0:  # Z is multiplied by 0: no change of Z changes the answer
        return None
    last = z[-1]
    sign = last[0] if last[0] in "+-" else ""
    clean = str(s_value + sum(int(t) for t in z) * c_value)

    def answer(magnitude: int) -> str:
        return str(s_value + (sum(int(t) for t in z[:-1]) + int(f"{sign}{magnitude}")) * c_value)

    candidates = _same_width_values(int(last.lstrip("+-")))
    rng.shuffle(candidates)
    # answers starting with another character first: tokenizers that split digits one by one
    # would otherwise give both answers the same first token
    candidates.sort(key=lambda v: answer(v)[0] == clean[0])
    new_last = f"{sign}{candidates[0]}"
    text = f"({m.group('s')})+({''.join([*z[:-1], new_last])})*({m.group('c')})="
    return Corruption(text, answer(candidates[0]), f"Z's last term {last} -> {new_last}")


def corrupt_boolean(item: Item, rng: random.Random) -> Corruption | None:
    from replandscape.tasks.generators.boolean import CUE, evaluate

    if not item.text.endswith(CUE):
        return None
    expression = item.text[: -len(CUE)]
    # only literals, and/or and parentheses are ever evaluated
    words = re.findall(r"[A-Za-z]+", expression)
    if re.fullmatch(r"[()A-Za-z ]+", expression) is None or not set(words) <= {
            "True", "False", "and", "or"}:
        return None
    head, sep, tail = expression.rpartition(") ")
    if not sep or tail not in ("and False", "or True", "or False", "and True"):
        return None
    value = evaluate(expression)
    new_tail = "and False" if value else "or True"
    new_expression = f"{head}) {new_tail}"
    return Corruption(new_expression + CUE, str(evaluate(new_expression)),
                      f"tail '{tail}' -> '{new_tail}'")


_EDGE = re.compile(r"^([A-Z]) is connected with ([A-Z])$")


def _reachable(edges: Iterable[tuple[str, str]], start: str) -> set[str]:
    graph: dict[str, set[str]] = {}
    for x, y in edges:
        graph.setdefault(x, set()).add(y)
        graph.setdefault(y, set()).add(x)
    seen, todo = {start}, deque([start])
    while todo:
        for nxt in graph.get(todo.popleft(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def corrupt_relation(item: Item, rng: random.Random) -> Corruption | None:
    from replandscape.tasks.generators.relation import QUESTION

    if not item.text.endswith(QUESTION):
        return None
    lines = item.text[: -len(QUESTION)].split("\n")
    matches = [_EDGE.match(line) for line in lines]
    if any(mm is None for mm in matches):
        return None
    edges = [(mm.group(1), mm.group(2)) for mm in matches if mm is not None]
    cities = {c for e in edges for c in e}
    connected = "Z" in _reachable(edges, "A")

    def text_of(new_edges: Sequence[tuple[str, str]]) -> str:
        return "\n".join(f"{x} is connected with {y}" for x, y in new_edges) + QUESTION

    if "Z" in cities and connected:
        fresh = rng.choice([c for c in string.ascii_uppercase if c not in cities | {"A", "Z"}])
        new = [(fresh if x == "Z" else x, fresh if y == "Z" else y) for x, y in edges]
        edit = f"Z renamed {fresh}"
    elif "Z" in cities:
        at = next(i for i, e in enumerate(edges) if "Z" in e)
        x, y = edges[at]
        host = y if x == "Z" else x
        part = sorted(_reachable(edges, "A") - {"Z"})
        new_host = rng.choice(part)
        new = list(edges)
        new[at] = (new_host, y) if x == host else (x, new_host)
        edit = f"Z's edge moved from {host} to {new_host}"
    else:
        candidates = [(i, j) for i in range(len(edges)) for j in (0, 1) if edges[i][j] != "A"]
        rng.shuffle(candidates)
        for i, j in candidates:
            new = list(edges)
            pair = list(new[i])
            old, pair[j] = pair[j], "Z"
            new[i] = (pair[0], pair[1])
            if "Z" in _reachable(new, "A"):
                edit = f"{old} renamed Z in edge {i}"
                break
        else:
            return None
    answer = "Z" in _reachable(new, "A")
    if answer == connected:  # defensive: every branch above flips the answer
        return None
    return Corruption(text_of(new), str(answer), edit)


PARITY_START = "A coin is heads up. "
PARITY_START_CORRUPT = "A coin is tails up. "


def corrupt_parity(item: Item, rng: random.Random) -> Corruption | None:
    if not item.text.startswith(PARITY_START):
        return None
    flips = len(re.findall(r"\b\w+ flips the coin\.", item.text))
    # starting tails up, the coin ends heads up after an odd number of flips
    target = "yes" if flips % 2 == 1 else "no"
    return Corruption(PARITY_START_CORRUPT + item.text[len(PARITY_START):], target,
                      "starts tails up")


_ALGEBRA_TAIL = re.compile(r"^\n The solutions are: a = (\d+), b = $")
_EQUATION = re.compile(r"^(\d*)a \+ (\d*)b = (-?\d+)$")


def corrupt_algebra(item: Item, rng: random.Random) -> Corruption | None:
    at = item.text.find("\n The solutions are: ")
    tail = _ALGEBRA_TAIL.match(item.text[at:]) if at >= 0 else None
    if tail is None or not item.target.isdigit():
        return None
    a, b = int(tail.group(1)), int(item.target)
    rows = []
    for line in item.text[:at].split("\n"):
        mm = _EQUATION.match(line)
        if mm is None:
            return None
        p, q = int(mm.group(1) or 1), int(mm.group(2) or 1)
        if p * a + q * b != int(mm.group(3)):
            return None
        rows.append((mm.group(1), mm.group(2), p, q, mm.group(3)))
    candidates = _same_width_values(b, lowest=1)
    rng.shuffle(candidates)
    # a stable sort: candidates keeping every right-hand side's width first, in seeded order
    candidates.sort(key=lambda v: not all(len(str(p * a + q * v)) == len(r)
                                          for _, _, p, q, r in rows))
    if not candidates:
        return None
    new_b = candidates[0]
    lines = [f"{pw}a + {qw}b = {p * a + q * new_b}" for pw, qw, p, q, _ in rows]
    return Corruption("\n".join(lines) + item.text[at:], str(new_b), f"b {b} -> {new_b}")


_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub,
                                              "*": operator.mul, "//": operator.floordiv}
_RETURN = re.compile(r"\n( +)return z (\+|-|\*|//) (a|\d+)\n")
_INPUT = re.compile(r"The input is: (-?\d+), so the output is: $")


def corrupt_code(item: Item, rng: random.Random) -> Corruption | None:
    ret, given = _RETURN.search(item.text), _INPUT.search(item.text)
    if ret is None or given is None:
        return None
    x, op, operand = int(given.group(1)), ret.group(2), ret.group(3)
    if operand == "a":
        value = item.labels.get("function1_value")
        if not isinstance(value, int):
            return None
        second = value
    else:
        second = int(operand)
    if second == 0 and op == "//":
        return None
    current = _OPS[op](x, second)
    if str(current) != item.target:  # the text is not what the generator wrote
        return None
    others = [o for o in _OPS if o != op and not (o == "//" and second == 0)]
    rng.shuffle(others)
    # same written width first, then an answer starting with another character (see expression)
    others.sort(key=lambda o: (len(o) != len(op),
                               str(_OPS[o](x, second))[0] == str(current)[0]))
    for new_op in others:
        result = _OPS[new_op](x, second)
        if result != current:
            start, end = ret.span()
            line = f"\n{ret.group(1)}return z {new_op} {operand}\n"
            return Corruption(item.text[:start] + line + item.text[end:], str(result),
                              f"function2's operator {op} -> {new_op}")
    return None


CORRUPTORS: dict[str, Corruptor] = {
    "expression": corrupt_expression,
    "boolean": corrupt_boolean,
    "relation": corrupt_relation,
    "parity": corrupt_parity,
    "algebra": corrupt_algebra,
    "code": corrupt_code,
}
PAIR_KINDS: tuple[str, ...] = (*CORRUPTORS, MMLU)


def check_pair_kind(task: str) -> None:
    """A one-line error unless ``task`` has a pair kind."""
    if task not in PAIR_KINDS:
        raise UserError(f"task '{task}' has no prompt-pair kind", key="task.name",
                        fix=f"patching needs one of {', '.join(PAIR_KINDS)}")


def pair_rng(seed: int, task: str, group: str, item_id: int) -> random.Random:
    """The generator of one item's edit: (seed, task, variant or subject, item id) alone."""
    return random.Random(f"{seed}:pair:{task}:{group}:{item_id}")


def corrupt_item(item: Item, seed: int) -> Corruption | None:
    """The twin of a generated task's item, or None when the item has none."""
    check_pair_kind(item.task)
    twin = CORRUPTORS[item.task](item, pair_rng(seed, item.task, item.variant, item.id))
    if twin is None or twin.text == item.text or twin.target == item.target:
        return None
    return twin


def rotate_choices(q: Any) -> Any:
    """An MMLU question with its options rotated by one (the correct letter moves to the next)."""
    from dataclasses import replace

    n = len(q.choices)
    return replace(q, choices=(q.choices[-1], *q.choices[:-1]), answer=(q.answer + 1) % n)


# --------------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------------


def encode_prompt(tokenizer: Any, text: str, add_bos: bool) -> list[int]:
    """Token ids of a prompt exactly as extraction makes them (BOS first when asked)."""
    ids = list(tokenizer(text, add_special_tokens=add_bos)["input_ids"])
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def answer_first_token(tokenizer: Any, prompt_ids: Sequence[int], prompt: str, target: str,
                       add_bos: bool) -> int:
    """The answer's first token as the model would produce it after the prompt.

    When ``prompt + target`` tokenises as the prompt's tokens followed by more, the first of those
    is the answer's first token (this is how MMLU's `` A`` after ``Answer:`` is read); otherwise
    (the prompt's last token merges with the answer) the target's own first token.
    """
    full = encode_prompt(tokenizer, prompt + target, add_bos)
    n = len(prompt_ids)
    if len(full) > n and full[:n] == list(prompt_ids):
        return int(full[n])
    alone = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not alone:
        raise UserError(f"the answer {target!r} has no tokens", key="model.path",
                        fix="check the tokenizer and the task's answers")
    return int(alone[0])


# --------------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptPair:
    """A clean prompt and its corrupted twin, tokenised to the same length.

    ``layout`` and ``corrupt_layout`` share the header and the shots; only the query differs.
    """

    id: int
    task: str
    group: str
    clean_prompt: str
    corrupt_prompt: str
    clean_target: str
    corrupt_target: str
    clean_ids: tuple[int, ...]
    corrupt_ids: tuple[int, ...]
    clean_answer_id: int
    corrupt_answer_id: int
    edit: str
    layout: PromptLayout
    corrupt_layout: PromptLayout

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "group": self.group,
                "clean_prompt": self.clean_prompt, "corrupt_prompt": self.corrupt_prompt,
                "clean_target": self.clean_target, "corrupt_target": self.corrupt_target,
                "n_tokens": len(self.clean_ids), "clean_answer_id": self.clean_answer_id,
                "corrupt_answer_id": self.corrupt_answer_id, "edit": self.edit}


@dataclass(frozen=True)
class PairSet:
    """The kept pairs of a task at k shots and the number dropped per reason."""

    task: str
    shots: int
    n_items: int
    pairs: list[PromptPair]
    dropped: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "shots": self.shots, "n_items": self.n_items,
                "kept": len(self.pairs), "dropped": dict(self.dropped)}


def check_pair(tokenizer: Any, clean: str, corrupt: str, clean_target: str,
               corrupt_target: str, add_bos: bool) -> tuple[str | None, Any]:
    """Tokenise a candidate pair: ``(None, (ids, ids, answer id, answer id))`` when it is kept,
    else ``(reason, None)`` with a reason of :data:`DROP_REASONS`."""
    clean_ids = encode_prompt(tokenizer, clean, add_bos)
    corrupt_ids = encode_prompt(tokenizer, corrupt, add_bos)
    if len(clean_ids) != len(corrupt_ids):
        return "length", None
    clean_answer = answer_first_token(tokenizer, clean_ids, clean, clean_target, add_bos)
    corrupt_answer = answer_first_token(tokenizer, corrupt_ids, corrupt, corrupt_target, add_bos)
    if clean_answer == corrupt_answer:
        return "same_first_token", None
    return None, (clean_ids, corrupt_ids, clean_answer, corrupt_answer)


def make_pairs(items: Sequence[Any], task: str, tokenizer: Any, *, shots: int = 0,
               pool: Mapping[Any, Sequence[Any]] | None = None, seed: int = 0,
               prompt_seed: int | None = None, add_bos: bool = True) -> PairSet:
    """The prompt pairs of ``items`` at ``shots`` shots, checked under ``tokenizer``.

    Args:
        items: Generated-task :class:`Item` s, or MMLU ``Question`` s when ``task`` is ``mmlu``.
        task: The task's name (it must have a pair kind).
        tokenizer: The model's tokenizer (a Hugging Face tokenizer).
        shots: Solved shots before the query, the same ones in both prompts.
        pool: The shot pool: ``shot_pool(dev items)`` for a generated task,
            ``shots_by_subject(dev questions)`` for MMLU. Needed when ``shots > 0``.
        seed: The pairs' seed (which edit each item gets).
        prompt_seed: The shots' seed (``prompts.seed``); ``seed`` when None.
        add_bos: Tokenise with BOS first, as extraction does.

    Returns:
        The kept pairs in item order and the counts dropped per reason (``no_twin``: the item has
        no twin; ``length``: the prompts tokenise to different lengths; ``same_first_token``: the
        two answers start with the same token).

    Raises:
        UserError: The task has no pair kind, or no pair is kept (the message gives the counts).
    """
    check_pair_kind(task)
    shot_seed = seed if prompt_seed is None else prompt_seed
    shot_pool = pool or {}
    dropped = dict.fromkeys(DROP_REASONS, 0)
    kept: list[PromptPair] = []
    for item in items:
        if task == MMLU:
            from replandscape.prompts import LETTERS, answer_suffix, question_block

            twin_q = rotate_choices(item)
            layout = mmlu_layout(item, shot_pool, shots, shot_seed)
            query = question_block(twin_q)
            corrupt_layout = mmlu_layout(item, shot_pool, shots, shot_seed, query=query)
            group = str(item.subject)
            clean_target = answer_suffix(LETTERS[item.answer])
            corrupt_target = answer_suffix(LETTERS[twin_q.answer])
            edit = "options rotated by one"
            if query == question_block(item):
                dropped["no_twin"] += 1
                continue
        else:
            if item.task != task:
                raise UserError(f"item {item.id} is of task '{item.task}', not '{task}'",
                                key="task.name", fix="make pairs of one task at a time")
            twin = corrupt_item(item, seed)
            if twin is None:
                dropped["no_twin"] += 1
                continue
            layout = task_layout(item, shot_pool, shots, shot_seed)
            corrupt_layout = task_layout(item, shot_pool, shots, shot_seed, query=twin.text)
            group, clean_target, corrupt_target = item.variant, item.target, twin.target
            edit = twin.edit
        reason, tokens = check_pair(tokenizer, layout.text, corrupt_layout.text, clean_target,
                                    corrupt_target, add_bos)
        if reason is not None:
            dropped[reason] += 1
            continue
        clean_ids, corrupt_ids, clean_answer, corrupt_answer = tokens
        kept.append(PromptPair(
            id=int(item.id), task=task, group=group, clean_prompt=layout.text,
            corrupt_prompt=corrupt_layout.text, clean_target=clean_target,
            corrupt_target=corrupt_target, clean_ids=tuple(clean_ids),
            corrupt_ids=tuple(corrupt_ids), clean_answer_id=clean_answer,
            corrupt_answer_id=corrupt_answer, edit=edit, layout=layout,
            corrupt_layout=corrupt_layout))
    result = PairSet(task=task, shots=shots, n_items=len(items), pairs=kept, dropped=dropped)
    if not kept:
        counts = ", ".join(f"{r}={n}" for r, n in dropped.items())
        raise UserError(f"task '{task}' at {shots} shots: no prompt pair kept of {len(items)} "
                        f"items (dropped: {counts})", key="task.name",
                        fix="use more items, or a tokenizer under which the twins keep their "
                            "length")
    return result
