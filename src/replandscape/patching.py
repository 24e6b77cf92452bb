"""Activation patching and attribution patching on a loaded causal LM (docs/method.md §3.3 sites).

A *pair* is a clean prompt and a corrupted prompt of the same token length with different
answers. The metric is the logit difference ``LD = logit[clean answer] - logit[corrupted answer]``
at the last position (first token of each answer). Patching a component takes its activation from
the *source* run into the *base* run; by default (``direction="noise"``) the base is the clean
prompt and the source the corrupted one, with ``direction="denoise"`` the other way round. The
effect of a component is::

    (LD_patched - LD_base) / (LD_source - LD_base)     # 0: no change, 1: the source's LD

Components, all read and written through :mod:`replandscape.sites` so every supported family is
patched at the same places as extraction reads them:

- ``heads``: head ``h`` of block ``l`` is the slice ``[h * head_dim, (h + 1) * head_dim)`` of the
  input of the attention output projection (site ``attn_heads``), shape ``[N, L, H]``;
- ``mlp``: the MLP's output of block ``l`` (site ``mlp_out``), ``[N, L]``;
- ``resid``: the residual stream entering block ``l`` (site ``residual``) and, at index ``L``, the
  stream leaving the last block (site ``block_output`` of block ``L - 1``, the final norm's input),
  ``[N, L + 1]``.

Three ways to compute the effects:

- ``activation_patching(method="full")``: the reference. One forward of the base prompt per
  component with the component's activation replaced (at the last position, or at every position
  with ``positions="all"``) by the source run's, recorded with hooks in one source forward.
- ``activation_patching(method="last_token")`` (default): exact and far cheaper. Attention is
  causal, so a patch at the last position changes nothing at earlier positions: their keys and
  values are the base run's. The base prompt minus its last token is run once with
  ``use_cache=True``; then the components go through as batches of single-token queries (rows =
  components x pairs; all components of a block in one batch, never split), each calling the
  model's root module with ``input_ids`` = the last token, ``past_key_values`` = the base prefix
  cache and hooks at the blocks' sites that write each row's patched activation. The blocks below
  the patched one recompute the last token's clean values (one token, no patch: the base run's
  values up to rounding). Calling the root rather than running blocks by hand keeps each family's
  own positions (rotary, learned), masks (GPT-Neo's local attention, sliding windows) and cache
  layer types, and keeps DeepSpeed ZeRO-3's root-module hooks in their order. The blocks below
  the lowest block a batch patches are not recomputed: their forward is replaced, for that call,
  by one returning the base query's clean output of the block under it (recorded once per pair
  group), so with one block per batch a query runs ``(L + 1) / 2`` blocks on average. How the
  queries read the prefix (:class:`_PrefixCaches`):
  *shared* (Llama, Mistral, Qwen2, GPT-NeoX with plain cache layers): the model's attention is
  switched, for the query calls only, to :func:`_shared_prefix_attention`, registered with
  transformers' ``AttentionInterface``, which reads each pair's prefix keys and values once per
  layer for all its queries (one matrix product per key/value head) and adds each row's own new
  key; consecutive blocks are packed into batches by :func:`pack_blocks` (the cheapest split
  between reading the weights fewer times and skipping more lower blocks). *buffer*
  (GPT-Neo, whose attention is its own code): the prefix is tiled once into a per-layer buffer
  whose last slot each query writes; one block per batch. *expand* (sliding-window cache layers):
  the prefix cache expanded over the rows (views) and the layer's own ``update``; one block per
  batch.
- ``attribution_patching``: the first-order approximation, ``(a_source - a_base) . dLD/da`` at the
  base run, summed over the component's dimensions: a source forward, a base forward and one
  backward per pair, the same shapes.

Results keep the raw patched logit differences (:class:`PatchingResult`); effects are normalised
on request, so a pair whose two runs agree (denominator 0) can still be checked.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from replandscape.errors import UserError
from replandscape.sites import ModelSites, hook_site, resolve_sites

Method = Literal["last_token", "full"]
Direction = Literal["noise", "denoise"]
Positions = Literal["last", "all"]
COMPONENTS = ("heads", "mlp", "resid")


@dataclass(frozen=True)
class PromptPair:
    """A clean prompt and its corrupted twin (equal token length) with their answers' first tokens."""

    clean_ids: Sequence[int]
    corrupted_ids: Sequence[int]
    clean_answer: int
    corrupted_answer: int


@dataclass
class PatchingResult:
    """Logit differences of every patched run, per pair, and the effects they give.

    ``heads_ld[n, l, h]`` is the LD of pair ``n``'s base run with head ``h`` of block ``l``
    patched (attribution patching: the base LD plus the first-order change); ``ld_base`` and
    ``ld_source`` are the unpatched runs' LDs. A component family that was not asked for is an
    empty array.
    """

    heads_ld: np.ndarray  # [N, L, H]
    mlp_ld: np.ndarray  # [N, L]
    resid_ld: np.ndarray  # [N, L + 1]
    ld_base: np.ndarray  # [N]
    ld_source: np.ndarray  # [N]
    method: str
    direction: str
    positions: str = "last"
    extra: dict[str, Any] = field(default_factory=dict)

    def _norm(self, ld: np.ndarray) -> np.ndarray:
        shape = (-1,) + (1,) * (ld.ndim - 1)
        base = self.ld_base.reshape(shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (ld - base) / (self.ld_source.reshape(shape) - base)

    @property
    def heads(self) -> np.ndarray:
        """Effects of the heads [N, L, H]: 0 no change, 1 the source run's LD."""
        return self._norm(self.heads_ld)

    @property
    def mlp(self) -> np.ndarray:
        """Effects of the MLP outputs [N, L]."""
        return self._norm(self.mlp_ld)

    @property
    def resid(self) -> np.ndarray:
        """Effects of the residual stream entering each block and leaving the last [N, L + 1]."""
        return self._norm(self.resid_ld)


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------


def _check(pairs: Sequence[PromptPair], components: Sequence[str]) -> None:
    if not pairs:
        raise UserError("no prompt pairs to patch", key="pairs",
                        fix="give at least one clean/corrupted pair")
    for n, pair in enumerate(pairs):
        if len(pair.clean_ids) != len(pair.corrupted_ids):
            raise UserError(f"pair {n}: the clean prompt has {len(pair.clean_ids)} tokens and the "
                            f"corrupted one {len(pair.corrupted_ids)}", key="pairs",
                            fix="drop pairs whose prompts tokenise to different lengths")
        if len(pair.clean_ids) < 2:
            raise UserError(f"pair {n}: a prompt of {len(pair.clean_ids)} token(s)", key="pairs",
                            fix="patching needs prompts of at least two tokens")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown or not components:
        raise UserError(f"unknown patching components {unknown or '[]'}", key="components",
                        fix=f"use some of {', '.join(COMPONENTS)}")


def length_groups(lengths: Sequence[int], pair_batch: int) -> list[list[int]]:
    """Pair indices grouped by token length (no padding inside a group), ``pair_batch`` at most,
    in a fixed order (lengths by first appearance): the units the patch stage hands out."""
    by_len: dict[int, list[int]] = {}
    for n, length in enumerate(lengths):
        by_len.setdefault(int(length), []).append(n)
    out: list[list[int]] = []
    for idx in by_len.values():
        out.extend(idx[i:i + max(1, pair_batch)] for i in range(0, len(idx), max(1, pair_batch)))
    return out


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _ids(pairs: Sequence[PromptPair], group: Sequence[int], which: str,
         device: torch.device) -> torch.Tensor:
    rows = [list(getattr(pairs[n], which)) for n in group]
    return torch.as_tensor(rows, dtype=torch.long, device=device)


def _answers(pairs: Sequence[PromptPair], group: Sequence[int],
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    good = torch.as_tensor([pairs[n].clean_answer for n in group], device=device)
    bad = torch.as_tensor([pairs[n].corrupted_answer for n in group], device=device)
    return good, bad


def _logit_diff(logits: torch.Tensor, good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """LD per row of last-position logits [R, V]; ``good``/``bad`` are tiled over the rows."""
    reps = logits.shape[0] // good.shape[0]
    g, b = good.repeat(reps), bad.repeat(reps)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return (logits[rows, g].float() - logits[rows, b].float())


def _keeps_logits(model: Any) -> bool:
    """Whether the model's ``forward`` takes ``logits_to_keep`` (through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _forward(model: Any, input_ids: torch.Tensor, *, start: int = 0, past: Any = None,
             use_cache: bool = False) -> Any:
    """The root module on unpadded rows with explicit positions ``start, start + 1, ...``.

    Rows are never padded (a group's prompts have one length), so no attention mask is passed:
    the family's causal (and local-window) masking alone applies, and the attention kernels can
    take their causal fast path. Only the last position's logits are computed where the model
    allows it (``logits_to_keep=1``).
    """
    rows, width = input_ids.shape
    positions = torch.arange(start, start + width, device=input_ids.device).expand(rows, width)
    kwargs: dict[str, Any] = {}
    if _keeps_logits(model):
        kwargs["logits_to_keep"] = 1
    return model(input_ids=input_ids, position_ids=positions, past_key_values=past,
                 use_cache=use_cache, **kwargs)


def _site_list(sites: ModelSites, components: Sequence[str]) -> list[tuple[str, int]]:
    """(site kind, block) of every site the components read; residual L is block_output L-1."""
    out: list[tuple[str, int]] = []
    for i in range(sites.n_blocks):
        if "heads" in components:
            out.append(("attn_heads", i))
        if "mlp" in components:
            out.append(("mlp_out", i))
        if "resid" in components:
            out.append(("residual", i))
    if "resid" in components:
        out.append(("block_output", sites.n_blocks - 1))
    return out


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _record(model: Any, sites: ModelSites, input_ids: torch.Tensor,
            site_list: Sequence[tuple[str, int]], last_only: bool) -> tuple[dict[tuple[str, int],
                                                                                 torch.Tensor],
                                                                            torch.Tensor]:
    """One forward: every site's activation (last position [P, D] or all [P, T, D]) and the
    last-position logits."""
    store: dict[tuple[str, int], torch.Tensor] = {}

    def keeper(key: tuple[str, int]) -> Any:
        def fn(x: torch.Tensor) -> None:
            store[key] = (x[:, -1] if last_only else x).detach().clone()

        return fn

    with _hooks([hook_site(sites, kind, i, keeper((kind, i))) for kind, i in site_list]):
        out = _forward(model, input_ids)
    return store, out.logits[:, -1]


def _empty(n: int, sites: ModelSites, components: Sequence[str]) -> dict[str, np.ndarray]:
    L, H = sites.n_blocks, sites.block_sites[0].n_heads
    return {"heads": np.full((n, L, H) if "heads" in components else (n, 0, 0), np.nan),
            "mlp": np.full((n, L) if "mlp" in components else (n, 0), np.nan),
            "resid": np.full((n, L + 1) if "resid" in components else (n, 0), np.nan)}


def _base_source(direction: str) -> tuple[str, str]:
    if direction == "noise":
        return "clean_ids", "corrupted_ids"
    if direction == "denoise":
        return "corrupted_ids", "clean_ids"
    raise UserError(f"unknown patching direction '{direction}'", key="direction",
                    fix="use noise (corrupted into clean) or denoise (clean into corrupted)")


# --------------------------------------------------------------------------------------------
# activation patching
# --------------------------------------------------------------------------------------------


def activation_patching(model: Any, pairs: Sequence[PromptPair], *, method: Method = "last_token",
                        direction: Direction = "noise", positions: Positions = "last",
                        components: Sequence[str] = COMPONENTS, pair_batch: int = 1,
                        layers: Sequence[int] | None = None,
                        max_queries: int = 256,
                        query_width: int | None = None) -> PatchingResult:
    """Exact activation patching of every head, MLP output and residual stream, per pair.

    Args:
        model: A loaded causal LM of a supported family (the root module, eval mode).
        pairs: Clean/corrupted prompts of equal length per pair, with the answers' first tokens.
        method: ``"last_token"`` (default): the last token recomputed over the base run's cached
            keys and values, one batch per block; ``"full"``: one full forward per component.
        direction: ``"noise"`` (default): corrupted activations into the clean run;
            ``"denoise"``: clean activations into the corrupted run.
        positions: ``"last"`` (default): patch the last position; ``"all"``: patch the component
            at every position at once (``method="full"`` only).
        components: Which of ``heads``, ``mlp``, ``resid`` to patch (default all).
        pair_batch: Pairs of equal length run together (rows = components x pairs). Default 1.
        layers: The blocks whose components are patched (default all); the others' entries
            stay NaN. Residual ``L`` (leaving the last block) belongs to block ``L - 1``.
        max_queries: ``last_token`` with the shared-prefix attention (Llama, Mistral, Qwen2,
            GPT-NeoX): the most rows a batch of single-token queries holds (memory; a block
            never splits; default 256). Consecutive blocks are packed into batches by
            :func:`pack_blocks`: fewer, larger batches read the weights fewer times, smaller
            ones skip more lower blocks. Other models run one block per batch.
        query_width: the rows a block needs to use its weights fully, for the packing (default
            256 on a CUDA device, 32 on the CPU).

    Returns:
        The patched logit differences and the unpatched ones; ``.heads``, ``.mlp``, ``.resid``
        give the normalised effects.

    Raises:
        UserError: no pairs, a pair of unequal lengths, an unknown component, direction or
            method, or ``positions="all"`` with the last-token method.
    """
    _check(pairs, components)
    base_key, source_key = _base_source(direction)
    if method not in ("last_token", "full"):
        raise UserError(f"unknown patching method '{method}'", key="method",
                        fix="use last_token (exact, cached) or full (one forward per component)")
    if positions not in ("last", "all"):
        raise UserError(f"unknown patching positions '{positions}'", key="positions",
                        fix="use last or all")
    if positions == "all" and method != "full":
        raise UserError("patching every position needs the full recompute", key="positions",
                        fix="use method=full with positions=all")
    sites = resolve_sites(model)
    blocks = list(range(sites.n_blocks)) if layers is None else sorted(set(layers))
    if not blocks or not all(0 <= i < sites.n_blocks for i in blocks):
        raise UserError(f"patching layers {list(layers or [])} outside a model of "
                        f"{sites.n_blocks} blocks", key="layers",
                        fix=f"use block indices 0..{sites.n_blocks - 1}")
    device = _device(model)
    out = _empty(len(pairs), sites, components)
    ld_base = np.full(len(pairs), np.nan)
    ld_source = np.full(len(pairs), np.nan)
    run = _last_token_group if method == "last_token" else _full_group
    with torch.inference_mode():
        for group in length_groups([len(p.clean_ids) for p in pairs], pair_batch):
            base_ids = _ids(pairs, group, base_key, device)
            source_ids = _ids(pairs, group, source_key, device)
            good, bad = _answers(pairs, group, device)
            src, src_logits = _record(model, sites, source_ids, _site_list(sites, components),
                                      last_only=positions == "last")
            ld_source[group] = _logit_diff(src_logits, good, bad).cpu().double().numpy()
            base_ld, lds = run(model, sites, base_ids, src, good, bad, components, positions,
                               blocks, max_queries, query_width)
            ld_base[group] = base_ld.cpu().double().numpy()
            for name, values in lds.items():
                out[name][group] = values.cpu().double().numpy()
    return PatchingResult(heads_ld=out["heads"], mlp_ld=out["mlp"], resid_ld=out["resid"],
                          ld_base=ld_base, ld_source=ld_source, method=method,
                          direction=direction, positions=positions)


def _layer_rows(sites: ModelSites, layer: int,
                components: Sequence[str]) -> list[tuple[str, int, int | None]]:
    """The components patched in one block's batch: (site kind, block, head or None)."""
    rows: list[tuple[str, int, int | None]] = []
    if "heads" in components:
        rows.extend(("attn_heads", layer, h) for h in range(sites.block_sites[layer].n_heads))
    if "mlp" in components:
        rows.append(("mlp_out", layer, None))
    if "resid" in components:
        rows.append(("residual", layer, None))
        if layer == sites.n_blocks - 1:
            rows.append(("block_output", layer, None))
    return rows


def _patch_hooks(sites: ModelSites, rows: Sequence[tuple[str, int, int | None]],
                 src: dict[tuple[str, int], torch.Tensor], n_pairs: int,
                 all_positions: bool) -> list[Any]:
    """Hooks that write, in row block ``r`` (rows ``r * n_pairs ... + n_pairs``), component
    ``rows[r]``'s source activation at the last position (or every position)."""
    by_site: dict[tuple[str, int], list[tuple[int, int | None]]] = {}
    for r, (kind, layer, head) in enumerate(rows):
        by_site.setdefault((kind, layer), []).append((r, head))
    handles = []
    for (kind, layer), entries in by_site.items():
        value = src[(kind, layer)]  # [P, D] or [P, T, D]
        width = value.shape[-1]
        hd = sites.block_sites[layer].head_dim
        mask = torch.zeros((len(rows) * n_pairs, width), dtype=torch.bool, device=value.device)
        for r, head in entries:
            cols = slice(None) if head is None else slice(head * hd, (head + 1) * hd)
            mask[r * n_pairs:(r + 1) * n_pairs, cols] = True
        # the source of row r * n_pairs + p is pair p's: tile the pairs over the row blocks
        tiled = value.repeat((len(rows),) + (1,) * (value.ndim - 1))

        def fn(x: torch.Tensor, mask: torch.Tensor = mask, tiled: torch.Tensor = tiled) -> Any:
            x = x.clone()
            if all_positions:
                x[:] = torch.where(mask[:, None, :], tiled.to(x.dtype), x)
            else:
                x[:, -1] = torch.where(mask, tiled.to(x.dtype), x[:, -1])
            return x

        handles.append(hook_site(sites, kind, layer, fn))
    return handles


def _split(sites: ModelSites, rows: Sequence[tuple[str, int, int | None]], ld: torch.Tensor,
           n_pairs: int, lds: dict[str, torch.Tensor]) -> None:
    """Scatter one batch's LDs [rows x pairs] into the per-family arrays [P, ...]."""
    per_row = ld.reshape(len(rows), n_pairs)
    for r, (kind, layer, head) in enumerate(rows):
        if kind == "attn_heads":
            lds["heads"][:, layer, head] = per_row[r]
        elif kind == "mlp_out":
            lds["mlp"][:, layer] = per_row[r]
        elif kind == "residual":
            lds["resid"][:, layer] = per_row[r]
        else:  # the stream leaving the last block
            lds["resid"][:, sites.n_blocks] = per_row[r]


def _ld_tensors(sites: ModelSites, n_pairs: int, components: Sequence[str],
                device: torch.device) -> dict[str, torch.Tensor]:
    L, H = sites.n_blocks, sites.block_sites[0].n_heads
    out = {}
    if "heads" in components:
        out["heads"] = torch.full((n_pairs, L, H), float("nan"), device=device)
    if "mlp" in components:
        out["mlp"] = torch.full((n_pairs, L), float("nan"), device=device)
    if "resid" in components:
        out["resid"] = torch.full((n_pairs, L + 1), float("nan"), device=device)
    return out


def _full_group(model: Any, sites: ModelSites, base_ids: torch.Tensor,
                src: dict[tuple[str, int], torch.Tensor], good: torch.Tensor, bad: torch.Tensor,
                components: Sequence[str], positions: str, blocks: Sequence[int],
                max_queries: int,
                query_width: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference: one forward of the base prompts per component."""
    n_pairs = base_ids.shape[0]
    base_ld = _logit_diff(_forward(model, base_ids).logits[:, -1], good, bad)
    lds = _ld_tensors(sites, n_pairs, components, base_ids.device)
    for layer in blocks:
        for row in _layer_rows(sites, layer, components):
            with _hooks(_patch_hooks(sites, [row], src, n_pairs, positions == "all")):
                logits = _forward(model, base_ids).logits[:, -1]
            _split(sites, [row], _logit_diff(logits, good, bad), n_pairs, lds)
    return base_ld, lds


def _expanded_cache(cache: Any, reps: int) -> Any:
    """A shallow copy of a key/value cache whose tensors are the rows tiled ``reps`` times.

    The general path (any cache layer type, e.g. sliding-window layers): with one pair the tiling
    is an ``expand`` (a view: no copy); each layer's ``update`` then concatenates the new token
    onto it in a fresh tensor, leaving ``cache`` untouched.
    """
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        twin = copy.copy(layer)
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if t is not None and t.numel():
                t = (t.expand(reps, *t.shape[1:]) if t.shape[0] == 1
                     else t.repeat(reps, *([1] * (t.ndim - 1))))
            setattr(twin, name, t)
        new.layers.append(twin)
    return new


class _SharedPrefixLayer(DynamicLayer):
    """A cache layer over a buffer ``[rows, kv_heads, T, head_dim]`` whose first ``T - 1``
    positions hold the base run's keys (values) and whose last slot each query writes in place.

    It answers like a :class:`DynamicLayer` holding the ``T - 1`` prefix positions (sequence
    length, mask sizes) and its ``update`` returns the whole buffer with the new token last, as
    ``DynamicLayer`` would after concatenating, but without copying the prefix for every query:
    one buffer serves all the blocks' batches of a pair group.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
        super().__init__()
        self.buffers = (keys, values)
        self.rows = rows
        self.prefix = keys.shape[-2] - 1
        self.dtype, self.device = keys.dtype, keys.device
        self.keys = keys[:rows, :, :self.prefix]
        self.values = values[:rows, :, :self.prefix]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = (b[:self.rows] for b in self.buffers)
        keys[:, :, self.prefix:] = key_states
        values[:, :, self.prefix:] = value_states
        return keys, values


# ----- shared-prefix attention: one read of the prefix keys for all queries of a pair ----------

SHARED_PREFIX_ATTENTION = "replandscape_shared_prefix"
# families whose attention modules call the attention function named by the config (through
# transformers' AttentionInterface); GPT-Neo computes its own attention and takes the buffer path
SHARED_PREFIX_FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox")
# layer index -> (prefix keys [P, kv, S, hd], prefix values, pairs); set only around a query call
_ACTIVE_PREFIX: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
_USED_PREFIX: set[int] = set()


def _shared_prefix_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Any, scaling: float,
                             dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Softmax attention of single-token queries over a prefix shared by row blocks, exactly.

    Row ``c * P + p`` is a query of pair ``p``: its keys are pair ``p``'s prefix (read once for
    all ``c`` as one matrix product per key/value head) followed by the row's own new key
    (``key``/``value``: ``[rows, kv, 1, hd]``, what :class:`_SharedLayer` returns).
    """
    if kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise RuntimeError("shared-prefix attention has no sliding window, soft cap or sinks")
    prefix_k, prefix_v, n_pairs = _ACTIVE_PREFIX[module.layer_idx]
    _USED_PREFIX.add(module.layer_idx)
    rows, n_heads, q_len, dim = query.shape
    if q_len != 1:
        raise RuntimeError("shared-prefix attention takes one query token per row")
    kv, width = prefix_k.shape[1], prefix_k.shape[2]
    rep, blocks = n_heads // kv, rows // n_pairs
    q = query.reshape(blocks, n_pairs, kv, rep, dim)
    # [P, kv, blocks * rep, hd] x [P, kv, hd, S]: the prefix scores of every query of a pair
    qp = q.permute(1, 2, 0, 3, 4).reshape(n_pairs, kv, blocks * rep, dim)
    s_prefix = torch.matmul(qp, prefix_k.transpose(-1, -2).to(query.dtype))
    s_prefix = s_prefix.reshape(n_pairs, kv, blocks, rep, width).permute(2, 0, 1, 3, 4)
    k_new = key.reshape(blocks, n_pairs, kv, 1, dim)
    s_new = (q * k_new).sum(-1, keepdim=True)
    scores = torch.cat([s_prefix, s_new], dim=-1) * scaling
    # softmax in float32, as the eager attention of these families does
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pp = probs[..., :width].permute(1, 2, 0, 3, 4).reshape(n_pairs, kv, blocks * rep, width)
    out = torch.matmul(pp, prefix_v.to(query.dtype))
    out = out.reshape(n_pairs, kv, blocks, rep, dim).permute(2, 0, 1, 3, 4)
    out = out + probs[..., width:] * value.reshape(blocks, n_pairs, kv, 1, dim)
    return out.reshape(rows, 1, n_heads, dim), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Unpadded single-token queries see every cached position: no mask to build."""
    return None


def _register_shared_prefix() -> None:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, _no_mask)


class _SharedLayer(DynamicLayer):
    """A cache layer that answers like a :class:`DynamicLayer` holding the prefix (length, mask
    sizes) and whose ``update`` returns only the new token's keys and values: the prefix is read
    by :func:`_shared_prefix_attention`, never copied per query."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states


class _PrefixCaches:
    """Caches of one pair group's prefix for batches of up to ``max_blocks`` row blocks.

    Row ``c * P + p`` is a query of pair ``p``. Three ways, the first that applies:

    - *shared*: the family's attention goes through transformers' attention interface and
      every cache layer is a plain :class:`DynamicLayer`: the queries run with
      :func:`_shared_prefix_attention`, which reads each pair's prefix once per layer;
    - *buffer*: plain :class:`DynamicLayer` s otherwise (GPT-Neo): the prefix is tiled once
      into per-layer buffers whose last slot each query writes (:class:`_SharedPrefixLayer`);
    - *expand*: any other cache layer (sliding windows): :func:`_expanded_cache` per query, so
      the layer's own ``update`` crops or masks as it does.
    """

    def __init__(self, model: Any, sites: ModelSites, cache: Any, n_pairs: int) -> None:
        self.model, self.cache, self.n_pairs = model, cache, n_pairs
        layers = getattr(cache, "layers", None) or []
        plain = bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized
                                     for layer in layers)
        self.mode = "expand"
        if plain:
            self.mode = "shared" if sites.family in SHARED_PREFIX_FAMILIES else "buffer"
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def prepare(self, max_blocks: int) -> None:
        """Buffer mode: tile the prefix once for batches of up to ``max_blocks`` row blocks."""
        if self.mode != "buffer":
            return
        self.buffers = []
        for layer in self.cache.layers:
            pair = []
            for t in (layer.keys, layer.values):
                p, heads, width, dim = t.shape
                buf = t.new_empty((max_blocks * p, heads, width + 1, dim))
                buf.view(max_blocks, p, heads, width + 1, dim)[:, :, :, :width] = t[None]
                pair.append(buf)
            self.buffers.append((pair[0], pair[1]))

    def get(self, blocks: int) -> Any:
        """A cache for ``blocks`` row blocks (``blocks * n_pairs`` single-token queries)."""
        new = copy.copy(self.cache)
        if self.mode == "expand":
            return _expanded_cache(self.cache, blocks)
        if self.mode == "shared":
            new.layers = [_SharedLayer(layer.keys, layer.values) for layer in self.cache.layers]
        else:
            new.layers = [_SharedPrefixLayer(k, v, blocks * self.n_pairs)
                          for k, v in self.buffers]
        return new

    @contextlib.contextmanager
    def queries(self, first: int = 0) -> Iterator[None]:
        """Around a query call: in shared mode, the model's attention switched to
        :func:`_shared_prefix_attention` (restored after), and a check that every layer from
        ``first`` on (the blocks below are replayed, :func:`_replayed_below`) used it."""
        if self.mode != "shared":
            yield
            return
        _register_shared_prefix()
        config = self.model.config
        before = config._attn_implementation
        _ACTIVE_PREFIX.clear()
        _USED_PREFIX.clear()
        for i, layer in enumerate(self.cache.layers):
            _ACTIVE_PREFIX[i] = (layer.keys, layer.values, self.n_pairs)
        config._attn_implementation = SHARED_PREFIX_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = before
            used = set(_USED_PREFIX)
            _ACTIVE_PREFIX.clear()
            _USED_PREFIX.clear()
        if used != set(range(first, len(self.cache.layers))):
            raise RuntimeError(f"shared-prefix attention ran in layers {sorted(used)} only: this "
                               f"'{getattr(config, 'model_type', '?')}' model's attention does "
                               f"not call transformers' attention interface")


class _BlockOutputs:
    """The base query's output of every block (the last token, clean), recorded by forward
    hooks, in the form the block returns it: a tensor, or a tuple led by it (the other items,
    in the supported families, are attention weights, which the decoder reads only when asked
    to output attentions, as patching never does; a replay gives None for them).
    ``replayable`` is False when a block returns anything else."""

    def __init__(self, sites: ModelSites) -> None:
        self.sites = sites
        self.values: list[torch.Tensor | None] = [None] * sites.n_blocks
        self.tuple_len = 0  # 0: blocks return a tensor
        self.replayable = True

    def hooks(self) -> list[Any]:
        def keeper(i: int) -> Any:
            def fn(_module: Any, _args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor):
                    self.values[i] = out.detach()
                elif isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
                    self.values[i], self.tuple_len = out[0].detach(), len(out)
                else:
                    self.replayable = False

            return fn

        return [block.register_forward_hook(keeper(i))
                for i, block in enumerate(self.sites.blocks)]


@contextlib.contextmanager
def _replayed_below(outputs: _BlockOutputs, first: int, reps: int) -> Iterator[None]:
    """While open, the blocks below ``first`` do not compute: each returns the base query's
    output of block ``first - 1`` tiled over ``reps`` row blocks, the clean stream entering
    ``first`` (blocks below ``first - 1`` return it too: only the block above reads it).

    A patch at block ``l`` changes nothing below ``l``, so the queries of a batch whose lowest
    patched block is ``first`` would recompute the base query's values there; replaying them
    skips that work. The block modules are still called (their forward replaced on the
    instance), so hooks on them, DeepSpeed ZeRO-3's among them, run as before.
    """
    if first == 0:
        yield
        return
    value = outputs.values[first - 1]
    assert value is not None
    tiled = value.repeat((reps,) + (1,) * (value.ndim - 1))
    result: Any = tiled if not outputs.tuple_len else (tiled,) + (None,) * (outputs.tuple_len - 1)
    blocks = outputs.sites.blocks[:first]
    saved = [block.__dict__.get("forward") for block in blocks]

    def replay(*_args: Any, **_kwargs: Any) -> Any:
        return result

    for block in blocks:
        block.forward = replay
    try:
        yield
    finally:
        for block, old in zip(blocks, saved):
            if old is None:
                del block.forward
            else:
                block.forward = old


def pack_blocks(firsts: Sequence[int], rows: Sequence[int], n_blocks: int, *, cap: int,
                width: int, replay: bool = True) -> list[list[int]]:
    """Consecutive patched blocks grouped into query batches, cheapest first.

    A batch whose lowest patched block is ``a`` runs blocks ``a .. n_blocks - 1`` (all of them
    without ``replay``) for its rows, and a block over fewer than ``width`` rows costs as much
    as over ``width`` (below that the weights, read once per batch, bound it). So a batch costs
    ``(n_blocks - a) x max(rows, width)``: packing blocks saves weight reads, splitting them
    saves the lower blocks; the partition of least total cost is found exactly (a dynamic
    programme over the ``len(firsts)`` blocks). A batch holds at most ``cap`` rows unless one
    block alone has more (a block never splits).

    Args:
        firsts: Each patched block's index, increasing.
        rows: Each one's query rows (components x pairs).
        n_blocks: The model's blocks.
        cap: Rows a batch may hold (memory).
        width: Rows a block needs to use its weights fully.
        replay: Whether the blocks below a batch's lowest are replayed, not run.

    Returns:
        Lists of indices into ``firsts``, in order.
    """
    k = len(firsts)
    best = [0.0] + [math.inf] * k
    start = [0] * (k + 1)
    for j in range(1, k + 1):
        total = 0
        for i in range(j - 1, -1, -1):  # the last batch holds blocks i .. j - 1
            total += rows[i]
            if total > cap and i < j - 1:
                break
            depth = n_blocks - firsts[i] if replay else n_blocks
            cost = best[i] + depth * max(total, width)
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups: list[list[int]] = []
    j = k
    while j > 0:
        groups.append(list(range(start[j], j)))
        j = start[j]
    return groups[::-1]


def _last_token_group(model: Any, sites: ModelSites, base_ids: torch.Tensor,
                      src: dict[tuple[str, int], torch.Tensor], good: torch.Tensor,
                      bad: torch.Tensor, components: Sequence[str], positions: str,
                      blocks: Sequence[int], max_queries: int,
                      query_width: int | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Exact last-position patching: the prefix once with the cache, then the blocks' components
    as batches of single-token queries (one block per batch at least)."""
    n_pairs, width = base_ids.shape
    prefix = _forward(model, base_ids[:, :-1], use_cache=True)
    caches = _PrefixCaches(model, sites, prefix.past_key_values, n_pairs)
    outputs = _BlockOutputs(sites)
    outputs.replayable = not getattr(model.config, "output_attentions", False)
    # row blocks (components) per batch: in shared mode a query costs no copy of the prefix, so
    # blocks are packed; the buffer and expand modes hold a prefix per query: one block a batch
    per_block = [rows for rows in (_layer_rows(sites, layer, components) for layer in blocks)
                 if rows]
    if caches.mode == "shared":
        full = query_width if query_width is not None else \
            (256 if base_ids.device.type == "cuda" else 32)
        groups = pack_blocks([rows[0][1] for rows in per_block],
                             [len(rows) * n_pairs for rows in per_block], sites.n_blocks,
                             cap=max_queries, width=full, replay=outputs.replayable)
    else:
        groups = [[i] for i in range(len(per_block))]
    per_batch = [[row for i in group for row in per_block[i]] for group in groups]
    caches.prepare(max([1, *(len(rows) for rows in per_batch)]))
    last = base_ids[:, -1:]
    with caches.queries(), _hooks(outputs.hooks()):
        step = _forward(model, last, start=width - 1, past=caches.get(1))
    base_ld = _logit_diff(step.logits[:, -1], good, bad)
    lds = _ld_tensors(sites, n_pairs, components, base_ids.device)
    for rows in per_batch:
        # the blocks below the lowest one patched give the base query's values: replayed
        first = min(layer for _, layer, _ in rows) if outputs.replayable else 0
        with caches.queries(first), _replayed_below(outputs, first, len(rows)), \
                _hooks(_patch_hooks(sites, rows, src, n_pairs, all_positions=False)):
            out = _forward(model, last.repeat(len(rows), 1), start=width - 1,
                           past=caches.get(len(rows)))
        _split(sites, rows, _logit_diff(out.logits[:, -1], good, bad), n_pairs, lds)
    return base_ld, lds


# --------------------------------------------------------------------------------------------
# attribution patching
# --------------------------------------------------------------------------------------------


def attribution_patching(model: Any, pairs: Sequence[PromptPair], *,
                         direction: Direction = "noise",
                         components: Sequence[str] = COMPONENTS) -> PatchingResult:
    """First-order patching: ``(a_source - a_base) . dLD/da`` at the base run, per component.

    Per pair: the source forward (activations at the last position, no gradient), the base
    forward with the activations kept in the graph, and one backward of the base LD. The
    result's ``*_ld`` arrays hold ``LD_base`` plus the first-order change, so the effects
    normalise as exact patching's do.

    Args:
        model: A loaded causal LM of a supported family.
        pairs: Clean/corrupted prompts of equal length per pair.
        direction: ``"noise"`` (default) or ``"denoise"``, as in :func:`activation_patching`.
        components: Which of ``heads``, ``mlp``, ``resid`` (default all).
    """
    _check(pairs, components)
    base_key, source_key = _base_source(direction)
    sites = resolve_sites(model)
    device = _device(model)
    site_list = _site_list(sites, components)
    out = _empty(len(pairs), sites, components)
    ld_base = np.full(len(pairs), np.nan)
    ld_source = np.full(len(pairs), np.nan)
    first = ("residual", 0)
    for n in range(len(pairs)):
        group = [n]
        good, bad = _answers(pairs, group, device)
        with torch.inference_mode():
            src, src_logits = _record(model, sites, _ids(pairs, group, source_key, device),
                                      site_list, last_only=True)
        ld_source[n] = float(_logit_diff(src_logits, good, bad)[0])
        acts: dict[tuple[str, int], torch.Tensor] = {}

        def keeper(key: tuple[str, int],
                   acts: dict[tuple[str, int], torch.Tensor] = acts) -> Any:
            def fn(x: torch.Tensor) -> Any:
                if key == first and not x.requires_grad:
                    # frozen weights: make the stream entering block 0 a leaf that needs a
                    # gradient, so every later site is in the graph
                    x = x.detach().requires_grad_(True)
                    acts[key] = x
                    return x
                acts[key] = x
                return None

            return fn

        keys = list(site_list) if first in site_list else [first, *site_list]
        with torch.enable_grad(), _hooks([hook_site(sites, kind, i, keeper((kind, i)))
                                          for kind, i in keys]):
            logits = _forward(model, _ids(pairs, group, base_key, device)).logits[:, -1]
            ld = _logit_diff(logits, good, bad)[0]
            grads = torch.autograd.grad(ld, [acts[k] for k in site_list], allow_unused=True)
        ld_base[n] = float(ld.detach())
        for (kind, layer), grad in zip(site_list, grads):
            diff = (src[(kind, layer)][0] - acts[(kind, layer)][0, -1].detach()).double()
            g = (torch.zeros_like(diff) if grad is None else grad[0, -1].double())
            contrib = diff * g
            if kind == "attn_heads":
                hd = sites.block_sites[layer].head_dim
                out["heads"][n, layer] = (contrib.reshape(-1, hd).sum(-1).cpu().numpy()
                                          + ld_base[n])
            elif kind == "mlp_out":
                out["mlp"][n, layer] = float(contrib.sum()) + ld_base[n]
            elif kind == "residual":
                out["resid"][n, layer] = float(contrib.sum()) + ld_base[n]
            else:
                out["resid"][n, sites.n_blocks] = float(contrib.sum()) + ld_base[n]
    return PatchingResult(heads_ld=out["heads"], mlp_ld=out["mlp"], resid_ld=out["resid"],
                          ld_base=ld_base, ld_source=ld_source, method="attribution",
                          direction=direction)
