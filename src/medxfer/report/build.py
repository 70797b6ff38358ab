"""Build ``RUN_DIR/report/`` from the run's results: the one entry point used by
``medxfer report``, by the end of every ``medxfer run`` and by ``make demo``.

Written: ``summary.md``, ``results.csv``, ``table_*.md``/``.csv``/``.tex`` for every table,
``figures/*.png`` and ``.svg``, ``stats.json`` (every number the report states, machine
readable), ``report.html`` and ``manifest.json`` (the files with their SHA-256). Nothing
depends on the time of the build, so rebuilding from the same results gives the same bytes.
The report is built in a staging folder beside ``report/`` and swapped in whole once every
file is written: a build that fails (a full disk) leaves the previous report as it was, and
files of an earlier build that this one no longer writes are gone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medxfer.cache import replace_folder, storage_errors, write_text_atomic
from medxfer.errors import OutputError
from medxfer.report.collect import Collection, collect
from medxfer.report.figures import FIGURE_DPI, Figure, build_figures, figure_style
from medxfer.report.figures_stats import save_figure
from medxfer.report.findings import ALPHA, POOL_WARN_FACTOR, Findings, compute
from medxfer.report.html import PageFigure, render_html
from medxfer.report.stats import BOOTSTRAP_SCOPE, EPISODE_SCOPE, json_safe
from medxfer.report.tables import (
    Table,
    answer_table,
    build_tables,
    results_csv,
    stats_tables,
    summary_markdown,
    to_csv,
    to_latex,
    to_markdown,
)

log = logging.getLogger(__name__)

STATS_SCHEMA = "medxfer.report-stats/1"


@dataclass
class ReportOutput:
    """What :func:`build_report` wrote (paths relative to ``folder``) and how long it took."""

    folder: Path
    files: list[str] = field(default_factory=list)
    summary: str = ""
    seconds: float = 0.0
    figures: int = 0

    @property
    def html(self) -> Path:
        return self.folder / "report.html"

    def paths(self) -> list[Path]:
        return [self.folder / f for f in self.files]


def stats_document(f: Findings) -> dict[str, Any]:
    """``stats.json``: every number the report states."""
    coll = f.coll
    return {
        "schema": STATS_SCHEMA,
        "alpha": ALPHA,
        "scope": {"episode_intervals_and_paired_p": EPISODE_SCOPE, "bootstrap": BOOTSTRAP_SCOPE},
        "pool_warning_factor": POOL_WARN_FACTOR,
        "models": {m: {"label": coll.model_label(m), "family": coll.family(m),
                       "random_weights": coll.random_weights(m)} for m in coll.models},
        "datasets": {d: {"label": coll.dataset_label(d), "synthetic": coll.synthetic(d),
                         "in_domain": coll.dataset_facts[d].in_domain} for d in coll.datasets},
        "answer": [a.to_dict() for a in f.answers],
        "within_dataset": {t: {p.dataset: p.to_dict() for p in ps} for t, ps in f.pairs.items()},
        "across_datasets": {t: a.to_dict() for t, a in f.across.items()},
        "scores": {t: {d: {m: {"value": v.value, "ci95": v.ci95, "seeds": v.seeds}
                           for m in coll.models if (v := grid.get((m, d))) is not None}
                       for d in coll.datasets_of(rs)}
                   for t, rs in coll.tables().items() for grid in [coll.grid(rs)]},
        "minmax_scaled": f.scaled,
        "correlations": {x: {t: {d: c.to_dict() for d, c in per.items()} for t, per in tabs.items()}
                         for x, tabs in f.correlations.items()},
        "correlations_missing": f.xvars_missing,
        "transferability_rank_agreement": [a.to_dict() for a in f.agreement],
        "warnings": f.warnings,
    }


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=False, default=_json_default) + "\n"


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_report(run_dir: Path | str, *, bootstrap: int = 0, bootstrap_seed: int = 0,
                 collection: Collection | None = None) -> ReportOutput:
    """Write ``RUN_DIR/report/`` (see the module docstring); ``bootstrap`` > 0 adds the
    generalisation interval of every few-shot comparison with that many replicates."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    coll = collection or collect(run_dir)
    f = compute(coll)
    if bootstrap:
        from medxfer.report.bootstrap import generalisation_bootstrap

        for ps in f.pairs.values():
            for p in ps:
                if p.comparison is not None:
                    p.bootstrap = generalisation_bootstrap(coll, p, bootstrap, seed=bootstrap_seed)
    final = run_dir / "report"
    with storage_errors(run_dir, "report staging folder"):
        out = Path(tempfile.mkdtemp(prefix=".report-", dir=run_dir))
    try:
        output = _write_report(out, final, coll, f)
    except BaseException as exc:
        shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OutputError):
            raise type(exc)(f"report {final}/ not updated (the previous one, if any, is unchanged): {exc}") from None
        raise
    replace_folder(out, final)
    output.seconds = time.perf_counter() - t0
    log.info("report written to %s (%d files, %.1f s)", final, len(output.files), output.seconds)
    return output


def _write_report(out: Path, final: Path, coll: Collection, f: Findings) -> ReportOutput:
    """Every file of the report into the staging folder ``out`` (to become ``final``)."""
    (out / "figures").mkdir()
    written: list[str] = []

    def write(name: str, text: str) -> None:
        write_text_atomic(out / name, text)
        written.append(name)

    tables = build_tables(coll, f)
    stabs = stats_tables(coll, f)
    answer = answer_table(coll, f)
    all_tables: list[Table] = ([answer] if answer else []) + tables + stabs
    with figure_style():
        figures = build_figures(coll, f)
        page_figs = _save_figures(figures, out)
    for g in page_figs:
        if g.png is not None and g.svg is not None:
            written += [f"figures/{g.png.name}", f"figures/{g.svg.name}"]
    names = [f"{t.slug}.{ext}" for t in all_tables for ext in ("md", "csv", "tex")]
    planned = sorted({"summary.md", "results.csv", "stats.json", "report.html", *names, *written})
    summary = summary_markdown(coll.results, f, report_dir=str(final))
    write("summary.md", summary)
    write("results.csv", results_csv(coll.results, coll))
    for t in all_tables:
        write(f"{t.slug}.md", to_markdown(t, "#"))
        write(f"{t.slug}.csv", to_csv(t))
        write(f"{t.slug}.tex", to_latex(t))
    write("stats.json", _dump(json_safe(stats_document(f))))
    write("report.html", render_html(coll, f, answer=answer, tables=tables, stats_tables=stabs, figures=page_figs,
                                     files=planned))
    files = sorted(set(written))
    manifest = {"files": {n: _sha(out / n) for n in files}}
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return ReportOutput(folder=final, files=[*files, "manifest.json"], summary=summary, seconds=0.0,
                        figures=sum(g.png is not None for g in page_figs))


def _save_figures(figures: list[Figure], out: Path) -> list[PageFigure]:
    page = []
    for g in figures:
        if g.fig is None:
            page.append(PageFigure(g.slug, g.title, g.caption, None, None, g.missing))
            continue
        png, svg = save_figure(g.fig, out / "figures" / g.slug, dpi=FIGURE_DPI, png_compression=1)
        page.append(PageFigure(g.slug, g.title, g.caption, png, svg, g.missing))
    return page
