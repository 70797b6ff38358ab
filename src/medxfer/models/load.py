"""``load_model``: a registered spec + weights choice -> a frozen Backbone in eval mode."""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from medxfer.cache import stamp_last_used
from medxfer.models.backbone import Backbone, build_trunk
from medxfer.models.checkpoint import read_converted, trunk_from_state
from medxfer.models.errors import WeightsUnavailableError
from medxfer.models.fetch import fetch, is_cached, weights_path
from medxfer.models.normalize import NORMALIZATIONS
from medxfer.models.spec import MODELS, ModelSpec

log = logging.getLogger(__name__)

RANDOM_SEED = 0

__all__ = ["RANDOM_SEED", "WeightsUnavailableError", "is_cached", "load_model", "pretrained_state_dict",
           "weights_path"]


def pretrained_state_dict(spec: ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The converted trunk weights of ``spec`` from the cache, fetching them if needed."""
    path = fetch(spec.base or spec.name, cache_dir=cache_dir)
    stamp_last_used(path)
    return read_converted(path)


def _with_normalization(spec: ModelSpec, normalization: str | None) -> ModelSpec:
    if normalization is None:
        return spec
    norm = NORMALIZATIONS.canonical(normalization)
    if norm == NORMALIZATIONS.canonical(spec.normalization):
        return spec
    return dataclasses.replace(spec, name=f"{spec.name}@{norm}", normalization=norm, aliases=(),
                               base=spec.base or spec.name)


def load_model(
    name: str,
    weights: str | os.PathLike[str] = "pretrained",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = RANDOM_SEED,
    normalization: str | None = None,
) -> Backbone:
    """Load a registered backbone, frozen and in eval mode.

    ``weights``: ``"pretrained"`` (the spec's converted weights from the cache; fetched,
    i.e. downloaded and converted, on first use; :class:`WeightsUnavailableError` offline),
    ``"random"`` (deterministic initialisation from ``seed``, labelled as such in every
    result), or a path to a converted ``.safetensors``/``.pth`` trunk state dict.
    ``normalization`` overrides the spec's input normalisation (e.g. ``"chexpert"``); the
    model is then a variant whose ``weights_hash`` differs from the base's.
    """
    spec = _with_normalization(MODELS.get(name), normalization)
    if weights == "random":
        trunk = build_trunk(spec.arch, seed=seed)
        label = f"random init (seed {seed})"
    elif weights == "pretrained":
        trunk = trunk_from_state(spec.arch, pretrained_state_dict(spec, cache_dir),
                                 source=f"cached weights of {spec.name}", check_finite=False)  # checked when converted
        label = f"pretrained ({spec.base or spec.name})"
    else:
        trunk = trunk_from_state(spec.arch, read_converted(weights), source=str(weights))
        label = f"file {weights}"
    model = Backbone(spec, trunk, label)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
