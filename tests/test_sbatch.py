"""Rendered sbatch scripts equal stored references (regenerate them deliberately when a template
changes: replandscape sbatch STAGE configs/experiments/mmlu-llama3-70b.yaml cluster=example-gpu
analysis.ranks=16 > tests/data/sbatch/STAGE-llama3-70b-example-gpu.sbatch)."""

from __future__ import annotations

import subprocess

import pytest

from helpers import REPO, cli, one_line_error

REFERENCES = REPO / "tests" / "data" / "sbatch"


@pytest.mark.parametrize("stage", ["extract", "finetune", "analyze"])
def test_rendered_script_matches_reference(stage: str) -> None:
    proc = cli("sbatch", stage, "configs/experiments/mmlu-llama3-70b.yaml", "cluster=example-gpu",
               "analysis.ranks=16")
    assert proc.returncode == 0, proc.stderr
    reference = (REFERENCES / f"{stage}-llama3-70b-example-gpu.sbatch").read_text()
    assert proc.stdout == reference
    assert subprocess.run(["bash", "-n"], input=proc.stdout, text=True).returncode == 0


def test_resources_follow_the_model_and_profile() -> None:
    text = (REFERENCES / "extract-llama3-70b-example-gpu.sbatch").read_text()
    assert "--ntasks-per-node=4" in text and "--gpus-per-node=4" in text  # one task per GPU
    assert "--array=0-3" in text and "SHOTS=(0 1 2 5)" in text
    text = (REFERENCES / "analyze-llama3-70b-example-gpu.sbatch").read_text()
    assert "--ntasks=16" in text and "srun --mpi=pmix" in text
    assert "module load openmpi/4.1 hdf5/1.14-mpi" in text  # site setup from the profile only


def test_local_profile_is_refused() -> None:
    line = one_line_error(cli("sbatch", "extract", "configs/demo.yaml"))
    assert "cluster.executor" in line
