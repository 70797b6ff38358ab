"""One spec per pretrained weight set (timm style): source, format, preprocessing, licence."""
from __future__ import annotations

from dataclasses import dataclass, field

from medxfer.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """Everything medxfer knows about one backbone weight set.

    ``arch`` names a trunk builder in :data:`medxfer.models.backbone.ARCHS`.
    ``fmt`` names a checkpoint reader/converter (``"torchvision"``, ``"moco"``, ...);
    ``prefix`` is the key prefix to keep (and strip), ``drop`` the head prefixes to remove.
    ``normalization`` names an entry of :data:`medxfer.models.normalize.NORMALIZATIONS`.
    ``weights_file``: weights medxfer produced (``medxfer pretrain``), loaded as they are from
    the weight cache, never converted; ``parent`` the model they were trained from.
    """

    name: str
    arch: str
    family: str  # "supervised" | "self-supervised" | "domain-specific" | "self-supervised (in-domain)" | "random" | "custom"
    normalization: str = "imagenet"
    urls: tuple[str, ...] = ()
    sha256: str | None = None  # full hash of the original download, when known
    hash_prefix: str | None = None  # published prefix (torchvision sha256 / MoCo md5)
    hash_algo: str = "sha256"
    filename: str | None = None  # name of the original download
    fmt: str = "torchvision"
    prefix: str = ""
    drop: tuple[str, ...] = ()
    imagenet_top1: float | None = None  # upstream linear/supervised top-1
    imagenet_top1_paper: float | None = None  # the paper's table value where it differs
    licence: str = "unknown"
    citation: str = ""
    aliases: tuple[str, ...] = ()
    in_paper: bool = False
    notes: str = ""
    fetch_hint: str = ""  # how to obtain the file when it cannot be downloaded directly
    path: str | None = None  # a local original checkpoint (custom models)
    base: str | None = None  # a variant (e.g. other normalisation) sharing this spec's weights
    display_name: str | None = None  # as the paper prints it (e.g. "MoCo-v2"); None: the name
    weights_file: str | None = None  # a headless safetensors trunk medxfer wrote itself (in-domain pretraining)
    parent: str | None = None  # the model these weights were trained from (in-domain pretraining)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        """Pooled feature size, declared once by the architecture."""
        from medxfer.models.backbone import ARCHS

        return ARCHS.get(self.arch).feature_dim

    @property
    def label(self) -> str:
        return self.display_name or self.name


MODELS: Registry[ModelSpec] = Registry("model", "medxfer.models")


def register_model(spec: ModelSpec, overwrite: bool = False) -> ModelSpec:
    """Register a model spec (also usable by plugins and notebooks)."""
    return MODELS.register(spec.name, spec, aliases=spec.aliases, overwrite=overwrite)
