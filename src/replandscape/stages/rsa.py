"""RSA and probes of every (run, site), spread over MPI ranks, gathered into one file.

Serial (``replandscape run rsa CONFIG``) or under ``mpiexec``/``srun --mpi=pmix``, by the loop of
the geometry analysis (:func:`replandscape.dist.sites.run_sites`): one task is one site (span sites
``SITE@SPAN.POOL`` included) of one activation file whose task declares hypotheses; ranks take
tasks dynamically and write one JSON per task atomically, so a re-run skips finished tasks (same
parameters, same input file). Rank 0 gathers the task files into ``rsa/results.json``:

* ``rows``: per (run, site), the alignment (Spearman) of the site's similarity matrix with each
  hypothesis, its permutation p-value, the per-condition alignment, and the probes of the task's
  labels with their control task and selectivity;
* ``icl``: per model, task, shot count k > 0, hypothesis and site, the change of alignment from the
  0-shot run to the k-shot run, the per-condition accuracy gain and, per site, the correlation
  between the gain and the change of each condition's alignment
  (:func:`replandscape.metrics.rsa.alignment_gain_correlation`);
* ``attention``: per run whose extraction kept attention masses, the task's attention ratio
  (reading: relevant over distractor; regression: examples over query) per layer and head, per
  layer, per condition, and per k > 0 its change from 0 shots correlated per layer with each
  condition's accuracy gain (:func:`attention_ratios`).

Items come from the row columns ``label.KEY`` the extraction stores for generated tasks; a span site
keeps only the items that have the span (``has_span.SPAN``). The metrics are pure functions
(:mod:`replandscape.metrics.rsa`, :mod:`replandscape.metrics.probes`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from replandscape import __version__
from replandscape.atomic import write_text_atomic
from replandscape.config import ExperimentConfig, RsaConfig
from replandscape.dist.sites import run_sites, task_key
from replandscape.errors import UserError
from replandscape.results import n_blocks_from_sites, params_hash, site_depths

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

RESULTS_KIND = "replandscape.rsa-results"
RESULTS_SCHEMA_VERSION = 1
LABEL_PREFIX = "label."
#: The labels probed when ``rsa.probe_labels`` is null, per task.
DEFAULT_PROBE_LABELS: dict[str, tuple[str, ...]] = {
    "regression": ("slope", "intercept"),
    "reading": ("question_type", "distractor"),
}
#: The parameterized probes when ``rsa.parameterized`` is null: (label, task parameter), per task.
DEFAULT_PARAMETERIZED: dict[str, tuple[tuple[str, str], ...]] = {
    "regression": (("y", "slope"),),
    "reading": (("distractor", "question_type"),),
}
_SPAN_SITE = re.compile(r"^(?P<base>[^@]+)@(?P<span>[^.]+)\.(?P<pool>\w+)$")


@dataclass(frozen=True)
class Task:
    """One site of one activation file."""

    run: str
    task: str
    path: str
    site: str
    site_index: int
    relative_depth: float
    input_id: str

    @property
    def key(self) -> str:
        return task_key(self.run, self.site)


def rsa_params(cfg: RsaConfig) -> dict[str, Any]:
    """What changes the numbers (not which sites, nor how many threads computed them)."""
    d = dataclasses.asdict(cfg)
    for key in ("sites", "threads_per_rank"):
        d.pop(key, None)
    return d


def split_site(name: str) -> tuple[str, str | None, str | None]:
    """``(base site, span, pooling)`` of a site name; span and pooling None for a plain site."""
    m = _SPAN_SITE.match(name)
    if m is None:
        return name, None, None
    return m["base"], m["span"], m["pool"]


def depths_of(names: Sequence[str], n_blocks: int | None) -> list[float]:
    """Relative depth of every site; a span site takes the depth of the site it pools."""
    bases = list(dict.fromkeys(split_site(n)[0] for n in names))
    depth = dict(zip(bases, site_depths(bases, n_blocks_from_sites(bases) or n_blocks)))
    return [depth[split_site(n)[0]] for n in names]


def _has_hypotheses(task: str) -> bool:
    from replandscape.metrics.rsa import task_hypotheses

    try:
        task_hypotheses(task)
    except UserError:
        return False
    return True


def condition_accuracy(conditions: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Accuracy of the items of each condition."""
    conditions = np.asarray([str(c) for c in conditions])
    correct = np.asarray(correct, dtype=bool)
    return {str(c): float(correct[conditions == c].mean()) for c in sorted(set(conditions))}


def plan_tasks(cfg: ExperimentConfig, files: Sequence[Path]) -> tuple[list[Task], dict[str, Any]]:
    """Tasks for every site of every file whose task declares hypotheses, and per-run metadata
    (provenance, per-condition accuracy); files of other tasks are skipped with one line each."""
    from replandscape.stages.analyze import input_id, n_blocks_of
    from replandscape.storage import open_activations

    tasks: list[Task] = []
    runs: dict[str, Any] = {}
    wanted = cfg.rsa.sites
    for path in files:
        with open_activations(path) as af:
            attrs = af.attrs
            task_name = str(attrs.get("task", "mmlu"))
            if not _has_hypotheses(task_name):
                print(f"[rsa] skipping {path}: task '{task_name}' declares no hypotheses",
                      file=sys.stderr, flush=True)
                continue
            condition = str(attrs["condition"])
            run = f"{attrs['model_name']}/{task_name}/{condition}"
            names = af.site_names
            if wanted is not None:
                bad = [s for s in wanted if not -len(names) <= s < len(names)]
                if bad:
                    raise UserError(f"site index {bad[0]} does not exist ({path.name} holds "
                                    f"{len(names)} sites)", key="rsa.sites",
                                    fix=f"use indices 0..{len(names) - 1} (or negative from "
                                        "the end)")
            identity = input_id(path, attrs)
            depths = depths_of(names, n_blocks_of(attrs))
            accuracy = condition_accuracy(af.rows(LABEL_PREFIX + "condition"),
                                          af.rows("correct"))
            runs[run] = {
                "model": str(attrs["model_name"]), "task": task_name, "condition": condition,
                "shots": int(attrs["shots"]), "finetuned": bool(attrs.get("finetuned", False)),
                "site_names": names, "condition_accuracy": accuracy,
                "accuracy": float(np.mean(af.rows("correct"))) if af.n_rows else None,
                "provenance": {"activations": str(path), "config_hash": attrs.get("config_hash"),
                               "model_path": attrs.get("model_path"),
                               "code_version": attrs.get("code_version"),
                               "n_rows": int(attrs["n_rows"]), "input_id": identity},
            }
        for i, name in enumerate(names):
            if wanted is not None and i not in wanted and (i - len(names)) not in wanted:
                continue
            tasks.append(Task(run, task_name, str(path), name, i, depths[i], identity))
    return tasks, runs


# --------------------------------------------------------------------------------------------
# one task
# --------------------------------------------------------------------------------------------


def _numeric(values: np.ndarray) -> np.ndarray | None:
    try:
        return np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def probe_kind(values: np.ndarray) -> str:
    """``regression`` for a label of numbers with more than 2 distinct values, else
    ``classification`` (a 0/1 flag is a class, a slope is a number)."""
    numbers = _numeric(values)
    if numbers is not None and len(np.unique(numbers)) > 2:
        return "regression"
    return "classification"


def load_task(task: Task, probe_labels: Sequence[str]
              ) -> tuple[np.ndarray, list[dict[str, str]], dict[str, np.ndarray]]:
    """The ``[n, D]`` array of the task's site, each item's labels (``label.`` stripped), and the
    probed label columns; a span site keeps the items that have the span."""
    from replandscape.storage import open_activations

    _, span, _ = split_site(task.site)
    with open_activations(task.path) as af:
        fields = af.row_fields
        keep = np.ones(af.n_rows, dtype=bool)
        if span is not None and f"has_span.{span}" in fields:
            keep = np.asarray(af.rows(f"has_span.{span}"), dtype=bool)
        rows = np.flatnonzero(keep)
        columns = {f[len(LABEL_PREFIX):]: af.rows(f)[rows] for f in fields
                   if f.startswith(LABEL_PREFIX)}
        if "condition" not in columns:
            af.rows(LABEL_PREFIX + "condition")  # the one-line error naming the file
        missing = [name for name in probe_labels if name not in columns]
        if missing:
            raise UserError(f"no label '{missing[0]}' to probe (the file's labels: "
                            f"{', '.join(sorted(columns)) or 'none'})", file=task.path,
                            key="rsa.probe_labels", fix="probe labels the task stores")
        x = af.site(task.site, rows)
    labels = [{k: str(v[i]) for k, v in columns.items()} for i in range(len(rows))]
    return x, labels, {name: columns[name] for name in probe_labels}


def _hypotheses(task: Task, labels: Sequence[Mapping[str, str]], level: str
                ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The task's hypothesis matrices over these items, and the hypotheses left out with their
    reason (one that is the same for every pair of these rows predicts nothing here, e.g. the
    question type over the items that all have a distractor of one type)."""
    from replandscape.metrics.rsa import hypothesis_matrices, task_hypotheses, upper_triangle

    pairs = task_hypotheses(task.task)
    try:
        _, matrices = hypothesis_matrices(pairs, labels, level=level, task=task.task)
    except KeyError as exc:
        raise UserError(f"task '{task.task}': a hypothesis reads label {exc}, which the file "
                        "does not store", file=task.path, key=f"rows/{LABEL_PREFIX}{exc.args[0]}",
                        fix="re-run the extraction with this version") from None
    kept, left = {}, {}
    for name, m in matrices.items():
        tri = upper_triangle(m)
        if len(tri) and np.all(np.isfinite(tri)) and np.ptp(tri) == 0:
            left[name] = "the same for every pair of rows"
        else:
            kept[name] = m
    return kept, left


def run_task(task: Task, cfg: ExperimentConfig, probe_labels: Sequence[str],
             threads: int) -> dict[str, Any]:
    """RSA against every hypothesis and every probe of one site; the task's results row."""
    from threadpoolctl import threadpool_limits

    from replandscape.metrics.probes import ProbeParams, probe
    from replandscape.metrics.rsa import RSAParams, rsa

    t0 = time.perf_counter()
    p = cfg.rsa
    x, labels, columns = load_task(task, probe_labels)
    base, span, pool = split_site(task.site)
    conditions = [lab["condition"] for lab in labels]
    row: dict[str, Any] = {"run": task.run, "site": task.site, "site_index": task.site_index,
                           "base_site": base, "span": span, "pooling": pool,
                           "relative_depth": task.relative_depth, "n_items": len(labels),
                           "n_conditions": len(set(conditions))}
    matrices, left = _hypotheses(task, labels, p.level)
    n_rows = len(set(conditions)) if p.level == "condition" else len(labels)
    with threadpool_limits(limits=threads):
        if n_rows < 3 or not matrices:
            row["rsa"] = None
            row["rsa_skipped"] = (f"{n_rows} {p.level}(s), RSA needs at least 3" if n_rows < 3
                                  else "no hypothesis separates these rows")
        else:
            result = rsa(x, conditions, matrices, task=task.task,
                         params=RSAParams(level=p.level, n_permutations=p.n_permutations,
                                          seed=p.seed, zscore=p.zscore))
            data = result.to_json_dict()
            if p.level == "item":
                data.pop("similarity")  # items x items: large, and no reader needs it
            row["rsa"] = data
        row["alignment"] = dict(row["rsa"]["correlation"]) if row["rsa"] else {}
        row["p_value"] = dict(row["rsa"]["p_value"]) if row["rsa"] else {}
        row["hypotheses_left_out"] = left
        params = ProbeParams(folds=p.folds, seed=p.seed, threads=threads)
        probes = {}
        for name, values in columns.items():
            if probe_kind(values) == "regression":
                probes[name] = probe(x, values.astype(np.float64), kind="regression",
                                     task=task.task, label=name, params=params)
            else:
                probes[name] = probe(x, values, kind="classification", task=task.task,
                                     label=name, params=params)
        row["probes"] = {name: r.to_json_dict() for name, r in probes.items()}
        row["parameterized"] = parameterized_probes(task, cfg, x, labels, params)
    row["seconds_total"] = time.perf_counter() - t0
    return row


def parameterized_probes(task: Task, cfg: ExperimentConfig, x: np.ndarray,
                         labels: Sequence[Mapping[str, str]], params: Any) -> dict[str, Any]:
    """Probe performance against a task parameter: each (label, parameter) pair's probe run
    within every value of the parameter (``rsa.parameterized``, or the task's own pairs, which
    are skipped where the file lacks their labels)."""
    from replandscape.metrics.probes import parameterized_probe

    explicit = cfg.rsa.parameterized is not None
    pairs = cfg.rsa.parameterized if explicit else DEFAULT_PARAMETERIZED.get(task.task, ())
    out: dict[str, Any] = {}
    for pair in pairs or ():
        if len(pair) != 2:
            raise UserError(f"{list(pair)} is not [label, parameter]", key="rsa.parameterized",
                            fix="write e.g. [[y, slope]]")
        label, parameter = pair
        if not labels or label not in labels[0] or parameter not in labels[0]:
            if explicit:
                raise UserError(f"no label '{label}' or '{parameter}' in the file",
                                file=task.path, key="rsa.parameterized",
                                fix="name labels the task stores")
            continue
        y = np.asarray([lab[label] for lab in labels])
        parameter_values = np.asarray([lab[parameter] for lab in labels])
        if probe_kind(y) == "regression":
            result = parameterized_probe(x, y.astype(np.float64), parameter_values,
                                         kind="regression", task=task.task, label=label,
                                         parameter_name=parameter, params=params)
        else:
            result = parameterized_probe(x, y, parameter_values, kind="classification",
                                         task=task.task, label=label, parameter_name=parameter,
                                         params=params)
        out[f"{label}|{parameter}"] = result.to_json_dict()
    return out


# --------------------------------------------------------------------------------------------
# before and after in-context learning
# --------------------------------------------------------------------------------------------


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def icl_changes(runs: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
                ) -> list[dict[str, Any]]:
    """Per model, task, k > 0 and hypothesis: the change of alignment at every site from the
    0-shot run to the k-shot run, and per site the correlation between each condition's
    accuracy gain and the change of its alignment (condition level only)."""
    from replandscape.metrics.rsa import alignment_gain_correlation

    by_run: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        by_run.setdefault(r["run"], {})[r["site"]] = r
    base_runs = {(m["model"], m["task"]): run for run, m in runs.items()
                 if m["shots"] == 0 and not m["finetuned"]}
    out = []
    for run, meta in sorted(runs.items(), key=lambda kv: (kv[1]["model"], kv[1]["task"],
                                                          kv[1]["shots"])):
        base = base_runs.get((meta["model"], meta["task"]))
        if meta["finetuned"] or meta["shots"] == 0 or base is None:
            continue
        sites = [s for s in meta["site_names"] if s in by_run.get(run, {})
                 and s in by_run.get(base, {})]
        hyps = sorted({h for s in sites for h in (by_run[run][s]["alignment"] or {})})
        acc0, acck = runs[base]["condition_accuracy"], meta["condition_accuracy"]
        for hyp in hyps:
            before = [_float(by_run[base][s]["alignment"].get(hyp)) for s in sites]
            after = [_float(by_run[run][s]["alignment"].get(hyp)) for s in sites]
            entry: dict[str, Any] = {
                "model": meta["model"], "task": meta["task"], "shots": meta["shots"],
                "run": run, "baseline": base, "hypothesis": hyp, "sites": sites,
                "relative_depth": [by_run[run][s]["relative_depth"] for s in sites],
                "alignment_0": before, "alignment_k": after,
                "delta_alignment": [a - b for a, b in zip(after, before)],
            }
            # the conditions both runs represent at every site, in one order
            common: list[str] | None = None
            for s in sites:
                for r in (by_run[base][s], by_run[run][s]):
                    rows_here = r["rsa"]["rows"] if r["rsa"] and r["rsa"]["level"] == "condition" \
                        and r["rsa"]["row_correlation"].get(hyp) else []
                    common = [c for c in (rows_here if common is None else common)
                              if c in rows_here]
            common = [c for c in (common or []) if c in acc0 and c in acck]
            if len(common) < 3:
                entry.update(conditions=common, accuracy_gain=None, delta_per_condition=None,
                             gain_correlation=None,
                             gain_skipped=f"{len(common)} condition(s) in both runs at "
                                          "condition level, the correlation needs 3")
                out.append(entry)
                continue
            gain = [acck[c] - acc0[c] for c in common]
            delta = []
            for s in sites:
                per = []
                for r in (by_run[run][s], by_run[base][s]):
                    index = {c: i for i, c in enumerate(r["rsa"]["rows"])}
                    values = r["rsa"]["row_correlation"][hyp]
                    per.append([_float(values[index[c]]) for c in common])
                delta.append([a - b for a, b in zip(*per)])
            corr = alignment_gain_correlation(gain, delta, task=meta["task"])
            entry.update(conditions=common, accuracy_gain=gain, delta_per_condition=delta,
                         gain_correlation=corr.to_json_dict())
            out.append(entry)
    return out


#: The attention ratio of each task: the mass on the first span over the mass on the second.
ATTENTION_RATIOS: dict[str, tuple[str, str]] = {
    "reading": ("relevant", "distractor"),
    "regression": ("examples", "query"),
}


def attention_ratios(cfg: ExperimentConfig, runs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per run with attention masses (``attention/CONDITION.h5``, ``extract.attention_spans``):
    the task's attention ratio per layer and head (mean mass on the first span over the mean
    mass on the second, over the items that have both), per layer averaged over heads, and per
    condition; then per k > 0 the change of the per-condition ratio from 0 shots, correlated per
    layer with each condition's accuracy gain."""
    import h5py

    from replandscape.metrics.rsa import alignment_gain_correlation
    from replandscape.storage import open_activations

    found: dict[str, dict[str, Any]] = {}
    for run, meta in runs.items():
        pair = ATTENTION_RATIOS.get(meta["task"])
        path = cfg.output_dir / "attention" / f"{meta['condition']}.h5"
        if pair is None or not path.is_file():
            continue
        with h5py.File(path, "r") as fh:
            if not all(f"mass/{span}" in fh for span in pair):
                continue
            a, b = (fh[f"mass/{span}"][:] for span in pair)  # [N, L, H]
            qids = fh["rows/question_id"][:]
        with open_activations(meta["provenance"]["activations"]) as af:
            order = {int(q): i for i, q in enumerate(af.rows("question_id"))}
            conditions = af.rows(LABEL_PREFIX + "condition")
        cond = np.asarray([conditions[order[int(q)]] for q in qids])
        both = np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=(1, 2)) & (
            b.sum(axis=(1, 2)) > 0)
        if not both.any():
            continue
        head = a[both].mean(0) / np.maximum(b[both].mean(0), 1e-12)  # [L, H]
        per_condition = {}
        for c in sorted(set(cond[both].tolist())):
            rows = both & (cond == c)
            per_condition[c] = (a[rows].mean((0, 2)) / np.maximum(b[rows].mean((0, 2)), 1e-12)
                                ).tolist()
        found[run] = {"run": run, "model": meta["model"], "task": meta["task"],
                      "shots": meta["shots"], "finetuned": meta["finetuned"],
                      "spans": list(pair), "n_items": int(both.sum()),
                      "ratio_per_head": head.tolist(),
                      "ratio_per_layer": (a[both].mean((0, 2)) / np.maximum(
                          b[both].mean((0, 2)), 1e-12)).tolist(),
                      "ratio_per_condition": per_condition}
    base = {(m["model"], m["task"]): found[r] for r, m in runs.items()
            if r in found and m["shots"] == 0 and not m["finetuned"]}
    for run, entry in found.items():
        zero = base.get((entry["model"], entry["task"]))
        if zero is None or entry["shots"] == 0 or entry["finetuned"]:
            continue
        acc0, acck = runs[zero["run"]]["condition_accuracy"], runs[run]["condition_accuracy"]
        common = [c for c in entry["ratio_per_condition"] if c in zero["ratio_per_condition"]
                  and c in acc0 and c in acck]
        if len(common) < 3:
            entry["gain_correlation"] = None
            continue
        gain = [acck[c] - acc0[c] for c in common]
        delta = np.asarray([[entry["ratio_per_condition"][c][layer]
                             - zero["ratio_per_condition"][c][layer] for c in common]
                            for layer in range(len(entry["ratio_per_layer"]))])
        entry.update(conditions=common, accuracy_gain=gain,
                     gain_correlation=alignment_gain_correlation(
                         gain, delta, task=entry["task"]).to_json_dict())
    return list(found.values())


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-ready: NaN and infinities as null, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


def _check(cfg: ExperimentConfig) -> None:
    """The asked task declares hypotheses; the counts are usable."""
    from replandscape.metrics.rsa import task_hypotheses

    where = cfg.source_file or None
    try:
        task_hypotheses(cfg.task.name)
    except UserError:
        raise UserError(f"task '{cfg.task.name}' declares no hypotheses for the RSA",
                        file=where, key="task.name",
                        fix="run rsa on a task with designed conditions (regression, reading)"
                        ) from None
    if cfg.rsa.n_permutations < 0:
        raise UserError("must be 0 or more", file=where, key="rsa.n_permutations",
                        fix="use e.g. 1000 (0: no test)")
    if cfg.rsa.folds < 2:
        raise UserError("probes need at least 2 folds", file=where, key="rsa.folds",
                        fix="use e.g. 5")


def run(cfg: ExperimentConfig) -> Path:
    """RSA and probes of every (run, site) of ``cfg``'s activations; returns the results path."""
    from replandscape.stages.analyze import activation_files

    params = rsa_params(cfg.rsa)
    phash = params_hash(params)

    def plan() -> tuple[list[Task], dict[str, Any]]:
        _check(cfg)
        return plan_tasks(cfg, activation_files(cfg))

    def compute(task: Task, threads: int) -> dict[str, Any]:
        probe_labels = cfg.rsa.probe_labels
        if probe_labels is None:
            probe_labels = DEFAULT_PROBE_LABELS.get(task.task, ())
        return _plain(run_task(task, cfg, probe_labels, threads))

    def write(runs: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
        rows.sort(key=lambda r: (r["run"], r["site_index"]))
        results = {"kind": RESULTS_KIND, "schema_version": RESULTS_SCHEMA_VERSION,
                   "code_version": __version__, "rsa_params": params, "rsa_params_hash": phash,
                   "runs": runs, "rows": rows, "icl": icl_changes(runs, rows),
                   "attention": attention_ratios(cfg, runs)}
        write_text_atomic(path, json.dumps(_plain(results), indent=1, allow_nan=False))

    return run_sites("rsa", cfg.output_dir / "rsa", phash, plan=plan, compute=compute,
                     write=write, threads_per_rank=cfg.rsa.threads_per_rank)
