"""Figures of the report statistics: files written, and no text overlapping or cut off
with 13 models (the paper's number of backbones)."""
from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from medxfer.report.figures_stats import cd_diagram, forest_plot, save_figure
from medxfer.report.stats import compare_across_datasets, compare_with_best

MODELS = ["SimCLR-v1", "SimCLR-v2", "BYOL", "MoCo-v2", "PIRL", "SwAV", "DeepCluster-v2", "SeLa-v2", "InsDis",
          "Supervised (ImageNet)", "MIMIC-CheXpert", "MIMIC-CH", "MoCo-CXR"]


def _across(n_datasets: int, seed: int):
    rng = np.random.default_rng(seed)
    skill = np.linspace(0.05, -0.05, len(MODELS))
    base = rng.uniform(0.6, 0.85, n_datasets)
    return compare_across_datasets({f"ds{i}": {m: float(base[i] + skill[j] + rng.normal(0, 0.02))
                                               for j, m in enumerate(MODELS)} for i in range(n_datasets)})


def _episodes(seed: int):
    rng = np.random.default_rng(seed)
    best = np.clip(np.round((0.75 + rng.normal(0, 0.08, 600)) * 30) / 30, 0, 1)
    out = {}
    for j, m in enumerate(MODELS):
        noise = np.round(rng.normal(0, 0.05, 600) * 30) / 30 if j else 0.0
        out[m] = np.clip(best - max(0.0, j * 0.006 - 0.02) + noise, 0, 1)
    return compare_with_best(out, dataset="Shenzhen")


def _texts(fig: Figure) -> list[tuple[str, object]]:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # positions (axis labels, ticks) are final only after a draw
    renderer = canvas.get_renderer()
    out = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip():
            out.append((t.get_text(), t.get_window_extent(renderer)))
    return out


def _assert_clean(fig: Figure) -> None:
    """Every text inside the figure, and no two texts overlapping."""
    w, h = fig.bbox.width, fig.bbox.height
    texts = _texts(fig)
    for s, bb in texts:
        assert bb.x0 >= 0 and bb.y0 >= 0 and bb.x1 <= w and bb.y1 <= h, f"{s!r} is cut off: {bb} in {w}x{h}"
    for (s1, b1), (s2, b2) in itertools.combinations(texts, 2):
        overlap_x = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
        overlap_y = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
        assert overlap_x <= 0.5 or overlap_y <= 0.5, f"{s1!r} overlaps {s2!r}"


@pytest.mark.parametrize("n_datasets", [8, 16])
def test_cd_diagram_is_clean_and_saved(tmp_path, n_datasets):
    res = _across(n_datasets, seed=0)
    fig = cd_diagram(res, title=f"Few-shot, {n_datasets} datasets")
    _assert_clean(fig)
    texts = " ".join(" ".join(s.split()) for s, _ in _texts(fig))  # wrapped lines joined
    for m in MODELS:
        assert f"{res.mean_ranks[m]:.2f} {m}" in texts or f"{m} {res.mean_ranks[m]:.2f}" in texts  # name, rank
    assert ("no pair can be significantly different" in texts) == (n_datasets == 8)
    png, svg = save_figure(fig, tmp_path / f"cd_{n_datasets}")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (round(fig.get_figwidth() * 200), round(fig.get_figheight() * 200))
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    svg_text = svg.read_text(encoding="utf-8")
    assert "MoCo-CXR" in svg_text  # text kept as text, searchable in the report
    # the cliques are the bars: 1 for 8 datasets (nothing can differ), several for 16
    assert (len(res.cliques) == 1) == (n_datasets == 8)


def test_forest_plot_is_clean_and_saved(tmp_path):
    comp = _episodes(seed=0)
    fig = forest_plot(comp)
    _assert_clean(fig)
    texts = [s for s, _ in _texts(fig)]
    assert sum(s == "best" for s in texts) == 2  # the table row and the legend
    assert any("disagrees for" in s or "agrees for every model" in s for s in texts)
    worse = [r for r in comp.rows if r.verdict == "worse"]
    same = [r for r in comp.rows if r.verdict.startswith("not significantly")]
    assert worse and same  # the picture shows all three kinds
    png, svg = save_figure(fig, tmp_path / "forest")
    assert png.stat().st_size > 10_000 and "Supervised (ImageNet)" in svg.read_text(encoding="utf-8")


def test_saved_svg_is_reproducible(tmp_path):
    comp = _episodes(seed=1)
    _, a = save_figure(forest_plot(comp), tmp_path / "a")
    _, b = save_figure(forest_plot(comp), tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()


def test_too_long_names_are_an_error_not_a_cut_off_figure():
    comp = compare_with_best({"x" * 300: [0.5, 0.6, 0.7], "b": [0.4, 0.5, 0.6]})
    with pytest.raises(ValueError, match="larger width"):
        forest_plot(comp)
