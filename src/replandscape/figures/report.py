"""``report.md`` and ``report.html``: the figures, the accuracy tables and the provenance of runs.

The accuracy section flags every final fine-tuned run whose extracted model scores differently from
what the fine-tuning stage measured on its own test set (``provenance.finetune_test_accuracy``):
the extracted model is then not the one that was evaluated.

The report is a list of small blocks rendered twice, to Markdown and to self-contained HTML (images
are linked, not inlined), so neither needs a Markdown library.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replandscape import __version__
from replandscape.figures.data import all_runs, number
from replandscape.figures.icl_vs_ft import released_blocks
from replandscape.figures.tables import KINDS, MISSING_MD, accuracy_tables, caption
from replandscape.results import Results

PROVENANCE_COLUMNS = (("model_path", "model path"), ("config_hash", "config hash"),
                      ("activations", "activations"), ("code_version", "code version"))


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Image:
    path: str  # relative to the report
    alt: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)  # right-align these columns


@dataclass
class Code:
    text: str


Block = Heading | Para | Image | Table | Code


@dataclass
class GroupFigures:
    """What render_all drew for one group of results (one set of analysis parameters)."""

    results: Results
    suffix: str
    profiles: list[Path] = field(default_factory=list)
    ari: list[Path] = field(default_factory=list)
    dendrograms: list[Path] = field(default_factory=list)
    icl: list[Path] = field(default_factory=list)  # in-context vs fine-tuned, generated tasks
    tables: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _images(paths: Sequence[Path], out_dir: Path) -> list[Block]:
    blocks: list[Block] = []
    for p in paths:
        if p.suffix in (".png", ".svg"):
            rel = p.relative_to(out_dir).as_posix() if p.is_relative_to(out_dir) else str(p)
            blocks.append(Image(rel, p.stem))
    if not blocks and paths:  # only PDFs were asked for: link them
        blocks.append(Para("Figures: " + ", ".join(p.name for p in paths)))
    return blocks


def _provenance(results: Results) -> Table:
    rows = []
    for info in all_runs(results):
        prov: dict[str, Any] = dict(info.info.get("provenance") or {})
        prov.setdefault("code_version", results.code_version)
        cells = [info.run] + [str(prov.pop(k, "") or MISSING_MD) for k, _ in PROVENANCE_COLUMNS]
        cells.append("; ".join(f"{k}={v}" for k, v in sorted(prov.items())) or MISSING_MD)
        rows.append(cells)
    return Table(["run"] + [label for _, label in PROVENANCE_COLUMNS] + ["other"], rows)


# The extraction stage and the fine-tuning stage score the same questions with the same rule, so
# any difference beyond float rounding means the extracted model is not the evaluated one.
MISMATCH_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Mismatch:
    """A final fine-tuned run whose extracted accuracy differs from the fine-tuning stage's."""

    run: str
    extracted: float  # accuracy micro of the extracted model, a fraction
    finetuning: float  # provenance.finetune_test_accuracy, a fraction

    def message(self) -> str:
        return (f"`{self.run}`: the extracted model scores {self.extracted:.4f} but fine-tuning "
                f"measured {self.finetuning:.4f} (accuracy micro against "
                "provenance.finetune_test_accuracy): the extracted model is not the one the "
                "fine-tuning stage evaluated.")


def finetune_mismatches(results: Results,
                        tolerance: float = MISMATCH_TOLERANCE) -> list[Mismatch]:
    """Final fine-tuned runs (no checkpoint step) whose accuracy micro differs by more than
    ``tolerance`` from ``provenance.finetune_test_accuracy``; a reference that is missing, null
    or negative (unknown) is not compared."""
    out = []
    for info in all_runs(results):
        c = info.condition
        if not c.finetuned or c.checkpoint_step is not None:
            continue
        prov = info.info.get("provenance")
        reference = number(prov.get("finetune_test_accuracy")) if isinstance(prov, dict) \
            else math.nan
        acc = info.info.get("accuracy")
        measured = number(acc.get("micro")) if isinstance(acc, dict) else math.nan
        if math.isnan(reference) or reference < 0 or math.isnan(measured):
            continue
        if abs(measured - reference) > tolerance:
            out.append(Mismatch(info.run, measured, reference))
    return out


def _accuracy(results: Results) -> list[Block]:
    blocks: list[Block] = [Para(f"**Warning:** {m.message()}")
                           for m in finetune_mismatches(results)]
    for t in accuracy_tables(results):
        for kind, kind_caption in KINDS:
            rows = [[m] + [MISSING_MD if t.value(kind, m, c) is None
                           else f"{t.value(kind, m, c):.1f}" for c in t.conditions]
                    for m in t.models]
            blocks += [Para(f"**{caption(kind_caption, t.task)}**"),
                       Table(["model"] + [c.label for c in t.conditions], rows,
                             [False] + [True] * len(t.conditions))]
    return blocks


def _icl_vs_ft(g: GroupFigures, out_dir: Path) -> list[Block]:
    if not any(i.is_generated for i in all_runs(g.results)):
        return []
    blocks: list[Block] = [Para(
        "Generated tasks: the base model against the number of shots and the fine-tuning "
        "checkpoints against the training examples they had seen (pattern variant solid, "
        "misleading dashed), and per model, task and variant the final fine-tuned model at 0 "
        "shots against the base model at 0 shots and at its best number of shots.")]
    blocks += _images(g.icl, out_dir)
    for table_caption, header, rows in released_blocks(g.results):
        blocks += [Para(f"**{table_caption}**"),
                   Table(header, rows, [False] * 3 + [True] * (len(header) - 3))]
    return blocks


def build_report(groups: Sequence[GroupFigures], out_dir: Path,
                 studies: Sequence[tuple[str, Sequence[Path]]] = ()) -> list[Block]:
    """The blocks of the report, one section per group of analysis parameters, then one per
    further study whose figures were drawn (``studies``: section title, figure files)."""
    blocks: list[Block] = [Heading(1, "replandscape: representation landscape report")]
    sources = sorted({str(g.results.path) for g in groups if g.results.path})
    blocks.append(Para(f"Drawn by replandscape {__version__} from: "
                       + (", ".join(f"`{s}`" for s in sources) or "results in memory") + "."))
    if len(groups) > 1:
        blocks.append(Para(f"**Warning:** the results use {len(groups)} different sets of analysis "
                           "parameters; each set is drawn separately (file suffix "
                           "`__params-HASH`) and never mixed in one panel."))
    for g in groups:
        level = 2
        if len(groups) > 1:
            blocks.append(Heading(2, f"Analysis parameters {g.results.params_hash[:8]}"))
            level = 3
        blocks += [Heading(level, "Accuracy"), *_accuracy(g.results)]
        icl = _icl_vs_ft(g, out_dir)
        if icl:
            blocks += [Heading(level, "In-context learning and fine-tuning"), *icl]
        if g.profiles:
            blocks += [Heading(level, "Profiles along depth"),
                       Para("Intrinsic dimension, number of density peaks and fraction of core "
                            "points per site, one line per condition."),
                       *_images(g.profiles, out_dir)]
        if g.ari:
            blocks += [Heading(level, "ARI of density peaks with the label columns"),
                       Para("Per task and label column (subjects and answers for MMLU, targets "
                            "and variants for a generated task), one panel per model."),
                       *_images(g.ari, out_dir)]
        if g.dendrograms:
            blocks += [Heading(level, "Dendrograms of density peaks"),
                       Para("At the site where ARI with the first label column (subjects, or a "
                            "generated task's targets) is highest; leaves are labelled by their "
                            "dominant labels and the number of points of the peak."),
                       *_images(g.dendrograms, out_dir)]
        for note in g.notes:
            blocks.append(Para(note))
        blocks += [Heading(level, "Provenance"), _provenance(g.results),
                   Para(f"Analysis parameters (hash `{g.results.params_hash}`):"),
                   Code(json.dumps(g.results.analysis_params, indent=1, sort_keys=True,
                                   default=str))]
    for title, paths in studies:
        images = _images(paths, out_dir)
        if images:
            blocks += [Heading(2, title), *images]
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path})")
        elif isinstance(b, Table):
            numeric = b.numeric or [False] * len(b.header)
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                     "|" + "".join("---:|" if n else "---|" for n in numeric)]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Code):
            out.append(f"```json\n{b.text}\n```")
        out.append("")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    """Escape, then render the two inline marks the report uses: **bold** and `code`."""
    parts = html.escape(text).split("`")
    for k in range(1, len(parts), 2):
        parts[k] = f"<code>{parts[k]}</code>"
    text = "".join(parts)
    bold = text.split("**")
    for k in range(1, len(bold), 2):
        bold[k] = f"<strong>{bold[k]}</strong>"
    return "".join(bold)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
line-height:1.4}img{max-width:100%;display:block;margin:1em 0}table{border-collapse:collapse;
margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:0.25em 0.6em;
overflow-wrap:anywhere}th{background:#f3f3f3}td.num{text-align:right}
pre{background:#f6f6f6;padding:0.8em;overflow-x:auto}"""


def to_html(blocks: Sequence[Block], title: str = "replandscape report") -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Image):
            out.append(f'<img src="{html.escape(b.path)}" alt="{html.escape(b.alt)}">')
        elif isinstance(b, Table):
            numeric = b.numeric or [False] * len(b.header)
            rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.header) + "</tr>"]
            for r in b.rows:
                rows.append("<tr>" + "".join(
                    f'<td class="num">{html.escape(c)}</td>' if n else f"<td>{html.escape(c)}</td>"
                    for c, n in zip(r, numeric)) + "</tr>")
            out.append("<table>" + "".join(rows) + "</table>")
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
