"""Per-model input normalisation, applied on the device to batches of prepared uint8 crops.

Every function takes a uint8 tensor B x C x H x W (C = 1 or 3) and returns float32
B x 3 x H x W ready for the trunk (greyscale stacked to 3 channels), except the one-channel
torchxrayvision scaling (``xrv``), which returns B x 1 x H x W (colour averaged to grey).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medxfer.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHEXPERT_MEAN = 0.5020  # MoCo-CXR's native CheXpert statistics
CHEXPERT_STD = 0.085585

Normalizer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Normalization:
    """A named, versioned input normalisation (bump ``version`` when its output changes: the
    version enters every feature and result key computed through it)."""

    name: str
    fn: Normalizer
    version: str = "1"
    float_fn: Normalizer | None = None  # the same on float [0, 1] input, where it is differentiable

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


NORMALIZATIONS: Registry[Normalization] = Registry("normalization")


def register_normalization(name: str, fn: Normalizer, version: str = "1", aliases: tuple[str, ...] = (),
                           float_fn: Normalizer | None = None) -> Normalization:
    return NORMALIZATIONS.register(name, Normalization(name, fn, version, float_fn), aliases=aliases)


def to_rgb_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 B x C x H x W -> float32 in [0,1], 3 channels."""
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected B x (1|3) x H x W, got {tuple(x.shape)}")
    xf = x.float().div_(255.0)
    if xf.shape[1] == 1:
        xf = xf.expand(-1, 3, -1, -1)
    return xf


def _mean_std(mean: tuple[float, ...], std: tuple[float, ...]) -> Normalizer:
    def norm(x: torch.Tensor) -> torch.Tensor:
        return _mean_std_float(mean, std)(to_rgb_float(x))

    return norm


def _mean_std_float(mean: tuple[float, ...], std: tuple[float, ...]) -> Normalizer:
    """The same normalisation on float [0, 1] input (differentiable: analyses that optimise images)."""
    def norm(xf: torch.Tensor) -> torch.Tensor:
        if xf.shape[1] == 1:
            xf = xf.expand(-1, 3, -1, -1)
        m = torch.tensor(mean, device=xf.device, dtype=xf.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, device=xf.device, dtype=xf.dtype).view(1, -1, 1, 1)
        return (xf - m) / s

    return norm


def histogram_equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation of uint8 images to float [0, 255].

    Each image's values are mapped through its own empirical CDF:
    ``out = (cdf(v) - cdf_min) / (N - cdf_min) * 255`` where ``cdf_min`` is the count of the
    darkest present value (the classic formula), so the darkest pixel maps to 0 and the
    brightest to 255; a constant image maps to 0.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, dtype=torch.float64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    cdf = hist.cumsum(1)
    n = float(h * w)
    # count of the smallest value present = first non-zero cdf entry
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).min(1, keepdim=True).values
    denom = (n - cdf_min).clamp_min(1.0)
    lut = ((cdf - cdf_min) / denom * 255.0).clamp_(0.0, 255.0)
    out = torch.gather(lut, 1, flat).float().reshape(b, c, h, w)
    if c == 1:
        out = out.expand(-1, 3, -1, -1)
    return out


def histogram_equalize_covidprognosis(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """CovidPrognosis's ``HistogramNormalize`` (the MIMIC-CheXpert training code), batched.

    Per image, **one histogram over all its pixels** (every channel together, as their code
    flattens the whole image): ``np.histogram(v, 256, density=True)`` over [min, max] (a
    constant image uses [v - 0.5, v + 0.5], as numpy does), ``cdf = 255 * cdf / cdf[-1]``,
    then ``np.interp(v, left_bin_edges, cdf)``. Unlike the textbook formula
    (:func:`histogram_equalize`) the darkest pixel maps to the first bin's share, not 0.
    Output float32 in [0, 255], 3 channels (a greyscale image is equalised, then stacked).
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    b, c, h, w = x.shape
    v = x.reshape(b, c * h * w).double()
    lo, hi = v.min(1, keepdim=True).values, v.max(1, keepdim=True).values
    flat = lo == hi
    lo, hi = torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)
    step = (hi - lo) / bins
    edges = torch.arange(bins + 1, device=x.device, dtype=torch.float64) * step + lo  # numpy linspace
    edges[:, -1:] = hi
    # numpy's bin index: scaled position, then corrected against the actual edges
    idx = ((v - lo) * (bins / (hi - lo))).long().clamp_(0, bins - 1)
    idx = idx - (v < torch.gather(edges, 1, idx)).long()
    idx = idx + ((v >= torch.gather(edges, 1, idx + 1)) & (idx != bins - 1)).long()
    counts = torch.zeros(b, bins, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, idx, torch.ones_like(v))
    cdf = counts.cumsum(1)
    cdf = 255.0 * cdf / cdf[:, -1:]
    left = edges[:, :-1].contiguous()
    j = (torch.searchsorted(left, v.contiguous(), right=True) - 1).clamp_(0, bins - 1)
    x0, y0 = torch.gather(left, 1, j), torch.gather(cdf, 1, j)
    j1 = (j + 1).clamp_(max=bins - 1)
    x1, y1 = torch.gather(left, 1, j1), torch.gather(cdf, 1, j1)
    slope = torch.where(j1 > j, (y1 - y0) / (x1 - x0), torch.zeros_like(y0))
    out = torch.where(j1 > j, y0 + (v - x0) * slope, y0).float().reshape(b, c, h, w)
    if c == 1:
        out = out.expand(-1, 3, -1, -1)
    return out


register_normalization("imagenet", _mean_std(IMAGENET_MEAN, IMAGENET_STD),
                       float_fn=_mean_std_float(IMAGENET_MEAN, IMAGENET_STD))
register_normalization("none", to_rgb_float, aliases=("raw",), float_fn=_mean_std_float((0.0,) * 3, (1.0,) * 3))
register_normalization("histeq", histogram_equalize, aliases=("histogram-equalization",))
# version 2: one histogram per image over all channels (version 1 was per channel)
register_normalization("histeq-covidprognosis", histogram_equalize_covidprognosis, version="2",
                       aliases=("histeq-cp",))
register_normalization("chexpert", _mean_std((CHEXPERT_MEAN,) * 3, (CHEXPERT_STD,) * 3),
                       float_fn=_mean_std_float((CHEXPERT_MEAN,) * 3, (CHEXPERT_STD,) * 3))


XRV_RANGE = 1024.0
RAD_DINO_MEAN = 0.5307  # RAD-DINO's preprocessor_config.json (BitImageProcessor), the same for every channel
RAD_DINO_STD = 0.2583


def _xrv_float(xf: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's ``normalize(img, maxval)`` on float [0, 1] input: one channel (colour
    averaged, as its examples do for RGB files) scaled to [-1024, 1024]."""
    if xf.shape[1] == 3:
        xf = xf.mean(dim=1, keepdim=True)
    return (2.0 * xf - 1.0) * XRV_RANGE


def xrv_normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> ``(2 * x / 255 - 1) * 1024``, B x 1 x H x W (torchxrayvision.utils.normalize)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    return _xrv_float(x.float().div_(255.0))


register_normalization("xrv", xrv_normalize, float_fn=_xrv_float, aliases=("torchxrayvision",))
register_normalization("rad-dino", _mean_std((RAD_DINO_MEAN,) * 3, (RAD_DINO_STD,) * 3),
                       float_fn=_mean_std_float((RAD_DINO_MEAN,) * 3, (RAD_DINO_STD,) * 3))


def get_normalizer(name: str) -> Normalization:
    return NORMALIZATIONS.get(name)
