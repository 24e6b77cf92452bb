"""The whole pipeline in-process, as `replandscape run all` runs it, from a relative output dir."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import PYTHON, env, tiny_config


@pytest.mark.slow
def test_run_all_with_a_relative_output_folder(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, data={"source": "builtin:demo-mmlu", "limit": 60},
                      finetune={"epochs": 1, "effective_batch": 8, "micro_batch": 8,
                                "samples_per_subject": 8, "log_checkpoints": 2},
                      extract={"checkpoints": "all", "batch_size": 8, "store_dtype": "float32"},
                      figures={"formats": ["png"]})
    proc = subprocess.run([PYTHON, "-m", "replandscape.cli.main", "run", "all", str(cfg),
                           "run.output_dir=rel/out"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "rel" / "out"
    acts = sorted(p.name for p in (out / "activations").glob("*.h5"))
    assert "shots0.h5" in acts and "shots2.h5" in acts and "ft-final.h5" in acts
    assert any(a.startswith("ft-step") for a in acts)  # every log-spaced checkpoint
    results = json.loads((out / "analysis" / "results.json").read_text())
    ft = results["runs"]["tiny/mmlu/ft-final"]
    assert ft["finetuned"] and ft["checkpoint_step"] >= 1
    assert ft["provenance"]["checkpoint"].endswith("adapter-final")
    assert (out / "figures" / "report.md").is_file() and (out / "config.sha256").is_file()


@pytest.mark.slow
@pytest.mark.mpi
def test_demo_command_runs_every_stage_with_mpi_analysis(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [PYTHON, "-m", "replandscape.cli.main", "demo", "--out", str(out), "data.limit=90",
         "prompts.shots=[0,5]", "finetune.epochs=1", "analysis.maxk=40", "analysis.range_max=32",
         "analysis.id_scale_index=3"],
        env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 2 rank(s)" in proc.stderr  # configs/demo.yaml: the analysis on 2 MPI ranks
    assert "demo finished in" in proc.stdout
    for name in ("shots0.h5", "shots5.h5", "ft-final.h5"):
        assert (out / "activations" / name).is_file()
    # the implicit-pattern part: the expression task answered by generation, fine-tuned, drawn
    for name in ("shots0.h5", "shots8.h5", "ft-final.h5"):
        assert (out / "implicit-expression" / "activations" / name).is_file()
    for name in ("icl_vs_ft_demo-llama.png", "icl_vs_ft.md", "profiles_demo-llama_expression.png",
                 "rsa_alignment_demo-llama_reading.png", "rsa_attention_demo-llama_reading.png",
                 "circuit_shift_demo-llama_expression.png", "knockout_demo-llama_expression.png",
                 "patching_heads_demo-llama_expression.png"):
        assert (out / "figures" / name).is_file(), name
    # ... and its circuits: patching of the base model and every checkpoint, knockout
    circuits = json.loads((out / "implicit-expression" / "patching" / "circuits.json").read_text())
    assert {"shots0", "shots8", "ft-final"} <= set(circuits["conditions"])
    assert (out / "implicit-expression" / "knockout" / "shots8.json").is_file()
    # the report has a section for each study, with its figures
    report = (out / "figures" / "report.md").read_text()
    circuits_at = report.index("## Circuits: patching, circuit shift and knockout")
    assert "circuit_shift_demo-llama_expression.png" in report[circuits_at:]
    assert "rsa_alignment_demo-llama_reading.png" in report[
        report.index("## Similarity to task hypotheses"):]
    # the similarity part: span states and attention masses, then RSA and probes
    assert (out / "rsa-reading" / "rsa" / "results.json").is_file()
    assert (out / "rsa-reading" / "attention" / "shots2.h5").is_file()
    for name in ("profiles_demo-llama_mmlu.png", "profiles_demo-llama_mmlu.pdf", "ari_mmlu_subject.png",
                 "accuracy.md", "accuracy.tex", "report.md"):
        assert (out / "figures" / name).is_file(), name
