"""The report from fabricated results: stats.json against the statistics functions and scipy,
summaries and tables that state their settings, partial results, idempotent regeneration,
autoescaping, analyses with missing or extra metrics, the CLI verb."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from medxfer.cli import main
from medxfer.report.build import build_report
from medxfer.report.collect import Collection, paper_order
from medxfer.report.stats import compare_across_datasets, compare_with_best
from medxfer.results import write_result
from medxfer.testing import fake_result

FEWSHOT = {"n_way": 2, "n_shot": 20, "n_query": 15, "episodes": 600, "pool_size": None, "small_classes": "error"}


def _fewshot(model: str, dataset: str, eps: np.ndarray, *, per_class: int = 300, **kw):
    eps = np.asarray(eps, dtype=np.float64)
    counts = {"train": {"a": per_class - per_class // 5, "b": per_class - per_class // 5},
              "test": {"a": per_class // 5, "b": per_class // 5}}
    params = dict(FEWSHOT, episodes=len(eps))
    return fake_result(model, dataset, 100 * eps.mean(), 100 * 1.96 * eps.std() / math.sqrt(len(eps)),
                       episode_accuracies=eps.tolist(), params=params, details={"pool_images": 2 * per_class},
                       counts=counts, class_names=["a", "b"], **kw)


def _episodes(rng: np.random.Generator, base: np.ndarray, shift: float) -> np.ndarray:
    return np.clip(np.round((base + shift + rng.normal(0, 0.06, len(base))) * 30) / 30, 0, 1)


def _write(run: Path, results) -> Path:
    (run / "results").mkdir(parents=True, exist_ok=True)
    for r in results:
        write_result(run / "results" / f"{r.cell_id}.json", r)
    return run


def _grid(rng: np.random.Generator, models: list[str], datasets: list[str], n_eps: int = 200):
    """Few-shot and linear results, ImageNet top-1 per model; returns (results, episodes)."""
    results, eps = [], {}
    top1 = {m: 70.0 + 2 * j + rng.normal() for j, m in enumerate(models)}
    for d in datasets:
        base = np.clip(rng.normal(0.7, 0.1, n_eps), 0, 1)
        for j, m in enumerate(models):
            e = _episodes(rng, base, -0.015 * j)
            eps[(m, d)] = e
            results.append(_fewshot(m, d, e, imagenet_top1=top1[m], random_weights=False))
            results.append(fake_result(m, d, 80.0 - j + rng.normal(), 2.0, protocol="linear", random_weights=False,
                                       imagenet_top1=top1[m], metrics={"test_n": 120}))
    return results, eps


def test_display_names_as_the_paper_prints_them():
    from medxfer.data import DATASETS
    from medxfer.models import MODELS

    models, datasets = paper_order()
    labels = [MODELS.get(m).label for m in models]
    assert labels[:8] == ["Supervised (R50)", "Supervised (R18)", "Supervised (D121)", "SimCLR-v1", "MoCo-v2", "PIRL",
                          "SwAV", "BYOL"]
    assert "MIMIC-CheXpert (lr=0.01)" in labels and "MoCo-CXR (R18)" in labels and len(set(labels)) == 13
    assert [DATASETS.get(d).info.label for d in datasets] == [
        "CheXpert", "ChestX-ray14", "Shenzhen-CXR", "Montgomery-CXR", "BACH", "EyePACS", "iChallenge-AMD",
        "iChallenge-PM"]


def test_paper_models_and_datasets_first_the_users_after():
    rs = [fake_result("mine", "zoo", 50.0, dataset_name="folder"), fake_result("swav", "mydata", 60.0),
          fake_result("supervised-r50", "bach", 70.0, display_name="Supervised (R50)",
                      dataset_display_name="BACH"),
          fake_result("swav", "shenzhen", 65.0, display_name="SwAV", dataset_display_name="Shenzhen-CXR")]
    coll = Collection.of(rs)
    assert coll.models == ["supervised-r50", "swav", "mine"]
    assert coll.datasets == ["shenzhen", "bach", "zoo", "mydata"]
    assert [coll.dataset_label(d) for d in coll.datasets] == ["Shenzhen-CXR", "BACH", "zoo", "mydata"]


def test_stats_json_holds_what_the_statistics_functions_give(tmp_path):
    rng = np.random.default_rng(3)
    models, datasets = ["m1", "m2", "m3", "m4"], ["d1", "d2", "d3"]
    results, eps = _grid(rng, models, datasets)
    run = _write(tmp_path / "run", results)
    build_report(run)
    st = json.loads((run / "report" / "stats.json").read_text())
    assert st["schema"] == "medxfer.report-stats/1"
    for d in datasets:
        got = st["within_dataset"]["fewshot"][d]
        want = compare_with_best({m: eps[(m, d)] for m in models}, dataset=d).to_dict()
        assert got["comparison"] == want
        assert "not a new test set" in got["p_values_conditional_on"]
        assert got["settings"]["n_shot"] == 20 and got["settings"]["pool_images"] == 600
    # across datasets, for both transfer tables, exactly as compare_across_datasets on the seed means
    for table in ("fewshot", "linear"):
        scores = {d: {m: r.headline.value for r in results if r.protocol == table and r.dataset == d
                      for m in [r.model]} for d in datasets}
        want = compare_across_datasets(scores).to_dict()
        got = st["across_datasets"][table]
        assert {k: got[k] for k in want} == want
        assert got["friedman"]["p_value"] == want["friedman"]["p_value"]
    # correlations against scipy's pearsonr and numpy's least squares
    for d in datasets:
        c = st["correlations"]["imagenet_top1"]["fewshot"][d]
        x = [r.model_info.imagenet_top1 for r in results if r.protocol == "fewshot" and r.dataset == d]
        y = [r.headline.value for r in results if r.protocol == "fewshot" and r.dataset == d]
        ref = sps.pearsonr(x, y)
        assert c["pearson_r"] == pytest.approx(ref.statistic, rel=1e-12)
        assert c["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert c["slope"] == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-9)
    # the numbers the tables print are the ones in stats.json
    md = (run / "report" / "table_paired_fewshot.md").read_text()
    for row in st["within_dataset"]["fewshot"]["d1"]["comparison"]["rows"]:
        if row["verdict"] != "best":
            assert f"{row['difference']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]" in md
    # with three datasets and four models no pair can reach significance after Holm: said plainly
    assert st["across_datasets"]["fewshot"]["any_pair_can_be_significant"] is False
    assert "no pair can be significantly different" in (run / "report" / "summary.md").read_text()


def test_summary_and_every_table_state_settings_pool_weights_and_data(tmp_path):
    rng = np.random.default_rng(0)
    base = np.clip(rng.normal(0.9, 0.05, 600), 0, 1)
    results = [
        _fewshot("supervised-r18", "shenzhen", np.ones(600), per_class=36, synthetic=True,
                 display_name="Supervised (R18)", dataset_display_name="Shenzhen-CXR"),
        _fewshot("supervised-r50", "shenzhen", _episodes(rng, base, 0.0), per_class=36, synthetic=True,
                 display_name="Supervised (R50)", dataset_display_name="Shenzhen-CXR"),
        _fewshot("supervised-r18", "bach", _episodes(rng, base, -0.1), per_class=300,
                 display_name="Supervised (R18)", dataset_display_name="BACH"),
        _fewshot("supervised-r50", "bach", _episodes(rng, base, 0.0), per_class=300, random_weights=False,
                 display_name="Supervised (R50)", dataset_display_name="BACH"),
    ]
    run = _write(tmp_path / "run", results)
    out = build_report(run)
    summary = out.summary
    assert summary == (run / "report" / "summary.md").read_text()
    table = (run / "report" / "table_fewshot.md").read_text()
    for text in (summary, table):
        section = text.split("Few-shot accuracy (%)")[1].split("\n## ")[0]
        rows = {line.split(" | ")[0].strip("| *"): line for line in section.splitlines() if line.startswith("| ")}
        assert "2-way 20-shot, 15 queries, 600 episodes" in rows["episodes"]
        assert "72 images; smallest class 36 ⚠ barely larger than shots + queries" in rows["pool"]
        assert "600 images; smallest class 300 |" in rows["pool"]
        assert rows["data"].split(" | ")[1:] == ["SYNTHETIC", "real |"]
        assert "Supervised (R18) [random weights]" in text  # random weights in the table itself
        assert "every episode draws 35 of them (97%)" in text
    assert "**100.00 ± 0.00**" in summary
    assert "the ± 0.00 is a ceiling" in summary
    assert "CONDITIONAL ON THE TEST POOL" in summary and "p paired t (Holm)" in summary
    assert "< 0.0001" in summary and not re.search(r"\de-\d", summary)  # no 1e-100 p values shown
    assert "--bootstrap" in summary  # how to get the generalisation interval
    for name in ("table_fewshot.tex", "table_fewshot.csv"):
        text = (run / "report" / name).read_text()
        assert "SYNTHETIC" in text and "barely larger" in text and "20-shot" in text
    tex = (run / "report" / "table_fewshot.tex").read_text()
    assert r"\textbf{100.00 $\pm$ 0.00}" in tex and r"[\textit{random weights}]" in tex


def test_partial_results_one_model_one_dataset(tmp_path):
    one = _write(tmp_path / "one", [_fewshot("m1", "d1", np.full(50, 0.8))])
    out = build_report(one)
    st = json.loads((out.folder / "stats.json").read_text())
    assert st["within_dataset"]["fewshot"]["d1"]["reason"].startswith("only one model")
    assert st["across_datasets"]["fewshot"]["reason"].startswith("one dataset only")
    html = out.html.read_text()
    assert "Not drawn" in html and "fewer than two models" in html
    assert "One model only on d1" in out.summary

    rng = np.random.default_rng(1)
    results, _ = _grid(rng, ["m1"], ["d1", "d2", "d3"])  # one model, three datasets
    out = build_report(_write(tmp_path / "one-model", results))
    assert "fewer than two models have results on every dataset" in out.html.read_text()
    results, _ = _grid(rng, ["m1", "m2", "m3"], ["d1"])  # one dataset, three models
    out = build_report(_write(tmp_path / "one-dataset", results))
    st = json.loads((out.folder / "stats.json").read_text())
    assert st["within_dataset"]["fewshot"]["d1"]["comparison"]["best"] in ("m1", "m2", "m3")
    assert (out.folder / "figures" / "figforest_fewshot_d1.png").is_file()
    assert not (out.folder / "figures" / "figcd_fewshot.png").exists()


def test_regenerating_is_byte_identical_and_drops_what_is_gone(tmp_path):
    rng = np.random.default_rng(2)
    results, _ = _grid(rng, ["m1", "m2", "m3"], ["d1", "d2"], n_eps=60)
    run = _write(tmp_path / "run", results)
    first = build_report(run)
    before = {p: p.read_bytes() for p in first.paths()}
    assert len(before) == len(first.files) and all(before.values())
    second = build_report(run)
    assert second.files == first.files
    assert {p: p.read_bytes() for p in second.paths()} == before
    for r in results:
        if r.dataset == "d2":
            (run / "results" / f"{r.cell_id}.json").unlink()
    third = build_report(run)
    assert "figures/figforest_fewshot_d2.png" in first.files and "figures/figforest_fewshot_d2.png" not in third.files
    assert not (run / "report" / "figures" / "figforest_fewshot_d2.png").exists()
    assert sorted(p.relative_to(run / "report").as_posix() for p in (run / "report").rglob("*") if p.is_file()) \
        == sorted(third.files)


def test_html_autoescapes_names(tmp_path):
    rng = np.random.default_rng(4)
    evil = "<script>alert('x')</script>"
    results = [_fewshot("evil", "d1", _episodes(rng, np.full(60, 0.7), 0.0), display_name=evil,
                        dataset_display_name="<b>bold</b>", dataset_name="mine"),
               _fewshot("good", "d1", _episodes(rng, np.full(60, 0.7), 0.05), dataset_name="mine")]
    out = build_report(_write(tmp_path / "run", results))
    html = out.html.read_text()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert evil not in html and "<b>bold</b>" not in html
    assert html.count("<script>") == 1  # the page's own sorting script only
    assert 'http-equiv="Content-Security-Policy"' in html and "default-src 'none'" in html
    assert 'src="http' not in html and 'href="http' not in html


def test_analyses_render_what_exists_and_note_what_is_missing(tmp_path):
    run = tmp_path / "run"
    art = run / "artifacts" / "m1" / "overlay_0.png"
    art.parent.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(art)
    results = []
    for j, m in enumerate(["m1", "m2", "m3"]):
        results.append(fake_result(m, "d1", 70.0 + j, 1.0, random_weights=False, imagenet_top1=70.0 + j))
        results.append(fake_result(m, "d1", 45.0 + 2 * j, 1.5, protocol="saliency", metric="attentive_diffusion",
                                   artifacts=["artifacts/m1/overlay_0.png"] if m == "m1" else []))
        # invariance without "hue", with an extra family the report does not know
        results.append(fake_result(m, "d1", 0.5, protocol="invariance", metric="mean_invariance",
                                   metrics={"rotation": 0.4 + 0.1 * j, "scale": 0.9 - 0.1 * j}))
        results.append(fake_result(m, "d1", 0.3 + 0.05 * j, protocol="reconstruction", metric="lpips_alex",
                                   higher_is_better=False))
    out = build_report(_write(run, results))
    files = set(out.files)
    assert {"table_invariance_rotation.md", "table_invariance_scale.md", "table_perceptual_alex.md",
            "table_attentive_diffusion.md"} <= files
    assert "table_invariance_hue.md" not in files and "table_invariance_mean_invariance.md" not in files
    assert "table_perceptual_vgg.md" not in files
    lp = (out.folder / "table_perceptual_alex.md").read_text()
    assert "**0.300**" in lp and "(lower is better)" in lp  # lower is better: m1 is best
    assert "figures/fig6_saliency_grid.png" in files  # partial: one overlay of three
    html = out.html.read_text()
    assert "Partial:" in html and "no PNG artifact" in html
    not_drawn = html.split("<h3>Not drawn</h3>")[1].split("</ul>")[0]
    assert "figures/figA5_reconstruction_grid.png" not in files and "Deep-image-prior reconstructions" in not_drawn
    assert "transferability" not in " ".join(files)


def test_cli_report_prints_the_files_it_wrote(tmp_path, capsys):
    rng = np.random.default_rng(5)
    results, _ = _grid(rng, ["m1", "m2"], ["d1"], n_eps=40)
    run = _write(tmp_path / "run", results)
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    for name in ("report.html", "stats.json", "summary.md", "table_fewshot.tex", "results.csv"):
        assert str(run / "report" / name) in printed
    assert (run / "summary.md").read_text() == (run / "report" / "summary.md").read_text()
    st = json.loads((run / "report" / "stats.json").read_text())
    assert st["within_dataset"]["fewshot"]["d1"]["bootstrap"] is None
    assert main(["report", str(run), "--bootstrap", "5"]) == 0  # fabricated results have no feature cache
    st = json.loads((run / "report" / "stats.json").read_text())
    assert "records no cached features" in st["within_dataset"]["fewshot"]["d1"]["bootstrap"]["unavailable"]
    assert "bootstrap not computed" in (run / "report" / "table_paired_fewshot.md").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["report", str(run), "--bootstrap", "1"]) == 2


def test_gram_scoring_gives_the_protocols_episode_accuracies():
    from medxfer.protocols.fewshot import episode_accuracies, sample_episodes
    from medxfer.report.bootstrap import gram_accuracies
    from medxfer.report.stats import PoolResampler

    rng = np.random.default_rng(7)
    for k, per_class, dim in ((2, 36, 256), (5, 60, 64)):
        labels = np.repeat(np.arange(k), per_class)
        x = (rng.normal(size=(len(labels), dim)) + 0.3 * labels[:, None]).astype(np.float32)
        pool = np.arange(len(labels))
        gram = x.astype(np.float64) @ x.astype(np.float64).T
        for ix in (pool, PoolResampler(pool, strata=labels).draw(rng)):  # the pool, and a resampled one
            eps, _ = sample_episodes(labels, k, 20, 15, 200, seed=3, pool=ix)
            want = episode_accuracies(x, eps)
            assert np.array_equal(gram_accuracies(gram, pool, eps), want) and 0.2 < want.mean() < 1.0


def test_answer_names_models_whose_generalisation_interval_includes_zero():
    from medxfer.report.findings import compute
    from medxfer.report.tables import answer_table, to_markdown

    rng = np.random.default_rng(8)
    base = np.clip(rng.normal(0.8, 0.05, 300), 0, 1)
    results = [_fewshot(m, "d1", _episodes(rng, base, shift)) for m, shift in (("a", 0.0), ("b", -0.05), ("c", -0.1))]
    f = compute(Collection.of(results))
    (pairs,) = f.pairs["fewshot"]
    assert [r.verdict for r in pairs.comparison.rows] == ["best", "worse", "worse"]
    pairs.bootstrap = {"models": {"b": {"difference": {"low": -9.0, "high": 0.4}},
                                  "c": {"difference": {"low": -15.0, "high": -4.0}}}}
    md = to_markdown(answer_table(f.coll, f))
    assert "none (2 worse); the generalisation interval of the difference includes 0 for b |" in md
