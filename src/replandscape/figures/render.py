"""Draw every figure, table and the report of one or more results files into a folder."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from replandscape.errors import UserError
from replandscape.figures.data import FiguresWarning, all_runs, label_columns, orphan_runs
from replandscape.figures.dendrogram import plot_dendrogram
from replandscape.figures.icl_vs_ft import (
    RULE_CAPTIONS,
    available_rule,
    generated_runs,
    plot_icl_vs_ft,
    released_latex,
    released_markdown,
)
from replandscape.figures.profiles import column_label, plot_ari, plot_profiles
from replandscape.figures.report import GroupFigures, build_report, to_html, to_markdown
from replandscape.figures.style import SUPPORTED_FORMATS, safe_name, save_figure
from replandscape.figures.tables import accuracy_latex, accuracy_markdown
from replandscape.results import Results, merge_results

log = logging.getLogger(__name__)

WHAT = ("profiles", "ari", "dendrogram", "accuracy", "report")
DEFAULT_FORMATS = ("png", "pdf")


def _check_choice(values: Sequence[str], allowed: Sequence[str], option: str) -> list[str]:
    values = [v.strip().lower() for v in values if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise UserError(f"{option} got {', '.join(unknown) or 'nothing'}; choose from "
                        f"{','.join(allowed)}", key=option,
                        fix=f"pass e.g. {option} {','.join(allowed[:2])}")
    return list(dict.fromkeys(values))


def _draw_group(results: Results, out_dir: Path, suffix: str, what: Sequence[str],
                formats: Sequence[str]) -> GroupFigures:
    g = GroupFigures(results=results, suffix=suffix)
    runs = all_runs(results)
    note = suffix.replace("__", ", ")
    # (model, task) pairs in the order of the runs: model, then MMLU and the tasks' fixed order.
    pairs = list(dict.fromkeys((i.model, i.task) for i in runs))
    if "profiles" in what:
        for model, task in pairs:
            fig = plot_profiles(results, model, task, title=f"{model}, {task}{note}")
            stem = f"profiles_{safe_name(model)}_{safe_name(task)}{suffix}"
            g.profiles += save_figure(fig, out_dir / stem, formats)
    if "ari" in what:
        for task in dict.fromkeys(t for _, t in pairs):
            for target in label_columns([i for i in runs if i.task == task]):
                title = (f"Adjusted Rand index of density peaks with {column_label(target)}, "
                         f"{task}{note}")
                fig = plot_ari(results, target, task=task, title=title)
                stem = f"ari_{safe_name(task)}_{safe_name(target)}{suffix}"
                g.ari += save_figure(fig, out_dir / stem, formats)
    if "dendrogram" in what:
        missing: list[str] = []
        for info in runs:
            dendro = plot_dendrogram(results, info.run)
            if dendro is None:
                missing.append(info.run)
                continue
            stem = (f"dendrogram_{safe_name(info.model)}_{safe_name(info.task)}_"
                    f"{info.condition.slug}{suffix}")
            g.dendrograms += save_figure(dendro, out_dir / stem, formats)
        if missing:
            # Dendrograms are stored for some sites only; a run without one is not an error.
            log.info("no drawable dendrogram for %s", ", ".join(missing))
            g.notes.append("No dendrogram with two or more peaks is stored for: "
                           + ", ".join(f"`{r}`" for r in missing) + ".")
    if "accuracy" in what:
        tables = [(f"accuracy{suffix}.md", accuracy_markdown(results)),
                  (f"accuracy{suffix}.tex", accuracy_latex(results))]
        generated = generated_runs(results)
        if generated:
            # The generated tasks' accuracy: base model by shots, fine-tuning by examples seen.
            rule = available_rule(results)
            for model in dict.fromkeys(i.model for i in generated):
                fig = plot_icl_vs_ft(results, model, rule=rule,
                                     title=f"{model}: in-context learning and fine-tuning, "
                                           f"{RULE_CAPTIONS[rule]}{note}")
                g.icl += save_figure(fig, out_dir / f"icl_vs_ft_{safe_name(model)}{suffix}",
                                     formats)
            tables += [(f"icl_vs_ft{suffix}.md", released_markdown(results)),
                       (f"icl_vs_ft{suffix}.tex", released_latex(results))]
        for name, text in tables:
            path = out_dir / name
            path.write_text(text)
            g.tables.append(path)
    return g


def render_all(results: list[Results], out_dir: str | os.PathLike[str], *,
               what: Sequence[str] = WHAT,
               formats: Sequence[str] = DEFAULT_FORMATS,
               studies: Sequence[tuple[str, Sequence[Path]]] = ()) -> list[Path]:
    """Draw the figures, tables and report of ``results`` into ``out_dir``.

    Args:
        results: results files as read by :func:`replandscape.results.read_results`. Runs analysed
            with the same parameters are drawn together; each set of different parameters is drawn
            separately, its files suffixed ``__params-HASH8``, with a :class:`FiguresWarning`.
        out_dir: folder for the files (created).
        what: any of ``profiles`` (per model and task), ``ari`` (per task and label column),
            ``dendrogram`` (per run), ``accuracy`` (tables per task; for generated tasks also the
            in-context vs fine-tuned figure per model and its table), ``report``.
        formats: image formats, any of ``png``, ``pdf``, ``svg``. The report embeds PNG (or SVG).
        studies: (section title, figure files) drawn already by the further studies' renderers
            (circuits, similarity), each a section of the report after the geometry.

    Returns:
        The paths written, in the order they were written.

    Raises:
        UserError: an unknown ``what`` or format, or no results at all.
    """
    # A plain string ("profiles,ari") is accepted as the CLI spells it.
    what = _check_choice(what.split(",") if isinstance(what, str) else list(what), WHAT, "--what")
    formats = _check_choice(formats.split(",") if isinstance(formats, str) else list(formats),
                            SUPPORTED_FORMATS, "--formats")
    if not results:
        raise UserError("no results to draw", fix="pass at least one readable results.json")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    groups = merge_results(results)
    if len(groups) > 1:
        sources = "; ".join(
            f"{g.params_hash[:8]}: {g.path or 'in memory'} and {len(g.runs)} run(s)" for g in groups)
        warnings.warn(f"results use {len(groups)} different sets of analysis parameters "
                      f"({sources}); each set is drawn separately with suffix __params-HASH",
                      FiguresWarning, stacklevel=2)
    for group in groups:
        orphans = orphan_runs(group)
        if orphans:
            warnings.warn(f"rows of {', '.join(orphans)} have no entry in runs (no model, task "
                          "or condition) and are not drawn", FiguresWarning, stacklevel=2)
    drawn = []
    for group in groups:
        suffix = f"__params-{group.params_hash[:8]}" if len(groups) > 1 else ""
        drawn.append(_draw_group(group, out, suffix, what, formats))

    written = [p for g in drawn
               for p in (*g.profiles, *g.ari, *g.dendrograms, *g.icl, *g.tables)]
    if "report" in what:
        blocks = build_report(drawn, out, studies)
        for name, text in (("report.md", to_markdown(blocks)), ("report.html", to_html(blocks))):
            path = out / name
            path.write_text(text)
            written.append(path)
    return written
