"""``pretrain``: continue self-supervised training of a zoo backbone on your own images and
register the result as a model (see the package docstring)."""
from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medxfer.cache import content_key, file_lock, file_sha256, resolve_cache_dir
from medxfer.config import DatasetArg
from medxfer.data.records import Dataset
from medxfer.devices import resolve_device
from medxfer.errors import UsageError
from medxfer.models import MODELS, load_model
from medxfer.models.backbone import Backbone, state_dict_hash
from medxfer.models.checkpoint import save_converted, trunk_from_state
from medxfer.models.pretrained import FAMILY, record_path, register_record, write_record
from medxfer.models.pretrained import read_record as _read_record
from medxfer.pretrain.data import view_source
from medxfer.pretrain.methods import METHODS, MethodConfig, SSLMethod, require_lightly
from medxfer.protocols.base import Params
from medxfer.training import SeededBatches, Trainer, cosine
from medxfer.training.augment import VIEW_POLICIES, make_views, policy_for
from medxfer.training.checkpoint import snapshot_state
from medxfer.training.precision import cpu_bf16_supported, cuda_amp_name
from medxfer.typed import positive, setting

log = logging.getLogger(__name__)

VERSION = "1"
CHECKPOINT = "checkpoint.pt"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _check_method(value: Any) -> None:
    METHODS.get(value)


def _check_augment(value: Any) -> None:
    VIEW_POLICIES.get(value)


@dataclass(frozen=True)
class PretrainParams(Params):
    """Continued self-supervised pretraining settings. ``None`` means the method's own default
    (learning rate: base rate x effective batch / 256 with SGD momentum 0.9 for MoCo v2,
    SimCLR and BYOL, AdamW for DINO)."""

    method: str = setting("moco-v2", check=_check_method, help="moco-v2, simclr, byol or dino")
    augment: str = setting("natural", check=_check_augment, help="cxr, fundus, histology or natural (the method's own)")
    steps: int = setting(200, check=positive, help="optimiser steps (cosine schedule length)")
    batch_size: int = setting(32, check=positive, help="images per micro-batch")
    accumulate: int = setting(1, check=positive, help="micro-batches per step (effective batch = batch_size x accumulate)")
    lr: float | None = setting(None, help="learning rate (None: the method's base rate x effective batch / 256)")
    weight_decay: float | None = setting(None, help="weight decay (None: the method's)")
    warmup_steps: int | None = setting(None, help="linear warm-up steps (None: a tenth of the steps)")
    size: int = setting(224, check=positive, help="view size in pixels")
    store_size: int | None = setting(None, help="shorter side of the whole-image store views are cropped from "
                                     "(None: size x 320/224, as finetuning)")
    local_size: int | None = setting(None, help="DINO's local views (None: size x 96/224)")
    n_local: int = setting(6, help="DINO's local views per image")
    queue: int = setting(4096, check=positive, help="MoCo's queue of negatives")
    temperature: float | None = setting(None, help="contrastive temperature (None: MoCo 0.2, SimCLR 0.5)")
    momentum: float | None = setting(None, help="teacher momentum (None: MoCo 0.999; BYOL/DINO 0.996 -> 1)")
    out_dim: int = setting(2048, check=positive, help="DINO head output size")
    clip_grad: float | None = setting(None, help="gradient-norm clipping (None: DINO 3.0, others none)")
    splits: tuple[str, ...] = setting(("train", "val"), help="splits whose images are used (all: every image; "
                                      "the default leaves the test images out)")
    seed: int = setting(0, help="seed of every random choice (heads, batches, views)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto", help="auto: bf16 (fp16 where unsupported) autocast on CUDA, fp32 on a CPU")
    channels_last: bool | None = setting(None, help="channels-last memory format (None: on CUDA)")
    checkpoint_every: int = setting(25, check=positive, execution=True, help="steps between checkpoints")

    def __post_init__(self) -> None:
        if self.splits and not set(self.splits) <= {"train", "val", "test", "all"}:
            raise ValueError(f"splits={list(self.splits)}: expected train, val, test or all")

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accumulate


def resolved_precision(p: PretrainParams, device: torch.device) -> str:
    if p.precision != "auto":
        if p.precision == "bf16" and device.type == "cpu" and not cpu_bf16_supported():
            log.warning("pretrain: this CPU has no native bf16; bf16 autocast will be slow")
        return p.precision
    return cuda_amp_name(device) if device.type == "cuda" else "fp32"


@dataclass
class PretrainOutcome:
    """What ``pretrain`` made: the registered model's name, record and weights, its loss
    curve, and whether it was computed now (False: an identical earlier run was reused)."""

    name: str
    record: dict[str, Any]
    record_path: Path
    weights_path: Path
    computed: bool

    @property
    def loss_curve(self) -> list[list[float]]:
        return self.record["loss_curve"]


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise UsageError(f"--out {name!r}: a model name is letters, digits, '-', '_' or '.'")
    if name in MODELS and MODELS.get(name).family != FAMILY:
        raise UsageError(f"--out {name!r} is a {MODELS.get(name).family} model of the zoo; choose another name")


def pretrain(
    name: str,
    init: str,
    data: Sequence[DatasetArg | Dataset],
    params: PretrainParams | None = None,
    *,
    weights: str = "pretrained",
    cache_dir: str | Path | None = None,
    device: str | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    on_checkpoint: Callable[[int], None] | None = None,
) -> PretrainOutcome:
    """Continue training ``init`` (a zoo model, ``weights`` pretrained or random) with
    ``params.method`` on the images of ``data`` (labels ignored) and register the result as
    model ``name`` (family ``self-supervised (in-domain)``) in the weight cache.

    Resumable: checkpoints go to ``<cache>/pretrain/<name>/<key>/`` every
    ``checkpoint_every`` steps; the same call after a kill resumes to the same weights. A
    finished model with the same settings is reused; different settings under an existing
    name need ``overwrite``. ``on_checkpoint(step)`` is called after every checkpoint.
    """
    require_lightly()
    p = params if params is not None else PretrainParams()
    _check_name(name)
    if not data:
        raise UsageError("pretrain: give at least one --data source")
    cache = resolve_cache_dir(cache_dir)
    dev = torch.device(resolve_device(device))
    parent = load_model(init, weights=weights, cache_dir=cache)
    method = METHODS.get(p.method)
    policy = policy_for(p.augment, method.name)
    store_size = p.store_size or int(round(p.size * 320 / 224))
    local_size = p.local_size or int(round(p.size * 96 / 224))
    source = view_source(data, store_size=store_size, splits=p.splits, cache_dir=cache, workers=workers,
                         skip_bad=skip_bad)
    precision = resolved_precision(p, dev)
    channels_last = p.channels_last if p.channels_last is not None else dev.type == "cuda"
    import lightly

    key = content_key("pretrain", VERSION, parent.fingerprint, method.name, p.key(), vars(policy), source.fingerprint,
                      store_size, local_size, dev.type, precision, channels_last, lightly.__version__)
    existing = record_path(cache, name)
    if existing.is_file():
        rec = _read_record(existing)
        if rec.get("run_key") == key and Path(cache / rec["weights_file"]).is_file():
            log.info("pretrain %s: already made with these settings (%s); reusing it", name, existing)
            register_record(existing)
            return PretrainOutcome(name, rec, existing, cache / rec["weights_file"], computed=False)
        if not overwrite:
            raise UsageError(f"model {name!r} already exists ({existing}) with other settings; choose another "
                             "--out or pass --overwrite")
    workdir = cache / "pretrain" / name / key
    workdir.mkdir(parents=True, exist_ok=True)
    with file_lock(workdir / ".lock", f"pretraining {name}"):
        return _train(name, init, weights, parent, p, method, policy, source, dev, precision, channels_last,
                      store_size, local_size, key, workdir, cache, on_checkpoint)


def _optimizer(model: SSLMethod, p: PretrainParams, kind: str, lr: float, wd: float) -> torch.optim.Optimizer:
    groups = model.param_groups()
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)


def _train(name: str, init: str, weights: str, parent: Backbone, p: PretrainParams, method: Any, policy: Any,
           source: Any, dev: torch.device, precision: str, channels_last: bool, store_size: int, local_size: int,
           key: str, workdir: Path, cache: Path, on_checkpoint: Callable[[int], None] | None) -> PretrainOutcome:
    t0 = time.perf_counter()
    if len(source) < 2:
        raise UsageError(f"pretrain: need at least 2 images, got {len(source)}")
    batch = min(p.batch_size, len(source))
    if batch < p.batch_size:
        log.warning("pretrain: only %d images; micro-batch lowered from %d to %d", len(source), p.batch_size, batch)
    g_data = torch.Generator().manual_seed(p.seed + 1)
    g_aug = torch.Generator().manual_seed(p.seed + 2)
    trunk = copy.deepcopy(parent.trunk)
    for prm in trunk.parameters():
        prm.requires_grad_(True)
    cfg = MethodConfig(feature_dim=parent.feature_dim, total_steps=p.steps, temperature=p.temperature,
                       momentum=p.momentum, queue=p.queue, out_dim=p.out_dim, n_local=p.n_local, seed=p.seed)
    model = method.build(trunk, parent.normalization, cfg, channels_last).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    eff = batch * p.accumulate
    lr = p.lr if p.lr is not None else method.base_lr * eff / 256
    wd = p.weight_decay if p.weight_decay is not None else method.weight_decay
    opt = _optimizer(model, p, method.optimizer, lr, wd)
    warmup = p.warmup_steps if p.warmup_steps is not None else p.steps // 10
    sched = cosine(opt, p.steps, warmup)
    clip = p.clip_grad if p.clip_grad is not None else (3.0 if method.name == "dino" else None)
    trainer = Trainer(model, opt, sched, device=dev, max_steps=p.steps, key=key, checkpoint_path=workdir / CHECKPOINT,
                      generators={"aug": g_aug}, precision=precision, accumulate=p.accumulate, clip_grad=clip,
                      desc=f"pretrain {name} ({method.name} from {init})", on_checkpoint=on_checkpoint,
                      diverged=lambda step, loss: f"pretraining diverged at step {step} (loss {loss}); lower --lr "
                                                  f"(now {lr:g})")
    st = trainer.resume()
    curve: list[list[float]] = list(st.extra.get("loss_curve", []))
    train_seconds = float(st.extra.get("train_seconds", 0.0))
    batches = SeededBatches(len(source), batch, g_data)
    batches.skip(st.step * p.accumulate)
    n_local = model.n_local

    def loss_fn(step: int, micro: int) -> torch.Tensor:
        images, extents = source.images(next(batches), dev)
        views = make_views(images, extents, policy, g_aug, size=p.size, n_global=model.n_global, n_local=n_local,
                           local_size=local_size)
        return model.loss(views, step)

    clock = [time.perf_counter()]

    def record_step(step: int, loss: float) -> bool:
        curve.append([step, loss])
        if step % max(1, p.steps // 10) == 0 or step == p.steps:
            log.info("pretrain %s step %d/%d: loss %.4f", name, step, p.steps, loss)
        return False

    def extra() -> dict[str, Any]:
        now = time.perf_counter()
        seconds = train_seconds + now - clock[0]
        return {"loss_curve": curve, "train_seconds": seconds}

    st = trainer.run(loss_fn, checkpoint_at=lambda step: step % p.checkpoint_every == 0 or step == p.steps,
                     extra_state=extra, after_update=model.after_update, after_step=record_step)
    seconds = extra()["train_seconds"]
    trained = st.step - (st.resumed_from or 0)
    out_trunk = model.output_trunk()
    sd = {k: v for k, v in snapshot_state(out_trunk).items()}
    trunk_from_state(parent.spec.arch, sd, source=f"pretrained {name}")  # strict check: it loads as the arch
    sha_stub = state_dict_hash(out_trunk)[:12]
    weights_rel = Path("weights") / f"{name}-{sha_stub}.safetensors"
    save_converted(cache / weights_rel, sd, {"medxfer_model": name, "format": "medxfer-pretrained",
                                            "parent": init, "method": method.name, "run_key": key})
    images = st.step * eff
    record = {
        "schema": "medxfer.pretrained/1", "name": name, "arch": parent.spec.arch,
        "normalization": parent.spec.normalization, "parent": parent.spec.base or parent.name,
        "parent_weights": parent.weights, "parent_weights_hash": parent.weights_hash,
        "parent_fingerprint": parent.fingerprint, "method": method.name, "method_citation": method.citation,
        "augment": p.augment, "augment_policy": policy.description, "steps": st.step, "size": p.size,
        "store_size": store_size, "batch_size": batch, "accumulate": p.accumulate, "effective_batch": eff,
        "lr": lr, "weight_decay": wd, "warmup_steps": warmup, "optimizer": method.optimizer, "seed": p.seed,
        "params": p.to_dict(), "precision": precision, "channels_last": channels_last, "device": str(dev),
        "data": {"fingerprint": source.fingerprint, "images": len(source), "datasets": source.summary,
                 "splits": list(p.splits)},
        "loss_curve": curve, "run_key": key, "weights_file": weights_rel.as_posix(),
        "sha256": file_sha256(cache / weights_rel), "weights_hash": state_dict_hash(out_trunk),
        "seconds": round(seconds, 3),
        "images_per_second": round(trained * eff / seconds, 3) if seconds > 0 and trained else None,
        "images_seen": images, "resumed_from": st.resumed_from,
        "licence": f"derived from {parent.name} ({parent.spec.licence}) and trained on your images: both terms apply",
        "citation": f"{parent.spec.citation}; continued with {method.citation}".strip("; "),
        "display_name": None, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    path = write_record(cache, record)
    register_record(path)
    (workdir / CHECKPOINT).unlink(missing_ok=True)
    log.info("pretrain %s: %d steps in %.1fs (%.1f images/s) -> %s", name, st.step, time.perf_counter() - t0,
             record["images_per_second"] or math.nan, path)
    return PretrainOutcome(name, record, path, cache / weights_rel, computed=True)


def _versions() -> dict[str, str]:
    from medxfer.results import library_versions

    out = dict(library_versions())
    try:
        import lightly

        out["lightly"] = lightly.__version__
    except ImportError:
        pass
    return out


def loss_curve_text(curve: list[list[float]], points: int = 10) -> str:
    """The loss curve at about ``points`` evenly spaced steps, as ``step: loss`` lines."""
    if not curve:
        return "(no steps)"
    idx = sorted({int(round(i)) for i in np.linspace(0, len(curve) - 1, min(points, len(curve)))})
    return "\n".join(f"  step {int(curve[i][0]):>6}: loss {curve[i][1]:.4f}" for i in idx)
