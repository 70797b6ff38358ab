"""Finetuning: backbone + new linear head, all parameters trained (paper Table 4).

SGD (Nesterov momentum 0.9, lr 1e-2, weight decay 1e-8), cosine annealing over ``max_steps``
(5000), batch 64, RandomResizedCrop (bicubic) + horizontal flip on the prepared uint8 images,
validation every 200 steps, early stopping with patience 3 on the validation headline metric
(ties broken by lower validation loss), the best weights restored (a real copy: the authors'
"best" state dict aliased the live tensors, so their restore did nothing), then test metrics.

Every random choice (head initialisation, batch order, crops, flips, search trials) comes
from local generators derived from ``seed``. With ``workdir`` a checkpoint (model, optimiser,
schedule, generators, best weights, curves) is written atomically at every validation, so a
killed run resumes exactly where it stopped; a finished run is reused. The loop itself is
:class:`medxfer.training.Trainer`, shared with in-domain pretraining.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn

from medxfer.cache import atomic_path, content_key
from medxfer.data.splits import identity_keys
from medxfer.devices import resolve_device
from medxfer.errors import UsageError
from medxfer.models.backbone import Backbone
from medxfer.models.normalize import get_normalizer
from medxfer.prepare import KEEP, PreparedImages
from medxfer.protocols.base import (
    EvalResult,
    Headline,
    Input,
    LabelView,
    Needs,
    Params,
    Protocol,
    register_protocol,
)
from medxfer.protocols.metrics import HEADLINE_METRICS, classification_metrics, test_report
from medxfer.protocols.splits import SplitIndices, many_shot_splits
from medxfer.training import SeededBatches, Trainer, cosine, load_batch, snapshot_state
from medxfer.training.augment import augment, crop_params
from medxfer.training.precision import autocast, cuda_amp_name
from medxfer.typed import fraction, positive, setting

if TYPE_CHECKING:
    from medxfer.cell import Context

log = logging.getLogger(__name__)

VERSION = "1"
CHECKPOINT = "checkpoint.pt"
FINAL = "final.pt"


Snapshot = Callable[[nn.Module], dict[str, torch.Tensor]]
CheckpointHook = Callable[[int], None]


class FinetuneNet(nn.Module):
    """A trainable copy of a backbone plus a new linear head; input: uint8 images."""

    def __init__(self, backbone: Backbone, num_classes: int, generator: torch.Generator) -> None:
        super().__init__()
        # the trunk is copied (the caller's frozen model stays as it is) and unfrozen
        self.trunk = copy.deepcopy(backbone.trunk)
        for p in self.trunk.parameters():
            p.requires_grad_(True)
        self.normalize = get_normalizer(backbone.spec.normalization)
        dim = backbone.feature_dim
        self.head = nn.Linear(dim, num_classes)
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's default range, from the local generator
        with torch.no_grad():
            nn.init.uniform_(self.head.weight, -bound, bound, generator=generator)
            nn.init.uniform_(self.head.bias, -bound, bound, generator=generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if images.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.trunk(x))


_crop_params = crop_params  # the name the tests and older callers use
__all__ = ["augment", "snapshot_state"]


def _resize_eval(batch: torch.Tensor, size: int) -> torch.Tensor:
    if batch.shape[-1] == size and batch.shape[-2] == size:
        return batch
    return TF.resize(batch, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


_load_batch = load_batch


def _amp_context(device: torch.device, enabled: bool):
    if not enabled or device.type != "cuda":
        return autocast(device, "fp32")
    return autocast(device, cuda_amp_name(device))


def evaluate_net(net: nn.Module, prepared: PreparedImages, idx: np.ndarray, labels: np.ndarray, *, size: int,
                 batch_size: int, device: torch.device, amp: bool, headline: str) -> tuple[dict[str, float], float, list[str]]:
    """Metrics (percent), mean cross-entropy, warnings of ``net`` on rows ``idx`` (eval mode)."""
    proba, loss = net_proba(net, prepared, idx, labels, size=size, batch_size=batch_size, device=device, amp=amp)
    metrics, warns = classification_metrics(labels[idx], proba, headline)
    return metrics, loss, warns


@torch.no_grad()
def net_proba(net: nn.Module, prepared: PreparedImages, idx: np.ndarray, labels: np.ndarray, *, size: int,
              batch_size: int, device: torch.device, amp: bool) -> tuple[np.ndarray, float]:
    """Class probabilities (float64) and mean cross-entropy of ``net`` on rows ``idx`` (eval mode)."""
    was_training = net.training
    net.eval()
    probs, losses = [], []
    ctx, _ = _amp_context(device, amp)
    for start in range(0, len(idx), batch_size):
        rows = idx[start : start + batch_size]
        x = _resize_eval(_load_batch(prepared, rows, device), size)
        with ctx:
            logits = net(x).float()
        y = torch.as_tensor(labels[rows], device=device)
        losses.append(nn.functional.cross_entropy(logits, y, reduction="sum").item())
        probs.append(torch.softmax(logits, 1).cpu().numpy())
    net.train(was_training)
    return np.concatenate(probs).astype(np.float64), float(sum(losses) / len(idx))


@dataclass
class TrialOutcome:
    """One training run: its hyper-parameters, validation history and restored best weights."""

    lr: float
    weight_decay: float
    best_state: dict[str, torch.Tensor]
    best_score: float
    best_loss: float
    best_step: int
    steps: int
    stopped_early: bool
    val_curve: list[dict[str, float]]
    resumed_from: int | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "best_val": self.best_score,
                "best_val_loss": self.best_loss, "best_step": self.best_step, "steps": self.steps,
                "stopped_early": self.stopped_early, "resumed_from": self.resumed_from,
                "seconds": round(self.seconds, 3), "val_curve": self.val_curve}


def _train_once(backbone: Backbone, prepared: PreparedImages, train_store: PreparedImages, sp: SplitIndices,
                labels: np.ndarray, k: int, *,
                lr: float, weight_decay: float, seed: int, device: torch.device, workdir: Path | None,
                key: str, headline: str, p: FinetuneParams, snapshot: Snapshot,
                on_checkpoint: CheckpointHook | None) -> tuple[FinetuneNet, TrialOutcome]:
    """Train one model with early stopping; resume from ``workdir`` when its checkpoint matches ``key``."""
    t0 = time.perf_counter()
    g_init = torch.Generator().manual_seed(seed)
    g_data = torch.Generator().manual_seed(seed + 1)
    g_aug = torch.Generator().manual_seed(seed + 2)
    net = FinetuneNet(backbone, k, g_init).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=p.momentum, nesterov=p.nesterov,
                          weight_decay=weight_decay)
    sched = cosine(opt, p.max_steps)
    amp = use_amp(p, device)
    size = p.image_size
    eval_kw = dict(size=size, batch_size=p.eval_batch_size, device=device, amp=amp, headline=headline)

    final_path = workdir / FINAL if workdir else None
    if final_path is not None and final_path.is_file():
        done = torch.load(final_path, map_location="cpu", weights_only=True)
        if done.get("key") == key:
            outcome = TrialOutcome(**done["outcome"])
            net.load_state_dict(outcome.best_state)
            log.info("finetune: reusing finished run in %s", workdir)
            return net, outcome
        log.warning("finetune: ignoring %s (made with different settings)", final_path)

    trainer = Trainer(net, opt, sched, device=device, max_steps=p.max_steps, key=key,
                      checkpoint_path=workdir / CHECKPOINT if workdir else None, generators={"aug": g_aug},
                      precision=autocast_name(p, device), desc=f"finetune {backbone.name} lr={lr:g} wd={weight_decay:g}",
                      on_checkpoint=on_checkpoint,
                      diverged=lambda step, loss: f"finetune diverged at step {step} (loss {loss}); lower lr={lr:g}")
    st = trainer.resume()
    track: dict[str, Any] = {"best_score": -math.inf, "best_loss": math.inf, "best_step": 0, "bad_evals": 0,
                             "curve": [], "best_state": None}
    if st.resumed_from is not None:
        track.update(st.extra)
    if track["best_state"] is None:
        track["best_state"] = snapshot_state(net)

    batches = SeededBatches(len(sp.train), p.batch_size, g_data)
    batches.skip(st.step)  # a resumed run sees the same batch order: replay the (cheap) sampler from its seed
    train_labels = torch.as_tensor(labels, device=device)

    def loss_fn(step: int, micro: int) -> torch.Tensor:
        rows = sp.train[next(batches)]
        extents = None if train_store.extents is None else train_store.extents[rows]
        x = augment(load_batch(train_store, rows, device), size, g_aug, hflip=p.hflip,
                    scale=tuple(p.crop_scale), ratio=tuple(p.crop_ratio), extents=extents)
        return nn.functional.cross_entropy(net(x).float(), train_labels[torch.as_tensor(rows, device=device)])

    def validate(step: int, train_loss: float) -> bool:
        if not (step % p.val_every == 0 or step == p.max_steps):
            return False
        metrics, vloss, _ = evaluate_net(net, prepared, sp.val, labels, **eval_kw)
        score = metrics["headline"]
        track["curve"].append({"step": step, "score": score, "loss": vloss, "accuracy": metrics["accuracy"],
                               "train_loss": train_loss, "lr": float(sched.get_last_lr()[0])})
        if score > track["best_score"] or (score == track["best_score"] and vloss < track["best_loss"]):
            track.update(best_score=score, best_loss=vloss, best_step=step, bad_evals=0, best_state=snapshot(net))
        else:
            track["bad_evals"] += 1
        log.info("finetune %s step %d/%d: validation %s %.2f (best %.2f at step %d)", backbone.name, step,
                 p.max_steps, headline, score, track["best_score"], track["best_step"])
        return track["bad_evals"] >= p.patience

    st = trainer.run(loss_fn, after_step=validate, extra_state=lambda: dict(track),
                     checkpoint_at=lambda step: step % p.val_every == 0 or step == p.max_steps)
    net.load_state_dict(track["best_state"])  # restore the best weights
    outcome = TrialOutcome(lr=lr, weight_decay=weight_decay, best_state=track["best_state"],
                           best_score=track["best_score"], best_loss=track["best_loss"], best_step=track["best_step"],
                           steps=st.step, stopped_early=st.stopped, val_curve=track["curve"],
                           resumed_from=st.resumed_from, seconds=time.perf_counter() - t0)
    if final_path is not None:
        with atomic_path(final_path) as tmp:
            torch.save({"key": key, "outcome": dict(vars(outcome))}, tmp)
        (workdir / CHECKPOINT).unlink(missing_ok=True)
    return net, outcome


def search_trials(search: Any, lr: float, weight_decay: float, seed: int) -> list[tuple[float, float]]:
    """(lr, weight_decay) pairs to try. ``search``: False (just the given pair), True (the default
    3 x 3 grid around the paper's values), ``{"lr": [...], "weight_decay": [...]}`` (a grid), or
    ``{"random": n, "lr": [lo, hi], "weight_decay": [lo, hi]}`` (n log-uniform draws)."""
    if search is False or search is None:
        return [(lr, weight_decay)]
    if search is True:
        search = {"lr": [1e-3, 1e-2, 1e-1], "weight_decay": [1e-8, 1e-5, 1e-4]}
    if not isinstance(search, dict):
        raise UsageError(f"finetune: search must be false, true or a dict, got {search!r}")
    unknown = sorted(set(search) - {"lr", "weight_decay", "random"})
    if unknown:
        raise UsageError(f"finetune: unknown search key(s) {unknown}; use lr, weight_decay, random")
    lrs = [float(v) for v in search.get("lr", [lr])]
    wds = [float(v) for v in search.get("weight_decay", [weight_decay])]
    if "random" not in search:
        return [(a, b) for a in lrs for b in wds]
    n = int(search["random"])
    rng = np.random.default_rng(seed)

    def draw(bounds: list[float]) -> float:
        lo, hi = (bounds[0], bounds[-1])
        if lo <= 0 or hi <= 0:
            raise UsageError(f"finetune: random search bounds must be positive, got {bounds}")
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))

    return [(draw(lrs), draw(wds)) for _ in range(n)]


def finetune_model(model: Backbone, prepared: PreparedImages, p: FinetuneParams | None = None, *, seed: int = 0,
                   device: str | torch.device | None = None, workdir: str | Path | None = None,
                   snapshot: Snapshot = snapshot_state, on_checkpoint: CheckpointHook | None = None,
                   train_store: PreparedImages | None = None) -> tuple[FinetuneNet, EvalResult]:
    """Finetune a copy of ``model`` (the caller's model is never changed); returns the restored
    best network and the result (test metrics of the best trial on validation).

    ``prepared``: the evaluation crops (validation and test). ``train_store``: the same records
    prepared whole at a larger size (``prepare(..., resize="keep")``), where the training crops
    are taken; without it they come from the evaluation crops (with a warning).

    ``snapshot`` copies the best weights (the default makes an independent copy; a function
    returning ``net.state_dict()`` reproduces the authors' aliasing bug); ``on_checkpoint(step)``
    is called after every checkpoint written to ``workdir``.
    """
    p = p if p is not None else FinetuneParams()
    dev = torch.device(resolve_device(device if device is None else str(device)))
    what = f"prepared images {prepared.dataset or prepared.key}"
    if prepared.array.ndim != 4 or prepared.array.dtype != np.uint8 or prepared.array.shape[-1] not in (1, 3):
        raise UsageError(f"{what}: expected N x S x S x (1|3) uint8 images, got {prepared.array.shape} {prepared.array.dtype}")
    labels = prepared.labels
    if len(labels) != len(prepared.array):
        raise UsageError(f"{what}: {len(prepared.array)} images but {len(labels)} records")
    k = max(len(prepared.class_names), int(labels.max()) + 1)
    val_seed = seed if p.val_seed is None else int(p.val_seed)
    sp = many_shot_splits(prepared.splits, labels, val_fraction=p.val_fraction, val_seed=val_seed,
                          stratified=p.val_stratified, what=what, keys=identity_keys([r.path for r in prepared.records]),
                          generator=p.val_generator)
    if prepared.bad:  # undecodable images (prepared with skip_bad) are zeros: leave them out
        bad = np.asarray(prepared.bad, dtype=np.int64)
        sp = SplitIndices(np.setdiff1d(sp.train, bad), np.setdiff1d(sp.val, bad), np.setdiff1d(sp.test, bad),
                          sp.val_source)
        if not (sp.train.size and sp.val.size and sp.test.size):
            raise UsageError(f"{what}: no usable images left in a split after skipping {bad.size} bad images")
    headline = p.headline_metric or prepared.headline_metric
    train_src = prepared if train_store is None else train_store
    crop_warning = []
    if train_store is None:
        crop_warning = ["training crops taken from the evaluation crops (no whole-image training store): "
                        "small crops are blown up and the image outside the centre is never seen"]
    elif len(train_store) != len(prepared) or train_store.records != prepared.records:
        raise UsageError(f"{what}: the training store does not hold the same records as the evaluation crops")
    wd_root = Path(workdir) if workdir is not None else None
    trials = search_trials(p.search, p.lr, p.weight_decay, seed)
    train_settings = {n: v for n, v in p.key().items() if n not in ("lr", "weight_decay", "search")}
    outcomes: list[TrialOutcome] = []
    best_net: FinetuneNet | None = None
    for i, (lr, wd) in enumerate(trials):
        key = content_key(VERSION, model.fingerprint, prepared.key, train_src.key, seed, lr, wd, k, headline,
                          train_settings, autocast_name(p, dev))
        trial_dir = None if wd_root is None else (wd_root / f"trial-{i:02d}" if len(trials) > 1 else wd_root)
        net, out = _train_once(model, prepared, train_src, sp, labels, k, lr=lr, weight_decay=wd, seed=seed, device=dev,
                               workdir=trial_dir, key=key, headline=headline, p=p, snapshot=snapshot,
                               on_checkpoint=on_checkpoint)
        outcomes.append(out)
        best_i = max(range(len(outcomes)), key=lambda j: (outcomes[j].best_score, -outcomes[j].best_loss))
        if best_i == i:
            best_net = net
            for o in outcomes[:-1]:
                o.best_state = {}  # only the best trial's weights are kept in memory
        else:
            out.best_state = {}
            del net
    chosen = max(range(len(outcomes)), key=lambda j: (outcomes[j].best_score, -outcomes[j].best_loss))
    best = outcomes[chosen]
    assert best_net is not None
    proba, _ = net_proba(best_net, prepared, sp.test, labels, size=p.image_size, batch_size=p.eval_batch_size,
                         device=dev, amp=use_amp(p, dev))
    metrics, half, boot, warns = test_report(labels[sp.test], proba, headline, n_boot=p.bootstrap, seed=seed,
                                             groups=[prepared.records[i].patient for i in sp.test])
    metrics["lr"] = best.lr
    metrics["weight_decay"] = best.weight_decay
    details = {
        "headline_metric": headline,
        "best_step": best.best_step,
        "best_val": best.best_score,
        "best_val_loss": best.best_loss,
        "steps": best.steps,
        "stopped_early": best.stopped_early,
        "restored": True,
        "val_curve": best.val_curve,
        "resumed_from": best.resumed_from,
        "trials": [o.record() for o in outcomes],
        "chosen_trial": chosen,
        "search": p.search if p.search else False,
        "splits": sp.as_dict(),
        "skipped_bad_images": len(prepared.bad),
        "val_seed": val_seed,
        "device": str(dev),
        "bootstrap": boot,
        "train_crops_from": ("evaluation crops" if train_store is None else
                             f"whole images, shorter side {train_store.size} (canvas {list(train_store.array.shape[1:3])})"),
        "amp": use_amp(p, dev),
        "autocast": autocast_name(p, dev),
        "model": model.name,
        "weights": model.weights,
    }
    return best_net, EvalResult(protocol="finetune", metrics=metrics, params=p.to_dict(), details=details,
                                warnings=crop_warning + warns, headline=Headline(headline, float(metrics["headline"]), half, True))


def use_amp(p: FinetuneParams, device: torch.device) -> bool:
    """Mixed precision: as set, else on CUDA only."""
    return bool(p.amp) if p.amp is not None else device.type == "cuda"


def autocast_name(p: FinetuneParams, device: torch.device | str) -> str:
    """The arithmetic a finetune runs in on ``device`` ("fp32", or "bf16"/"fp16" autocast on
    CUDA): it changes the numbers, so it enters run keys."""
    dev = torch.device(device)
    if not use_amp(p, dev) or dev.type != "cuda":
        return "fp32"
    return cuda_amp_name(dev)


def _check_search(value: Any) -> None:
    search_trials(value, 1e-2, 1e-8, 0)


@dataclass(frozen=True)
class FinetuneParams(Params):
    """Finetuning settings (the paper's: SGD Nesterov 0.9, lr 1e-2, wd 1e-8, cosine over 5000 steps,
    batch 64, validation every 200 steps, patience 3)."""

    lr: float = setting(1e-2, check=positive, help="learning rate")
    weight_decay: float = setting(1e-8, help="weight decay")
    momentum: float = setting(0.9, help="SGD momentum")
    nesterov: bool = setting(True, help="Nesterov momentum")
    max_steps: int = setting(5000, check=positive, help="training steps (cosine schedule length)")
    batch_size: int = setting(64, check=positive, help="training batch (the paper used 16 for DenseNet-121)")
    val_every: int = setting(200, check=positive, help="steps between validations")
    patience: int = setting(3, check=positive, help="validations without improvement before stopping")
    image_size: int = setting(224, check=positive, help="training crop size")
    train_size: int | None = setting(320, check=positive, help="shorter side of the whole-image store training "
                                     "crops are taken from (never enlarged; None: crop from the 224 evaluation crops)")
    crop_scale: tuple[float, float] = setting((0.08, 1.0), help="RandomResizedCrop scale range")
    crop_ratio: tuple[float, float] = setting((3 / 4, 4 / 3), help="RandomResizedCrop aspect range")
    hflip: bool = setting(True, help="random horizontal flips")
    amp: bool | None = setting(None, help="mixed precision (None: on CUDA; bf16 where supported, else fp16)")
    val_fraction: float = setting(0.2, check=fraction, help="carved from train when there is no val split")
    val_seed: int | None = setting(None, help="seed of the validation carve (None: the run seed)")
    val_stratified: bool = setting(True, help="carve validation stratified by class")
    val_generator: Literal["default", "legacy"] = setting(
        "default", help="default: seeded by record identity; legacy: the authors' RandomState permutation of rows")
    headline_metric: str | None = setting(None, help="early-stopping metric (None: the dataset's headline)")
    search: Any = setting(False, check=_check_search, help="lr/weight-decay search: false, true (3 x 3 grid), "
                          "{lr: [...], weight_decay: [...]} or {random: n, lr: [lo, hi], weight_decay: [lo, hi]}")
    bootstrap: int = setting(1000, help="bootstrap replicates of the test set for the headline's 95% interval "
                             "(patients resampled where known; 0: none)")
    eval_batch_size: int = setting(128, check=positive, execution=True, help="evaluation batch")

    def __post_init__(self) -> None:
        if self.headline_metric is not None and self.headline_metric not in HEADLINE_METRICS:
            raise ValueError(f"headline_metric={self.headline_metric!r} is not one of {', '.join(HEADLINE_METRICS)}")


PAPER = {"val_seed": 0, "val_stratified": False, "val_generator": "legacy"}


def _run(ctx: Context, p: FinetuneParams, seed: int) -> EvalResult:
    workdir = ctx.workdir()
    train = ctx.training_store(p.train_size) if p.train_size else None
    result = finetune_model(ctx.model, ctx.prepared(), p, seed=seed, device=ctx.device, workdir=workdir,
                            train_store=train)[1]
    if workdir is not None:
        result.files = [str(f) for f in sorted(workdir.rglob(FINAL))]
    return result


def _check(view: LabelView, p: FinetuneParams, seed: int) -> None:
    val_seed = seed if p.val_seed is None else int(p.val_seed)
    many_shot_splits(view.splits, view.labels, val_fraction=p.val_fraction, val_seed=val_seed,
                     stratified=p.val_stratified, what=f"dataset {view.name!r}")


register_protocol(Protocol(
    name="finetune", version=VERSION, params=FinetuneParams, run=_run, check=_check,
    needs=Needs(images=True, model=True, accelerator="gpu",
                inputs=lambda p: (Input("prepared"),) + ((Input("prepared", size=p.train_size, resize=KEEP),)
                                                        if p.train_size else ())),
    key_extras=lambda p, device: {"autocast": autocast_name(p, device)},
    description="backbone + new linear head, all parameters trained with SGD/cosine, early stopping "
                "on validation with the best weights restored, scored on test",
    compat={"paper": PAPER},
))
