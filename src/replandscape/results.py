"""Contract of the analysis results file (``analysis/results.json``): the one reader and writer.

The figures read nothing else, so this module imports neither torch nor mpi4py.

Layout (``schema_version`` 2: a run is identified by model, task and condition)::

    {
      "kind": "replandscape.results",
      "schema_version": 2,
      "code_version": "...",
      "analysis_params": {...},           # the AnalysisConfig used, as a dict
      "analysis_params_hash": "sha256 hex",
      "runs": {
        RUN: {                            # MODEL/TASK/CONDITION: "demo-llama/mmlu/shots5",
                                          # "qwen-0.5b/expression/ft-step000100"
          "model": "demo-llama", "task": "mmlu", "condition": "shots5",   # condition: a name
          "shots": 5, "finetuned": false, "method": "",                   # "", "lora", "full"
          "checkpoint_step": null, "examples_seen": null,                 # fine-tuned runs
          "final": false,                   # the fine-tuning stage's last checkpoint
          "n_sites": 8, "site_names": [...],
          "label_columns": ["subject", "answer"],    # generated tasks: ["target", "variant"]
          "accuracy": {"micro": 0.4, "macro": 0.38, "n": 300,
                       "per_subject": {GROUP: acc},  # GROUP: the subject, or the variant
                       "substring": {...}, "scoring": "strict"},   # generated tasks only
          "provenance": {"activations": PATH, "config_hash": ..., "model_path": ...,
                         "input_id": "sha256 hex",   # the activation file's identity
                         "finetune_test_accuracy": 0.74 | null, ...},  # ft-final: what the
                                                     # fine-tuning stage measured itself
          "subsample": {"n": 9181, "question_ids": [...]}   # the balanced subset analysed
        }
      },
      "rows": [                           # one per (run, site)
        {"run": RUN, "site": "input_layernorm.03", "site_index": 3,   # index in the file
         "relative_depth": 0.6,                                       # see relative_depth()
         "n_points": 300, "n_duplicates": 0,
         "id_twonn": 7.1, "id_gride": [..6 scales..], "id_gride_ranks": [1, 2, 4, 8, 16, 32], "id": 9.2,
         "n_peaks": 4, "core_fraction": 0.61,
         "peaks": {"sizes": [...], "centers": [...], "log_density": [...],   # ADP without halo
                   "saddles": [[i, j, log_density], ...]},                  # bordering peaks, i < j
         "ari": {"subject": 0.3, "answer": 0.01},      # keyed by the run's label columns
         "overlap": {"subject": 0.5, "answer": 0.3},
         "dendrogram": null | {"linkage": [[...4 floats...]...], "leaf_labels": [...], "peak_sizes": [...]},
         "seconds": {...}, "seconds_total": 1.2,
         "points": "points/RUN__SITE.npz"}   # beside this file: question_id, assignment,
      ]                                      # assignment_halo, log_density per analysed point
    }
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replandscape.atomic import write_text_atomic
from replandscape.errors import UserError

RESULTS_KIND = "replandscape.results"
RESULTS_SCHEMA_VERSION = 2

ROW_REQUIRED = ("run", "site", "site_index", "relative_depth", "n_points", "id", "n_peaks",
                "core_fraction", "ari")

# The JSON types each required key of a row may hold (``None`` where a site with nothing to
# measure records no value); booleans are refused where numbers are expected.
_NUMBER = (int, float)
ROW_TYPES: dict[str, tuple[tuple[type, ...], bool, str]] = {
    # key: (types, may be null, description)
    "run": ((str,), False, "a string"),
    "site": ((str,), False, "a string"),
    "site_index": ((int,), False, "an integer"),
    "relative_depth": (_NUMBER, False, "a number"),
    "n_points": ((int,), False, "an integer"),
    "id": (_NUMBER, True, "a number or null"),
    "n_peaks": ((int,), True, "an integer or null"),
    "core_fraction": (_NUMBER, True, "a number or null"),
    "ari": ((dict,), False, "an object"),
}

# Where each per-block site kind sits within its block, in blocks from the block's input: the
# residual stream entering block i and its norm have seen i blocks' work; the attention's output
# and the norm the MLP reads, half of block i more; the MLP's output and the block's output, all
# of block i.
BLOCK_SITE_OFFSET = {"residual": 0.0, "input_layernorm": 0.0, "attn_heads": 0.5,
                     "post_attention_layernorm": 0.5, "mlp_out": 1.0, "block_output": 1.0}
_BLOCK_SITE = re.compile(r"^(?P<kind>.+)\.(?P<block>\d+)$")


def n_blocks_from_sites(site_names: Iterable[str]) -> int | None:
    """Number of decoder blocks implied by per-block site names (``KIND.NN``), or None."""
    blocks = [int(m["block"]) for m in map(_BLOCK_SITE.match, site_names) if m]
    return max(blocks) + 1 if blocks else None


def relative_depth(site: str, n_blocks: int) -> float | None:
    """Depth of ``site`` in a model of ``n_blocks`` blocks, from 0 (the input of the first block)
    to 1 (the logits), the same for every site kind.

    A site's position is counted in blocks the representation has passed through: block sites
    ``KIND.i`` at ``i`` plus the kind's offset within the block (:data:`BLOCK_SITE_OFFSET`;
    unknown kinds count as block inputs), ``norm`` at ``n_blocks`` and ``logits`` one step further
    at ``n_blocks + 1``; the depth is the position divided by ``n_blocks + 1``. So
    ``input_layernorm.05`` and ``residual.05`` share a depth, whatever else the file holds, and
    for the default sites (``input_layernorm``, ``norm``, ``logits``) the depth equals the site's
    index over the number of sites less one. Returns None for a name that is neither a block site
    nor ``norm``/``logits``.
    """
    steps = n_blocks + 1
    if site == "norm":
        return n_blocks / steps
    if site == "logits":
        return 1.0
    match = _BLOCK_SITE.match(site)
    if match is None:
        return None
    return (int(match["block"]) + BLOCK_SITE_OFFSET.get(match["kind"], 0.0)) / steps


def site_depths(site_names: list[str], n_blocks: int | None = None) -> list[float]:
    """:func:`relative_depth` of every site of a file, ``n_blocks`` taken from the block sites
    when not given; a file whose depth cannot be placed (no blocks known, unknown names) falls
    back to the site's index over the number of sites less one."""
    blocks = n_blocks or n_blocks_from_sites(site_names)
    fallback = [i / max(1, len(site_names) - 1) for i in range(len(site_names))]
    if not blocks:
        return fallback
    depths = [relative_depth(name, blocks) for name in site_names]
    if any(d is None for d in depths):
        return fallback
    return [float(d) for d in depths if d is not None]


def row_problem(row: Any) -> str | None:
    """What is wrong with the shape of one results row, or None when it has the right shape."""
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object"
    missing = [k for k in ROW_REQUIRED if k not in row]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, (types, nullable, what) in ROW_TYPES.items():
        value = row[key]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            return f"has {key} = {json.dumps(value)[:40]}, not {what}"
    return None


def params_hash(params: Mapping[str, Any]) -> str:
    """Stable hash of analysis parameters, so results of different parameters are not mixed."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _clean(value: Any) -> Any:
    """JSON has no NaN: store NaN and infinities as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _clean(value.item())
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    return value


@dataclass
class Results:
    """In-memory results of one or more analysis runs."""

    analysis_params: dict[str, Any]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    code_version: str = ""
    path: Path | None = None

    @property
    def params_hash(self) -> str:
        return params_hash(self.analysis_params)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": RESULTS_KIND,
            "schema_version": RESULTS_SCHEMA_VERSION,
            "code_version": self.code_version,
            "analysis_params": self.analysis_params,
            "analysis_params_hash": self.params_hash,
            "runs": self.runs,
            "rows": sorted(self.rows, key=lambda r: (r["run"], r["site_index"])),
        }

    def rows_for(self, run: str) -> list[dict[str, Any]]:
        return sorted((r for r in self.rows if r["run"] == run), key=lambda r: r["site_index"])


def write_results(results: Results, path: str | os.PathLike[str]) -> Path:
    """Write atomically: a reader never sees a half-written file."""
    data = _clean(results.to_dict())
    return write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False))


def read_results(path: str | os.PathLike[str]) -> Results:
    """Read and check one results file; refuse other kinds and schema versions with one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError("results file not found", file=str(path),
                        fix="run the analysis stage first (replandscape run analyze CONFIG)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"not a valid JSON results file ({exc.__class__.__name__})", file=str(path),
                        fix="re-run the analysis stage to rewrite it") from None
    if not isinstance(data, dict) or data.get("kind") != RESULTS_KIND:
        raise UserError("not a replandscape results file", file=str(path), key="kind",
                        fix="pass the analysis/results.json written by 'replandscape run analyze'")
    version = data.get("schema_version")
    if version == 1:
        raise UserError("results schema version 1 (runs keyed by model and condition only) is "
                        "not read any more", file=str(path), key="schema_version",
                        fix="re-run 'replandscape run analyze CONFIG': finished sites are "
                            "recomputed from the activation files, which are kept")
    if version != RESULTS_SCHEMA_VERSION:
        raise UserError(f"results schema version {version} is not supported (this code reads "
                        f"{RESULTS_SCHEMA_VERSION})", file=str(path), key="schema_version",
                        fix="re-run the analysis stage with this version of replandscape")
    rows = data.get("rows", [])
    if not isinstance(rows, list):
        raise UserError("rows is not a list", file=str(path), key="rows",
                        fix="re-run the analysis stage to rewrite it")
    for i, row in enumerate(rows):
        problem = row_problem(row)
        if problem:
            raise UserError(f"row {i} {problem}", file=str(path), key=f"rows[{i}]",
                            fix="re-run the analysis stage to rewrite it")
    runs = data.get("runs", {})
    if not isinstance(runs, dict) or not all(isinstance(v, dict) for v in runs.values()):
        raise UserError("runs is not an object of objects", file=str(path), key="runs",
                        fix="re-run the analysis stage to rewrite it")
    params = data.get("analysis_params", {})
    if not isinstance(params, dict):
        raise UserError("analysis_params is not an object", file=str(path),
                        key="analysis_params", fix="re-run the analysis stage to rewrite it")
    return Results(analysis_params=params, runs=runs,
                   rows=list(rows), code_version=data.get("code_version", ""), path=path)


def merge_results(parts: Iterable[Results]) -> list[Results]:
    """Group results by analysis parameters: runs analysed with different parameters never share
    one group (the figures draw each group separately)."""
    groups: dict[str, Results] = {}
    for part in parts:
        key = part.params_hash
        if key not in groups:
            groups[key] = Results(analysis_params=part.analysis_params,
                                  code_version=part.code_version, path=part.path)
        group = groups[key]
        group.runs.update(part.runs)
        seen = {(r["run"], r["site"]) for r in group.rows}
        group.rows.extend(r for r in part.rows if (r["run"], r["site"]) not in seen)
    return list(groups.values())
