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
most (largest mean absolute change). Prompts go through in consecutive batches of
``batch_size``; the scan uses the same batches, each less its prompts too short for the offset.

Split over ranks (:mod:`replandscape.stages.knockout`), :func:`shares` gives each rank a
contiguous block of whole batches, so every prompt is scored in the batch it has in a one-rank
run. :func:`run_knockout` and :func:`scan_knockout` score one share but check every prompt (bad
input fails on all ranks alike), :func:`planned_forwards` counts a share's forward passes before
any runs (ranks of a partitioned model pad to the largest count with :func:`idle_forward`), and
:func:`merge_knockout` and :func:`merge_scans` rebuild the one-rank result from the shares'
per-prompt values: the lists in prompt order, every mean recomputed from them.
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


def idle_forward(model: Any, pad_id: int) -> None:
    """One forward pass over a single token, its output discarded: what a rank whose own work is
    done runs while a ZeRO-3 partitioned model needs every rank in each forward pass (each
    module's parameters are gathered from all ranks as it runs)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.full((1, 1), int(pad_id), dtype=torch.long, device=device)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


# --------------------------------------------------------------------------------------------
# shares and batches
# --------------------------------------------------------------------------------------------


def _check_batch_size(size: int) -> None:
    if size < 1:
        raise UserError(f"batch size {size} is not positive", key="knockout.batch_size",
                        fix="use a batch size of 1 or more")


def shares(n: int, batch_size: int, world: int) -> list[range]:
    """Each rank's prompts: contiguous blocks of whole batches, the batch counts differing by at
    most one (the first ranks take the extra ones; a rank past the last batch gets none).

    A block starts at a multiple of ``batch_size``, so its batches are those of a one-rank run
    and every prompt is scored in the same batch, with the same padding, as there.
    """
    _check_batch_size(batch_size)
    n_batches = -(-n // batch_size)
    per, extra = divmod(n_batches, world)
    out, first = [], 0
    for r in range(world):
        count = per + (1 if r < extra else 0)
        out.append(range(min(first * batch_size, n), min((first + count) * batch_size, n)))
        first += count
    return out


def _rows(share: range | None, n: int) -> range:
    if share is None:
        return range(n)
    if share.step != 1 or not 0 <= share.start <= share.stop <= n:
        raise ValueError(f"share {share} is not a block of the {n} prompts")
    return share


def _batches(rows: range, size: int) -> list[list[int]]:
    """Consecutive batches of ``size`` rows (the batch boundaries of a one-rank run when
    ``rows`` starts at a multiple of ``size``)."""
    _check_batch_size(size)
    return [list(range(i, min(i + size, rows.stop))) for i in range(rows.start, rows.stop, size)]


def _scan_batches(lengths: Sequence[int], batches: Sequence[Sequence[int]],
                  offset: int) -> list[list[int]]:
    """The batches of the scan at ``offset``: each batch less its prompts too short to have a
    position there (``offset + 1`` tokens or fewer), empty ones dropped."""
    kept = [[i for i in rows if lengths[i] - 1 - offset >= 0] for rows in batches]
    return [rows for rows in kept if rows]


def scan_offsets(last_n: int, lengths: Sequence[int]) -> list[int]:
    """The scan's offsets before the last token: 1 to ``last_n``, as far as the longest prompt
    reaches.

    Raises:
        UserError: ``last_n`` is not a positive number, or every prompt is a single token.
    """
    if isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 1:
        raise UserError(f"scan over the last {last_n!r} positions", key="knockout.scan_last",
                        fix="use a positive number of positions")
    longest = max(lengths, default=0)
    if longest < 2:
        raise UserError("every prompt is a single token: no position before the last",
                        key="knockout.scan_last", fix="use longer prompts")
    return list(range(1, min(last_n, longest - 1) + 1))


def planned_forwards(lengths: Sequence[int], share: range, batch_size: int, n_knockouts: int,
                     n_windows: int, scan_last: int) -> int:
    """The forward passes :func:`run_knockout` (``n_knockouts`` = position sets x windows) and
    then :func:`scan_knockout` over ``n_windows`` windows (``scan_last`` 0: no scan; given the
    knockout result, so the clean scores are not recomputed) make for the prompts in ``share``;
    ``lengths`` are the token counts of all prompts."""
    batches = _batches(_rows(share, len(lengths)), batch_size)
    n = len(batches) * (1 + n_knockouts)
    if scan_last:
        n += n_windows * sum(len(_scan_batches(lengths, batches, j))
                             for j in scan_offsets(scan_last, lengths))
    return n


def _scores(model: Any, encoded: Sequence[Encoded], pad: int, batches: Sequence[Sequence[int]],
            knocked: Sequence[Sequence[int]] | None = None,
            layers: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """:func:`answer_scores` over ``batches`` (rows of ``encoded``), concatenated in order."""
    lps, oks = [np.zeros(0)], [np.zeros(0, dtype=bool)]
    for rows in batches:
        lp, ok = answer_scores(model, [encoded[i] for i in rows], pad,
                               None if knocked is None else [knocked[i] for i in rows], layers)
        lps.append(lp)
        oks.append(ok)
    return np.concatenate(lps), np.concatenate(oks)


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _mean(values: Any) -> float:
    """The mean of an array (NaN for none: a rank's share may lack an offset's prompts)."""
    arr = np.asarray(values)
    return float(arr.mean()) if arr.size else math.nan


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
    per_item_knocked: list[int] = field(default_factory=list)  # tokens knocked (not in JSON)

    def to_json(self) -> dict[str, Any]:
        return {"position_set": self.position_set, "window": list(self.window),
                "n": self.n, "mean_knocked": self.mean_knocked,
                "accuracy_clean": self.accuracy_clean, "accuracy_knocked": self.accuracy_knocked,
                "delta_accuracy": self.delta_accuracy, "delta_logprob": _num(self.delta_logprob),
                "per_item_delta_logprob": self.per_item_delta_logprob,
                "per_item_correct": self.per_item_correct}


def _effect(spec: str, window: Window, knocked: Sequence[int], delta: np.ndarray,
            ok: np.ndarray, clean_ok: np.ndarray) -> KnockoutEffect:
    """An effect from its per-prompt values (one-rank runs and merges alike: same values in the
    same order give the same means, bit for bit)."""
    return KnockoutEffect(
        position_set=spec, window=window, n=len(delta), mean_knocked=_mean(list(knocked)),
        accuracy_clean=_mean(clean_ok), accuracy_knocked=_mean(ok),
        delta_accuracy=_mean(ok) - _mean(clean_ok), delta_logprob=_mean(delta),
        per_item_delta_logprob=delta.tolist(), per_item_correct=ok.tolist(),
        per_item_knocked=[int(k) for k in knocked])


@dataclass(frozen=True)
class KnockoutResult:
    """Clean scores and the effect of every (position set, window).

    ``rows`` (not in the JSON) are the prompts' places in the full list: a result of one share
    of the prompts names them, and :func:`merge_knockout` orders by them.
    """

    ids: list[int]
    clean_logprob: list[float]
    clean_correct: list[bool]
    effects: list[KnockoutEffect]
    rows: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids, "clean_logprob": self.clean_logprob,
                "clean_correct": self.clean_correct,
                "effects": [e.to_json() for e in self.effects]}


@dataclass(frozen=True)
class ScanResult:
    """One position at a time, the 1st to the Nth before the last token, in one window.

    ``n[j]`` prompts are long enough for offset ``offsets[j]``; the means are over those. The
    per-prompt values behind the means (``rows``: the prompts' places in the full list, and
    their changes of log-probability, knocked and clean correctness) are kept for
    :func:`merge_scans` and not written to JSON.
    """

    window: Window
    offsets: list[int]
    n: list[int]
    delta_logprob: list[float]
    delta_accuracy: list[float]
    tokens: list[list[str]]  # per offset, the token text of each prompt long enough
    most: int  # the offset of the largest mean |change of log-probability|
    most_token: str  # the commonest token text at that offset
    rows: list[list[int]] = field(default_factory=list)
    per_item_delta_logprob: list[list[float]] = field(default_factory=list)
    per_item_correct: list[list[bool]] = field(default_factory=list)
    per_item_clean_correct: list[list[bool]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"window": list(self.window), "offsets": self.offsets, "n": self.n,
                "delta_logprob": [_num(v) for v in self.delta_logprob],
                "delta_accuracy": [_num(v) for v in self.delta_accuracy],
                "tokens": self.tokens, "most": self.most, "most_token": self.most_token}


def _scan_result(window: Window, offsets: Sequence[int], rows: Sequence[Sequence[int]],
                 deltas: Sequence[Sequence[float]], oks: Sequence[Sequence[bool]],
                 clean_oks: Sequence[Sequence[bool]],
                 tokens: Sequence[Sequence[str]]) -> ScanResult:
    """A scan result from its per-offset, per-prompt values (runs and merges alike)."""
    d_lp = [_mean(np.asarray(d, dtype=np.float64)) for d in deltas]
    d_acc = [_mean(np.asarray(o, dtype=bool)) - _mean(np.asarray(c, dtype=bool))
             for o, c in zip(oks, clean_oks)]
    counts = [len(r) for r in rows]
    size = np.abs(np.asarray(d_lp, dtype=np.float64))
    size[np.asarray(counts) == 0] = -np.inf  # an offset no prompt of a share reaches: no mean
    best = int(np.argmax(size))
    common = Counter(tokens[best]).most_common(1)[0][0] if tokens[best] else ""
    return ScanResult(window=window, offsets=list(offsets), n=counts, delta_logprob=d_lp,
                      delta_accuracy=d_acc, tokens=[list(t) for t in tokens],
                      most=offsets[best], most_token=common,
                      rows=[list(r) for r in rows],
                      per_item_delta_logprob=[list(d) for d in deltas],
                      per_item_correct=[list(o) for o in oks],
                      per_item_clean_correct=[list(c) for c in clean_oks])


def _prompt_order(rows: Sequence[int]) -> list[int]:
    """The permutation putting ``rows`` (places in the full prompt list) in prompt order."""
    if len(set(rows)) != len(rows):
        raise ValueError("the results to merge share prompts")
    return sorted(range(len(rows)), key=lambda i: rows[i])


def merge_knockout(parts: Sequence[KnockoutResult]) -> KnockoutResult:
    """One result from the results of disjoint shares of the prompts (given in any order).

    Every per-prompt list is put in prompt order (by ``rows``) and every mean is recomputed from
    them as a one-rank run computes it: when each prompt's scores equal the one-rank run's (the
    same batches, see :func:`shares`), so does the merge, bit for bit.

    Raises:
        ValueError: No part has a prompt, the parts share a prompt, or they knocked out
            different (position set, window) pairs.
    """
    parts = [p for p in parts if p.rows]
    if not parts:
        raise ValueError("no knockout result with prompts to merge")
    labels = [(e.position_set, e.window) for e in parts[0].effects]
    if any([(e.position_set, e.window) for e in p.effects] != labels for p in parts):
        raise ValueError("the knockout results to merge cover different position sets or "
                         "windows")
    order = _prompt_order([r for p in parts for r in p.rows])

    def take(lists: Sequence[Sequence[Any]]) -> list[Any]:
        flat = [v for values in lists for v in values]
        return [flat[i] for i in order]

    clean_ok = np.asarray(take([p.clean_correct for p in parts]), dtype=bool)
    effects = []
    for k, (spec, window) in enumerate(labels):
        effects.append(_effect(
            spec, window, take([p.effects[k].per_item_knocked for p in parts]),
            np.asarray(take([p.effects[k].per_item_delta_logprob for p in parts]),
                       dtype=np.float64),
            np.asarray(take([p.effects[k].per_item_correct for p in parts]), dtype=bool),
            clean_ok))
    return KnockoutResult(ids=take([p.ids for p in parts]),
                          clean_logprob=take([p.clean_logprob for p in parts]),
                          clean_correct=clean_ok.tolist(), effects=effects,
                          rows=take([p.rows for p in parts]))


_SCAN_ITEMS = ("rows", "per_item_delta_logprob", "per_item_correct", "per_item_clean_correct",
               "tokens")


def merge_scans(parts: Sequence[Sequence[ScanResult]]) -> list[ScanResult]:
    """One scan per window from the scans of disjoint shares of the prompts (any order): per
    offset the prompts' values in prompt order, the means over all of them (so weighted by each
    share's count), ``most`` and ``most_token`` recomputed from the merged means.

    Raises:
        ValueError: No part, or parts over different windows or offsets, or sharing a prompt.
    """
    if not parts:
        raise ValueError("no scan to merge")
    shape = [(s.window, s.offsets) for s in parts[0]]
    if any([(s.window, s.offsets) for s in p] != shape for p in parts):
        raise ValueError("the scans to merge cover different windows or offsets")
    out = []
    for w, (window, offsets) in enumerate(shape):
        pieces = [p[w] for p in parts]
        merged: dict[str, list[list[Any]]] = {name: [] for name in _SCAN_ITEMS}
        for j in range(len(offsets)):
            order = _prompt_order([r for s in pieces for r in s.rows[j]])
            for name, values in merged.items():
                flat = [v for s in pieces for v in getattr(s, name)[j]]
                values.append([flat[i] for i in order])
        out.append(_scan_result(window, offsets, merged["rows"],
                                merged["per_item_delta_logprob"], merged["per_item_correct"],
                                merged["per_item_clean_correct"], merged["tokens"]))
    return out


# --------------------------------------------------------------------------------------------
# the two modes
# --------------------------------------------------------------------------------------------


def _whole_model(model: Any, windows: Sequence[Window]) -> Sequence[Window]:
    from replandscape.sites import resolve_sites

    return windows or [(0, resolve_sites(getattr(model, "module", model)).n_blocks)]


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


def run_knockout(model: Any, tokenizer: Any, prompts: Sequence[KnockoutPrompt],
                 position_sets: Sequence[str] = DEFAULT_SETS,
                 windows: Sequence[Window] = (), *, add_bos: bool = True,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 share: range | None = None) -> KnockoutResult:
    """Knock every position set out in every layer window.

    Args:
        model: A causal LM of a supported family (``sdpa`` or ``eager`` attention).
        tokenizer: Its (fast) tokenizer.
        prompts: The prompts with their layouts and answers.
        position_sets: Names as in :func:`resolve_positions`.
        windows: ``(start, stop)`` layer windows; empty means the whole model.
        add_bos: Tokenise with BOS first, as extraction does.
        batch_size: Prompts per forward pass.
        share: The block of prompts (indices) this call scores, as :func:`shares` gives a rank
            (None: all); every prompt is still checked, so all ranks fail alike on bad input.
            :func:`merge_knockout` joins the shares' results.

    Raises:
        UserError: A position set names no token in some prompt, a window lies outside the
            model, an unknown position set, or an unsupported attention implementation.
    """
    windows = _whole_model(model, windows)
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
    rows = _rows(share, len(prompts))
    batches = _batches(rows, batch_size)
    clean_lp, clean_ok = _scores(model, encoded, pad, batches)
    effects = []
    for spec in position_sets:
        for window in checked:
            lp, ok = _scores(model, encoded, pad, batches, positions[spec], range(*window))
            effects.append(_effect(spec, window, [len(positions[spec][i]) for i in rows],
                                   lp - clean_lp, ok, clean_ok))
    return KnockoutResult(ids=[prompts[i].id for i in rows], clean_logprob=clean_lp.tolist(),
                          clean_correct=clean_ok.tolist(), effects=effects, rows=list(rows))


def scan_knockout(model: Any, tokenizer: Any, prompts: Sequence[KnockoutPrompt],
                  last_n: int = DEFAULT_SCAN_LAST, windows: Sequence[Window] = (), *,
                  add_bos: bool = True, batch_size: int = DEFAULT_BATCH_SIZE,
                  share: range | None = None,
                  clean: KnockoutResult | None = None) -> list[ScanResult]:
    """Knock out one position at a time, offsets 1..``last_n`` before the last token, in each
    window; one :class:`ScanResult` per window.

    The prompts are batched as :func:`run_knockout` batches them, each batch less the prompts too
    short for the offset. ``share`` is as in :func:`run_knockout` (the offsets follow the longest
    of all prompts, so every share's scan has the same ones; :func:`merge_scans` joins them);
    ``clean``, a :func:`run_knockout` result over the same share and batches, gives the clean
    scores instead of computing them again.
    """
    windows = _whole_model(model, windows)
    encoded, checked, pad = _prepare(model, tokenizer, prompts, windows, add_bos)
    lengths = [len(e.ids) for e in encoded]
    offsets = scan_offsets(last_n, lengths)
    rows = _rows(share, len(prompts))
    batches = _batches(rows, batch_size)
    if clean is None:
        clean_lp, clean_ok = _scores(model, encoded, pad, batches)
    elif clean.rows != list(rows):
        raise ValueError("the clean scores given are of other prompts than the scan's")
    else:
        clean_lp = np.asarray(clean.clean_logprob, dtype=np.float64)
        clean_ok = np.asarray(clean.clean_correct, dtype=bool)
    place = {r: k for k, r in enumerate(rows)}
    results = []
    for window in checked:
        has_rows, deltas, oks, cleans, tokens = [], [], [], [], []
        for j in offsets:
            scan = _scan_batches(lengths, batches, j)
            has = [i for b in scan for i in b]
            knocked = [[n - 1 - j] for n in lengths]
            lp, ok = _scores(model, encoded, pad, scan, knocked, range(*window))
            at = [place[i] for i in has]
            has_rows.append(has)
            deltas.append((lp - clean_lp[at]).tolist())
            oks.append(ok.tolist())
            cleans.append(clean_ok[at].tolist())
            tokens.append([tokenizer.decode([encoded[i].ids[lengths[i] - 1 - j]]) for i in has])
        results.append(_scan_result(window, offsets, has_rows, deltas, oks, cleans, tokens))
    return results


def layout_prompt(text: str) -> PromptLayout:
    """A layout with no parts but the query: for ``chars:`` sets and scans over bare text."""
    return PromptLayout(text=text, header=(0, 0), shots=(), query=(0, len(text)))
