"""Figures for the report statistics (matplotlib, Agg canvas; no pyplot state).

- :func:`cd_diagram`: mean ranks over datasets on one axis (1 = best, on the left), models
  labelled left and right, cliques of models not significantly different drawn as thick
  bars (Wilcoxon signed-rank with Holm, from :func:`~medxfer.report.stats.compare_across_datasets`),
  the Nemenyi critical difference drawn for reference (Demšar 2006).
- :func:`forest_plot`: every model's paired difference to the best of one dataset with its
  interval over episodes, coloured by verdict, with the numbers and Holm-adjusted p beside.

Both return a :class:`~matplotlib.figure.Figure`; :func:`save_figure` writes it as PNG and
SVG (text kept as text in the SVG, no timestamp).
"""
from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from medxfer.errors import UsageError
from medxfer.report.stats import (
    VERDICT_BEST,
    VERDICT_WORSE,
    AcrossDatasets,
    DatasetComparison,
)

log = logging.getLogger(__name__)

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies)
COLOURS = {VERDICT_BEST: "#000000", VERDICT_WORSE: "#D55E00", "same": "#0072B2"}
FONT = 10.0


def _text_width_in(fig: Figure, texts: list[str], size: float, family: str = "sans-serif") -> float:
    """Widest of ``texts`` in inches at font ``size``."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    widest = 0.0
    for s in texts:
        t = fig.text(0, 0, s, fontsize=size, family=family)
        widest = max(widest, t.get_window_extent(renderer).width / fig.dpi)
        t.remove()
    return widest


def _wrap(text: str, width_in: float, size: float) -> str:
    chars = max(40, int(width_in * 72 / (0.55 * size)))  # ~0.55 em per character
    return "\n".join(textwrap.wrap(text, chars))


def cd_diagram(result: AcrossDatasets, *, title: str | None = None, width: float = 9.0) -> Figure:
    """Critical-difference diagram of ``result`` (models sorted by mean rank, best first)."""
    models = result.models
    k = len(models)
    ranks = [result.mean_ranks[m] for m in models]
    n_left = math.ceil(k / 2)
    left, right = models[:n_left], models[n_left:]
    fig = Figure(figsize=(width, 4.0))
    gap = "\u2002\u2002"  # en spaces: kept in SVG, where runs of plain spaces collapse
    lab_left = [f"{m}{gap}{result.mean_ranks[m]:.2f}" for m in left]
    lab_right = [f"{result.mean_ranks[m]:.2f}{gap}{m}" for m in right]
    text_w = _text_width_in(fig, lab_left + lab_right, FONT)
    margin = text_w + 0.65  # label, the elbow's end and some white
    axis_w = width - 2 * margin
    if axis_w < 2.0:
        raise UsageError(f"cd_diagram: labels are too long for a {width} in wide figure; pass a larger width")

    # vertical layout in inches from the top
    row = 0.24
    y_cd = 0.35 if title is None else 0.75
    y_axis = y_cd + 0.75
    y_clique0 = y_axis + 0.35
    bars = result.cliques
    y_labels0 = y_clique0 + max(len(bars), 1) * 0.16 + 0.3
    y_end = y_labels0 + (max(len(left), len(right)) - 1) * row
    caption = _cd_caption(result)
    caption = _wrap(caption, width - 0.6, FONT - 1)
    cap_h = 0.19 * (caption.count("\n") + 1)
    height = y_end + 0.35 + cap_h + 0.2
    fig.set_size_inches(width, height)
    ax = fig.add_axes((margin / width, 0.0, axis_w / width, 1.0))
    ax.set_xlim(1, k)
    ax.set_ylim(height, 0)  # y in inches from the top
    ax.axis("off")
    per_in = (k - 1) / axis_w  # rank units per inch

    if title:
        fig.text(0.5, 1 - 0.3 / height, title, ha="center", va="center", fontsize=FONT + 2, weight="bold")
    # the rank axis, ticks up, numbers above
    ax.plot([1, k], [y_axis, y_axis], color="black", lw=1.2, clip_on=False)
    for r in range(1, k + 1):
        ax.plot([r, r], [y_axis, y_axis - 0.1], color="black", lw=1.2, clip_on=False)
        ax.text(r, y_axis - 0.16, str(r), ha="center", va="bottom", fontsize=FONT - 1)
    for r in range(1, k):
        ax.plot([r + 0.5, r + 0.5], [y_axis, y_axis - 0.05], color="black", lw=0.8, clip_on=False)
    # Nemenyi critical difference, for reference
    cd = result.nemenyi_cd
    if cd < k - 1:
        ax.plot([1, 1 + cd], [y_cd, y_cd], color="black", lw=1.6, clip_on=False)
        for x in (1, 1 + cd):
            ax.plot([x, x], [y_cd - 0.06, y_cd + 0.06], color="black", lw=1.6, clip_on=False)
        ax.text(1 + cd / 2, y_cd - 0.1, f"CD = {cd:.2f} (Nemenyi, α = {result.alpha:g})", ha="center",
                va="bottom", fontsize=FONT - 1)
    else:
        ax.text(1, y_cd, f"Nemenyi CD = {cd:.2f}: wider than the whole axis", ha="left", va="center",
                fontsize=FONT - 1)
    # cliques
    for i, members in enumerate(bars):
        lo, hi = min(result.mean_ranks[m] for m in members), max(result.mean_ranks[m] for m in members)
        y = y_clique0 + i * 0.16
        ax.plot([lo - 0.04 * per_in, hi + 0.04 * per_in], [y, y], color="black", lw=3.2,
                solid_capstyle="round", clip_on=False)
    # models: elbow lines from the axis to the labels
    for j, m in enumerate(left):
        y = y_labels0 + j * row
        r = result.mean_ranks[m]
        ax.plot([r, r, 1 - 0.3 * per_in], [y_axis, y, y], color="0.25", lw=0.9, clip_on=False)
        ax.text(1 - 0.36 * per_in, y, lab_left[j], ha="right", va="center", fontsize=FONT)
    for j, m in enumerate(right):
        y = y_labels0 + j * row
        r = result.mean_ranks[m]
        ax.plot([r, r, k + 0.3 * per_in], [y_axis, y, y], color="0.25", lw=0.9, clip_on=False)
        ax.text(k + 0.36 * per_in, y, lab_right[j], ha="left", va="center", fontsize=FONT)
    ax.plot(ranks, [y_axis] * k, "o", color="black", ms=3.5, clip_on=False)
    fig.text(0.3 / width, (cap_h + 0.2) / height, caption, ha="left", va="top", fontsize=FONT - 1, color="0.2",
             linespacing=1.3)
    return fig


def _cd_caption(result: AcrossDatasets) -> str:
    n, m = len(result.datasets), result.n_pairs
    test = (f"Mean rank over {n} datasets (1 = best). Bars join models with no significant difference "
            f"(Wilcoxon signed-rank over the datasets, Holm over {m} pairs, α = {result.alpha:g}).")
    if not result.any_pair_can_be_significant:
        return test + " " + result.statement
    if not result.cliques:
        return test + " Every pair differs significantly."
    return test


def _verdict_colour(verdict: str) -> str:
    return COLOURS.get(verdict, COLOURS["same"])


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return ""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_diff(d: float, lo: float, hi: float) -> str:
    return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]".replace("-", "\u2212")  # typographic minus, as on the axis


def forest_plot(comparison: DatasetComparison, *, title: str | None = None, width: float = 9.0) -> Figure:
    """Each model's mean paired difference to the best (points) with its interval over
    episodes, best first then by difference; the numbers and the Holm-adjusted paired t p
    in a column on the right."""
    rows = sorted(comparison.rows, key=lambda r: (r.verdict != VERDICT_BEST, -r.difference))
    k = len(rows)
    fig = Figure(figsize=(width, 3.0))
    names = [f"{r.model} ({r.accuracy:.1f}%)" for r in rows]
    name_w = _text_width_in(fig, names, FONT) + 0.25
    diffs = [_fmt_diff(r.difference, r.ci_low, r.ci_high) for r in rows if r.verdict != VERDICT_BEST]
    head_diff, head_p = f"difference [{100 * comparison.confidence:g}% CI]", "p (Holm)"
    w_diff = max(_text_width_in(fig, diffs, FONT - 1, "monospace"), _text_width_in(fig, [head_diff], FONT - 1))
    w_p = max(_text_width_in(fig, ["< 0.001"], FONT - 1, "monospace"), _text_width_in(fig, [head_p], FONT - 1))
    table_w = w_diff + 0.3 + w_p + 0.15
    plot_w = width - name_w - table_w - 0.4
    if plot_w < 2.0:
        raise UsageError(f"forest_plot: model names are too long for a {width} in wide figure; pass a larger width")
    row = 0.3
    top = 0.75 if title is None else 1.1
    caption = (f"Difference to the best model ({comparison.best}) in accuracy points over {comparison.n_episodes} "
               f"shared episodes, with {100 * comparison.confidence:g}% t intervals; the intervals cover "
               f"{comparison.interval_covers}. Verdict: paired t test, Holm over {k - 1} comparisons, "
               f"α = {comparison.alpha:g}; the Wilcoxon signed-rank check (zeros: {comparison.zero_method}) ")
    disagree = [r.model for r in rows if not r.wilcoxon_agrees]
    caption += f"disagrees for {', '.join(disagree)}." if disagree else "agrees for every model."
    caption = _wrap(caption, width - 0.6, FONT - 1)
    cap_h = 0.19 * (caption.count("\n") + 1)
    bottom = 0.55 + 0.35 + cap_h + 0.15  # x label, legend, caption
    height = top + k * row + bottom
    fig.set_size_inches(width, height)
    ax = fig.add_axes((name_w / width, bottom / height, plot_w / width, k * row / height))
    tab = fig.add_axes(((name_w + plot_w + 0.4) / width, bottom / height, table_w / width, k * row / height),
                       sharey=ax)
    ys = list(range(k))
    for y, r in zip(ys, rows):
        c = _verdict_colour(r.verdict)
        if r.verdict == VERDICT_BEST:
            ax.plot([0], [y], marker="D", color=c, ms=6, zorder=3)
            continue
        if math.isfinite(r.ci_low) and math.isfinite(r.ci_high):
            ax.plot([r.ci_low, r.ci_high], [y, y], color=c, lw=2.0, solid_capstyle="butt", zorder=2)
        ax.plot([r.difference], [y], marker="s" if r.verdict == VERDICT_WORSE else "o", color=c, ms=5.5, zorder=3)
    ax.axvline(0, color="0.35", lw=0.9, ls="--", zorder=1)
    ax.set_ylim(k - 0.5, -0.5)
    ax.set_yticks(ys, names, fontsize=FONT)
    ax.tick_params(axis="y", length=0)
    ax.tick_params(axis="x", labelsize=FONT - 1)
    ax.grid(axis="x", color="0.9", lw=0.8, zorder=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    lo = min([r.ci_low for r in rows if math.isfinite(r.ci_low)] + [0.0])
    hi = max([r.ci_high for r in rows if math.isfinite(r.ci_high)] + [0.0])
    pad = 0.06 * max(hi - lo, 1.0)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("model − best (accuracy points)", fontsize=FONT)

    tab.axis("off")
    tab.set_xlim(0, 1)
    x_p = (table_w - 0.15) / table_w  # right edge of the p column, leaving some white
    tab.text(0.0, -0.75, head_diff, ha="left", va="bottom", fontsize=FONT - 1, weight="bold")
    tab.text(x_p, -0.75, head_p, ha="right", va="bottom", fontsize=FONT - 1, weight="bold")
    for y, r in zip(ys, rows):
        if r.verdict == VERDICT_BEST:
            tab.text(0.0, y, "best", ha="left", va="center", fontsize=FONT - 1)
            continue
        c = _verdict_colour(r.verdict)
        tab.text(0.0, y, _fmt_diff(r.difference, r.ci_low, r.ci_high), ha="left", va="center",
                 fontsize=FONT - 1, color=c, family="monospace")
        tab.text(x_p, y, _fmt_p(r.t_p_holm), ha="right", va="center", fontsize=FONT - 1, color=c,
                 family="monospace")
    fig.text(0.5, 1 - 0.35 / height, title or f"{comparison.dataset}: every model against the best",
             ha="center", va="center", fontsize=FONT + 2, weight="bold")
    handles = [Line2D([], [], color=COLOURS[VERDICT_BEST], marker="D", ls="", label="best"),
               Line2D([], [], color=COLOURS["same"], marker="o", ls="-", label="not significantly different"),
               Line2D([], [], color=COLOURS[VERDICT_WORSE], marker="s", ls="-", label="worse")]
    fig.legend(handles=handles, loc="center", bbox_to_anchor=(0.5, (cap_h + 0.15 + 0.2) / height), ncol=3,
               frameon=False, fontsize=FONT - 1)
    fig.text(0.3 / width, (cap_h + 0.1) / height, caption, ha="left", va="top", fontsize=FONT - 1, color="0.2",
             linespacing=1.3)
    return fig


def save_figure(fig: Figure, stem: Path | str, dpi: int = 200, png_compression: int = 6) -> tuple[Path, Path]:
    """Write ``stem``.png and ``stem``.svg atomically; returns both paths. ``png_compression``:
    zlib level of the PNG (1 is several times faster to write than the default 6, and ~10% larger)."""
    from medxfer.cache import atomic_path

    stem = Path(stem)
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    FigureCanvasAgg(fig)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white", pil_kwargs={"compress_level": png_compression})
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "medxfer"}), atomic_path(svg) as tmp:
        fig.savefig(tmp, format="svg", facecolor="white", metadata={"Date": None})
    log.info("figure written: %s, %s", png, svg)
    return png, svg
