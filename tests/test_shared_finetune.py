"""One fine-tuning per (model, mixture), shared by a sweep's task experiments (docs/method.md
§7.6): the stage identity, the plan, the own-task accuracy and a real shared run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import cli, one_line_error, tiny_config
from replandscape.config import ExperimentConfig, config_from_dict, load_config
from replandscape.stages.finetune import stage_hash

MIXTURE = ["expression", "relation"]


def make_cfg(task: str = "expression", **finetune: Any) -> ExperimentConfig:
    """A small generated-task config (not run: identities and validation only)."""
    ft: dict[str, Any] = {"method": "lora", "loss": "all", "tasks": list(MIXTURE),
                          "samples_per_task": 16, "effective_batch": 8, "micro_batch": 4,
                          "max_steps": 2, "lora_rank": 4}
    ft.update(finetune)
    return config_from_dict({
        "run": {"output_dir": f"/tmp/out-{task}", "seed": 3},
        "task": {"name": task, "n_test": 8, "n_dev": 8, "n_train": 32},
        "data": {"source": "builtin:task", "train_splits": ["train"]},
        "prompts": {"shots": [0]},
        "model": {"name": "tiny", "path": "builtin:tiny-llama", "n_layers": 2, "hidden_size": 64,
                  "dtype": "float32"},
        "finetune": ft,
    })


def previous_stage_hash(cfg: ExperimentConfig) -> str:
    """The fine-tuning identity as computed before finetune.output_dir and eval_tasks existed
    (the config without them): what every stored run's stage.sha256 holds."""
    d = cfg.to_dict()
    assert d["finetune"].pop("output_dir") is None and d["finetune"].pop("eval_tasks") == []
    later = {"method": "lora", "loss": "answer", "tasks": [], "samples_per_task": 1000,
             "train_variants": ["pattern", "misleading"], "schedule": "cosine",
             "warmup_steps": None, "max_steps": None, "checkpoint_every": 0}
    finetune = {k: v for k, v in d["finetune"].items() if not (k in later and v == later[k])}
    key = {"data": d["data"],
           "prompts": {"seed": d["prompts"]["seed"], "add_bos": d["prompts"]["add_bos"]},
           "model": d["model"], "finetune": finetune, "seed": d["run"]["seed"]}
    if cfg.task.name != "mmlu":
        key["task"] = d["task"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# identity
# --------------------------------------------------------------------------------------------


def test_task_experiments_scoring_the_axis_share_one_identity() -> None:
    axis = ["expression", "parity"]
    a = make_cfg("expression", eval_tasks=axis)
    b = make_cfg("parity", eval_tasks=axis, output_dir="/elsewhere/finetune")
    assert stage_hash(a) == stage_hash(b)
    # the run's own task no longer enters it, but what the run trains on and scores does
    assert stage_hash(a) != previous_stage_hash(make_cfg("expression"))
    assert stage_hash(b) != previous_stage_hash(make_cfg("parity"))
    for other in (make_cfg("parity", eval_tasks=["expression", "boolean"]),
                  make_cfg("parity", eval_tasks=axis, tasks=["expression", "boolean"]),
                  make_cfg("parity", eval_tasks=axis, max_steps=3),
                  dataclasses.replace(b, task=dataclasses.replace(b.task, n_test=9)),
                  dataclasses.replace(b, run=dataclasses.replace(b.run, seed=4))):
        assert stage_hash(other) != stage_hash(a)
    # the order eval_tasks are listed in, and where the folder is, are no part of it
    assert stage_hash(make_cfg("parity", eval_tasks=axis[::-1])) == stage_hash(a)


@pytest.mark.parametrize("cfg", [
    make_cfg("expression", tasks=[]),                      # the run's own task alone
    make_cfg("parity", tasks=[]),
    make_cfg("parity"),                                    # a mixture, eval_tasks not set
    config_from_dict({"model": {"name": "m", "path": "builtin:tiny-llama"},
                      "data": {"source": "builtin:demo-mmlu"}}),  # MMLU
], ids=["own-expression", "own-parity", "mixture", "mmlu"])
def test_runs_without_the_options_keep_their_identity(cfg: ExperimentConfig) -> None:
    assert stage_hash(cfg) == previous_stage_hash(cfg)
    moved = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune,
                                                                  output_dir="/shared/ft"))
    assert stage_hash(moved) == stage_hash(cfg)


def test_own_task_without_a_mixture_keeps_its_name_in_the_identity() -> None:
    """Without a mixture the run trains on its own task: two tasks are two runs."""
    a = make_cfg("expression", tasks=[], eval_tasks=["parity"])
    b = make_cfg("parity", tasks=[], eval_tasks=["expression"])
    assert stage_hash(a) != stage_hash(b)


@pytest.mark.parametrize(("override", "words"), [
    ("finetune.eval_tasks=[nosuch]", "finetune.eval_tasks[0]"),
    ("finetune.eval_tasks=[parity,parity]", "listed twice"),
    ("finetune.output_dir=' '", "finetune.output_dir"),
])
def test_bad_options_are_one_line(tmp_path: Path, override: str, words: str) -> None:
    line = one_line_error(cli("validate", str(task_config(tmp_path)), "-o", override))
    assert words in line


def test_eval_tasks_on_mmlu_are_refused(tmp_path: Path) -> None:
    from replandscape.errors import UserError

    with pytest.raises(UserError, match="finetune.eval_tasks"):
        load_config(tiny_config(tmp_path), ["finetune.eval_tasks=[parity]"])


# --------------------------------------------------------------------------------------------
# the own task's accuracy from a shared result
# --------------------------------------------------------------------------------------------


def test_each_experiment_reads_its_own_tasks_accuracy(tmp_path: Path) -> None:
    """A shared result.json holds the trainer's test_accuracy; every experiment (the ft-final
    check of extraction, a re-run of the stage) reads its own task's from task_accuracy."""
    from replandscape.conditions import finetune_dir, finetune_test_accuracy
    from replandscape.stages.finetune import _finished_result

    folder = tmp_path / "shared"
    axis = ["expression", "parity"]
    a = make_cfg("expression", eval_tasks=axis, output_dir=str(folder))
    b = make_cfg("parity", eval_tasks=axis, output_dir=str(folder))
    assert finetune_dir(a) == finetune_dir(b) == folder
    assert finetune_dir(make_cfg("expression")) == Path("/tmp/out-expression/finetune")
    (folder / "adapter-final").mkdir(parents=True)
    (folder / "adapter-final" / "adapter_config.json").write_text("{}")

    def scores(pattern: float, misleading: float) -> dict[str, dict[str, float | int]]:
        return {"pattern": {"strict": pattern, "substring": 1.0, "n": 8},
                "misleading": {"strict": misleading, "substring": 1.0, "n": 8}}

    result = {
        "output_dir": str(folder), "adapter_dir": str(folder / "adapter-final"),
        "config_hash": a.hash, "stage_hash": stage_hash(a), "total_steps": 2,
        "train_samples": 32, "train_subjects": 2, "effective_batch": 8, "world_size": 1,
        "zero_stage": 0, "final_loss": 1.0, "train_tokens": 100, "train_seconds": 1.0,
        "val_accuracy": None, "val_history": [], "test_accuracy": 0.25, "test_questions": 16,
        "test_per_subject": {"pattern": 0.5, "misleading": 0.0}, "checkpoints": [],
        "method": "lora", "loss": "all", "train_tasks": MIXTURE,
        "task_accuracy": {"expression": scores(0.5, 0.0), "relation": scores(0.0, 0.0),
                          "parity": scores(0.75, 0.25)}, "task_history": []}
    (folder / "result.json").write_text(json.dumps(result))
    assert finetune_test_accuracy(a) == pytest.approx(0.25)
    assert finetune_test_accuracy(b) == pytest.approx(0.5)
    done = _finished_result(b)
    assert done is not None and done.test_accuracy == pytest.approx(0.5)
    assert done.test_per_subject == {"pattern": 0.75, "misleading": 0.25}
    assert done.test_questions == 16
    # the substring rule is read when the run scores by it
    sub = dataclasses.replace(b, task=dataclasses.replace(b.task, scoring="substring"))
    assert finetune_test_accuracy(sub) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# the sweep plan
# --------------------------------------------------------------------------------------------


def task_config(tmp: Path, **finetune: Any) -> Path:
    """A tiny generated-task experiment config fine-tuning on a two-task mixture."""
    ft = {"tasks": list(MIXTURE), "samples_per_task": 16, "loss": "all", "max_steps": 2,
          "effective_batch": 8, "micro_batch": 4, "lora_rank": 4, "lora_alpha": 8,
          "max_seq_len": 96, **finetune}
    return tiny_config(
        tmp, task={"name": "expression", "n_test": 8, "n_dev": 8, "n_train": 32},
        data={"source": "builtin:task", "train_splits": ["train"]},
        prompts={"shots": [0], "max_shots": 8},
        analysis={"maxk": 6, "range_max": 4, "id_scale_index": 0, "density_k": 3,
                  "dendrogram_min_size": 3, "ranks": 1, "per_subject_cap": None},
        finetune=ft)


def sweep_file(tmp: Path, tasks: list[str], **extra: Any) -> Path:
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": {
        "name": "imp", "output_root": str(tmp / "root"), "experiments": [str(task_config(tmp))],
        "tasks": tasks, "finetune": True, **extra}}))
    return path


def test_a_task_sweep_plans_one_fine_tuning_per_model(tmp_path: Path) -> None:
    from replandscape.sweep import load_sweep, plan_sweep

    sweep = load_sweep(sweep_file(tmp_path, ["expression", "parity"], patch=True),
                       ["cluster=local-slurm"])
    a, b = (e.cfg for e in sweep.experiments)
    digest = stage_hash(a)
    assert stage_hash(b) == digest
    folder = tmp_path / "root" / f"finetune-tiny-{digest[:8]}"
    for exp in sweep.experiments:
        assert f"finetune.output_dir={folder}" in exp.overrides
        assert "finetune.eval_tasks=[expression,parity]" in exp.overrides
        assert exp.cfg.finetune.output_dir == str(folder)
    jobs = {j.key: j for j in plan_sweep(sweep)}
    shared = f"tiny/finetune-{digest[:8]}"
    assert [k for k, j in jobs.items() if j.stage == "finetune"] == [shared]
    assert jobs[shared].outputs == (str(folder / "result.json"),)
    for task in ("expression", "parity"):
        assert jobs[f"t-{task}/extract-ft"].depends_on == (shared,)
        assert shared in jobs[f"t-{task}/patch"].depends_on
        assert jobs[f"t-{task}/extract-ft"].outputs == (
            str(tmp_path / "root" / f"t-{task}" / "activations" / "ft-final.h5"),)
    out = cli("submit", str(sweep_file(tmp_path, ["expression", "parity"])),
              "cluster=local-slurm", "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "t-parity/extract-ft:" in out.stdout and f"after {shared}" in out.stdout
    assert out.stdout.count(f"{shared}:") == 1


def test_sharing_can_be_turned_off_and_lone_runs_are_unchanged(tmp_path: Path) -> None:
    from replandscape.sweep import load_sweep, plan_sweep

    off = load_sweep(sweep_file(tmp_path, ["expression", "parity"], share_finetune=False),
                     ["cluster=local-slurm"])
    keys = [j.key for j in plan_sweep(off) if j.stage == "finetune"]
    assert keys == ["t-expression/finetune", "t-parity/finetune"]
    assert all(e.cfg.finetune.output_dir is None for e in off.experiments)
    lone = load_sweep(sweep_file(tmp_path, ["parity"]), ["cluster=local-slurm"])
    assert lone.experiments[0].cfg.finetune.output_dir is None
    assert not lone.experiments[0].cfg.finetune.eval_tasks


def test_one_folder_for_two_different_runs_is_refused(tmp_path: Path) -> None:
    line = one_line_error(cli(
        "validate", str(sweep_file(tmp_path, ["expression", "parity"], share_finetune=False,
                                   overrides=[f"finetune.output_dir={tmp_path / 'one'}"]))))
    assert "finetune.output_dir" in line and "different runs into one folder" in line


# --------------------------------------------------------------------------------------------
# a real shared run
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_shared_run_trains_once_and_each_task_checks_its_own_accuracy(tmp_path: Path) -> None:
    from replandscape.lock import stage_lock
    from replandscape.storage import open_activations

    cfg = task_config(tmp_path)
    shared = tmp_path / "shared"
    common = [f"finetune.output_dir={shared}", "finetune.eval_tasks=[expression,parity]"]
    a = [*common, "task.name=expression", f"run.output_dir={tmp_path / 'a'}"]
    b = [*common, "task.name=parity", f"run.output_dir={tmp_path / 'b'}"]
    # a second run on a folder being trained is refused in one line
    with stage_lock(shared, "finetune"):
        line = one_line_error(cli("run", "finetune", str(cfg), *b))
    assert "finetune" in line
    proc = cli("run", "finetune", str(cfg), *a)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = {p.name: p.read_bytes() for p in shared.iterdir() if p.is_file()}
    result = json.loads(stored["result.json"])
    assert set(result["task_accuracy"]) == {"expression", "relation", "parity"}
    assert yaml.safe_load(stored["config.yaml"])["task"]["name"] == "expression"
    # task B's experiment finds it complete: nothing is trained or rewritten
    proc = cli("run", "finetune", str(cfg), *b)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in shared.iterdir() if p.is_file()} == stored
    assert not (tmp_path / "b" / "finetune").exists()
    proc = cli("run", "extract-ft", str(cfg), *b)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not the evaluated one" not in proc.stderr
    own = result["task_accuracy"]["parity"]
    expected = sum(v["strict"] * v["n"] for v in own.values()) / sum(v["n"] for v in own.values())
    with open_activations(tmp_path / "b" / "activations" / "ft-final.h5") as af:
        assert af.attrs["task"] == "parity"
        assert af.attrs["checkpoint"] == str(shared / "adapter-final")
        assert af.attrs["finetune_test_accuracy"] == pytest.approx(expected, abs=1e-12)
        assert af.accuracy["micro"] == pytest.approx(expected, abs=1e-12)
    ls = cli("ls", str(tmp_path / "b"))
    assert ls.returncode == 0 and f"(shared: {shared})" in ls.stdout, ls.stdout + ls.stderr
