"""Activation and attribution patching: checks with known answers on tiny models of each family.

Models are built from configs with a wider weight initialisation than the default (so logit
differences are of order one and normalised effects are well conditioned), saved, and loaded with
``from_pretrained`` in float32 on the CPU. The families cover the three ways the cached path
serves its queries: Llama and GPT-NeoX through the shared-prefix attention function, GPT-Neo
(its own attention, a local window shorter than the prompts) through the tiled key/value buffer,
and Mistral with a sliding window shorter than the prompts through its own sliding cache layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
)

from replandscape.errors import UserError
from replandscape.patching import PromptPair, activation_patching, attribution_patching
from replandscape.sites import resolve_sites

VOCAB, LAYERS, HEADS, HIDDEN, TOKENS = 96, 3, 4, 32, 12


def _config(family: str) -> Any:
    common: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                  max_position_embeddings=64, initializer_range=0.25,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    if family == "llama":
        return LlamaConfig(**common, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           num_key_value_heads=HEADS // 2)
    if family == "mistral":  # a window shorter than the prompts: sliding cache layers
        return MistralConfig(**common, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             num_key_value_heads=HEADS // 2, sliding_window=5)
    if family == "gpt_neox":
        return GPTNeoXConfig(**common, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             use_parallel_residual=True)
    return GPTNeoConfig(**common, num_layers=LAYERS, num_heads=HEADS, window_size=5,
                        attention_types=[[["global", "local"], 1], [["local"], 1]])


@pytest.fixture(scope="module", params=["llama", "gpt_neox", "gpt_neo", "mistral"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(request.param)).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _pairs(model: Any, n: int = 4, seed: int = 0) -> list[PromptPair]:
    """Random prompts; even pairs differ in the last token, odd ones in a middle token. The
    answers are the tokens the corruption raises and lowers most, so the clean-minus-corrupted
    logit difference is large and the normalised effects are well conditioned."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        clean = torch.randint(0, VOCAB, (TOKENS,), generator=g)
        corrupted = clean.clone()
        at = TOKENS - 1 if i % 2 == 0 else TOKENS // 2
        corrupted[at] = (clean[at] + 1 + int(torch.randint(0, VOCAB - 1, (1,), generator=g))) % VOCAB
        with torch.no_grad():
            logits = model(torch.stack([clean, corrupted])).logits[:, -1]
        good, bad = int((logits[0] - logits[1]).argmax()), int((logits[1] - logits[0]).argmax())
        pairs.append(PromptPair(clean.tolist(), corrupted.tolist(), good, bad))
    return pairs


def _assert_close(a: np.ndarray, b: np.ndarray, atol: float = 1e-5, rtol: float = 0.0) -> None:
    assert a.shape == b.shape
    assert np.isfinite(a).all() and np.isfinite(b).all()
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def test_cached_path_mode(model: Any) -> None:
    from replandscape.patching import _PrefixCaches

    sites = resolve_sites(model)
    with torch.inference_mode():
        cache = model(torch.arange(2, 2 + TOKENS)[None], use_cache=True).past_key_values
    mode = _PrefixCaches(model, sites, cache, 1).mode
    assert mode == {"llama": "shared", "gpt_neox": "shared", "gpt_neo": "buffer",
                    "mistral": "expand"}[sites.model_type]
    assert model.config._attn_implementation != "replandscape_shared_prefix"


def test_shapes_and_fast_equals_full(model: Any) -> None:
    pairs = _pairs(model)
    fast = activation_patching(model, pairs)
    full = activation_patching(model, pairs, method="full")
    n = len(pairs)
    assert fast.heads.shape == (n, LAYERS, HEADS)
    assert fast.mlp.shape == (n, LAYERS) and fast.resid.shape == (n, LAYERS + 1)
    # the pairs are well conditioned: the normalised effects are not dominated by rounding
    assert np.abs(fast.ld_source - fast.ld_base).min() > 0.5
    _assert_close(fast.ld_base, full.ld_base)
    _assert_close(fast.ld_source, full.ld_source)
    for name in ("heads", "mlp", "resid"):
        _assert_close(getattr(fast, name), getattr(full, name))
    # something was patched: not every effect is 0
    assert np.abs(full.heads).max() > 1e-3 and np.abs(full.mlp).max() > 1e-3
    # several pairs of one length in one batch, one block per batch (max_queries 1), two blocks
    # and one (pair_batch 3 on the CPU packs blocks 0-1, then 2) or all blocks in one: the same
    # numbers as one pair at a time
    for kwargs in ({"pair_batch": 3}, {"max_queries": 1},
                   {"pair_batch": 4, "max_queries": 1000, "query_width": 1000}):
        batched = activation_patching(model, pairs, **kwargs)  # type: ignore[arg-type]
        for name in ("heads", "mlp", "resid"):
            _assert_close(getattr(batched, name), getattr(fast, name))
    assert model.config._attn_implementation != "replandscape_shared_prefix"


def test_blocks_are_packed_at_the_least_cost() -> None:
    """A batch over blocks a.. costs (L - a) x max(rows, width): narrow blocks pack, wide ones
    split, the cap holds, and without replay everything packs up to the cap."""
    from replandscape.patching import pack_blocks

    firsts, L = [0, 1, 2], 3
    assert pack_blocks(firsts, [18, 18, 18], L, cap=256, width=32) == [[0, 1], [2]]
    assert pack_blocks(firsts, [300, 300, 300], L, cap=1000, width=32) == [[0], [1], [2]]
    assert pack_blocks(firsts, [10, 10, 10], L, cap=1000, width=1000) == [[0, 1, 2]]
    assert pack_blocks(firsts, [10, 10, 10], L, cap=15, width=1000) == [[0], [1], [2]]
    assert pack_blocks(firsts, [10, 10, 10], L, cap=1000, width=32, replay=False) == [[0, 1, 2]]
    # brute force over every split of 6 blocks: the programme finds the cheapest
    import itertools

    rows, n = [5, 40, 12, 70, 3, 33], 8
    firsts6 = [1, 2, 4, 5, 6, 7]

    def cost(groups: list[list[int]]) -> float:
        return sum((n - firsts6[g[0]]) * max(sum(rows[i] for i in g), 24) for g in groups)

    best = min(cost([list(range(a, b)) for a, b in zip((0, *cuts), (*cuts, 6))])
               for r in range(6) for cuts in itertools.combinations(range(1, 6), r))
    assert cost(pack_blocks(firsts6, rows, n, cap=10**6, width=24)) == best


def test_blocks_below_the_patched_one_are_not_recomputed(model: Any) -> None:
    """One block per batch: block 0's MLP runs in the source forward, the prefix, the base query
    and block 0's own batch only; the higher batches replay its clean output (same effects)."""
    sites = resolve_sites(model)
    calls = [0] * LAYERS
    handles = [sites.block_sites[i].mlp.register_forward_hook(
        lambda *_args, i=i: calls.__setitem__(i, calls[i] + 1)) for i in range(LAYERS)]
    try:
        pairs = _pairs(model, n=2)
        calls[:] = [0] * LAYERS
        one = activation_patching(model, pairs, pair_batch=2, max_queries=1)
    finally:
        for handle in handles:
            handle.remove()
    # source, prefix, base query, then batch b computes blocks b..L-1
    assert calls == [3 + (i + 1) for i in range(LAYERS)]
    full = activation_patching(model, pairs, method="full")
    for name in ("heads", "mlp", "resid"):
        _assert_close(getattr(one, name), getattr(full, name))


def test_own_activations_change_nothing(model: Any) -> None:
    pairs = [PromptPair(p.clean_ids, p.clean_ids, p.clean_answer, p.corrupted_answer)
             for p in _pairs(model, n=2, seed=1)]
    for method in ("last_token", "full"):
        res = activation_patching(model, pairs, method=method)  # type: ignore[arg-type]
        base = res.ld_base[:, None]
        _assert_close(res.heads_ld, np.broadcast_to(base[:, :, None], res.heads_ld.shape))
        _assert_close(res.mlp_ld, np.broadcast_to(base, res.mlp_ld.shape))
        _assert_close(res.resid_ld, np.broadcast_to(base, res.resid_ld.shape))
    attr = attribution_patching(model, pairs)
    assert np.array_equal(attr.heads_ld - attr.ld_base[:, None, None], np.zeros_like(attr.heads_ld))
    assert np.array_equal(attr.mlp_ld - attr.ld_base[:, None], np.zeros_like(attr.mlp_ld))


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_last_residual_is_the_source_run(model: Any, direction: str) -> None:
    pairs = _pairs(model, seed=2)
    for method in ("last_token", "full"):
        res = activation_patching(model, pairs, method=method,  # type: ignore[arg-type]
                                  direction=direction)  # type: ignore[arg-type]
        _assert_close(res.resid[:, -1], np.ones(len(pairs)))
        # pairs that differ in the last token only: the last position carries everything
        _assert_close(res.resid[0::2], np.ones_like(res.resid[0::2]))
        # pairs that differ before the last token: the last token's embedding is the same
        _assert_close(res.resid[1::2, 0], np.zeros(len(pairs) // 2))
    fast = activation_patching(model, pairs, direction=direction)  # type: ignore[arg-type]
    full = activation_patching(model, pairs, method="full",
                               direction=direction)  # type: ignore[arg-type]
    _assert_close(fast.heads, full.heads)
    _assert_close(fast.mlp, full.mlp)


def test_every_position(model: Any) -> None:
    pairs = _pairs(model, seed=3)
    every = activation_patching(model, pairs, method="full", positions="all")
    # the whole residual stream entering any block is the whole source run from there on
    _assert_close(every.resid, np.ones_like(every.resid))
    # pairs that differ in the last token only agree before it: every position = the last one
    last = activation_patching(model, pairs)
    _assert_close(every.heads[0::2], last.heads[0::2])
    _assert_close(every.mlp[0::2], last.mlp[0::2])
    # where they differ earlier, patching every position differs from patching the last one
    assert np.abs(every.mlp[1::2] - last.mlp[1::2]).max() > 1e-4


def test_attribution_is_exact_where_the_metric_is_linear(model: Any) -> None:
    """With the final norm replaced by Identity the logits are linear in the stream leaving the
    last block, and so in the last block's MLP output (added straight onto it); with GPT-NeoX's
    parallel residual also in each head of the last block (nothing after them reads them)."""
    sites = resolve_sites(model)
    parent = sites.decoder  # the final norm is the decoder's child in every family
    name = next(n for n, child in parent.named_children() if child is sites.final_norm)
    norm = getattr(parent, name)
    setattr(parent, name, torch.nn.Identity())
    try:
        pairs = _pairs(model, seed=4)
        exact = activation_patching(model, pairs)
        attr = attribution_patching(model, pairs)
        # without the norm the logits are large: float32 rounding is relative
        _assert_close(attr.ld_base, exact.ld_base, rtol=1e-5)
        _assert_close(attr.ld_source, exact.ld_source, rtol=1e-5)
        _assert_close(attr.resid[:, -1], exact.resid[:, -1])
        _assert_close(attr.mlp[:, -1], exact.mlp[:, -1])
        if sites.parallel_residual:
            _assert_close(attr.heads[:, -1], exact.heads[:, -1])
        # the same in the other direction (clean activations into the corrupted run)
        exact_back = activation_patching(model, pairs, direction="denoise", components=("resid",))
        attr_back = attribution_patching(model, pairs, direction="denoise", components=("resid",))
        _assert_close(attr_back.resid[:, -1], exact_back.resid[:, -1])
        _assert_close(attr_back.resid[:, -1], np.ones(len(pairs)))
        # and it is an approximation elsewhere: the earlier blocks are not linear
        assert np.abs(attr.resid[:, 0] - exact.resid[:, 0]).max() > 1e-3
        assert attr.heads.shape == exact.heads.shape
    finally:
        setattr(parent, name, norm)


def test_components_subset_and_bad_input(model: Any) -> None:
    pairs = _pairs(model, n=2, seed=5)
    only = activation_patching(model, pairs, components=("mlp",))
    assert only.heads.shape == (2, 0, 0) and only.resid.shape == (2, 0)
    _assert_close(only.mlp, activation_patching(model, pairs, method="full").mlp)
    uneven = [PromptPair(pairs[0].clean_ids, pairs[0].corrupted_ids[:-1], 1, 2)]
    with pytest.raises(UserError, match="pair 0"):
        activation_patching(model, uneven)
    with pytest.raises(UserError, match="no prompt pairs"):
        attribution_patching(model, [])
    with pytest.raises(UserError, match="full recompute"):
        activation_patching(model, pairs, positions="all")
    with pytest.raises(UserError, match="components"):
        activation_patching(model, pairs, components=("attention",))
