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


@dataclass(frozen=True)
class Layout:
    """Where one architecture keeps its site-holding modules (dotted paths: the decoder from the
    root, the block list from the decoder, the rest from a block), and its head-count key."""

    decoder: str
    blocks: str
    input_norm: str
    post_attention_norm: str
    attention: str
    attention_out_proj: str
    mlp: str
    final_norm: str
    heads_attr: str = "num_attention_heads"
    # GPT-NeoX: attention and MLP read the same block input (``use_parallel_residual``)
    parallel_residual_attr: str | None = None


# Llama, Mistral and Qwen2 share one layout
LLAMA_LAYOUT = Layout(decoder="model", blocks="layers", input_norm="input_layernorm",
                      post_attention_norm="post_attention_layernorm", attention="self_attn",
                      attention_out_proj="self_attn.o_proj", mlp="mlp", final_norm="norm")
LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    # Pythia
    "gpt_neox": Layout(decoder="gpt_neox", blocks="layers", input_norm="input_layernorm",
                       post_attention_norm="post_attention_layernorm", attention="attention",
                       attention_out_proj="attention.dense", mlp="mlp",
                       final_norm="final_layer_norm",
                       parallel_residual_attr="use_parallel_residual"),
    # GPTNeoAttention only picks the global or local variant; the heads live one level down
    "gpt_neo": Layout(decoder="transformer", blocks="h", input_norm="ln_1",
                      post_attention_norm="ln_2", attention="attn.attention",
                      attention_out_proj="attn.attention.out_proj", mlp="mlp", final_norm="ln_f",
                      heads_attr="num_heads"),
}
# model.config.model_type -> family as written in model.family
FAMILIES: dict[str, str] = {model_type: model_type for model_type in LAYOUTS}


def _resolve(model: Any, model_type: str, layout: Layout) -> ModelSites:
    decoder = _module(model, layout.decoder, model_type)
    blocks = list(_module(decoder, layout.blocks, model_type))
    n_heads, n_kv, head_dim = _heads(model.config, layout.heads_attr)
    per_block = [BlockSites(
        block=block,
        input_norm=_module(block, layout.input_norm, model_type),
        post_attention_norm=_module(block, layout.post_attention_norm, model_type),
        attention=_module(block, layout.attention, model_type),
        attention_out_proj=_module(block, layout.attention_out_proj, model_type),
        mlp=_module(block, layout.mlp, model_type),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim) for block in blocks]
    parallel = (bool(getattr(model.config, layout.parallel_residual_attr, True))
                if layout.parallel_residual_attr else False)
    return ModelSites(family=FAMILIES[model_type], model_type=model_type, decoder=decoder,
                      blocks=blocks, block_sites=per_block,
                      final_norm=_module(decoder, layout.final_norm, model_type),
                      head=_head(model, model_type), parallel_residual=parallel)


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
    if model_type not in LAYOUTS:
        supported = ", ".join(f"{fam} ({mt})" for mt, fam in FAMILIES.items())
        raise UserError(f"cannot resolve the sites of a '{model_type}' model "
                        f"({type(model).__name__})", key="model.path",
                        fix=f"use a model of a supported family: {supported}")
    return _resolve(model, model_type, LAYOUTS[model_type])


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
