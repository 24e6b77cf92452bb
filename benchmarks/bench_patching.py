"""Activation patching: the cached last-token path against one full forward per component, and
against attribution patching, in the same run on the same pairs.

A randomly initialised Llama (``LlamaConfig``, 12 blocks x 16 heads by default) patches every
head and every MLP output of every block at the last position, corrupted into clean, on pairs of
random token prompts of equal length (each pair differs in one token; the answers are the tokens
the corruption raises and lowers most, so the normalised effects are well conditioned):

* ``last_token``: ``replandscape.patching.activation_patching`` (default method): the clean
  prompt minus its last token once with the key/value cache, then one batch of single-token
  queries per block (all of that block's components);
* ``full``: the same function with ``method="full"``: one forward of the whole clean prompt per
  component (what hook-based tools do). It is slow, so it is timed on ``--baseline-pairs`` pairs
  and ``--baseline-layers`` blocks (every block's components cost the same forward) and
  extrapolated linearly to all pairs and blocks; the run says so in its table;
* ``attribution``: ``attribution_patching`` on all pairs (corrupted forward, clean forward,
  one backward).

The effects of ``last_token`` and ``full`` must agree to ``--tol`` (1e-5) on the pairs and blocks
both ran, or the run exits 1. Cost is also given in forward-pass equivalents per pair: seconds per
pair over the median time of one plain forward of a prompt.

The projection to Llama-3-8B and -70B counts components (heads + MLPs), passes per pair
(full: one forward per component + 2; last token: 2 forwards + (heads + 1) x blocks single-token
queries through all blocks, each 1/tokens of a prompt forward's matrix products; attribution:
2 forwards + a backward of 2 forward-equivalents) and converts them to hours on ``--nodes`` nodes
of ``--gpus-per-node`` GPUs at an ASSUMED throughput: ``--gpu-tflops`` peak x ``--mfu`` over
2 x parameters FLOPs per token (it is not measured here).

    .venv/bin/python benchmarks/bench_patching.py                 # hidden 256, 1000 tokens, 8 pairs
    .venv/bin/python benchmarks/bench_patching.py --full-size     # hidden 1024, 1000 tokens, 64 pairs
    .venv/bin/python benchmarks/bench_patching.py --quick         # seconds: 4 blocks, 64 tokens
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from typing import Any

import numpy as np


def load_average() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


INIT = 0.08


def build_model(layers: int, heads: int, hidden: int, vocab: int, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # a wider initialisation than the default 0.02 makes logit differences of order one, so the
    # normalised effects compared to 1e-5 are not dominated by float32 rounding
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=4096, initializer_range=INIT,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    return model


def make_pairs(model: Any, n: int, tokens: int, vocab: int, device: str,
               corrupt_back: int = 0) -> list[Any]:
    import torch

    from replandscape.patching import PromptPair

    g = torch.Generator().manual_seed(1)
    pairs = []
    for i in range(n):
        clean = torch.randint(2, vocab, (tokens,), generator=g)
        corrupted = clean.clone()
        # the pairs differ in the last token (--corrupt-back K: in one of the K tokens before it
        # for every other pair). In a random model a corruption further back moves the last
        # logits by ~1% of their size, so the normalised effects become ratios of numbers near
        # float32 rounding and a 1e-5 comparison of two float32 paths would test the rounding,
        # not the method (the tests check such pairs on tiny models)
        back = int(torch.randint(1, corrupt_back + 1, (1,), generator=g)) if corrupt_back else 0
        at = tokens - 1 - (back if i % 2 else 0)
        corrupted[at] = 2 + (clean[at] - 2 + 1 + int(torch.randint(0, vocab - 3, (1,),
                                                                    generator=g))) % (vocab - 2)
        with torch.inference_mode():
            logits = model(torch.stack([clean, corrupted]).to(device)).logits[:, -1].float()
        good = int((logits[0] - logits[1]).argmax())
        bad = int((logits[1] - logits[0]).argmax())
        pairs.append(PromptPair(clean.tolist(), corrupted.tolist(), good, bad))
    return pairs


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def forward_seconds(model: Any, pair: Any, device: str, repeats: int = 3) -> float:
    import torch

    ids = torch.as_tensor([list(pair.clean_ids)], device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def projection(args: argparse.Namespace, attribution_passes: float) -> list[str]:
    """Rows of the 8B / 70B table from component counts and an assumed GPU throughput."""
    models = [("Llama-3-8B", 32, 32, 8.03e9), ("Llama-3-70B", 80, 64, 70.6e9)]
    gpus = args.nodes * args.gpus_per_node
    rows = []
    runs = args.proj_conditions * args.proj_tasks * args.proj_pairs
    for name, blocks, heads, params in models:
        components = blocks * (heads + 1)
        # the cached path: the prefix and the source run, then one single-token query per
        # component (heads, MLP, residual: heads + 2 per block). At these widths a batch holds
        # one block (pair_batch 4 x heads + 2 rows > max_queries 256), so the query of block l
        # runs blocks l..L-1 only, the ones below replayed: (L + 1) / 2 blocks of L on average
        queries = (heads + 2) * blocks * ((blocks + 1) / 2) / blocks
        passes = {"full": components + 2.0,
                  "last_token": 2.0 + queries / args.proj_tokens,
                  "attribution": attribution_passes}
        tokens_per_s = gpus * args.gpu_tflops * 1e12 * args.mfu / (2 * params)
        hours = {k: runs * v * args.proj_tokens / tokens_per_s / 3600 for k, v in passes.items()}
        rows.append(f"| {name} | {blocks} x {heads} | {components} | {passes['full']:.0f} | "
                    f"{passes['last_token']:.2f} | {passes['attribution']:.2f} | "
                    f"{tokens_per_s:,.0f} | {hours['full']:,.1f} | {hours['last_token']:,.2f} | "
                    f"{hours['attribution']:,.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--baseline-pairs", type=int, default=2)
    parser.add_argument("--baseline-layers", type=int, default=4,
                        help="blocks the full path is timed on, spread over depth")
    parser.add_argument("--full-size", action="store_true",
                        help="the issue's shape: hidden 1024, 1000-token prompts, 64 pairs "
                             "(full path on 1 pair x 2 blocks)")
    parser.add_argument("--quick", action="store_true", help="4 blocks x 8 heads, 64 tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--corrupt-back", type=int, default=0,
                        help="every other pair differs in one of the K tokens before the last")
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--gpu-tflops", type=float, default=989.0,
                        help="assumed dense bf16 peak per GPU (H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of peak")
    parser.add_argument("--proj-conditions", type=int, default=5,
                        help="conditions per model (0, 1, 2, 5 shots and ft-final)")
    parser.add_argument("--proj-tasks", type=int, default=7, help="MMLU and six generated tasks")
    parser.add_argument("--proj-pairs", type=int, default=1000, help="pairs per condition x task")
    parser.add_argument("--proj-tokens", type=int, default=1000, help="mean prompt tokens")
    args = parser.parse_args(argv)
    given = set(sys.argv[1:] if argv is None else argv)
    if args.full_size:
        args.hidden, args.tokens = 1024, 1000
        args.pairs = args.pairs if "--pairs" in given else 64
        args.baseline_pairs, args.baseline_layers = 1, 2
    if args.quick:
        args.layers, args.heads, args.hidden, args.tokens, args.pairs = 4, 8, 128, 64, 4
        args.baseline_pairs, args.baseline_layers = 2, 2

    import torch

    from replandscape.patching import activation_patching, attribution_patching

    if args.threads:
        torch.set_num_threads(args.threads)
    components = ("heads", "mlp")
    model = build_model(args.layers, args.heads, args.hidden, args.vocab, args.device)
    pairs = make_pairs(model, args.pairs, args.tokens, args.vocab, args.device, args.corrupt_back)
    # warm-up: first calls pay for allocations and kernel selection, outside every timing
    activation_patching(model, pairs[:1], components=components, layers=[0])
    attribution_patching(model, pairs[:1], components=components)
    t_fwd = forward_seconds(model, pairs[0], args.device, repeats=5)

    t0 = time.perf_counter()
    fast = activation_patching(model, pairs, components=components)
    t_fast = time.perf_counter() - t0

    t0 = time.perf_counter()
    attr = attribution_patching(model, pairs, components=components)
    t_attr = time.perf_counter() - t0

    n_base = min(args.baseline_pairs, args.pairs)
    n_layers = min(args.baseline_layers, args.layers)
    blocks = sorted({round(i * (args.layers - 1) / max(1, n_layers - 1)) for i in range(n_layers)})
    t0 = time.perf_counter()
    full = activation_patching(model, pairs[:n_base], method="full", components=components,
                               layers=blocks)
    t_full_measured = time.perf_counter() - t0
    t_full = t_full_measured * (args.pairs / n_base) * (args.layers / len(blocks))

    diff = max(float(np.abs(fast.heads[:n_base][:, blocks] - full.heads[:, blocks]).max()),
               float(np.abs(fast.mlp[:n_base][:, blocks] - full.mlp[:, blocks]).max()))
    diff_ld = max(float(np.abs(fast.heads_ld[:n_base][:, blocks] - full.heads_ld[:, blocks]).max()),
                  float(np.abs(fast.mlp_ld[:n_base][:, blocks] - full.mlp_ld[:, blocks]).max()))
    denominators = float(np.abs(fast.ld_source - fast.ld_base).min())
    rho = statistics.mean(
        spearman(np.concatenate([fast.heads[n].ravel(), fast.mlp[n]]),
                 np.concatenate([attr.heads[n].ravel(), attr.mlp[n]]))
        for n in range(args.pairs))

    n_comp = args.layers * (args.heads + 1)
    per_pair = {"full": t_full / args.pairs, "last_token": t_fast / args.pairs,
                "attribution": t_attr / args.pairs}
    fe = {k: v / t_fwd for k, v in per_pair.items()}
    cmd = shlex.join([sys.executable, *sys.argv])
    print(f"command: {cmd}")
    print(f"load average: {load_average()}; torch threads {torch.get_num_threads()}; "
          f"device {args.device}")
    print(f"model: Llama {args.layers} blocks x {args.heads} heads, hidden {args.hidden}, "
          f"vocab {args.vocab}; {args.pairs} pairs of {args.tokens} tokens; {n_comp} components "
          f"(heads + MLPs) per pair; one plain forward {t_fwd * 1e3:.1f} ms")
    print(f"full path measured on {n_base} pair(s) x blocks {blocks} in {t_full_measured:.1f} s, "
          f"extrapolated linearly to {args.pairs} pairs x {args.layers} blocks")
    print()
    print("| method | seconds (all pairs) | s / pair | forward-equivalents / pair | "
          "speed-up of last_token |")
    print("|---|---|---|---|---|")
    for name, seconds in (("full (extrapolated)", t_full), ("attribution", t_attr),
                          ("last_token", t_fast)):
        key = name.split()[0]
        print(f"| {name} | {seconds:.2f} | {per_pair[key]:.3f} | {fe[key]:.2f} | "
              f"{seconds / t_fast:.1f}x |")
    print()
    print(f"max |effect(last_token) - effect(full)| = {diff:.2e} (tolerance {args.tol:g}); "
          f"max |LD difference| = {diff_ld:.2e}; smallest |LD_corrupted - LD_clean| = "
          f"{denominators:.3f}, largest |LD_clean| = {float(np.abs(fast.ld_base).max()):.2f}")
    print(f"attribution vs exact: mean Spearman rank correlation over pairs = {rho:.3f}")
    print()
    print(f"Projection (ASSUMED {args.gpu_tflops:g} TFLOP/s peak x MFU {args.mfu:g} per GPU, "
          f"{args.nodes} nodes x {args.gpus_per_node} GPUs; {args.proj_conditions} conditions x "
          f"{args.proj_tasks} tasks x {args.proj_pairs} pairs of {args.proj_tokens} tokens; "
          f"attribution at the measured {fe['attribution']:.2f} forward-equivalents):")
    print()
    print("| model | blocks x heads | components | passes/pair full | passes/pair last_token | "
          "passes/pair attribution | tokens/s (all GPUs) | hours full | hours last_token | "
          "hours attribution |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in projection(args, fe["attribution"]):
        print(row)
    if not diff <= args.tol:
        print(f"FAIL: the cached path differs from the full path by {diff:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
