"""Answers by generation: batched greedy decoding with the KV cache.

A batch of prompts is left-padded (as extraction collates it) and decoded together. Each prompt's
continuation is the one ``model.generate(prompt, max_new_tokens=n, do_sample=False)`` gives for
that prompt alone, without padding:

* positions count real tokens only: ``(mask.cumsum(-1) - 1).clamp(min=0)`` for the prompt, then
  one more per generated token, so a prompt sees the same rotary or learned positions whatever
  padding stands before it;
* the attention mask hides the padding and grows by one column a step; the key/value cache
  (transformers' ``DynamicCache``, made by the first forward with ``use_cache=True``) holds the
  past, so a step runs one token per row;
* the next token is the argmax of the float32 logits (``generate``'s greedy rule, first index on a
  tie); a row that has produced an end-of-sequence token gets ``pad_token_id`` from then on.

Two ways to call it:

    new_ids = greedy_continue(model, ids, mask, n, pad_token_id=pad, eos_token_id=eos)

runs the prompt forward itself. A caller that needs that forward for something else (extraction's
hooks keep the last-token states of the same pass) runs it first and hands over its outputs:

    logits, past = prompt_forward(model, ids, mask)     # or any forward of the root model with
                                                        # the explicit positions and use_cache=True
    new_ids = greedy_continue(model, ids, mask, n, pad_token_id=pad, eos_token_id=eos,
                              first_logits=logits, past=past)

Either way greedy_continue makes ``n`` forward passes in all (prompt pass included). With
``stop_in_step=True`` it makes exactly that many whatever the rows produce: under DeepSpeed ZeRO-3
a forward pass is collective (every rank gathers each layer's weights together), so a rank must not
stop early because its own rows have all ended. Without it, decoding stops once every row has
ended. Nothing here talks to other processes: lock-step decoding is only about the count.

The equality with one-prompt ``generate`` holds when the model's generation config adds no logits
processor (no repetition penalty, no bad words, no forced tokens) and ``eos_token_id`` is the one
``generate`` uses (:func:`eos_token_ids` reads it). Floating-point sums over padded and unpadded
inputs can differ in the last bit, so two logits equal to within rounding could in principle order
differently; the tests and the benchmark check the equality on task prompts.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

EosIds = int | Sequence[int] | None


def prompt_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (left padding sits at position 0, masked)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _forward_parameters(model: Any) -> set[str]:
    """Names the underlying transformers model's ``forward`` takes (through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def prompt_forward(model: Any, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The prompt pass: logits at the last position [B, V] and the key/value cache.

    The root module is called (never its decoder alone), so hooks on it and DeepSpeed's
    start- and end-of-forward hooks run. Only the last position's logits are computed where the
    model allows it (``logits_to_keep=1``): a [B, T, vocab] tensor is never made.
    """
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in _forward_parameters(model):
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode():
        output = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=prompt_position_ids(attention_mask), use_cache=True, **kwargs)
    return output.logits[:, -1], output.past_key_values


def _eos_tensor(eos_token_id: EosIds, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    return torch.as_tensor(ids, dtype=torch.long, device=device)


def greedy_continue(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, *, pad_token_id: int, eos_token_id: EosIds = None,
                    stop_in_step: bool = False, first_logits: torch.Tensor | None = None,
                    past: Any = None) -> torch.Tensor:
    """Greedy continuations of a left-padded batch, decoded together with the KV cache.

    Args:
        model: The root causal LM (the module DeepSpeed or PEFT wraps, if any), in eval mode.
        input_ids: Prompt tokens [B, T], left-padded.
        attention_mask: 1 for real tokens, 0 for padding [B, T].
        max_new_tokens: Tokens to produce per row (the number of forward passes, prompt pass
            included).
        pad_token_id: The token put after a row's end-of-sequence token (and in the columns left
            when decoding stops early).
        eos_token_id: One id or several that end a row; None: rows end only at
            ``max_new_tokens``.
        stop_in_step: Make exactly ``max_new_tokens`` forward passes even when every row has
            ended (ZeRO-3: other ranks' forwards need this rank's). Default False: stop as soon
            as every row has ended.
        first_logits: Logits at the last prompt position [B, V] from a prompt forward the caller
            ran (see :func:`prompt_forward`); given together with ``past``.
        past: The key/value cache that forward returned (``use_cache=True``).

    Returns:
        New token ids [B, max_new_tokens] on the input's device: each row's greedy tokens, its
        end-of-sequence token kept, ``pad_token_id`` after it.

    Raises:
        ValueError: Only one of ``first_logits`` and ``past`` is given, ``max_new_tokens`` is
            negative, or a row's last column is padding (not left-padded): programming errors.
    """
    if (first_logits is None) != (past is None):
        raise ValueError("first_logits and past come from one prompt forward: give both or neither")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not bool(attention_mask[:, -1].all()):
        # the next token follows the last column: with right padding it would follow padding
        raise ValueError("greedy_continue needs left padding: every row's last column is real")
    device = input_ids.device
    batch = input_ids.shape[0]
    new_ids = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return new_ids
    eos = _eos_tensor(eos_token_id, device)
    with torch.inference_mode():
        if first_logits is None:
            first_logits, past = prompt_forward(model, input_ids, attention_mask)
        logits = first_logits
        mask = attention_mask
        # the next token's position in each row: the number of real tokens before it
        positions = attention_mask.long().sum(-1)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        pad = torch.full_like(positions, pad_token_id)
        one = torch.ones((batch, 1), dtype=mask.dtype, device=mask.device)
        for step in range(max_new_tokens):
            # float32 before the argmax, as generate does: a bfloat16 tie stays a tie
            token = logits.to(torch.float32).argmax(-1).to(device)
            token = torch.where(finished, pad, token)
            new_ids[:, step] = token
            if eos is not None:
                finished = finished | torch.isin(token, eos)
            if step + 1 == max_new_tokens:
                break  # the last token is not fed back (generate does not either)
            if not stop_in_step and eos is not None and bool(finished.all()):
                break
            mask = torch.cat([mask, one], dim=-1)
            output = model(input_ids=token[:, None], attention_mask=mask,
                           position_ids=positions[:, None], past_key_values=past, use_cache=True)
            positions = positions + 1
            past = output.past_key_values
            logits = output.logits[:, -1]
    return new_ids


def eos_token_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """The end-of-sequence ids ``generate`` stops at: the generation config's, else the model
    config's, else the tokenizer's (a list: some models end at several tokens)."""
    found: Any = None
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        found = generation_config.eos_token_id
    if found is None:
        found = getattr(model.config, "eos_token_id", None)
    if found is None and tokenizer is not None:
        found = tokenizer.eos_token_id
    if found is None:
        return []
    return [int(found)] if isinstance(found, int) else [int(i) for i in found]


def decode_continuations(tokenizer: Any, new_ids: torch.Tensor,
                         eos_token_id: EosIds = None) -> list[str]:
    """Each row's text: its tokens up to (not including) the first end-of-sequence token,
    special tokens skipped. ``eos_token_id`` defaults to the tokenizer's."""
    eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    stops = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    texts = []
    for row in new_ids.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts
