"""``replandscape status DIR``: every job of the sweeps submitted into DIR, with its Slurm state
(from sacct), its progress (outputs complete, by the same test ``submit`` uses to skip them:
a fine-tuning run cut short is not counted until its ``result.json`` is written) and, for failed
jobs, the error line of its log."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from replandscape.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("status", help="show the jobs of a submitted sweep",
                            description=__doc__)
    parser.add_argument("dir", help="the sweep's output root (holds sweep-<name>.json)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replandscape.launch import TERMINAL_BAD, job_config, job_states, last_error_line
    from replandscape.sweep import output_complete

    folder = Path(args.dir)
    records = sorted(folder.glob("sweep-*.json"))
    if not records:
        raise UserError("no submitted sweep here (no sweep-*.json)", file=str(folder),
                        fix="pass the output root given to 'replandscape submit'")
    failed = 0
    for path in records:
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("jobs"), list):
                raise ValueError("not a sweep record")
        except ValueError as exc:
            raise UserError(f"the sweep record cannot be read ({exc})", file=str(path),
                            fix="delete it; submit the sweep again (complete outputs are "
                                "skipped)") from None
        ids = [i for j in record["jobs"] for i in j["job_ids"]]
        states = job_states(ids)
        print(f"sweep {record['sweep']} ({path})")
        print(f"  {'job':34s} {'slurm id':12s} {'state':12s} {'outputs':8s}")
        for job in record["jobs"]:
            outputs = job["outputs"]
            cfg = job_config(job)
            complete = sum(output_complete(job["stage"], o, cfg) for o in outputs)
            progress = f"{complete}/{len(outputs)}"
            if not job["job_ids"]:
                print(f"  {job['key']:34s} {'-':12s} {'SKIPPED':12s} {progress:8s}")
                continue
            labels = job.get("labels") or [""] * len(job["job_ids"])
            for k, jid in enumerate(job["job_ids"]):
                state = states.get(jid, "UNKNOWN")
                outputs_k = job.get("task_outputs", [])
                if (state == "COMPLETED" and k < len(outputs_k)
                        and not output_complete(job["stage"], outputs_k[k], cfg)):
                    state = "NO-OUTPUT"  # Slurm said completed, but the stage left no marker
                name = job["key"] + (f"[{labels[k]}]" if labels[k] else "")
                print(f"  {name:34s} {jid:12s} {state:12s} {progress:8s}")
                if state in TERMINAL_BAD or state == "NO-OUTPUT":
                    failed += 1
                    log = Path(job["logs"][k])
                    print(f"      error: {last_error_line(log)}")
                    print(f"      log:   {log}")
    return 1 if failed else 0
