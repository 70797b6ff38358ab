"""Augmentations on uint8 image tensors, every random choice from a local ``torch.Generator``.

* :func:`augment`: finetuning's RandomResizedCrop (bicubic, antialiased) + horizontal flip.
* :data:`VIEW_POLICIES`: the named, per-modality view augmentations of self-supervised
  pretraining (``cxr``, ``fundus``, ``histology``, ``natural``); :func:`make_views` turns a
  batch of whole images (cropped within each image's extent in the padded canvas of a
  ``resize="keep"`` store) into the views a method needs.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF


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
