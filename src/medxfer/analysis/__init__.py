"""Analyses beyond transfer accuracy: occlusion saliency (with attentive diffusion) and
feature invariance (PROTOCOL.md, "Occlusion saliency and attentive diffusion" and
"Invariance"). Standalone functions on callables and arrays; protocols wrap them."""
from __future__ import annotations

from medxfer.analysis.saliency import (
    IMAGENET_MEAN_PIXEL,
    POINTWISE_NORMALIZATIONS,
    Locality,
    NotLocalError,
    SaliencyError,
    StagedTrunk,
    accumulate_scores,
    attentive_diffusion,
    is_exact,
    locality,
    occlusion_map,
    occlusion_scores,
    prepare_trunk,
    window_starts,
)

__all__ = [
    "IMAGENET_MEAN_PIXEL", "POINTWISE_NORMALIZATIONS", "Locality", "NotLocalError", "SaliencyError", "StagedTrunk",
    "accumulate_scores", "attentive_diffusion", "is_exact", "locality", "occlusion_map", "occlusion_scores",
    "prepare_trunk", "window_starts",
]
