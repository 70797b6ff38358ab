"""Golden regression tests: numbers that are right must not move.

The pinned values in ``tests/golden/*.json`` were computed with ``tests/golden/regenerate.py``;
regenerate them only in a commit that means to change the numbers and says why.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from golden.compute import compute_pm, compute_toy

GOLDEN = Path(__file__).resolve().parent / "golden"


def _load(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def _same_fewshot(got: dict, want: dict) -> None:
    assert got["episodes_sha256"] == want["episodes_sha256"]
    assert got["episode_accuracies"] == want["episode_accuracies"]
    assert got["accuracy"] == pytest.approx(want["accuracy"], rel=1e-12)
    assert got["ci95"] == pytest.approx(want["ci95"], rel=1e-9)


def test_tiny_model_features_and_protocols_on_the_toy_set(tmp_path: Path) -> None:
    want = _load("toy.json")
    got = compute_toy(tmp_path)
    np.testing.assert_allclose(got["features"], want["features"], rtol=1e-5, atol=1e-6)
    assert got["labels"] == want["labels"]
    _same_fewshot(got["fewshot"], want["fewshot"])
    assert got["linear"]["chosen_index"] == want["linear"]["chosen_index"]
    np.testing.assert_allclose(got["linear"]["val_curve"], want["linear"]["val_curve"], atol=1e-9)
    for k, v in want["linear"]["metrics"].items():
        assert got["linear"]["metrics"][k] == pytest.approx(v, rel=1e-9), k
    for k, v in want["finetune"]["metrics"].items():
        assert got["finetune"]["metrics"][k] == pytest.approx(v, rel=1e-6), k
    for g, w in zip(got["finetune"]["val_curve"], want["finetune"]["val_curve"], strict=True):
        assert g["step"] == w["step"] and g["score"] == pytest.approx(w["score"], rel=1e-6)
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)


def test_resnet18_fewshot_on_the_real_ichallenge_pm_sample_via_csv(shared_data: Path, tmp_path: Path) -> None:
    want = _load("pm_r18.json")
    got = compute_pm(shared_data / "ichallenge-pm", tmp_path)
    assert got["images"] == want["images"]
    assert got["feature_sum"] == pytest.approx(want["feature_sum"], rel=1e-5)
    np.testing.assert_allclose(got["feature_rows"], want["feature_rows"], rtol=1e-4, atol=1e-5)
    _same_fewshot(got["fewshot"], want["fewshot"])
