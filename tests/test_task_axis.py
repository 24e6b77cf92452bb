"""The task is an axis (docs/method.md §1, §7): MMLU unchanged by it, generated tasks answered by
generation through the same extraction, storage, analysis and sweeps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import REPO, TINY_MODEL, cli, one_line_error, tiny_config
from replandscape.config import load_config
from replandscape.storage import open_activations

REFERENCE = REPO / "tests" / "data" / "mmlu_reference"


def task_config(tmp: Path, task: str = "expression", **sections: dict) -> Path:
    """A tiny config of a generated task, its splits generated into the cache."""
    base: dict[str, dict] = {
        "task": {"name": task, "n_test": 16, "n_dev": 8, "n_train": 32},
        "data": {"source": "builtin:task", "train_splits": ["train"]},
        "prompts": {"shots": [0, 2], "max_shots": 32},
        "analysis": {"maxk": 12, "range_max": 8, "id_scale_index": 1, "density_k": 4,
                     "dendrogram_min_size": 3, "ranks": 1, "per_subject_cap": None},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_config(tmp, **base)


@pytest.mark.slow
def test_mmlu_extraction_is_unchanged_by_the_task_axis(tmp_path: Path) -> None:
    """The MMLU prompts, rows and activations equal those the suite wrote before tasks were an
    axis (stored in tests/data/mmlu_reference, made by the earlier code from config.yaml)."""
    cfg = yaml.safe_load((REFERENCE / "config.yaml").read_text())
    cfg["run"]["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = cli("run", "extract", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for shots in (0, 2):
        ref = np.load(REFERENCE / f"shots{shots}.npz")
        with open_activations(tmp_path / "out" / "activations" / f"shots{shots}.h5") as af:
            assert af.attrs["task"] == "mmlu"
            assert json.loads(af.attrs["label_columns"]) == ["subject", "answer"]
            assert set(af.row_fields) >= {"question_id", "answer", "predicted", "correct",
                                          "n_tokens", "subject", "prompt", "prompt_sha256"}
            assert not {"continuation", "target", "variant"} & set(af.row_fields)
            assert list(af.rows("prompt")) == list(ref["rows/prompt"])
            assert list(af.rows("subject")) == list(ref["rows/subject"])
            for name in ("question_id", "answer", "predicted", "correct", "n_tokens"):
                np.testing.assert_array_equal(af.rows(name), ref[f"rows/{name}"], err_msg=name)
            for name in af.site_names:
                np.testing.assert_allclose(af.site(name), ref[f"sites/{name}"], rtol=1e-6,
                                           atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_generated_task_is_answered_by_generation_and_analysed(tmp_path: Path) -> None:
    from replandscape.tasks.scoring import score_strict, score_substring

    cfg = task_config(tmp_path)
    for stage in ("extract", "analyze"):
        proc = cli("run", stage, str(cfg))
        assert proc.returncode == 0, proc.stderr[-3000:]
    with open_activations(tmp_path / "out" / "activations" / "shots2.h5") as af:
        attrs = af.attrs
        assert attrs["task"] == "expression" and attrs["scoring"] == "strict"
        assert json.loads(attrs["label_columns"]) == ["target", "variant"]
        assert af.n_rows == 32  # 16 items of each variant
        texts, targets = af.rows("continuation"), af.rows("target")
        strict = [score_strict(t, g) for t, g in zip(texts, targets)]
        loose = [score_substring(t, g) for t, g in zip(texts, targets)]
        assert list(af.rows("correct")) == strict
        assert list(af.rows("correct_substring")) == loose
        assert sorted(set(af.rows("variant"))) == ["misleading", "pattern"]
        assert set(af.accuracy["per_subject"]) == {"misleading", "pattern"}
        sub = json.loads(attrs["accuracy_substring"])
        assert sub["micro"] == pytest.approx(np.mean(loose))
        assert "Now you need to calculate" in af.rows("prompt")[0]
    results = json.loads((tmp_path / "out" / "analysis" / "results.json").read_text())
    assert results["schema_version"] == 2
    run = results["runs"]["tiny/expression/shots2"]
    assert run["task"] == "expression" and run["shots"] == 2 and not run["finetuned"]
    assert run["label_columns"] == ["target", "variant"]
    assert run["accuracy"]["scoring"] == "strict" and "substring" in run["accuracy"]
    measured = [r for r in results["rows"] if r["run"] == "tiny/expression/shots2"
                and not r.get("skipped")]
    assert measured and all(set(r["ari"]) == {"target", "variant"} for r in measured)


def test_every_prompt_field_changes_the_extraction_identity(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from replandscape.conditions import Condition
    from replandscape.stages.extract import stage_hash
    from replandscape.tasks import get_task, registry

    cond = Condition("shots2", 2)
    base = load_config(task_config(tmp_path))
    reference = stage_hash(base, cond)
    changed = {
        "prompts.seed": dataclasses.replace(base, prompts=dataclasses.replace(base.prompts,
                                                                                seed=7)),
        "prompts.add_bos": dataclasses.replace(base, prompts=dataclasses.replace(
            base.prompts, add_bos=False)),
        "task.variants": dataclasses.replace(base, task=dataclasses.replace(
            base.task, variants=("pattern",))),
        "task.n_dev": dataclasses.replace(base, task=dataclasses.replace(base.task, n_dev=9)),
        "task.scoring": dataclasses.replace(base, task=dataclasses.replace(
            base.task, scoring="substring")),
        "data.limit": dataclasses.replace(base, data=dataclasses.replace(base.data, limit=5)),
        "extract.pooling": dataclasses.replace(base, extract=dataclasses.replace(
            base.extract, pooling="mean")),
    }
    for what, cfg in changed.items():
        assert stage_hash(cfg, cond) != reference, what
    # the template itself (code, not config): another header gives other prompts
    spec = get_task("expression")
    monkeypatch.setitem(registry.TASKS, "expression", dataclasses.replace(
        spec, header=spec.header + "Answer with a number.\n"))
    assert stage_hash(base, cond) != reference
    # what does not change the rows does not change the identity
    same = dataclasses.replace(base, extract=dataclasses.replace(base.extract, batch_size=3))
    monkeypatch.undo()
    assert stage_hash(same, cond) == reference


@pytest.mark.slow
def test_a_changed_prompt_field_is_never_read_as_the_old_output(tmp_path: Path) -> None:
    cfg = task_config(tmp_path, prompts={"shots": [2]})
    assert cli("run", "extract", str(cfg)).returncode == 0
    line = one_line_error(cli("run", "extract", str(cfg), "prompts.seed=7"))
    assert "different config" in line and "shots2.h5" in line


def test_a_prompt_over_the_context_is_refused_before_any_work(tmp_path: Path) -> None:
    cfg = task_config(tmp_path, model={**TINY_MODEL, "context_length": 120},
                      prompts={"shots": [0, 8]})
    line = one_line_error(cli("run", "extract", str(cfg)))
    assert "at 8 shots" in line and "context of 120" in line and "prompts.shots" in line
    assert not list((tmp_path / "out").glob("activations/*.h5"))


@pytest.mark.parametrize(
    ("override", "words"),
    [("task.name=arithmetic", "unknown task 'arithmetic'"),
     ("task.variants=[pattern,pattern]", "task.variants"),
     ("prompts.shots=[0,20]", "pool of expression/pattern holds 8 items")],
)
def test_bad_task_settings_are_one_line(tmp_path: Path, override: str, words: str) -> None:
    line = one_line_error(cli("validate", str(task_config(tmp_path)), "-o", override))
    assert words in line


def test_sweep_expands_experiments_over_tasks(tmp_path: Path) -> None:
    from replandscape.sweep import load_sweep, plan_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"sweep": {
        "name": "imp", "output_root": str(tmp_path / "root"),
        "experiments": [str(task_config(tmp_path))], "tasks": ["expression", "parity"],
        "finetune": False}}))
    loaded = load_sweep(sweep, ["cluster=local-slurm"])
    assert [e.cfg.task.name for e in loaded.experiments] == ["expression", "parity"]
    assert [e.cfg.run.name for e in loaded.experiments] == ["t-expression", "t-parity"]
    keys = [j.key for j in plan_sweep(loaded)]
    assert keys == ["t-expression/extract", "t-expression/analyze", "t-parity/extract",
                    "t-parity/analyze", "imp/figures"]
    implicit = load_sweep(REPO / "configs" / "sweeps" / "implicit.yaml", ["cluster=example-gpu"])
    combos = {(e.cfg.model.name, e.cfg.task.name) for e in implicit.experiments}
    assert len(combos) == 5 * 6


@pytest.mark.slurm
@pytest.mark.slow
def test_task_sweep_runs_on_the_local_slurm_cluster(slurm_cluster: object, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"sweep": {
        "name": "imp", "output_root": str(tmp_path / "root"),
        "experiments": [str(task_config(tmp_path))], "tasks": ["expression", "boolean"],
        "shots": [0, 2], "finetune": False}}))
    proc = cli("submit", str(sweep), "cluster=local-slurm", "--wait", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "root"
    for task in ("expression", "boolean"):
        results = json.loads((root / f"t-{task}" / "analysis" / "results.json").read_text())
        assert set(results["runs"]) == {f"tiny/{task}/shots0", f"tiny/{task}/shots2"}
    assert (root / "figures" / "icl_vs_ft.md").is_file()


@pytest.mark.slow
def test_generation_on_two_zero3_ranks_equals_one_process(tmp_path: Path) -> None:
    """Under ZeRO-3 every rank decodes in lock step; the continuations and states equal one
    process's."""
    from helpers import launch_ranks

    cfg = task_config(tmp_path, prompts={"shots": [2]})
    one = cli("run", "extract", str(cfg), f"run.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    procs = launch_ranks(2, ["run", "extract", str(cfg), "extract.writer=shards"])
    assert all(p.returncode == 0 for p in procs), procs[0].stderr[-2000:]
    with open_activations(tmp_path / "one" / "activations" / "shots2.h5") as a, \
            open_activations(tmp_path / "out" / "activations" / "shots2.h5") as b:
        assert b.attrs["zero_stage"] == 3 and b.attrs["world_size"] == 2
        assert list(a.rows("continuation")) == list(b.rows("continuation"))
        assert list(a.rows("correct")) == list(b.rows("correct"))
        for name in a.site_names:
            np.testing.assert_allclose(a.site(name), b.site(name), atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_full_fine_tuning_checkpoints_are_extracted_and_match_its_accuracy(tmp_path: Path
                                                                          ) -> None:
    cfg = task_config(tmp_path, finetune={"method": "full", "loss": "all", "samples_per_task": 32,
                                          "effective_batch": 8, "micro_batch": 4, "epochs": 1,
                                          "lr": 1e-3, "checkpoint_every": 2, "max_seq_len": 96},
                      extract={"checkpoints": "all"})
    for stage in ("finetune", "extract-ft", "analyze"):
        proc = cli("run", stage, str(cfg))
        assert proc.returncode == 0, (stage, proc.stderr[-3000:])
    result = json.loads((tmp_path / "out" / "finetune" / "result.json").read_text())
    acts = sorted(p.name for p in (tmp_path / "out" / "activations").glob("ft-*.h5"))
    assert "ft-final.h5" in acts and len(acts) >= 3
    with open_activations(tmp_path / "out" / "activations" / "ft-final.h5") as af:
        assert af.attrs["method"] == "full" and af.attrs["checkpoint"].endswith("checkpoint-final")
        assert af.accuracy["micro"] == pytest.approx(result["test_accuracy"], abs=1e-12)
    runs = json.loads((tmp_path / "out" / "analysis" / "results.json").read_text())["runs"]
    steps = sorted(r["checkpoint_step"] for r in runs.values() if r["finetuned"])
    seen = sorted(r["examples_seen"] for r in runs.values() if r["finetuned"])
    assert seen == [8 * s for s in steps]
    assert all(r["method"] == "full" for r in runs.values() if r["finetuned"])


@pytest.mark.slow
@pytest.mark.parametrize(("family", "targets"), [
    ("tiny-gpt-neox", ["query_key_value", "dense"]),
    ("tiny-gpt-neo", ["q_proj", "v_proj", "out_proj"]),
    ("tiny-qwen2", ["q_proj", "v_proj"]),
])
def test_each_family_extracts_generates_and_fine_tunes(tmp_path: Path, family: str,
                                                       targets: list[str]) -> None:
    model = {**TINY_MODEL, "path": f"builtin:{family}", "family": "other"}
    cfg = task_config(tmp_path, model=model, prompts={"shots": [0, 2]},
                      finetune={"target_modules": targets, "samples_per_task": 32,
                                "effective_batch": 8, "micro_batch": 4, "epochs": 1,
                                "max_seq_len": 96, "loss": "all"})
    for stage in ("extract", "finetune", "extract-ft"):
        proc = cli("run", stage, str(cfg))
        assert proc.returncode == 0, (stage, proc.stderr[-3000:])
    with open_activations(tmp_path / "out" / "activations" / "shots2.h5") as af:
        assert af.site_names[-2:] == ["norm", "logits"] and len(af.site_names) == 3 + 2
        assert len(af.rows("continuation")) == af.n_rows == 32
    assert (tmp_path / "out" / "activations" / "ft-final.h5").is_file()


@pytest.mark.slow
def test_span_representations_equal_a_direct_pooling(tmp_path: Path) -> None:
    """Each named span's max- and mean-pooled state, from the tokenizer's offsets; items carry
    their labels as label.KEY columns."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from replandscape.config import ModelConfig
    from replandscape.evalset import eval_records
    from replandscape.models import resolve_model_path

    cfg = task_config(tmp_path, "reading", prompts={"shots": [1]},
                      extract={"sites": ["residual", "norm"], "spans": ["relevant", "distractor"],
                               "store_dtype": "float32"})
    proc = cli("run", "extract", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r.id: r for r in eval_records(load_config(cfg), 1)}
    path = resolve_model_path(ModelConfig(**TINY_MODEL))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with open_activations(tmp_path / "out" / "activations" / "shots1.h5") as af:
        assert "residual.01@relevant.max" in af.site_names
        assert "norm@distractor.mean" in af.site_names
        assert set(af.rows("label.condition")) <= {f"{q},distractor={d}" for q in
                                                 ("who", "where", "what") for d in (0, 1)}
        has = af.rows("has_span.distractor")
        assert has.any() and not has.all()  # the pattern variant has no distractor
        ids_of_rows = af.rows("question_id")
        for row in (int(np.flatnonzero(has)[0]), int(np.flatnonzero(~has)[0])):
            record = records[int(ids_of_rows[row])]
            assert af.rows("prompt")[row] == record.prompt
            enc = tok(record.prompt, return_offsets_mapping=True)
            with torch.inference_mode():
                hidden = model(input_ids=torch.tensor([enc["input_ids"]]),
                               output_hidden_states=True).hidden_states[1][0]
            a, b = record.spans["relevant"]
            rel = [j for j, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < b and e > a]
            assert rel
            np.testing.assert_allclose(af.site("residual.01@relevant.max")[row],
                                       hidden[rel].max(0).values.numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(af.site("residual.01@relevant.mean")[row],
                                       hidden[rel].mean(0).numpy(), rtol=1e-4, atol=1e-5)
            if not has[row]:
                assert not af.site("residual.01@distractor.mean")[row].any()


def test_a_span_the_task_lacks_is_one_line(tmp_path: Path) -> None:
    cfg = task_config(tmp_path, extract={"spans": ["relevant"]})
    line = one_line_error(cli("run", "extract", str(cfg)))
    assert "task 'expression' declares no span 'relevant'" in line
    assert not list((tmp_path / "out").glob("activations/*.h5"))


@pytest.mark.slow
def test_attention_mass_equals_the_models_own_attention_row(tmp_path: Path) -> None:
    """The kept token's attention to each span, per layer and head, read from its query row only,
    equals the sum of the model's own (eager) attention weights over the span's tokens."""
    import h5py
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from replandscape.config import ModelConfig
    from replandscape.evalset import eval_records
    from replandscape.models import resolve_model_path

    cfg = task_config(tmp_path, "reading", prompts={"shots": [1]},
                      extract={"attention_spans": ["relevant", "distractor"]})
    proc = cli("run", "extract", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = eval_records(load_config(cfg), 1)
    path = resolve_model_path(ModelConfig(**TINY_MODEL))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    with h5py.File(tmp_path / "out" / "attention" / "shots1.h5", "r") as fh:
        assert fh.attrs["kind"] == "replandscape.attention"
        assert "sites" not in fh  # never read by the geometry analysis
        qids = list(fh["rows/question_id"][:])
        relevant, distractor = fh["mass/relevant"][:], fh["mass/distractor"][:]
    assert relevant.shape == (len(records), 3, 4)  # rows x layers x heads
    for record in records[:3] + [r for r in records if "distractor" in r.spans][:2]:
        row = qids.index(record.id)
        enc = tok(record.prompt, return_offsets_mapping=True)
        with torch.inference_mode():
            att = model(input_ids=torch.tensor([enc["input_ids"]]),
                        output_attentions=True).attentions  # per layer [1, H, T, T]
        for span, stored in (("relevant", relevant), ("distractor", distractor)):
            if span not in record.spans:
                assert not stored[row].any()
                continue
            a, b = record.spans[span]
            tokens = [j for j, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < b
                      and e > a]
            direct = np.stack([layer[0, :, -1, tokens].sum(-1).numpy() for layer in att])
            np.testing.assert_allclose(stored[row], direct, rtol=1e-4, atol=1e-6)


def test_task_spans_stand_for_every_span_the_task_declares(tmp_path: Path) -> None:
    cfg = task_config(tmp_path, "regression", prompts={"shots": [0]},
                      extract={"sites": ["norm"], "spans": ["task"], "span_pooling": ["mean"]})
    proc = cli("run", "extract", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open_activations(tmp_path / "out" / "activations" / "shots0.h5") as af:
        assert af.site_names == ["norm", "norm@examples.mean", "norm@query.mean"]
