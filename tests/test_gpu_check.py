"""benchmarks/gpu_check.py: its reduced CPU run passes every check; without CUDA and without
``--cpu-smoke`` every check says it was skipped for want of CUDA."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import PYTHON, REPO, env

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
CHECKS = ["padding", "ft_accuracy", "neighbours", "extract_speed", "finetune_speed"]


def run_check(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=REPO)


@pytest.mark.slow
def test_cpu_smoke_runs_and_passes_every_check(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = run_check("--cpu-smoke", "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke" and report["passed"] and report["failed"] == []
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == CHECKS
    for name, check in checks.items():
        assert check["status"] == "pass", (name, check)
    m = {name: c["metrics"] for name, c in checks.items()}
    # each check measured what it says, on the CPU
    assert m["padding"]["finite"] and m["padding"]["worst_any_pair"] < 2e-2
    assert {"last/logits", "mean/residual"} <= set(m["padding"]["per_site_kind"])
    ft = m["ft_accuracy"]
    assert ft["extract_n"] == ft["finetune_test_questions"] > 0
    assert ft["extract_accuracy"] == pytest.approx(ft["finetune_test_accuracy"], abs=1e-12)
    assert ft["extract_dtype"] == "float32"
    assert m["neighbours"]["backends"] == {"float32": "torch-cpu", "float64": "torch-cpu"}
    assert m["neighbours"]["same_assignment"] and m["neighbours"]["max_rel_id"] <= 1e-6
    for name in ("extract_speed", "finetune_speed"):
        assert m[name]["tokens_per_s"] > 0 and m[name]["peak_flops"] > 0, name
    assert 0 < m["extract_speed"]["fraction_of_floor"] <= 1
    assert 0 < m["finetune_speed"]["mfu_4n"] < m["finetune_speed"]["mfu_6n"] <= 1.5
    assert m["finetune_speed"]["lora_moved"] and m["finetune_speed"]["base_untouched"]
    assert m["finetune_speed"]["lora_rank"] == 64  # the project's default LoRA
    # the Markdown table on stdout has one row per check
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and "| pass |" in ln]
    assert len(rows) == len(CHECKS), proc.stdout


def test_without_cuda_every_check_is_skipped(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full check would run")
    out = tmp_path / "gpu_check.json"
    proc = run_check("--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "gpu" and not report["cuda_available"]
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["status"] == "skipped: no CUDA" for c in report["checks"]), report["checks"]
    assert "no CUDA device: nothing ran" in proc.stdout
