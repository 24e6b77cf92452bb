"""One GPU check: every CUDA path of the suite, on one GPU, in under ten minutes.

Run it on a machine with one CUDA GPU (the table goes into BENCHMARKS.md)::

    make gpu-check                                          # writes outputs/gpu_check.json too
    .venv/bin/python benchmarks/gpu_check.py --json gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --only padding neighbours

Five independent checks, each in its own process with its own time budget (a check that runs past
its budget is killed and reported as failed; the next one starts on a clean GPU):

``padding``
    bf16 extraction of the same prompts (random tokens, lengths from 1/64 of the width to the
    full width) with left padding, right padding and each prompt alone, through
    ``LastTokenCapture`` at every site kind, ``last`` and ``mean`` pooling, on a random model of
    Llama-3-8B's shape. Per site: the largest absolute difference over the vector's elements,
    divided by the vector's norm, worst prompt. Pass: every value under 2e-2, all finite.
``ft_accuracy``
    A short LoRA fine-tuning of the demo's tiny Llama on the bundled demo data, then the
    extraction of its final adapter, both through the CLI (``replandscape run finetune`` and
    ``run extract-ft`` on ``configs/demo.yaml``, in a temporary output folder, the model in bf16,
    ``extract.device=cuda``). Pass: ``activations/ft-final.h5``'s accuracy equals
    ``finetune/result.json``'s ``test_accuracy`` (same number of correct answers, same
    per-subject accuracies).
``neighbours``
    The exact neighbour engine on the GPU (``exact_knn(device="cuda")``, both strategies, and
    ``compute_geometry`` with ``device="cuda"``) against DADApy's own search and estimators on
    planted clusters (N=4000, D=1024, maxk=1000). Pass: the same neighbour indices, distances to
    1e-10 relative, intrinsic dimensions to 1e-6 relative, the same ADP assignment.
``extract_speed``
    Extraction tokens/s of a randomly initialised model of Llama-3-8B's shape (built on the GPU
    in bf16 with ``from_config``; no weights are read), batches of 8 x 1024 tokens through
    ``LastTokenCapture`` at the project's default sites, vectors copied to the host as the stage
    does. The floor is ``2 x N x tokens / peak``: N counts the weights that multiply every token
    (the blocks' linear maps; the output head sees one token per prompt, the embedding is a
    lookup), and the peak is the bf16 rate of a large matrix product measured in the same
    process (the data-sheet figure is printed too when the device is known). Pass: finite
    outputs and a fraction of the floor of at most 1 (above 1 the peak measurement is wrong).
``finetune_speed``
    LoRA fine-tuning tokens/s and MFU for the same shape: rank, alpha, dropout and target
    modules of the project's defaults (``FinetuneConfig``), bf16 base weights, PEFT and
    ``torch.optim.AdamW`` on the LoRA weights, micro-batch 1 x 1024, the loss on the last
    token's logits (as the stage's answer-token loss). MFU = 6 x N x tokens/s / peak; LoRA's
    backward skips the frozen weights' gradients, so 6N overstates the work: the work done is
    4N + 6 N_lora, reported too. Pass: finite losses, LoRA weights moved, base weights untouched
    and without gradients, and an MFU (4N figure) of at most 1.

Without CUDA every check is reported as ``skipped: no CUDA`` (exit 0). ``--cpu-smoke`` runs all
five on the CPU in reduced size instead (the Llama-3-8B shape cut to 2 layers of width 256, bf16
for the padding check and float32 for the rest, the fine-tuning of ``ft_accuracy`` one epoch,
the neighbour engine through torch on the CPU with N=600), so that the code paths run in the
tests (tests/test_gpu_check.py). Exit status: 1 if a check failed, else 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL_YAML = REPO / "configs" / "model" / "llama3-8b.yaml"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
RESULT_PREFIX = "GPU_CHECK_RESULT "
TOLERANCE_PADDING = 2e-2
TOLERANCE_ID = 1e-6

# Llama-3-8B's published architecture beyond the two numbers configs/model/llama3-8b.yaml holds
# (n_layers and hidden_size are read from that file).
LLAMA3_8B = {"intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256,
             "rope_theta": 500000.0, "rms_eps": 1e-5, "max_positions": 8192}

# Data-sheet dense bf16 tensor-core rates in TFLOP/s (without sparsity), matched on
# torch.cuda.get_device_name(); the first match wins, so the specific names come first.
NOMINAL_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.0),
    (r"\bH200 NVL\b", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100\b", 989.0),
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def nominal_bf16_tflops(device_name: str) -> float | None:
    """The data-sheet dense bf16 rate of a device, or None when the name is not known."""
    for pattern, tflops in NOMINAL_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


# --------------------------------------------------------------------------------------------
# what every check gets


@dataclass(frozen=True)
class Context:
    """Where a check runs: ``smoke`` is the reduced CPU run, else the full run on CUDA."""

    smoke: bool

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"


@dataclass(frozen=True)
class Shape:
    """A Llama model's shape."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
                f"{self.heads} heads / {self.kv_heads} KV, vocab {self.vocab}")


def llama3_8b_shape(smoke: bool) -> tuple[Shape, float | None]:
    """Llama-3-8B's shape (layers and width from its model config), or the smoke run's cut of it
    (2 layers of width 256, the same vocabulary and head grouping); plus the config's size in
    billions of parameters (None for the cut)."""
    import yaml

    data = yaml.safe_load(MODEL_YAML.read_text())
    if smoke:
        return Shape(2, 256, 896, 4, 1, int(LLAMA3_8B["vocab"])), None
    shape = Shape(int(data["n_layers"]), int(data["hidden_size"]), int(LLAMA3_8B["intermediate"]),
                  int(LLAMA3_8B["heads"]), int(LLAMA3_8B["kv_heads"]), int(LLAMA3_8B["vocab"]))
    return shape, float(data["n_params_b"])


def build_llama(shape: Shape, device: str, dtype: Any, seed: int = 0) -> Any:
    """A randomly initialised Llama of ``shape``, built directly on ``device`` in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=int(LLAMA3_8B["max_positions"]),
        rope_parameters={"rope_type": "default", "rope_theta": LLAMA3_8B["rope_theta"]},
        rms_norm_eps=LLAMA3_8B["rms_eps"],
        tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def block_matmul_params(model: Any) -> int:
    """Weights of the decoder blocks' linear maps: the ones that multiply every token."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    total = 0
    for name, module in base.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            weight = getattr(module, "base_layer", module).weight
            total += weight.numel()
    return total


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def free_cuda(device: str) -> None:
    """Hand cached blocks back, so the next phase of a check starts with the memory free."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def measured_peak(ctx: Context) -> dict[str, Any]:
    """FLOP/s of a large matrix product (bf16 on the GPU, float32 on the CPU), best of several."""
    import torch

    device = ctx.device
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    size, per_timing, repeats = (512, 4, 3) if ctx.smoke else (8192, 20, 5)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = a @ b  # warm-up: library load and kernel choice
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(per_timing):
            torch.matmul(a, b, out=c)
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / per_timing)
    del a, b, c
    free_cuda(device)
    out: dict[str, Any] = {"peak_flops": 2.0 * size**3 / best, "peak_matmul_size": size,
                           "peak_dtype": str(dtype).replace("torch.", "")}
    if not ctx.smoke:
        name = torch.cuda.get_device_name()
        nominal = nominal_bf16_tflops(name)
        out["device_name"] = name
        out["nominal_flops"] = None if nominal is None else nominal * 1e12
    return out


def peak_text(peak: dict[str, Any]) -> str:
    text = (f"measured {peak['peak_dtype']} peak {si(peak['peak_flops'], 'FLOP/s')} "
            f"({peak['peak_matmul_size']}^3 product)")
    nominal = peak.get("nominal_flops")
    if nominal:
        text += (f", data sheet {si(nominal, 'FLOP/s')} dense "
                 f"(measured = {peak['peak_flops'] / nominal:.0%} of it)")
    elif "device_name" in peak:
        text += ", data-sheet figure not known for this device"
    return text


def si(value: float, unit: str) -> str:
    """``value`` with a decimal prefix (k, M, G, T) and three significant digits."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def relative_difference(a: Any, b: Any) -> float:
    """Worst row of max |a - b| / |b| (rows are the prompts' vectors)."""
    diff = (a.float() - b.float()).abs().amax(dim=1)
    return float((diff / b.float().norm(dim=1).clamp_min(1e-30)).max())


# --------------------------------------------------------------------------------------------
# 1. bf16 extraction: left against right padding


def check_padding(ctx: Context) -> dict[str, Any]:
    import torch

    from replandscape.capture import LastTokenCapture, collate

    shape, _ = llama3_8b_shape(ctx.smoke)
    device = ctx.device
    model = build_llama(shape, device, torch.bfloat16).eval()
    kinds = ("residual", "input_layernorm", "post_attention_layernorm", "block_output", "norm",
             "logits")
    width, batch = (64, 4) if ctx.smoke else (1024, 8)
    gen = torch.Generator().manual_seed(1)
    # lengths from a sixty-fourth of the width to the full width: most rows are padded, heavily
    lengths = torch.linspace(max(2, width // 64), width, batch).round().long().tolist()
    lengths = lengths[::-1][: batch // 2] + lengths[: batch // 2]  # not sorted: rows mixed
    prompts = [torch.randint(0, shape.vocab, (int(n),), generator=gen).tolist() for n in lengths]
    pad_id = 0
    worst: dict[str, dict[str, float]] = {}
    finite = True
    for pooling in ("last", "mean"):
        capture = LastTokenCapture(model, kinds, pooling)
        got: dict[str, dict[str, Any]] = {}
        with capture, torch.inference_mode():
            for side in ("left", "right"):
                ids, mask = collate(prompts, pad_id, side)
                out, _ = capture.run(ids.to(device), mask.to(device))
                got[side] = {k: v.float().cpu() for k, v in out.items()}
            alone: dict[str, list[Any]] = {}
            for tokens in prompts:
                ids, mask = collate([tokens], pad_id, "left")  # one prompt: no padding at all
                out, _ = capture.run(ids.to(device), mask.to(device))
                for k, v in out.items():
                    alone.setdefault(k, []).append(v.float().cpu())
        got["alone"] = {k: torch.cat(v) for k, v in alone.items()}
        for name in capture.names:
            values = [got[s][name] for s in ("left", "right", "alone")]
            finite = finite and all(bool(torch.isfinite(v).all()) for v in values)
            pairs = {"left_vs_right": relative_difference(values[0], values[1]),
                     "left_vs_alone": relative_difference(values[0], values[2]),
                     "right_vs_alone": relative_difference(values[1], values[2])}
            kind = name.split(".")[0]
            for pair, value in pairs.items():
                key = f"{pooling}/{kind}"
                slot = worst.setdefault(key, {})
                slot[pair] = max(slot.get(pair, 0.0), value)
    lr = {k: v["left_vs_right"] for k, v in worst.items()}
    every = {f"{k}:{p}": v for k, d in worst.items() for p, v in d.items()}
    worst_site, worst_value = max(lr.items(), key=lambda kv: kv[1])
    worst_any_site, worst_any = max(every.items(), key=lambda kv: kv[1])
    passed = finite and worst_any < TOLERANCE_PADDING
    summary = (f"random Llama {shape.layers} x {shape.hidden}; left vs right: worst {worst_value:.2e} ({worst_site}); any pair incl. each prompt "
               f"alone: worst {worst_any:.2e} ({worst_any_site}); tolerance {TOLERANCE_PADDING:g}"
               f"; {batch} prompts of {min(lengths)}-{max(lengths)} tokens, bf16, "
               f"attention {model.config._attn_implementation}"
               + ("" if finite else "; NON-FINITE values"))
    return {"passed": passed, "summary": summary,
            "metrics": {"shape": shape.describe(), "lengths": lengths, "finite": finite,
                        "tolerance": TOLERANCE_PADDING, "worst_left_vs_right": worst_value,
                        "worst_any_pair": worst_any, "per_site_kind": worst}}


# --------------------------------------------------------------------------------------------
# 2. ft-final accuracy against the fine-tuning stage's own test accuracy


def child_env() -> dict[str, str]:
    """The environment of a CLI child: offline, and no rank variables (one process)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def check_ft_accuracy(ctx: Context) -> dict[str, Any]:
    from replandscape.storage import open_activations

    with tempfile.TemporaryDirectory(prefix="gpu-check-ft.") as tmp:
        out = Path(tmp) / "out"
        overrides = [f"run.output_dir={out}", "finetune.log_checkpoints=0",
                     "finetune.eval_every=0"]
        if ctx.smoke:
            overrides += ["extract.device=cpu", "model.cpu_dtype=float32", "finetune.epochs=1",
                          "data.limit=120"]
        else:
            overrides += ["extract.device=cuda", "model.dtype=bfloat16"]
        seconds = {}
        for stage in ("finetune", "extract-ft"):
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "replandscape.cli.main", "run", stage, str(DEMO_CONFIG),
                 *overrides], cwd=REPO, env=child_env(), capture_output=True, text=True)
            seconds[stage] = round(time.perf_counter() - t0, 1)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
                raise RuntimeError(f"replandscape run {stage} exited {proc.returncode}:\n{tail}")
        result = json.loads((out / "finetune" / "result.json").read_text())
        with open_activations(out / "activations" / "ft-final.h5") as af:
            acc = af.accuracy
            stored_dtype = str(af.attrs.get("dtype", "?"))
    n_ft, n_ex = int(result["test_questions"]), int(acc["n"])
    correct_ft = round(float(result["test_accuracy"]) * n_ft)
    correct_ex = round(float(acc["micro"]) * n_ex)
    ft_subjects, ex_subjects = result["test_per_subject"], acc["per_subject"]
    subjects_equal = (set(ft_subjects) == set(ex_subjects)
                      and all(abs(ft_subjects[s] - ex_subjects[s]) < 1e-12 for s in ft_subjects))
    expected_dtype = "float32" if ctx.smoke else "bfloat16"
    passed = (n_ft == n_ex and correct_ft == correct_ex and subjects_equal
              and stored_dtype == expected_dtype)
    summary = (f"extraction {correct_ex}/{n_ex} = {acc['micro']:.4f}, fine-tuning's test "
               f"{correct_ft}/{n_ft} = {result['test_accuracy']:.4f}; per subject "
               f"{'equal' if subjects_equal else 'DIFFERENT'}; extraction dtype {stored_dtype}; "
               f"{result['total_steps']} steps")
    return {"passed": passed, "summary": summary,
            "metrics": {"extract_accuracy": acc["micro"], "extract_n": n_ex,
                        "finetune_test_accuracy": result["test_accuracy"],
                        "finetune_test_questions": n_ft, "per_subject_equal": subjects_equal,
                        "extract_per_subject": ex_subjects, "finetune_per_subject": ft_subjects,
                        "extract_dtype": stored_dtype, "steps": result["total_steps"],
                        "stage_seconds": seconds, "overrides": overrides[1:]}}


# --------------------------------------------------------------------------------------------
# 3. the neighbour engine on the GPU against DADApy


def planted(n: int, d: int, n_clusters: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """Gaussian clusters around random centres plus a common offset (as activations have)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d)).astype(np.float32)
    subject = rng.integers(0, n_clusters, size=n)
    X = centres[subject] + 0.5 * rng.standard_normal((n, d), dtype=np.float32) + 3.0
    return X.astype(np.float32), {"subject": subject, "answer": rng.integers(0, 4, size=n)}


def check_neighbours(ctx: Context) -> dict[str, Any]:
    import dadapy
    import numpy as np

    from replandscape.metrics.geometry import GeometryParams, compute_geometry
    from replandscape.metrics.neighbors import exact_knn

    n, d, clusters, maxk = (600, 64, 6, 100) if ctx.smoke else (4000, 1024, 20, 1000)
    engine_device = "torch" if ctx.smoke else "cuda"
    X, labels = planted(n, d, clusters, seed=0)
    ref = dadapy.Data(coordinates=X.astype(np.float64), maxk=maxk, verbose=False)
    ref.compute_distances(maxk=maxk)
    ref_dist, ref_ind = np.asarray(ref.distances), np.asarray(ref.dist_indices)
    search: dict[str, Any] = {}
    for strategy in ("float32", "float64"):
        info: dict[str, Any] = {}
        dist, ind = exact_knn(X, maxk, device=engine_device, strategy=strategy,  # type: ignore[arg-type]
                              info=info)
        same = bool(np.array_equal(ind, ref_ind))
        dist_rel = float(np.max(np.abs(dist[:, 1:] - ref_dist[:, 1:]) / ref_dist[:, 1:]))
        search[strategy] = {"same_indices": same, "max_rel_distance": dist_rel,
                            "backend": info.get("backend"),
                            "seconds": round(info["seconds"]["total"], 3)}
    slow = compute_geometry(X, labels, GeometryParams(maxk=maxk, engine="dadapy"))
    fast = compute_geometry(X, labels, GeometryParams(maxk=maxk, engine="fast",
                                                      device=engine_device))
    ids_slow = np.r_[slow.id_twonn, slow.id_gride]
    ids_fast = np.r_[fast.id_twonn, fast.id_gride]
    id_rel = float(np.max(np.abs(ids_fast - ids_slow) / np.abs(ids_slow)))
    same_adp = bool(np.array_equal(slow.assignment, fast.assignment))
    backends = {s: r["backend"] for s, r in search.items()}
    expected_backend = "torch-cpu" if ctx.smoke else "torch-cuda"
    passed = (all(r["same_indices"] and r["max_rel_distance"] <= 1e-10 for r in search.values())
              and all(b == expected_backend for b in backends.values())
              and id_rel <= TOLERANCE_ID and same_adp and slow.n_peaks == fast.n_peaks)
    summary = (f"N={n}, D={d}, maxk={maxk}, back end {backends['float32']}: same neighbours "
               f"(float32 / float64 strategies) {search['float32']['same_indices']} / "
               f"{search['float64']['same_indices']}; max relative ID difference {id_rel:.1e} "
               f"(tolerance {TOLERANCE_ID:g}); same ADP assignment {same_adp} "
               f"({fast.n_peaks} peaks); neighbours {fast.seconds['neighbours']:.2f} s vs "
               f"DADApy {slow.seconds['neighbours']:.2f} s")
    return {"passed": passed, "summary": summary,
            "metrics": {"n": n, "d": d, "maxk": maxk, "device": engine_device,
                        "search": search, "backends": backends,
                        "expected_backend": expected_backend, "max_rel_id": id_rel,
                        "same_assignment": same_adp, "n_peaks": [slow.n_peaks, fast.n_peaks],
                        "seconds": {"dadapy": slow.seconds, "fast": fast.seconds}}}


# --------------------------------------------------------------------------------------------
# 4. extraction throughput against the forward pass's floor


def check_extract_speed(ctx: Context) -> dict[str, Any]:
    import torch

    from replandscape.capture import LastTokenCapture
    from replandscape.config import ExtractConfig

    device = ctx.device
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    batch, tokens, warmup, timed = (2, 128, 1, 3) if ctx.smoke else (8, 1024, 2, 10)
    peak = measured_peak(ctx)
    shape, n_params_b = llama3_8b_shape(ctx.smoke)
    t0 = time.perf_counter()
    model = build_llama(shape, device, dtype).eval()
    synchronize(device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    n_matmul = block_matmul_params(model)
    kinds = ExtractConfig().sites
    capture = LastTokenCapture(model, kinds, "last")
    gen = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(0, shape.vocab, (batch, tokens), device=device, generator=gen)
    mask = torch.ones_like(ids)
    finite = True
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with capture, torch.inference_mode():
        for _ in range(warmup):
            capture.run(ids, mask)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(timed):
            out, _ = capture.run(ids, mask)
            host = {k: v.cpu() for k, v in out.items()}  # the stage copies every vector out
            finite = finite and all(bool(torch.isfinite(v).all()) for v in host.values())
        synchronize(device)
        seconds = time.perf_counter() - t0
    memory = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    n_tokens = batch * tokens * timed
    rate = n_tokens / seconds
    floor = 2.0 * n_matmul * n_tokens / peak["peak_flops"]
    fraction = floor / seconds
    floor_all = 2.0 * params * n_tokens / peak["peak_flops"]
    del model, capture, ids, mask, out, host
    free_cuda(device)
    passed = finite and 0.0 < fraction <= 1.0
    summary = (f"random Llama {shape.layers} x {shape.hidden}: {rate:,.0f} tokens/s ({batch} x "
               f"{tokens} tokens, {len(kinds)} site kinds, {str(dtype)[6:]}); {fraction:.0%} of the forward-pass floor 2 x {si(n_matmul, '')} "
               f"block weights x tokens / peak ({floor_all / seconds:.0%} if all "
               f"{si(params, '')} parameters were counted, which overstates the work); "
               f"{peak_text(peak)}"
               + ("" if memory is None else f"; peak memory {memory / 2**30:.1f} GiB")
               + ("" if finite else "; NON-FINITE values")
               + ("" if fraction <= 1.0 else "; ABOVE the measured peak: the peak is wrong"))
    return {"passed": passed, "summary": summary,
            "metrics": {"shape": shape.describe(), "params": params,
                        "config_n_params_b": n_params_b, "block_matmul_params": n_matmul,
                        "batch": batch, "tokens": tokens, "timed_batches": timed,
                        "seconds": seconds, "tokens_per_s": rate, "floor_seconds": floor,
                        "fraction_of_floor": fraction,
                        "fraction_of_floor_all_params": floor_all / seconds,
                        "build_seconds": build_s, "peak_memory_bytes": memory,
                        "sites": list(kinds), **peak}}


# --------------------------------------------------------------------------------------------
# 5. LoRA fine-tuning throughput and MFU


def check_finetune_speed(ctx: Context) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from replandscape.config import FinetuneConfig

    device = ctx.device
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    tokens, warmup, timed = (128, 1, 2) if ctx.smoke else (1024, 3, 10)
    peak = measured_peak(ctx)
    shape, _ = llama3_8b_shape(ctx.smoke)
    f = FinetuneConfig()
    model = build_llama(shape, device, dtype)
    n_matmul = block_matmul_params(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(
        r=f.lora_rank, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout,
        target_modules=list(f.target_modules), bias="none", task_type="CAUSAL_LM"))
    model.train()
    lora = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in lora)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    # a frozen weight to watch: the first block's query projection
    base: Any = model.get_base_model()
    base_weight = base.model.layers[0].self_attn.q_proj.base_layer.weight
    base_before = base_weight.detach().float().sum().item()
    optimizer = torch.optim.AdamW(lora, lr=f.lr, weight_decay=f.weight_decay)
    gen = torch.Generator(device=device).manual_seed(3)
    losses: list[float] = []

    def step(model: Any, optimizer: Any) -> None:
        ids = torch.randint(0, shape.vocab, (1, tokens), device=device, generator=gen)
        target = torch.randint(0, shape.vocab, (1,), device=device, generator=gen)
        # the loss is on the last position only, like the stage's answer-token loss
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1,
                       use_cache=False).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # one host sync a step, as the stage's logging has

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step(model, optimizer)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(timed):
        step(model, optimizer)
    synchronize(device)
    seconds = time.perf_counter() - t0
    memory = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    lora_moved = all(bool(p.detach().abs().sum() > 0) for p in lora_b)  # B starts at zero
    base_untouched = base_weight.grad is None and base_weight.detach().float().sum().item() == base_before
    finite = all(math.isfinite(x) for x in losses)
    rate = tokens * timed / seconds
    mfu6 = 6.0 * (n_matmul + n_lora) * rate / peak["peak_flops"]
    mfu4 = (4.0 * n_matmul + 6.0 * n_lora) * rate / peak["peak_flops"]
    del model, base, optimizer, lora, lora_b, base_weight
    free_cuda(device)
    passed = finite and lora_moved and base_untouched and 0.0 < mfu4 <= 1.0
    summary = (f"random Llama {shape.layers} x {shape.hidden}: {rate:,.0f} tokens/s (micro-batch "
               f"1 x {tokens}, LoRA r={f.lora_rank} on {len(f.target_modules)} projections, "
               f"{si(n_lora, '')} trainable, {str(dtype)[6:]}); "
               f"MFU {mfu6:.1%} with 6N (N = {si(n_matmul, '')} block weights + LoRA), "
               f"{mfu4:.1%} with the work done 4N + 6 N_lora (frozen weights get no gradient); "
               f"{peak_text(peak)}"
               + ("" if memory is None else f"; peak memory {memory / 2**30:.1f} GiB")
               + ("" if finite else "; NON-FINITE loss")
               + ("" if lora_moved else "; LoRA weights did NOT move")
               + ("" if base_untouched else "; base weights CHANGED or got gradients"))
    return {"passed": passed, "summary": summary,
            "metrics": {"shape": shape.describe(), "block_matmul_params": n_matmul,
                        "lora_params": n_lora, "lora_rank": f.lora_rank,
                        "lora_alpha": f.lora_alpha, "lora_dropout": f.lora_dropout,
                        "target_modules": list(f.target_modules), "tokens_per_step": tokens,
                        "timed_steps": timed, "seconds": seconds, "tokens_per_s": rate,
                        "mfu_6n": mfu6, "mfu_4n": mfu4, "losses": losses,
                        "lora_moved": lora_moved, "base_untouched": base_untouched,
                        "peak_memory_bytes": memory, **peak}}


# --------------------------------------------------------------------------------------------
# the driver


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    budget_s: int  # on the GPU
    smoke_budget_s: int  # the reduced CPU run
    fn: Callable[[Context], dict[str, Any]]


CHECKS: tuple[Check, ...] = (
    Check("padding", "bf16 extraction: left vs right padding", 90, 120, check_padding),
    Check("ft_accuracy", "ft-final accuracy = fine-tuning's test accuracy", 180, 240,
          check_ft_accuracy),
    Check("neighbours", "neighbour engine on the GPU vs DADApy", 120, 120, check_neighbours),
    Check("extract_speed", "extraction tokens/s, Llama-3-8B shape", 90, 120, check_extract_speed),
    Check("finetune_speed", "LoRA fine-tuning tokens/s and MFU, Llama-3-8B shape", 120, 120,
          check_finetune_speed),
)


def run_one(name: str, smoke: bool) -> int:
    """Child process: run one check and print its result as the last stdout line."""
    check = next(c for c in CHECKS if c.name == name)
    try:
        result = check.fn(Context(smoke=smoke))
    except Exception:
        traceback.print_exc()
        return 1
    print(RESULT_PREFIX + json.dumps(result, default=float), flush=True)
    return 0


def run_in_child(check: Check, smoke: bool, budget_s: int) -> dict[str, Any]:
    """One check in a fresh process (its own CUDA context, freed at exit), killed with its
    children past the budget."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", check.name]
    if smoke:
        cmd.append("--cpu-smoke")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the check's own process group (CLI children too)
        out, err = proc.communicate()
        return {"status": f"FAIL: over its budget of {budget_s} s", "summary": "",
                "log_tail": err.splitlines()[-20:]}
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = err.splitlines()[-20:]
        last = next((ln for ln in reversed(tail) if ln.strip()), "no output")
        return {"status": f"FAIL: error: {last.strip()[:200]}", "summary": "", "log_tail": tail}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["status"] = "pass" if result.pop("passed") else "FAIL"
    return result


def environment(smoke: bool, cuda: bool) -> dict[str, Any]:
    import torch

    versions: dict[str, str] = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "peft", "deepspeed", "dadapy", "replandscape"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    env: dict[str, Any] = {"mode": "cpu-smoke" if smoke else "gpu", "host": platform.node(),
                           "date": datetime.datetime.now().isoformat(timespec="seconds"),
                           "versions": versions, "cuda_available": cuda}
    if cuda:
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        nominal = nominal_bf16_tflops(env["device"])
        env["nominal_bf16_tflops"] = nominal
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)"
    return env


def markdown(env: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    v = env["versions"]
    head = (f"gpu-check ({env['mode']}) on {env['device']}"
            + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
            + f"; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
            f"dadapy {v['dadapy']}; {env['date']}")
    lines = [head, "", "| # | check | status | result | s (budget) |",
             "|---|---|---|---|---|"]
    for r in rows:
        summary = str(r.get("summary", "")).replace("|", "/")
        lines.append(f"| {r['number']} | {r['title']} | {r['status']} | {summary} | "
                     f"{r['seconds']:.0f} ({r['budget_s']}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every check on the CPU in reduced size (for the tests)")
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS], metavar="CHECK",
                        help=f"run only these checks ({', '.join(c.name for c in CHECKS)})")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return run_one(args.one, args.cpu_smoke)

    import torch

    cuda = torch.cuda.is_available()
    env = environment(args.cpu_smoke, cuda)
    rows: list[dict[str, Any]] = []
    for i, check in enumerate(CHECKS, 1):
        if args.only and check.name not in args.only:
            continue
        budget = check.smoke_budget_s if args.cpu_smoke else check.budget_s
        t0 = time.perf_counter()
        if not args.cpu_smoke and not cuda:
            result: dict[str, Any] = {"status": "skipped: no CUDA", "summary": ""}
        else:
            print(f"[gpu-check] {i}/{len(CHECKS)} {check.name} (budget {budget} s) ...",
                  file=sys.stderr, flush=True)
            result = run_in_child(check, args.cpu_smoke, budget)
        result.update(number=i, name=check.name, title=check.title, budget_s=budget,
                      seconds=round(time.perf_counter() - t0, 1))
        print(f"[gpu-check] {check.name}: {result['status']} ({result['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
        for line in result.get("log_tail", []):
            print(f"    {line}", file=sys.stderr)
        rows.append(result)
    failed = [r["name"] for r in rows if r["status"].startswith("FAIL")]
    print(markdown(env, rows))
    if not cuda and not args.cpu_smoke:
        print("\nno CUDA device: nothing ran (use --cpu-smoke for the reduced CPU run)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {**env, "passed": not failed, "failed": failed, "checks": rows}, indent=1,
            default=float) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
