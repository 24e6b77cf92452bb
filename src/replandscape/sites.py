"""Where representations are read (and, for patching, written) in a causal LM, for every family.

A *site kind* names one place in the forward pass; together with a block index it names one
site. The vocabulary is shared by every stage that hooks a model:

- ``residual``: the residual stream entering block ``i`` (the block's input);
- ``input_layernorm``: the normalised residual the block's attention reads (Llama's
  ``input_layernorm``, GPT-Neo's ``ln_1``);
- ``post_attention_layernorm``: the normalised stream the block's MLP reads (``ln_2``). With a
  parallel residual (GPT-NeoX's default) the MLP reads the block's input, not input + attention;
- ``attn_heads``: the concatenation of the attention heads, i.e. the input of the attention
  output projection (``o_proj``, ``dense``, ``out_proj``), ``[batch, tokens, n_heads * head_dim]``;
- ``mlp_out``: the MLP's output, before it is added to the residual stream;
- ``block_output``: the residual stream leaving block ``i``;
- ``norm``: the output of the final norm; ``logits``: the output head's output.

:func:`resolve_sites` finds the modules of a loaded model from ``model.config.model_type`` with
one resolver per architecture family, and :func:`site_modules` says which module's input or output
holds a site, so hooks sit at the same place whatever the family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from replandscape.errors import UserError

BLOCK_SITE_KINDS = ("residual", "input_layernorm", "post_attention_layernorm", "attn_heads",
                    "mlp_out", "block_output")
MODEL_SITE_KINDS = ("norm", "logits")
SITE_KINDS = BLOCK_SITE_KINDS + MODEL_SITE_KINDS

Side = Literal["input", "output"]


@dataclass(frozen=True)
class BlockSites:
    """The modules of one decoder block that hold its sites, and its attention shape."""

    block: Any
    input_norm: Any  # output: the normalised residual the attention reads
    post_attention_norm: Any  # output: the normalised stream the MLP reads
    attention: Any
    attention_out_proj: Any  # input: the concatenated heads
    mlp: Any  # output: the MLP's contribution to the residual stream
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class ModelSites:
    """A causal LM's decoder, blocks, final norm and output head, found for its family."""

    family: str  # one of FAMILIES' values, as in ``model.family``
    model_type: str  # ``model.config.model_type``
    decoder: Any  # the stack whose forward takes input_ids, attention_mask, position_ids
    blocks: list[Any]
    block_sites: list[BlockSites]
    final_norm: Any
    head: Any
    # block output = input + attention(ln_1(input)) + mlp(ln_2(input)) instead of sequential
    parallel_residual: bool = False

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


def _module(root: Any, path: str, model_type: str) -> Any:
    """``root.a.b.0.c`` by attribute (digits index), or a one-line error naming what is missing."""
    node = root
    for part in path.split("."):
        nxt = node[int(part)] if part.isdigit() else getattr(node, part, None)
        if nxt is None:
            raise UserError(f"a '{model_type}' model ({type(root).__name__}) has no module "
                            f"'{path}'", key="model.path",
                            fix="use a transformers version whose module names match "
                                "replandscape.sites, or add a resolver for this layout")
        node = nxt
    return node


def _head(model: Any, model_type: str) -> Any:
    """The output head (``lm_head``; GPT-NeoX's ``embed_out`` before transformers 5 renamed it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if head is not None else _module(model, "lm_head", model_type)


def _heads(config: Any, heads_attr: str) -> tuple[int, int, int]:
    n_heads = int(getattr(config, heads_attr))
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, int(head_dim)


def _llama_like(model: Any, model_type: str, family: str) -> ModelSites:
    """Llama, Mistral and Qwen2: ``model.layers[i].{input_layernorm, self_attn.o_proj, ...}``."""
    decoder = _module(model, "model", model_type)
    blocks = list(_module(decoder, "layers", model_type))
    n_heads, n_kv, head_dim = _heads(model.config, "num_attention_heads")
    per_block = [BlockSites(
        block=block,
        input_norm=_module(block, "input_layernorm", model_type),
        post_attention_norm=_module(block, "post_attention_layernorm", model_type),
        attention=_module(block, "self_attn", model_type),
        attention_out_proj=_module(block, "self_attn.o_proj", model_type),
        mlp=_module(block, "mlp", model_type),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim) for block in blocks]
    return ModelSites(family=family, model_type=model_type, decoder=decoder, blocks=blocks,
                      block_sites=per_block, final_norm=_module(decoder, "norm", model_type),
                      head=_head(model, model_type))


def _gpt_neox(model: Any, model_type: str, family: str) -> ModelSites:
    """GPT-NeoX (Pythia): ``gpt_neox.layers[i].{input_layernorm, attention.dense, mlp}``."""
    decoder = _module(model, "gpt_neox", model_type)
    blocks = list(_module(decoder, "layers", model_type))
    n_heads, n_kv, head_dim = _heads(model.config, "num_attention_heads")
    per_block = [BlockSites(
        block=block,
        input_norm=_module(block, "input_layernorm", model_type),
        post_attention_norm=_module(block, "post_attention_layernorm", model_type),
        attention=_module(block, "attention", model_type),
        attention_out_proj=_module(block, "attention.dense", model_type),
        mlp=_module(block, "mlp", model_type),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim) for block in blocks]
    return ModelSites(family=family, model_type=model_type, decoder=decoder, blocks=blocks,
                      block_sites=per_block,
                      final_norm=_module(decoder, "final_layer_norm", model_type),
                      head=_head(model, model_type),
                      parallel_residual=bool(getattr(model.config, "use_parallel_residual", True)))


def _gpt_neo(model: Any, model_type: str, family: str) -> ModelSites:
    """GPT-Neo: ``transformer.h[i].{ln_1, attn.attention.out_proj, ln_2, mlp}``."""
    decoder = _module(model, "transformer", model_type)
    blocks = list(_module(decoder, "h", model_type))
    n_heads, n_kv, head_dim = _heads(model.config, "num_heads")
    per_block = [BlockSites(
        block=block,
        input_norm=_module(block, "ln_1", model_type),
        post_attention_norm=_module(block, "ln_2", model_type),
        # GPTNeoAttention only picks the global or local variant; the heads live one level down
        attention=_module(block, "attn.attention", model_type),
        attention_out_proj=_module(block, "attn.attention.out_proj", model_type),
        mlp=_module(block, "mlp", model_type),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim) for block in blocks]
    return ModelSites(family=family, model_type=model_type, decoder=decoder, blocks=blocks,
                      block_sites=per_block, final_norm=_module(decoder, "ln_f", model_type),
                      head=_head(model, model_type))


Resolver = Callable[[Any, str, str], ModelSites]

# model.config.model_type -> (family as written in model.family, resolver)
FAMILIES: dict[str, tuple[str, Resolver]] = {
    "llama": ("llama", _llama_like),
    "mistral": ("mistral", _llama_like),
    "qwen2": ("qwen2", _llama_like),
    "gpt_neox": ("gpt_neox", _gpt_neox),
    "gpt_neo": ("gpt_neo", _gpt_neo),
}

# the LoRA targets of each family: every linear map of attention and MLP, by that family's names
# (PEFT matches a name or a dotted suffix; GPT-NeoX's "dense" is attention.dense alone)
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "gpt_neo": ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"),
}


def resolve_sites(model: Any) -> ModelSites:
    """The site-holding modules of a loaded causal LM, found from ``model.config.model_type``.

    A PEFT wrapper is looked through (its base model keeps the family's module names).

    Raises:
        UserError: the architecture has no resolver here, or its modules are not where the
            family's resolver looks.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or type(model).__name__)
    if model_type not in FAMILIES:
        supported = ", ".join(f"{fam} ({mt})" for mt, (fam, _) in FAMILIES.items())
        raise UserError(f"cannot resolve the sites of a '{model_type}' model "
                        f"({type(model).__name__})", key="model.path",
                        fix=f"use a model of a supported family: {supported}")
    family, resolver = FAMILIES[model_type]
    return resolver(model, model_type, family)


def site_modules(sites: ModelSites, kind: str, i: int | None = None) -> tuple[Any, Side]:
    """The module whose ``"input"`` or ``"output"`` holds site ``kind`` of block ``i``.

    ``norm`` and ``logits`` belong to no block and ignore ``i``. Read an ``"input"`` with a
    forward pre-hook (first positional argument, else the ``hidden_states`` keyword) and an
    ``"output"`` with a forward hook (the first element when the module returns a tuple), as
    :func:`hook_site` does.
    """
    if kind == "norm":
        return sites.final_norm, "output"
    if kind == "logits":
        return sites.head, "output"
    if kind not in BLOCK_SITE_KINDS:
        raise UserError(f"unknown site kind '{kind}'", key="sites",
                        fix=f"use one of {', '.join(SITE_KINDS)}")
    if i is None or not -sites.n_blocks <= i < sites.n_blocks:
        raise IndexError(f"site {kind}: block {i} of a model with {sites.n_blocks} blocks")
    b = sites.block_sites[i]
    table: dict[str, tuple[Any, Side]] = {
        "residual": (b.block, "input"),
        "input_layernorm": (b.input_norm, "output"),
        "post_attention_layernorm": (b.post_attention_norm, "output"),
        "attn_heads": (b.attention_out_proj, "input"),
        "mlp_out": (b.mlp, "output"),
        "block_output": (b.block, "output"),
    }
    return table[kind]


SiteFn = Callable[[Any], Any]


def hook_site(sites: ModelSites, kind: str, i: int | None, fn: SiteFn) -> Any:
    """Register ``fn(tensor)`` at a site; a tensor it returns replaces the site's value.

    Returns the hook's handle (``handle.remove()`` takes it off). Reading and writing go through
    the same (module, side) as :func:`site_modules` names, so a patch lands where a read was taken.
    """
    module, side = site_modules(sites, kind, i)
    if side == "input":
        def pre_hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module: Any, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return module.register_forward_hook(hook)
