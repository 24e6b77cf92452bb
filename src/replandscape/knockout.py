"""Attention knockout (the narrow gate): block what later positions read from chosen positions.

For a set of positions P and a window of layers, every query position q > p stops attending to
every p in P inside those layers' attention; elsewhere the model runs unchanged (docs/method.md
§7.7). A position keeps attending to itself, and what p itself computes is untouched: only the
flow of information out of p through attention is cut.

The block goes through the attention mask, so it works with the attention implementation the
model was loaded with (``sdpa``, the default, and ``eager``): a forward pre-hook on each chosen
layer's attention module (the module :mod:`replandscape.sites` names, so every supported family
and ZeRO-3 partitioning are covered) replaces the ``attention_mask`` keyword the decoder passes it
by the same 4-D mask ``[B, 1, T, T]`` with the knocked (q > p, p) entries masked. What the module
receives decides the form, checked for the installed transformers:

- a boolean mask (``sdpa`` with padding: True = attend): the knocked entries set False;
- an additive float mask (``eager``; GPT-Neo's attention always): the knocked entries set to the
  dtype's most negative value, as the model's own masks are (-inf would make a fully masked
  padding row NaN);
- ``None`` (``sdpa`` with no padding, which then relies on ``is_causal``): a causal-and-padding
  mask is built (boolean for ``sdpa``, additive otherwise) and knocked.

The layers' other masking (GPT-Neo's local windows, sliding windows) is kept because the received
mask is edited, not rebuilt. Flash-attention implementations take no 4-D mask and are refused.
When no prompt of a batch has a knocked position the hooks are not installed, so a knockout of
nothing is the clean run bit for bit.

Position sets (:func:`resolve_positions`) are found from the prompt's character layout
(:class:`~replandscape.tasks.pairs.PromptLayout`) through the tokenizer's offsets, so a BOS token
(empty offsets) or padding never shifts them:

- ``header``, ``shots``, ``query``, ``shot.i``, ``separator.i``: every token overlapping the
  named span; ``chars:START-END``: every token overlapping that character range;
- ``header_last``: the token holding the header's last character;
- ``shot_last``: per shot, the token holding its last character before the separator (the end of
  its answer);
- ``separators``: every token overlapping a shot's separator.

A layer window is ``(start, stop)``, half-open, over the decoder blocks. Per position set and
window the outputs are the change of accuracy (the argmax of the last position's logits against the
answer's first token) and the mean change of the answer's first-token log-probability. The scan
mode knocks out one position at a time, the 1st to the Nth before the last token (the last token
itself is read by nothing later), and reports the offset whose knockout moves the log-probability
most (largest mean absolute change).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from replandscape.errors import UserError
from replandscape.tasks.pairs import PromptLayout, answer_first_token, encode_prompt

SUPPORTED_ATTENTION = ("sdpa", "eager")
NAMED_SETS = ("header_last", "shot_last", "separators", "header", "shots", "query")
DEFAULT_SETS = ("header_last", "shot_last", "separators")
DEFAULT_SCAN_LAST = 16
DEFAULT_BATCH_SIZE = 8

Window = tuple[int, int]


# --------------------------------------------------------------------------------------------
# prompts, tokens and position sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnockoutPrompt:
    """One prompt to knock out in: its layout (``layout.text`` is the prompt) and its answer."""

    id: int
    layout: PromptLayout
    target: str


@dataclass(frozen=True)
class Encoded:
    """A prompt's tokens, their character offsets and the answer's first token."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    answer_id: int


def encode_with_offsets(tokenizer: Any, text: str, add_bos: bool) -> tuple[list[int],
                                                                           list[tuple[int, int]]]:
    """Token ids exactly as extraction makes them, with each token's character span (a special
    token's span is empty)."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("knockout needs a fast tokenizer (its character offsets place the "
                        "position sets)", key="model.path",
                        fix="use the model's tokenizer.json (a PreTrainedTokenizerFast)")
    enc = tokenizer(text, add_special_tokens=add_bos, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        offsets.insert(0, (0, 0))
    if ids != encode_prompt(tokenizer, text, add_bos):  # the offsets call must not retokenise
        raise AssertionError("tokenisation with offsets differs from extraction's")
    return ids, offsets


def encode(tokenizer: Any, prompt: KnockoutPrompt, add_bos: bool) -> Encoded:
    ids, offsets = encode_with_offsets(tokenizer, prompt.layout.text, add_bos)
    answer = answer_first_token(tokenizer, ids, prompt.layout.text, prompt.target, add_bos)
    return Encoded(ids=ids, offsets=offsets, answer_id=answer)


def tokens_overlapping(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose (non-empty) span overlaps ``[start, end)``."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def token_at(offsets: Sequence[tuple[int, int]], char: int) -> list[int]:
    """The index of the last token holding character ``char`` (empty when none does)."""
    found = [i for i, (s, e) in enumerate(offsets) if s <= char < e]
    return found[-1:]


def resolve_positions(spec: str, layout: PromptLayout,
                      offsets: Sequence[tuple[int, int]]) -> list[int]:
    """The token indices (of the unpadded prompt) a position set names, sorted and unique.

    Raises:
        UserError: ``spec`` is not a known position set.
    """
    found: list[int] = []
    spans = layout.spans()
    if spec == "header_last":
        start, end = layout.header
        found = token_at(offsets, end - 1) if end > start else []
    elif spec == "shot_last":
        for start, sep, _ in layout.shots:
            if sep > start:
                found += token_at(offsets, sep - 1)
    elif spec == "separators":
        for _, sep, end in layout.shots:
            found += tokens_overlapping(offsets, sep, end)
    elif spec.startswith("chars:"):
        try:
            a, b = (int(v) for v in spec[len("chars:"):].split("-"))
        except ValueError:
            raise UserError(f"position set '{spec}' is not chars:START-END", key="knockout.sets",
                            fix="write a character range like chars:0-40") from None
        found = tokens_overlapping(offsets, a, b)
    elif spec in spans:
        found = tokens_overlapping(offsets, *spans[spec])
    elif spec.startswith(("shot.", "separator.")):
        found = []  # a shot the prompt does not have: names no token
    else:
        raise UserError(f"unknown position set '{spec}'", key="knockout.sets",
                        fix=f"use one of {', '.join(NAMED_SETS)}, shot.I, separator.I or "
                            "chars:START-END")
    return sorted(set(found))


def check_windows(windows: Sequence[Window], n_layers: int) -> list[Window]:
    """Each window as ``(start, stop)`` with ``0 <= start < stop <= n_layers``.

    Raises:
        UserError: A window lies outside the model (one line naming it and the model's depth).
    """
    out = []
    for w in windows:
        try:
            start, stop = (int(v) for v in w)
        except (TypeError, ValueError):
            raise UserError(f"layer window {w!r} is not [start, stop]", key="knockout.windows",
                            fix="give each window as two layer indices [start, stop)") from None
        if not 0 <= start < stop <= n_layers:
            raise UserError(f"layer window [{start}, {stop}) lies outside the model's "
                            f"{n_layers} layers", key="knockout.windows",
                            fix=f"use windows with 0 <= start < stop <= {n_layers}")
        out.append((start, stop))
    return out


def window_label(window: Window) -> str:
    return f"{window[0]}:{window[1]}"


# --------------------------------------------------------------------------------------------
# the mask and the hooks
# --------------------------------------------------------------------------------------------


def attention_implementation(model: Any) -> str:
    root = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
    config = getattr(root, "config", None)
    impl = str(getattr(config, "_attn_implementation", None) or "eager")
    if impl not in SUPPORTED_ATTENTION:
        raise UserError(f"attention knockout edits the 4-D attention mask, which the "
                        f"'{impl}' attention implementation does not take", key="model.path",
                        fix=f"load the model with attn_implementation one of "
                            f"{', '.join(SUPPORTED_ATTENTION)}")
    return impl


def knocked_mask(incoming: Any, knock: Any, attention_mask: Any, dtype: Any, impl: str) -> Any:
    """The 4-D mask a knocked layer's attention gets.

    Args:
        incoming: What the decoder passed the layer: ``None``, a boolean ``[b, 1, T, T]`` mask
            (True = attend) or an additive float one (``b`` is the batch or 1).
        knock: ``[B, T]`` bool, True at the (padded) columns whose keys are knocked.
        attention_mask: ``[B, T]`` the padding mask (1 = real token).
        dtype: The attention's float dtype (for an additive mask built here).
        impl: The attention implementation (``sdpa`` or ``eager``).
    """
    import torch

    n = knock.shape[1]
    idx = torch.arange(n, device=knock.device)
    later = idx[:, None] > idx[None, :]  # query q strictly after key p
    blocked = (knock[:, None, None, :] & later[None, None]).to(knock.device)
    if incoming is None:
        allowed = (idx[:, None] >= idx[None, :])[None, None] & attention_mask.bool()[:, None,
                                                                                     None, :]
        if impl == "sdpa":
            incoming = allowed
        else:
            incoming = torch.zeros(allowed.shape, dtype=dtype, device=knock.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
    if incoming.shape[-2] != n or incoming.shape[-1] != n:
        raise AssertionError(f"knockout runs without a cache: mask {tuple(incoming.shape)}")
    blocked = blocked.to(incoming.device)
    if incoming.dtype == torch.bool:
        return incoming & ~blocked
    return torch.where(blocked, torch.finfo(incoming.dtype).min, incoming)


@contextmanager
def knockout_hooks(model: Any, layers: Sequence[int], knock: Any,
                   attention_mask: Any) -> Iterator[None]:
    """While open, layers ``layers`` stop later positions from reading the ``knock`` columns."""
    from replandscape.sites import resolve_sites

    impl = attention_implementation(model)
    handles = []
    if bool(knock.any()):
        sites = resolve_sites(getattr(model, "module", model))

        def pre_hook(_module: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = knocked_mask(kwargs.get("attention_mask"), knock.to(hidden.device),
                                attention_mask.to(hidden.device), hidden.dtype, impl)
            return args, {**kwargs, "attention_mask": mask}

        for i in layers:
            handles.append(sites.block_sites[i].attention.register_forward_pre_hook(
                pre_hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# forward passes
# --------------------------------------------------------------------------------------------


def collate_left(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    from replandscape.stages.extract import collate

    return collate(token_lists, pad_id, "left")


def answer_scores(model: Any, batch: Sequence[Encoded], pad_id: int,
                  knocked: Sequence[Sequence[int]] | None = None,
                  layers: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass: per prompt, the answer's first-token log-probability at the last
    position and whether it is the argmax; ``knocked[b]`` lists prompt b's knocked token indices
    (of its unpadded tokens), blocked in ``layers``."""
    import torch

    ids, mask = collate_left([e.ids for e in batch], pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    width = ids.shape[1]
    knock = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    if knocked is not None:
        for b, (e, positions) in enumerate(zip(batch, knocked)):
            shift = width - len(e.ids)
            for p in positions:
                knock[b, p + shift] = True
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    answers = torch.as_tensor([e.answer_id for e in batch], device=device)
    with torch.no_grad(), knockout_hooks(model, layers, knock, mask):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                       use_cache=False).logits[:, -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(batch), device=device)
    return (logprobs[rows, answers].cpu().numpy().astype(np.float64),
            (logits.argmax(-1) == answers).cpu().numpy())


def _batches(n: int, size: int) -> list[range]:
    if size < 1:
        raise UserError(f"batch size {size} is not positive", key="knockout.batch_size",
                        fix="use a batch size of 1 or more")
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass(frozen=True)
class KnockoutEffect:
    """The effect of knocking one position set out in one layer window."""

    position_set: str
    window: Window
    n: int
    mean_knocked: float  # tokens knocked per prompt
    accuracy_clean: float
    accuracy_knocked: float
    delta_accuracy: float
    delta_logprob: float  # mean over prompts of knocked minus clean
    per_item_delta_logprob: list[float] = field(default_factory=list)
    per_item_correct: list[bool] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"position_set": self.position_set, "window": list(self.window),
                "n": self.n, "mean_knocked": self.mean_knocked,
                "accuracy_clean": self.accuracy_clean, "accuracy_knocked": self.accuracy_knocked,
                "delta_accuracy": self.delta_accuracy, "delta_logprob": _num(self.delta_logprob),
                "per_item_delta_logprob": self.per_item_delta_logprob,
                "per_item_correct": self.per_item_correct}


@dataclass(frozen=True)
class KnockoutResult:
    """Clean scores and the effect of every (position set, window)."""

    ids: list[int]
    clean_logprob: list[float]
    clean_correct: list[bool]
    effects: list[KnockoutEffect]

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids, "clean_logprob": self.clean_logprob,
                "clean_correct": self.clean_correct,
                "effects": [e.to_json() for e in self.effects]}


@dataclass(frozen=True)
class ScanResult:
    """One position at a time, the 1st to the Nth before the last token, in one window.

    ``n[j]`` prompts are long enough for offset ``offsets[j]``; the means are over those.
    """

    window: Window
    offsets: list[int]
    n: list[int]
    delta_logprob: list[float]
    delta_accuracy: list[float]
    tokens: list[list[str]]  # per offset, the token text of each prompt long enough
    most: int  # the offset of the largest mean |change of log-probability|
    most_token: str  # the commonest token text at that offset

    def to_json(self) -> dict[str, Any]:
        return {"window": list(self.window), "offsets": self.offsets, "n": self.n,
                "delta_logprob": [_num(v) for v in self.delta_logprob],
                "delta_accuracy": [_num(v) for v in self.delta_accuracy],
                "tokens": self.tokens, "most": self.most, "most_token": self.most_token}


# --------------------------------------------------------------------------------------------
# the two modes
# --------------------------------------------------------------------------------------------


def _prepare(model: Any, tokenizer: Any, prompts: Sequence[KnockoutPrompt], windows:
             Sequence[Window], add_bos: bool) -> tuple[list[Encoded], list[Window], int]:
    from replandscape.sites import resolve_sites

    if not prompts:
        raise UserError("no prompts to knock out in", key="knockout",
                        fix="give at least one prompt")
    attention_implementation(model)
    n_layers = resolve_sites(getattr(model, "module", model)).n_blocks
    checked = check_windows(windows, n_layers)
    if not checked:
        raise UserError("no layer window given", key="knockout.windows",
                        fix=f"give windows such as [0, {n_layers}]")
    encoded = [encode(tokenizer, p, add_bos) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    return encoded, checked, int(pad)


def _clean(model: Any, encoded: Sequence[Encoded], pad: int,
           batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    lp, ok = np.zeros(len(encoded)), np.zeros(len(encoded), dtype=bool)
    for rows in _batches(len(encoded), batch_size):
        lp[rows.start:rows.stop], ok[rows.start:rows.stop] = answer_scores(
            model, [encoded[i] for i in rows], pad)
    return lp, ok


def run_knockout(model: Any, tokenizer: Any, prompts: Sequence[KnockoutPrompt],
                 position_sets: Sequence[str] = DEFAULT_SETS,
                 windows: Sequence[Window] = (), *, add_bos: bool = True,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> KnockoutResult:
    """Knock every position set out in every layer window.

    Args:
        model: A causal LM of a supported family (``sdpa`` or ``eager`` attention).
        tokenizer: Its (fast) tokenizer.
        prompts: The prompts with their layouts and answers.
        position_sets: Names as in :func:`resolve_positions`.
        windows: ``(start, stop)`` layer windows; empty means the whole model.
        add_bos: Tokenise with BOS first, as extraction does.
        batch_size: Prompts per forward pass.

    Raises:
        UserError: A position set names no token in some prompt, a window lies outside the
            model, an unknown position set, or an unsupported attention implementation.
    """
    from replandscape.sites import resolve_sites

    if not windows:
        windows = [(0, resolve_sites(getattr(model, "module", model)).n_blocks)]
    encoded, checked, pad = _prepare(model, tokenizer, prompts, windows, add_bos)
    positions: dict[str, list[list[int]]] = {}
    for spec in position_sets:
        per_prompt = [resolve_positions(spec, p.layout, e.offsets)
                      for p, e in zip(prompts, encoded)]
        empty = [p.id for p, found in zip(prompts, per_prompt) if not found]
        if empty:
            raise UserError(f"position set '{spec}' names no token in prompt {empty[0]} "
                            f"({len(empty)} of {len(prompts)} prompts)", key="knockout.sets",
                            fix="choose a set the prompts have (shot sets need shots)")
        positions[spec] = per_prompt
    clean_lp, clean_ok = _clean(model, encoded, pad, batch_size)
    effects = []
    for spec in position_sets:
        for window in checked:
            lp, ok = np.zeros(len(encoded)), np.zeros(len(encoded), dtype=bool)
            for rows in _batches(len(encoded), batch_size):
                lp[rows.start:rows.stop], ok[rows.start:rows.stop] = answer_scores(
                    model, [encoded[i] for i in rows], pad,
                    [positions[spec][i] for i in rows], range(*window))
            delta = lp - clean_lp
            effects.append(KnockoutEffect(
                position_set=spec, window=window, n=len(encoded),
                mean_knocked=float(np.mean([len(p) for p in positions[spec]])),
                accuracy_clean=float(clean_ok.mean()), accuracy_knocked=float(ok.mean()),
                delta_accuracy=float(ok.mean() - clean_ok.mean()),
                delta_logprob=float(delta.mean()), per_item_delta_logprob=delta.tolist(),
                per_item_correct=ok.tolist()))
    return KnockoutResult(ids=[p.id for p in prompts], clean_logprob=clean_lp.tolist(),
                          clean_correct=clean_ok.tolist(), effects=effects)


def scan_knockout(model: Any, tokenizer: Any, prompts: Sequence[KnockoutPrompt],
                  last_n: int = DEFAULT_SCAN_LAST, windows: Sequence[Window] = (), *,
                  add_bos: bool = True,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> list[ScanResult]:
    """Knock out one position at a time, offsets 1..``last_n`` before the last token, in each
    window; one :class:`ScanResult` per window."""
    from replandscape.sites import resolve_sites

    if isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 1:
        raise UserError(f"scan over the last {last_n!r} positions", key="knockout.scan_last",
                        fix="use a positive number of positions")
    if not windows:
        windows = [(0, resolve_sites(getattr(model, "module", model)).n_blocks)]
    encoded, checked, pad = _prepare(model, tokenizer, prompts, windows, add_bos)
    longest = max(len(e.ids) for e in encoded)
    if longest < 2:
        raise UserError("every prompt is a single token: no position before the last",
                        key="knockout.scan_last", fix="use longer prompts")
    offsets = list(range(1, min(last_n, longest - 1) + 1))
    clean_lp, clean_ok = _clean(model, encoded, pad, batch_size)
    results = []
    for window in checked:
        d_lp, d_acc, counts, tokens = [], [], [], []
        for j in offsets:
            # a prompt shorter than j + 1 tokens has no position at this offset
            has = [i for i, e in enumerate(encoded) if len(e.ids) - 1 - j >= 0]
            lp, ok = np.zeros(len(has)), np.zeros(len(has), dtype=bool)
            for rows in _batches(len(has), batch_size):
                batch = [encoded[has[r]] for r in rows]
                lp[rows.start:rows.stop], ok[rows.start:rows.stop] = answer_scores(
                    model, batch, pad, [[len(e.ids) - 1 - j] for e in batch], range(*window))
            counts.append(len(has))
            d_lp.append(float((lp - clean_lp[has]).mean()))
            d_acc.append(float(ok.mean() - clean_ok[has].mean()))
            tokens.append([tokenizer.decode([encoded[i].ids[len(encoded[i].ids) - 1 - j]])
                           for i in has])
        best = int(np.argmax(np.abs(np.asarray(d_lp))))
        common = Counter(tokens[best]).most_common(1)[0][0]
        results.append(ScanResult(window=window, offsets=offsets, n=counts, delta_logprob=d_lp,
                                  delta_accuracy=d_acc, tokens=tokens, most=offsets[best],
                                  most_token=common))
    return results


def layout_prompt(text: str) -> PromptLayout:
    """A layout with no parts but the query: for ``chars:`` sets and scans over bare text."""
    return PromptLayout(text=text, header=(0, 0), shots=(), query=(0, len(text)))
