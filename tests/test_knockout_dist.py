"""Attention knockout over ranks (docs/method.md §7.7): the results of shares of the prompts merge
into the one-rank result exactly, the forward passes a share makes are known before it runs, and
the stage over 2 ranks, whole model per rank or ZeRO-3 partitioned (ranks kept in step by idle
forward passes), writes the file a single process writes and skips it when it is there."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers import TINY_MODEL, cli, launch_ranks, one_line_error
from replandscape.config import ModelConfig
from replandscape.knockout import (
    KnockoutPrompt,
    encode,
    layout_prompt,
    merge_knockout,
    merge_scans,
    planned_forwards,
    run_knockout,
    scan_knockout,
    shares,
)
from replandscape.models import load_causal_lm, load_tokenizer, resolve_model_path
from replandscape.tasks import get_task, shot_pool
from replandscape.tasks.pairs import task_layout
from test_task_axis import task_config


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    shape: dict[str, Any] = dict(TINY_MODEL)
    path = resolve_model_path(ModelConfig(**shape))
    return load_causal_lm(path), load_tokenizer(path)


def _task_prompts(n: int) -> list[KnockoutPrompt]:
    spec = get_task("expression")
    pool = shot_pool([spec.generate("dev", v, i, 1) for v in spec.variants for i in range(8)])
    test = [spec.generate("test", "pattern", i, 1) for i in range(n)]
    return [KnockoutPrompt(it.id, task_layout(it, pool, 1, 0), it.target) for it in test]


# bare prompts of very different lengths: the scan's far offsets reach only some of them
TEXTS = ["Yes or no?", "Is the sky blue today, yes or no?", "Two?",
         "A long question about music, opera, cellos and violins: yes or no?",
         "Rain?", "Is seven a prime number, yes or no?", "Cold?"]


def _bare_prompts() -> list[KnockoutPrompt]:
    return [KnockoutPrompt(i, layout_prompt(t), " yes") for i, t in enumerate(TEXTS)]


class _Count:
    def __init__(self, model: Any) -> None:
        self.n = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, _module: Any, _args: Any) -> None:
        self.n += 1


def test_shares_are_blocks_of_whole_batches() -> None:
    assert shares(7, 2, 3) == [range(0, 4), range(4, 6), range(6, 7)]
    assert shares(5, 2, 4) == [range(0, 2), range(2, 4), range(4, 5), range(5, 5)]
    assert shares(3, 8, 2) == [range(0, 3), range(3, 3)]
    assert shares(6, 1, 1) == [range(0, 6)]


@pytest.mark.parametrize("world", [3, 4])
def test_merged_shares_equal_the_one_rank_run(llama: tuple[Any, Any], world: int) -> None:
    model, tok = llama
    prompts = _task_prompts(5)
    sets, windows = ["header_last", "shots"], [(0, 3), (1, 2)]
    whole = run_knockout(model, tok, prompts, sets, windows, batch_size=2)
    parts = [run_knockout(model, tok, prompts, sets, windows, batch_size=2, share=s)
             for s in shares(len(prompts), 2, world)]
    assert sum(len(p.ids) for p in parts) == 5
    merged = merge_knockout(parts[::-1])  # any order: the rows put them back
    assert merged == whole
    assert merged.to_json() == whole.to_json()
    assert json.dumps(merged.to_json()) == json.dumps(whole.to_json())

    bare = _bare_prompts()
    lengths = [len(encode(tok, p, True).ids) for p in bare]
    last_n = max(lengths) - 1
    whole_scan = scan_knockout(model, tok, bare, last_n, [(0, 3), (2, 3)], batch_size=2)
    assert len(set(whole_scan[0].n)) > 1  # offsets reached by fewer prompts: weighting matters
    scan_parts = []
    for share in shares(len(bare), 2, world):
        clean = run_knockout(model, tok, bare, ["chars:0-2"], [(0, 3)], batch_size=2,
                             share=share)
        count = _Count(model)
        try:
            scan_parts.append(scan_knockout(model, tok, bare, last_n, [(0, 3), (2, 3)],
                                            batch_size=2, share=share, clean=clean))
        finally:
            count.handle.remove()
        # the run's clean pass and one knockout, then the scan alone
        assert count.n + 2 * len(range(0, len(share), 2)) == planned_forwards(
            lengths, share, 2, 1, 2, last_n)
    merged_scan = merge_scans(scan_parts[::-1])
    assert [s.to_json() for s in merged_scan] == [s.to_json() for s in whole_scan]
    assert merged_scan == whole_scan
    for w, scan in enumerate(merged_scan):
        for j in range(len(scan.offsets)):
            # the merged mean is the parts' means weighted by their counts
            counts = [p[w].n[j] for p in scan_parts]
            means = [p[w].delta_logprob[j] for p in scan_parts]
            assert scan.n[j] == sum(counts)
            weighted = sum(c * m for c, m in zip(counts, means) if c) / sum(counts)
            assert scan.delta_logprob[j] == pytest.approx(weighted, rel=1e-12, abs=1e-12)
        best = int(np.argmax(np.abs(scan.delta_logprob)))
        assert scan.most == scan.offsets[best]


def test_merging_overlapping_or_unlike_results_is_refused(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    prompts = _task_prompts(3)
    a = run_knockout(model, tok, prompts, ["header_last"], [(0, 3)], share=range(0, 2))
    b = run_knockout(model, tok, prompts, ["header_last"], [(0, 3)], share=range(1, 3))
    with pytest.raises(ValueError, match="share prompts"):
        merge_knockout([a, b])
    c = run_knockout(model, tok, prompts, ["shots"], [(0, 3)], share=range(2, 3))
    with pytest.raises(ValueError, match="different"):
        merge_knockout([a, c])
    # an empty share checks every prompt but scores none, and merges as nothing
    empty = run_knockout(model, tok, prompts, ["header_last"], [(0, 3)], share=range(3, 3))
    assert empty.ids == [] and math.isnan(empty.effects[0].delta_logprob)
    assert merge_knockout([a, empty]) == merge_knockout([a])


def _stage_config(tmp: Path, zero_stage: int) -> Path:
    return task_config(tmp, "expression", prompts={"shots": [2]},
                       knockout={"limit": 5, "scan_last": 3, "batch_size": 2},
                       extract={"zero_stage": zero_stage})


def _one_then_two(tmp: Path, zero_stage: int) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """The knockout file of one process, then of 2 ranks (in the same folder: the same config
    hash); 5 prompts in batches of 2: rank 0 runs 2 batches, rank 1 one."""
    cfg = _stage_config(tmp, zero_stage)
    single = cli("run", "knockout", str(cfg), timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    path = tmp / "out" / "knockout" / "shots2.json"
    one = json.loads(path.read_text())
    path.unlink()
    procs = launch_ranks(2, ["run", "knockout", str(cfg)], timeout=300)
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads(path.read_text())
    for data in (one, two):  # the checkout's commit, which may move between the runs
        assert data.pop("code_version")
    return one, two, path


def test_two_data_parallel_ranks_write_the_one_rank_file_and_resume(tmp_path: Path) -> None:
    one, two, path = _one_then_two(tmp_path, 0)
    assert two == one  # each prompt scored in the same batch: the same numbers
    assert len(two["result"]["ids"]) == 5 and two["scan"][0]["n"] == [5, 5, 5]
    before = path.stat().st_mtime_ns
    again = launch_ranks(2, ["run", "knockout", str(_stage_config(tmp_path, 0))], timeout=300)
    for p in again:
        assert p.returncode == 0, p.stderr[-3000:]
    assert path.stat().st_mtime_ns == before  # finished: skipped on every rank


def _assert_close(a: Any, b: Any, tol: float, where: str = "") -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=0, abs_tol=tol), f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], tol, f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, tol, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_two_zero3_ranks_keep_in_step_and_write_the_one_rank_file(tmp_path: Path) -> None:
    # rank 1 has fewer forward passes than rank 0: without its idle passes it would wait in the
    # gathering of results while rank 0 waits for it in a parameter gather (the timeout fails)
    one, two, _ = _one_then_two(tmp_path, 3)
    _assert_close(two, one, 1e-9)
    # bad input fails alike on every rank (each checks all prompts), before any rank waits
    procs = launch_ranks(2, ["run", "knockout", str(_stage_config(tmp_path, 3)),
                             "knockout.position_sets=[header_last,shot.5]",
                             f"run.output_dir={tmp_path / 'bad'}"], timeout=300)
    for p in procs:
        assert "position set 'shot.5' names no token" in one_line_error(p)
    assert not (tmp_path / "bad" / "knockout" / "shots2.json").exists()
