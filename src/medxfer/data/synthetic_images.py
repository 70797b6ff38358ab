"""Synthetic images with class-dependent structure (for tests and the demo).

Class ``k`` of ``K`` gets its own stripe orientation and spatial frequency, brightness level
and number of bright blobs; every image gets random phase, jitter, blob positions and noise
from the caller's local generator. The structure is strong enough that frozen *randomly
initialised* CNN features separate the classes, so few-shot accuracy is well above chance.
Everything is vectorised numpy (a 256x256 image takes about a millisecond).
"""
from __future__ import annotations

import numpy as np

# per-modality RGB tints applied to the [0, 1] pattern (greyscale modalities have none)
TINTS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # (dark colour, bright colour)
    "fundus": ((0.05, 0.01, 0.0), (0.95, 0.55, 0.25)),
    "histology": ((0.45, 0.15, 0.45), (0.98, 0.80, 0.90)),
    "other": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def class_pattern(rng: np.random.Generator, k: int, n_classes: int, size: int, signal: float = 1.0) -> np.ndarray:
    """A size x size float image in [0, 1] whose structure depends on class ``k``.

    Each class-dependent quantity (orientation, frequency, brightness, contrast, number and
    size of blobs) is ``signal`` times its class value plus ``1 - signal`` times a value drawn
    for this image alone, so ``signal=1`` separates the classes fully and smaller values make
    them overlap.
    """
    t_class = k / max(1, n_classes - 1)  # 0 .. 1 across classes

    def mix(class_value: float) -> float:
        if signal >= 1.0:
            return class_value
        return signal * class_value + (1.0 - signal) * float(rng.uniform(0.0, 1.0))

    t = mix(t_class)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = np.pi * mix(k / n_classes) + rng.normal(0, 0.08)
    freq = 2.0 + 16.0 * mix(t_class) + rng.normal(0, 0.3)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    img = 0.20 + 0.45 * t + rng.normal(0, 0.02) + (0.08 + 0.20 * mix(t_class)) * stripes
    gx, gy = rng.normal(0, 0.08, size=2)
    img = img + gx * (xx - 0.5) + gy * (yy - 0.5)
    n_blobs = 1 + int(round(3 * (n_classes - 1) * mix(t_class)))
    centres = rng.uniform(0.15, 0.85, size=(n_blobs, 2))
    radius = (0.10 - 0.05 * mix(t_class)) * rng.uniform(0.8, 1.2, size=n_blobs)
    d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    img = img + 0.35 * np.exp(-d2 / (2 * radius[:, None, None] ** 2)).sum(axis=0)
    img = img + rng.normal(0, 0.04, size=img.shape)
    return np.clip(img, 0.0, 1.0)


def render(pattern: np.ndarray, modality: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 image: greyscale (H x W) for chest X-rays, tinted RGB (H x W x 3) otherwise."""
    size = pattern.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if modality == "chest-xray":
        # a darker rounded field, like a radiograph's exposure fall-off
        r2 = (yy - 0.5) ** 2 + ((xx - 0.5) * 0.8) ** 2
        img = pattern * (1.0 - 0.6 * np.clip(r2 * 3.0, 0, 1))
        return (img * 255).round().astype(np.uint8)
    lo, hi = (np.array(c, np.float32) for c in TINTS.get(modality, TINTS["other"]))
    rgb = lo + pattern[..., None] * (hi - lo)
    rgb = rgb * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    if modality == "fundus":  # circular field of view, black outside
        inside = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) <= 0.47 ** 2
        rgb = rgb * inside[..., None]
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def synthetic_image(rng: np.random.Generator, k: int, n_classes: int, size: int, modality: str,
                    signal: float = 1.0) -> np.ndarray:
    """One uint8 image of class ``k`` for ``modality`` (see :func:`class_pattern`)."""
    return render(class_pattern(rng, k, n_classes, size, signal), modality, rng)
