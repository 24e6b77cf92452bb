"""Extraction: last-token hooks against the naive loop, same inputs, same run.

The naive loop calls ``model(..., output_hidden_states=True)`` and keeps the last token of every
hidden state and of the logits after the fact. The suite's path (``LastTokenCapture``) keeps only the
last token's vector inside each hook and computes logits for that token alone. Each measurement runs
in a fresh process: activation memory = peak resident memory during the batch minus the resident
memory with the weights loaded (the peak is reset through /proc/self/clear_refs after loading).

    .venv/bin/python benchmarks/bench_extract.py                  # 12 and 24 blocks x 1024, 16 x 1000 tokens
    .venv/bin/python benchmarks/bench_extract.py --layers 4 --tokens 200   # quick
    .venv/bin/python benchmarks/bench_extract.py --device cuda --dtype bfloat16 --shape llama3-8b

It also measures the checksums of the activation file on the same shape: the sites of
``--digest-mb`` of rows (input_layernorm of every block, norm, logits) are written by one
``ShardWriter``; closing it digests the rank's rows, ``finalize_shards`` chains the digests and
digests the row labels; the reader's check (``ActivationFile.verify``) is timed too. The digest
cost is reported against the extraction time of the same rows (hooks, one rank).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def measure(method: str, layers: int, hidden: int, inter: int, vocab: int, batch: int,
            tokens: int, device: str, dtype: str, repeats: int) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from replandscape.capture import LastTokenCapture

    torch.manual_seed(0)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
                         vocab_size=vocab, max_position_embeddings=max(2048, tokens + 8),
                         tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dt).eval()
    ids = torch.randint(0, vocab, (batch, tokens), device=device)
    mask = torch.ones_like(ids)
    kinds = ("input_layernorm", "norm", "logits")

    def naive() -> list:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        kept = [h[:, -1].float().cpu() for h in out.hidden_states]
        kept.append(out.logits[:, -1].float().cpu())
        return kept

    def hooks() -> list:
        with LastTokenCapture(model, kinds, "last") as cap:
            got, _ = cap.run(ids, mask)
        return [v.float().cpu() for v in got.values()]

    fn = naive if method == "naive" else hooks
    with torch.inference_mode():
        small = ids[:1, :8]
        model(input_ids=small, attention_mask=torch.ones_like(small))  # allocator warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            base = _rss_kb("VmRSS:") * 1024
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() if device == "cuda"
                else _rss_kb("VmHWM:") * 1024)
    params = sum(p.numel() for p in model.parameters())
    best = min(times)
    return {"method": method, "layers": layers, "seconds": best,
            "tokens_per_s": batch * tokens / best, "activation_mb": (peak - base) / 2**20,
            "params": params}


def measure_digest(layers: int, hidden: int, vocab: int, dtype: str, batch: int,
                   megabytes: int, folder: str) -> dict[str, float]:
    """Seconds per row of the activation-file checksums on this shape (see the module doc)."""
    from pathlib import Path

    import numpy as np

    from replandscape.storage import (
        ShardWriter,
        SiteSpec,
        encode_rows,
        finalize_shards,
        open_activations,
    )

    store = "bfloat16" if dtype == "bfloat16" else "float32"
    specs = [SiteSpec(f"input_layernorm.{i:02d}", hidden, store) for i in range(layers)]
    specs += [SiteSpec("norm", hidden, store), SiteSpec("logits", vocab, store)]
    row_bytes = sum(s.dim for s in specs) * (2 if store == "bfloat16" else 4)
    n = max(batch, (megabytes << 20) // row_bytes)
    rng = np.random.default_rng(0)
    block = {s.name: encode_rows(rng.standard_normal((batch, s.dim), dtype=np.float32), s.dtype)
             for s in specs}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        final = Path(tmp) / "shots0.h5"
        writer = ShardWriter(final, 0, 1, 0, n, specs, "bench")
        for a in range(0, n, batch):
            rows = np.arange(a, min(n, a + batch))
            writer.write(rows, {k: v[: len(rows)] for k, v in block.items()}, {
                "question_id": rows, "answer": rows % 4, "predicted": rows % 4,
                "correct": np.ones(len(rows), bool), "n_tokens": np.full(len(rows), 100)})
        t0 = time.perf_counter()
        writer.close()  # the rank's digest of its rows
        t_close = time.perf_counter() - t0
        header = {"site_names": [s.name for s in specs], "stage_hash": "bench"}
        t0 = time.perf_counter()
        finalize_shards(final, 1, specs, header, [f"s{i % 57}" for i in range(n)],
                        ["Question: " + "x" * 600 + "\nAnswer:"] * n)
        t_final = time.perf_counter() - t0
        t0 = time.perf_counter()
        with open_activations(final) as af:
            af.verify()
        t_verify = time.perf_counter() - t0
    return {"rows": n, "row_mb": row_bytes / 2**20, "close_s": t_close, "finalize_s": t_final,
            "verify_s": t_verify, "gb_per_s": n * row_bytes / t_close / 1e9}


SHAPES = {"llama3-8b": dict(hidden=4096, inter=14336, vocab=128256, layers=32)}


def matmul_rate(device: str, dtype: str, size: int = 4096, repeats: int = 5) -> float:
    """Measured FLOP/s of a large square matrix product (the forward pass's floor)."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    a = torch.randn(size, size, device=device, dtype=dt)
    b = torch.randn(size, size, device=device, dtype=dt)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--digest-mb", type=int, default=256,
                        help="rows of sites written for the checksum measurement, in MiB")
    parser.add_argument("--digest-dir", default=None, help="folder of that file (default: tmp)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shape:
        s = SHAPES[args.shape]
        args.hidden, args.inter, args.vocab, args.layers = (s["hidden"], s["inter"], s["vocab"],
                                                            [s["layers"]])
    if args.one:
        res = measure(args.one[0], int(args.one[1]), args.hidden, args.inter, args.vocab,
                      args.batch, args.tokens, args.device, args.dtype, args.repeats)
        print(json.dumps(res))
        return
    print(f"batch {args.batch} x {args.tokens} tokens, width {args.hidden}, {args.device} "
          f"{args.dtype}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'layers':>6} {'method':>6} {'seconds':>8} {'tokens/s':>9} {'act. MB':>9}")
    rows = {}
    for layers in args.layers:
        for method in ("naive", "hooks"):
            cmd = [sys.executable, __file__, "--one", method, str(layers), *_forward(args)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows[(layers, method)] = res
            print(f"{layers:>6} {method:>6} {res['seconds']:>8.2f} {res['tokens_per_s']:>9.0f} "
                  f"{res['activation_mb']:>9.0f}", flush=True)
    rate = matmul_rate(args.device, args.dtype, size=4096 if args.device == "cuda" else 2048)
    print(f"matrix-product rate: {rate / 1e9:.0f} GFLOP/s ({args.dtype})")
    for layers in args.layers:
        h = rows[(layers, "hooks")]
        floor = 2 * h["params"] * args.batch * args.tokens / rate
        print(f"  {layers} layers, hooks: {floor / h['seconds']:.0%} of the forward-pass floor "
              f"(2 x {h['params'] / 1e6:.0f}M params x tokens / rate = {floor:.2f} s)")
    print("ratios (naive / hooks):")
    for layers in args.layers:
        n, h = rows[(layers, "naive")], rows[(layers, "hooks")]
        print(f"  {layers} layers: activation memory {n['activation_mb'] / max(h['activation_mb'], 1e-9):.2f}x "
              f"lower, throughput {h['tokens_per_s'] / n['tokens_per_s']:.2f}x")
    print("activation-file checksums (crc32), one rank, against the hooks' extraction time:")
    for layers in args.layers:
        d = measure_digest(layers, args.hidden, args.vocab, args.dtype, args.batch,
                           args.digest_mb, args.digest_dir or tempfile.gettempdir())
        per_row = rows[(layers, "hooks")]["seconds"] / args.batch
        cost = (d["close_s"] + d["finalize_s"]) / d["rows"]
        print(f"  {layers} layers: {d['row_mb']:.3f} MiB/row, {d['rows']} rows: rank digest "
              f"{d['close_s']:.2f} s ({d['gb_per_s']:.2f} GB/s), finalisation "
              f"{d['finalize_s']:.2f} s, reader check {d['verify_s']:.2f} s; "
              f"{cost * 1e3:.3f} ms/row against extraction {per_row * 1e3:.1f} ms/row = "
              f"{cost / per_row:.2%}")


def _forward(args: argparse.Namespace) -> list[str]:
    return ["--hidden", str(args.hidden), "--inter", str(args.inter), "--vocab", str(args.vocab),
            "--batch", str(args.batch), "--tokens", str(args.tokens), "--device", args.device,
            "--dtype", args.dtype, "--repeats", str(args.repeats)]


if __name__ == "__main__":
    main()
