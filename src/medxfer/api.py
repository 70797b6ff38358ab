"""The Python API, mirroring the CLI, so notebooks need no subprocess."""
from __future__ import annotations

import os
from typing import Any

from medxfer.config import RunSpec
from medxfer.data import Dataset, load_dataset
from medxfer.features import FeatureSet
from medxfer.models import Backbone, load_model
from medxfer.pipeline import RunOutcome
from medxfer.prepare import PreparedImages
from medxfer.protocols import PROTOCOLS, EvalResult


def extract_features(model: Backbone, dataset: Dataset | PreparedImages,
                     cache_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> FeatureSet:
    """Features of every record of ``dataset`` (prepared on the fly, both stages cached).

    ``cache_dir=None`` uses ``$MEDXFER_CACHE`` or ``~/.cache/medxfer``.
    """
    from medxfer.extract import extract_features as _extract

    return _extract(model, dataset, cache_dir=cache_dir, **kwargs)


def evaluate(protocol: str, features: FeatureSet, *, seed: int = 0, compat: str | None = None,
             **params: Any) -> EvalResult:
    """Run a feature protocol (``"fewshot"``, ``"linear"``) on a feature set."""
    proto = PROTOCOLS.get(protocol)
    if proto.needs != "features":
        raise TypeError(f"protocol {proto.name!r} trains on images: call medxfer.finetune(model, prepared, ...)"
                        " or use medxfer.run")
    return proto.run(features, seed=seed, **proto.resolve_params(params, compat))


def finetune(model: Backbone, prepared: PreparedImages, *, seed: int = 0, device: str | None = None,
             workdir: str | os.PathLike[str] | None = None, compat: str | None = None, **params: Any) -> EvalResult:
    """Finetune a copy of ``model`` on prepared images (train/val/test splits of its records)."""
    proto = PROTOCOLS.get("finetune")
    return proto.run(model, prepared, seed=seed, device=device, workdir=workdir,
                     **proto.resolve_params(params, compat))


def run(spec: RunSpec | dict[str, Any], progress: bool = True) -> RunOutcome:
    """Run a whole grid (a RunSpec or its dict form); see ``medxfer run``."""
    from medxfer.pipeline import run as _run

    if isinstance(spec, dict):
        spec = RunSpec.from_dict(spec)
    return _run(spec, progress=progress)


__all__ = ["evaluate", "extract_features", "finetune", "load_dataset", "load_model", "run"]
