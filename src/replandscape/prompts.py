"""Few-shot prompts in the exact format of the reference method (docs/method.md §2).

A k-shot prompt is the subject header, k solved examples (the first k shot-split questions of the
same subject, in an order drawn from the seed and the query's id alone, so any number of ranks or
workers builds the same text), then the query block ending at ``Answer:``.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from replandscape.data import Question
from replandscape.errors import UserError

LETTERS = string.ascii_uppercase


def subject_phrase(subject: str) -> str:
    """``high_school_physics`` -> `` high school physics`` (a space before each word)."""
    return "".join(f" {word}" for word in subject.split("_") if word)


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about{subject_phrase(subject)}.\n\n"


def question_block(q: Question) -> str:
    """The question, its lettered choices and ``Answer:`` (no trailing space)."""
    lines = [q.question.strip()]
    lines += [f"{LETTERS[i]}. {choice.strip()}" for i, choice in enumerate(q.choices)]
    return "\n".join(lines) + "\nAnswer:"


def answer_suffix(letter: str) -> str:
    """What follows ``Answer:`` in a solved example; the letter's token is read from this."""
    return f" {letter}"


def shot_block(q: Question) -> str:
    return question_block(q) + answer_suffix(LETTERS[q.answer]) + "\n\n"


def shot_order(seed: int, question_id: int, k: int) -> list[int]:
    """The order of the k shots for one query, from (seed, question id) alone."""
    order = list(range(k))
    random.Random(f"{seed}:{question_id}").shuffle(order)
    return order


def build_prompt(q: Question, pool: Mapping[str, Sequence[Question]], k: int, seed: int) -> str:
    """The k-shot prompt of question ``q`` with shots from ``pool`` (shot split by subject)."""
    shots: list[Question] = []
    if k:
        available = pool.get(q.subject, ())
        if len(available) < k:
            raise UserError(f"subject '{q.subject}' has {len(available)} shot questions but "
                            f"{k} shots were asked", key="prompts.shots",
                            fix=f"use at most {len(available)} shots or add shot questions")
        first = list(available[:k])
        shots = [first[i] for i in shot_order(seed, q.id, k)]
    return header(q.subject) + "".join(shot_block(s) for s in shots) + question_block(q)


def training_text(q: Question) -> tuple[str, str]:
    """Fine-tuning sample (docs/method.md §4): the bare question block and the answer suffix."""
    return question_block(q), answer_suffix(LETTERS[q.answer])


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class PromptRecord:
    """What the model sees for one question, and what the answer is."""

    id: int
    subject: str
    answer: int
    prompt: str

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "subject": self.subject, "answer": self.answer, "prompt": self.prompt}


def build_prompts(questions: Iterable[Question], pool: Mapping[str, Sequence[Question]], k: int,
                  seed: int) -> list[PromptRecord]:
    return [PromptRecord(q.id, q.subject, q.answer, build_prompt(q, pool, k, seed))
            for q in questions]


def letter_token_ids(tokenizer: Any, n_choices: int) -> list[int]:
    """Token ids of the answer letters exactly as they follow ``Answer:`` in a shot (not the bare
    letter, which a BPE such as Llama-3's encodes differently): the answer read from the logits
    and the token the fine-tuning loss is taken on."""
    prefix = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS[:n_choices]:
        full = tokenizer("Answer:" + answer_suffix(letter), add_special_tokens=False)["input_ids"]
        if full[: len(prefix)] != prefix or len(full) != len(prefix) + 1:
            raise UserError(f"the tokenizer does not encode '{answer_suffix(letter)}' after "
                            "'Answer:' as one token", key="model.path",
                            fix="use a tokenizer with single-token answer letters")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise UserError("answer letters share a token", key="model.path", fix="check the tokenizer")
    return ids
