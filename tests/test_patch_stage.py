"""The patch stage: effects per condition on the run's task pairs, resumable, and the circuit shift
between conditions (docs/method.md §7.7)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import cli, one_line_error
from test_task_axis import task_config


def _patch_config(tmp: Path, task: str = "expression", **sections: dict) -> Path:
    return task_config(tmp, task, prompts={"shots": [0, 2]},
                       patch={"limit": 4, "pair_batch": 2, **sections.pop("patch", {})},
                       **sections)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as fh:
        out = {k: fh[k][:] for k in ("effects/heads", "effects/mlp", "effects/resid",
                                      "attribution/heads")}
        out["pair_id"] = fh["rows/pair_id"][:]
    return out


@pytest.mark.slow
def test_patch_stage_writes_effects_and_circuit_shift_and_resumes(tmp_path: Path) -> None:
    cfg = _patch_config(tmp_path)
    proc = cli("run", "patch", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out" / "patching"
    first = _arrays(out / "shots2.h5")
    n = len(first["pair_id"])
    assert 0 < n <= 4
    assert first["effects/heads"].shape == (n, 3, 4)  # tiny model: 3 blocks, 4 heads
    assert first["effects/mlp"].shape == (n, 3) and first["effects/resid"].shape == (n, 4)
    # the residual leaving the last block carries the whole corrupted answer
    np.testing.assert_allclose(first["effects/resid"][:, -1], 1.0, atol=1e-5)
    with h5py.File(out / "shots2.h5", "r") as fh:
        assert fh.attrs["kind"] == "replandscape.patching" and "sites" not in fh
        assert int(fh.attrs["shots"]) == 2 and fh.attrs["task"] == "expression"
        kept = json.loads(fh.attrs["pairs"])
        assert kept["kept"] == n and set(kept["dropped"]) >= {"length", "same_first_token"}
    circuits = json.loads((out / "circuits.json").read_text())
    assert set(circuits["conditions"]) == {"shots0", "shots2"}
    kinds = {s["kind"] for s in circuits["shifts"]}
    assert kinds == {"heads", "mlp", "residual"}
    for shift in circuits["shifts"]:
        assert shift["condition_a"] == "shots0" and shift["condition_b"] == "shots2"
        assert 0 <= shift["overlap"] <= 1
    from replandscape.figures.circuits import render_circuits

    drawn = render_circuits(tmp_path / "out", tmp_path / "figures", ["png"])
    assert sorted(p.name for p in drawn) == ["circuit_shift_tiny_expression.png",
                                             "patching_depth_tiny_expression.png",
                                             "patching_heads_tiny_expression.png"]
    # a kill after some batches: the finished batches are kept, the rest recomputed, same result
    (out / "shots2.h5").unlink()
    batches = sorted((out / "shots2.parts").glob("batch*.npz"))
    batches[-1].unlink()
    again = cli("run", "patch", str(cfg))
    assert again.returncode == 0, again.stderr[-3000:]
    second = _arrays(out / "shots2.h5")
    for key, value in first.items():
        np.testing.assert_array_equal(second[key], value, err_msg=key)


def test_a_task_without_pairs_is_one_line(tmp_path: Path) -> None:
    cfg = _patch_config(tmp_path, "regression")
    line = one_line_error(cli("run", "patch", str(cfg)))
    assert "regression" in line and "pair" in line
    assert not list((tmp_path / "out").glob("patching/*.h5"))


def test_a_sweep_chains_patching_after_extraction_and_fine_tuning(tmp_path: Path) -> None:
    import yaml

    from replandscape.sweep import load_sweep, plan_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"sweep": {
        "name": "imp", "output_root": str(tmp_path / "root"),
        "experiments": [str(_patch_config(tmp_path))], "tasks": ["expression"],
        "finetune": True, "patch": True}}))
    jobs = {j.key: j for j in plan_sweep(load_sweep(sweep, ["cluster=local-slurm"]))}
    patch = jobs["t-expression/patch"]
    assert set(patch.depends_on) == {"t-expression/extract", "t-expression/finetune"}
    assert patch.outputs[0].endswith("patching/circuits.json") and not patch.done


def test_knockout_stage_reports_each_position_set_and_the_scan(tmp_path: Path) -> None:
    cfg = _patch_config(tmp_path, knockout={"limit": 4, "scan_last": 3})
    proc = cli("run", "knockout", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "knockout" / "shots2.json").read_text())
    assert data["kind"] == "replandscape.knockout" and data["shots"] == 2
    effects = {e["position_set"]: e for e in data["result"]["effects"]}
    assert set(effects) == {"header_last", "shot_last", "separators"}
    assert all(e["n"] == 4 and e["window"] == [0, 3] for e in effects.values())
    assert any(abs(e["delta_logprob"]) > 0 for e in effects.values())
    scan = data["scan"][0]
    assert scan["offsets"] == [1, 2, 3] and scan["most"] in scan["offsets"]
    assert not (tmp_path / "out" / "knockout" / "shots0.json").exists()  # nothing to knock out
    from replandscape.figures.circuits import render_circuits

    drawn = render_circuits(tmp_path / "out", tmp_path / "figures", ["png"])
    assert [p.name for p in drawn] == ["knockout_tiny_expression.png"]
    # a layer window outside the model: one line, nothing written
    other = _patch_config(tmp_path, knockout={"windows": [[0, 9]]},
                          run={"name": "t", "output_dir": str(tmp_path / "other")})
    line = one_line_error(cli("run", "knockout", str(other)))
    assert "window" in line
    assert not list((tmp_path / "other").glob("knockout/*.json"))
