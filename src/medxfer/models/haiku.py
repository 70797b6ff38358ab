"""BYOL's JAX/Haiku ResNet-50 checkpoint -> torchvision names.

The published ``pretrain_res50x1.pkl`` is a pickle of
``{'experiment_state': (online_params, target_params, online_state, target_state, opt_state),
'step', 'rng'}`` where params/state map Haiku module paths to ``{name: array}``. We read it
with the restricted unpickler (numpy arrays, containers; jax arrays are rebuilt as numpy),
take the *online* network, flatten to ``"module/path/param"`` keys and rename.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medxfer.models.errors import CheckpointError
from medxfer.models.safe_pickle import Inert

StateDict = dict[str, torch.Tensor]

_BLOCK = r"^block_group_(?P<g>\d+)/~/block_(?P<b>\d+)/~/"

# Haiku module path (after the "res_net50/~/" prefix) -> torchvision module path.
_MODULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r) for p, r in (
        (r"^initial_conv$", "conv1"),
        (r"^initial_batchnorm$", "bn1"),
        (_BLOCK + r"conv_(?P<k>\d+)$", "layer{g}.{b}.conv{k}"),
        (_BLOCK + r"batchnorm_(?P<k>\d+)$", "layer{g}.{b}.bn{k}"),
        (_BLOCK + r"shortcut_conv$", "layer{g}.{b}.downsample.0"),
        (_BLOCK + r"shortcut_batchnorm$", "layer{g}.{b}.downsample.1"),
    )
)

# Haiku parameter / state leaf -> (torchvision tensor name, array -> tensor transform)
_LEAVES: dict[str, tuple[str, Any]] = {
    "w": ("weight", lambda a: a.permute(3, 2, 0, 1)),  # conv kernel HWIO -> OIHW
    "scale": ("weight", lambda a: a.reshape(-1)),  # BN (1,1,1,C) -> (C,)
    "offset": ("bias", lambda a: a.reshape(-1)),
    "~/mean_ema/average": ("running_mean", lambda a: a.reshape(-1)),
    "~/var_ema/average": ("running_var", lambda a: a.reshape(-1)),
}
_IGNORED_LEAVES = ("~/mean_ema/counter", "~/mean_ema/hidden", "~/var_ema/counter", "~/var_ema/hidden")


def _torch_module(haiku_module: str) -> str | None:
    for pattern, repl in _MODULES:
        m = pattern.match(haiku_module)
        if m:
            d = m.groupdict()
            return repl.format(g=int(d.get("g") or 0) + 1, b=int(d.get("b") or 0), k=int(d.get("k") or 0) + 1)
    return None


def haiku_to_torchvision(sd: StateDict, source: str) -> StateDict:
    """Rename flattened Haiku ResNet keys (prefix already stripped) to torchvision's."""
    out: StateDict = {}
    unknown: list[str] = []
    for key, value in sd.items():
        leaf = next((lf for lf in (*_LEAVES, *_IGNORED_LEAVES) if key.endswith("/" + lf)), None)
        module = _torch_module(key[: -len(leaf) - 1]) if leaf else None
        if leaf is None or module is None:
            unknown.append(key)
            continue
        if leaf in _IGNORED_LEAVES:
            continue
        name, transform = _LEAVES[leaf]
        out[f"{module}.{name}"] = transform(value).contiguous()
    if unknown:
        more = f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else ""
        raise CheckpointError(f"{source}: unknown Haiku parameters {sorted(unknown)[:20]}{more}")
    return out


def _fields(state: Any) -> Sequence[Any]:
    """The five fields of the experiment state, whatever container the pickle used."""
    if isinstance(state, Inert):
        return state.args
    if isinstance(state, Mapping):
        return [state.get(f) for f in ("online_params", "target_params", "online_state", "target_state", "opt_state")]
    if isinstance(state, Sequence):
        return state
    raise CheckpointError(f"unexpected experiment_state container {type(state).__name__}")


def _flatten(tree: Any, prefix: str, out: StateDict, source: str) -> None:
    if isinstance(tree, Inert) and len(tree) == 0 and tree.args and isinstance(tree.args[0], Mapping):
        tree = tree.args[0]  # a mapping class pickled as cls(dict)
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _flatten(v, f"{prefix}/{k}" if prefix else str(k), out, source)
    elif isinstance(tree, np.ndarray | np.generic):
        out[prefix] = torch.from_numpy(np.array(tree, dtype=np.float32, copy=True))
    else:
        raise CheckpointError(f"{source}: unexpected {type(tree).__name__} at {prefix!r} in BYOL checkpoint")


def extract_byol(obj: Any, source: str) -> StateDict:
    """Online params + online state of a BYOL checkpoint, flattened to ``a/~/b/param`` keys."""
    if not isinstance(obj, Mapping) or "experiment_state" not in obj:
        raise CheckpointError(f"{source}: expected a dict with 'experiment_state' (BYOL Haiku pickle)")
    fields = _fields(obj["experiment_state"])
    if len(fields) < 3:
        raise CheckpointError(f"{source}: experiment_state has {len(fields)} fields, expected 5")
    out: StateDict = {}
    _flatten(fields[0], "", out, source)  # online_params
    _flatten(fields[2], "", out, source)  # online_state (BN running statistics)
    return out
