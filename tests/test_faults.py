"""Fault injection (tests/faults.py): `medxfer run` SIGKILLed at seeded random points in every
stage (prepare, extract, the linear probe, finetuning, an analysis, few-shot, the report), then
resumed; every resumed run must equal an uninterrupted one and nothing half-written may be
visible after any kill. The default suite tries 24 kill points; ``make test-slow`` 72."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medxfer.testing import write_stripes_blobs
from runs import REPO, env

STAGES = ("prepare", "extract", "linear", "finetune", "analysis", "fewshot", "report", "other")


def _grid_args(data: Path) -> list[str]:
    return ["--models", "test-tiny", "--weights", "random", "--dataset", f"toy=folder:{data}", "--image-size", "32",
            "--protocols", "fewshot,linear,finetune,transferability", "--set", "fewshot.n_shot=4",
            "--set", "fewshot.n_query=4", "--set", "fewshot.episodes=30", "--set", "finetune.max_steps=12",
            "--set", "finetune.val_every=3", "--set", "finetune.batch_size=4", "--set", "finetune.train_size=40",
            "--set", "finetune.bootstrap=50", "--workers", "2"]


def run_fault_injection(tmp_path: Path, points: dict[str, int], budget_s: float, seed: int) -> dict:
    data = write_stripes_blobs(tmp_path / "data", n_per_class=16, size=32)
    plan = {"workdir": str(tmp_path), "args": _grid_args(data), "points": points, "seed": seed, "budget_s": budget_s}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "faults.py"), str(tmp_path / "plan.json"),
                           str(tmp_path / "report.json")], env=env(), capture_output=True, text=True,
                          timeout=budget_s + 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = [r for r in report["points"] if "skipped" not in r]
    print(f"\n{len(rows)} kill points in {report['seconds']:.0f}s (reference run {report['reference_seconds']}s, "
          f"{report['reference_calls']} medxfer calls: {report['calls_by_stage']})")
    for r in rows:
        print(f"  call {r['index']:>6} [{r.get('stage', '-'):>8}] {r.get('function', '-'):<40} killed={r['killed']} "
              f"resumed with {r['resumed_with']}: equal={r['equal']} ({r['seconds']}s)")
    return report


def _check(report: dict, at_least: int) -> None:
    rows = [r for r in report["points"] if "skipped" not in r]
    assert len(rows) >= at_least, f"only {len(rows)} kill points ran within the time budget"
    for r in rows:
        assert r["killed"], r  # every point was reached and the run died there
        assert not r["half_written"], r
        assert r["resume_rc"] == 0, r
        assert r["equal"], r
    died_in = {r["stage"] for r in rows}
    assert {"prepare", "extract", "linear", "finetune", "analysis"} <= died_in, died_in


def test_runs_killed_at_24_random_points_resume_to_identical_results(tmp_path):
    points = {"prepare": 4, "extract": 4, "linear": 4, "finetune": 4, "analysis": 3, "fewshot": 2, "report": 2,
              "other": 1}
    _check(run_fault_injection(tmp_path, points, budget_s=900, seed=14), at_least=20)


@pytest.mark.slow
def test_runs_killed_at_72_random_points_resume_to_identical_results(tmp_path):
    _check(run_fault_injection(tmp_path, dict.fromkeys(STAGES, 9), budget_s=2400, seed=2022), at_least=60)
