"""``replandscape demo [--out DIR] [KEY=VALUE ...]``: the whole pipeline on the embedded default.

Offline, on CPU: the bundled MMLU-shaped data, a tiny Llama built on first use, prompts at
0/1/2/5 shots, extraction, a short LoRA fine-tune and the extraction of its checkpoints, the
analysis on 2 MPI ranks; then the same for an implicit-pattern task (expression, answered by
generation at 0-8 shots, with activation patching and attention knockout of its conditions,
configs/demo-implicit.yaml) into DIR/implicit-expression, and for the reading task with span
states, attention masses and the RSA and probes (configs/demo-rsa.yaml) into DIR/rsa-reading;
then the figures of all parts in DIR/figures. KEY=VALUE overrides apply to the MMLU part
(``cluster`` and ``analysis.*`` ones to all); ``--no-implicit`` skips the task parts. With ``cluster=local-slurm`` every stage runs as a real Slurm job instead
(start the cluster with ``slurm/cluster.sh start``). Re-running resumes: finished outputs are
kept and skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from replandscape.config import ExperimentConfig, config_root, load_config, save_resolved


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the whole pipeline on the bundled demo",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--config", default=None, help="config file (default configs/demo.yaml)")
    parser.add_argument("--no-implicit", action="store_true",
                        help="skip the implicit-pattern task part")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replandscape.pipeline import run_analyze_mpi, run_stage, stages_of

    config_file = args.config or str(config_root() / "demo.yaml")
    overrides = [f"run.output_dir={args.out}", *args.overrides]
    cfg = load_config(config_file, overrides)
    parts = [(config_file, overrides, cfg)]
    # the stages a part runs beyond its pipeline: the studies each task part demonstrates
    extra: dict[str, tuple[str, ...]] = {}
    if not args.no_implicit:
        # the cluster and the analysis parameters are shared, so all parts are drawn together
        shared = [o for o in args.overrides if o.startswith(("cluster", "analysis."))]
        for name, folder, stages in (("demo-implicit.yaml", "implicit-expression",
                                      ("patch", "knockout")),
                                     ("demo-rsa.yaml", "rsa-reading", ("rsa",))):
            part_file = str(config_root() / name)
            part_overrides = [f"run.output_dir={cfg.output_dir / folder}", *shared]
            parts.append((part_file, part_overrides, load_config(part_file, part_overrides)))
            extra[part_file] = stages
    if cfg.cluster.executor == "slurm":
        from replandscape.launch import submit_experiment

        code = 0
        for file, part_overrides, _ in parts:
            code = code or submit_experiment(file, part_overrides, wait=True,
                                             studies=extra.get(file, ()))
        return code
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    for file, part_overrides, part in parts:
        save_resolved(part, part.output_dir)
        label = "" if part is cfg else f"{part.task.name} "
        for stage in [*stages_of(part), *extra.get(file, ())]:
            if stage == "figures":
                continue  # drawn once below, from every part's results
            t = time.perf_counter()
            print(f"== {label}{stage}", file=sys.stderr, flush=True)
            if stage == "analyze" and part.analysis.ranks > 1:
                run_analyze_mpi(file, part_overrides, part.analysis.ranks)
            else:
                run_stage(stage, part)
            timings[label + stage] = time.perf_counter() - t
    t = time.perf_counter()
    print("== figures", file=sys.stderr, flush=True)
    draw_figures(cfg, [p.output_dir for _, _, p in parts])
    timings["figures"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    print("\n".join(f"  {k:22s} {v:7.1f} s" for k, v in timings.items()), file=sys.stderr)
    print(f"demo finished in {total:.0f} s: {cfg.output_dir}/figures/report.md")
    return 0


def draw_figures(cfg: ExperimentConfig, part_dirs: list[Path]) -> None:
    """Every part's figures into the first part's ``figures/``: each part's circuit (patching,
    knockout) and similarity figures, then the geometry of all parts together and the report
    over all of them."""
    from replandscape.figures import render_all
    from replandscape.pipeline import study_figures, study_sections
    from replandscape.results import read_results

    out = cfg.output_dir / "figures"
    files = study_figures(part_dirs, out, cfg.figures.formats)
    files += render_all([read_results(d / "analysis" / "results.json") for d in part_dirs], out,
                        what=cfg.figures.what, formats=cfg.figures.formats,
                        studies=study_sections(files))
    print(f"[figures] {len(files)} files -> {out}", file=sys.stderr)
