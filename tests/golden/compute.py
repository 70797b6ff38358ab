"""What the golden tests compute, through the public API only (shared by the test and regenerate.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from golden.toy import write_pm_csv, write_stripes_blobs

FAST_FINETUNE = dict(image_size=32, batch_size=8, max_steps=8, val_every=4, patience=2, eval_batch_size=64,
                     crop_scale=[0.5, 1.0])


def _fewshot_summary(res: Any) -> dict[str, Any]:
    return {"accuracy": res.metrics["accuracy"], "ci95": res.metrics["ci95"],
            "episodes_sha256": res.details["episodes_sha256"],
            "episode_accuracies": res.details["episode_accuracies"]}


def compute_toy(work: Path) -> dict[str, Any]:
    import medxfer
    from medxfer.prepare import prepare

    os.environ["MEDXFER_CACHE"] = str(work / "cache")
    data = write_stripes_blobs(work / "data")
    ds = medxfer.load_dataset("folder", data)
    model = medxfer.load_model("test-tiny", weights="random")
    feats = medxfer.extract_features(model, ds, size=32, cache_dir=work / "cache", progress=False)
    fs = medxfer.evaluate("fewshot", feats, n_way=2, n_shot=5, n_query=5, episodes=100, seed=0)
    lin = medxfer.evaluate("linear", feats, seed=0)
    prepared = prepare(ds, size=32, cache_dir=work / "cache", progress=False)
    ft = medxfer.finetune(model, prepared, seed=0, device="cpu", **FAST_FINETUNE)
    return {
        "features": np.asarray(feats.features, dtype=np.float64).tolist(),
        "labels": np.asarray(feats.labels).tolist(),
        "fewshot": _fewshot_summary(fs),
        "linear": {"metrics": lin.metrics, "val_curve": lin.details["val_curve"],
                   "chosen_index": lin.details["chosen_index"]},
        "finetune": {"metrics": ft.metrics, "val_curve": ft.details["val_curve"]},
    }


def compute_pm(pm_root: Path, work: Path) -> dict[str, Any]:
    import medxfer

    csv = write_pm_csv(pm_root, work / "pm")
    ds = medxfer.load_dataset("csv", csv)
    model = medxfer.load_model("supervised-r18", weights="random")
    feats = medxfer.extract_features(model, ds, cache_dir=work / "cache", progress=False)
    fs = medxfer.evaluate("fewshot", feats, n_way=2, n_shot=20, n_query=15, episodes=600, seed=0)
    x = np.asarray(feats.features, dtype=np.float64)
    return {
        "images": len(feats),
        "feature_sum": float(x.sum()),
        "feature_rows": x[[0, 1, len(x) // 2, len(x) - 1]].tolist(),
        "fewshot": _fewshot_summary(fs),
    }
