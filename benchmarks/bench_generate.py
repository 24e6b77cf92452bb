"""Answers by generation: one prompt at a time through ``generate`` against batched greedy decoding.

Both ways run in the same process on the same prompts (expression-task prompts at 8 shots by
default) with a randomly initialised Llama built from ``LlamaConfig`` and the suite's byte-level
tokenizer:

* one at a time: each prompt alone, unpadded, ``model.generate(ids, max_new_tokens=n, do_sample=False)``;
* batched: prompts sorted by length, left-padded batches of ``--batch``,
  ``replandscape.generation.greedy_continue`` (KV cache, explicit positions).

The two are timed batch by batch in turn (one at a time on a batch's prompts, then the batched
way on the same prompts), so a change of machine load hits both alike. The continuations must be
identical token for token (up to each prompt's end-of-sequence token); the run stops with an error
otherwise. The forward-pass floor is 2 x parameters (input embedding excluded: it is a lookup) x
tokens processed (prompt tokens + generated tokens fed back) at the machine's measured
matrix-product rate.

    .venv/bin/python benchmarks/bench_generate.py             # 8 blocks x 512, 64 prompts, batch 16
    .venv/bin/python benchmarks/bench_generate.py --quick     # seconds: 2 blocks x 64, 8 prompts
    .venv/bin/python benchmarks/bench_generate.py --threads 1 # on a CPU shared with other jobs
    .venv/bin/python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --prompts 256
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import matmul_rate  # noqa: E402  (the same floor as the extraction benchmark)


def load_average() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def build_model(layers: int, hidden: int, inter: int, tokenizer: Any, device: str,
                dtype: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         vocab_size=len(tokenizer), max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dt).eval()  # type: ignore[arg-type]  # stub too narrow
    return model


def task_prompts(task: str, n: int, shots: int, seed: int) -> tuple[list[str], int]:
    """``n`` prompts of ``task`` at ``shots`` shots and the task's generation length."""
    from replandscape.tasks import build_task_prompt, generate_task_splits, get_task, shot_pool

    spec = get_task(task)
    per_variant = -(-n // len(spec.variants))
    splits = generate_task_splits(task, n=per_variant, seed=seed, n_dev=max(16, 2 * shots),
                                  n_train=0)
    pool = shot_pool(splits["dev"])
    prompts = [build_task_prompt(item, pool, shots, seed) for item in splits["test"][:n]]
    return prompts, spec.max_new_tokens()


def until_eos(row: list[int], eos: set[int]) -> list[int]:
    """The tokens up to and including the first end-of-sequence token."""
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1408)
    parser.add_argument("--task", default="expression")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run: 2 blocks x 64, 8 prompts at 2 shots, batch 4")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.inter = 2, 64, 128
        args.prompts, args.shots, args.batch = 8, 2, 4

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from replandscape.capture import collate
    from replandscape.generation import eos_token_ids, greedy_continue
    from replandscape.models import build_tokenizer

    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_generate.py",
                                                 *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    model = build_model(args.layers, args.hidden, args.inter, tokenizer, args.device, args.dtype)
    prompts, max_new = task_prompts(args.task, args.prompts, args.shots, args.seed)
    seqs = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # as extraction batches
    batches = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    device = args.device

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def single(i: int) -> list[int]:
        ids = torch.tensor([seqs[i]], device=device)
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False)
        return [int(t) for t in out[0, len(seqs[i]):].tolist()]

    def batched(rows: list[int]) -> list[list[int]]:
        ids, mask = collate([seqs[i] for i in rows], pad, "left")
        new = greedy_continue(model, ids.to(device), mask.to(device), max_new, pad_token_id=pad,
                              eos_token_id=eos)
        return [[int(t) for t in row] for row in new.tolist()]

    load_start = load_average()
    with torch.inference_mode():
        single(order[-1])  # warm-up: allocator, kernels, generate's first-call set-up
        batched(order[-1:])
        sync()
        t_single = t_batched = 0.0
        got_single: dict[int, list[int]] = {}
        got_batched: dict[int, list[int]] = {}
        for rows in batches:
            t0 = time.perf_counter()
            for i in rows:
                got_single[i] = single(i)
            sync()
            t_single += time.perf_counter() - t0
            t0 = time.perf_counter()
            for i, row in zip(rows, batched(rows)):
                got_batched[i] = row
            sync()
            t_batched += time.perf_counter() - t0
    load_end = load_average()

    stops = set(eos)
    mismatched = [i for i in order if until_eos(got_batched[i], stops) != got_single[i]]
    if mismatched:
        i = mismatched[0]
        raise SystemExit(f"continuations differ on {len(mismatched)} of {len(order)} prompts; "
                         f"first: prompt {i}: one at a time {got_single[i]} batched "
                         f"{got_batched[i]}")

    n = len(order)
    prompt_tokens = sum(len(s) for s in seqs)
    generated = sum(len(got_single[i]) for i in order)
    # tokens through the model: every prompt token, every generated token fed back but the last
    processed = prompt_tokens + generated - n
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    rate = matmul_rate(device, args.dtype, size=4096 if device.startswith("cuda") else 2048)
    floor = 2 * params * processed / rate
    width = [len(seqs[i]) for i in order]
    print(f"model: Llama {args.layers} blocks x {args.hidden} (intermediate {args.inter}, "
          f"{params / 1e6:.1f}M parameters without the input embedding, vocab "
          f"{len(tokenizer)}), {device} {args.dtype}, {torch.get_num_threads()} threads")
    print(f"prompts: {n} {args.task} prompts at {args.shots} shots, {min(width)}-{max(width)} "
          f"tokens (mean {prompt_tokens / n:.0f}), {max_new} new tokens each; batches of "
          f"{args.batch}, sorted by length, left padding")
    print(f"load average: {load_start} at the start, {load_end} at the end")
    print(f"matrix-product rate: {rate / 1e9:.0f} GFLOP/s; forward-pass floor "
          f"(2 x params x {processed} tokens): {floor:.2f} s")
    print()
    print("| way | seconds | prompts/s | new tokens/s | tokens/s (prompt + new) | of the floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds in (("one at a time: generate, no padding", t_single),
                          (f"batched: greedy_continue, batch {args.batch}", t_batched)):
        print(f"| {name} | {seconds:.2f} | {n / seconds:.2f} | {generated / seconds:.0f} | "
              f"{processed / seconds:.0f} | {floor / seconds:.0%} |")
    print()
    print(f"speed-up (prompts/s, batched / one at a time): {t_single / t_batched:.2f}x; no way "
          f"runs under the floor, so the most any could gain over one at a time here is "
          f"{t_single / floor:.2f}x")
    print(f"continuations: identical on all {n} prompts")
    print(f"command: {command}")


if __name__ == "__main__":
    main()
