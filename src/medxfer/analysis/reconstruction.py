"""Deep-image-prior reconstruction from a backbone's last-stage map, scored with LPIPS (Tables A4-A6).

The ``reconstruction`` protocol: for a few seeded images (the same for every model), fit the DIP
skip generator (:mod:`medxfer.analysis.dip`) so that the frozen backbone's unpooled last-stage
map of its output matches the target's, then score the float reconstruction (clipped to [0, 1],
before any file encoding) against the 224 crop with LPIPS v0.1 AlexNet, SqueezeNet and VGG and
their mean (:mod:`medxfer.analysis.perceptual`; the trunks' ImageNet weights come from the
weight cache: ``medxfer fetch lpips``). Reconstruction and original are saved losslessly as PNG
artifacts.

By default both the target and every generator output go through the model's own
normalisation (``--compat paper``: unnormalised, as the authors did). Mean/std and "none"
normalisations have a float form; a histogram normalisation (MIMIC-CheXpert) is applied to the
generator output as the target image's own value mapping, piecewise linear, so gradients flow.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medxfer.analysis._select import choose_rows
from medxfer.errors import UsageError
from medxfer.models.errors import WeightsUnavailableError
from medxfer.progress import bar
from medxfer.protocols.base import EvalResult, Headline, Needs, Params, Protocol, register_protocol
from medxfer.typed import positive, setting

if TYPE_CHECKING:
    from medxfer.cell import Context
    from medxfer.models.backbone import Backbone

log = logging.getLogger(__name__)

LPIPS_NETS = ("alex", "squeeze", "vgg")


def _check_nets(value: Any) -> None:
    unknown = [n for n in value if n not in LPIPS_NETS]
    if unknown or not value:
        raise ValueError(f"unknown LPIPS network(s) {unknown}; choose from {', '.join(LPIPS_NETS)}")


@dataclass(frozen=True)
class ReconstructionParams(Params):
    """The protocol's settings (PROTOCOL.md: Adam 1e-3, 3000 steps, the last stage's map)."""

    images: int = setting(2, check=positive, help="seeded images per dataset (the same for every model)")
    splits: tuple[str, ...] | None = setting(("test",), help="splits the images are drawn from (None: all)")
    steps: int = setting(3000, check=positive, help="Adam steps (the authors' loop ran 3001)")
    lr: float = setting(1e-3, check=positive, help="Adam learning rate")
    stage: str | None = setting(None, help="the feature map inverted (None: the last stage)")
    normalize_input: bool = setting(True, help="the model's own normalisation on target and output "
                                    "(false: raw [0, 1] images, the authors' behaviour)")
    lpips_nets: tuple[str, ...] = setting(LPIPS_NETS, check=_check_nets, help="LPIPS trunks; 'mean' averages them")
    noise_size: int | None = setting(None, check=positive, help="side of the generator's input noise (None: "
                                     "256, the protocol's for 224 crops; max(128, crop + 32) under 224: six 2x poolings)")


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``fp(xp)`` at ``x`` (clamped at the ends), differentiable in ``x``."""
    j = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]).contiguous()).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[j - 1], xp[j], fp[j - 1], fp[j]
    t = (x.clamp(xp[0], xp[-1]) - x0) / (x1 - x0).clamp_min(1e-12)
    return y0 + t * (y1 - y0)


def float_normalizer(model: Backbone, target_uint8: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's normalisation on float [0, 1] B x 3 x H x W images: its float form where it
    has one, else (histogram normalisations) the target image's own value -> output mapping."""
    norm = model.normalization
    if norm.float_fn is not None:
        return norm.float_fn
    mapped = norm(target_uint8).float()[0]  # 3 x H x W in the model's input range
    raw = target_uint8.float()[0].expand_as(mapped) / 255.0
    values, inverse = torch.unique(raw.reshape(-1), return_inverse=True)
    fp = torch.zeros_like(values).scatter_reduce(0, inverse, mapped.reshape(-1), reduce="mean", include_self=False)
    if len(values) < 2:
        return lambda x: x * 0 + fp[0]

    def apply(x: torch.Tensor) -> torch.Tensor:
        return _interp(x, values.to(x.device), fp.to(x.device))

    return apply


def _perceptual(nets: tuple[str, ...], cache_dir: Any, device: str) -> Any:
    from medxfer.analysis.perceptual import Perceptual
    from medxfer.models.auxiliary import auxiliary_path, recorded_sha256

    missing = [n for n in nets if recorded_sha256(f"lpips-{n}", cache_dir) is None]
    if missing:
        raise WeightsUnavailableError(
            f"LPIPS needs torchvision's ImageNet weights for {', '.join(missing)}, not in the cache: run "
            f"`medxfer fetch lpips` (online), or `medxfer fetch lpips --from DIR` with the three files")
    from medxfer.cache import stamp_last_used

    for n in nets:
        stamp_last_used(auxiliary_path(f"lpips-{n}", cache_dir))
    return Perceptual({n: auxiliary_path(f"lpips-{n}", cache_dir) for n in nets},
                      sha256={n: recorded_sha256(f"lpips-{n}", cache_dir) for n in nets}, nets=nets, device=device,
                      size=None)


def _run(ctx: Context, p: ReconstructionParams, seed: int) -> EvalResult:
    model = ctx.model
    prepared = ctx.prepared()
    stage = p.stage or model.arch.last_stage
    model.arch.stage_channels(stage)
    rows = choose_rows(prepared.records, p.images, seed, splits=p.splits)
    if len(rows) == 0:
        raise UsageError(f"reconstruction: no images in splits {p.splits} (--set reconstruction.splits=null)")
    perceptual = _perceptual(tuple(p.lpips_nets), ctx.cache_dir, ctx.device)
    out_dir = ctx.artifact_dir()
    home = next(model.parameters()).device
    model.to(ctx.device)
    try:
        per_image, files = _reconstruct_rows(model, prepared, rows, stage, p, seed, perceptual, out_dir, ctx.device)
    finally:
        model.to(home)
    return _result(p, per_image, files, stage)


def _reconstruct_rows(model: Backbone, prepared: Any, rows: np.ndarray, stage: str, p: ReconstructionParams,
                      seed: int, perceptual: Any, out_dir: Any, device: str) -> tuple[list[dict[str, Any]], list[str]]:
    from medxfer.analysis.dip import reconstruct
    from medxfer.analysis.perceptual import save_png_pair

    files: list[str] = []
    per_image: list[dict[str, Any]] = []
    for row in rows:
        target_u8 = torch.from_numpy(np.array(prepared.array[row])).permute(2, 0, 1)[None]
        if target_u8.shape[1] == 1:
            target_u8 = target_u8.expand(-1, 3, -1, -1).contiguous()
        target = target_u8.float() / 255.0
        normalize = float_normalizer(model, target_u8) if p.normalize_input else None
        image_seed = int(np.random.default_rng([seed, int(row), 0xD1]).integers(2**31 - 1))
        steps = bar(total=p.steps, desc=f"reconstruct {model.name} image {int(row)}", unit="step")
        rec = reconstruct(partial(model.feature_map, stage=stage), target[0], normalize=normalize, seed=image_seed,
                          steps=p.steps, lr=p.lr, backbone=model, device=device,
                          noise_size=p.noise_size or (256 if prepared.size >= 224 else max(128, prepared.size + 32)),
                          progress=lambda step, loss: steps.update(step - steps.n), progress_every=10)
        steps.close()
        distances = perceptual(rec.image, target[0])
        if out_dir is not None:
            files += [str(f) for f in save_png_pair(rec.image, target[0], out_dir, f"{int(row):06d}")]
        per_image.append({"row": int(row), "path": prepared.records[row].path, "final_loss": rec.final_loss,
                          "seconds": round(rec.seconds, 3), "lpips": distances})
        log.info("reconstruction %s, image %d: LPIPS %s", model.name, int(row),
                 ", ".join(f"{k} {v:.3f}" for k, v in distances.items()))
    return per_image, files


def _result(p: ReconstructionParams, per_image: list[dict[str, Any]], files: list[str], stage: str) -> EvalResult:
    keys = [*p.lpips_nets, "mean"]
    metrics = {f"lpips_{k}": float(np.mean([d["lpips"][k] for d in per_image])) for k in keys}
    metrics["final_loss"] = float(np.mean([d["final_loss"] for d in per_image]))
    metrics["images"] = float(len(per_image))
    means = [d["lpips"]["mean"] for d in per_image]
    ci = float(1.96 * np.std(means, ddof=1) / np.sqrt(len(means))) if len(means) > 1 else None
    return EvalResult(
        protocol="reconstruction", metrics=metrics, params=p.to_dict(), files=files,
        headline=Headline("lpips_mean", metrics["lpips_mean"], ci, higher_is_better=False),
        details={"images": per_image, "stage": stage, "normalized_input": p.normalize_input,
                 "lower_is_better": "LPIPS distance between reconstruction and original"})


register_protocol(Protocol(
    name="reconstruction", version="1", params=ReconstructionParams, run=_run, analysis=True,
    needs=Needs(images=True, model=True, accelerator="gpu"),
    compat={"paper": {"normalize_input": False}},
    description="deep-image-prior inversion of the last-stage feature map, LPIPS (alex, squeeze, vgg) "
                "to the original (paper Tables A4-A6)",
), aliases=("dip",))
