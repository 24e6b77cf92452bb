"""What reading the attention masses costs over plain extraction (goal: at most 10%).

The same prompts (the reading task at 4 shots), the same random Llama (8 blocks x 512 by default),
extracted in one process twice per round, alternating: plain, and with the kept token's attention
to two named spans read at every layer (`extract.attention_spans`). Both sides write their files
the same way; the ratio of the medians is printed.

    python benchmarks/bench_attention_mass.py [--layers 8 --hidden 512 --items 64 --rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--items", type=int, default=64, help="test items per variant")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from replandscape.conditions import Condition
    from replandscape.config import load_config
    from replandscape.loading import load_for_extraction
    from replandscape.models import build_tokenizer
    from replandscape.stages.extract import extract_condition, prepare_records

    work = Path(tempfile.mkdtemp(prefix="bench-attention."))
    try:
        model_dir = work / "model"
        tok = build_tokenizer(model_dir)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden,
                             intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=8, num_key_value_heads=4,
                             max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        cfg_file = work / "cfg.yaml"
        cfg_file.write_text(yaml.safe_dump({
            "run": {"name": "bench", "output_dir": str(work / "out")},
            "task": {"name": "reading", "n_test": args.items, "n_dev": 16, "n_train": 16},
            "data": {"source": "builtin:task", "train_splits": ["train"]},
            "prompts": {"shots": [args.shots], "max_shots": 32},
            "model": {"name": "bench", "path": str(model_dir), "n_layers": args.layers,
                      "hidden_size": args.hidden, "context_length": 4096, "n_params_b": 0.1},
            "extract": {"batch_size": 16, "store_dtype": "float32"},
            "analysis": {"maxk": 10, "range_max": 8, "id_scale_index": 1, "density_k": 4}}))
        base = load_config(cfg_file)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        loaded = load_for_extraction(base, "cpu", None)
        records = prepare_records(base, args.shots)
        cond = Condition(name=f"shots{args.shots}", shots=args.shots)
        times: dict[str, list[float]] = {"plain": [], "attention": []}
        for r in range(args.rounds):
            for side in ("plain", "attention"):
                spans = ("relevant", "distractor") if side == "attention" else ()
                out = work / f"{side}{r}"
                cfg = dataclasses.replace(
                    base, run=dataclasses.replace(base.run, output_dir=str(out)),
                    extract=dataclasses.replace(base.extract, attention_spans=spans))
                t0 = time.perf_counter()
                extract_condition(cfg, cond, loaded, records)
                times[side].append(time.perf_counter() - t0)
        plain, attn = statistics.median(times["plain"]), statistics.median(times["attention"])
        print(f"model: {args.layers} blocks x {args.hidden}, {len(records)} prompts at "
              f"{args.shots} shots, {args.rounds} rounds (median)")
        print("| extraction | seconds | ratio |")
        print("|---|---|---|")
        print(f"| plain | {plain:.2f} | 1.00 |")
        print(f"| with attention masses (2 spans) | {attn:.2f} | {attn / plain:.3f} |")
        print(f"overhead: {100 * (attn / plain - 1):+.1f}% (goal: at most +10%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
