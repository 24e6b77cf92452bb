"""Configs: every shipped YAML validates; bad configs are refused with one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import REPO, cli, one_line_error, tiny_config
from replandscape.cli.main import main
from replandscape.config import (
    ExperimentConfig,
    compose,
    config_from_dict,
    load_config,
    save_resolved,
)
from replandscape.errors import UserError

ALL_YAML = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_folder_is_searched_recursively() -> None:
    sub_folders = {p.parent.name for p in ALL_YAML}
    assert {"model", "cluster", "experiments", "sweeps"} <= sub_folders
    assert len(ALL_YAML) >= 12


@pytest.mark.parametrize("path", ALL_YAML, ids=[str(p.relative_to(REPO)) for p in ALL_YAML])
def test_every_shipped_yaml_validates(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    text = path.read_text()
    assert text.startswith("#"), "every YAML says in its header which command runs it"


def test_paper_models_have_real_shapes() -> None:
    expected = {"llama3-8b": (32, 4096), "llama3-70b": (80, 8192), "mistral-7b": (32, 4096)}
    for name, (layers, width) in expected.items():
        cfg = load_config(REPO / "configs" / "experiments" / f"mmlu-{name}.yaml")
        assert (cfg.model.n_layers, cfg.model.hidden_size) == (layers, width)
        assert cfg.model.dtype == "bfloat16" and cfg.extract.zero_stage == 3
        assert cfg.analysis.maxk == 1000 and cfg.analysis.range_max == 100
    assert load_config(REPO / "configs/experiments/mmlu-llama3-70b.yaml").model.gpus >= 4


def test_method_defaults() -> None:
    cfg = ExperimentConfig()
    assert cfg.finetune.lora_rank == 64 and cfg.finetune.lora_alpha == 16
    assert cfg.finetune.lora_dropout == 0.1 and cfg.finetune.lr == 1e-4
    assert cfg.finetune.effective_batch == 16 and cfg.finetune.max_seq_len == 1024
    assert cfg.analysis.z == 1.6 and cfg.analysis.density_k == 16
    assert cfg.analysis.id_scale_index == 4 and cfg.prompts.seed == 42
    assert cfg.extract.sites == ("input_layernorm", "norm", "logits")


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("analysis.maxx=3", "analysis.maxx", "did you mean 'maxk'"),
        ("analysis.maxk=many", "analysis.maxk", "expected an integer"),
        ("prompts.shots=[0,7]", "prompts.shots[1]", "7 shots"),
        ("analysis.maxk=400", "analysis.maxk", "points"),
        ("model.path=/no/such/model", "model.path", "does not exist"),
        ("data.source=/no/such/data", "data.source", "does not exist"),
        ("extract.pooling=max", "extract.pooling", "not allowed"),
        ("finetune.effective_batch=10", "finetune.effective_batch", "multiple"),
        ("model=no-such-model", "defaults.model", "no model config"),
        ("finetune.lora_dropout=true", "finetune.lora_dropout", "expected a number"),
    ],
)
def test_validate_refuses_bad_configs_in_one_line(override: str, key: str, words: str) -> None:
    proc = cli("validate", str(REPO / "configs" / "demo.yaml"), "-o", override)
    line = one_line_error(proc)
    assert "configs/demo.yaml" in line and key in line and words in line, line
    assert "fix:" in line


def test_shots_beyond_the_shot_split_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    row = {"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 1, "subject": "law"}
    for split, n in (("dev", 2), ("test", 30)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for _ in range(n)))
    path = tiny_config(tmp_path, data={"source": str(data), "limit": None}, prompts={"shots": [3]})
    line = one_line_error(cli("validate", str(path)))
    assert "prompts.shots" in line and "'law' has 2" in line


def test_composition_order_and_group_swap(tmp_path: Path) -> None:
    demo = REPO / "configs" / "demo.yaml"
    merged = compose(demo, ["cluster=local-slurm", "analysis.maxk=50", "run.seed=1"])
    assert merged["cluster"]["partition"] == "local"
    assert merged["analysis"]["maxk"] == 50 and merged["model"]["name"] == "demo-llama"
    cfg = load_config(demo, ["cluster=local-slurm"])
    assert cfg.cluster.executor == "slurm"
    # the file wins over its group defaults; overrides win over the file
    cfg2 = load_config(demo, ["model.n_layers=3"])
    assert cfg2.model.n_layers == 3 and load_config(demo).model.n_layers == 6


def test_exponent_without_a_dot_is_a_number() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml", ["finetune.lr=1e-3"])
    assert cfg.finetune.lr == 1e-3
    with pytest.raises(UserError, match="expected a number"):
        load_config(REPO / "configs" / "demo.yaml", ["finetune.lr=fast"])


def test_hash_is_stable_and_saved(tmp_path: Path) -> None:
    a = load_config(REPO / "configs" / "demo.yaml")
    b = load_config(REPO / "configs" / "demo.yaml")
    assert a.hash == b.hash and len(a.hash) == 64
    assert load_config(REPO / "configs" / "demo.yaml", ["run.seed=1"]).hash != a.hash
    path = save_resolved(a, tmp_path)
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert again.hash == a.hash
    assert (tmp_path / "config.sha256").read_text().strip() == a.hash


def test_unknown_top_level_section_and_bad_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("analysys:\n  maxk: 3\n")
    with pytest.raises(UserError, match="analysys.*did you mean 'analysis'"):
        load_config(bad)
    bad.write_text("analysis: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)
    line = one_line_error(cli("validate", str(tmp_path / "missing.yaml")))
    assert "config file not found" in line


def test_analysis_defaults_agree_with_the_metrics_defaults() -> None:
    """The config and the pure metrics both carry docs/method.md §5 values; they must not drift."""
    from replandscape.config import AnalysisConfig
    from replandscape.metrics.geometry import GeometryParams

    cfg, params = AnalysisConfig(), GeometryParams()
    for name in ("maxk", "range_max", "id_scale_index", "density_k", "overlap_fraction",
                 "dendrogram_min_size", "dendrogram_label_fraction", "engine", "device"):
        assert getattr(cfg, name) == getattr(params, name), name
    assert cfg.z == params.Z
