"""Right at scale: no rank holds the whole model, adapters keep their precision, the fine-tuned
model extracted is the one that was evaluated, and ZeRO-3's forward hooks run (docs/method.md §3).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import PYTHON, REPO, cli, env, free_port, launch_ranks, tiny_config

FT = {"epochs": 1, "effective_batch": 8, "micro_batch": 4, "samples_per_subject": 8,
      "lora_rank": 4, "lora_alpha": 8, "lr": 1e-2}


@pytest.mark.slow
def test_no_rank_holds_the_whole_model(tmp_path: Path) -> None:
    """Extraction, fine-tuning, fine-tuned extraction, patching and knockout of a 290 MB model
    in 8 shards on 2 ZeRO-3 ranks: each rank's peak memory above a tiny twin's stays within its share, one shard
    and a bounded overhead, and the activations equal a one-rank run."""
    out = tmp_path / "memory.json"
    proc = subprocess.run([PYTHON, str(REPO / "benchmarks" / "bench_memory.py"), "--shape",
                           "small", "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          env=env(), capture_output=True, text=True, timeout=1500)
    assert out.is_file(), proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"]["shards"] >= 5 and report["model"]["bytes"] > 250e6
    assert [s["stage"] for s in report["stages"]] == ["extract", "finetune", "extract-ft",
                                                      "patch", "knockout"]
    for stage in report["stages"]:
        assert stage["within_bound"], (stage, proc.stdout)
        if stage["stage"] != "finetune":
            # far from a whole model per rank (training adds activations for the backward pass,
            # which at this small size weigh as much as the weights: the bound covers them)
            assert max(stage["above_tiny_mib"]) < 0.85 * stage["whole_model_mib"], stage
    assert all(d <= 1e-4 for d in report["max_abs_diff"].values()), report["max_abs_diff"]
    assert proc.returncode == 0, proc.stdout


def _tiny_model_and_adapter(tmp_path: Path, scale: float) -> tuple[str, str]:
    """A tiny Llama saved in float32 and a LoRA adapter on it whose update is ``scale`` times a
    random low-rank matrix."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from replandscape.config import ModelConfig
    from replandscape.models import resolve_model_path

    base = resolve_model_path(ModelConfig(name="tiny", path="builtin:tiny-llama", n_layers=3,
                                          hidden_size=32, tiny_intermediate_size=64,
                                          tiny_heads=4, context_length=2048))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                             "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    adapter = tmp_path / "adapter"
    peft.save_pretrained(str(adapter))
    return base, str(adapter)


def _logits(model: object, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()  # type: ignore[operator]


def test_merged_in_float32_equals_unmerged(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from replandscape.loading import apply_adapter

    base, adapter = _tiny_model_and_adapter(tmp_path, 0.05)
    ids = torch.randint(3, 500, (2, 24))
    unmerged = apply_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                             adapter, "unmerged")
    merged = apply_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           adapter, "merged")
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    a, b, c = _logits(unmerged, ids), _logits(merged, ids), _logits(plain, ids)
    assert (a - c).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bfloat16_merge_adds_in_float32_then_casts_once(tmp_path: Path) -> None:
    """Merged: each weight becomes round(W + s B A) with the sum taken in float32 (one rounding,
    not the two of adding a bf16 update to bf16 weights). Unmerged (the default): the adapter
    stays in float32 beside the bf16 base, as in the fine-tuning stage that evaluated it."""
    from transformers import AutoModelForCausalLM

    from replandscape.adapters import read_lora
    from replandscape.loading import apply_adapter

    base, adapter = _tiny_model_and_adapter(tmp_path, 0.01)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = apply_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                           adapter, "merged")
    lora = read_lora(adapter)
    name = "model.layers.0.self_attn.q_proj"
    a, b = lora.pairs()[name]
    delta = lora.scale * (b.float() @ a.float())
    w = plain.get_submodule(name).weight.detach()
    once = (w.float() + delta).to(torch.bfloat16)
    twice = w + delta.to(torch.bfloat16)
    got = merged.get_submodule(name).weight.detach()
    assert torch.equal(got, once)
    assert not torch.equal(once, twice)  # the fixture tells the two apart
    unmerged = apply_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                             adapter, "unmerged")
    layer = unmerged.get_submodule("base_model.model." + name)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert torch.equal(layer.base_layer.weight.detach(), w)  # the base is left as it was


@pytest.mark.slow
def test_ft_final_reproduces_the_fine_tuning_stages_own_accuracy(tmp_path: Path) -> None:
    from replandscape.storage import open_activations

    cfg = tiny_config(tmp_path, finetune=FT, data={"source": "builtin:demo-mmlu", "limit": 60})
    for stage in ("finetune", "extract-ft"):
        proc = cli("run", stage, str(cfg))
        assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "finetune" / "result.json").read_text())
    with open_activations(tmp_path / "out" / "activations" / "ft-final.h5") as af:
        assert af.accuracy["micro"] == pytest.approx(result["test_accuracy"], abs=1e-12)
        assert af.attrs["finetune_test_accuracy"] == pytest.approx(result["test_accuracy"])
        assert af.n_rows == result["test_questions"]
    assert "warning" not in proc.stderr
    # a fine-tuning record that disagrees is flagged when the checkpoint is extracted
    result["test_accuracy"] = 1.0 - result["test_accuracy"] / 2
    (tmp_path / "out" / "finetune" / "result.json").write_text(json.dumps(result))
    (tmp_path / "out" / "activations" / "ft-final.h5").unlink()
    proc = cli("run", "extract-ft", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is not the evaluated one" in proc.stderr


ZERO3_HOOKS = r"""
import sys, torch
from replandscape.config import load_config
from replandscape.dist import torchdist
from replandscape.capture import LastTokenCapture, collate
from replandscape.loading import load_for_extraction
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

cfg = load_config(sys.argv[1])
info = torchdist.init_distributed("cpu")
loaded = load_for_extraction(cfg, "cpu", None)
assert loaded.engine is not None
model = loaded.model
ids, mask = collate([[1, 5, 9, 12], [1, 7, 8]], loaded.tokenizer.pad_token_id, "left")
with LastTokenCapture(model, ("input_layernorm",), "last") as cap, torch.inference_mode():
    for _ in range(2):
        out, logits = cap.run(ids, mask)
        # DeepSpeed's end-of-forward hook released every gathered weight
        held = [n for n, p in model.named_parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
        assert not held, held
print("rank", info.rank, "released", logits.shape[-1], flush=True)
"""


@pytest.mark.slow
def test_zero3_forward_runs_deepspeed_hooks_on_two_ranks(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    script = tmp_path / "hooks.py"
    script.write_text(ZERO3_HOOKS)
    port = str(free_port())
    procs = [subprocess.Popen([PYTHON, str(script), str(cfg)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outs):
        assert proc.returncode == 0, stderr[-3000:]
        assert "released" in stdout


@pytest.mark.slow
def test_fine_tuned_extraction_on_two_zero3_ranks_equals_one_process(tmp_path: Path) -> None:
    from replandscape.storage import open_activations

    cfg = tiny_config(tmp_path, finetune=FT, data={"source": "builtin:demo-mmlu", "limit": 60})
    assert cli("run", "finetune", str(cfg)).returncode == 0
    shutil.copytree(tmp_path / "out" / "finetune", tmp_path / "one" / "finetune")
    one = cli("run", "extract-ft", str(cfg), f"run.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    procs = launch_ranks(2, ["run", "extract-ft", str(cfg), "extract.writer=shards"])
    assert all(p.returncode == 0 for p in procs), procs[0].stderr[-2000:]
    with open_activations(tmp_path / "one" / "activations" / "ft-final.h5") as a, \
            open_activations(tmp_path / "out" / "activations" / "ft-final.h5") as b:
        assert b.attrs["zero_stage"] == 3 and a.attrs["zero_stage"] == 0
        for name in a.site_names:
            np.testing.assert_allclose(a.site(name), b.site(name), atol=2e-5, rtol=1e-4)
        assert (a.rows("predicted") == b.rows("predicted")).all()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
