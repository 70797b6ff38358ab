"""The Python API, mirroring the CLI, so notebooks need no subprocess.

``evaluate`` and ``finetune`` are thin wrappers over the same protocol path as ``medxfer run``:
the protocol's typed parameters (with the dataset's own paper settings whenever the feature
set or prepared images know their dataset) and a :class:`~medxfer.cell.DirectContext`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medxfer.config import RunSpec
from medxfer.data import Dataset, load_dataset
from medxfer.models import Backbone, load_model

if TYPE_CHECKING:
    from medxfer.features import FeatureSet
    from medxfer.pipeline import RunOutcome
    from medxfer.prepare import PreparedImages
    from medxfer.protocols import EvalResult


def extract_features(model: Backbone, dataset: Dataset | PreparedImages,
                     cache_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> FeatureSet:
    """Features of every record of ``dataset`` (prepared on the fly, both stages cached).

    ``cache_dir=None`` uses ``$MEDXFER_CACHE`` or ``~/.cache/medxfer``; other keywords go to
    :func:`medxfer.extract.extract_features` (``layer``, ``precision``, ``device``, ...).
    """
    from medxfer.extract import extract_features as _extract

    return _extract(model, dataset, cache_dir=cache_dir, **kwargs)


def evaluate(protocol: str, features: FeatureSet, *, seed: int = 0, compat: str | None = None,
             device: str | None = None, **params: Any) -> EvalResult:
    """Run a protocol (``"fewshot"``, ``"linear"``, ...) on a feature set.

    Parameters default to the protocol's, then the dataset's own paper settings when
    ``features.info`` is known (e.g. 5-way episodes from a 10,001-image pool for EyePACS),
    then ``params``.
    """
    from medxfer.cell import DirectContext
    from medxfer.devices import resolve_device
    from medxfer.protocols import PROTOCOLS

    proto = PROTOCOLS.get(protocol)
    p = proto.make_params(params, compat, features.info)
    return proto.run(DirectContext(given_features=features, device=resolve_device(device)), p, seed)


def finetune(model: Backbone, prepared: PreparedImages, *, seed: int = 0, device: str | None = None,
             workdir: str | os.PathLike[str] | None = None, compat: str | None = None,
             train_prepared: PreparedImages | None = None, **params: Any) -> EvalResult:
    """Finetune a copy of ``model`` on prepared images (train/val/test splits of its records);
    with ``workdir`` a killed finetune resumes from its last checkpoint. ``train_prepared``:
    the same dataset prepared whole for the training crops (``prepare(ds, size=320,
    resize="keep")``, what ``medxfer run`` uses); without it they come from ``prepared``."""
    from medxfer.cell import DirectContext
    from medxfer.devices import resolve_device
    from medxfer.protocols import PROTOCOLS

    proto = PROTOCOLS.get("finetune")
    p = proto.make_params(params, compat, prepared.info)
    ctx = DirectContext(given_model=model, given_prepared=prepared, device=resolve_device(device),
                        given_workdir=Path(workdir) if workdir is not None else None, given_train=train_prepared)
    return proto.run(ctx, p, seed)


def run(spec: RunSpec | dict[str, Any], progress: bool | None = None) -> RunOutcome:
    """Run a whole grid (a RunSpec or its dict form); see ``medxfer run``."""
    from medxfer.pipeline import run as _run

    if isinstance(spec, dict):
        spec = RunSpec.from_dict(spec)
    return _run(spec, progress=progress)


__all__ = ["evaluate", "extract_features", "finetune", "load_dataset", "load_model", "run"]
