"""Running a causal LM on prompts: the last-token capture at named sites, tokens and batches.

Shared by every stage that runs a model on prompts (extraction, patching, knockout): hooks go on the
Hugging Face modules through the site vocabulary (:mod:`replandscape.sites`), so they run on every
supported family and under DeepSpeed ZeRO-3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from replandscape.errors import UserError


def decoder_parts(model: Any) -> tuple[Any, Sequence[Any], Any, Any]:
    """(decoder, blocks, final norm, output head) of a causal LM of a supported family."""
    from replandscape.sites import resolve_sites

    found = resolve_sites(model)
    return found.decoder, found.blocks, found.final_norm, found.head


def span_site(site: str, span: str, pool: str) -> str:
    """The stored name of a span representation: ``SITE@SPAN.POOL``."""
    return f"{site}@{span}.{pool}"


def span_token_masks(tokenizer: Any, prompts: Sequence[str], tokens: Sequence[Sequence[int]],
                     spans: Sequence[dict[str, tuple[int, int]]],
                     names: Sequence[str]) -> dict[str, list[list[bool]]]:
    """Per span name, for each prompt, which of its ``tokens`` overlap the span's characters
    (from the tokenizer's offsets, so a BOS or padding never shifts them)."""
    enc = tokenizer(list(prompts), add_special_tokens=False, return_offsets_mapping=True)
    out: dict[str, list[list[bool]]] = {name: [] for name in names}
    for toks, offsets, own in zip(tokens, enc["offset_mapping"], spans):
        lead = len(toks) - len(offsets)  # a BOS (or other prefix) the prompt's tokens start with
        for name in names:
            mask = [False] * len(toks)
            if name in own:
                a, b = own[name]
                for j, (start, end) in enumerate(offsets):
                    if end > start and start < b and end > a and 0 <= lead + j < len(toks):
                        mask[lead + j] = True
            out[name].append(mask)
    return out


def site_names(kinds: Sequence[str], n_blocks: int) -> list[str]:
    width = max(2, len(str(n_blocks - 1)))
    names = []
    for kind in kinds:
        if kind in ("norm", "logits"):
            names.append(kind)
        else:
            names.extend(f"{kind}.{i:0{width}d}" for i in range(n_blocks))
    return names


class LastTokenCapture:
    """Forward hooks that keep, per site, only the kept token's vector (or the prompt mean).

    Sites are found through the shared site vocabulary (:mod:`replandscape.sites`), so every
    supported family is read at the same places that patching and knockout use.
    """

    def __init__(self, model: Any, kinds: Sequence[str], pooling: str,
                 spans: Sequence[str] = (), span_pooling: Sequence[str] = ()) -> None:
        from replandscape.sites import resolve_sites

        self.root = model
        self.sites = resolve_sites(model)
        self.decoder, self.blocks = self.sites.decoder, self.sites.blocks
        self.norm, self.head = self.sites.final_norm, self.sites.head
        self.kinds = list(kinds)
        self.pooling = pooling
        self.names = site_names(kinds, len(self.blocks))
        # named spans of the prompt pooled at every hidden site (not the logits, which exist for
        # the kept token only): extra sites SITE@SPAN.POOL
        self.spans, self.span_pooling = list(spans), list(span_pooling)
        self.span_masks: dict[str, Any] = {}
        self.names += [span_site(n, sp, pool) for n in self.names if n != "logits"
                       for sp in self.spans for pool in self.span_pooling]
        self.out: dict[str, Any] = {}
        self.positions: Any = None
        self.mask: Any = None
        self.last_norm: Any = None
        self.handles: list[Any] = []
        # off while a batch is continued by generation: the decoding steps are not prompt sites
        self.enabled = True

    def _reduce(self, hidden: Any) -> Any:
        import torch

        if isinstance(hidden, (tuple, list)):
            hidden = hidden[0]
        if self.pooling == "mean":
            m = self.mask.to(hidden.dtype).unsqueeze(-1)
            summed = torch.where(m > 0, hidden, torch.zeros_like(hidden)).float().sum(1)
            return summed / self.mask.sum(1, keepdim=True).float()
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), self.positions]

    def _pool_spans(self, name: str, hidden: Any) -> None:
        """Max- and mean-pool ``hidden`` [B, T, D] over each named span's tokens; a row whose
        prompt lacks the span gets zeros (and the file records which rows have it)."""
        import torch

        if isinstance(hidden, (tuple, list)):
            hidden = hidden[0]
        for span in self.spans:
            m = self.span_masks[span].to(hidden.device).unsqueeze(-1)  # [B, T, 1] bool
            have = m.any(1)  # [B, 1]
            for pool in self.span_pooling:
                if pool == "max":
                    low = torch.finfo(hidden.dtype).min
                    value = torch.where(m, hidden, torch.full_like(hidden, low)).amax(1)
                else:
                    total = torch.where(m, hidden, torch.zeros_like(hidden)).float().sum(1)
                    value = total / m.sum(1).clamp(min=1).float()
                self.out[span_site(name, span, pool)] = torch.where(
                    have, value.to(hidden.dtype), torch.zeros_like(value).to(hidden.dtype))

    def _output_hook(self, name: str) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            if self.enabled:
                self.out[name] = self._reduce(output)
                if self.spans:
                    self._pool_spans(name, output)

        return hook

    def _input_hook(self, name: str) -> Any:
        def hook(_module: Any, args: Any, kwargs: Any) -> None:
            if self.enabled:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.out[name] = self._reduce(hidden)
                if self.spans:
                    self._pool_spans(name, hidden)

        return hook

    def _norm_hook(self, _module: Any, _args: Any, output: Any) -> None:
        import torch

        if not self.enabled:
            return
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        self.last_norm = hidden[torch.arange(hidden.shape[0], device=hidden.device),
                                self.positions]
        if "norm" in self.kinds:
            self.out["norm"] = self._reduce(hidden)
            if self.spans:
                self._pool_spans("norm", hidden)

    def __enter__(self) -> LastTokenCapture:
        from replandscape.sites import site_modules

        width = max(2, len(str(len(self.blocks) - 1)))
        for kind in self.kinds:
            if kind in ("norm", "logits"):
                continue
            for i in range(len(self.blocks)):
                name = f"{kind}.{i:0{width}d}"
                module, side = site_modules(self.sites, kind, i)
                if side == "input":
                    self.handles.append(module.register_forward_pre_hook(
                        self._input_hook(name), with_kwargs=True))
                else:
                    self.handles.append(module.register_forward_hook(self._output_hook(name)))
        self.handles.append(self.norm.register_forward_hook(self._norm_hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _head_input_hook(self, _module: Any, args: Any) -> Any:
        # the head sees only the kept token of each prompt (whatever the padding side), so the
        # logits of the other positions are never computed
        return (self.last_norm.unsqueeze(1),) + tuple(args[1:])

    def run(self, input_ids: Any, attention_mask: Any) -> tuple[dict[str, Any], Any]:
        """One batch: returns (site -> [B, D] tensor, last-token logits [B, V])."""
        out, logits, _ = self.run_with_cache(input_ids, attention_mask, use_cache=False)
        return out, logits

    def run_with_cache(self, input_ids: Any, attention_mask: Any, use_cache: bool,
                       span_masks: dict[str, Any] | None = None
                       ) -> tuple[dict[str, Any], Any, Any]:
        """One batch: (site -> [B, D] tensor, last-token logits [B, V], key/value cache or None).

        The forward goes through the root module (the model DeepSpeed was given), never its
        decoder or head alone, so ZeRO-3's start- and end-of-forward hooks run on every batch.
        With ``use_cache`` the cache of the prompt is returned, for generation to continue from.
        """
        import torch

        self.out = {}
        self.mask = attention_mask
        self.span_masks = span_masks or {}
        idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        self.positions = (attention_mask * idx).argmax(1)
        # explicit positions: left padding must not shift a prompt's positions
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        handle = self.head.register_forward_pre_hook(self._head_input_hook)
        try:
            output = self.root(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=use_cache)
        finally:
            handle.remove()
        logits = output.logits[:, -1]
        if "logits" in self.kinds:
            self.out["logits"] = logits
        return self.out, logits, (output.past_key_values if use_cache else None)


# --------------------------------------------------------------------------------------------
# tokens and batches
# --------------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, prompts: Sequence[str], add_bos: bool, context_length: int,
             ids: Sequence[int], *, shots: int | None = None,
             reserve: int = 0) -> list[list[int]]:
    """Token ids of each prompt (BOS first when asked); a prompt that does not fit the model's
    context (with ``reserve`` tokens left for generation) is one error naming the shot count."""
    encoded = tokenizer(list(prompts), add_special_tokens=add_bos)["input_ids"]
    bos = tokenizer.bos_token_id
    out = []
    for qid, tokens in zip(ids, encoded):
        tokens = list(tokens)
        if add_bos and bos is not None and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        if len(tokens) + reserve > context_length:
            at = f" at {shots} shots" if shots is not None else ""
            plus = f" + {reserve} to generate" if reserve else ""
            raise UserError(f"item {qid}: the prompt{at} has {len(tokens)} tokens{plus}, over the "
                            f"model's context of {context_length}", key="prompts.shots",
                            fix="use fewer shots or a model with a longer context")
        out.append(tokens)
    return out


def plan_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int,
                 max_batch_tokens: int) -> list[np.ndarray]:
    """Length-sorted batches (longest first) under a size and a padded-token budget."""
    order = rows[np.argsort(-lengths[rows], kind="stable")]
    batches: list[np.ndarray] = []
    current: list[int] = []
    longest = 0
    for row in order:
        n = int(lengths[row])
        width = max(longest, n)
        if current and (len(current) >= batch_size or width * (len(current) + 1) > max_batch_tokens):
            batches.append(np.asarray(current, dtype=np.int64))
            current, width = [], n
        current.append(int(row))
        longest = width
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return batches


def collate(token_lists: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[Any, Any]:
    import torch

    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        t = torch.as_tensor(tokens, dtype=torch.long)
        if side == "left":
            ids[i, width - len(t):] = t
            mask[i, width - len(t):] = 1
        else:
            ids[i, : len(t)] = t
            mask[i, : len(t)] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


class AttentionMass:
    """The attention the kept (last) token pays to named spans of its prompt, per layer and
    head, read during the forward pass without materialising any layer's attention matrix: only
    the kept token's query row is formed (its query against every key, RoPE applied as the model
    does, grouped-query heads expanded), softmaxed over the real tokens, and summed over each span.

    Llama-family attention only (Llama, Mistral, Qwen2: ``q_proj``/``k_proj`` and rotary
    position embeddings handed to the attention module); other families are refused in one line.
    """

    FAMILIES = ("llama", "mistral", "qwen2")

    def __init__(self, capture: LastTokenCapture, spans: Sequence[str]) -> None:
        if capture.sites.family not in self.FAMILIES:
            raise UserError(f"attention masses are read for {', '.join(self.FAMILIES)} models, "
                            f"not {capture.sites.model_type}", key="extract.attention_spans",
                            fix="leave extract.attention_spans empty for this model")
        self.capture = capture
        self.spans = list(spans)
        self.handles: list[Any] = []
        self.q: dict[int, Any] = {}
        self.k: dict[int, Any] = {}
        self.rope: dict[int, Any] = {}
        self.mass: dict[str, dict[int, Any]] = {}

    def __enter__(self) -> AttentionMass:
        for i, b in enumerate(self.capture.sites.block_sites):
            attn = b.attention
            self.handles.append(attn.q_proj.register_forward_hook(self._keep(self.q, i)))
            self.handles.append(attn.k_proj.register_forward_hook(self._keep(self.k, i)))
            self.handles.append(attn.register_forward_pre_hook(self._rope(i), with_kwargs=True))
            self.handles.append(attn.register_forward_hook(self._compute(i, attn)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _keep(self, store: dict[int, Any], i: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            if self.capture.enabled and self.capture.span_masks:
                store[i] = output

        return hook

    def _rope(self, i: int) -> Any:
        def hook(_module: Any, args: Any, kwargs: Any) -> None:
            if self.capture.enabled and self.capture.span_masks:
                self.rope[i] = kwargs.get("position_embeddings") or (
                    args[1] if len(args) > 1 else None)

        return hook

    def _compute(self, i: int, attn: Any) -> Any:
        def hook(_module: Any, _args: Any, _output: Any) -> None:
            import sys

            import torch

            cap = self.capture
            if not (cap.enabled and cap.span_masks) or i not in self.q:
                return
            q, k, (cos, sin) = self.q.pop(i), self.k.pop(i), self.rope.pop(i)
            b, t, _ = k.shape
            d = attn.head_dim
            rows = torch.arange(b, device=q.device)
            pos = cap.positions
            qh = q[rows, pos].view(b, -1, d).unsqueeze(2)  # [B, H, 1, d]
            kh = k.view(b, t, -1, d).transpose(1, 2)  # [B, Hkv, T, d]
            rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            qh, _ = rotate(qh, qh, cos[rows, pos].unsqueeze(1), sin[rows, pos].unsqueeze(1))
            kh, _ = rotate(kh, kh, cos, sin)
            groups = qh.shape[1] // kh.shape[1]
            kh = kh.repeat_interleave(groups, dim=1)  # grouped-query heads share their keys
            scores = (qh.float() @ kh.float().transpose(-1, -2)).squeeze(2) * float(attn.scaling)
            keep = cap.mask.bool()[:, None, :] & (
                torch.arange(t, device=q.device)[None, None, :] <= pos[:, None, None])
            weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)  # [B,H,T]
            for span in self.spans:
                m = cap.span_masks[span].to(weights.device)[:, None, :]
                self.mass.setdefault(span, {})[i] = (weights * m).sum(-1)  # [B, H]

        return hook

    def take(self) -> dict[str, Any]:
        """Per span, the masses of the last batch: [B, L, H] (float32 tensors)."""
        import torch

        out = {span: torch.stack([by_layer[i] for i in sorted(by_layer)], dim=1)
               for span, by_layer in self.mass.items()}
        self.mass = {}
        return out
