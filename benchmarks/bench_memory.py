"""Peak memory of each rank: does any rank hold the whole model?

Builds a randomly initialised Llama of a given shape, saved in several safetensors shards, and a
tiny twin of the same depth; runs base extraction, fine-tuning, fine-tuned extraction, activation
and attribution patching and attention knockout on 2 torch ranks (gloo, DeepSpeed ZeRO-3) for
both, and reports each rank's peak anonymous memory
(``REPLANDSCAPE_PEAK_MEMORY``, :mod:`replandscape.memprobe`) above the tiny twin's run, i.e. what
the model's weights cost the rank. The claim checked: no rank exceeds its share of the weights
(model bytes / ranks) plus the largest shard plus a bounded overhead (the gathered layer, the
prefetch, activations). It also checks that the 2-rank activations equal a 1-rank run's.

    python benchmarks/bench_memory.py                    # 190M parameters (760 MB float32)
    python benchmarks/bench_memory.py --shape small      # 72M parameters (290 MB), the test's
    python benchmarks/bench_memory.py --json OUT.json    # also write the table as JSON

Numbers are for CPU ranks; the same code partitions on GPUs (sizes come from the config).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
SHAPES = {
    # layers, hidden, intermediate, heads, kv heads, shard size
    "default": (12, 1024, 4096, 8, 4, "70MB"),
    "small": (8, 768, 3072, 8, 4, "40MB"),
}
TINY_HIDDEN, TINY_INTER = 64, 128
# what a rank may hold beyond its share and one shard: the gathered layer and prefetch
# (bounded by the hidden size, replandscape.dist.torchdist.zero3_bounded_memory), activations
# and the LoRA training state of these short prompts
OVERHEAD_MIB = 160
STAGES = ("extract", "finetune", "extract-ft", "patch", "knockout")


def build_model(folder: Path, layers: int, hidden: int, inter: int, heads: int, kv: int,
                shard: str) -> dict[str, Any]:
    """A random Llama saved in shards (reused when already built); returns its sizes."""
    info_path = folder / "bench_info.json"
    if info_path.is_file():
        return dict(json.loads(info_path.read_text()))
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from replandscape.models import build_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    tok = build_tokenizer(tmp)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp, max_shard_size=shard)
    shards = sorted(tmp.glob("*.safetensors"))
    info = {"params": n_params, "bytes": n_params * 4, "shards": len(shards),
            "largest_shard_bytes": max(p.stat().st_size for p in shards),
            "layers": layers, "hidden": hidden}
    (tmp / "bench_info.json").write_text(json.dumps(info))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return info


def write_config(path: Path, model_dir: Path, out: Path, layers: int, hidden: int) -> Path:
    cfg = {
        "run": {"name": "mem", "output_dir": str(out)},
        "data": {"source": "builtin:demo-mmlu", "limit": 16},
        "prompts": {"shots": [0]},
        "model": {"name": "mem", "path": str(model_dir), "family": "llama", "n_layers": layers,
                  "hidden_size": hidden, "context_length": 2048, "n_params_b": 0.2, "gpus": 2,
                  "gpus_per_node": 2},
        "extract": {"batch_size": 8, "store_dtype": "float32",
                    "sites": ["input_layernorm", "norm"]},
        "analysis": {"maxk": 10, "range_max": 8, "id_scale_index": 1, "density_k": 4},
        "finetune": {"lora_rank": 4, "lora_alpha": 8, "effective_batch": 8, "micro_batch": 2,
                     "max_seq_len": 256, "samples_per_subject": 4},
        # the base model's circuits (exact and attribution) and a 1-shot knockout with a scan
        "patch": {"shots": [0], "finetuned": False, "limit": 4, "pair_batch": 2},
        "knockout": {"shots": [1], "limit": 4, "batch_size": 2, "scan_last": 2},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(world: int, stage: str, config: Path, probe: Path, *overrides: str) -> None:
    """``replandscape run STAGE CONFIG`` as ``world`` torch ranks, each recording its peak."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HDF5_USE_FILE_LOCKING="FALSE",
                   REPLANDSCAPE_PEAK_MEMORY=str(probe))
        if world == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "replandscape.cli.main", "run", stage, str(config),
             *overrides], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{stage} failed (rank exit {proc.returncode}):\n{err[-3000:]}")


def peaks(probe: Path, stage: str) -> list[int]:
    files = sorted(probe.glob(f"{stage}.rank*.json"))
    return [int(json.loads(f.read_text())["peak_anon_bytes"]) for f in files]


def same_arrays(a: Path, b: Path) -> float:
    """Largest absolute difference between two activation files' sites."""
    import numpy as np

    from replandscape.storage import open_activations

    worst = 0.0
    with open_activations(a) as fa, open_activations(b) as fb:
        assert fa.site_names == fb.site_names
        assert (fa.rows("question_id") == fb.rows("question_id")).all()
        for name in fa.site_names:
            worst = max(worst, float(np.abs(fa.site(name) - fb.site(name)).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where models and outputs go (default: a cache folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    layers, hidden, inter, heads, kv, shard = SHAPES[args.shape]
    cache = Path(os.environ.get("REPLANDSCAPE_CACHE", Path.home() / ".cache" / "replandscape"))
    work = args.workdir or cache / "bench-memory"
    work.mkdir(parents=True, exist_ok=True)
    big = build_model(work / f"model-{args.shape}", layers, hidden, inter, heads, kv, shard)
    build_model(work / f"model-{args.shape}-tiny", layers, TINY_HIDDEN, TINY_INTER, heads, kv,
                "5MB")
    runs = Path(tempfile.mkdtemp(prefix="runs.", dir=work))
    try:
        table = []
        files: dict[str, Path] = {}
        for name, model_dir, width in (("big", work / f"model-{args.shape}", hidden),
                                       ("tiny", work / f"model-{args.shape}-tiny", TINY_HIDDEN)):
            cfg = write_config(runs / f"{name}.yaml", model_dir, runs / name, layers, width)
            probe = runs / f"probe-{name}"
            for stage in STAGES:
                run_ranks(2, stage, cfg, probe)
            files[name] = runs / name / "activations"
            if name == "big":
                # the same conditions on one rank, for equality
                one = runs / "big-one"
                shutil.copytree(runs / name / "finetune", one / "finetune")
                for stage in ("extract", "extract-ft"):
                    run_ranks(1, stage, cfg, runs / "probe-one", f"run.output_dir={one}")
        share = big["bytes"] / 2
        bound = share + big["largest_shard_bytes"] + OVERHEAD_MIB * MIB
        ok = True
        for stage in STAGES:
            big_peaks = peaks(runs / "probe-big", stage)
            tiny_peaks = peaks(runs / "probe-tiny", stage)
            above = [b - t for b, t in zip(big_peaks, tiny_peaks)]
            within = all(a <= bound for a in above)
            ok &= within
            table.append({"stage": stage, "above_tiny_mib": [round(a / MIB) for a in above],
                          "share_mib": round(share / MIB),
                          "whole_model_mib": round(big["bytes"] / MIB),
                          "bound_mib": round(bound / MIB), "within_bound": within})
        diffs = {cond: same_arrays(files["big"] / f"{cond}.h5",
                                   runs / "big-one" / "activations" / f"{cond}.h5")
                 for cond in ("shots0", "ft-final")}
        equal = all(d <= 1e-4 for d in diffs.values())
        ok &= equal
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    print(f"model: {big['params'] / 1e6:.0f}M parameters, {big['bytes'] / MIB:.0f} MiB float32, "
          f"{big['shards']} shards (largest {big['largest_shard_bytes'] / MIB:.0f} MiB); 2 ranks")
    print("| stage | peak above tiny twin, per rank (MiB) | share (MiB) | bound (MiB) | whole "
          "model (MiB) | within |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['stage']} | {', '.join(map(str, row['above_tiny_mib']))} | "
              f"{row['share_mib']} | {row['bound_mib']} | {row['whole_model_mib']} | "
              f"{'yes' if row['within_bound'] else 'NO'} |")
    print("2 ranks against 1 rank, largest |difference|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    if args.json:
        args.json.write_text(json.dumps({"model": big, "stages": table, "max_abs_diff": diffs,
                                         "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
