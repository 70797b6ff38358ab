"""report.html in a real headless Chromium (tests/browser.py): from a fabricated grid with
every protocol and analysis and from a real tiny run. The page must load without a console
error, an uncaught exception or a blocked request; every table and figure must be there and
visible; a click on a column header must reorder the rows; a name with markup shows as text.
A full-page screenshot of each is kept in ``test-artifacts/`` (or ``$MEDXFER_TEST_ARTIFACTS``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from medxfer.report.build import build_report
from medxfer.results import write_result
from medxfer.testing import fake_result, write_fake_paper_run

REPO = Path(__file__).resolve().parents[1]
FIRST_COLUMN = "[...document.querySelector({sel}).tBodies[0].rows].map(r => r.cells[0].textContent.trim())"


def artifacts_dir() -> Path:
    path = Path(os.environ.get("MEDXFER_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _visible(page, selector: str) -> bool:
    return bool(page.eval(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false;"
        " const r = e.getBoundingClientRect(), s = getComputedStyle(e);"
        " return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none'; })()"))


def check_report_page(browser, report_dir: Path, screenshot: Path) -> dict:
    """Load report.html and check it (see the module docstring); returns facts for more checks."""
    manifest = json.loads((report_dir / "manifest.json").read_text())["files"]
    tables = sorted(n.removesuffix(".md") for n in manifest if n.startswith("table_") and n.endswith(".md"))
    figures = sorted(Path(n).stem for n in manifest if n.startswith("figures/") and n.endswith(".png"))
    assert tables, "no table in the report"
    with browser.open((report_dir / "report.html").as_uri(), width=1280, height=900) as page:
        assert page.errors == [], [str(e) for e in page.errors]
        csp = page.eval("document.querySelector('meta[http-equiv=\"Content-Security-Policy\"]').content")
        assert "default-src 'none'" in csp and "img-src data:" in csp
        assert page.eval("document.querySelector('#answer h2').textContent") == "The answer"
        for slug in tables:
            assert _visible(page, f"[id='{slug}'] table"), f"table {slug} missing or hidden"
        for slug in figures:
            sel = f"[id='{slug}'] img"
            assert _visible(page, sel), f"figure {slug} missing or hidden"
            assert page.eval(f"document.querySelector({json.dumps(sel)}).naturalWidth") > 100, slug
        assert page.eval("document.querySelectorAll('figure.fig img').length") == len(figures)
        # every image is embedded: nothing on the page points elsewhere
        external = page.eval("[...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || "
                             "e.getAttribute('href')).filter(u => !u.startsWith('data:') && !u.startsWith('#'))")
        assert external == []
        # sorting: a click on a score column orders the rows by it, a second click reverses them
        main = next(t for t in tables if t.startswith("table_fewshot"))
        sel = json.dumps(f"[id='{main}'] table")
        column = f"[...document.querySelector({sel}).tBodies[0].rows].map(r => parseFloat(r.cells[1].dataset.value))"
        before = page.eval(FIRST_COLUMN.format(sel=sel))
        page.click(f"[id='{main}'] thead th:nth-child(2)")  # a score column: best first
        first = page.eval(FIRST_COLUMN.format(sel=sel))
        values = page.eval(column)
        assert sorted(first) == sorted(before) and values == sorted(values, reverse=True)
        page.click(f"[id='{main}'] thead th:nth-child(2)")  # again: the other way round
        second = page.eval(FIRST_COLUMN.format(sel=sel))
        assert page.eval(column) == sorted(values)
        assert len(set(values)) < 2 or second != first  # the order changed
        assert page.eval(f"document.querySelector({sel}).tHead.rows[0].cells[1].getAttribute('aria-sort')") \
            == "ascending"
        page.click(f"[id='{main}'] thead th:nth-child(1)")  # model names: alphabetical
        names = page.eval(FIRST_COLUMN.format(sel=sel))
        assert names == sorted(names, key=str.lower)
        shot = page.screenshot(screenshot, full_page=True)
        assert shot.stat().st_size > 50_000
        assert page.errors == [], [str(e) for e in page.errors]
        return {"tables": tables, "figures": figures, "height": page.eval("document.documentElement.scrollHeight")}


def test_report_page_of_a_fabricated_grid(browser, tmp_path):
    models = ["supervised-r50", "supervised-d121", "simclr-v1", "moco-v2", "swav", "mimic-chexpert-lr0.01",
              "moco-cxr-r18"]
    run = write_fake_paper_run(tmp_path / "grid", models=models,
                               datasets=["chexpert", "shenzhen", "bach", "ichallenge-pm"], episodes=200)
    report = build_report(run)
    facts = check_report_page(browser, report.folder, artifacts_dir() / "report-fabricated-grid.png")
    expected = {"fig2_family_scaled", "fig3_selfsupervised_boxes", "fig4_domain_by_family", "fig5_domain_specific",
                "fig7_vs_attentive_diffusion", "figA_vs_invariance", "figA_vs_perceptual_distance",
                "figA_vs_imagenet_top1", "fig9_diffusion_by_family", "fig6_saliency_grid",
                "figA5_reconstruction_grid", "figcd_fewshot", "figforest_fewshot_bach"}
    assert expected <= set(facts["figures"])
    assert {"table_fewshot", "table_linear", "table_linear_auroc", "table_finetune", "table_attentive_diffusion",
            "table_invariance_rotation", "table_perceptual_vgg", "table_transferability_bach", "table_paired_fewshot",
            "table_ranks_fewshot", "table_answer"} <= set(facts["tables"])


def test_report_page_of_a_real_tiny_run(browser, tiny_run):
    facts = check_report_page(browser, tiny_run.out / "report", artifacts_dir() / "report-tiny-run.png")
    assert any(f.startswith("figforest_") for f in facts["figures"])


def test_a_name_with_markup_shows_as_text(browser, tmp_path):
    rng = np.random.default_rng(0)
    evil = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    for j, (m, name) in enumerate([("evil", evil), ("plain", "Plain model")]):
        eps = np.clip(np.round((0.7 + 0.05 * j + rng.normal(0, 0.05, 80)) * 30) / 30, 0, 1)
        r = fake_result(m, "d1", 100 * eps.mean(), 1.0, episode_accuracies=eps.tolist(), display_name=name)
        write_result(run / "results" / f"{r.cell_id}.json", r)
    report = build_report(run)
    with browser.open(report.html.as_uri()) as page:
        assert page.errors == [], [str(e) for e in page.errors]
        assert page.eval("window.__pwned === undefined")
        labels = page.eval("[...document.querySelectorAll('#table_fewshot tbody th')].map(t => t.textContent)")
        assert any(evil in label for label in labels)
