"""Report tables: the paper's tables from the results, each standing on its own.

Every table is a :class:`Table` (rows, columns, cells with their values, per-column facts such
as the few-shot settings, the pool and test sizes and whether the data are synthetic, and
notes), rendered as Markdown, LaTeX, long-format CSV and, by :mod:`medxfer.report.html`, an
HTML table. Model and dataset names are the display names the results carry; the paper's
models and datasets come first, in the paper's order, the user's after. Best and second best
are marked per column (**bold** and underlined) where the column has a better direction.

:func:`summary_markdown` is the run's ``summary.md``: the answer per dataset, every table, the
paired comparisons with their scope, the ranks across datasets, the weights and the warnings.
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from medxfer.report.collect import PROTOCOL_TITLES, Collection, Value, table_name
from medxfer.report.findings import (
    DIFFUSION,
    Findings,
    compute,
    invariance_metrics,
    lpips_metrics,
    score_metrics,
    test_images,
)
from medxfer.report.pretraining import pretraining_section
from medxfer.report.stats import VERDICT_BEST, VERDICT_WORSE, rank_matrix
from medxfer.results import Result

__all__ = ["Cell", "Row", "Table", "build_tables", "latex_table", "results_csv", "summary_markdown", "table_name"]

DASH = "–"
RANDOM_TAG = "random weights"
AUROC_MODALITIES = ("chest-xray",)  # where many-shot results are usually reported as AUROC too


@dataclass(frozen=True)
class Cell:
    """One table cell: its text, the number it sorts and ranks by, and its rank (1 best, 2 second)."""

    text: str
    value: float | None = None
    rank: int = 0
    marks: str = ""  # footnote marks after the text

    @property
    def shown(self) -> str:
        return self.text + self.marks


EMPTY = Cell(DASH)


@dataclass
class Row:
    """A table row: a key (model name, ...), its label, its cells; ``random`` marks random weights."""

    key: str
    label: str
    cells: list[Cell]
    random: bool = False

    @property
    def shown_label(self) -> str:
        return f"{self.label} [{RANDOM_TAG}]" if self.random else self.label


@dataclass
class Table:
    """A report table (see the module docstring). ``facts`` are rows of per-column facts shown in
    the table itself, below the results (settings, pool, test images, data)."""

    slug: str
    title: str
    corner: str
    columns: list[str]
    rows: list[Row]
    facts: list[tuple[str, list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    marked: bool = True  # best and second best marked
    column_keys: list[str] = field(default_factory=list)
    kind: str = "results"  # "results" (models x datasets), "stats", "answer"

    def rank(self, higher_is_better: list[bool | None], decimals: int = 2) -> None:
        """Mark best (1) and second best (2) per column on the displayed (rounded) values;
        ``None`` for a column without a better direction."""
        for j, hib in enumerate(higher_is_better):
            if hib is None:
                continue
            vals = [r.cells[j].value for r in self.rows]
            shown = sorted({round(v, decimals) for v in vals if v is not None}, reverse=hib)
            if len(shown) < 2 or len(self.rows) < 2:
                continue
            for r in self.rows:
                c = r.cells[j]
                if c.value is None:
                    continue
                v = round(c.value, decimals)
                rank = 1 if v == shown[0] else 2 if v == shown[1] else 0
                r.cells[j] = Cell(c.text, c.value, rank, c.marks)


# ------------------------------------------------------------------------ formatting

def fmt_value(v: Value | None, decimals: int = 2, ci: bool = True) -> Cell:
    if v is None:
        return EMPTY
    s = f"{v.value:.{decimals}f}"
    if ci and v.ci95 is not None:
        s += f" ± {v.ci95:.{decimals}f}"
    if v.seeds > 1:
        s += f" ({v.seeds} seeds)"
    return Cell(s, v.value)


def fmt_p(p: float | None) -> str:
    """A p value as a reader should see it: below 1e-4 as "< 0.0001" (the exact value, which
    can be 1e-100 for thousands of reshuffled episodes, is in stats.json)."""
    if p is None or not math.isfinite(p):
        return DASH
    if p < 1e-4:
        return "< 0.0001"
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def p_is(p: float | None) -> str:
    """``"= 0.031"`` or ``"< 0.0001"``: a p value after "p"."""
    text = fmt_p(p)
    return text if text.startswith("<") or text == DASH else f"= {text}"


def fmt_num(v: float | None, spec: str = ".2f", signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return DASH
    return format(v, ("+" if signed else "") + spec)


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "table"


def _data_fact(coll: Collection, datasets: list[str]) -> tuple[str, list[str]]:
    return ("data", ["SYNTHETIC" if coll.synthetic(d) else "real" for d in datasets])


def _weights_note(coll: Collection, models: list[str]) -> list[str]:
    rnd = [coll.model_label(m) for m in models if coll.random_weights(m)]
    if not rnd:
        return []
    return [f"[{RANDOM_TAG}]: {', '.join(rnd)} used RANDOMLY INITIALISED weights, not pretrained ones: "
            "these rows say nothing about the pretrained model."]


def _synthetic_note(coll: Collection, datasets: list[str]) -> list[str]:
    syn = [coll.dataset_label(d) for d in datasets if coll.synthetic(d)]
    if not syn:
        return []
    return [f"SYNTHETIC data: {', '.join(syn)} are images written by medxfer's generators in the datasets' "
            "layouts, not the real datasets; their numbers say nothing about medical images."]


def _grid_table(coll: Collection, slug: str, title: str, results: list[Result], value: Callable[[str, str], Cell],
                hib: bool | None, decimals: int, facts: list[tuple[str, list[str]]] | None = None,
                notes: list[str] | None = None, datasets: list[str] | None = None) -> Table:
    models = coll.models_of(results)
    datasets = datasets if datasets is not None else coll.datasets_of(results)
    rows = [Row(m, coll.model_label(m), [value(m, d) for d in datasets], coll.random_weights(m)) for m in models]
    t = Table(slug=slug, title=title, corner="Model", columns=[coll.dataset_label(d) for d in datasets], rows=rows,
              facts=[*(facts or []), _data_fact(coll, datasets)],
              notes=[*(notes or []), *_weights_note(coll, models), *_synthetic_note(coll, datasets)],
              marked=hib is not None, column_keys=list(datasets))
    t.rank([hib] * len(datasets), decimals)
    if t.marked and len(models) > 1:
        t.notes.insert(0, "Best per column in **bold**, second best underlined"
                       + ("" if hib else " (lower is better)") + ".")
    return t


def _variant_title(coll: Collection, name: str) -> str:
    """The variant after a table's title, only when the run has several tables of its protocol."""
    short = coll.table_title(name)
    base = short.split(" (", 1)
    return f" ({base[1]}" if len(base) > 1 else ""


# ----------------------------------------------------------------------- the tables

def fewshot_table(coll: Collection, f: Findings, name: str, results: list[Result]) -> Table:
    grid = coll.grid(results)
    datasets = coll.datasets_of(results)
    pools = {p.dataset: p.pool for p in f.pairs.get(name, [])}
    settings, pool_row, warned = [], [], []
    for d in datasets:
        pf = pools.get(d)
        settings.append(pf.settings_text() if pf else DASH)
        text = pf.pool_text() if pf else DASH
        if pf is not None and pf.barely_larger:
            text += " ⚠ barely larger than shots + queries"
            warned.append(d)
        pool_row.append(text)
    notes = ["± is the 95% half-width over episodes (1.96 × population std / √episodes): it covers episode "
             "sampling given this pool of images, not a new test set (see the paired comparisons and, with "
             "`medxfer report --bootstrap N`, the generalisation interval)."]
    for pf_d in warned:
        w = pools[pf_d].warning(coll.dataset_label(pf_d))
        if w:
            notes.append("⚠ " + w)
    title = "Few-shot accuracy (%), mean ± 95% CI over episodes (like the paper's Table 3)"
    title += _variant_title(coll, name)
    if coll.variant_note(name):
        notes.insert(0, coll.variant_note(name) or "")
    hib = results[0].headline.higher_is_better
    return _grid_table(coll, "table_" + slugify(name), title, results, lambda m, d: fmt_value(grid.get((m, d))),
                       hib, 2, facts=[("episodes", settings), ("pool", pool_row)], notes=notes)


def manyshot_table(coll: Collection, name: str, results: list[Result], metric: str | None = None) -> Table | None:
    """Linear or finetune (or another transfer protocol) like the paper's Table 4: the headline
    metric per dataset, or with ``metric="auroc"`` the AUROC of the chest X-ray datasets (where
    it is the usual many-shot metric); None when no column has it."""
    proto = results[0].protocol
    grid = coll.grid(results, metric)
    datasets = coll.datasets_of(results)
    if metric is not None:
        datasets = [d for d in datasets if coll.dataset_facts[d].modality in AUROC_MODALITIES
                    and results_metric(results, d) != metric and any(k[1] == d for k in grid)]
        if not datasets:
            return None
    by_cell = {(r.model, r.dataset): r for r in sorted(results, key=lambda r: r.seed, reverse=True)}
    edge = False

    def cell(m: str, d: str) -> Cell:
        nonlocal edge
        v = grid.get((m, d))
        c = fmt_value(v)
        r = by_cell.get((m, d))
        lo, hi = (r.metrics.get("ci95_low"), r.metrics.get("ci95_high")) if r is not None else (None, None)
        if metric is None and v is not None and v.seeds == 1 and isinstance(lo, float) and isinstance(hi, float):
            c = Cell(f"{v.value:.2f} [{lo:.2f}, {hi:.2f}]", v.value)  # the bootstrap interval, not symmetric
        if r is not None and metric is None and r.details.get("c_at_grid_edge"):
            edge = True
            return Cell(c.text, c.value, c.rank, "‡")
        return c

    test_row = []
    for d in datasets:
        ns = sorted({n for r in results if r.dataset == d and (n := test_images(r)) is not None})
        test_row.append(", ".join(map(str, ns)) if ns else DASH)
    metric_row = [_metric_name(metric or results_metric(results, d)) for d in datasets]
    if metric is None:
        has_ci = any(r.headline.ci95 is not None for r in results)
        notes = [("[low, high] (or ±) is the protocol's bootstrap 95% interval of each model's score over the test "
                  "images (patients where known), the fitted model held fixed; it is not a test of the difference "
                  "between two models, which share the test images.") if has_ci else
                 "No interval: one test split per model (a many-shot number is one fit, scored once)."]
        title = f"{PROTOCOL_TITLES.get(proto, proto)} (%), many-shot (like the paper's Table 4)"
        slug = "table_" + slugify(name)
    else:
        notes = ["AUROC from the predicted probabilities (one-vs-rest macro average for more than two classes), "
                 "the usual many-shot metric on chest X-rays."]
        title = f"{PROTOCOL_TITLES.get(proto, proto)} AUROC (%), chest X-ray datasets"
        slug = "table_" + slugify(name) + "_auroc"
    title += _variant_title(coll, name)
    if coll.variant_note(name):
        notes.insert(0, coll.variant_note(name) or "")
    t = _grid_table(coll, slug, title, results, cell, results[0].headline.higher_is_better, 2,
                    facts=[("metric", metric_row), ("test images", test_row)], notes=notes, datasets=datasets)
    if edge:
        t.notes.append("‡ the chosen C lies at the edge of the regularisation grid: the best value may be beyond it.")
    return t


def results_metric(results: list[Result], dataset: str) -> str:
    for r in results:
        if r.dataset == dataset:
            return r.headline.metric
    return ""


def _metric_name(metric: str) -> str:
    return "AUROC" if metric == "auroc" else metric.replace("_", " ")


def analysis_tables(coll: Collection) -> list[Table]:
    out = []
    sal = [r for r in coll.analysis("saliency") if not r.variant]
    if sal:
        grid = coll.grid(sal, DIFFUSION) or coll.grid(sal)
        out.append(_grid_table(
            coll, "table_attentive_diffusion", "Attentive diffusion (%), mean ± 95% CI over images (like the "
            "paper's Table A7)", sal, lambda m, d: fmt_value(grid.get((m, d))), None, 2,
            notes=["Percentage of saliency-map pixels above the map's mean: how spread out the occlusion "
                   "saliency is. It has no better direction, so nothing is marked."]))
    inv = [r for r in coll.analysis("invariance") if not r.variant]
    for metric in invariance_metrics(inv):
        grid = coll.grid(inv, metric)
        out.append(_grid_table(
            coll, f"table_invariance_{slugify(metric)}", f"Invariance to {metric} (mean whitened cosine "
            "similarity, in [-1, 1]; like the paper's Tables A1-A3)", inv,
            lambda m, d, g=grid: fmt_value(g.get((m, d)), 3), True, 3,
            notes=["Higher is more invariant: features of the transformed image closer to the clean one's."]))
    rec = [r for r in coll.analysis("reconstruction") if not r.variant]
    for metric in lpips_metrics(rec):
        grid = coll.grid(rec, metric)
        net = metric.removeprefix("lpips_")
        out.append(_grid_table(
            coll, f"table_perceptual_{slugify(net)}", f"Perceptual distance of the reconstructions, LPIPS "
            f"({'mean of the three networks' if net == 'mean' else net}; lower is closer; like the paper's "
            "Tables A4-A6)", rec, lambda m, d, g=grid: fmt_value(g.get((m, d)), 3), False, 3))
    return out


def transferability_tables(coll: Collection, f: Findings, transfer: dict[str, list[Result]]) -> list[Table]:
    tr = [r for r in coll.analysis("transferability") if not r.variant]
    if not tr:
        return []
    scores = score_metrics(tr)
    out = []
    for d in coll.datasets_of(tr):
        sgrids = {s: coll.grid([r for r in tr if r.dataset == d], s) for s in scores}
        present = [s for s in scores if sgrids[s]]
        tgrids = {t: coll.grid([r for r in rs if r.dataset == d]) for t, rs in transfer.items()}
        tnames = [t for t in transfer if tgrids[t]]
        models = [m for m in coll.models if any((m, d) in g for g in sgrids.values())]
        rows = []
        for m in models:
            cells = [fmt_value(sgrids[s].get((m, d)), 3, ci=False) for s in present]
            cells += [fmt_value(tgrids[t].get((m, d))) for t in tnames]
            rows.append(Row(m, coll.model_label(m), cells, coll.random_weights(m)))
        facts = []
        for t in tnames:
            vals = []
            for s in present:
                ag = next((a for a in f.agreement if a.score == s and a.table == t and a.dataset == d), None)
                vals.append(DASH if ag is None or ag.tau is None else f"τ {ag.tau:+.2f} (p {p_is(ag.p)}, n {ag.n})")
            facts.append((f"Kendall τ vs {t}", vals + [""] * len(tnames)))
        facts.append(("data", ["SYNTHETIC" if coll.synthetic(d) else "real"] * (len(present) + len(tnames))))
        t = Table(slug=f"table_transferability_{slugify(d)}",
                  title=f"Transferability scores next to measured transfer: {coll.dataset_label(d)}",
                  corner="Model", columns=[*present, *[f"{t} (measured)" for t in tnames]], rows=rows, facts=facts,
                  notes=["Scores predict transfer from frozen features without training (higher is better); "
                         "Kendall τ is their rank agreement with the measured results across the models."
                         + _weights_sentence(coll, models)],
                  column_keys=[*present, *tnames])
        t.rank([True] * len(present) + [transfer[x][0].headline.higher_is_better for x in tnames], 3)
        out.append(t)
    return out


def _weights_sentence(coll: Collection, models: list[str]) -> str:
    note = _weights_note(coll, models)
    return (" " + note[0]) if note else ""


def paired_table(coll: Collection, f: Findings, name: str) -> Table | None:
    """Few-shot: every model against the best of each dataset, on the same episodes."""
    rows = []
    boot_any = False
    for p in f.pairs.get(name, []):
        dl = coll.dataset_label(p.dataset) + (" [SYNTHETIC]" if coll.synthetic(p.dataset) else "")
        if p.comparison is None:
            rows.append(Row(p.dataset, dl, [Cell(DASH), Cell(DASH), Cell(p.reason or DASH)] + [Cell("")] * 5))
            continue
        c = p.comparison
        boot = (p.bootstrap or {}).get("models", {}) if p.bootstrap else {}
        for r in sorted(c.rows, key=lambda r: (r.verdict != VERDICT_BEST, -r.difference)):
            b = boot.get(r.model, {})
            bdiff = b.get("difference")
            btext = DASH
            if bdiff:
                boot_any = True
                btext = f"[{bdiff['low']:+.2f}, {bdiff['high']:+.2f}]"
            elif r.verdict == VERDICT_BEST and b.get("accuracy"):
                boot_any = True
                btext = f"accuracy [{b['accuracy']['low']:.2f}, {b['accuracy']['high']:.2f}]"
            tag = f" [{RANDOM_TAG}]" if coll.random_weights(r.model) else ""
            if r.verdict == VERDICT_BEST:
                cells = [Cell(coll.model_label(r.model) + tag), Cell(f"{r.accuracy:.2f}", r.accuracy), Cell("best"),
                         Cell(DASH), Cell(DASH), Cell(DASH), Cell(DASH), Cell(btext)]
            else:
                cells = [Cell(coll.model_label(r.model) + tag),
                         Cell(f"{r.accuracy:.2f}", r.accuracy),
                         Cell(r.verdict if r.verdict == VERDICT_WORSE else "not sig. different"),
                         Cell(f"{r.difference:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]", r.difference),
                         Cell(fmt_p(r.t_p_holm), r.t_p_holm), Cell(fmt_p(r.wilcoxon_p_holm), r.wilcoxon_p_holm),
                         Cell(str(r.zero_differences), r.zero_differences), Cell(btext)]
            rows.append(Row(p.dataset, dl, cells))
        for m in p.unpaired:
            rows.append(Row(p.dataset, dl, [Cell(coll.model_label(m)), Cell(DASH), Cell("not paired: other episodes")]
                            + [Cell("")] * 5))
    if not any(p.comparison is not None for p in f.pairs.get(name, [])):
        return None
    notes = [
        "Difference = model − best, in accuracy points, on the same episodes, with its 95% t interval. "
        "The verdict is the paired t test on the per-episode differences, Holm-adjusted over the comparisons "
        "of each dataset (alpha 0.05); the Wilcoxon signed-rank test on the same differences is the robust check "
        "(zero differences ranked and split between the signs, zsplit; 'zeros' counts them).",
        "These intervals and p values are CONDITIONAL ON THE TEST POOL: they cover re-drawing episodes from these "
        "same images, not a new set of images from the same population. With hundreds of episodes drawn from a "
        "pool of a few dozen images per class they are small by construction.",
    ]
    if boot_any:
        notes.append("Bootstrap: the generalisation interval (95%) over pools resampled with replacement (images or "
                     "patients), re-running the same episode seeds on each: what a new test pool could give.")
    else:
        notes.append("No generalisation interval was computed (run `medxfer report RUN_DIR --bootstrap 1000` while "
                     "the feature cache is present).")
    for p in f.pairs.get(name, []):
        if p.bootstrap and p.bootstrap.get("unavailable"):
            notes.append(f"{coll.dataset_label(p.dataset)}: bootstrap not computed: {p.bootstrap['unavailable']}")
    title = "Few-shot: every model against the best, on the same episodes (p values conditional on the test pool)"
    title += _variant_title(coll, name)
    return Table(slug="table_paired_" + slugify(name), title=title, corner="Dataset",
                 columns=["Model", "Accuracy (%)", "Verdict", "Difference [95% CI]", "p paired t (Holm)",
                          "p Wilcoxon (Holm)", "zeros", "Bootstrap difference [95%]"],
                 rows=rows, notes=notes, marked=False, kind="stats")


def across_table(coll: Collection, f: Findings, name: str) -> Table | None:
    a = f.across.get(name)
    if a is None:
        return None
    if a.result is None:
        return Table(slug="table_ranks_" + slugify(name), title=f"Ranks across datasets: {coll.table_title(name)}",
                     corner="Model",
                     columns=["Mean rank"], rows=[], notes=[f"Not computed: {a.reason}."], marked=False, kind="stats")
    res = a.result
    grid = coll.grid(coll.transfer_tables()[name])
    scores = np.array([[grid[(m, d)].value for m in res.models] for d in res.datasets])
    ranks = rank_matrix(scores, bool(res.extras.get("higher_is_better", True)))
    rows = []
    for j, m in enumerate(res.models):
        cells = [Cell(f"{res.mean_ranks[m]:.2f}", res.mean_ranks[m])]
        cells += [Cell(f"{ranks[i, j]:g}", float(ranks[i, j])) for i in range(len(res.datasets))]
        rows.append(Row(m, coll.model_label(m), cells, coll.random_weights(m)))
    fr = res.friedman
    notes = [f"Friedman test of equal mean ranks: chi2 = {fr.chi2:.3g} (df {fr.df}), p {p_is(fr.p_value)}; "
             f"Iman-Davenport F = {fmt_num(fr.iman_davenport_f, '.3g')}, p {p_is(fr.f_p_value)}.",
             res.statement]
    if a.excluded_models:
        notes.append("Left out (no result on every dataset): " + ", ".join(map(coll.model_label, a.excluded_models)))
    data = ["", *["SYNTHETIC" if coll.synthetic(d) else "real" for d in res.datasets]]
    return Table(slug="table_ranks_" + slugify(name), title=f"Ranks across datasets: {coll.table_title(name)} (1 = best)",
                 corner="Model",
                 columns=["Mean rank", *[coll.dataset_label(d) for d in res.datasets]], rows=rows, notes=notes,
                 facts=[("data", data)], marked=False, kind="stats", column_keys=["mean_rank", *res.datasets])


def answer_table(coll: Collection, f: Findings) -> Table | None:
    """One row per dataset: per few-shot table the best model and those not significantly
    different from it; per many-shot table the best model (no paired test exists there)."""
    if not f.answers:
        return None
    tables = list(dict.fromkeys(a.table for a in f.answers))
    paired = {t for t in tables if any(a.basis.startswith("paired") for a in f.answers if a.table == t)}
    columns: list[str] = []
    for t in tables:
        title = coll.table_title(t)
        columns.append(f"{title}: best")
        if t in paired:
            columns.append(f"{title}: not significantly different from the best")
    by = {(a.table, a.dataset): a for a in f.answers}
    datasets = [d for d in coll.datasets if any((t, d) in by for t in tables)]
    rows = []
    flagged = boot_note = False
    for d in datasets:
        cells = []
        for t in tables:
            a = by.get((t, d))
            if a is None:
                cells += [EMPTY] * (2 if t in paired else 1)
                continue
            best = coll.model_label(a.best) + (f" [{RANDOM_TAG}]" if coll.random_weights(a.best) else "")
            cells.append(Cell(f"{best}: {fmt_value(a.best_value).text}", a.best_value.value))
            if t in paired:
                if not a.basis.startswith("paired"):
                    cells.append(Cell(a.basis.removeprefix("no paired test: ")))
                else:
                    same = ", ".join(map(coll.model_label, a.same)) or "none"
                    tail = f" ({len(a.worse)} worse)" if a.worse else ""
                    pp = f.pair(t, d)
                    boot = (pp.bootstrap or {}).get("models", {}) if pp is not None else {}
                    spans = [m for m in a.worse if (iv := boot.get(m, {}).get("difference"))
                             and iv["low"] <= 0.0 <= iv["high"]]
                    if spans:
                        boot_note = True
                        tail += (f"; the generalisation interval of the difference includes 0 for "
                                 f"{', '.join(map(coll.model_label, spans))}")
                    cells.append(Cell(same + tail, float(len(a.same))))
        warn = any(a.warnings for t in tables if (a := by.get((t, d))) is not None)
        flagged = flagged or warn
        label = coll.dataset_label(d) + (" [SYNTHETIC]" if coll.synthetic(d) else "") + (" ⚠" if warn else "")
        rows.append(Row(d, label, cells))
    notes = []
    if paired:
        ex = next(a for a in f.answers if a.table in paired and a.basis.startswith("paired"))
        notes.append("Few-shot: " + ex.basis.split("; conditional")[0] + ". The verdicts are conditional on each "
                     "dataset's pool of images (they cover re-drawn episodes, not new images).")
    if any(t not in paired for t in tables):
        notes.append("Many-shot (linear, finetune): the best score only; one number per model on one test split "
                     "gives no paired test, so no model is called indistinguishable from or worse than the best.")
    single = [coll.dataset_label(a.dataset) for a in f.answers if a.basis.startswith("one model only")]
    if single:
        notes.append(f"One model only on {', '.join(dict.fromkeys(single))}: nothing to compare it with.")
    if boot_note:
        notes.append("Generalisation interval (--bootstrap): the same episodes re-run on resampled pools; where it "
                     "includes 0, a new set of images could reverse the order the paired test sees on these images.")
    if flagged:
        notes.append("⚠ the few-shot pool is barely larger than shots + queries per class (see the warning below).")
    return Table(slug="table_answer", title="The best model per dataset, and which others are not significantly "
                 "different from it", corner="Dataset", columns=columns, rows=rows, notes=notes, marked=False,
                 kind="answer")


def build_tables(coll: Collection, f: Findings) -> list[Table]:
    """Every table of the report, in the order the report shows them."""
    transfer = coll.transfer_tables()
    out: list[Table] = []
    for name, rs in transfer.items():
        if rs[0].protocol == "fewshot":
            out.append(fewshot_table(coll, f, name, rs))
            continue
        for metric in (None, "auroc"):
            t = manyshot_table(coll, name, rs, metric)
            if t is not None:
                out.append(t)
    out += analysis_tables(coll)
    out += transferability_tables(coll, f, transfer)
    return out


def stats_tables(coll: Collection, f: Findings) -> list[Table]:
    out: list[Table] = []
    for name in coll.transfer_tables():
        t = paired_table(coll, f, name)
        if t is not None:
            out.append(t)
    for name in coll.transfer_tables():
        t = across_table(coll, f, name)
        if t is not None and t.rows:
            out.append(t)
    return out


# ------------------------------------------------------------------------ renderers

def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_cell(c: Cell) -> str:
    s = _md_escape(c.shown)
    return f"**{s}**" if c.rank == 1 else f"<u>{s}</u>" if c.rank == 2 else s


def to_markdown(t: Table, heading: str = "##") -> str:
    lines = [f"{heading} {t.title}", ""]
    lines.append("| " + " | ".join(_md_escape(x) for x in [t.corner, *t.columns]) + " |")
    lines.append("|---" * (len(t.columns) + 1) + "|")
    for r in t.rows:
        lines.append("| " + " | ".join([_md_escape(r.shown_label), *[_md_cell(c) for c in r.cells]]) + " |")
    for label, vals in t.facts:
        lines.append("| " + " | ".join([f"*{_md_escape(label)}*", *[_md_escape(v) for v in vals]]) + " |")
    lines.append("")
    for n in t.notes:
        lines.append(n)
        lines.append("")
    return "\n".join(lines)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "–": "--", "−": "$-$", "≈": r"$\approx$", "⚠": "(!)", "‡": r"$^\ddagger$",
                  "τ": r"$\tau$", "√": r"$\sqrt{}$", "×": r"$\times$"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in s)


def to_latex(t: Table) -> str:
    """A booktabs tabular (best \\textbf, second best \\underline); facts rows below a rule and
    the notes as comments and a footnote paragraph-free caption line."""
    lines = [f"% medxfer report: {t.title}", r"\begin{tabular}{l" + "c" * len(t.columns) + "}", r"\toprule",
             " & ".join(latex_escape(x) for x in [t.corner, *t.columns]) + r" \\", r"\midrule"]
    for r in t.rows:
        cells = []
        for c in r.cells:
            s = latex_escape(c.shown)
            cells.append(r"\textbf{" + s + "}" if c.rank == 1 else r"\underline{" + s + "}" if c.rank == 2 else s)
        label = latex_escape(r.label) + (r" [\textit{random weights}]" if r.random else "")
        lines.append(" & ".join([label, *cells]) + r" \\")
    if t.facts:
        lines.append(r"\midrule")
        for label, vals in t.facts:
            lines.append(" & ".join([r"\textit{" + latex_escape(label) + "}", *[latex_escape(v) for v in vals]])
                         + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += ["% " + n.replace("**", "").replace("`", "") for n in t.notes]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    """Long format: one row per (row, column) cell, with the column's facts and the row's weights,
    so every line stands on its own."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    fact_names = [label for label, _ in t.facts]
    w.writerow(["table", t.corner.lower(), "label", "random_weights", "column", "column_key", "text", "value",
                "rank", *fact_names])
    keys = t.column_keys or t.columns
    for r in t.rows:
        for j, c in enumerate(r.cells):
            w.writerow([t.slug, r.key, r.label, r.random, t.columns[j], keys[j], c.shown,
                        "" if c.value is None else repr(float(c.value)), c.rank,
                        *[vals[j] for _, vals in t.facts]])
    return buf.getvalue()


# --------------------------------------------------------------------- the summary

def summary_markdown(results: list[Result], findings: Findings | None = None, report_dir: str | None = None) -> str:
    """The run's summary (``summary.md``): the answer, every table with its settings, the paired
    comparisons, the ranks across datasets, the weights, the warnings."""
    if not results:
        return "# medxfer results\n\nNo results yet.\n"
    f = findings or compute(Collection.of(results))
    coll = f.coll
    lines = ["# medxfer results", ""]
    lines += _overview(coll)
    ans = answer_table(coll, f)
    if ans is not None:
        lines.append(to_markdown(ans))
    tables = build_tables(coll, f)
    in_tables = {n for t in tables for n in t.notes}
    for w in f.warnings:
        if f"⚠ {w}" not in in_tables:  # the pool warnings are under their table already
            lines += [f"⚠ {w}", ""]
    for t in tables:
        lines.append(to_markdown(t))
    for t in stats_tables(coll, f):
        lines.append(to_markdown(t))
    for name, a in f.across.items():
        if a.result is None:
            lines += [f"Ranks across datasets ({coll.table_title(name).lower()}): not computed: {a.reason}.", ""]
    lines += pretraining_section(results)
    lines += ["## Weights", ""]
    for m in coll.models:
        info = coll.model_facts[m]
        tag = " — RANDOMLY INITIALISED, not pretrained" if info.random_weights else ""
        lines.append(f"- {coll.model_label(m)} (`{m}`): {info.weights}{tag}")
    lines.append("")
    warnings = sorted({w for r in results for w in r.warnings})
    problems = sorted({p for r in results for p in r.dataset_info.problems})
    if warnings or problems:
        lines += ["## Warnings from the results", ""] + [f"- {w}" for w in warnings + problems[:50]]
        if len(problems) > 50:
            lines.append(f"- ... and {len(problems) - 50} more dataset problems (see the result JSONs)")
        lines.append("")
    if report_dir:
        lines += [f"Every table (Markdown, CSV, LaTeX), the figures, `stats.json` and `report.html` are in "
                  f"`{report_dir}` (listed in its `manifest.json`).", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _overview(coll: Collection) -> list[str]:
    protos = list(dict.fromkeys(table_name(r) for r in coll.results))
    lines = [f"{len(coll.results)} results: {len(coll.models)} model(s) x {len(coll.datasets)} dataset(s); "
             f"tables: {', '.join(protos)}.", ""]
    rnd = [coll.model_label(m) for m in coll.models if coll.random_weights(m)]
    syn = [coll.dataset_label(d) for d in coll.datasets if coll.synthetic(d)]
    if rnd:
        lines += [f"**RANDOM WEIGHTS**: {', '.join(rnd)} (not pretrained; their numbers say nothing about the "
                  "pretrained models).", ""]
    if syn:
        lines += [f"**SYNTHETIC DATA**: {', '.join(syn)} (generated images, not the real datasets).", ""]
    return lines


# ----------------------------------------------------------------- compatibility

def results_csv(results: list[Result], coll: Collection | None = None) -> str:
    """One row per result: identity, labels, weights, data, every metric."""
    coll = coll or Collection.of(results)
    metric_names = sorted({k for r in results for k, v in r.metrics.items() if isinstance(v, (int, float))})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "dataset", "protocol", "table", "seed", "model_label", "dataset_label", "random_weights",
                "synthetic", "headline_metric", "headline", "headline_ci95", *metric_names, "weights"])
    order = {m: i for i, m in enumerate(coll.models)}
    dorder = {d: i for i, d in enumerate(coll.datasets)}
    for r in sorted(results, key=lambda r: (table_name(r), dorder[r.dataset], order[r.model], r.seed)):
        w.writerow([r.model, r.dataset, r.protocol, table_name(r), r.seed, coll.model_label(r.model),
                    coll.dataset_label(r.dataset), r.model_info.random_weights, r.dataset_info.synthetic,
                    r.headline.metric, r.headline.value, "" if r.headline.ci95 is None else r.headline.ci95,
                    *[r.metrics.get(k, "") for k in metric_names], r.model_info.weights])
    return buf.getvalue()


def latex_table(results: list[Result], table: str) -> str:
    """The LaTeX tabular of one table (a protocol and its variant) of ``results``."""
    coll = Collection.of(results)
    f = compute(coll)
    for t in build_tables(coll, f):
        if t.slug == "table_" + slugify(table):
            return to_latex(t)
    raise KeyError(table)
