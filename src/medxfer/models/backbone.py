"""Architectures with their stages, headless trunks, and the Backbone every stage uses.

An :class:`Arch` declares, once, how to build a headless torchvision-style trunk, the size of
its pooled features, and its stages (name and channels, in order) with a function that runs
the trunk up to a stage. A trunk's ``forward`` gives pooled features and its ``state_dict()``
keys are torchvision's own names minus the classification head, so converted checkpoints
load strictly.

The feature API of :class:`Backbone` (all on normalised float input; see :meth:`Backbone.normalize`):

- ``pooled(x)``: B x D, the paper's features (global average pool of the last stage);
- ``feature_map(x, stage)``: B x C x h x w, the unpooled output of a stage (ResNet
  ``layer1``-``layer4``; DenseNet ``denseblock1``-``denseblock4``, the last before ``norm5``;
  ViT ``tokens``, the final-normed patch tokens on their grid);
- ``layer_features(x, layer)``: ``"pooled"``, or a stage's map average-pooled to B x C.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from medxfer.cache import content_key
from medxfer.errors import UsageError
from medxfer.models.normalize import NORMALIZATIONS
from medxfer.models.spec import ModelSpec
from medxfer.models.vit import DinoVisionTransformer, dinov2_vitb14, dinov2_vitl16, dinov2_vits14, mae_vitl16
from medxfer.registry import Registry

TrunkBuilder = Callable[[], nn.Module]
StageRunner = Callable[[nn.Module, torch.Tensor, str], torch.Tensor]
POOLED = "pooled"


@dataclass(frozen=True)
class Arch:
    """One architecture: ``build()`` a headless trunk (forward -> B x ``feature_dim``), its
    ``stages`` (name, channels) in order, ``run_to(trunk, x, stage)`` -> that stage's map, and
    the channels its input has (3; 1 for torchxrayvision's DenseNet)."""

    name: str
    build: TrunkBuilder
    feature_dim: int
    stages: tuple[tuple[str, int], ...]
    run_to: StageRunner
    in_channels: int = 3

    def stage_channels(self, stage: str) -> int:
        for name, channels in self.stages:
            if name == stage:
                return channels
        raise UsageError(f"architecture {self.name!r} has no stage {stage!r}; stages: "
                         f"{', '.join(n for n, _ in self.stages)}")

    def layer_dim(self, layer: str) -> int:
        """Feature size of ``layer``: ``"pooled"`` or a stage (average-pooled)."""
        return self.feature_dim if layer == POOLED else self.stage_channels(layer)

    @property
    def last_stage(self) -> str:
        return self.stages[-1][0]


ARCHS: Registry[Arch] = Registry("architecture")


def register_arch(arch: Arch) -> Arch:
    """Register an architecture (plugins too)."""
    return ARCHS.register(arch.name, arch)


# --------------------------------------------------------------------------- builders and stages

def _resnet(factory: Callable[..., nn.Module]) -> TrunkBuilder:
    def build() -> nn.Module:
        m = factory(weights=None)
        m.fc = nn.Identity()
        return m
    return build


def _resnet_run_to(trunk: nn.Module, x: torch.Tensor, stage: str) -> torch.Tensor:
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(trunk, name)(x)
        if name == stage:
            return x
    raise UsageError(f"ResNet has no stage {stage!r}")


def _resnet_stages(expansion: int) -> tuple[tuple[str, int], ...]:
    return tuple((f"layer{i + 1}", c * expansion) for i, c in enumerate((64, 128, 256, 512)))


def _densenet(factory: Callable[..., nn.Module]) -> TrunkBuilder:
    def build() -> nn.Module:
        m = factory(weights=None)
        m.classifier = nn.Identity()  # forward: features -> relu -> avgpool -> flatten
        return m
    return build


def _densenet_1ch(factory: Callable[..., nn.Module]) -> TrunkBuilder:
    """A DenseNet whose first convolution takes one channel (torchxrayvision's models)."""
    def build() -> nn.Module:
        m = _densenet(factory)()
        m.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return m
    return build


def _densenet_run_to(trunk: nn.Module, x: torch.Tensor, stage: str) -> torch.Tensor:
    for name, module in trunk.features.named_children():
        if name == "norm5":
            break
        x = module(x)
        if name == stage:
            return x
    raise UsageError(f"DenseNet has no stage {stage!r}")


def _densenet_stages(block_config: tuple[int, ...], growth: int = 32, init: int = 64) -> tuple[tuple[str, int], ...]:
    out, ch = [], init
    for i, n in enumerate(block_config):
        ch += n * growth
        out.append((f"denseblock{i + 1}", ch))
        if i < len(block_config) - 1:
            ch //= 2
    return tuple(out)


def _torchvision_vit(factory: Callable[..., nn.Module]) -> TrunkBuilder:
    def build() -> nn.Module:
        m = factory(weights=None)
        m.heads = nn.Identity()  # forward returns the final-normed CLS token
        return m
    return build


def _tv_vit_run_to(trunk: nn.Module, x: torch.Tensor, stage: str) -> torch.Tensor:
    if stage != "tokens":
        raise UsageError(f"ViT has no stage {stage!r} (stages: tokens)")
    tokens = trunk._process_input(x)
    cls = trunk.class_token.expand(tokens.shape[0], -1, -1)
    tokens = trunk.encoder(torch.cat([cls, tokens], dim=1))[:, 1:]
    side = x.shape[-1] // trunk.patch_size
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, x.shape[-2] // trunk.patch_size, side)


def _dino_vit_run_to(trunk: nn.Module, x: torch.Tensor, stage: str) -> torch.Tensor:
    if stage != "tokens":
        raise UsageError(f"ViT has no stage {stage!r} (stages: tokens)")
    assert isinstance(trunk, DinoVisionTransformer)
    tokens = trunk.tokens(x)[:, 1:]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, x.shape[-2] // trunk.patch, x.shape[-1] // trunk.patch)


class TinyCNN(nn.Module):
    """A 3-block CNN (32-d features) for fast tests and demos; never a real backbone."""

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


def _tiny_run_to(trunk: nn.Module, x: torch.Tensor, stage: str) -> torch.Tensor:
    ends = {"block1": 3, "block2": 6, "block3": 9}
    if stage not in ends:
        raise UsageError(f"tinycnn has no stage {stage!r} (stages: {', '.join(ends)})")
    for module in list(trunk.features.children())[: ends[stage]]:
        x = module(x)
    return x


_RESNETS = {"resnet18": (torchvision.models.resnet18, 1), "resnet34": (torchvision.models.resnet34, 1),
            "resnet50": (torchvision.models.resnet50, 4), "resnet101": (torchvision.models.resnet101, 4),
            "resnet152": (torchvision.models.resnet152, 4), "wide_resnet50_2": (torchvision.models.wide_resnet50_2, 4)}
_DENSENETS = {"densenet121": (torchvision.models.densenet121, (6, 12, 24, 16)),
              "densenet169": (torchvision.models.densenet169, (6, 12, 32, 32)),
              "densenet201": (torchvision.models.densenet201, (6, 12, 48, 32))}

register_arch(Arch("tinycnn", TinyCNN, 32, (("block1", 16), ("block2", 32), ("block3", 32)), _tiny_run_to))
for _name, (_factory, _expansion) in _RESNETS.items():
    register_arch(Arch(_name, _resnet(_factory), 512 * _expansion, _resnet_stages(_expansion), _resnet_run_to))
for _name, (_factory, _blocks) in _DENSENETS.items():
    _stages = _densenet_stages(_blocks)
    register_arch(Arch(_name, _densenet(_factory), _stages[-1][1], _stages, _densenet_run_to))
register_arch(Arch("vit_b_16", _torchvision_vit(torchvision.models.vit_b_16), 768, (("tokens", 768),), _tv_vit_run_to))
register_arch(Arch("dinov2_vits14", dinov2_vits14, 384, (("tokens", 384),), _dino_vit_run_to))
register_arch(Arch("dinov2_vitb14", dinov2_vitb14, 768, (("tokens", 768),), _dino_vit_run_to))
register_arch(Arch("dinov2_vitl16", dinov2_vitl16, 1024, (("tokens", 1024),), _dino_vit_run_to))
register_arch(Arch("mae_vitl16", mae_vitl16, 1024, (("tokens", 1024),), _dino_vit_run_to))
register_arch(Arch("densenet121_1ch", _densenet_1ch(torchvision.models.densenet121), 1024,
                   _densenet_stages((6, 12, 24, 16)), _densenet_run_to, in_channels=1))


def build_trunk(arch: str, seed: int | None = None) -> nn.Module:
    """Build a headless trunk; with ``seed`` its random initialisation is reproducible.

    The global RNG is forked, so seeding here never changes the caller's random state.
    """
    builder = ARCHS.get(arch).build
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


class LayerModule(nn.Module):
    """``trunk`` up to ``layer`` as a module: pooled features, or a stage's map average-pooled
    to B x C (a plain module, so BatchNorm folding and compilation apply to it)."""

    def __init__(self, trunk: nn.Module, arch: Arch, layer: str) -> None:
        super().__init__()
        self.trunk = trunk
        self.arch = arch
        self.layer = layer
        if layer != POOLED:
            arch.stage_channels(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer == POOLED:
            return self.trunk(x)
        return self.arch.run_to(self.trunk, x, self.layer).mean(dim=(-2, -1))


class Backbone(nn.Module):
    """A frozen feature extractor: normalisation + headless trunk (see the module docstring).

    ``weights`` says which weights are loaded, in words (``"pretrained (...)"`` or
    ``"random init (seed 0)"``) and goes into every result; ``weights_hash`` is a content
    hash of the trunk's state dict; ``fingerprint`` adds the architecture and the versioned
    input normalisation, and keys every artifact and result computed with this model.
    """

    def __init__(self, spec: ModelSpec, trunk: nn.Module, weights: str) -> None:
        super().__init__()
        self.spec = spec
        self.arch = ARCHS.get(spec.arch)
        self.trunk = trunk
        self.weights = weights
        self.normalization = NORMALIZATIONS.get(spec.normalization)
        self._hash: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def feature_dim(self) -> int:
        return self.arch.feature_dim

    @property
    def is_random(self) -> bool:
        return self.weights.startswith("random")

    @property
    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = state_dict_hash(self.trunk)
        return self._hash

    @property
    def fingerprint(self) -> str:
        """Hash of what decides this model's outputs: architecture, weights, normalisation."""
        return content_key("model", self.arch.name, self.weights_hash, self.normalization.name,
                           self.normalization.version)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        """The trunk's state dict exactly as converted (torchvision names, no head)."""
        return self.trunk.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self._hash = None
        return self.trunk.load_state_dict(state_dict, strict=strict, assign=assign)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x C x H x W (C = 1 or 3) -> the float input this model was trained on."""
        return self.normalization(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float input -> pooled features B x D."""
        return self.trunk(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float input -> pooled features B x D (the paper's features)."""
        return self.trunk(x)

    def feature_map(self, x: torch.Tensor, stage: str | None = None) -> torch.Tensor:
        """Normalised float input -> the unpooled map of ``stage`` (default: the last stage)."""
        return self.arch.run_to(self.trunk, x, stage or self.arch.last_stage)

    def layer_features(self, x: torch.Tensor, layer: str = POOLED) -> torch.Tensor:
        """Normalised float input -> B x D features of ``layer`` (``"pooled"`` or a stage, average-pooled)."""
        return LayerModule(self.trunk, self.arch, layer)(x)

    def layer_dim(self, layer: str = POOLED) -> int:
        return self.arch.layer_dim(layer)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> pooled features, in eval mode (asserted)."""
        assert_eval(self)
        return self.trunk(self.normalize(images).contiguous(memory_format=torch.channels_last))


class ModelModeError(UsageError, RuntimeError):
    """A model used for features while some of its modules are in training mode."""


def assert_eval(model: nn.Module) -> None:
    """Refuse to extract features from a model with any module in training mode."""
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ModelModeError(
            f"model must be in eval mode for feature extraction; modules in training mode: {training[:5]}"
        )
