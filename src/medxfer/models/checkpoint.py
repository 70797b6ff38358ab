"""One checkpoint pipeline for every format.

read -> unwrap the container -> keep the model's prefix (and strip it) -> drop heads by
prefix -> format converter -> DenseNet legacy-key fix -> strict load into the headless
trunk, tolerating only missing ``num_batches_tracked``. Anything else missing, unexpected
or mis-shaped is a :class:`CheckpointError` that lists the keys and names the file.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medxfer.models.errors import CheckpointError, UnsafeCheckpointError
from medxfer.models.safe_pickle import torch_pickle_module
from medxfer.registry import Registry

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
CONVERTER_VERSION = 1  # bump when a conversion changes its output (keys the converted cache)


# ----------------------------------------------------------------------------- reading
def read_torch(path: str | os.PathLike[str]) -> Any:
    """``torch.load(weights_only=True)``; if the file holds extra non-tensor objects (e.g.
    Lightning hyper-parameters), retry through the restricted unpickler, which turns known
    framework classes into inert stand-ins and refuses everything else."""
    path = Path(path)
    _check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        log.info("%s: weights_only load refused (%s); retrying with the restricted unpickler",
                 path, str(exc).splitlines()[0])
        try:
            return torch.load(path, map_location="cpu", weights_only=False,
                              pickle_module=torch_pickle_module(str(path)))
        except CheckpointError:
            raise
        except Exception as exc2:
            raise CheckpointError(f"{path}: cannot read checkpoint: {exc2}") from exc2
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {exc}") from exc


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")


def read_converted(path: str | os.PathLike[str]) -> StateDict:
    """A converted trunk state dict from ``.safetensors`` or a torch file (``weights_only``)."""
    path = Path(path)
    _check_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
    obj = read_torch(path)
    return as_state_dict(unwrap(obj, ("state_dict", "model")), str(path))


def read_any(path: str | os.PathLike[str]) -> Any:
    """A ``.safetensors`` file as its tensors, anything else through :func:`read_torch`."""
    path = Path(path)
    return read_converted(path) if path.suffix == ".safetensors" else read_torch(path)


# ----------------------------------------------------------------------------- pipeline steps
def unwrap(obj: Any, keys: tuple[str, ...]) -> Any:
    """Descend into the first of ``keys`` that is present (``()`` means the object is flat)."""
    for key in keys:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def as_state_dict(obj: Any, source: str) -> StateDict:
    """Check that ``obj`` is a flat name -> tensor mapping; error names offending keys."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict (mapping), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{source}: expected a flat name -> tensor state dict, but {len(bad)} entries are not tensors "
            f"(e.g. {bad[:5]}); is the container/format right?"
        )
    return dict(obj)


def keep_prefix(sd: StateDict, prefix: str, source: str) -> StateDict:
    """Keep the keys starting with ``prefix`` and strip it (drops momentum encoders, queues...)."""
    if not prefix:
        return dict(sd)
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(
            f"{source}: no key starts with the expected prefix {prefix!r}; first keys: {sorted(sd)[:8]}"
        )
    return out


def drop_heads(sd: StateDict, heads: tuple[str, ...]) -> StateDict:
    """Remove keys that start with any head prefix (prefix match, never substring)."""
    return {k: v for k, v in sd.items() if not any(k.startswith(h) for h in heads)}


_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def fix_densenet_legacy(sd: StateDict) -> StateDict:
    """``denselayerN.norm.1.weight`` -> ``denselayerN.norm1.weight`` (no-op for modern keys)."""
    out: StateDict = {}
    for k, v in sd.items():
        m = _DENSENET_LEGACY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


# ----------------------------------------------------------------------------- formats
Reader = Callable[[Path], Any]
Converter = Callable[[StateDict, str], StateDict]


def _identity(sd: StateDict, source: str) -> StateDict:
    return sd


@dataclass(frozen=True)
class CheckpointFormat:
    """How to read one published checkpoint layout.

    ``read`` turns the file into Python objects; ``extract`` turns those into a flat
    name -> tensor dict (default: unwrap ``unwrap`` keys, then check); ``convert`` renames
    framework names to torchvision names after prefix/head stripping.
    """

    name: str
    description: str
    read: Reader = read_torch
    unwrap: tuple[str, ...] = ()
    extract: Callable[[Any, str], StateDict] | None = None
    convert: Converter = _identity

    def state_dict(self, path: Path) -> StateDict:
        obj = self.read(path)
        if self.extract is not None:
            return self.extract(obj, str(path))
        return as_state_dict(unwrap(obj, self.unwrap), str(path))


FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format")


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    return FORMATS.register(fmt.name, fmt)


def convert_checkpoint(path: str | os.PathLike[str], spec: Any) -> StateDict:
    """Run the full pipeline for ``spec`` on ``path``; return the loaded trunk's state dict.

    The result is the headless trunk exactly as converted (``num_batches_tracked``
    included, float tensors in the trunk's dtype), ready to be cached.
    """
    path = Path(path)
    fmt = FORMATS.get(spec.fmt)
    source = f"{path} ({spec.name}, format {fmt.name})"
    sd = fmt.state_dict(path)
    sd = keep_prefix(sd, spec.prefix, source)
    sd = drop_heads(sd, spec.drop)
    sd = fmt.convert(sd, source)
    sd = fix_densenet_legacy(sd)
    return dict(trunk_from_state(spec.arch, sd, source=source).state_dict())


def trunk_from_state(arch: str, sd: Mapping[str, torch.Tensor], *, source: str, check_finite: bool = True) -> nn.Module:
    """Build the ``arch`` trunk directly from ``sd`` (no wasted random initialisation).

    The trunk is created on the meta device, checked strictly against ``sd`` (see
    :func:`load_trunk_state`) and its tensors are then assigned from ``sd``.
    """
    from medxfer.models.backbone import ARCHS

    with torch.device("meta"):
        trunk = ARCHS.get(arch).build()
    expected = trunk.state_dict()
    check_state(trunk, expected, sd, source=source, check_finite=check_finite)
    full = {}
    for k, v in expected.items():
        t = sd[k] if k in sd else torch.zeros(v.shape, dtype=v.dtype)  # only num_batches_tracked
        full[k] = t.to(dtype=v.dtype).contiguous()
    trunk.load_state_dict(full, strict=True, assign=True)
    return trunk


def load_trunk_state(trunk: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str,
                     check_finite: bool = True) -> None:
    """Strictly load ``sd`` into ``trunk``; only missing ``num_batches_tracked`` is tolerated.

    ``check_finite`` also refuses NaN/inf weights (skipped for our own verified cache files).
    """
    expected = trunk.state_dict()
    check_state(trunk, expected, sd, source=source, check_finite=check_finite)
    with torch.no_grad():
        for k, v in expected.items():
            if k in sd:
                v.copy_(sd[k].to(dtype=v.dtype))


def check_state(trunk: nn.Module, expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], *,
                source: str, check_finite: bool = True) -> None:
    """Raise :class:`CheckpointError` listing missing / unexpected / mis-shaped / non-finite keys."""
    missing = sorted(k for k in expected if k not in sd and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in sd if k not in expected)
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or shapes:
        parts = [f"{source}: checkpoint does not match the {type(trunk).__name__} trunk"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                more = f" ... (+{len(keys) - 20} more)" if len(keys) > 20 else ""
                parts.append(f"{len(keys)} {label}: {keys[:20]}{more}")
        raise CheckpointError("; ".join(parts))
    if check_finite:
        nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not _all_finite(v)]
        if nonfinite:
            raise CheckpointError(f"{source}: non-finite values in {nonfinite[:10]}")


def _all_finite(t: torch.Tensor) -> bool:
    if t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    # numpy's single-threaded check is ~100x faster than torch's on a busy CPU
    a = t.detach()
    if a.dtype not in (torch.float32, torch.float64, torch.float16):
        a = a.float()  # bfloat16 has no numpy dtype
    return bool(np.isfinite(a.numpy()).all())


def save_converted(path: str | os.PathLike[str], sd: StateDict, metadata: dict[str, str]) -> None:
    """Write a converted trunk atomically as safetensors with provenance metadata."""
    from safetensors.torch import save_file

    from medxfer.cache import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)


__all__ = [
    "CONVERTER_VERSION", "CheckpointError", "CheckpointFormat", "FORMATS", "UnsafeCheckpointError",
    "as_state_dict", "convert_checkpoint", "drop_heads", "fix_densenet_legacy", "keep_prefix",
    "load_trunk_state", "read_any", "read_converted", "trunk_from_state", "check_state", "read_torch", "register_format",
    "save_converted", "unwrap",
]
