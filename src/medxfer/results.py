"""The typed result schema ``medxfer.result/2``: one JSON per cell, read back as :class:`Result`.

Summary and report read :class:`Result` objects only. Files written by an older schema
(``medxfer.result/1``) are not reused: they are refused with a message saying to re-run.
"""
from __future__ import annotations

import json
import logging
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from medxfer.cache import write_json_atomic
from medxfer.errors import MedxferError
from medxfer.protocols.base import Headline

log = logging.getLogger(__name__)

SCHEMA = "medxfer.result/2"
OLD_SCHEMAS = ("medxfer.result/1",)
NUMERIC_PACKAGES = ("medxfer", "torch", "torchvision", "numpy", "pillow", "scipy", "scikit-learn", "safetensors")


class ResultError(MedxferError, ValueError):
    """A result file that is not a valid ``medxfer.result/2`` object."""


@dataclass(frozen=True)
class ModelFacts:
    """What the report needs to know about the model of a result."""

    name: str
    display_name: str
    arch: str
    family: str
    imagenet_top1: float | None
    normalization: str
    weights: str
    weights_hash: str
    fingerprint: str
    random_weights: bool
    feature_dim: int
    licence: str
    in_paper: bool = False
    parent: str | None = None  # in-domain pretrained models: the model they continued from
    pretraining: dict[str, Any] | None = None  # method, steps, data, loss curve (medxfer pretrain)


@dataclass(frozen=True)
class DatasetFacts:
    """What the report needs to know about the dataset of a result.

    ``in_domain``: the dataset is chest X-ray, the domain of the domain-specific (chest-X-ray
    pretrained) models. ``synthetic``: written by medxfer's synthetic generators.
    """

    label: str
    name: str
    display_name: str
    kind: str
    root: str
    modality: str
    in_domain: bool
    class_names: list[str]
    counts: dict[str, dict[str, int]]
    images: int
    headline_metric: str
    fingerprint: str
    options: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    synthetic: bool = False


@dataclass(frozen=True)
class ArtifactRecord:
    """A file a cell wrote (path relative to the run folder) or read (a cache artifact)."""

    path: str
    size: int
    sha256: str


@dataclass
class Result:
    """One cell's result (see the README's "Result schema")."""

    model: str
    dataset: str
    protocol: str
    protocol_version: str
    seed: int
    run_key: str
    cell_id: str
    variant: dict[str, Any]
    headline: Headline
    metrics: dict[str, float]
    params: dict[str, Any]
    details: dict[str, Any]
    warnings: list[str]
    artifacts: list[ArtifactRecord]
    inputs: dict[str, dict[str, Any]]
    model_info: ModelFacts
    dataset_info: DatasetFacts
    timings: dict[str, float]
    versions: dict[str, str]
    git_revision: str | None
    device: str
    created: str
    spec: dict[str, Any]
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["headline"] = self.headline.to_dict()
        return {"schema": d.pop("schema"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "result") -> Result:
        if not isinstance(d, dict):
            raise ResultError(f"{where}: not a JSON object")
        schema = d.get("schema")
        if schema in OLD_SCHEMAS:
            raise ResultError(f"{where}: written by an older medxfer ({schema}); re-run the cell "
                              f"(`medxfer run` with the same options) to rewrite it as {SCHEMA}")
        if schema != SCHEMA:
            raise ResultError(f"{where}: not a {SCHEMA} file (schema {schema!r})")
        try:
            data = dict(d)
            data.pop("schema")
            data["headline"] = Headline(**data["headline"])
            data["model_info"] = ModelFacts(**data["model_info"])
            data["dataset_info"] = DatasetFacts(**data["dataset_info"])
            data["artifacts"] = [ArtifactRecord(**a) for a in data["artifacts"]]
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ResultError(f"{where}: malformed {SCHEMA} object ({exc})") from None

    @property
    def episode_accuracies(self) -> list[float] | None:
        return self.details.get("episode_accuracies")


def read_result(path: Path) -> Result | None:
    """A result, or None when it is missing, unreadable or of an older schema (with a warning
    saying so: the cell is then recomputed)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable result %s: %s", path, exc)
        return None
    try:
        return Result.from_dict(data, where=str(path))
    except ResultError as exc:
        log.warning("ignoring %s", exc)
        return None


def load_results(results_dir: Path) -> list[Result]:
    """Every valid result under ``results_dir``, sorted by file name."""
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        r = read_result(path)
        if r is not None:
            out.append(r)
    return out


def write_result(path: Path, result: Result) -> Path:
    write_json_atomic(path, result.to_dict())
    return path


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Python and every installed package that can change a number."""
    versions = {"python": platform.python_version()}
    for pkg in NUMERIC_PACKAGES:
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
