"""Headless trunks and the Backbone wrapper every stage uses.

A trunk builder returns a torchvision module whose forward gives pooled features and whose
``state_dict()`` keys are torchvision's own names minus the classification head, so converted
checkpoints load strictly.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from medxfer.cache import content_key
from medxfer.models.normalize import get_normalizer
from medxfer.models.spec import ModelSpec
from medxfer.models.vit import dinov2_vitb14, dinov2_vits14
from medxfer.registry import Registry

TrunkBuilder = Callable[[], nn.Module]
ARCHS: Registry[TrunkBuilder] = Registry("architecture")


def _resnet(factory: Callable[..., nn.Module]) -> TrunkBuilder:
    def build() -> nn.Module:
        m = factory(weights=None)
        m.fc = nn.Identity()
        return m

    return build


def _densenet(factory: Callable[..., nn.Module]) -> TrunkBuilder:
    def build() -> nn.Module:
        m = factory(weights=None)
        m.classifier = nn.Identity()  # forward: features -> relu -> avgpool -> flatten
        return m

    return build


class TinyCNN(nn.Module):
    """A 4-layer CNN (32-d features) for fast tests and demos; never a real backbone."""

    def __init__(self, width: int = 16, out_dim: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 5, stride=4, padding=2), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, out_dim, 3, stride=2, padding=1), nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _torchvision_vit(factory: Callable[..., nn.Module]) -> TrunkBuilder:
    def build() -> nn.Module:
        m = factory(weights=None)
        m.heads = nn.Identity()  # forward returns the final-normed CLS token
        return m

    return build


# name -> (builder, pooled feature dimension). Every trunk maps normalised B x 3 x 224 x 224
# input to B x D features; its state_dict() holds no classification head.
_BUILTIN_ARCHS: dict[str, tuple[TrunkBuilder, int]] = {
    "tinycnn": (TinyCNN, 32),
    "resnet18": (_resnet(torchvision.models.resnet18), 512),
    "resnet34": (_resnet(torchvision.models.resnet34), 512),
    "resnet50": (_resnet(torchvision.models.resnet50), 2048),
    "resnet101": (_resnet(torchvision.models.resnet101), 2048),
    "resnet152": (_resnet(torchvision.models.resnet152), 2048),
    "wide_resnet50_2": (_resnet(torchvision.models.wide_resnet50_2), 2048),
    "densenet121": (_densenet(torchvision.models.densenet121), 1024),
    "densenet169": (_densenet(torchvision.models.densenet169), 1664),
    "densenet201": (_densenet(torchvision.models.densenet201), 1920),
    "vit_b_16": (_torchvision_vit(torchvision.models.vit_b_16), 768),
    "dinov2_vits14": (dinov2_vits14, 384),
    "dinov2_vitb14": (dinov2_vitb14, 768),
}
ARCH_FEATURE_DIMS: dict[str, int] = {}


def register_arch(name: str, builder: TrunkBuilder, feature_dim: int) -> None:
    """Register a trunk builder (plugins too); ``feature_dim`` is its pooled output size."""
    ARCHS.register(name, builder)
    ARCH_FEATURE_DIMS[name] = feature_dim


for _name, (_builder, _dim) in _BUILTIN_ARCHS.items():
    register_arch(_name, _builder, _dim)


def build_trunk(arch: str, seed: int | None = None) -> nn.Module:
    """Build a headless trunk; with ``seed`` its random initialisation is reproducible.

    The global RNG is forked, so seeding here never changes the caller's random state.
    """
    builder = ARCHS.get(arch)
    if seed is None:
        return builder()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder()


def state_dict_hash(module: nn.Module) -> str:
    """SHA-256 (16 hex) over the names, shapes and bytes of every tensor in a state dict."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class Backbone(nn.Module):
    """A frozen feature extractor: normalisation + headless trunk -> B x D features.

    ``weights`` says which weights are loaded, in words (``"pretrained (...)"`` or
    ``"random init (seed 0)"``) and goes into every result; ``weights_hash`` is a content
    hash of the trunk's state dict and keys every cache built from this model.
    """

    def __init__(self, spec: ModelSpec, trunk: nn.Module, weights: str) -> None:
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.weights = weights
        self._normalize = get_normalizer(spec.normalization)
        self._hash: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def is_random(self) -> bool:
        return self.weights.startswith("random")

    @property
    def weights_hash(self) -> str:
        if self._hash is None:
            h = state_dict_hash(self.trunk)
            # a normalisation variant shares its base's weights but not its features
            self._hash = content_key(h, self.spec.normalization) if self.spec.base else h
        return self._hash

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        """The trunk's state dict exactly as converted (torchvision names, no head)."""
        return self.trunk.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self._hash = None
        return self.trunk.load_state_dict(state_dict, strict=strict, assign=assign)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x C x H x W (C = 1 or 3) -> the float input this model was trained on."""
        return self._normalize(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float input -> pooled features B x D."""
        return self.trunk(x)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> features, in eval mode (asserted)."""
        assert_eval(self)
        return self.trunk(self.normalize(images).contiguous(memory_format=torch.channels_last))


def assert_eval(model: nn.Module) -> None:
    """Refuse to extract features from a model with any module in training mode."""
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"model must be in eval mode for feature extraction; modules in training mode: {training[:5]}"
        )
