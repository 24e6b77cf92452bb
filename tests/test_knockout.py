"""Attention knockout through the mask: nothing knocked changes nothing, the knocked attention
equals one computed by hand (weights of the knocked keys zeroed and renormalised), only the chosen
layers change, position sets come from the character layout whatever the BOS, and bad position
sets or windows are one-line errors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import TINY_MODEL
from replandscape.config import ModelConfig
from replandscape.errors import UserError
from replandscape.knockout import (
    KnockoutPrompt,
    answer_scores,
    encode,
    encode_with_offsets,
    knockout_hooks,
    layout_prompt,
    resolve_positions,
    run_knockout,
    scan_knockout,
)
from replandscape.models import TINY_FAMILIES, load_causal_lm, load_tokenizer, resolve_model_path
from replandscape.sites import resolve_sites
from replandscape.stages.extract import collate
from replandscape.tasks import get_task, shot_pool
from replandscape.tasks.pairs import task_layout

TEXTS = ["The following are multiple choice questions about law.\n\nA short one\nAnswer:",
         "In music, which term fits opera?\nA. cello\nB. violin\nAnswer:"]


def _path(builtin: str = "tiny-llama", **shape: Any) -> str:
    return resolve_model_path(ModelConfig(**{**TINY_MODEL, "path": f"builtin:{builtin}",
                                             "name": builtin, "family": TINY_FAMILIES[builtin],
                                             **shape}))


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    path = _path()
    return load_causal_lm(path), load_tokenizer(path)


def _prompts(k: int = 2, n: int = 3, task: str = "expression") -> list[KnockoutPrompt]:
    spec = get_task(task)
    pool = shot_pool([spec.generate("dev", v, i, 1) for v in spec.variants for i in range(8)])
    test = [spec.generate("test", "pattern", i, 1) for i in range(n)]
    return [KnockoutPrompt(it.id, task_layout(it, pool, k, 0), it.target) for it in test]


def _batch(tok: Any, texts: list[str] = TEXTS) -> tuple[torch.Tensor, torch.Tensor]:
    return collate([tok(t)["input_ids"] for t in texts], tok.pad_token_id, "left")


def _knock(mask: torch.Tensor, per_row: list[list[int]]) -> torch.Tensor:
    """[B, T] bool at the padded columns of each row's (unpadded) token indices."""
    knock = torch.zeros(mask.shape, dtype=torch.bool)
    for b, positions in enumerate(per_row):
        shift = int((mask[b] == 0).sum())
        for p in positions:
            knock[b, p + shift] = True
    return knock


# --------------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------------


def test_knockout_of_nothing_changes_nothing_exactly(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    encoded = [encode(tok, p, True) for p in _prompts()]
    clean = answer_scores(model, encoded, tok.pad_token_id)
    empty = answer_scores(model, encoded, tok.pad_token_id, [[] for _ in encoded], range(3))
    assert np.array_equal(clean[0], empty[0]) and np.array_equal(clean[1], empty[1])


@pytest.mark.parametrize("builtin", sorted(TINY_FAMILIES))
def test_every_family_knocks_through_its_mask(builtin: str) -> None:
    path = _path(builtin)
    model, tok = load_causal_lm(path), load_tokenizer(path)
    ids, mask = _batch(tok)
    lengths = [int(m.sum()) for m in mask]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    n = resolve_sites(model).n_blocks
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        # the last token is read by no later position: knocking it out changes nothing
        with knockout_hooks(model, range(n), _knock(mask, [[t - 1] for t in lengths]), mask):
            last = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with knockout_hooks(model, range(n), _knock(mask, [[1, 2], [1, 2]]), mask):
            knocked = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(clean, last)
    real = mask.bool()
    shift = [int((m == 0).sum()) for m in mask]
    for b in range(2):  # positions 0 and 1 read nothing knocked; position 2 reads 1, and so on
        upto = slice(shift[b], shift[b] + 2)
        assert torch.equal(clean[b, upto], knocked[b, upto])
        assert not torch.allclose(clean[b, shift[b] + 2:], knocked[b, shift[b] + 2:])
    assert torch.isfinite(knocked[real]).all()


def _hand_attention(attn: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: torch.Tensor, knock: torch.Tensor) -> torch.Tensor:
    """Causal attention with padding, then the knocked keys' weights zeroed for every later
    query and each row renormalised: the knockout computed without any attention mask."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, t, _ = hidden.shape
    n_heads, n_kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    d = attn.head_dim
    q = attn.q_proj(hidden).view(b, t, n_heads, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, t, n_kv, d).transpose(1, 2)
    v = attn.v_proj(hidden).view(b, t, n_kv, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    idx = torch.arange(t)
    allowed = (idx[:, None] >= idx[None, :])[None, None] & mask.bool()[:, None, None, :]
    weights = torch.exp(scores - scores.max(-1, keepdim=True).values) * allowed
    weights = weights / weights.sum(-1, keepdim=True)
    cut = knock[:, None, None, :] & (idx[:, None] > idx[None, :])[None, None]
    weights = weights.masked_fill(cut, 0.0)
    weights = weights / weights.sum(-1, keepdim=True)
    out = (weights @ v).transpose(1, 2).reshape(b, t, n_heads * d)
    return attn.o_proj(out)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_knocked_attention_equals_the_hand_computed_one(impl: str) -> None:
    path = _path(n_layers=1)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()
    tok = load_tokenizer(path)
    sites = resolve_sites(model)
    block, attn = sites.blocks[0], sites.block_sites[0].attention
    ids, mask = _batch(tok)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    knock = _knock(mask, [[0, 3, 4], [2, 7]])  # BOS among them in the first prompt
    got: dict[str, Any] = {}

    def grab_in(_m: Any, args: Any, kwargs: Any) -> None:
        got["hidden"] = kwargs["hidden_states"]
        got["cos"], got["sin"] = kwargs["position_embeddings"]

    def grab_out(_m: Any, _a: Any, out: Any) -> None:
        got["attn"] = out[0]

    def grab_block(_m: Any, args: Any, out: Any) -> None:
        got["block_in"], got["block_out"] = args[0], out[0] if isinstance(out, tuple) else out

    handles = [attn.register_forward_pre_hook(grab_in, with_kwargs=True),
               attn.register_forward_hook(grab_out), block.register_forward_hook(grab_block)]
    try:
        with torch.no_grad(), knockout_hooks(model, [0], knock, mask):
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
        with torch.no_grad():
            hand = _hand_attention(attn, got["hidden"], got["cos"], got["sin"], mask, knock)
            mid = got["block_in"] + hand
            layer = mid + block.mlp(block.post_attention_layernorm(mid))
    finally:
        for h in handles:
            h.remove()
    real = mask.bool()  # padding queries attend to nothing real: not compared
    torch.testing.assert_close(got["attn"][real], hand[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["block_out"][real], layer[real], rtol=1e-5, atol=1e-5)


def test_only_the_chosen_window_changes(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    sites = resolve_sites(model)
    ids, mask = _batch(tok)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(
        lambda _m, _a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, b in enumerate(sites.blocks)]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
            clean = dict(outs)
            with knockout_hooks(model, [2], _knock(mask, [[2], [3]]), mask):
                model(input_ids=ids, attention_mask=mask, position_ids=pos)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(outs[0], clean[0]) and torch.equal(outs[1], clean[1])
    assert not torch.allclose(outs[2], clean[2])


# --------------------------------------------------------------------------------------------
# position sets
# --------------------------------------------------------------------------------------------


def test_position_sets_follow_the_layout_and_ignore_bos(llama: tuple[Any, Any]) -> None:
    _, tok = llama
    prompt = _prompts(k=3, n=1, task="relation")[0]
    layout = prompt.layout
    with_bos, off = encode_with_offsets(tok, layout.text, True)
    without, off0 = encode_with_offsets(tok, layout.text, False)
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == without
    for spec in ("header_last", "shot_last", "separators", "header", "shots", "query",
                 "shot.1", "separator.2", "chars:5-30"):
        a, b = resolve_positions(spec, layout, off), resolve_positions(spec, layout, off0)
        assert a and a == [p + 1 for p in b], spec  # the same tokens, one later for the BOS
        assert 0 not in a  # BOS is in no set
    header_end = layout.header[1]
    (h,) = resolve_positions("header_last", layout, off)
    assert off[h][0] < header_end <= off[h][1]
    shot_last = resolve_positions("shot_last", layout, off)
    assert len(shot_last) == 3
    for p, (_, sep, _) in zip(shot_last, layout.shots):
        assert off[p][0] < sep <= off[p][1]
        piece = tok.decode([with_bos[p]]).strip()
        assert piece and layout.text[:sep].endswith(piece)  # the end of the shot's answer
        assert layout.text[:sep].endswith(("True", "False"))
    for p in resolve_positions("separators", layout, off):
        assert "\n" in layout.text[off[p][0]:off[p][1]]
    assert resolve_positions("shot.7", layout, off) == []


def test_run_knockout_reports_accuracy_and_logprob_changes(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    prompts = _prompts()
    result = run_knockout(model, tok, prompts, ["header_last", "shots"], [(0, 3), (1, 2)],
                          batch_size=2)
    assert [(e.position_set, e.window) for e in result.effects] == [
        ("header_last", (0, 3)), ("header_last", (1, 2)), ("shots", (0, 3)), ("shots", (1, 2))]
    encoded = [encode(tok, p, True) for p in prompts]
    clean_lp, clean_ok = answer_scores(model, encoded, tok.pad_token_id)
    np.testing.assert_allclose(result.clean_logprob, clean_lp, rtol=0, atol=1e-6)
    shots = next(e for e in result.effects if e.position_set == "shots" and e.window == (0, 3))
    positions = [resolve_positions("shots", p.layout, e.offsets) for p, e in zip(prompts, encoded)]
    lp, ok = answer_scores(model, encoded, tok.pad_token_id, positions, range(0, 3))
    np.testing.assert_allclose(shots.per_item_delta_logprob, lp - clean_lp, rtol=0, atol=1e-6)
    assert shots.delta_accuracy == pytest.approx(ok.mean() - clean_ok.mean())
    assert shots.delta_logprob != 0.0  # knocking every shot out moves the answer
    assert shots.mean_knocked == pytest.approx(np.mean([len(p) for p in positions]))
    blob = result.to_json()
    assert blob["effects"][0]["window"] == [0, 3] and len(blob["ids"]) == 3


def test_scan_finds_the_single_token_that_matters(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    prompts = _prompts(k=1, n=2)
    (scan,) = scan_knockout(model, tok, prompts, last_n=4, windows=[(0, 3)])
    assert scan.offsets == [1, 2, 3, 4] and scan.n == [2, 2, 2, 2]
    assert scan.most == scan.offsets[int(np.argmax(np.abs(scan.delta_logprob)))]
    # offset j of the scan is the knockout of that one token by its characters
    one = prompts[0]
    enc = encode(tok, one, True)
    p = len(enc.ids) - 1 - 2
    s, e = enc.offsets[p]
    by_chars = run_knockout(model, tok, [KnockoutPrompt(0, layout_prompt(one.layout.text),
                                                        one.target)], [f"chars:{s}-{e}"],
                            [(0, 3)])
    (single,) = scan_knockout(model, tok, [one], last_n=2, windows=[(0, 3)])
    assert single.delta_logprob[1] == pytest.approx(by_chars.effects[0].delta_logprob, abs=1e-6)
    assert single.tokens[1] == [tok.decode([enc.ids[p]])]


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_bad_position_sets_and_windows_are_one_line_errors(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    zero_shot = _prompts(k=0, n=2)
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(prompts=zero_shot, position_sets=["shot_last"], windows=[(0, 3)]),
         r"position set 'shot_last' names no token in prompt 0 \(2 of 2 prompts\)"),
        (dict(prompts=zero_shot, position_sets=["chars:5000-5100"], windows=[(0, 3)]),
         "names no token"),
        (dict(prompts=zero_shot, position_sets=["header"], windows=[(0, 4)]),
         r"layer window \[0, 4\) lies outside the model's 3 layers"),
        (dict(prompts=zero_shot, position_sets=["header"], windows=[(2, 2)]),
         r"layer window \[2, 2\) lies outside"),
        (dict(prompts=zero_shot, position_sets=["middle"], windows=[(0, 3)]),
         "unknown position set 'middle'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message) as err:
            run_knockout(model, tok, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="outside"):
        scan_knockout(model, tok, zero_shot, last_n=3, windows=[(-1, 2)])
