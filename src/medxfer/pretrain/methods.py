"""Self-supervised methods for continued (in-domain) pretraining: MoCo v2, SimCLR, BYOL, DINO.

Each method is an ``nn.Module`` holding the trainable backbone trunk, its projection /
prediction heads and, where the method has one, a momentum (teacher) copy; every piece of
state a resume needs (heads, teachers, MoCo's memory bank of negatives, DINO's centre) is a
parameter or buffer of that module. The losses, heads and momentum update are lightly's
plain-PyTorch modules (``lightly.loss``, ``lightly.models.modules``, ``lightly.models.utils``;
``pip install "medxfer[pretrain]"``); the training loop is medxfer's own
(:class:`medxfer.training.Trainer`).

Input to every method is a list of uint8 views (B x C x S x S); the method applies the
parent model's own input normalisation, so the pretrained model keeps its parent's
preprocessing. Random initialisation of heads and of the memory bank comes from a seeded,
forked RNG: the caller's global random state is never changed.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medxfer.errors import UsageError
from medxfer.models.normalize import Normalization
from medxfer.registry import Registry
from medxfer.training.schedule import cosine_value

LIGHTLY_HINT = ('in-domain pretraining needs lightly: pip install "medxfer[pretrain]" (or, to be sure the '
                'installed torch/torchvision stay as they are: pip install --no-deps "lightly>=1.5")')


def require_lightly() -> None:
    """Raise a :class:`UsageError` with the install command when lightly is missing."""
    try:
        import lightly.loss
        import lightly.models.modules  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"{LIGHTLY_HINT} ({exc})") from None


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global torch RNG seeded, restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class MethodConfig:
    """What a method needs to build itself (see :class:`medxfer.pretrain.PretrainParams`)."""

    feature_dim: int
    total_steps: int
    temperature: float | None
    momentum: float | None
    queue: int
    out_dim: int
    n_local: int
    seed: int


class SSLMethod(nn.Module):
    """Base: ``backbone`` (the trunk being trained), the parent's normalisation, channels-last."""

    name = ""
    n_global = 2
    n_local = 0

    def __init__(self, trunk: nn.Module, normalize: Normalization, cfg: MethodConfig, channels_last: bool) -> None:
        super().__init__()
        self.backbone = trunk
        self.normalize = normalize
        self.cfg = cfg
        self.channels_last = channels_last

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_update(self, step: int) -> None:
        """Called after every optimiser step (momentum teachers update here)."""

    def output_trunk(self) -> nn.Module:
        """The trunk that becomes the registered model."""
        return self.backbone

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def _ema(online: nn.Module, target: nn.Module, m: float) -> None:
    from lightly.models.utils import update_momentum

    update_momentum(online, target, m=m)


class MoCoV2(SSLMethod):
    """MoCo v2 (Chen et al. 2020): MLP projection head, momentum key encoder (m = 0.999), a
    queue of negatives (lightly's NTXentLoss memory bank), InfoNCE at temperature 0.2. The
    query encoder is the registered model, as MoCo releases ``encoder_q``."""

    name = "moco-v2"

    def __init__(self, trunk: nn.Module, normalize: Normalization, cfg: MethodConfig, channels_last: bool) -> None:
        super().__init__(trunk, normalize, cfg, channels_last)
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead

        with seeded(cfg.seed):
            self.head = MoCoProjectionHead(cfg.feature_dim, cfg.feature_dim, 128)
            self.criterion = NTXentLoss(temperature=cfg.temperature or 0.2, memory_bank_size=(cfg.queue, 128))
        self.backbone_momentum = _frozen_copy(self.backbone)
        self.head_momentum = _frozen_copy(self.head)

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        q = self.head(self.backbone(self.prepare(views[0])))
        with torch.no_grad():
            k = self.head_momentum(self.backbone_momentum(self.prepare(views[1])))
        return self.criterion(q.float(), k.float())

    def after_update(self, step: int) -> None:
        m = self.cfg.momentum or 0.999
        _ema(self.backbone, self.backbone_momentum, m)
        _ema(self.head, self.head_momentum, m)


class SimCLR(SSLMethod):
    """SimCLR (Chen et al. 2020): MLP projection head, NT-Xent over the two views of the batch
    (temperature 0.5, lightly's default for small batches)."""

    name = "simclr"

    def __init__(self, trunk: nn.Module, normalize: Normalization, cfg: MethodConfig, channels_last: bool) -> None:
        super().__init__(trunk, normalize, cfg, channels_last)
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        with seeded(cfg.seed):
            self.head = SimCLRProjectionHead(cfg.feature_dim, cfg.feature_dim, 128)
        self.criterion = NTXentLoss(temperature=cfg.temperature or 0.5)

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z0 = self.head(self.backbone(self.prepare(views[0])))
        z1 = self.head(self.backbone(self.prepare(views[1])))
        return self.criterion(z0.float(), z1.float())


class BYOL(SSLMethod):
    """BYOL (Grill et al. 2020): projector (4096 -> 256) and predictor on the online network,
    a momentum target (0.996 -> 1 on a cosine), symmetrised negative cosine similarity. The
    online encoder is the registered model, as BYOL releases it."""

    name = "byol"

    def __init__(self, trunk: nn.Module, normalize: Normalization, cfg: MethodConfig, channels_last: bool) -> None:
        super().__init__(trunk, normalize, cfg, channels_last)
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        with seeded(cfg.seed):
            self.projector = BYOLProjectionHead(cfg.feature_dim, 4096, 256)
            self.predictor = BYOLPredictionHead(256, 4096, 256)
        self.backbone_momentum = _frozen_copy(self.backbone)
        self.projector_momentum = _frozen_copy(self.projector)
        self.criterion = NegativeCosineSimilarity()

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        x0, x1 = self.prepare(views[0]), self.prepare(views[1])
        p0 = self.predictor(self.projector(self.backbone(x0)))
        p1 = self.predictor(self.projector(self.backbone(x1)))
        with torch.no_grad():
            z0 = self.projector_momentum(self.backbone_momentum(x0))
            z1 = self.projector_momentum(self.backbone_momentum(x1))
        return 0.5 * (self.criterion(p0.float(), z1.float()) + self.criterion(p1.float(), z0.float()))

    def after_update(self, step: int) -> None:
        m = cosine_value(step, self.cfg.total_steps, self.cfg.momentum or 0.996, 1.0)
        _ema(self.backbone, self.backbone_momentum, m)
        _ema(self.projector, self.projector_momentum, m)


class DINO(SSLMethod):
    """DINO (Caron et al. 2021): student and momentum teacher with DINO heads (2048-d output
    by default), two global views for the teacher, global + local views for the student,
    centred and sharpened teacher targets (lightly's DINOLoss; teacher temperature 0.04),
    momentum 0.996 -> 1 on a cosine. The teacher is the registered model, as DINO releases it."""

    name = "dino"

    def __init__(self, trunk: nn.Module, normalize: Normalization, cfg: MethodConfig, channels_last: bool) -> None:
        super().__init__(trunk, normalize, cfg, channels_last)
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead

        self.n_local = cfg.n_local
        with seeded(cfg.seed):
            self.head = DINOProjectionHead(cfg.feature_dim, 512, 64, cfg.out_dim)
            # a weight-normalised head cannot be deep-copied: build a twin and copy the state
            self.teacher_head = DINOProjectionHead(cfg.feature_dim, 512, 64, cfg.out_dim)
        self.teacher_head.load_state_dict(self.head.state_dict())
        for p in self.teacher_head.parameters():
            p.requires_grad_(False)
        self.teacher_backbone = _frozen_copy(self.backbone)
        self.criterion = DINOLoss(output_dim=cfg.out_dim, warmup_teacher_temp=0.04, teacher_temp=0.04,
                                  warmup_teacher_temp_epochs=1)

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        prepared = [self.prepare(v) for v in views]
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher_backbone(x)).float() for x in prepared[: self.n_global]]
        student = [self.head(self.backbone(x)).float() for x in prepared]
        return self.criterion(teacher, student, epoch=0)

    def after_update(self, step: int) -> None:
        m = cosine_value(step, self.cfg.total_steps, self.cfg.momentum or 0.996, 1.0)
        _ema(self.backbone, self.teacher_backbone, m)
        _ema(self.head, self.teacher_head, m)

    def output_trunk(self) -> nn.Module:
        return self.teacher_backbone


@dataclass(frozen=True)
class Method:
    """A registered method: its module, optimiser family, base learning rate per 256 images
    (scaled linearly by the effective batch), weight decay and citation."""

    name: str
    build: Callable[[nn.Module, Normalization, MethodConfig, bool], SSLMethod]
    optimizer: str  # "sgd" | "adamw"
    base_lr: float
    weight_decay: float
    citation: str


METHODS: Registry[Method] = Registry("pretraining method")
for _m in (
    Method("moco-v2", MoCoV2, "sgd", 0.03, 1e-4,
           "Chen et al., Improved Baselines with Momentum Contrastive Learning, arXiv:2003.04297"),
    Method("simclr", SimCLR, "sgd", 0.3, 1e-6,
           "Chen et al., A Simple Framework for Contrastive Learning of Visual Representations, ICML 2020"),
    Method("byol", BYOL, "sgd", 0.2, 1.5e-6, "Grill et al., Bootstrap Your Own Latent, NeurIPS 2020"),
    Method("dino", DINO, "adamw", 5e-4, 0.04,
           "Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021"),
):
    METHODS.register(_m.name, _m, aliases=(_m.name.replace("-", ""),) if "-" in _m.name else ())
