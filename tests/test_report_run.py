"""The report of a real tiny run: written by every run, the generalisation bootstrap from the
feature cache (same episodes re-run on resampled pools), and the demo's last line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medxfer.cli import main
from medxfer.report.build import build_report
from medxfer.report.tables import slugify
from medxfer.results import Result, load_results, write_result


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "results", dst / "results")
    shutil.copy(src / "run.json", dst / "run.json")
    return dst


def test_every_run_ends_with_the_report(tiny_run):
    out, outcome = tiny_run.out, tiny_run.outcome
    assert outcome.report_path == out / "report" / "report.html" and outcome.report_path.is_file()
    assert (out / "summary.md").read_text() == (out / "report" / "summary.md").read_text() == outcome.summary
    st = json.loads((out / "report" / "stats.json").read_text())
    comp = st["within_dataset"]["fewshot (episodes=60, n_query=5, n_shot=5, image_size=32)"]["toy"]["comparison"]
    assert {r["model"] for r in comp["rows"]} == {"test-tiny", "supervised-r18"}
    assert "test-tiny [random weights]" in outcome.summary and "Supervised (R18) [random weights]" in outcome.summary
    assert "2-way 5-shot, 5 queries, 60 episodes" in outcome.summary and "80 images; smallest class 40" in outcome.summary


def test_bootstrap_reruns_the_episodes_on_resampled_pools(tiny_run, tmp_path):
    run = _copy_run(tiny_run.out, tmp_path / "run")
    report = build_report(run, bootstrap=25, bootstrap_seed=3)
    st = json.loads((report.folder / "stats.json").read_text())
    (table, per_ds), = st["within_dataset"].items()
    boot = per_ds["toy"]["bootstrap"]
    assert boot["n_boot"] == 25 and boot["seed"] == 3 and boot["unit"] == "image" and boot["n_units"] == 80
    assert "new test pool" in boot["interval_covers"] and "support and query" in boot["note"]
    results = {r.model: r for r in load_results(run / "results") if r.protocol == "fewshot"}
    best = per_ds["toy"]["comparison"]["best"]
    for m, r in results.items():
        acc = boot["models"][m]["accuracy"]
        assert acc["estimate"] == pytest.approx(r.headline.value, abs=1e-9)  # the original pool reproduces it
        assert 0.0 <= acc["low"] <= acc["high"] <= 100.0 and acc["std_error"] >= 0.0
        if m != best:
            diff = boot["models"][m]["difference"]
            assert diff["estimate"] == pytest.approx(r.headline.value - results[best].headline.value, abs=1e-9)
            assert diff["low"] <= diff["high"]
            md = (report.folder / f"table_paired_{slugify(table)}.md").read_text()
            assert f"[{diff['low']:+.2f}, {diff['high']:+.2f}]" in md
    # the same bootstrap again gives the same numbers (its own seeded generator only)
    again = json.loads((build_report(run, bootstrap=25, bootstrap_seed=3).folder / "stats.json").read_text())
    assert again == st


def test_bootstrap_says_why_when_the_cache_is_gone(tiny_run, tmp_path):
    run = _copy_run(tiny_run.out, tmp_path / "run")
    for path in (run / "results").glob("*fewshot*.json"):
        r = Result.from_dict(json.loads(path.read_text()))
        r.inputs["features:pooled"]["key"] = "gone-" + r.inputs["features:pooled"]["key"]
        write_result(path, r)
    report = build_report(run, bootstrap=5)
    st = json.loads((report.folder / "stats.json").read_text())
    (per_ds,) = st["within_dataset"].values()
    assert "is not there any more" in per_ds["toy"]["bootstrap"]["unavailable"]
    assert "re-run `medxfer run`" in report.summary


def test_demo_ends_by_printing_where_report_html_is(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--models", "test-tiny", "--weights", "random",
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    html = tmp_path / "demo" / "report" / "report.html"
    assert last.startswith(f"Report: {html}") and html.is_file()
    assert "test-tiny [random weights]" in (tmp_path / "demo" / "summary.md").read_text()


def test_a_report_that_cannot_be_written_leaves_the_previous_one(tiny_run, tmp_path, monkeypatch):
    import errno
    import hashlib

    import medxfer.cache
    from medxfer.errors import DiskFullError

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.out, run_dir)
    build_report(run_dir)
    before = {p.relative_to(run_dir): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (run_dir / "report").rglob("*") if p.is_file()}
    real = medxfer.cache.os.fsync
    calls = {"n": 0}

    def fsync_fails_late(fd: int) -> None:  # the disk fills part-way through the second build
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    sorted((run_dir / "results").glob("*linear*.json"))[0].unlink()  # the new report would differ
    monkeypatch.setattr(medxfer.cache.os, "fsync", fsync_fails_late)
    with pytest.raises(DiskFullError, match=r"report .*/report/ not updated"):
        build_report(run_dir)
    monkeypatch.setattr(medxfer.cache.os, "fsync", real)
    after = {p.relative_to(run_dir): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in (run_dir / "report").rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".report-")]  # no staging folder left
