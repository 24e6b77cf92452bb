"""Answers by generation: batched greedy decoding equals one-prompt ``generate``, token for token."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from helpers import PYTHON, REPO, TINY_MODEL, env
from replandscape.capture import collate
from replandscape.config import ModelConfig
from replandscape.generation import (
    decode_continuations,
    eos_token_ids,
    greedy_continue,
    prompt_forward,
    prompt_position_ids,
)
from replandscape.models import TINY_FAMILIES, load_causal_lm, load_tokenizer, resolve_model_path
from replandscape.tasks import build_task_prompt, generate_task_splits, get_task, shot_pool

TASK = "expression"
SHOTS = (0, 4)


def _load(builtin: str) -> tuple[Any, Any]:
    fields: dict[str, Any] = {**TINY_MODEL, "path": f"builtin:{builtin}", "name": builtin,
                              "family": TINY_FAMILIES[builtin]}
    cfg = ModelConfig(**fields)
    path = resolve_model_path(cfg)
    return load_causal_lm(path), load_tokenizer(path)


# rotary families (Llama, Qwen2) see only position differences, so a wrong constant offset per
# row would pass unseen there; GPT-Neo's learned absolute positions make every position count
FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-gpt-neo"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """(model, tokenizer) of each family, loaded through from_pretrained."""
    return _load(request.param)


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    return _load("tiny-llama")


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt-neo"])
def rotary_and_absolute(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return _load(request.param)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Expression prompts at 0 and 4 shots (about 75 and 200 tokens), shorter and longer mixed."""
    splits = generate_task_splits(TASK, n=4, seed=0, n_dev=12, n_train=0)
    pool = shot_pool(splits["dev"])
    return [build_task_prompt(item, pool, k, 0) for item in splits["test"] for k in SHOTS]


def _tokens(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def _batched(model: Any, tokenizer: Any, seqs: list[list[int]], n: int,
             **kwargs: Any) -> torch.Tensor:
    ids, mask = collate(seqs, tokenizer.pad_token_id, "left")
    kwargs.setdefault("eos_token_id", eos_token_ids(model, tokenizer))
    return greedy_continue(model, ids, mask, n, pad_token_id=tokenizer.pad_token_id, **kwargs)


def _one_at_a_time(model: Any, seq: list[int], n: int, **kwargs: Any) -> list[int]:
    """One prompt alone, unpadded, through generate."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([seq]), max_new_tokens=n, do_sample=False, **kwargs)
    return [int(t) for t in out[0, len(seq):]]


def _until(row: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row


@contextmanager
def _count_forwards(model: Any) -> Iterator[list[int]]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    handle = model.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_batched_equals_one_prompt_generate(family: tuple[Any, Any], prompts: list[str]) -> None:
    model, tokenizer = family
    n = get_task(TASK).max_new_tokens()
    seqs = _tokens(tokenizer, prompts)
    assert max(map(len, seqs)) - min(map(len, seqs)) > 80  # really mixed lengths, much padding
    new = _batched(model, tokenizer, seqs, n)
    assert new.shape == (len(seqs), n)
    stops = set(eos_token_ids(model, tokenizer))
    for seq, row in zip(seqs, new.tolist()):
        assert _until(row, stops) == _one_at_a_time(model, seq, n)
    texts = decode_continuations(tokenizer, new)
    assert texts == [tokenizer.decode(_one_at_a_time(model, s, n), skip_special_tokens=True)
                     for s in seqs]


def test_padding_changes_nothing(rotary_and_absolute: tuple[Any, Any],
                                 prompts: list[str]) -> None:
    """A short prompt alone and in a batch with longer ones (so behind much padding)."""
    model, tokenizer = rotary_and_absolute
    seqs = _tokens(tokenizer, prompts)
    short = min(range(len(seqs)), key=lambda i: len(seqs[i]))
    longer = [s for s in seqs if len(s) > len(seqs[short]) + 50][:3]
    assert longer
    alone = _batched(model, tokenizer, [seqs[short]], 8)
    together = _batched(model, tokenizer, [*longer, seqs[short]], 8)
    assert torch.equal(together[-1], alone[0])
    # position ids count real tokens only: the padded prompt starts at position 0
    ids, mask = collate([*longer, seqs[short]], tokenizer.pad_token_id, "left")
    pos = prompt_position_ids(mask)[-1]
    assert pos[mask[-1] == 1].tolist() == list(range(len(seqs[short])))


def _eos_ending_some_rows(new: torch.Tensor) -> int:
    """A token that ends one row before its last column while another row goes on past it."""
    rows = new.tolist()
    width = new.shape[1]
    for token in sorted({t for row in rows for t in row}):
        ends = [row.index(token) if token in row else width for row in rows]
        if min(ends) < width - 1 and max(ends) > min(ends) + 1:
            return int(token)
    raise AssertionError("no token ends some rows but not others; use other prompts")


def test_tokens_after_eos_are_pad(llama: tuple[Any, Any], prompts: list[str]) -> None:
    model, tokenizer = llama
    seqs = _tokens(tokenizer, prompts)
    n = 8
    free = _batched(model, tokenizer, seqs, n, eos_token_id=None)
    eos = _eos_ending_some_rows(free)
    pad = tokenizer.pad_token_id
    new = _batched(model, tokenizer, seqs, n, eos_token_id=eos)
    for seq, before, row in zip(seqs, free.tolist(), new.tolist()):
        end = before.index(eos) if eos in before else n
        assert row[: end + 1] == before[: end + 1]  # the same tokens up to the end
        assert row[end + 1:] == [pad] * (n - end - 1)  # pad after it
        assert _until(row, {eos}) == _one_at_a_time(model, seq, n, eos_token_id=eos, pad_token_id=pad)
    cut = decode_continuations(tokenizer, new, eos)
    assert cut == [tokenizer.decode(_until(r, {eos})[:-1] if eos in r else r,
                                    skip_special_tokens=True) for r in new.tolist()]


def test_stop_in_step_runs_every_step(llama: tuple[Any, Any], prompts: list[str]) -> None:
    """Every row ends at its first token: alone it stops there, in lock step it runs all steps."""
    model, tokenizer = llama
    seqs = _tokens(tokenizer, prompts)
    n = 6
    firsts = sorted(set(_batched(model, tokenizer, seqs, 1, eos_token_id=None)[:, 0].tolist()))
    with _count_forwards(model) as calls:
        early = _batched(model, tokenizer, seqs, n, eos_token_id=firsts)
    assert calls[0] == 1  # the prompt pass, then every row had ended
    with _count_forwards(model) as calls:
        locked = _batched(model, tokenizer, seqs, n, eos_token_id=firsts, stop_in_step=True)
    assert calls[0] == n
    assert torch.equal(early, locked)
    assert (locked[:, 1:] == tokenizer.pad_token_id).all()
    with _count_forwards(model) as calls:  # no end token: n passes either way, prompt included
        _batched(model, tokenizer, seqs[:2], n, eos_token_id=None)
    assert calls[0] == n


def test_caller_prompt_pass_equals_plain(family: tuple[Any, Any], prompts: list[str]) -> None:
    """The caller runs the prompt forward (as extraction does, hooks attached), then the steps."""
    model, tokenizer = family
    seqs = _tokens(tokenizer, prompts)
    n = 7
    ids, mask = collate(seqs, tokenizer.pad_token_id, "left")
    plain = _batched(model, tokenizer, seqs, n)
    eos = eos_token_ids(model, tokenizer)
    logits, past = prompt_forward(model, ids, mask)
    with _count_forwards(model) as calls:
        handed = greedy_continue(model, ids, mask, n, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos, first_logits=logits, past=past,
                                 stop_in_step=True)
    assert calls[0] == n - 1  # the prompt pass was the caller's
    assert torch.equal(handed, plain)
    # any forward of the root model with the explicit positions and a cache will do
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=prompt_position_ids(mask),
                    use_cache=True)
    own = greedy_continue(model, ids, mask, n, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=eos, first_logits=out.logits[:, -1],
                          past=out.past_key_values)
    assert torch.equal(own, plain)


def test_bad_calls(llama: tuple[Any, Any]) -> None:
    model, tokenizer = llama
    ids, mask = collate([[1, 5, 9]], tokenizer.pad_token_id, "left")
    logits, _ = prompt_forward(model, ids, mask)
    with pytest.raises(ValueError, match="both or neither"):
        greedy_continue(model, ids, mask, 3, pad_token_id=0, first_logits=logits)
    right = collate([[1, 5, 9], [1, 5]], tokenizer.pad_token_id, "right")
    with pytest.raises(ValueError, match="left padding"):
        greedy_continue(model, *right, 3, pad_token_id=0)
    with _count_forwards(model) as calls:
        none = greedy_continue(model, ids, mask, 0, pad_token_id=0)
    assert none.shape == (1, 0) and calls[0] == 0


def test_decode_skips_special_tokens_and_cuts_at_eos(llama: tuple[Any, Any]) -> None:
    model, tokenizer = llama
    words = tokenizer(" 42 is", add_special_tokens=False)["input_ids"]
    eos, pad, bos = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    rows = torch.tensor([[bos, *words, eos, pad, *words], [*words, pad, eos, pad, *words]])
    assert decode_continuations(tokenizer, rows) == [" 42 is", " 42 is"]
    assert eos_token_ids(model) == [eos]


def test_benchmark_quick_run() -> None:
    out = subprocess.run([PYTHON, "benchmarks/bench_generate.py", "--quick"], cwd=REPO,
                         env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "identical" in out.stdout
    assert "| one at a time: generate, no padding |" in out.stdout
