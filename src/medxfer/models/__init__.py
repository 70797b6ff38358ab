"""Backbones: specs (the zoo), checkpoint conversion, normalisation, loading."""
from medxfer.models import formats as _formats  # noqa: F401  (registers the checkpoint formats)
from medxfer.models import foundation as _foundation  # noqa: F401  (the medical foundation models' formats)
from medxfer.models import zoo as _zoo  # noqa: F401  (registers the built-in specs)
from medxfer.models.backbone import (
    ARCHS,
    Arch,
    Backbone,
    assert_eval,
    build_trunk,
    register_arch,
)
from medxfer.models.custom import load_model_file, resolve_model_arg
from medxfer.models.errors import (
    CheckpointError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
)
from medxfer.models.fetch import (
    fetch as fetch_weights,  # also medxfer.models.fetch.fetch
)
from medxfer.models.fetch import is_cached, weights_path
from medxfer.models.load import load_model
from medxfer.models.pretrained import register_cached as register_pretrained
from medxfer.models.spec import MODELS, ModelSpec, register_model

register_pretrained()  # models made by `medxfer pretrain` in the default cache ($MEDXFER_CACHE)

__all__ = [
    "ARCHS", "Arch", "Backbone", "CheckpointError", "MODELS", "ModelSpec", "UnsafeCheckpointError",
    "WeightsUnavailableError", "assert_eval", "build_trunk", "fetch_weights", "is_cached", "load_model",
    "load_model_file", "register_arch", "register_model", "register_pretrained", "resolve_model_arg", "weights_path",
]
