"""The patch stage: effects per condition on the run's task pairs, resumable, and the circuit shift
between conditions (docs/method.md §7.7)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import cli, launch_ranks, one_line_error
from test_task_axis import task_config


def _patch_config(tmp: Path, task: str = "expression", name: str = "cfg.yaml",
                  **sections: dict) -> Path:
    path = task_config(tmp, task, prompts={"shots": [0, 2], **sections.pop("prompts", {})},
                       patch={"limit": 4, "pair_batch": 2, **sections.pop("patch", {})},
                       **sections)
    return path if path.name == name else path.rename(path.with_name(name))


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
    batches = sorted((out / "shots2.parts").glob("unit*.npz"))
    batches[-1].unlink()
    again = cli("run", "patch", str(cfg))
    assert again.returncode == 0, again.stderr[-3000:]
    second = _arrays(out / "shots2.h5")
    for key, value in first.items():
        np.testing.assert_array_equal(second[key], value, err_msg=key)


def _patched_lds(path: Path) -> dict[str, np.ndarray]:
    """The patched logit differences behind the stored effects (effect x (LD_corrupt - LD_clean)
    + LD_clean): the effects divide by a difference that float32 rounding can make small."""
    with h5py.File(path, "r") as fh:
        clean, corrupt = fh["rows/ld_clean"][:], fh["rows/ld_corrupt"][:]
        out = {"ld_clean": clean, "ld_corrupt": corrupt}
        for key in ("effects/heads", "effects/mlp", "effects/resid", "attribution/heads",
                    "attribution/mlp", "attribution/resid"):
            effect = fh[key][:]
            shape = (-1,) + (1,) * (effect.ndim - 1)
            out[key] = effect * (corrupt - clean).reshape(shape) + clean.reshape(shape)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("zero_stage", "layer_groups"), [(0, 1), (3, 2)])
def test_two_ranks_give_the_one_rank_effects(tmp_path: Path, zero_stage: int,
                                             layer_groups: int) -> None:
    """Data-parallel (each rank a whole model) and ZeRO-3 (the weights partitioned, ranks kept in
    step by padded and dummy rounds: 5 pairs in 3 pair groups of 2 over 2 ranks leave rank 1 a
    dummy round in each of the 2 block groups) give the one-rank, one-group run's effects; a
    hang here is a rank out of step."""
    common = {"prompts": {"shots": [2]}, "patch": {"limit": 5, "pair_batch": 2}}
    one = _patch_config(tmp_path, name="one.yaml",
                        run={"name": "t", "output_dir": str(tmp_path / "one")}, **common)
    two = _patch_config(tmp_path, name="two.yaml",
                        run={"name": "t", "output_dir": str(tmp_path / "two")},
                        prompts={"shots": [2]}, extract={"zero_stage": zero_stage},
                        patch={"limit": 5, "pair_batch": 2, "layer_groups": layer_groups})
    proc = cli("run", "patch", str(one))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = launch_ranks(2, ["run", "patch", str(two)], timeout=600)
    assert all(r.returncode == 0 for r in ranks), ranks[0].stderr[-3000:]
    mode = "ZeRO-3, ranks in step" if zero_stage == 3 else "data-parallel"
    assert f"over 2 rank(s), {mode}" in ranks[0].stderr
    a = _patched_lds(tmp_path / "one" / "patching" / "shots2.h5")
    b = _patched_lds(tmp_path / "two" / "patching" / "shots2.h5")
    assert len(a["ld_clean"]) == 5
    for key, value in a.items():
        np.testing.assert_allclose(b[key], value, rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_array_shares_then_a_gather_equal_one_run(tmp_path: Path) -> None:
    """Two Slurm array tasks (patch.part=0, 1) compute disjoint shares of the units, the gather
    run computes nothing and writes what one uninterrupted run writes."""
    common = {"patch": {"limit": 4, "pair_batch": 1}}
    whole = _patch_config(tmp_path, name="whole.yaml",
                          run={"name": "t", "output_dir": str(tmp_path / "whole")}, **common)
    split = _patch_config(tmp_path, name="split.yaml",
                          run={"name": "t", "output_dir": str(tmp_path / "split")}, **common)
    assert cli("run", "patch", str(whole)).returncode == 0
    out = tmp_path / "split" / "patching"
    seen: list[set[str]] = []
    for part in (0, 1):
        before = {p.relative_to(out).as_posix() for p in out.glob("*.parts/unit*.npz")}
        proc = cli("run", "patch", str(split), "patch.parts=2", f"patch.part={part}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / f"part{part}of2.done").is_file() and not (out / "circuits.json").exists()
        after = {p.relative_to(out).as_posix() for p in out.glob("*.parts/unit*.npz")}
        seen.append(after - before)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert not list(out.glob("shots*.h5"))  # shares are not gathered
    gather = cli("run", "patch", str(split), "patch.parts=2")
    assert gather.returncode == 0, gather.stderr[-3000:]
    assert "unit(s) to run" not in gather.stderr  # every unit was computed by the shares
    for cond in ("shots0", "shots2"):
        a = _arrays(tmp_path / "whole" / "patching" / f"{cond}.h5")
        b = _arrays(out / f"{cond}.h5")
        for key, value in a.items():
            np.testing.assert_array_equal(b[key], value, err_msg=f"{cond} {key}")
    line = one_line_error(cli("run", "patch", str(split), "patch.parts=2", "patch.part=2"))
    assert "patch.part" in line


def test_a_task_without_pairs_is_one_line(tmp_path: Path) -> None:
    cfg = _patch_config(tmp_path, "regression")
    line = one_line_error(cli("run", "patch", str(cfg)))
    assert "regression" in line and "pair" in line
    assert not list((tmp_path / "out").glob("patching/*.h5"))


def test_more_block_groups_than_blocks_is_one_line(tmp_path: Path) -> None:
    cfg = _patch_config(tmp_path, patch={"layer_groups": 4})  # the tiny model has 3 blocks
    line = one_line_error(cli("run", "patch", str(cfg)))
    assert "patch.layer_groups" in line and "3 blocks" in line
    assert not (tmp_path / "out" / "patching").exists()


def test_a_sweep_chains_patching_after_extraction_and_fine_tuning(tmp_path: Path) -> None:
    import yaml

    from replandscape.sweep import load_sweep, plan_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"sweep": {
        "name": "imp", "output_root": str(tmp_path / "root"),
        "experiments": [str(_patch_config(tmp_path))], "tasks": ["expression"],
        "finetune": True, "patch": True, "knockout": True}}))
    jobs = {j.key: j for j in plan_sweep(load_sweep(sweep, ["cluster=local-slurm"]))}
    knockout = jobs["t-expression/knockout"]
    assert knockout.depends_on == ("t-expression/extract",) and knockout.stage == "knockout"
    assert [Path(o).name for o in knockout.outputs] == ["shots2.json"]  # shots above 0
    patch = jobs["t-expression/patch"]
    assert set(patch.depends_on) == {"t-expression/extract", "t-expression/finetune"}
    assert patch.outputs[0].endswith("patching/circuits.json") and not patch.done
    assert not patch.array and "t-expression/patch-gather" not in jobs
    # patch.parts: an array of shares, then one job that gathers them and draws the shift
    parted = {j.key: j for j in plan_sweep(load_sweep(sweep, ["cluster=local-slurm",
                                                              "patch.parts=3"]))}
    shares, gather = parted["t-expression/patch"], parted["t-expression/patch-gather"]
    assert shares.array == (("patch.part=0",), ("patch.part=1",), ("patch.part=2",))
    assert [Path(o).name for o in shares.array_outputs] == [f"part{i}of3.done" for i in range(3)]
    assert set(shares.depends_on) == {"t-expression/extract", "t-expression/finetune"}
    assert gather.depends_on == ("t-expression/patch",) and gather.stage == "patch"
    assert gather.outputs[0].endswith("patching/circuits.json")


@pytest.mark.slurm
@pytest.mark.slow
def test_a_patch_sweep_runs_its_shares_as_a_slurm_array(slurm_cluster: object,
                                                        tmp_path: Path) -> None:
    """On the local Slurm cluster: extraction, then patching as an array of two shares and a
    gather job after it, knockout, then the analysis and figures."""
    import yaml

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"sweep": {
        "name": "imp", "output_root": str(tmp_path / "root"),
        "experiments": [str(_patch_config(tmp_path, patch={"parts": 2, "pair_batch": 1}))],
        "tasks": ["expression"], "finetune": False, "patch": True, "knockout": True}}))
    proc = cli("submit", str(sweep), "cluster=local-slurm", "--wait", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "root" / "t-expression" / "patching"
    assert (out / "part0of2.done").is_file() and (out / "part1of2.done").is_file()
    circuits = json.loads((out / "circuits.json").read_text())
    assert set(circuits["conditions"]) == {"shots0", "shots2"}
    record = json.loads((tmp_path / "root" / "sweep-imp.json").read_text())
    jobs = {j["key"]: j for j in record["jobs"]}
    assert jobs["t-expression/patch"]["labels"] == ["part0", "part1"]
    gather_log = Path(jobs["t-expression/patch-gather"]["logs"][0]).read_text()
    assert "unit(s) to run" not in gather_log  # the shares left nothing to compute
    knocked = json.loads((out.parent / "knockout" / "shots2.json").read_text())
    assert knocked["kind"] == "replandscape.knockout"


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
