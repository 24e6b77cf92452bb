"""The MPI analysis layer: wall time of all (run, site) tasks over 1, 2 and 4 ranks.

Writes one synthetic activation file of 34 sites (planted clusters, N points of width D, through the
storage contract), then runs ``replandscape run analyze`` under ``mpiexec -n R`` for each R with the
threads per rank set so every run uses the same total number of threads (as far as the machine
allows). Prints the table, the measured cost per task, and a projection for the paper's sweep.

    .venv/bin/python benchmarks/bench_mpi_analysis.py                 # N=3000, D=1024, 34 sites
    .venv/bin/python benchmarks/bench_mpi_analysis.py --n 1500 --d 256 --ranks 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def write_activations(folder: Path, n: int, d: int, n_sites: int, seed: int = 0) -> None:
    from replandscape.storage import ShardWriter, SiteSpec, finalize_shards

    rng = np.random.default_rng(seed)
    subjects = np.asarray([f"s{i % 20:02d}" for i in range(n)], dtype=object)
    answers = rng.integers(0, 4, size=n)
    centres = rng.normal(size=(20, d)) * 4
    names = [f"input_layernorm.{i:02d}" for i in range(n_sites - 2)] + ["norm", "logits"]
    specs = [SiteSpec(name, d, "float32") for name in names]
    final = folder / "activations" / "shots0.h5"
    final.parent.mkdir(parents=True)
    writer = ShardWriter(final, 0, 1, 0, n, specs, "bench")
    codes = np.asarray([int(s[1:]) for s in subjects])
    values = {}
    for i, name in enumerate(names):
        spread = 0.5 + 2.0 * i / len(names)  # clusters blur with depth
        values[name] = (centres[codes] + rng.normal(size=(n, d)) * spread).astype(np.float32)
    writer.write(np.arange(n), values, {"question_id": np.arange(n), "answer": answers,
                                        "predicted": answers, "correct": np.ones(n, bool),
                                        "n_tokens": np.full(n, 100)})
    writer.close()
    header = {"site_names": names, "model_name": "bench", "model_path": "-", "model_revision": "",
              "condition": "shots0", "shots": 0, "checkpoint": "", "checkpoint_step": -1,
              "finetuned": False, "config": "", "config_hash": "-", "stage_hash": "bench",
              "code_version": "-", "world_size": 1}
    finalize_shards(final, 1, specs, header, list(subjects), [""] * n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--sites", type=int, default=34)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--maxk", type=int, default=1000)
    parser.add_argument("--total-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-mpi-"))
    write_activations(tmp / "data", args.n, args.d, args.sites)
    print(f"{args.sites} sites of {args.n} x {args.d}, maxk {args.maxk}, "
          f"{args.total_threads} threads in all, {os.cpu_count()} cores")
    print(f"{'ranks':>5} {'threads/rank':>12} {'wall s':>8} {'s/task':>8} {'speed-up':>8}")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               HDF5_USE_FILE_LOCKING="FALSE")
    base = None
    per_task = {}
    for ranks in args.ranks:
        out = tmp / f"r{ranks}"
        shutil.copytree(tmp / "data", out)
        threads = max(1, args.total_threads // ranks)
        cfg = {"run": {"output_dir": str(out)}, "data": {"source": "builtin:demo-mmlu"},
               "model": {"path": "builtin:tiny-llama"},
               "analysis": {"maxk": args.maxk, "range_max": min(100, args.maxk),
                            "threads_per_rank": threads, "dendrogram": False,
                            "per_subject_cap": None}}
        path = out / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "replandscape.cli.main", "run", "analyze", str(path)]
        if ranks > 1:
            cmd = ["mpiexec", "-n", str(ranks), "--oversubscribe", "--bind-to", "none", *cmd]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        wall = time.perf_counter() - t0
        rows = json.loads((out / "analysis" / "results.json").read_text())["rows"]
        task_s = float(np.mean([r["seconds_total"] for r in rows]))
        per_task[ranks] = task_s
        base = base or wall
        print(f"{ranks:>5} {threads:>12} {wall:>8.1f} {task_s:>8.2f} {base / wall:>8.2f}",
              flush=True)
    # projection: 3 models x 6 conditions x (34 + 82 + 34) sites on 16 nodes
    tasks = 6 * (34 + 82 + 34)
    one = per_task[min(per_task)]
    print(f"measured cost per task (1 rank, {args.total_threads} threads): {one:.2f} s at "
          f"N={args.n}, D={args.d}")
    print(f"paper sweep: {tasks} tasks; with that cost on 16 nodes x 1 rank: "
          f"{tasks * one / 16 / 60:.1f} min (scale the cost with N^2 D for the real sizes)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
