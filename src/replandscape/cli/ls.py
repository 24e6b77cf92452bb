"""``replandscape ls DIR``: what a run's output folder holds, and how complete it is.

Activation files (condition, rows, sites, writer, accuracy; partial runs), fine-tuned adapters,
analysis results and figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from replandscape.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("ls", help="list a run's outputs", description=__doc__)
    parser.add_argument("dir", help="a run's output folder (run.output_dir)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replandscape.storage import open_activations

    folder = Path(args.dir)
    if not folder.is_dir():
        raise UserError("no such output folder", file=str(folder), fix="pass run.output_dir")
    stamp = folder / "config.sha256"
    print(f"{folder}  config {stamp.read_text().strip()[:12] if stamp.exists() else '-'}")
    acts = folder / "activations"
    files = sorted(p for p in acts.glob("*.h5") if not p.name.endswith(".mpio.h5"))
    started = ({p.name.split(".")[0] for p in acts.glob("*.parts")}
               | {p.name.split(".")[0] for p in acts.glob("*.mpio.h5")})
    partial = sorted(started - {p.stem for p in files})
    if files or partial:
        print(f"  activations/  {'condition':14s} {'rows':>6s} {'sites':>5s} {'writer':7s} "
              f"{'micro':>6s} {'macro':>6s}")
    for path in files:
        try:
            with open_activations(path) as af:
                acc = af.accuracy
                print(f"                {path.stem:14s} {af.n_rows:6d} {len(af.site_names):5d} "
                      f"{af.attrs.get('writer', ''):7s} {acc['micro']:6.3f} {acc['macro']:6.3f}")
        except UserError as exc:
            print(f"                {path.stem:14s} DAMAGED: {exc}")
    for name in partial:
        print(f"                {name:14s} partial (resume with replandscape run extract)")
    ft_folder = finetune_folder(folder)
    index = ft_folder / "checkpoints.json"
    if index.exists():
        from replandscape.stored import read_checkpoint_index

        adapters = read_checkpoint_index(index).adapters
        steps = ", ".join(f"{a.name}@{a.step}" for a in adapters)
        where = "" if ft_folder == folder / "finetune" else f" (shared: {ft_folder})"
        print(f"  finetune/     {len(adapters)} adapter(s): {steps}{where}")
    results = folder / "analysis" / "results.json"
    if results.exists():
        from replandscape.results import read_results

        res = read_results(results)
        print(f"  analysis/     results.json: {len(res.runs)} run(s), {len(res.rows)} (run, site) rows")
    elif (folder / "analysis" / "tasks").is_dir():
        n = len(list((folder / "analysis" / "tasks").glob("*.json")))
        print(f"  analysis/     {n} task(s) done, no results.json yet")
    figures = sorted((folder / "figures").glob("*.png")) if (folder / "figures").is_dir() else []
    if figures:
        print(f"  figures/      {len(figures)} PNG(s), report.md")
    return 0


def finetune_folder(folder: Path) -> Path:
    """The fine-tuning folder of the run in ``folder``: the one its resolved ``config.yaml``
    names (``finetune.output_dir``, a folder a sweep's task experiments share), else
    ``folder/finetune`` (also when the config is missing or no longer loads)."""
    from replandscape.conditions import FINETUNE_DIR, finetune_dir
    from replandscape.config import config_from_dict, read_yaml

    path = folder / "config.yaml"
    if path.is_file():
        try:
            data = read_yaml(path)
            data.setdefault("run", {})["output_dir"] = str(folder)  # the folder may have moved
            return finetune_dir(config_from_dict(data, str(path)))
        except (UserError, AttributeError, TypeError):
            pass
    return folder / FINETUNE_DIR
