"""Small helpers shared by tests: tiny experiment configs, the CLI in a subprocess, rank launches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

TINY_MODEL = {"name": "tiny", "path": "builtin:tiny-llama", "family": "llama", "n_layers": 3,
              "hidden_size": 32, "tiny_intermediate_size": 64, "tiny_heads": 4,
              "context_length": 2048, "n_params_b": 0.0001, "gpus": 1, "gpus_per_node": 1}


def tiny_config(tmp: Path, name: str = "cfg.yaml", **sections: Any) -> Path:
    """Write a small experiment config (tiny model, bundled data) and return its path."""
    data: dict[str, Any] = {
        "run": {"name": "t", "output_dir": str(tmp / "out")},
        "data": {"source": "builtin:demo-mmlu", "limit": 48},
        "prompts": {"shots": [0, 2]},
        "model": dict(TINY_MODEL),
        "extract": {"batch_size": 8, "store_dtype": "float32"},
        "analysis": {"maxk": 20, "range_max": 16, "id_scale_index": 2, "density_k": 8,
                     "dendrogram_min_size": 3, "ranks": 2},
        "finetune": {"lora_rank": 4, "lora_alpha": 8, "effective_batch": 8, "micro_batch": 4,
                     "max_seq_len": 256, "samples_per_subject": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return path


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HDF5_USE_FILE_LOCKING="FALSE",
               PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    out.update(extra)
    return out


def cli(*args: str, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "replandscape.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, env=env(**extra_env), cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_ranks(world: int, args: list[str], timeout: float = 600,
                 **extra_env: str) -> list[subprocess.CompletedProcess[str]]:
    """Run the CLI as ``world`` torch.distributed ranks (gloo on CPU), like torchrun would."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra_env)
        procs.append(subprocess.Popen([PYTHON, "-m", "replandscape.cli.main", *args], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=REPO))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert a user error: non-zero exit, one line on stderr, no traceback; return the line."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("replandscape: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def read_train_log(out: Path) -> list[dict[str, Any]]:
    """The optimiser-step lines of a fine-tuning run's ``finetune/train_log.jsonl``."""
    import json

    lines = (out / "finetune" / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "loss" in json.loads(line)]


def worker_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment of torch rank ``rank`` of ``world`` on this host, free of any launcher's
    variables (a test may itself run under Slurm or mpiexec)."""
    out = dict(os.environ)
    for key in list(out):
        if key.startswith(("SLURM_", "OMPI_COMM_WORLD", "PMI_")):
            del out[key]
    out.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return out


def launch_workers(script: Path, spec: dict[str, Any], world: int,
                   timeout: float) -> list[subprocess.CompletedProcess[str]]:
    """Run ``world`` ranks of ``python SCRIPT worker SPEC`` (a test file's own worker) and wait
    for all of them; output and errors together in ``stdout``."""
    import json

    port = free_port()
    procs = [subprocess.Popen([PYTHON, str(script), "worker", json.dumps(spec)],
                              env=worker_env(rank, world, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    done = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, None))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return done
