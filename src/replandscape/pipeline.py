"""The stages by name, in pipeline order, and how each is called in-process.

Stage code knows nothing about launching: the CLI (``replandscape run``), the demo and the Slurm
wrappers in ``jobs/`` all call :func:`run_stage`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from replandscape.config import ExperimentConfig
from replandscape.errors import UserError

STAGES = ("extract", "finetune", "extract-ft", "analyze", "figures")
# stages run on request only (not by ``run all`` or the demo)
EXTRA_STAGES = ("patch", "knockout", "rsa")
STAGE_HELP = {
    "extract": "k-shot prompts -> activations/shots{k}.h5 (DeepSpeed ZeRO-3 across ranks)",
    "finetune": "LoRA fine-tuning -> finetune/adapter-*",
    "extract-ft": "0-shot extraction of the fine-tuned checkpoints -> activations/ft-*.h5",
    "analyze": "geometry of every (run, site) over MPI ranks -> analysis/results.json",
    "figures": "offline figures and report -> figures/",
    "patch": "activation + attribution patching per condition, circuit shift -> patching/",
    "knockout": "attention knockout of position sets and a one-token scan -> knockout/",
    "rsa": "similarity to task hypotheses and probes of every (run, site) over MPI ranks -> "
           "rsa/results.json",
}


def stages_of(cfg: ExperimentConfig) -> list[str]:
    """The stages ``run all`` runs for ``cfg``, in order (fine-tuning only when enabled)."""
    return [s for s in STAGES
            if not (s in ("finetune", "extract-ft") and not cfg.finetune.enabled)]


def run_stage(name: str, cfg: ExperimentConfig, **kwargs: Any) -> Any:
    """Run one stage in this process (ranks, if any, come from the environment); with
    ``REPLANDSCAPE_PEAK_MEMORY=DIR`` each rank records its peak memory (:mod:`memprobe`)."""
    from replandscape.memprobe import track_peak_memory

    with track_peak_memory(name):
        return _run_stage(name, cfg, **kwargs)


def _run_stage(name: str, cfg: ExperimentConfig, **kwargs: Any) -> Any:
    if name == "extract":
        from replandscape.stages import extract

        return extract.run(cfg, **kwargs)
    if name == "extract-ft":
        from replandscape.stages import extract

        return extract.run(cfg, finetuned=True, **kwargs)
    if name == "finetune":
        if not cfg.finetune.enabled:
            print("[finetune] disabled (finetune.enabled: false)", file=sys.stderr)
            return None
        from replandscape.stages import finetune

        return finetune.run(cfg)
    if name == "analyze":
        from replandscape.stages import analyze

        return analyze.run(cfg)
    if name == "figures":
        return render_figures(cfg)
    if name == "patch":
        from replandscape.stages import patch

        return patch.run(cfg)
    if name == "knockout":
        from replandscape.stages import knockout

        return knockout.run(cfg)
    if name == "rsa":
        from replandscape.stages import rsa

        return rsa.run(cfg)
    raise UserError(f"unknown stage '{name}'", key="STAGE",
                    fix=f"use one of {', '.join(STAGES + EXTRA_STAGES)}")


def render_figures(cfg: ExperimentConfig) -> list[Path]:
    from replandscape.figures import render_all
    from replandscape.results import read_results

    results = read_results(cfg.output_dir / "analysis" / "results.json")
    files = study_figures([cfg.output_dir], cfg.output_dir / "figures", cfg.figures.formats)
    files += render_all([results], cfg.output_dir / "figures", what=cfg.figures.what,
                        formats=cfg.figures.formats, studies=study_sections(files))
    print(f"[figures] {len(files)} files -> {cfg.output_dir / 'figures'}", file=sys.stderr)
    return files


def study_figures(run_dirs: Sequence[Path], out: Path, formats: Sequence[str]) -> list[Path]:
    """The circuit (patching, knockout) and similarity (RSA, probes) figures of the runs in
    ``run_dirs``, where those stages have run, into ``out``."""
    from replandscape.figures.circuits import render_circuits
    from replandscape.figures.rsa import render_rsa

    files: list[Path] = []
    for run_dir in run_dirs:
        files += render_circuits(run_dir, out, formats)
        rsa_results = run_dir / "rsa" / "results.json"
        if rsa_results.is_file():
            files += render_rsa(rsa_results, out, formats)
    return files


def study_sections(files: Sequence[Path]) -> list[tuple[str, list[Path]]]:
    """The report's sections of :func:`study_figures`' files, by the figures' name prefixes."""
    sections = (("Circuits: patching, circuit shift and knockout",
                 ("patching_", "circuit_shift_", "knockout_")),
                ("Similarity to task hypotheses, probes and attention ratios", ("rsa_",)))
    return [(title, [f for f in files if f.name.startswith(prefixes)])
            for title, prefixes in sections]


def mpi_command(ranks: int) -> list[str]:
    """An mpiexec prefix for ``ranks`` local ranks (allowed as root, oversubscribed if needed)."""
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        raise UserError("mpiexec not found", key="analysis.ranks",
                        fix="install Open MPI (make setup) or set analysis.ranks=1")
    return [exe, "-n", str(ranks), "--oversubscribe", "--bind-to", "none"]


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_analyze_mpi(config_file: str, overrides: Sequence[str], ranks: int) -> None:
    """Run the analysis stage under mpiexec with ``ranks`` ranks (the demo's local path)."""
    if ranks <= 1:
        raise ValueError("use run_stage for one rank")
    cmd = mpi_command(ranks) + [sys.executable, "-m", "replandscape.cli.main", "run", "analyze",
                                config_file, *overrides]
    env = stage_env()
    env.pop("OMP_NUM_THREADS", None)  # the analysis caps its own threads per rank
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise UserError(f"the MPI analysis failed (exit {proc.returncode})", key="analyze",
                        fix="see the rank's error above")
