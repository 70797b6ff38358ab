"""Helpers for tests that run `medxfer run` in subprocesses and compare run folders."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# facts of one execution, not of the numbers: durations, and the step a killed finetune resumed from
EXECUTION_KEYS = ("seconds", "timing_s", "resumed_from")


def env(**extra: str) -> dict[str, str]:
    """This process's environment with medxfer's sources first on the path."""
    base = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
                RAY_USAGE_STATS_ENABLED="0")
    base.update(extra)
    return base


def medxfer(*args: str, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``python -m medxfer ARGS`` in a subprocess (output captured)."""
    return subprocess.run([sys.executable, "-m", "medxfer", *args], env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)


def tiny_checkpoint(path: Path, seed: int = 3) -> Path:
    """A state dict of the test-tiny architecture with other random weights (a custom model)."""
    import torch

    from medxfer.models.backbone import build_trunk

    torch.save(build_trunk("tinycnn", seed=seed).state_dict(), path)
    return path


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in EXECUTION_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _artifact_digest(path: Path) -> str:
    """A digest of what an artifact holds: a torch file's tensors and values (its
    execution facts left out), any other file's bytes."""
    if path.suffix != ".pt":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    import torch

    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            h.update(str((obj.dtype, tuple(obj.shape))).encode())
            h.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                if k not in EXECUTION_KEYS:
                    h.update(str(k).encode())
                    feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                feed(v)
        else:
            h.update(repr(obj).encode())

    feed(torch.load(path, map_location="cpu", weights_only=True))
    return h.hexdigest()


def comparable(run_dir: Path) -> dict[str, Any]:
    """Every result of a run folder, by file name, without what legitimately differs between
    two runs of the same cells: durations, resume points, creation times, the spec (paths, executor), the
    device string and which run built a shared artifact; artifacts by content."""
    out = {}
    for f in sorted((run_dir / "results").glob("*.json")):
        d = json.loads(f.read_text())
        for key in ("timings", "created", "spec", "device"):
            d.pop(key)
        d["inputs"] = {k: {kk: vv for kk, vv in v.items() if kk != "built"} for k, v in d["inputs"].items()}
        # by content; a torch file's size also counts its execution facts (resumed_from, seconds)
        d["artifacts"] = [{k: v for k, v in dict(a, sha256=_artifact_digest(run_dir / a["path"])).items()
                           if not (k == "size" and a["path"].endswith(".pt"))} for a in d["artifacts"]]
        out[f.name] = _strip(d)
    return out


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two JSON-like values first differ (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'second' if k not in a else 'first'}"
            found = first_difference(a[k], b[k], f"{path}.{k}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b and type(a) is type(b) else f"{path}: {a!r} != {b!r}"


def built_counts(run_dirs: list[Path]) -> dict[str, int]:
    """How many times each cache artifact was built, over the results of ``run_dirs``."""
    counts: dict[str, int] = {}
    for run_dir in run_dirs:
        for f in (run_dir / "results").glob("*.json"):
            for entry in json.loads(f.read_text())["inputs"].values():
                counts[entry["key"]] = counts.get(entry["key"], 0) + int(entry["built"])
    return counts
