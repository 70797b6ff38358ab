"""The paper's figures from the results (matplotlib, Agg canvas; no pyplot state).

Each function returns :class:`Figure` records: the figure (or None when nothing to draw), its
title and caption, and a note of what is missing when the figure is partial. Only results
that exist are drawn.

- Figure 2: per transfer protocol and dataset, the models' scores min-max scaled across the
  compared models, averaged by family (self-supervised, supervised, domain-specific).
- Figure 3: box plot per self-supervised method of its scaled scores over the datasets.
- Figure 4: in-domain (chest X-ray) vs out-of-domain by family, mean ± 1 sigma.
- Figure 5: the domain-specific models per dataset, with the best other model for reference.
- Figures 7, A1-A4: transfer against attentive diffusion, invariance, perceptual distance and
  ImageNet top-1, one panel per dataset, with Pearson r, its p and a least-squares line.
- Figure 9: attentive diffusion by family and domain.
- Grids of saliency overlays and of reconstructions, models x datasets (Figures 6, A5, A6).
- Beyond the paper: the critical-difference diagram and the per-dataset forest plots
  (:mod:`medxfer.report.figures_stats`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image

from medxfer.errors import UsageError
from medxfer.report.collect import FAMILIES, Collection
from medxfer.report.figures_stats import cd_diagram, forest_plot
from medxfer.report.findings import Correlation, Findings, by_family_and_domain, family_means
from medxfer.report.stats import AcrossDatasets, DatasetComparison
from medxfer.report.tables import slugify
from medxfer.results import Result

log = logging.getLogger(__name__)

FONT = 9.0
FAMILY_COLOURS = {"self-supervised": "#0072B2", "supervised": "#E69F00", "domain-specific": "#009E73"}
OTHER_COLOUR = "#999999"
DOMAIN_COLOURS = {"in-domain": "#CC79A7", "out-of-domain": "#56B4E9"}
THUMB = 96  # pixels of an image in a grid
FIGURE_DPI = 130  # of the PNGs: about 1300 px across a 10-inch figure, sharp in the page, quick to write
#: Style every report figure is built and saved under: a fixed title height spares matplotlib
#: a search of the axes' tick labels for every title at every draw (no figure puts ticks on top
#: of a titled axes).
FIGURE_RC = {"axes.titley": 1.0, "axes.titlepad": 5.0, "svg.hashsalt": "medxfer"}


def figure_style() -> Any:
    """The rc context of :data:`FIGURE_RC` (``with figure_style(): ...``)."""
    return matplotlib.rc_context(FIGURE_RC)


FIGURE_LABEL_MAX = 36  # characters of a model name in a statistics figure


def short_label(text: str, limit: int = FIGURE_LABEL_MAX) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


@dataclass
class Figure:
    """One report figure: ``fig`` is None when there was nothing to draw (``missing`` says why)."""

    slug: str
    title: str
    caption: str
    fig: MplFigure | None
    missing: list[str] = field(default_factory=list)


def _colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, OTHER_COLOUR)


def _style(ax) -> None:  # type: ignore[no-untyped-def]
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(axis="y", color="0.92", lw=0.8, zorder=0)
    ax.set_axisbelow(True)


def _families_present(coll: Collection, models: list[str]) -> list[str]:
    present = {coll.family(m) for m in models}
    return [f for f in FAMILIES if f in present] + sorted(present - set(FAMILIES))


# ------------------------------------------------------------------ Figures 2 to 5

def figure2(coll: Collection, f: Findings) -> Figure:
    """Per task, the family averages of min-max scaled scores."""
    transfer = coll.transfer_tables()
    panels = [(n, rs, f.scaled[n]) for n, rs in transfer.items() if f.scaled.get(n)]
    missing = [f"{n}: fewer than two models with different scores on any dataset" for n in transfer
               if not f.scaled.get(n)]
    title = "Family averages of min-max scaled transfer scores (like the paper's Figure 2)"
    caption = ("Per dataset, every model's score is min-max scaled across the compared models (1 = best, 0 = worst), "
               "then averaged over the models of each family.")
    if not panels:
        return Figure("fig2_family_scaled", title, caption, None, missing or ["no transfer results"])
    fams = _families_present(coll, coll.models)
    fig = MplFigure(figsize=(10, 0.6 + 2.5 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (name, rs, scaled) in zip(axes, panels):
        means = family_means(coll, scaled)
        ds = [d for d in coll.datasets_of(rs) if d in means]
        width = 0.8 / max(len(fams), 1)
        for i, fam in enumerate(fams):
            xs = [j + (i - (len(fams) - 1) / 2) * width for j, d in enumerate(ds) if fam in means[d]]
            ys = [means[d][fam] for d in ds if fam in means[d]]
            ax.bar(xs, ys, width * 0.95, color=_colour(fam), label=fam, zorder=2)
        ax.set_xticks(range(len(ds)), [coll.dataset_label(d) for d in ds], fontsize=FONT - 1)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("scaled score", fontsize=FONT)
        ax.set_title(coll.table_title(name), fontsize=FONT + 1, loc="left")
        _style(ax)
        skipped = [d for d in coll.datasets_of(rs) if d not in means]
        if skipped:
            missing.append(f"{name}: left out {', '.join(map(coll.dataset_label, skipped))} (every model scored "
                           "the same, or one model only)")
    fig.legend(handles=[Patch(color=_colour(x), label=x) for x in fams], loc="upper center", ncol=len(fams),
               frameon=False, fontsize=FONT, bbox_to_anchor=(0.5, 1.0))
    fig.subplots_adjust(top=1 - 0.45 / fig.get_figheight(), bottom=0.5 / fig.get_figheight(), hspace=0.55,
                        left=0.07, right=0.99)
    return Figure("fig2_family_scaled", title, caption, fig, missing)


def figure3(coll: Collection, f: Findings) -> Figure:
    """Box plot per self-supervised method of its scaled scores over datasets."""
    transfer = coll.transfer_tables()
    title = "Self-supervised methods over the datasets (like the paper's Figure 3)"
    caption = "Each box: one self-supervised model's min-max scaled scores over the datasets (1 = best of the run)."
    ssl = [m for m in coll.models if coll.family(m) == "self-supervised"]
    if not ssl:
        return Figure("fig3_selfsupervised_boxes", title, caption, None, ["no self-supervised model in the run"])
    panels = [(n, rs, f.scaled[n]) for n, rs in transfer.items() if f.scaled.get(n)]
    if not panels:
        return Figure("fig3_selfsupervised_boxes", title, caption, None, ["no scaled transfer scores"])
    fig = MplFigure(figsize=(max(5.0, 1.0 + 0.9 * len(ssl)) * len(panels) / max(1, len(panels)) + 2, 3.0 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    missing = []
    for ax, (name, _rs, scaled) in zip(axes, panels):
        ms = [m for m in ssl if any(m in per for per in scaled.values())]
        data = [[per[m] for per in scaled.values() if m in per] for m in ms]
        if not ms:
            ax.set_axis_off()
            missing.append(f"{name}: no self-supervised result")
            continue
        box = ax.boxplot(data, patch_artist=True, widths=0.6, medianprops={"color": "black"})
        for patch in box["boxes"]:
            patch.set_facecolor(FAMILY_COLOURS["self-supervised"])
            patch.set_alpha(0.75)
        ax.set_xticks(range(1, len(ms) + 1), [short_label(coll.model_label(m), 18) for m in ms], fontsize=FONT - 1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("scaled score", fontsize=FONT)
        ax.set_title(f"{coll.table_title(name)} ({len(scaled)} datasets)", fontsize=FONT + 1, loc="left")
        _style(ax)
    fig.subplots_adjust(hspace=0.5, top=1 - 0.3 / fig.get_figheight(), bottom=0.45 / fig.get_figheight(),
                        left=0.08, right=0.99)
    return Figure("fig3_selfsupervised_boxes", title, caption, fig, missing)


def _domain_bars(ax, coll: Collection, stats: dict[str, dict[str, dict]], ylabel: str) -> list[str]:  # type: ignore[no-untyped-def]
    fams = list(stats)
    doms = ["in-domain", "out-of-domain"]
    width = 0.38
    missing = []
    for i, dom in enumerate(doms):
        xs, ys, es = [], [], []
        for j, fam in enumerate(fams):
            s = stats[fam].get(dom)
            if s is None:
                missing.append(f"{fam}: no {dom} result")
                continue
            xs.append(j + (i - 0.5) * width)
            ys.append(s["mean"])
            es.append(s["sd"])
        ax.bar(xs, ys, width * 0.95, yerr=es, capsize=3, color=DOMAIN_COLOURS[dom], label=dom, zorder=2,
               error_kw={"lw": 1.0})
    ax.set_xticks(range(len(fams)), fams, fontsize=FONT - 1)
    ax.set_ylabel(ylabel, fontsize=FONT)
    _style(ax)
    return missing


def figure4(coll: Collection, f: Findings) -> Figure:
    """In-domain vs out-of-domain by family, mean ± 1 sigma of scaled scores."""
    transfer = coll.transfer_tables()
    title = "In-domain vs out-of-domain transfer by model family (like the paper's Figure 4)"
    caption = ("Mean min-max scaled score of each family on the in-domain (chest X-ray) and the out-of-domain "
               "datasets; bars: ± 1 standard deviation over the family's model-dataset results.")
    panels = [(n, rs, f.scaled[n]) for n, rs in transfer.items() if f.scaled.get(n)]
    if not panels:
        return Figure("fig4_domain_by_family", title, caption, None, ["no scaled transfer scores"])
    fig = MplFigure(figsize=(3.4 * len(panels) + 0.6, 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    missing = []
    for ax, (name, _rs, scaled) in zip(axes, panels):
        stats = by_family_and_domain(coll, scaled)
        missing += [f"{name}, {m}" for m in _domain_bars(ax, coll, stats, "scaled score")]
        ax.set_ylim(0, 1.15)
        ax.set_title(coll.table_title(name), fontsize=FONT + 1, loc="left")
    fig.legend(handles=[Patch(color=c, label=d) for d, c in DOMAIN_COLOURS.items()], loc="upper center", ncol=2,
               frameon=False, fontsize=FONT)
    fig.subplots_adjust(top=0.8, bottom=0.14, wspace=0.3, left=0.07, right=0.99)
    return Figure("fig4_domain_by_family", title, caption, fig, missing)


def figure5(coll: Collection, f: Findings) -> Figure:
    """The domain-specific models per dataset (raw scores), with the best other model as a mark."""
    transfer = coll.transfer_tables()
    title = "Domain-specific models per dataset (like the paper's Figure 5)"
    caption = ("Scores of the chest-X-ray-pretrained models on every dataset; the black mark is the best "
               "ImageNet-pretrained (supervised or self-supervised) model of the run on that dataset.")
    dom = [m for m in coll.models if coll.family(m) == "domain-specific"]
    if not dom:
        return Figure("fig5_domain_specific", title, caption, None, ["no domain-specific model in the run"])
    fig = MplFigure(figsize=(10, 0.7 + 2.6 * len(transfer)))
    axes = fig.subplots(len(transfer), 1, squeeze=False)[:, 0]
    palette = ["#009E73", "#56B4E9", "#CC79A7", "#F0E442", "#D55E00", "#0072B2", "#E69F00"]
    missing = []
    handles = []
    for ax, (name, rs) in zip(axes, transfer.items()):
        grid = coll.grid(rs)
        ds = coll.datasets_of(rs)
        ms = [m for m in dom if any((m, d) in grid for d in ds)]
        if not ms:
            missing.append(f"{name}: no domain-specific result")
            ax.set_axis_off()
            continue
        width = 0.8 / len(ms)
        for i, m in enumerate(ms):
            xs = [j + (i - (len(ms) - 1) / 2) * width for j, d in enumerate(ds) if (m, d) in grid]
            ys = [grid[(m, d)].value for d in ds if (m, d) in grid]
            ax.bar(xs, ys, width * 0.95, color=palette[i % len(palette)], zorder=2)
        others = [m for m in coll.models if m not in dom]
        hib = rs[0].headline.higher_is_better
        for j, d in enumerate(ds):
            vals = [grid[(m, d)].value for m in others if (m, d) in grid]
            if vals:
                ax.plot([j - 0.42, j + 0.42], [max(vals) if hib else min(vals)] * 2, color="black", lw=1.6, zorder=3)
        ax.set_xticks(range(len(ds)), [coll.dataset_label(d) for d in ds], fontsize=FONT - 1)
        ax.set_ylabel(rs[0].headline.metric.replace("_", " "), fontsize=FONT)
        ax.set_title(coll.table_title(name), fontsize=FONT + 1, loc="left")
        _style(ax)
        if not handles:
            handles = [Patch(color=palette[i % len(palette)], label=short_label(coll.model_label(m)))
                       for i, m in enumerate(ms)]
    handles.append(Patch(color="black", label="best ImageNet-pretrained model"))
    fig.legend(handles=handles, loc="upper center", ncol=min(4, len(handles)), frameon=False, fontsize=FONT - 1)
    rows = math.ceil(len(handles) / 4)
    fig.subplots_adjust(top=1 - (0.25 + 0.2 * rows) / fig.get_figheight(), bottom=0.45 / fig.get_figheight(),
                        hspace=0.6, left=0.07, right=0.99)
    return Figure("fig5_domain_specific", title, caption, fig, missing)


# ------------------------------------------------------------- correlation figures

CORRELATION_TITLES = {
    "attentive_diffusion": ("fig7_vs_attentive_diffusion", "like the paper's Figure 7"),
    "perceptual_distance": ("figA_vs_perceptual_distance", "like the paper's Figures A1-A4"),
    "imagenet_top1": ("figA_vs_imagenet_top1", "like the paper's Figures A1-A4"),
}


MIN_POINTS = 3  # a correlation panel needs this many models
PROTOCOL_STYLE = {"fewshot": ("o", "#0072B2"), "linear": ("s", "#E69F00"), "finetune": ("^", "#009E73")}
EXTRA_STYLES = [("D", "#CC79A7"), ("v", "#D55E00"), ("P", "#56B4E9")]


SERIES_STYLES = [("o", "#0072B2"), ("s", "#E69F00"), ("^", "#009E73"), ("D", "#CC79A7"), ("v", "#D55E00"),
                 ("P", "#56B4E9")]


def correlation_figures(coll: Collection, f: Findings) -> list[Figure]:
    """Transfer score against each analysis value, one panel per dataset with Pearson r, p and
    the least-squares line per series: the transfer protocols for attentive diffusion,
    perceptual distance and ImageNet top-1; the transform families for invariance (against the
    first transfer protocol, few-shot when there is one; every other pairing is in stats.json)."""
    out = []
    transfer = coll.transfer_tables()
    styles = {}
    for i, (t, rs) in enumerate(transfer.items()):
        styles[t] = PROTOCOL_STYLE.get(t, EXTRA_STYLES[i % len(EXTRA_STYLES)]) if not rs[0].variant else \
            EXTRA_STYLES[i % len(EXTRA_STYLES)]
    for what in f.xvars_missing:
        name = what.split(" (")[0]
        out.append(Figure(f"figA_vs_{slugify(name)}", f"Transfer against {name}", "", None, [what]))
    if not transfer:
        return out
    invariance = [xv for xv in f.xvars if xv.slug.startswith("invariance_")]
    for xv in f.xvars:
        if xv in invariance:
            continue
        slug, like = CORRELATION_TITLES.get(xv.slug, (f"figA_vs_{xv.slug}", "like the paper's Figures A1-A4"))
        series = [(coll.table_title(t), styles[t], f.correlations[xv.slug][t]) for t in transfer]
        out.append(_correlation_figure(
            coll, slug, f"Transfer against {xv.title} ({like})",
            "One point per model and transfer protocol; per protocol the least-squares line, Pearson r and its "
            f"two-sided p over the models of each dataset. x: {xv.label}.", xv.label, xv.title, series))
    if invariance:
        y = next(iter(transfer))
        series = [(xv.title.removesuffix(" invariance"), SERIES_STYLES[i % len(SERIES_STYLES)],
                   f.correlations[xv.slug][y]) for i, xv in enumerate(invariance)]
        out.append(_correlation_figure(
            coll, "figA_vs_invariance", f"{coll.table_title(y)} against invariance (like the paper's Figures A1-A4)",
            f"One point per model and transform family; per family the least-squares line, Pearson r and its "
            f"two-sided p over the models of each dataset. y: {coll.table_title(y).lower()} score; the other "
            "protocols' correlations are in stats.json.", "invariance (mean whitened cosine similarity)",
            "invariance", series, ylabel=f"{coll.table_title(y).lower()} score"))
    return out


def _correlation_figure(coll: Collection, slug: str, title: str, caption: str, xlabel: str, what: str,
                        series: list[tuple[str, tuple[str, str], dict[str, Correlation]]],
                        ylabel: str = "transfer score") -> Figure:
    datasets = [d for d in coll.datasets if any(c.get(d) is not None and c[d].n >= MIN_POINTS for _, _, c in series)]
    if not datasets:
        return Figure(slug, title, caption, None, [f"no dataset has {MIN_POINTS} or more models with both a "
                                                   f"transfer result and {what}"])
    ncols = min(4, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    panel_h, lines_h = 1.75, 0.13 * len(series)
    below = 0.3 + lines_h  # tick labels, then one line of r and p per series
    gap = below + 0.4  # and the next row's title
    top, bottom = 0.5, below + 0.4  # legend; the x label
    height = top + nrows * panel_h + (nrows - 1) * gap + bottom
    fig = MplFigure(figsize=(2.7 * ncols + 0.5, height))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    missing = []
    for i, d in enumerate(datasets):
        ax = axes[i // ncols, i % ncols]
        lines = []
        for label, (marker, colour), per in series:
            c = per.get(d)
            if c is None or c.n == 0:
                continue
            ax.scatter(c.x, c.y, s=13, marker=marker, color=colour, zorder=3, linewidths=0)
            if c.slope is not None:
                xs = np.array([min(c.x), max(c.x)])
                ax.plot(xs, c.slope * xs + c.intercept, color=colour, lw=1.0, zorder=2)
                p = f"p = {c.p:.2g}" if c.p >= 1e-4 else "p < 1e-4"
                lines.append(f"{label}: r = {c.r:+.2f}, {p}")
            else:
                lines.append(f"{label}: n = {c.n}, no r")
                missing.append(f"{label}, {coll.dataset_label(d)}: r needs 3 or more models with varying values")
        ax.set_title(coll.dataset_label(d), fontsize=FONT, loc="left")
        ax.annotate("\n".join(lines), xy=(0.0, 0.0), xycoords="axes fraction", xytext=(0, -20),
                    textcoords="offset points", ha="left", va="top", fontsize=FONT - 2, color="0.2")
        _style(ax)
        ax.tick_params(labelsize=FONT - 2)
        ax.locator_params(nbins=3)
        if i % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=FONT - 1)
    for i in range(len(datasets), nrows * ncols):
        axes[i // ncols, i % ncols].set_axis_off()
    handles = [Line2D([], [], marker=m, color=c, ls="-", label=label) for label, (m, c), _ in series]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, fontsize=FONT - 1)
    fig.text(0.5, 0.1 / height, xlabel, ha="center", va="bottom", fontsize=FONT)
    fig.subplots_adjust(top=1 - top / height, bottom=bottom / height, hspace=gap / panel_h, wspace=0.3,
                        left=0.07, right=0.99)
    return Figure(slug, title, caption, fig, missing)


def figure9(coll: Collection, f: Findings) -> Figure:
    """Attentive diffusion by family and domain, mean ± 1 sigma."""
    title = "Attentive diffusion by model family and domain (like the paper's Figure 9)"
    caption = "Mean attentive diffusion of each family on in-domain and out-of-domain datasets, ± 1 standard deviation."
    xv = next((x for x in f.xvars if x.slug == "attentive_diffusion"), None)
    if xv is None:
        return Figure("fig9_diffusion_by_family", title, caption, None, ["no saliency results"])
    values: dict[str, dict[str, float]] = {}
    for (m, d), v in xv.values.items():
        values.setdefault(d, {})[m] = v
    stats = by_family_and_domain(coll, values)
    fig = MplFigure(figsize=(5.2, 3.3))
    ax = fig.add_subplot()
    missing = _domain_bars(ax, coll, stats, "attentive diffusion (%)")
    fig.legend(handles=[Patch(color=c, label=d) for d, c in DOMAIN_COLOURS.items()], loc="upper center", ncol=2,
               frameon=False, fontsize=FONT)
    fig.subplots_adjust(top=0.85, bottom=0.13, left=0.13, right=0.98)
    return Figure("fig9_diffusion_by_family", title, caption, fig, missing)


# ------------------------------------------------------------------- image grids

def _image_artifact(r: Result, words: tuple[str, ...]) -> str | None:
    pngs = sorted(a.path for a in r.artifacts if a.path.lower().endswith(".png"))
    for w in words:
        for p in pngs:
            if w in Path(p).name.lower():
                return p
    return pngs[0] if pngs else None


def _thumb(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = THUMB / max(im.size)  # up or down to the tile, keeping the aspect ratio
            size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
            return np.asarray(im.resize(size, Image.Resampling.BICUBIC))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None


def image_grid(coll: Collection, protocol: str, slug: str, title: str, caption: str,
               words: tuple[str, ...]) -> Figure:
    """Models x datasets mosaic of the first matching PNG artifact of each ``protocol`` result
    (thumbnails of :data:`THUMB` pixels, one image drawn in one axes)."""
    results = [r for r in coll.analysis(protocol) if not r.variant]
    if not results:
        return Figure(slug, title, caption, None, [f"no {protocol} results"])
    by_cell: dict[tuple[str, str], Result] = {}
    for r in sorted(results, key=lambda r: r.seed, reverse=True):
        by_cell[(r.model, r.dataset)] = r
    models, datasets = coll.models_of(results), coll.datasets_of(results)
    missing: list[str] = []
    gap = 6
    step = THUMB + gap
    mosaic = np.full((len(models) * step - gap, len(datasets) * step - gap, 3), 255, dtype=np.uint8)
    found = 0
    for i, m in enumerate(models):
        for j, d in enumerate(datasets):
            y0, x0 = i * step, j * step
            r = by_cell.get((m, d))
            img = None
            if r is None:
                missing.append(f"{coll.model_label(m)} on {coll.dataset_label(d)}: no result")
            elif (rel := _image_artifact(r, words)) is None:
                missing.append(f"{coll.model_label(m)} on {coll.dataset_label(d)}: no PNG artifact")
            elif coll.run_dir is None or (img := _thumb(coll.run_dir / rel)) is None:
                missing.append(f"{rel}: missing or unreadable")
            if img is None:
                mosaic[y0:y0 + THUMB, x0:x0 + THUMB] = 238
                continue
            h, w = img.shape[:2]
            oy, ox = (THUMB - h) // 2, (THUMB - w) // 2
            mosaic[y0 + oy:y0 + oy + h, x0 + ox:x0 + ox + w] = img
            found += 1
    if not found:
        return Figure(slug, title, caption, None, missing or [f"no {protocol} images"])
    inch = 1.0 / FIGURE_DPI  # one mosaic pixel per PNG pixel: drawn without resampling
    label_w, top = 1.9, 0.8
    W = label_w + mosaic.shape[1] * inch + 1.0  # room for the last, slanted dataset name
    H = top + mosaic.shape[0] * inch + 0.15
    fig = MplFigure(figsize=(W, H))
    ax = fig.add_axes((label_w / W, 0.15 / H, mosaic.shape[1] * inch / W, mosaic.shape[0] * inch / H))
    ax.imshow(mosaic, interpolation="none", extent=(0, mosaic.shape[1], mosaic.shape[0], 0))
    ax.set_yticks([i * step + THUMB / 2 for i in range(len(models))], [short_label(coll.model_label(m), 28) for m in models],
                  fontsize=FONT - 1)
    ax.set_xticks([j * step + THUMB / 2 for j in range(len(datasets))], [coll.dataset_label(d) for d in datasets],
                  fontsize=FONT - 1.5, rotation=25, ha="left")
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return Figure(slug, title, caption, fig, missing)


# --------------------------------------------------------------- statistics figures

def _relabel_across(a: AcrossDatasets, label) -> AcrossDatasets:  # type: ignore[no-untyped-def]
    return replace(a, models=[label(m) for m in a.models], mean_ranks={label(m): v for m, v in a.mean_ranks.items()},
                   cliques=[[label(m) for m in c] for c in a.cliques])


def _relabel_comparison(c: DatasetComparison, label) -> DatasetComparison:  # type: ignore[no-untyped-def]
    return replace(c, best=label(c.best), rows=[replace(r, model=label(r.model)) for r in c.rows])


def stats_figures(coll: Collection, f: Findings) -> list[Figure]:
    out = []

    def label(m: str) -> str:
        return short_label(coll.model_label(m))

    for name, a in f.across.items():
        title = f"Critical-difference diagram: {coll.table_title(name)}"
        caption = ("Mean ranks across datasets (1 = best); bars join models whose pairwise Wilcoxon signed-rank "
                   "tests are not significant after Holm.")
        slug = "figcd_" + slugify(name)
        if a.result is None:
            out.append(Figure(slug, title, caption, None, [a.reason or "not computed"]))
            continue
        try:
            fig = cd_diagram(_relabel_across(a.result, label), title=f"{coll.table_title(name)}: mean ranks over "
                             f"{len(a.result.datasets)} datasets")
        except UsageError as exc:  # names too long even when shortened
            out.append(Figure(slug, title, caption, None, [str(exc)]))
            continue
        missing = [f"left out (not on every dataset): {', '.join(map(coll.model_label, a.excluded_models))}"] \
            if a.excluded_models else []
        out.append(Figure(slug, title, caption, fig, missing))
    for name, pairs in f.pairs.items():
        for p in pairs:
            slug = f"figforest_{slugify(name)}_{slugify(p.dataset)}"
            title = f"Forest plot: {coll.dataset_label(p.dataset)}, {coll.table_title(name)}"
            caption = ("Every model's paired difference to the best on the same episodes, with its 95% interval "
                       "(conditional on the test pool).")
            if p.comparison is None:
                out.append(Figure(slug, title, caption, None, [p.reason or "not computed"]))
                continue
            try:
                fig = forest_plot(_relabel_comparison(p.comparison, label),
                                  title=f"{coll.dataset_label(p.dataset)}: every model against the best "
                                        f"({coll.table_title(name).lower()})")
            except UsageError as exc:
                out.append(Figure(slug, title, caption, None, [str(exc)]))
                continue
            out.append(Figure(slug, title, caption, fig, [f"not paired (other episodes): {m}" for m in p.unpaired]))
    return out


def build_figures(coll: Collection, f: Findings) -> list[Figure]:
    """Every figure of the report, in the order the report shows them."""
    figs = [figure2(coll, f), figure3(coll, f), figure4(coll, f), figure5(coll, f)]
    figs += correlation_figures(coll, f)
    figs.append(figure9(coll, f))
    figs.append(image_grid(coll, "saliency", "fig6_saliency_grid", "Occlusion saliency overlays, models x datasets "
                           "(like the paper's Figure 6)", "The first saliency overlay each cell wrote.",
                           ("overlay", "saliency")))
    figs.append(image_grid(coll, "reconstruction", "figA5_reconstruction_grid", "Deep-image-prior reconstructions "
                           "from each model's features, models x datasets (like the paper's Figures A5, A6)",
                           "The first reconstruction each cell wrote.", ("recon",)))
    figs += stats_figures(coll, f)
    return figs
