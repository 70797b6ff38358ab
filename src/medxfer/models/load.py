"""``load_model``: a registered spec + weights choice -> a frozen Backbone in eval mode."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from medxfer.cache import resolve_cache_dir
from medxfer.models.backbone import Backbone, build_trunk
from medxfer.models.spec import MODELS, ModelSpec

log = logging.getLogger(__name__)

RANDOM_SEED = 0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable (e.g. offline)."""


def weights_path(spec: ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted, headless state dict of ``spec`` lives in the cache."""
    return resolve_cache_dir(cache_dir) / "weights" / f"{spec.name}.safetensors"


def is_cached(spec: ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    return weights_path(spec, cache_dir).is_file()


def pretrained_state_dict(spec: ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The converted trunk weights of ``spec`` from the cache, fetching them if needed."""
    from medxfer.models.fetch import fetch  # the download/convert pipeline

    path = fetch(spec.name, cache_dir=cache_dir)
    from safetensors.torch import load_file

    return load_file(str(path))


def load_model(
    name: str,
    weights: str = "pretrained",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = RANDOM_SEED,
) -> Backbone:
    """Load a registered backbone, frozen and in eval mode.

    ``weights``: ``"pretrained"`` (the spec's weights from the cache, downloaded and converted
    on first use), ``"random"`` (deterministic initialisation from ``seed``, labelled as such
    in every result), or a path to a converted ``.safetensors``/``.pth`` trunk state dict.
    """
    spec = MODELS.get(name)
    if weights == "random":
        trunk = build_trunk(spec.arch, seed=seed)
        label = f"random init (seed {seed})"
    elif weights == "pretrained":
        trunk = build_trunk(spec.arch, seed=seed)
        sd = pretrained_state_dict(spec, cache_dir)
        from medxfer.models.checkpoint import load_trunk_state

        load_trunk_state(trunk, sd, source=f"cached weights of {spec.name}")
        label = f"pretrained ({spec.name})"
    else:
        from medxfer.models.checkpoint import read_converted, load_trunk_state

        trunk = build_trunk(spec.arch, seed=seed)
        load_trunk_state(trunk, read_converted(weights), source=str(weights))
        label = f"file {weights}"
    model = Backbone(spec, trunk, label)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
