"""The LoRA fine-tuning stage: recipe pieces, a real tiny run, 2 gloo ranks, export, resume.

Subprocess workers run this very file (``python tests/test_finetune.py worker SPEC``), so every
multi-process scenario is spelled out here. All runs use the tiny builtin Llama on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import launch_workers, read_train_log
from replandscape.config import ExperimentConfig, config_from_dict
from replandscape.errors import UserError

HERE = Path(__file__).resolve()
WORKER_TIMEOUT_S = 240


def make_cfg(output_dir: str | Path, **finetune: Any) -> ExperimentConfig:
    """A tiny, fast fine-tuning config on the bundled demo data."""
    ft = {"lr": 1e-2, "effective_batch": 8, "micro_batch": 4, "lora_rank": 8, "lora_alpha": 16,
          "lora_dropout": 0.1, "zero_stage": 3}
    ft.update(finetune)
    return config_from_dict({
        "run": {"output_dir": str(output_dir), "seed": 3},
        "data": {"source": "builtin:demo-mmlu", "limit": 24},
        "analysis": {"maxk": 10, "range_max": 8, "id_scale_index": 0, "density_k": 4},
        "model": {"name": "tiny", "path": "builtin:tiny-llama", "n_layers": 2, "hidden_size": 64,
                  "dtype": "float32"},
        "extract": {"batch_size": 16},
        "finetune": ft,
    })


def adapter_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def launch(spec: dict[str, Any], world: int = 1) -> list[subprocess.CompletedProcess[str]]:
    """Run ``world`` worker processes of this file on ``spec`` and wait for all of them."""
    return launch_workers(HERE, spec, world, WORKER_TIMEOUT_S)


# --------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_to_floor() -> None:
    from replandscape.stages.finetune import lr_factor, warmup_steps_for

    total = 100
    warm = warmup_steps_for(total, 0.05, 3)
    assert warm == 3
    factors = [lr_factor(s, total, warm, 0.01) for s in range(total)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[3] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert warmup_steps_for(10, 0.05, 3) == 1


def test_log_spaced_steps_are_geometric_and_end_at_last() -> None:
    from replandscape.stages.finetune import log_spaced_steps

    assert log_spaced_steps(1000, 4) == [1, 10, 100, 1000]
    assert log_spaced_steps(21, 0) == []
    assert log_spaced_steps(21, 1) == [21]
    steps = log_spaced_steps(5, 10)
    assert steps[-1] == 5 and steps == sorted(set(steps))


def test_weights_shards_and_order() -> None:
    from replandscape.stages.finetune import epoch_order, inverse_frequency_weights, rank_shard

    weights = inverse_frequency_weights(["a", "a", "a", "b"])
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    assert weights[0] * 3 == pytest.approx(weights[3])  # each subject carries the same weight
    batch = list(range(8))
    shards = [rank_shard(batch, r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == batch and not set(shards[0]) & set(shards[1])
    assert epoch_order(50, 3, 0) == epoch_order(50, 3, 0) != epoch_order(50, 3, 1)


def test_answer_token_loss_matches_masked_token_cross_entropy() -> None:
    import torch
    import torch.nn.functional as F

    from replandscape.stages.finetune import IGNORE_INDEX, answer_token_loss

    torch.manual_seed(0)
    batch, length, vocab = 3, 7, 11
    logits = torch.randn(batch, length, vocab)
    labels = torch.full((batch, length), IGNORE_INDEX)
    labels[:, -1] = torch.tensor([1, 4, 9])
    weights = torch.tensor([0.5, 1.0, 1.5])
    # reference: the usual shifted causal-LM loss with -100 masking, one token per sample
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(batch, -1).sum(1)
    loss, per_sample = answer_token_loss(logits[:, -2:], labels, weights)
    assert torch.allclose(per_sample, ref)
    assert loss.item() == pytest.approx(float((weights * ref).sum() / batch))
    full, _ = answer_token_loss(logits, labels, weights)  # all positions kept: same value
    assert full.item() == pytest.approx(loss.item())


def test_letter_ids_are_those_of_a_shot() -> None:
    from replandscape.config import ModelConfig
    from replandscape.data import Question
    from replandscape.models import load_tokenizer, resolve_model_path
    from replandscape.prompts import letter_token_ids, shot_block

    path = resolve_model_path(ModelConfig(path="builtin:tiny-llama", n_layers=2, hidden_size=64))
    tok = load_tokenizer(path)
    ids = letter_token_ids(tok, 4)
    q = Question(id=0, subject="law", question="Which?", choices=("a", "b", "c", "d"), answer=2)
    shot = tok.encode(shot_block(q).rstrip("\n"), add_special_tokens=False)
    assert shot[-1] == ids[2]


# --------------------------------------------------------------------------------------------
# bad input, refused before any work
# --------------------------------------------------------------------------------------------


def _assert_one_line(exc: pytest.ExceptionInfo[UserError]) -> None:
    assert "\n" not in str(exc.value) and str(exc.value)


def test_bad_target_modules_lists_the_model_modules(tmp_path: Path) -> None:
    from replandscape.stages import finetune

    cfg = make_cfg(tmp_path, target_modules=["q_proj", "query_key_value"])
    with pytest.raises(UserError, match="query_key_value.*q_proj") as exc:
        finetune.run(cfg)
    _assert_one_line(exc)
    assert "gate_proj" in str(exc.value)
    assert not (tmp_path / "finetune").exists()


def test_effective_batch_must_divide_over_ranks(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from replandscape.stages import finetune

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="does not divide") as exc:
        finetune.run(make_cfg(tmp_path))
    _assert_one_line(exc)


def test_train_splits_must_exist(tmp_path: Path) -> None:
    from replandscape.stages import finetune

    cfg = make_cfg(tmp_path)
    for splits in ((), ("nosuchsplit",)):
        bad = cfg.replace(data=dataclasses.replace(cfg.data, train_splits=splits))
        with pytest.raises(UserError, match="split") as exc:
            finetune.run(bad)
        _assert_one_line(exc)


# --------------------------------------------------------------------------------------------
# a real run in this process: loss goes down; adapter, reload and merge agree with memory
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from replandscape.stages.finetune import LoraFinetuner

    saved_env = dict(os.environ)
    out = tmp_path_factory.mktemp("ft-inproc")
    cfg = make_cfg(out, log_checkpoints=3, eval_every=10)
    trainer = LoraFinetuner(cfg)
    trainer.setup()
    probe = trainer.samples[:48]
    before = trainer.mean_loss(probe)
    result = trainer.train()
    trainer.probe_losses = (before, trainer.mean_loss(probe))
    yield cfg, trainer, result
    trainer.close()
    os.environ.clear()
    os.environ.update(saved_env)


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_the_layout(trained: Any) -> None:
    cfg, trainer, result = trained
    out = cfg.output_dir / "finetune"
    log = read_train_log(cfg.output_dir)
    assert [r["step"] for r in log] == list(range(1, result.total_steps + 1))
    losses = [r["loss"] for r in log]
    assert sum(losses[-4:]) / 4 < sum(losses[:3]) / 3, losses
    before, after = trainer.probe_losses  # same samples, no dropout
    # a random tiny model's logits are bounded (RMSNorm, small lm_head): a modest but sure drop
    assert after < before - 0.3, (before, after)
    assert result.final_loss == losses[-1]
    # dev (5 x 6) + validation (24 x 6); the test split is never read for training
    assert result.train_samples == 174 and result.train_subjects == 6
    assert len(trainer.train_questions) == 174
    assert result.test_questions == 24 and 0 <= result.test_accuracy <= 1
    assert [s for s, _ in result.val_history] == [10, 20, result.total_steps]
    names = [c.name for c in result.checkpoints]
    assert names[-1] == "adapter-final" and f"adapter-step{result.total_steps:06d}" in names
    assert [c.step for c in result.checkpoints] == sorted(c.step for c in result.checkpoints)
    for c in result.checkpoints:
        assert (Path(c.path) / "adapter_config.json").is_file()
    from replandscape.stages import finetune

    listing = json.loads((out / "checkpoints.json").read_text())
    assert listing["config_hash"] == cfg.hash and len(listing["adapters"]) == len(names)
    assert listing["stage_hash"] == finetune.stage_hash(cfg) == result.stage_hash
    assert (out / "config.sha256").read_text().strip() == cfg.hash
    # a finished run returns its stored result without training again, also to a config that
    # differs only where fine-tuning does not look (another analysis, another cluster)
    again = finetune.run(cfg)
    assert again == result
    elsewhere = cfg.replace(analysis=dataclasses.replace(cfg.analysis, z=2.5),
                            cluster=dataclasses.replace(cfg.cluster, timeout_min=7))
    assert elsewhere.hash != cfg.hash
    assert finetune.run(elsewhere) == result
    assert len(read_train_log(cfg.output_dir)) == result.total_steps  # nothing trained again


def _hidden_states(model: Any, texts: list[str], tokenizer: Any) -> Any:
    import torch

    model.eval()
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        out = model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    return torch.stack([h[mask] for h in out.hidden_states])


@pytest.mark.slow
def test_saved_adapter_and_merged_export_reproduce_the_trained_model(trained: Any,
                                                                     tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from replandscape.stages.finetune import export_merged

    cfg, trainer, result = trained
    texts = [trainer.samples[0].subject + " is", "In law, the first option is the term tied to"]
    tok = trainer.tokenizer
    in_memory = _hidden_states(trainer.engine.module, texts, tok)

    base = AutoModelForCausalLM.from_pretrained(trainer.model_path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir)
    assert torch.allclose(_hidden_states(reloaded, texts, tok), in_memory, atol=1e-5)
    # the adapter really moved away from the initialisation (lora_B starts at zero)
    weights = adapter_tensors(Path(result.adapter_dir))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())

    merged_dir = export_merged(cfg, result.adapter_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.float32
    assert torch.allclose(_hidden_states(merged, texts, tok), in_memory, atol=1e-5)


def test_a_foreign_resume_folder_is_refused(trained: Any) -> None:
    from replandscape.stages import finetune

    cfg, _trainer, _result = trained
    other = make_cfg(cfg.output_dir, lr=2e-2, log_checkpoints=3, eval_every=10)
    with pytest.raises(UserError, match="another config") as exc:
        finetune.run(other)
    _assert_one_line(exc)


# --------------------------------------------------------------------------------------------
# several processes
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_ranks_zero2_and_zero3_agree(tmp_path: Path) -> None:
    spec = {"mode": "train", "runs": [
        {"out": str(tmp_path / "z2"), "finetune": {"zero_stage": 2, "lora_dropout": 0.0}},
        {"out": str(tmp_path / "z3"), "finetune": {"zero_stage": 3, "lora_dropout": 0.0}}]}
    procs = launch(spec, world=2)
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:]
    z2, z3 = read_train_log(tmp_path / "z2"), read_train_log(tmp_path / "z3")
    assert len(z2) == len(z3) == 174 // 8
    for a, b in zip(z2, z3):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["tokens"] == b["tokens"]
    result = json.loads((tmp_path / "z3" / "finetune" / "result.json").read_text())
    assert result["world_size"] == 2 and result["test_questions"] == 24
    w2 = adapter_tensors(tmp_path / "z2" / "finetune" / "adapter-final")
    w3 = adapter_tensors(tmp_path / "z3" / "finetune" / "adapter-final")
    assert w2.keys() == w3.keys()
    for key in w2:
        # Adam normalises tiny gradient differences (reduction order) into ~1e-4 steps
        assert (w2[key] - w3[key]).abs().max() < 2e-3, key


@pytest.mark.slow
@pytest.mark.parametrize(("zero_stage", "world"), [(3, 2), (2, 1)], ids=["zero3-2ranks", "zero2-1rank"])
def test_a_killed_run_resumes_to_the_same_adapter(tmp_path: Path, zero_stage: int,
                                                  world: int) -> None:
    ft = {"save_every": 5, "log_checkpoints": 3, "eval_every": 10, "zero_stage": zero_stage}
    killed = launch({"mode": "kill", "out": str(tmp_path / "resumed"), "finetune": ft,
                     "kill_after_step": 12}, world=world)
    for proc in killed:
        assert proc.returncode == 17, proc.stdout[-3000:]
    ds = tmp_path / "resumed" / "finetune" / "ds"
    assert json.loads((ds / "resume.json").read_text())["step"] == 10
    assert len(read_train_log(tmp_path / "resumed")) == 12  # steps 11 and 12 are thrown away later
    _assert_resume_state_is_not_pickled(ds / "step000010", world)
    # the killed run listed adapters, but it is not done: no result.json, the stage's marker
    from replandscape.stages import finetune
    from replandscape.sweep import output_complete

    killed_cfg = make_cfg(tmp_path / "resumed", **ft)
    assert (tmp_path / "resumed" / "finetune" / "checkpoints.json").is_file()
    assert not finetune.is_complete(killed_cfg)
    assert not output_complete("finetune", tmp_path / "resumed" / "finetune" / "result.json",
                               killed_cfg)

    procs = launch({"mode": "train", "runs": [
        {"out": str(tmp_path / "resumed"), "finetune": ft},
        {"out": str(tmp_path / "straight"), "finetune": ft}]}, world=world)
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:]
    resumed = json.loads((tmp_path / "resumed" / "finetune" / "result.json").read_text())
    straight = json.loads((tmp_path / "straight" / "finetune" / "result.json").read_text())
    assert resumed["resumed_from_step"] == 10 and straight["resumed_from_step"] is None
    assert not ds.exists()  # resume state is dropped once the run has finished
    log_r, log_s = read_train_log(tmp_path / "resumed"), read_train_log(tmp_path / "straight")
    assert [r["step"] for r in log_r] == [r["step"] for r in log_s] == list(range(1, 22))
    assert [r["loss"] for r in log_r] == [r["loss"] for r in log_s]
    for name in ("adapter-final", "adapter-step000005"):
        a = adapter_tensors(tmp_path / "resumed" / "finetune" / name)
        b = adapter_tensors(tmp_path / "straight" / "finetune" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].equal(b[key]), (name, key)
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    assert [c["name"] for c in resumed["checkpoints"]] == [c["name"] for c in straight["checkpoints"]]
    assert finetune.is_complete(killed_cfg)


def _assert_resume_state_is_not_pickled(step_dir: Path, world: int) -> None:
    """RNG states are plain arrays; DeepSpeed's files load with weights_only=True; no code."""
    import numpy as np

    from replandscape.stages.finetune import WeightsOnlyLoads

    rng = sorted(step_dir.glob("rng_rank*"))
    assert [p.name for p in rng] == [f"rng_rank{r:05d}.npz" for r in range(world)]
    for path in rng:
        with np.load(path, allow_pickle=False) as z:  # would raise on an object array
            assert z["torch"].dtype == np.uint8 and z["python_state"].shape == (625,)
        with open(path, "rb") as fh:
            assert fh.read(2) == b"PK"  # a zip of .npy files, not a pickle stream (0x80)
    ds_files = sorted(step_dir.glob("*.pt"))
    assert ds_files and not list(step_dir.parent.glob("*.py"))
    loader = WeightsOnlyLoads(None)
    for path in ds_files:
        assert isinstance(loader.load(str(path), map_location="cpu"), dict)


class _CallsOnLoad:
    """Pickles as a call of a function: what a tampered checkpoint would hold."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (os.getpid, ())


def test_deepspeed_checkpoint_loads_refuse_pickled_code(tmp_path: Path) -> None:
    import torch

    from replandscape.stages.finetune import (
        DEEPSPEED_SAFE_GLOBALS,
        WeightsOnlyLoads,
        _deepspeed_safe_globals,
    )

    allowed = [f"{g.__module__}.{g.__qualname__}" for g in _deepspeed_safe_globals()]
    assert allowed == list(DEEPSPEED_SAFE_GLOBALS)  # the documented list is the one in force
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _CallsOnLoad()}, evil)
    with pytest.raises(UserError, match="refused unread") as exc:
        WeightsOnlyLoads(None).load(str(evil), map_location="cpu")
    _assert_one_line(exc)
    assert str(evil) in str(exc.value) and "ds folder" in str(exc.value)
    cut = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(1000)}, cut)
    cut.write_bytes(cut.read_bytes()[:300])
    with pytest.raises(UserError, match="cannot be read") as exc:
        WeightsOnlyLoads(None).load(str(cut))
    _assert_one_line(exc)


def test_rng_state_round_trips_through_plain_arrays(tmp_path: Path) -> None:
    import random

    import torch

    from replandscape.stages.finetune import load_rng_state, save_rng_state

    random.seed(5)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gauss value in the state
    save_rng_state(tmp_path / "rng.npz")
    expected = (random.random(), random.gauss(0, 1), torch.rand(3))
    random.seed(9)
    torch.manual_seed(9)
    load_rng_state(tmp_path / "rng.npz")
    got = (random.random(), random.gauss(0, 1), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    (tmp_path / "rng.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="RNG state cannot be read") as exc:
        load_rng_state(tmp_path / "rng.npz")
    _assert_one_line(exc)


# --------------------------------------------------------------------------------------------
# worker entry point (subprocesses)
# --------------------------------------------------------------------------------------------


def _worker(spec: dict[str, Any]) -> None:
    from replandscape.stages import finetune

    if spec["mode"] == "train":
        for item in spec["runs"]:
            finetune.run(make_cfg(item["out"], **item["finetune"]))
        return
    if spec["mode"] == "kill":
        stop_at = int(spec["kill_after_step"])
        original = finetune.LoraFinetuner.train_step

        def train_step(self: Any, step: int) -> dict[str, float]:
            if step == stop_at:  # steps 1..stop_at are done and logged: die like a SIGKILL
                os._exit(17)
            return original(self, step)

        finetune.LoraFinetuner.train_step = train_step  # type: ignore[method-assign]
        finetune.run(make_cfg(spec["out"], **spec["finetune"]))
        raise SystemExit("the run was not killed")
    raise SystemExit(f"unknown mode {spec['mode']}")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(json.loads(sys.argv[2]))
