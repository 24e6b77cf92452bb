"""Training throughput of the fine-tuning stage's DeepSpeed path against plain PEFT + transformers.

Both loops train the same random Llama (builtin:tiny-llama of the given shape) with the same LoRA
(docs/method.md §4.1: rank 64, alpha 16, dropout 0.1, all projections), the same micro-batches (the stage's
own data order), the same answer-token loss, torch AdamW, gradient clipping and the warm-up +
cosine schedule; one CPU process. Only optimiser steps are timed (no evaluation, no checkpoints);
the first ``--warmup`` steps of each loop are not counted, and the loops take turns in\n``--rounds`` rounds so that the machine's load hits them alike.

Run::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/bench_finetune.py

Prints tokens/s of each path and the ratio DeepSpeed / plain (above 1: DeepSpeed faster).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from replandscape.config import ExperimentConfig, config_from_dict


def make_cfg(args: argparse.Namespace, zero_stage: int, output_dir: str) -> ExperimentConfig:
    return config_from_dict({
        "run": {"output_dir": output_dir, "seed": 0},
        "data": {"source": "builtin:demo-mmlu", "limit": 16},
        "analysis": {"maxk": 10, "range_max": 8, "id_scale_index": 0, "density_k": 4},
        "model": {"name": "bench", "path": "builtin:tiny-llama", "n_layers": args.layers,
                  "hidden_size": args.hidden, "tiny_intermediate_size": args.hidden * 11 // 4,
                  "tiny_heads": max(1, args.hidden // 64), "dtype": "float32"},
        "finetune": {"effective_batch": args.effective_batch, "micro_batch": args.micro_batch,
                     "zero_stage": zero_stage},
    })


class Stepper:
    """One training loop, stepped a few optimiser steps at a time, timing only the steps."""

    def __init__(self, name: str, step_fn: Any, close: Any = None) -> None:
        self.name, self.step_fn, self.close = name, step_fn, close
        self.next_step = 0
        self.tokens, self.seconds = 0, 0.0

    def run(self, steps: int, count: bool = True) -> None:
        for _ in range(steps):
            t0 = time.perf_counter()
            n = self.step_fn(self.next_step)
            dt = time.perf_counter() - t0
            self.next_step += 1
            if count:
                self.tokens += n
                self.seconds += dt

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def deepspeed_stepper(cfg: ExperimentConfig) -> Stepper:
    from replandscape.stages.finetune import LoraFinetuner

    trainer = LoraFinetuner(cfg)
    trainer.setup()
    label = f"DeepSpeed (zero_stage {cfg.finetune.zero_stage}, runs ZeRO-{trainer.zero_stage})"
    return Stepper(label,
                   lambda i: trainer.train_step(i % trainer.total_steps)["tokens"], trainer.close)


def plain_stepper(cfg: ExperimentConfig) -> Stepper:
    """The same training with PEFT + transformers + torch AdamW and no DeepSpeed."""
    import torch
    from peft import LoraConfig, get_peft_model

    from replandscape.models import load_causal_lm, load_tokenizer
    from replandscape.stages.finetune import (
        LoraFinetuner,
        answer_token_loss,
        collate_left,
        letter_token_ids,
        lr_factor,
        warmup_steps_for,
    )

    f = cfg.finetune
    data = LoraFinetuner(cfg)  # used for its samples and data order only
    data.tokenizer = load_tokenizer(data.model_path, padding_side="left")
    data.letter_ids = letter_token_ids(data.tokenizer, cfg.data.num_choices)
    data.samples = data._build_samples()
    model = load_causal_lm(data.model_path, dtype="float32")
    model.config.use_cache = False
    torch.manual_seed(cfg.run.seed)
    model = get_peft_model(model, LoraConfig(
        r=f.lora_rank, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout,
        target_modules=list(f.target_modules), bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=f.lr, weight_decay=f.weight_decay)
    warm = warmup_steps_for(data.total_steps, f.warmup_ratio, f.warmup_max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, data.total_steps, warm, f.min_lr_ratio))
    pad = data.tokenizer.pad_token_id

    def step(i: int) -> int:
        tokens = 0
        for micro in data.micro_batches(i % data.total_steps):
            batch = collate_left([s.input_ids for s in micro], [s.labels for s in micro], pad)
            labels = batch.pop("labels")
            weights = torch.tensor([s.weight for s in micro])
            logits = model(**batch, logits_to_keep=2, use_cache=False).logits
            loss, _ = answer_token_loss(logits, labels, weights)
            (loss / data.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, f.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    return Stepper("plain PEFT + torch AdamW", step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--effective-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[3])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    import torch

    print(f"model: random Llama {args.layers} layers x {args.hidden}, LoRA r=64 on all "
          f"projections; batch {args.effective_batch} = micro {args.micro_batch} x accumulation; "
          f"{args.steps} timed steps after {args.warmup}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="bench-ft.") as tmp:
        plain = plain_stepper(make_cfg(args, 3, tmp))
        loops = [plain] + [deepspeed_stepper(make_cfg(args, z, os.path.join(tmp, f"z{z}")))
                           for z in args.zero_stages]
        for loop in loops:
            loop.run(args.warmup, count=False)
        # interleaved rounds, so a change in the machine's load hits every loop alike
        for _ in range(args.rounds):
            for loop in loops:
                loop.run(args.steps // args.rounds)
        for loop in loops:
            ratio = "" if loop is plain else f"  ratio DeepSpeed/plain = {loop.rate / plain.rate:.2f}"
            print(f"{loop.name:26s}: {loop.rate:9.1f} tokens/s  ({loop.tokens} tokens in "
                  f"{loop.seconds:.2f} s){ratio}")
        for loop in loops:
            if loop.close is not None:
                loop.close()


if __name__ == "__main__":
    main()
