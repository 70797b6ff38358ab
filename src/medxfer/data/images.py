"""Opening one image, wherever it is stored, with clear errors naming the file.

A record path is a file path, or ``"<file>#<key>/<index>"`` for an image stored at
``array[key][index]`` inside an ``.npz`` file (MedMNIST).
"""
from __future__ import annotations

import functools
import threading

import numpy as np
from PIL import Image, UnidentifiedImageError

from medxfer.data.records import DatasetError

_NPZ_LOCK = threading.Lock()
SIXTEEN_BIT_RANGE = 65535  # 16-bit greyscale is scaled by 255 / range, the same for every image


class ImageReadError(DatasetError):
    """An image file is missing or cannot be decoded."""


def split_array_path(path: str) -> tuple[str, str, int] | None:
    """``"f.npz#train_images/3"`` -> ``("f.npz", "train_images", 3)``; plain paths -> None."""
    if "#" not in path:
        return None
    file, _, ref = path.partition("#")
    key, _, idx = ref.rpartition("/")
    if not key or not idx.isdigit():
        raise ImageReadError(f"{path}: malformed array reference (expected FILE#KEY/INDEX)")
    return file, key, int(idx)


@functools.lru_cache(maxsize=8)
def _npz_array(file: str, key: str) -> np.ndarray:
    with np.load(file, allow_pickle=False) as z:
        if key not in z.files:
            raise ImageReadError(f"{file}: no array {key!r} (has {', '.join(z.files)})")
        return z[key]


def open_image(path: str, draft_size: int | None = None, high_range: int = SIXTEEN_BIT_RANGE) -> Image.Image:
    """Decode ``path`` fully into a PIL image (mode L or RGB).

    ``draft_size``: for JPEGs, let the decoder downscale by a power of two while keeping the
    shorter side >= ``draft_size`` (much faster for large photographs; the final resize is
    done by the caller). ``high_range``: the raw value that 16-bit greyscale maps to 255
    (the format's 65535 by default; a dataset with a known narrower range, e.g. a 12-bit
    scanner, declares it), identically for every image. Raises :class:`ImageReadError`
    naming the file on any failure.
    """
    ref = split_array_path(path)
    if ref is not None:
        file, key, idx = ref
        try:
            with _NPZ_LOCK:
                arr = _npz_array(file, key)
        except (OSError, ValueError) as exc:
            raise ImageReadError(f"{file}: cannot read array file: {exc}") from exc
        if idx >= len(arr):
            raise ImageReadError(f"{path}: index {idx} out of range ({len(arr)} images)")
        return array_to_image(arr[idx], where=path)
    try:
        img = Image.open(path)
        if draft_size is not None and img.format == "JPEG":
            w, h = img.size
            scale = min(w, h) / draft_size
            if scale >= 2:
                img.draft(img.mode if img.mode in ("L", "RGB") else "RGB",
                          (max(1, int(w / scale)), max(1, int(h / scale))))
        img.load()
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot decode image: {exc}") from exc
    return to_l_or_rgb(img, high_range)


def to_l_or_rgb(img: Image.Image, high_range: int = SIXTEEN_BIT_RANGE) -> Image.Image:
    """Greyscale stays single-channel (L); everything else becomes RGB. 16/32-bit greyscale
    is scaled by ``255 / high_range`` and clipped to [0, 255]: a raw value means the same
    grey level in every image (never scaled by the image's own maximum)."""
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scaled = np.clip(arr * (255.0 / high_range), 0.0, 255.0)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if img.mode in ("1", "P", "LA") and _is_grey(img):
        return img.convert("L")
    return img.convert("RGB")


def _is_grey(img: Image.Image) -> bool:
    if img.mode in ("1", "LA"):
        return True
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def array_to_image(arr: np.ndarray, where: str = "array") -> Image.Image:
    """H x W or H x W x {1,3} array (uint8, or float in [0,1]) -> PIL image (L or RGB)."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = (a * 255.0).round()
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return Image.fromarray(a, mode="L")
    if a.ndim == 3 and a.shape[2] == 3:
        return Image.fromarray(a, mode="RGB")
    raise ImageReadError(f"{where}: expected H x W or H x W x 3 image array, got shape {a.shape}")


def image_header(path: str) -> tuple[int, tuple[int, int]]:
    """(1 for greyscale else 3, (width, height)), read from the header only where possible."""
    ref = split_array_path(path)
    if ref is not None:
        img = open_image(path)
        return (1 if img.mode == "L" else 3), img.size
    try:
        with Image.open(path) as img:
            mode, size = img.mode, img.size
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"{path}: cannot decode image: {exc}") from exc
    return (1 if mode in ("L", "1", "I;16", "I;16B", "I;16L", "I", "LA") else 3), size


def image_channels(path: str) -> int:
    """1 for greyscale, 3 otherwise, read from the header only where possible."""
    return image_header(path)[0]
