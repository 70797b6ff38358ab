"""Backbones: specs (the zoo), checkpoint conversion, normalisation, loading."""
from medxfer.models import zoo as _zoo  # noqa: F401  (registers the built-in specs)
from medxfer.models.backbone import ARCHS, Backbone, assert_eval, build_trunk
from medxfer.models.load import WeightsUnavailableError, is_cached, load_model, weights_path
from medxfer.models.spec import MODELS, ModelSpec, register_model

__all__ = [
    "ARCHS", "Backbone", "MODELS", "ModelSpec", "WeightsUnavailableError", "assert_eval",
    "build_trunk", "is_cached", "load_model", "register_model", "weights_path",
]
