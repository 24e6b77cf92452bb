"""Extraction: the kept vectors are the model's, on any padding side and any number of ranks."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import PYTHON, REPO, TINY_MODEL, cli, env, launch_ranks, one_line_error, tiny_config
from replandscape.capture import LastTokenCapture, collate, plan_batches
from replandscape.config import ModelConfig, load_config
from replandscape.models import load_causal_lm, load_tokenizer, resolve_model_path
from replandscape.prompts import letter_token_ids
from replandscape.stages.extract import prepare_records
from replandscape.storage import open_activations, shard_path, split_rows


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    path = resolve_model_path(ModelConfig(**{k: v for k, v in TINY_MODEL.items()}))
    return load_causal_lm(path), load_tokenizer(path)


def _batch(tokenizer: object, texts: list[str], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [tokenizer(t)["input_ids"] for t in texts]  # type: ignore[operator]
    return collate(seqs, tokenizer.pad_token_id, side)  # type: ignore[attr-defined]


TEXTS = ["The following are multiple choice questions about law.\n\nA short one\nAnswer:",
         "Answer:",
         "In music, the second option is the term tied to violin. Which term fits opera?\n"
         "A. cello\nB. violin\nC. piano\nD. tempo\nAnswer:"]


def test_left_and_right_padding_give_the_same_vectors(tiny: tuple[object, object]) -> None:
    model, tok = tiny
    kinds = ("input_layernorm", "post_attention_layernorm", "residual", "block_output", "norm",
             "logits")
    outs = {}
    for side in ("left", "right"):
        ids, mask = _batch(tok, TEXTS, side)
        with LastTokenCapture(model, kinds, "last") as cap, torch.inference_mode():
            outs[side] = {k: v.clone() for k, v in cap.run(ids, mask)[0].items()}
    assert set(outs["left"]) == set(outs["right"]) and len(outs["left"]) == 4 * 3 + 2
    for name in outs["left"]:
        torch.testing.assert_close(outs["left"][name], outs["right"][name], atol=2e-5, rtol=1e-4)


def test_hooks_equal_the_models_own_hidden_states(tiny: tuple[object, object]) -> None:
    model, tok = tiny
    ids, mask = _batch(tok, TEXTS, "left")
    kinds = ("input_layernorm", "residual", "norm", "logits")
    with LastTokenCapture(model, kinds, "last") as cap, torch.inference_mode():
        got, logits = cap.run(ids, mask)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,  # type: ignore[operator]
                    output_hidden_states=True)
    hs = ref.hidden_states
    blocks = model.model.layers  # type: ignore[attr-defined]
    for i, block in enumerate(blocks):
        torch.testing.assert_close(got[f"residual.{i:02d}"], hs[i][:, -1], atol=1e-5, rtol=1e-5)
        expected = block.input_layernorm(hs[i])[:, -1]
        torch.testing.assert_close(got[f"input_layernorm.{i:02d}"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["norm"], hs[-1][:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref.logits[:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["logits"], ref.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_mean_pooling_averages_real_tokens_only(tiny: tuple[object, object]) -> None:
    model, tok = tiny
    outs = {}
    for side in ("left", "right"):
        ids, mask = _batch(tok, TEXTS, side)
        with LastTokenCapture(model, ("residual",), "mean") as cap, torch.inference_mode():
            outs[side] = cap.run(ids, mask)[0]["residual.01"].clone()
    torch.testing.assert_close(outs["left"], outs["right"], atol=2e-5, rtol=1e-4)
    single = _batch(tok, TEXTS[2:], "left")
    with LastTokenCapture(model, ("residual",), "mean") as cap, torch.inference_mode():
        alone = cap.run(*single)[0]["residual.01"]
    torch.testing.assert_close(outs["left"][2], alone[0], atol=2e-5, rtol=1e-4)


def test_answer_letters_are_tokenised_as_in_a_shot(tiny: tuple[object, object]) -> None:
    _, tok = tiny
    ids = letter_token_ids(tok, 4)
    shot = tok("Answer: C", add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    assert shot[-1] == ids[2]
    assert len(set(ids)) == 4


@pytest.mark.parametrize("world", [1, 2, 3, 5, 7])
def test_every_row_is_assigned_once(world: int) -> None:
    rng = np.random.default_rng(world)
    lengths = rng.integers(10, 500, size=101)
    blocks = split_rows(lengths.tolist(), world)
    rows = np.concatenate([np.arange(a, b) for a, b in blocks])
    assert np.array_equal(rows, np.arange(101))
    batches = plan_batches(np.arange(101), lengths, 8, 2000)
    flat = np.sort(np.concatenate(batches))
    assert np.array_equal(flat, np.arange(101))
    for b in batches:
        assert len(b) <= 8 and (len(b) == 1 or lengths[b].max() * len(b) <= 2000)


def _site_arrays(path: Path) -> dict[str, np.ndarray]:
    with open_activations(path) as af:
        out = {n: af.site(n) for n in af.site_names}
        out["predicted"] = af.rows("predicted")
        out["question_id"] = af.rows("question_id")
        out["prompt"] = af.rows("prompt")
    return out


@pytest.mark.slow
def test_two_zero3_ranks_equal_a_single_process(tmp_path: Path) -> None:
    cfg_path = tiny_config(tmp_path, prompts={"shots": [1]})
    single = cli("run", "extract", str(cfg_path), f"run.output_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr
    procs = launch_ranks(2, ["run", "extract", str(cfg_path), f"run.output_dir={tmp_path / 'two'}",
                             "extract.zero_stage=3"])
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    a = _site_arrays(tmp_path / "one" / "activations" / "shots1.h5")
    b = _site_arrays(tmp_path / "two" / "activations" / "shots1.h5")
    assert a.keys() == b.keys()
    assert np.array_equal(a["question_id"], b["question_id"])
    assert list(a["prompt"]) == list(b["prompt"])
    for name in a:
        if name in ("question_id", "prompt"):
            continue
        if name == "predicted":
            assert np.array_equal(a[name], b[name])
        else:
            np.testing.assert_allclose(a[name], b[name], atol=2e-5, rtol=1e-4, err_msg=name)
    with open_activations(tmp_path / "two" / "activations" / "shots1.h5") as af:
        assert af.attrs["world_size"] == 2 and af.n_rows == 48
        assert af.attrs["zero_stage"] == 3  # the model was partitioned, not replicated


@pytest.mark.mpi
@pytest.mark.slow
def test_mpiexec_ranks_write_one_file_through_mpi_io(tmp_path: Path) -> None:
    import h5py

    if not h5py.get_config().mpi:
        pytest.skip("h5py was built without MPI")
    cfg_path = tiny_config(tmp_path, prompts={"shots": [1]})
    single = cli("run", "extract", str(cfg_path), f"run.output_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr
    cmd = ["mpiexec", "-n", "2", "--oversubscribe", "--bind-to", "none", PYTHON, "-m",
           "replandscape.cli.main", "run", "extract", str(cfg_path),
           f"run.output_dir={tmp_path / 'mpi'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "mpi" / "activations" / "shots1.h5"
    with open_activations(final) as af:
        assert af.attrs["writer"] == "mpio" and af.attrs["world_size"] == 2
        assert af.attrs["zero_stage"] == 3
    assert not (tmp_path / "mpi" / "activations" / "shots1.parts").exists()
    a = _site_arrays(tmp_path / "one" / "activations" / "shots1.h5")
    b = _site_arrays(final)
    for name in a:
        if name == "prompt":
            assert list(a[name]) == list(b[name])
        else:
            np.testing.assert_allclose(a[name], b[name], atol=2e-5, rtol=1e-4, err_msg=name)


def test_prompts_do_not_depend_on_ranks_and_are_stored(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path, prompts={"shots": [2]}))
    records = prepare_records(cfg, 2)
    proc = cli("run", "extract", str(tiny_config(tmp_path, prompts={"shots": [2]})))
    assert proc.returncode == 0, proc.stderr
    with open_activations(tmp_path / "out" / "activations" / "shots2.h5") as af:
        assert list(af.rows("prompt")) == [r.prompt for r in records]
        assert list(af.rows("question_id")) == [r.id for r in records]
        sha = af.rows("prompt_sha256")
        assert sha[0].decode() == hashlib.sha256(records[0].prompt.encode()).hexdigest()
        acc = af.accuracy
        assert set(acc) >= {"micro", "macro", "per_subject"}
        correct = af.rows("correct")
        assert acc["micro"] == pytest.approx(correct.mean())
        assert af.attrs["config_hash"] and af.attrs["code_version"]
        assert af.site_names[-2:] == ["norm", "logits"] and len(af.site_names) == 3 + 2


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_repeating_rows(tmp_path: Path) -> None:
    cfg_path = tiny_config(tmp_path, data={"source": "builtin:demo-mmlu", "limit": 120},
                           prompts={"shots": [5]}, extract={"batch_size": 2, "store_dtype": "float32"})
    ref = cli("run", "extract", str(cfg_path), f"run.output_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([PYTHON, "-m", "replandscape.cli.main", "run", "extract",
                             str(cfg_path)], env=env(REPLANDSCAPE_BATCH_LINES="1"),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    deadline = time.monotonic() + 300
    seen = 0
    assert proc.stderr is not None
    for line in proc.stderr:
        if "wrote batch" in line:
            seen += 1
            if seen == 5:
                os.kill(proc.pid, signal.SIGKILL)
                break
        assert time.monotonic() < deadline
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    final = tmp_path / "out" / "activations" / "shots5.h5"
    assert not final.exists() and shard_path(final, 0).exists()
    again = cli("run", "extract", str(cfg_path), REPLANDSCAPE_BATCH_LINES="1")
    assert again.returncode == 0, again.stderr
    rerun = again.stderr.count("wrote batch")
    assert 0 < rerun <= 60 - 5 + 1  # only the missing batches (plus at most the one cut short)
    a = _site_arrays(tmp_path / "ref" / "activations" / "shots5.h5")
    b = _site_arrays(final)
    for name in a:
        if name == "prompt":
            assert list(a[name]) == list(b[name])
        else:
            np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)


def test_existing_output_with_another_config_is_refused_untouched(tmp_path: Path) -> None:
    cfg_path = tiny_config(tmp_path, prompts={"shots": [0]})
    assert cli("run", "extract", str(cfg_path)).returncode == 0
    final = tmp_path / "out" / "activations" / "shots0.h5"
    before = final.read_bytes()
    line = one_line_error(cli("run", "extract", str(cfg_path), "prompts.seed=7",
                              "data.limit=40"))
    assert "different config" in line and str(final) in line
    assert final.read_bytes() == before
    # the same config again is a no-op that keeps the file
    assert cli("run", "extract", str(cfg_path)).returncode == 0
    assert final.read_bytes() == before


def test_missing_or_damaged_shards_are_refused(tmp_path: Path) -> None:
    cfg_path = tiny_config(tmp_path, prompts={"shots": [0]})
    procs = launch_ranks(2, ["run", "extract", str(cfg_path), "extract.zero_stage=0"])
    for p in procs:
        assert p.returncode == 0, p.stderr[-2000:]
    final = tmp_path / "out" / "activations" / "shots0.h5"
    with open_activations(final) as af:
        assert af.attrs["writer"] == "shards"
    shard = shard_path(final, 1)
    saved = shard.read_bytes()
    shard.unlink()
    from replandscape.errors import UserError

    with pytest.raises(UserError, match="missing"), open_activations(final):
        pass
    shard.write_bytes(saved[: len(saved) // 3])
    with pytest.raises(UserError, match="damaged"), open_activations(final):
        pass
    final.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(UserError, match="truncated or corrupt"), open_activations(final):
        pass


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    cfg_path = tiny_config(tmp_path, prompts={"shots": [5]})
    line = one_line_error(cli("run", "extract", str(cfg_path), "model.context_length=64"))
    assert "over the model's context" in line
    line = one_line_error(cli("run", "extract", str(cfg_path), "model.path=/nonexistent/model"))
    assert "model.path" in line
    bad_data = tmp_path / "bad"
    bad_data.mkdir()
    (bad_data / "test.jsonl").write_text('{"question": "q", "choices": ["a","b","c","d"]}\n')
    (bad_data / "dev.jsonl").write_text('{"question": "q", "choices": ["a","b","c","d"]}\n')
    line = one_line_error(cli("run", "extract", str(cfg_path), f"data.source={bad_data}"))
    assert "lacks field" in line and "answer" in line
    assert not (tmp_path / "out" / "activations" / "shots5.h5").exists()


def test_mistral_family_extracts(tmp_path: Path) -> None:
    model = dict(TINY_MODEL, path="builtin:tiny-mistral", family="mistral", name="tiny-mistral")
    cfg_path = tiny_config(tmp_path, model=model, prompts={"shots": [0]})
    proc = cli("run", "extract", str(cfg_path))
    assert proc.returncode == 0, proc.stderr
    with open_activations(tmp_path / "out" / "activations" / "shots0.h5") as af:
        assert af.attrs["model_name"] == "tiny-mistral"
        assert af.site("input_layernorm.02").shape == (48, 32)


def test_bfloat16_model_is_stored_as_bfloat16_exactly(tmp_path: Path) -> None:
    """The GPU path's dtype handling, on CPU: a bf16 model's vectors are kept as bf16 bits (HDF5
    has no bf16) and read back widened exactly."""
    model = dict(TINY_MODEL, cpu_dtype="bfloat16")
    runs = {}
    for store in ("model", "float32"):
        cfg_path = tiny_config(tmp_path, f"{store}.yaml", model=model, prompts={"shots": [0]},
                               extract={"store_dtype": store},
                               run={"name": "t", "output_dir": str(tmp_path / store)})
        proc = cli("run", "extract", str(cfg_path))
        assert proc.returncode == 0, proc.stderr
        with open_activations(tmp_path / store / "activations" / "shots0.h5") as af:
            assert af.attrs["dtype"] == "bfloat16"
            raw = af.fh["sites"]["norm"]
            runs[store] = (raw.dtype, raw.attrs["dtype"], af.site("norm"))
    assert runs["model"][:2] == (np.dtype(np.uint16), "bfloat16")
    assert runs["float32"][:2] == (np.dtype(np.float32), "float32")
    # bf16 values widened to float32 are exact, so both files hold the same numbers
    assert np.array_equal(runs["model"][2], runs["float32"][2])
