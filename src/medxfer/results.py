"""Typed result JSONs: one file per (model, dataset, protocol, seed) cell."""
from __future__ import annotations

import json
import logging
import platform
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from medxfer.cache import write_json_atomic
from medxfer.protocols.base import EvalResult

log = logging.getLogger(__name__)

SCHEMA = "medxfer.result/1"
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class Cell:
    """One cell of the grid."""

    model: str
    dataset: str
    protocol: str
    seed: int

    @property
    def filename(self) -> str:
        parts = [_SAFE.sub("_", p) for p in (self.model, self.dataset, self.protocol)]
        return f"{'__'.join(parts)}__seed{self.seed}.json"


def result_path(results_dir: Path, cell: Cell) -> Path:
    return results_dir / cell.filename


def read_result(path: Path) -> dict[str, Any] | None:
    """A result JSON, or None when it is missing or unreadable (then the cell is recomputed)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable result %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        log.warning("ignoring %s: not a %s file", path, SCHEMA)
        return None
    return data


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every valid result JSON under ``results_dir``, sorted by file name."""
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        data = read_result(path)
        if data is not None:
            out.append(data)
    return out


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("medxfer", "torch", "torchvision", "numpy", "pillow", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The medxfer source checkout's commit (with ``-dirty``), or None outside a checkout."""
    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def build_result(
    cell: Cell,
    run_key: str,
    evaluation: EvalResult,
    *,
    spec: dict[str, Any],
    model_info: dict[str, Any],
    dataset_info: dict[str, Any],
    timings: dict[str, float],
    device: str,
    artifacts: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Assemble the result JSON object of one cell."""
    details = dict(evaluation.details)
    episode_acc = details.pop("episode_accuracies", None)
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "model": cell.model,
        "dataset": cell.dataset,
        "protocol": cell.protocol,
        "seed": cell.seed,
        "run_key": run_key,
        "metrics": dict(evaluation.metrics),
        "params": dict(evaluation.params),
        "warnings": list(evaluation.warnings),
    }
    if episode_acc is not None:
        out["episode_accuracies"] = episode_acc
    out.update({
        "details": details,
        "model_info": model_info,
        "dataset_info": dataset_info,
        "artifacts": artifacts or {},
        "timings": {k: round(float(v), 4) for k, v in timings.items()},
        "device": device,
        "versions": library_versions(),
        "git_revision": git_revision(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec,
    })
    return out


def write_result(results_dir: Path, cell: Cell, result: dict[str, Any]) -> Path:
    path = result_path(results_dir, cell)
    write_json_atomic(path, result)
    return path
