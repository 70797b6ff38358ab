"""Augmentations on uint8 image tensors, every random choice from a local ``torch.Generator``.

* :func:`augment`: finetuning's RandomResizedCrop (bicubic, antialiased) + horizontal flip.
* :data:`VIEW_POLICIES`: the named, per-modality view augmentations of self-supervised
  pretraining (``cxr``, ``fundus``, ``histology``, ``natural``); :func:`make_views` turns a
  batch of whole images (cropped within each image's extent in the padded canvas of a
  ``resize="keep"`` store) into the views a method needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from medxfer.registry import Registry


def crop_params(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                g: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width): 10 tries, then a centre crop."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(u[2] * (h - ch + 1))
            left = int(u[3] * (w - cw + 1))
            return min(top, h - ch), min(left, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def augment(batch: torch.Tensor, size: int, g: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
            extents: np.ndarray | None = None) -> torch.Tensor:
    """RandomResizedCrop(size, bicubic, antialiased) + horizontal flip of uint8 B x C x H x W;
    with ``extents`` (B x (height, width)) each image lies top-left in a padded canvas and is
    cropped within its own extent."""
    out = []
    for i, img in enumerate(batch):
        h, w = (int(extents[i][0]), int(extents[i][1])) if extents is not None else img.shape[-2:]
        top, left, ch, cw = crop_params(h, w, scale, ratio, g)
        crop = TF.resized_crop(img, top, left, ch, cw, [size, size],
                               interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if hflip and bool(torch.rand(1, generator=g) < 0.5):
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)


# --------------------------------------------------------------------------- pretraining views

@dataclass(frozen=True)
class ViewPolicy:
    """How one modality's views are made (every probability per image, from the generator).

    ``crop_scale``/``local_scale``: RandomResizedCrop area ranges of the global views and of
    DINO's local views; ``rotation``: uniform angle in [-r, r] degrees (``dihedral``: a random
    multiple of 90 degrees instead); ``jitter``: ColorJitter (brightness, contrast, saturation,
    hue) applied with probability ``jitter_p``; ``hed``: stain jitter strength in HED space
    (Tellez et al. 2019) for H&E images; ``blur``/``solarize``: probabilities per view index
    (cycled; BYOL's and DINO's asymmetric views).
    """

    name: str
    description: str
    crop_scale: tuple[float, float] = (0.2, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    rotation: float = 0.0
    dihedral: bool = False
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    grayscale: float = 0.0
    hed: float = 0.0
    blur: tuple[float, ...] = (0.0,)
    solarize: tuple[float, ...] = (0.0,)
    local_blur: float = 0.0


VIEW_POLICIES: Registry[ViewPolicy] = Registry("augmentation")


def register_view_policy(policy: ViewPolicy) -> ViewPolicy:
    return VIEW_POLICIES.register(policy.name, policy)


# The methods' own ImageNet recipes ("natural"), as their papers and lightly's transforms define them.
NATURAL = {
    "moco-v2": ViewPolicy("natural", "MoCo v2 (Chen et al. 2020): crop 0.2-1, colour jitter 0.4/0.4/0.4/0.1 (p 0.8), "
                          "greyscale 0.2, blur 0.5, flip", crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                          grayscale=0.2, blur=(0.5,)),
    "simclr": ViewPolicy("natural", "SimCLR (Chen et al. 2020): crop 0.08-1, colour jitter 0.8/0.8/0.8/0.2 (p 0.8), "
                         "greyscale 0.2, blur 0.5, flip", crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2),
                         jitter_p=0.8, grayscale=0.2, blur=(0.5,)),
    "byol": ViewPolicy("natural", "BYOL (Grill et al. 2020): crop 0.08-1, colour jitter 0.4/0.4/0.2/0.1 (p 0.8), "
                       "greyscale 0.2, blur 1.0/0.1, solarize 0/0.2, flip", crop_scale=(0.08, 1.0),
                       jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale=0.2, blur=(1.0, 0.1), solarize=(0.0, 0.2)),
    "dino": ViewPolicy("natural", "DINO (Caron et al. 2021): global crops 0.4-1, local 0.05-0.4, colour jitter "
                       "0.4/0.4/0.2/0.1 (p 0.8), greyscale 0.2, blur 1.0/0.1 (local 0.5), solarize 0/0.2, flip",
                       crop_scale=(0.4, 1.0), local_scale=(0.05, 0.4), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                       grayscale=0.2, blur=(1.0, 0.1), solarize=(0.0, 0.2), local_blur=0.5),
}
register_view_policy(ViewPolicy(
    "natural", "the method's own ImageNet recipe (MoCo v2, SimCLR, BYOL or DINO; see NATURAL)"))
register_view_policy(ViewPolicy(
    "cxr", "chest X-ray, as MoCo-CXR (Sowrirajan et al. 2021): rotation within +-10 degrees and horizontal flip; "
    "no colour jitter, no blur, only light crops (0.9-1 of the image; DINO's local views 0.3-0.6)",
    crop_scale=(0.9, 1.0), local_scale=(0.3, 0.6), ratio=(0.9, 1.1), rotation=10.0))
register_view_policy(ViewPolicy(
    "fundus", "colour fundus photographs: crops 0.3-1, any rotation, horizontal and vertical flips (a fundus has "
    "no canonical orientation beyond the eye's side), mild brightness/contrast/saturation jitter 0.2/0.2/0.1 "
    "(p 0.8), no hue or greyscale (colour carries lesions), blur 0.2",
    crop_scale=(0.3, 1.0), local_scale=(0.1, 0.3), rotation=180.0, vflip=0.5, jitter=(0.2, 0.2, 0.1, 0.0),
    jitter_p=0.8, blur=(0.2,)))
register_view_policy(ViewPolicy(
    "histology", "H&E microscopy: crops 0.2-1, rotations by multiples of 90 degrees and both flips (tissue has "
    "no orientation), stain-aware HED jitter 0.05 (Tellez et al. 2019) plus brightness/contrast 0.1 (p 0.8), "
    "blur 0.2", crop_scale=(0.2, 1.0), local_scale=(0.05, 0.3), dihedral=True, vflip=0.5,
    jitter=(0.1, 0.1, 0.0, 0.0), jitter_p=0.8, hed=0.05, blur=(0.2,)))


def policy_for(name: str, method: str) -> ViewPolicy:
    """The registered policy ``name``; ``natural`` resolves to ``method``'s own recipe."""
    policy = VIEW_POLICIES.get(name)
    if policy.name == "natural":
        return NATURAL.get(method, NATURAL["moco-v2"])
    return policy


def _u(g: torch.Generator) -> float:
    return float(torch.rand(1, generator=g))


# Ruifrok & Johnston's stain vectors (as skimage.color.rgb2hed uses them)
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_RGB_FROM_HED[2] = torch.linalg.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def hed_jitter(img: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale (1 + alpha) and shift (beta) each stain concentration of a uint8 3 x H x W image
    in haematoxylin-eosin-DAB space (colour deconvolution), then back to uint8 RGB."""
    x = img.double().div(255.0).clamp_min(1e-6)
    log_adjust = math.log(1e-6)
    od = (x.log() / log_adjust).permute(1, 2, 0) @ _HED_FROM_RGB.to(x.device)
    od = od * (1.0 + alpha.to(x.device)) + beta.to(x.device)  # no clamp: zero jitter is an exact round trip
    rgb = torch.exp((od * log_adjust) @ _RGB_FROM_HED.to(x.device)).clamp(0.0, 1.0)
    return rgb.permute(2, 0, 1).mul(255.0).round().to(torch.uint8)


def _colour(img: torch.Tensor, p: ViewPolicy, g: torch.Generator) -> torch.Tensor:
    rgb = img.shape[0] == 3
    if p.hed and rgb:
        a = (torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1) * p.hed
        b = (torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1) * p.hed
        img = hed_jitter(img, a, b)
    if p.jitter_p and _u(g) < p.jitter_p:
        bri, con, sat, hue = p.jitter
        order = torch.randperm(4, generator=g).tolist()
        factors = [1 + (2 * _u(g) - 1) * bri, 1 + (2 * _u(g) - 1) * con, 1 + (2 * _u(g) - 1) * sat,
                   (2 * _u(g) - 1) * hue]
        for op in order:
            if op == 0 and bri:
                img = TF.adjust_brightness(img, max(factors[0], 0.0))
            elif op == 1 and con:
                img = TF.adjust_contrast(img, max(factors[1], 0.0)) if rgb else _grey_contrast(img, factors[1])
            elif op == 2 and sat and rgb:
                img = TF.adjust_saturation(img, max(factors[2], 0.0))
            elif op == 3 and hue and rgb:
                img = TF.adjust_hue(img, factors[3])
    if p.grayscale and rgb and _u(g) < p.grayscale:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return img


def _grey_contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    mean = img.float().mean()
    return (mean + (img.float() - mean) * max(factor, 0.0)).clamp(0, 255).to(torch.uint8)


def one_view(img: torch.Tensor, extent: tuple[int, int], size: int, p: ViewPolicy, g: torch.Generator, *,
             scale: tuple[float, float], blur: float, solarize: float) -> torch.Tensor:
    """One augmented view (uint8 C x size x size) of a uint8 C x H x W image whose content is
    the top-left ``extent`` (height, width)."""
    top, left, ch, cw = crop_params(extent[0], extent[1], scale, p.ratio, g)
    v = TF.resized_crop(img, top, left, ch, cw, [size, size], interpolation=TF.InterpolationMode.BICUBIC,
                        antialias=True)
    if p.dihedral:
        k = int(torch.randint(4, (1,), generator=g))
        v = torch.rot90(v, k, dims=(-2, -1))
    elif p.rotation:
        angle = (2 * _u(g) - 1) * p.rotation
        v = TF.rotate(v, angle, interpolation=TF.InterpolationMode.BILINEAR)
    if p.hflip and _u(g) < p.hflip:
        v = v.flip(-1)
    if p.vflip and _u(g) < p.vflip:
        v = v.flip(-2)
    v = _colour(v, p, g)
    if blur and _u(g) < blur:
        sigma = 0.1 + 1.9 * _u(g)
        k = max(3, int(2 * math.ceil(3 * sigma * size / 224) + 1))
        v = TF.gaussian_blur(v, [k, k], [sigma * size / 224] * 2)
    if solarize and _u(g) < solarize:
        v = TF.solarize(v, 128)
    return v


def make_views(batch: torch.Tensor, extents: np.ndarray | None, policy: ViewPolicy, g: torch.Generator, *,
               size: int, n_global: int = 2, n_local: int = 0, local_size: int = 96) -> list[torch.Tensor]:
    """``n_global`` views at ``size`` then ``n_local`` at ``local_size`` of every image of a uint8
    B x C x H x W batch, each a B x C x s x s uint8 tensor. Images are handled one by one in
    order, views in order, so one generator state always gives the same views."""
    views: list[list[torch.Tensor]] = [[] for _ in range(n_global + n_local)]
    for i, img in enumerate(batch):
        ext = (int(extents[i][0]), int(extents[i][1])) if extents is not None else tuple(img.shape[-2:])
        for j in range(n_global):
            views[j].append(one_view(img, ext, size, policy, g, scale=policy.crop_scale,
                                     blur=policy.blur[j % len(policy.blur)],
                                     solarize=policy.solarize[j % len(policy.solarize)]))
        for j in range(n_local):
            views[n_global + j].append(one_view(img, ext, local_size, policy, g, scale=policy.local_scale,
                                                blur=policy.local_blur, solarize=0.0))
    return [torch.stack(v) for v in views]


__all__ = ["NATURAL", "VIEW_POLICIES", "ViewPolicy", "augment", "crop_params", "hed_jitter", "make_views",
           "policy_for", "register_view_policy", "replace"]
