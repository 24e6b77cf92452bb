"""Damaged stored state: each kind of file is refused in one line naming it and the fix.

A real fine-tuning run (tiny model, CPU) is made once; each test damages a copy of its folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import cli, one_line_error, tiny_config
from replandscape.errors import UserError
from replandscape.stored import (
    check_adapter_dir,
    read_checkpoint_index,
    read_finetune_result,
    read_resume_record,
    read_train_log,
)

FT = {"epochs": 1, "effective_batch": 8, "micro_batch": 8, "samples_per_subject": 8,
      "log_checkpoints": 2}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of a finished fine-tuning run."""
    tmp = tmp_path_factory.mktemp("stored")
    cfg = tiny_config(tmp, finetune=FT)
    proc = cli("run", "finetune", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp / "out" / "finetune" / "result.json").is_file()
    return tmp


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run; returns the folder holding cfg.yaml and out/."""
    shutil.copytree(finished / "out", tmp_path / "out")
    tiny_config(tmp_path, finetune=FT)
    return tmp_path


def _one_line(exc: pytest.ExceptionInfo[UserError]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text and "fix:" in text
    return text


def test_the_stored_files_of_a_real_run_read_back(finished: Path) -> None:
    ft = finished / "out" / "finetune"
    index = read_checkpoint_index(ft / "checkpoints.json")
    assert [a.name for a in index.adapters][-1] == "adapter-final" and index.total_steps > 0
    result = read_finetune_result(ft / "result.json")
    assert result["total_steps"] == index.total_steps
    assert [r["step"] for r in read_train_log(ft / "train_log.jsonl") if "loss" in r] == \
        list(range(1, index.total_steps + 1))
    for adapter in index.adapters:
        check_adapter_dir(ft / adapter.name)


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("result.json", '{"output_dir": "x", ', "not valid JSON"),
        ("result.json", "[1, 2]", "not a JSON object"),
        ("checkpoints.json", "{not json", "not valid JSON"),
        ("checkpoints.json", '{"adapters": {"name": "adapter-final"}}', "adapters"),
        ("checkpoints.json", '{"adapters": [{"name": "a", "step": "5", "path": "p"}]}',
         "adapters[0].step"),
        ("ds/resume.json", '{"tag": "step000005", "step": 5}', "stage_hash"),
        ("ds/resume.json", "", "not valid JSON"),
    ],
)
def test_a_damaged_state_file_stops_the_stage_in_one_line(copy: Path, name: str, text: str,
                                                          words: str) -> None:
    path = copy / "out" / "finetune" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    line = one_line_error(cli("run", "finetune", str(copy / "cfg.yaml")))
    assert str(path) in line and words in line and "fix:" in line
    # submit refuses it as well, before anything is queued
    line = one_line_error(cli("submit", str(copy / "cfg.yaml"), "--dry-run"))
    assert str(path) in line and words in line


def test_a_wrong_type_in_the_result_names_the_key(copy: Path) -> None:
    path = copy / "out" / "finetune" / "result.json"
    data = json.loads(path.read_text())
    data["total_steps"] = "six"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as exc:
        read_finetune_result(path)
    line = _one_line(exc)
    assert "total_steps" in line and "expected an integer" in line and str(path) in line


def test_the_training_log_tolerates_a_cut_last_line_only(copy: Path) -> None:
    path = copy / "out" / "finetune" / "train_log.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines) + "\n" + lines[0][: len(lines[0]) // 2])  # a kill mid-write
    assert len(read_train_log(path)) == len(lines)
    lines[1] = lines[1][:5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as exc:
        read_train_log(path)
    assert "line 2" in _one_line(exc)
    path.write_text('{"loss": 1.0}\n{"step": 1}\n')
    with pytest.raises(UserError, match="step"):
        read_train_log(path)


def test_a_truncated_adapter_is_refused_at_export(copy: Path, tmp_path: Path) -> None:
    from replandscape.config import load_config
    from replandscape.stages.finetune import export_merged

    adapter = copy / "out" / "finetune" / "adapter-final"
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    cfg = load_config(str(copy / "cfg.yaml"))
    with pytest.raises(UserError) as exc:
        export_merged(cfg, adapter, tmp_path / "merged")
    line = _one_line(exc)
    assert str(weights) in line and "truncated" in line
    assert not (tmp_path / "merged").exists()
    weights.write_bytes(data[:5])
    with pytest.raises(UserError, match="truncated"):
        check_adapter_dir(adapter)
    weights.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(UserError, match="truncated|damaged"):
        check_adapter_dir(adapter)


def test_a_missing_resume_record_key_has_the_fix_to_start_over(copy: Path) -> None:
    path = copy / "out" / "finetune" / "ds" / "resume.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"tag": "../..", "step": 5, "stage_hash": "x", "world_size": 1}))
    with pytest.raises(UserError) as exc:
        read_resume_record(path)
    assert "not a checkpoint folder name" in _one_line(exc) and "delete the finetune/ds" in \
        str(exc.value)
