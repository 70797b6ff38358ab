"""Analyses beyond transfer accuracy: occlusion saliency (with attentive diffusion) and
feature invariance (PROTOCOL.md, "Occlusion saliency and attentive diffusion" and
"Invariance"). Standalone functions on callables and arrays; protocols wrap them."""
from __future__ import annotations

from medxfer.analysis.invariance import (
    AUTHORS_RIDGE,
    FeatureStats,
    InvarianceError,
    InvarianceResult,
    TransformFamily,
    choose_indices,
    choose_pair_indices,
    evaluation_view,
    feature_statistics,
    image_views,
    invariance_from_features,
    ledoit_wolf,
    match_pairs,
    pair_invariance,
    transform_family,
    transform_invariance,
    view_features,
    whiten,
    whitened_cosine,
)
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
    "AUTHORS_RIDGE", "IMAGENET_MEAN_PIXEL", "POINTWISE_NORMALIZATIONS", "FeatureStats", "InvarianceError",
    "InvarianceResult", "Locality", "NotLocalError", "SaliencyError", "StagedTrunk", "TransformFamily",
    "accumulate_scores", "attentive_diffusion", "choose_indices", "choose_pair_indices", "evaluation_view",
    "feature_statistics", "image_views", "invariance_from_features", "is_exact", "ledoit_wolf", "locality", "match_pairs",
    "occlusion_map", "occlusion_scores", "pair_invariance", "prepare_trunk", "transform_family",
    "transform_invariance", "view_features", "whiten", "whitened_cosine", "window_starts",
]
