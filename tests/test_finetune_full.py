"""Fine-tuning on generated tasks and full-parameter fine-tuning (docs/method.md §4, §7.6).

The label builder, the schedule and checkpoint options, the task mixture, and real runs of the
tiny builtin Llama on the ``expression`` task: full fine-tuning on 2 gloo ranks under ZeRO-3
against 1 rank, its checkpoint folders loaded with ``from_pretrained``, a killed full run resumed,
LoRA on a generated task. Subprocess workers run this very file
(``python tests/test_finetune_full.py worker SPEC``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from helpers import launch_workers, read_train_log
from replandscape.config import ExperimentConfig, config_from_dict
from replandscape.errors import UserError

HERE = Path(__file__).resolve()
WORKER_TIMEOUT_S = 300
# fixed token sequences whose logits the trained engine and the saved folder must agree on
PROBE = [[0, 17, 33, 5, 81, 9, 44], [0, 120, 7, 7, 300, 2, 64]]


def make_cfg(output_dir: str | Path, **finetune: Any) -> ExperimentConfig:
    """A tiny full fine-tuning config on the generated ``expression`` task."""
    ft: dict[str, Any] = {"method": "full", "loss": "all", "lr": 1e-4, "effective_batch": 8,
                          "micro_batch": 4, "zero_stage": 3, "samples_per_task": 32,
                          "epochs": 2, "max_steps": 6, "schedule": "constant", "warmup_steps": 2,
                          "checkpoint_every": 3, "max_seq_len": 256}
    ft.update(finetune)
    return config_from_dict({
        "run": {"output_dir": str(output_dir), "seed": 3},
        "task": {"name": "expression", "n_test": 20, "n_dev": 16, "n_train": 64},
        "data": {"source": "builtin:task", "train_splits": ["train"]},
        "prompts": {"shots": [0]},
        "analysis": {"maxk": 10, "range_max": 8, "id_scale_index": 0, "density_k": 4},
        "model": {"name": "tiny", "path": "builtin:tiny-llama", "n_layers": 2, "hidden_size": 64,
                  "dtype": "float32"},
        "extract": {"batch_size": 16},
        "finetune": ft,
    })


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    name = "model.safetensors" if (folder / "model.safetensors").is_file() \
        else "adapter_model.safetensors"
    return load_file(str(folder / name))


def launch(spec: dict[str, Any], world: int = 1) -> list[subprocess.CompletedProcess[str]]:
    """Run ``world`` worker processes of this file on ``spec`` and wait for all of them."""
    return launch_workers(HERE, spec, world, WORKER_TIMEOUT_S)


def _ok(procs: list[subprocess.CompletedProcess[str]], code: int = 0) -> None:
    for proc in procs:
        assert proc.returncode == code, proc.stdout[-3000:]


# --------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------


def test_labels_mask_the_prompt_for_answer_and_nothing_for_all() -> None:
    from replandscape.stages.finetune import IGNORE_INDEX, _Sample, build_labels

    ids = [0, 11, 12, 13, 21, 22]  # BOS, three prompt tokens, a two-token answer
    answer = build_labels(ids, 4, "answer")
    assert answer == [IGNORE_INDEX] * 4 + [21, 22]
    every = build_labels(ids, 4, "all")
    assert every == [IGNORE_INDEX, 11, 12, 13, 21, 22]  # nothing predicts the first token
    # the loss needs logits from the position before the first label to the end
    assert _Sample(ids, answer, 1.0, "t").keep == 3
    assert _Sample(ids, every, 1.0, "t").keep == 6
    assert _Sample(ids, answer, 1.0, "t").n_targets == 2
    assert _Sample(ids, every, 1.0, "t").n_targets == 5
    with pytest.raises(ValueError):
        build_labels(ids, 4, "some")


def test_all_token_loss_is_the_token_mean_of_the_shifted_lm_loss() -> None:
    import torch
    import torch.nn.functional as F

    from replandscape.stages.finetune import IGNORE_INDEX, build_labels, masked_token_ce

    torch.manual_seed(0)
    ids = torch.randint(3, 50, (2, 6))
    labels = torch.tensor([build_labels(row.tolist(), 3, "all") for row in ids])
    labels[1, :2] = IGNORE_INDEX  # left padding of the second row
    logits = torch.randn(2, 6, 50)
    ce_sum, counted = masked_token_ce(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                          ignore_index=IGNORE_INDEX)  # the usual causal-LM token mean
    assert counted.tolist() == [5, 4]
    assert float(ce_sum.sum() / counted.sum()) == pytest.approx(float(ref), rel=1e-6)
    answer = torch.tensor([build_labels(row.tolist(), 3, "answer") for row in ids])
    ce_a, counted_a = masked_token_ce(logits[:, -4:], answer)  # logits from position 2 on
    assert counted_a.tolist() == [3, 3]
    full_a, _ = masked_token_ce(logits, answer)
    assert torch.allclose(ce_a, full_a)


def test_cut_keeps_bos_and_the_answer() -> None:
    from replandscape.stages.finetune import cut_to_length

    ids = [0, 1, 2, 3, 4, 5, 6, 7]
    assert cut_to_length(ids, 6, 8, True) == (ids, 6)
    cut, n_prompt = cut_to_length(ids, 6, 5, True)
    assert cut == [0, 4, 5, 6, 7] and n_prompt == 3 and cut[n_prompt:] == [6, 7]
    assert cut_to_length(ids, 6, 4, False) == ([4, 5, 6, 7], 2)


def test_constant_schedule_absolute_warmup_and_checkpoint_steps() -> None:
    from replandscape.stages.finetune import checkpoint_steps, lr_factor, warmup_steps_for

    warm = warmup_steps_for(300, 0.05, 3, absolute=20)
    assert warm == 20 and warmup_steps_for(300, 0.05, 3) == 3
    factors = [lr_factor(s, 300, warm, 0.01, "constant") for s in range(300)]
    assert factors[:2] == pytest.approx([1 / 20, 2 / 20]) and factors[19] == 1.0
    assert set(factors[19:]) == {1.0}
    assert lr_factor(299, 300, warm, 0.01, "cosine") == pytest.approx(0.01)
    assert checkpoint_steps(300, 10, 0)[:3] == [10, 20, 30] and checkpoint_steps(300, 10, 0)[-1] == 300
    assert checkpoint_steps(25, 10, 0) == [10, 20]
    assert checkpoint_steps(1000, 0, 4) == [1, 10, 100, 1000]


def test_new_options_are_checked(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "model": {"path": "builtin:tiny-llama"},
        "analysis": {"maxk": 10, "range_max": 8, "id_scale_index": 0, "density_k": 4}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"finetune": {"tasks": ["expression"]}}, "finetune.tasks"),  # MMLU run
        ({"task": {"name": "expression"}, "finetune": {"tasks": ["nosuch"]}}, "finetune.tasks"),
        ({"finetune": {"checkpoint_every": 10, "log_checkpoints": 3}}, "checkpoint_every"),
        ({"finetune": {"max_steps": 0}}, "max_steps"),
        ({"finetune": {"warmup_steps": -1}}, "warmup_steps"),
        ({"finetune": {"samples_per_task": 0}}, "samples_per_task"),
        ({"finetune": {"method": "qlora"}}, "finetune.method"),
        ({"finetune": {"loss": "prompt"}}, "finetune.loss"),
    ]
    for extra, key in cases:
        with pytest.raises(UserError, match=key) as exc:
            config_from_dict({**base, **extra})
        assert "\n" not in str(exc.value)
    # a full run needs no LoRA settings
    cfg = config_from_dict({**base, "finetune": {"method": "full", "target_modules": []}})
    assert cfg.finetune.method == "full"


def test_stage_hash_of_an_mmlu_lora_run_ignores_the_new_defaults(tmp_path: Path) -> None:
    from replandscape.stages.finetune import stage_hash

    base = {"model": {"path": "builtin:tiny-llama"}, "run": {"output_dir": str(tmp_path)},
            "analysis": {"maxk": 10, "range_max": 8, "id_scale_index": 0, "density_k": 4}}
    plain = config_from_dict(base)
    same = config_from_dict({**base, "finetune": {"schedule": "cosine", "checkpoint_every": 0}})
    other = config_from_dict({**base, "finetune": {"method": "full"}})
    assert stage_hash(plain) == stage_hash(same) != stage_hash(other)
    expression = make_cfg(tmp_path)
    boolean = expression.replace(task=expression.task.__class__(
        **{**expression.task.__dict__, "name": "boolean"}))
    assert stage_hash(expression) != stage_hash(boolean)


def test_the_mixture_holds_samples_per_task_of_each_task(tmp_path: Path) -> None:
    from replandscape.models import load_tokenizer
    from replandscape.stages.finetune import IGNORE_INDEX, Finetuner

    cfg = make_cfg(tmp_path, tasks=["expression", "boolean", "relation"], samples_per_task=20,
                   loss="answer")
    trainer = Finetuner(cfg)
    counts = Counter(item.task for item in trainer.train_items)
    assert counts == {"expression": 20, "boolean": 20, "relation": 20}
    assert len({(i.task, i.text) for i in trainer.train_items}) == 60  # no item twice
    # seeded: the same mixture again, shuffled (not one task after another)
    again = Finetuner(cfg).train_items
    assert [(i.task, i.id) for i in again] == [(i.task, i.id) for i in trainer.train_items]
    assert [i.task for i in trainer.train_items[:20]] != ["expression"] * 20
    assert {i.variant for i in trainer.train_items} == {"pattern", "misleading"}
    # every task of the mixture is scored, both variants, the run's own on extraction's prompts
    from replandscape.evalset import eval_records

    assert list(trainer.task_records) == ["expression", "boolean", "relation"]
    assert trainer.task_records["expression"] == eval_records(cfg, 0)
    assert {r.group for r in trainer.task_records["relation"]} == {"pattern", "misleading"}
    # answer-only samples: the labelled tokens are the answer, without header or shots
    trainer.tokenizer = load_tokenizer(trainer.model_path, padding_side="left")
    samples = trainer._build_samples()
    for item, sample in zip(trainer.train_items, samples):
        labelled = [t for t in sample.labels if t != IGNORE_INDEX]
        assert trainer.tokenizer.decode(labelled).strip() == item.target
        text = trainer.tokenizer.decode(sample.input_ids, skip_special_tokens=True)
        assert text.replace(" ", "") == (item.text + item.target).replace(" ", "")
        assert "Here are some" not in text and "examples" not in text
    one = make_cfg(tmp_path / "one", samples_per_task=500)
    with pytest.raises(UserError, match="holds 128 items") as exc:
        Finetuner(one)
    assert "\n" not in str(exc.value)


def test_other_tasks_need_generated_data(tmp_path: Path) -> None:
    from replandscape.evalset import task_folder
    from replandscape.stages.finetune import Finetuner

    made = task_folder(make_cfg(tmp_path))
    cfg = make_cfg(tmp_path, tasks=["expression", "boolean"])
    cfg = cfg.replace(data=cfg.data.__class__(**{**cfg.data.__dict__, "source": str(made)}))
    with pytest.raises(UserError, match="builtin:task") as exc:
        Finetuner(cfg)
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------------------------
# real runs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_zero3_on_two_ranks_equals_one_rank_and_saves_loadable_models(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    _ok(launch({"mode": "probe", "out": str(tmp_path / "z3"), "finetune": {}}, world=2))
    _ok(launch({"mode": "probe", "out": str(tmp_path / "one"), "finetune": {}}, world=1))
    z3, one = tmp_path / "z3" / "finetune", tmp_path / "one" / "finetune"
    # ZeRO-3 partitioned the weights and the optimizer's float32 copy: no rank held them all
    for rank in range(2):
        info = json.loads((tmp_path / "z3" / f"partition{rank}.json").read_text())
        assert info["zero_stage"] == 3
        assert 0 < info["local_params"] < info["total_params"]
        assert 0 < info["local_optimizer"] < info["total_params"]
    result = json.loads((z3 / "result.json").read_text())
    assert result["method"] == "full" and result["world_size"] == 2 and result["zero_stage"] == 3
    assert result["total_steps"] == 6 and result["loss"] == "all"
    log2, log1 = read_train_log(tmp_path / "z3"), read_train_log(tmp_path / "one")
    assert [r["step"] for r in log2] == [r["step"] for r in log1] == list(range(1, 7))
    for a, b in zip(log2, log1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["lr"] == pytest.approx(b["lr"]) and a["tokens"] == b["tokens"]
    assert [r["lr"] for r in log1] == pytest.approx([5e-5, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4])
    w2, w1 = weights(z3 / "checkpoint-final"), weights(one / "checkpoint-final")
    base = AutoModelForCausalLM.from_pretrained(
        str(Path(json.loads((one / "checkpoint-final" / "finetune.json").read_text())
                 ["base_model"])), dtype=torch.float32).state_dict()
    assert w2.keys() == w1.keys()
    moved = 0.0
    for key in w2:
        assert w2[key].dtype == torch.float32
        assert (w2[key] - w1[key]).abs().max() < 1e-5, key
        moved = max(moved, float((w1[key] - base[key]).abs().max()))
    assert moved > 1e-4  # the weights really trained
    # the index: a checkpoint every 3 steps and the final one, of kind full, examples counted
    index = json.loads((z3 / "checkpoints.json").read_text())
    assert [(c["name"], c["step"], c["kind"], c["examples_seen"]) for c in index["adapters"]] == [
        ("checkpoint-step000003", 3, "full", 24), ("checkpoint-step000006", 6, "full", 48),
        ("checkpoint-final", 6, "full", 48)]
    assert [c["name"] for c in result["checkpoints"]] == [c["name"] for c in index["adapters"]]
    from replandscape.stored import check_model_dir, read_checkpoint_index

    assert {c.kind for c in read_checkpoint_index(z3 / "checkpoints.json").adapters} == {"full"}
    # each folder loads as a model; the final one gives the trained engine's logits
    for name in ("checkpoint-step000003", "checkpoint-final"):
        check_model_dir(z3 / name)
    loaded = AutoModelForCausalLM.from_pretrained(str(z3 / "checkpoint-final"))
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        logits = loaded(torch.tensor(PROBE)).logits.numpy()
    engine_logits = np.load(tmp_path / "z3" / "probe.npy")
    assert np.abs(logits - engine_logits).max() < 1e-5
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(z3 / "checkpoint-final"))
    assert tok.pad_token_id is not None
    # generated-task evaluation: every variant, both rules; test_accuracy as extraction scores
    acc = result["task_accuracy"]
    assert list(acc) == ["expression"] and set(acc["expression"]) == {"pattern", "misleading"}
    for scores in acc["expression"].values():
        assert scores["n"] == 20 and 0 <= scores["strict"] <= scores["substring"] <= 1
    assert result["test_questions"] == 40
    assert result["test_accuracy"] == pytest.approx(
        (acc["expression"]["pattern"]["strict"] + acc["expression"]["misleading"]["strict"]) / 2)
    assert result["val_accuracy"] is None and result["train_tasks"] == ["expression"]
    from replandscape.stages import finetune

    cfg = make_cfg(tmp_path / "z3")
    assert finetune.is_complete(cfg)
    again = finetune.run(cfg)  # a finished run is returned, not trained again
    assert again.task_accuracy == acc and again.method == "full"


@pytest.mark.slow
def test_a_killed_full_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    ft = {"save_every": 2, "checkpoint_every": 2, "eval_every": 4}
    _ok(launch({"mode": "kill", "out": str(tmp_path / "resumed"), "finetune": ft,
                "kill_after_step": 5}, world=2), code=17)
    ds = tmp_path / "resumed" / "finetune" / "ds"
    assert json.loads((ds / "resume.json").read_text())["step"] == 4
    _ok(launch({"mode": "train", "runs": [
        {"out": str(tmp_path / "resumed"), "finetune": ft},
        {"out": str(tmp_path / "straight"), "finetune": ft}]}, world=2))
    resumed = json.loads((tmp_path / "resumed" / "finetune" / "result.json").read_text())
    straight = json.loads((tmp_path / "straight" / "finetune" / "result.json").read_text())
    assert resumed["resumed_from_step"] == 4 and straight["resumed_from_step"] is None
    assert not ds.exists()
    log_r, log_s = read_train_log(tmp_path / "resumed"), read_train_log(tmp_path / "straight")
    assert [r["loss"] for r in log_r] == [r["loss"] for r in log_s]
    for name in ("checkpoint-step000002", "checkpoint-step000006", "checkpoint-final"):
        a = weights(tmp_path / "resumed" / "finetune" / name)
        b = weights(tmp_path / "straight" / "finetune" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].equal(b[key]), (name, key)
    # the evaluation at step 4 happened before the kill and is kept through the resume
    assert [h["step"] for h in resumed["task_history"]] == [4]
    assert resumed["task_history"] == straight["task_history"]
    assert resumed["task_accuracy"] == straight["task_accuracy"]
    assert resumed["checkpoints"] == [
        {**c, "path": c["path"].replace("straight", "resumed")} for c in straight["checkpoints"]]


@pytest.mark.slow
def test_lora_on_a_generated_task(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from replandscape.stages import finetune

    cfg = make_cfg(tmp_path, method="lora", loss="answer", lora_rank=4, lora_alpha=8,
                   lora_dropout=0.0, lr=1e-2, tasks=["expression", "boolean"],
                   samples_per_task=16, checkpoint_every=0, log_checkpoints=2, eval_every=2)
    result = finetune.run(cfg)
    out = tmp_path / "finetune"
    assert result.method == "lora" and result.loss == "answer"
    assert result.train_samples == 32 and result.train_subjects == 2
    assert result.train_tasks == ("expression", "boolean")
    assert result.total_steps == 6  # 4 steps an epoch, 2 epochs, capped at 6
    assert set(result.task_accuracy or {}) == {"expression", "boolean"}
    for task in ("expression", "boolean"):
        assert set((result.task_accuracy or {})[task]) == {"pattern", "misleading"}
    assert [h["step"] for h in result.task_history] == [2, 4]
    index = json.loads((out / "checkpoints.json").read_text())
    assert [(c["name"], c["kind"], c["examples_seen"]) for c in index["adapters"]] == [
        ("adapter-step000001", "lora", 8), ("adapter-step000006", "lora", 48),
        ("adapter-final", "lora", 48)]
    assert result.adapter_dir == str(out / "adapter-final")
    base = AutoModelForCausalLM.from_pretrained(json.loads(
        (out / "adapter-final" / "finetune.json").read_text())["base_model"])
    PeftModel.from_pretrained(base, str(out / "adapter-final"))
    assert finetune.is_complete(cfg)
    stored = finetune.FinetuneResult.from_json(json.loads((out / "result.json").read_text()))
    assert stored == result


# --------------------------------------------------------------------------------------------
# worker entry point (subprocesses)
# --------------------------------------------------------------------------------------------


def _probe(spec: dict[str, Any]) -> None:
    """Train through the trainer's pieces, record how ZeRO partitioned the model, and save the
    trained engine's logits on :data:`PROBE` (rank 0)."""
    import numpy as np
    import torch

    from replandscape.dist import torchdist
    from replandscape.stages.finetune import Finetuner

    cfg = make_cfg(spec["out"], **spec["finetune"])
    trainer = Finetuner(cfg)
    trainer.init_process_group()
    trainer.setup()
    params = list(trainer.engine.module.parameters())
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    local = sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
                for p in params)
    optimizer = trainer.engine.optimizer
    flat = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    local_opt = sum(int(t.numel()) for t in flat) if flat is not None else total
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    Path(spec["out"], f"partition{trainer.info.rank}.json").write_text(json.dumps(
        {"zero_stage": trainer.zero_stage, "total_params": total, "local_params": local,
         "local_optimizer": local_opt}))
    trainer.train()
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine.module(input_ids=torch.tensor(PROBE), use_cache=False).logits
    if trainer.info.is_main:
        np.save(Path(spec["out"]) / "probe.npy", logits.float().numpy())
    torchdist.barrier()
    trainer.close()


def _worker(spec: dict[str, Any]) -> None:
    from replandscape.stages import finetune

    if spec["mode"] == "probe":
        _probe(spec)
        return
    if spec["mode"] == "train":
        for item in spec["runs"]:
            finetune.run(make_cfg(item["out"], **item["finetune"]))
        return
    if spec["mode"] == "kill":
        stop_at = int(spec["kill_after_step"])
        original = finetune.Finetuner.train_step

        def train_step(self: Any, step: int) -> dict[str, float]:
            if step == stop_at:  # steps 1..stop_at are done and logged: die like a SIGKILL
                os._exit(17)
            return original(self, step)

        finetune.Finetuner.train_step = train_step  # type: ignore[method-assign]
        finetune.run(make_cfg(spec["out"], **spec["finetune"]))
        raise SystemExit("the run was not killed")
    raise SystemExit(f"unknown mode {spec['mode']}")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(json.loads(sys.argv[2]))
