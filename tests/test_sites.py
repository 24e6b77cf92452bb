"""Sites: every supported family resolves to the same vocabulary, and hooks read (and patch) it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from helpers import REPO, TINY_MODEL
from replandscape.capture import collate, decoder_parts
from replandscape.config import ModelConfig
from replandscape.errors import UserError
from replandscape.models import TINY_FAMILIES, load_causal_lm, load_tokenizer, resolve_model_path
from replandscape.prompts import letter_token_ids
from replandscape.sites import (
    BLOCK_SITE_KINDS,
    FAMILIES,
    LORA_TARGETS,
    SITE_KINDS,
    ModelSites,
    hook_site,
    resolve_sites,
    site_modules,
)

BUILTINS = sorted(TINY_FAMILIES)
TEXTS = ["The following are multiple choice questions about law.\n\nA short one\nAnswer:",
         "In music, which term fits opera?\nA. cello\nB. violin\nC. piano\nD. tempo\nAnswer:"]


def _model_config(builtin: str) -> ModelConfig:
    return ModelConfig(**{**TINY_MODEL, "path": f"builtin:{builtin}", "name": builtin,
                          "family": TINY_FAMILIES[builtin]})


@pytest.fixture(scope="module", params=BUILTINS)
def tiny(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    """(builtin name, model, tokenizer), built once and loaded through from_pretrained."""
    path = resolve_model_path(_model_config(request.param))
    return request.param, load_causal_lm(path), load_tokenizer(path)


@pytest.fixture(autouse=True)
def _no_grad() -> Any:
    # the checks recompute norms and projections on captured tensors: no graph is wanted
    with torch.no_grad():
        yield


def _batch(tok: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return collate([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id, "left")


def _capture_all(model: Any, sites: ModelSites, ids: torch.Tensor,
                 mask: torch.Tensor) -> tuple[dict[tuple[str, int | None], torch.Tensor], Any]:
    got: dict[tuple[str, int | None], torch.Tensor] = {}
    handles = []
    for kind in SITE_KINDS:
        for i in (range(sites.n_blocks) if kind in BLOCK_SITE_KINDS else [None]):
            def keep(x: torch.Tensor, key: tuple[str, int | None] = (kind, i)) -> None:
                got[key] = x.detach().clone()

            handles.append(hook_site(sites, kind, i, keep))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return got, out


def test_every_family_resolves_and_every_site_kind_is_read(tiny: tuple[str, Any, Any]) -> None:
    name, model, tok = tiny
    family = TINY_FAMILIES[name]
    sites = resolve_sites(model)
    assert sites.family == family and FAMILIES[model.config.model_type] == family
    assert sites.n_blocks == TINY_MODEL["n_layers"]
    hidden, heads = TINY_MODEL["hidden_size"], TINY_MODEL["tiny_heads"]
    for b in sites.block_sites:
        assert (b.n_heads, b.head_dim) == (heads, hidden // heads)
        # Llama-style tiny models use grouped-query attention; GPT-NeoX/Neo have none
        assert b.n_kv_heads == (heads if family in ("gpt_neox", "gpt_neo") else heads // 2)
        assert b.attention_out_proj.in_features == b.n_heads * b.head_dim
    assert sites.parallel_residual == (family == "gpt_neox")

    ids, mask = _batch(tok)
    got, out = _capture_all(model, sites, ids, mask)
    n_b, n_t = ids.shape
    assert len(got) == len(BLOCK_SITE_KINDS) * sites.n_blocks + 2
    for (kind, _i), value in got.items():
        width = model.config.vocab_size if kind == "logits" else hidden
        assert value.shape == (n_b, n_t, width), kind

    hs = out.hidden_states
    close = dict(atol=1e-5, rtol=1e-5)
    for i, b in enumerate(sites.block_sites):
        residual = got[("residual", i)]
        torch.testing.assert_close(residual, hs[i], **close)
        torch.testing.assert_close(got[("input_layernorm", i)], b.input_norm(residual), **close)
        attn = b.attention_out_proj(got[("attn_heads", i)])
        # the block adds exactly its attention and MLP outputs to the residual stream
        torch.testing.assert_close(got[("block_output", i)],
                                   residual + attn + got[("mlp_out", i)], atol=1e-4, rtol=1e-4)
        mlp_reads = residual if sites.parallel_residual else residual + attn
        torch.testing.assert_close(got[("post_attention_layernorm", i)],
                                   b.post_attention_norm(mlp_reads), atol=1e-4, rtol=1e-4)
        if i + 1 < sites.n_blocks:
            torch.testing.assert_close(got[("residual", i + 1)], got[("block_output", i)], **close)
    torch.testing.assert_close(got[("norm", None)], hs[-1], **close)
    torch.testing.assert_close(got[("norm", None)],
                               sites.final_norm(got[("block_output", sites.n_blocks - 1)]), **close)
    torch.testing.assert_close(got[("logits", None)], out.logits, **close)


def test_every_family_shares_the_tokenizer_and_its_answer_letters(
        tiny: tuple[str, Any, Any]) -> None:
    _name, model, tok = tiny
    ids = letter_token_ids(tok, 4)
    assert len(set(ids)) == 4 and tok("Answer: C", add_special_tokens=False)["input_ids"][-1] == ids[2]
    assert model.config.vocab_size == len(tok)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_token_id,
                                                                      tok.eos_token_id)
    batch, mask = _batch(tok)
    with torch.no_grad():
        logits = model(input_ids=batch, attention_mask=mask).logits[:, -1, ids]
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


def test_zeroed_heads_patch_equals_a_zeroed_output_projection(tiny: tuple[str, Any, Any]) -> None:
    """A value a hook returns replaces the site: zero heads == zero output-projection weights."""
    _name, model, tok = tiny
    sites = resolve_sites(model)
    ids, mask = _batch(tok)
    proj = sites.block_sites[1].attention_out_proj
    handle = hook_site(sites, "attn_heads", 1, torch.zeros_like)
    try:
        with torch.no_grad():
            patched = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    saved = proj.weight.detach().clone()
    with torch.no_grad():
        proj.weight.zero_()
    try:
        with torch.no_grad():
            reference = model(input_ids=ids, attention_mask=mask).logits
    finally:
        with torch.no_grad():
            proj.weight.copy_(saved)
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(patched, clean, atol=1e-4)


def test_patched_block_output_reaches_the_final_norm(tiny: tuple[str, Any, Any]) -> None:
    """Output-side patching, including GPT-Neo's blocks that return a tuple."""
    _name, model, tok = tiny
    sites = resolve_sites(model)
    ids, mask = _batch(tok)
    last = sites.n_blocks - 1
    handle = hook_site(sites, "block_output", last, torch.zeros_like)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    with torch.no_grad():
        expected = sites.head(sites.final_norm(torch.zeros(*ids.shape, TINY_MODEL["hidden_size"])))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_llama_sites_are_the_modules_extraction_hooks() -> None:
    model = load_causal_lm(resolve_model_path(_model_config("tiny-llama")))
    sites = resolve_sites(model)
    decoder, blocks, norm, head = decoder_parts(model)
    assert sites.decoder is decoder and sites.final_norm is norm and sites.head is head
    assert list(sites.blocks) == list(blocks)
    for i, layer in enumerate(model.model.layers):
        assert site_modules(sites, "input_layernorm", i) == (layer.input_layernorm, "output")
        assert site_modules(sites, "post_attention_layernorm", i) == (
            layer.post_attention_layernorm, "output")
        assert site_modules(sites, "residual", i) == (layer, "input")
        assert site_modules(sites, "block_output", i) == (layer, "output")
        assert site_modules(sites, "attn_heads", i) == (layer.self_attn.o_proj, "input")
        assert site_modules(sites, "mlp_out", i) == (layer.mlp, "output")
    assert site_modules(sites, "norm") == (model.model.norm, "output")
    assert site_modules(sites, "logits") == (model.lm_head, "output")
    with pytest.raises(UserError, match="unknown site kind 'heads'.*attn_heads"):
        site_modules(sites, "heads", 0)
    with pytest.raises(IndexError):
        site_modules(sites, "residual", sites.n_blocks)
    with pytest.raises(IndexError):
        site_modules(sites, "residual")


def test_gpt_neo_alternates_global_and_local_attention() -> None:
    model = load_causal_lm(resolve_model_path(_model_config("tiny-gpt-neo")))
    assert model.config.attention_layers == ["global", "local", "global"]


def test_an_unsupported_architecture_is_one_line(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config

    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_positions=32, n_embd=16,
                                                n_layer=2, n_head=2)).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path))
    with pytest.raises(UserError) as info:
        resolve_sites(model)
    text = str(info.value)
    assert "\n" not in text and "'gpt2'" in text and "GPT2LMHeadModel" in text
    assert "model.path" in text and "fix:" in text
    for family in ("llama", "mistral", "qwen2", "gpt_neox", "gpt_neo"):
        assert family in text


def test_a_known_type_in_another_layout_names_the_missing_module(tmp_path: Path) -> None:
    """A Llama checkpoint loaded as a classifier has no output head: one line, not a crash."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(_model_config("tiny-llama"))
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with pytest.raises(UserError, match=r"'llama' model \(LlamaForSequenceClassification\) has "
                                        r"no module 'lm_head'") as info:
        resolve_sites(model)
    assert "\n" not in str(info.value)


def test_each_familys_lora_targets_are_in_its_model() -> None:
    from replandscape.stages.finetune import check_target_modules, model_module_names

    llama_targets = LORA_TARGETS["llama"]
    for builtin, family in TINY_FAMILIES.items():
        names = model_module_names(resolve_model_path(_model_config(builtin)))
        check_target_modules(LORA_TARGETS[family], names)
        if family in ("gpt_neox", "gpt_neo"):  # why the targets must follow the family
            with pytest.raises(UserError, match="not in the model"):
                check_target_modules(llama_targets, names)


def test_shipped_model_configs_name_a_family_with_sites() -> None:
    families = set(FAMILIES.values()) | {"other"}
    for path in sorted((REPO / "configs" / "model").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert data["family"] in families, path


def _lora_adapter(model_path: str, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path)
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft.save_pretrained(folder)
    return folder / "adapter_model.safetensors"


def test_a_truncated_adapter_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = resolve_model_path(_model_config("tiny-llama"))
    weights = _lora_adapter(path, tmp_path / "adapter")
    base = load_causal_lm(path)
    merged = load_causal_lm(path, adapter=str(tmp_path / "adapter"))  # intact: loads and merges
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[w], base.state_dict()[w])
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError) as info:
        load_causal_lm(path, adapter=str(tmp_path / "adapter"))
    text = str(info.value)
    assert "\n" not in text and str(weights) in text and "checkpoint" in text
    assert "truncated or corrupt" in text
