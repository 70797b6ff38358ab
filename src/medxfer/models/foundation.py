"""Checkpoint formats of the public medical foundation models (see the zoo's FOUNDATION specs).

* ``hf-dinov2``: a HuggingFace ``Dinov2Model`` state dict (``model.safetensors``: RAD-DINO,
  Phikon-v2). Names per transformers' ``modeling_dinov2.py``: ``embeddings.cls_token``,
  ``embeddings.position_embeddings``, ``embeddings.patch_embeddings.projection``,
  ``encoder.layer.N.{norm1, attention.attention.{query,key,value}, attention.output.dense,
  layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2, layer_scale2.lambda1}``, ``layernorm``;
  converted to the DINOv2 trunk (:mod:`medxfer.models.vit`), query/key/value concatenated
  into ``qkv`` in that order.
* ``mae``: an MAE pretraining checkpoint ``{'model': ..., 'optimizer', 'epoch', 'args'}``
  (RETFound's ``RETFound_cfp_weights.pth``, from the MAE code base): timm encoder names
  (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.attn.qkv``, ``norm``) plus
  the decoder (``mask_token``, ``decoder_*``), which the spec drops. RETFound's own finetuning
  loads it with ``global_pool=True`` and so expects ``head``/``fc_norm`` to be missing.
* ``xrv-pickle``: torchxrayvision's released weights are a whole pickled model
  (``torch.save(model)`` of ``torchxrayvision.models.DenseNet``, loaded upstream with
  ``weights_only=False``). medxfer reads it without torchxrayvision and without running any
  of its code: the restricted unpickler turns every ``torchxrayvision`` and ``torch.nn``
  class into an inert stand-in, and the tensors are collected from the module tree
  (``_parameters``/``_buffers``/``_modules``, non-persistent buffers skipped). Key names are
  torchvision's DenseNet's (``features.conv0`` with one input channel, ``classifier`` the
  18-pathology head, which the spec drops).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medxfer.models.checkpoint import CheckpointFormat, StateDict, as_state_dict, read_any, register_format
from medxfer.models.errors import CheckpointError
from medxfer.models.safe_pickle import Inert, torch_pickle_module

XRV_INERT = ("torchxrayvision", "torch.nn.modules")

_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_INNER = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}


def hf_dinov2_to_timm(sd: StateDict, source: str) -> StateDict:
    """HuggingFace Dinov2Model names -> DINOv2 trunk names (exact tensors; q, k, v stacked)."""
    out: StateDict = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = _HF_LAYER.match(k)
        if m is None:
            unknown.append(k)
            continue
        i, rest = int(m.group(1)), m.group(2)
        qm = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if qm:
            qkv.setdefault(i, {})[f"{qm.group(1)}.{qm.group(2)}"] = v
        elif rest in _HF_INNER:
            out[f"blocks.{i}.{_HF_INNER[rest]}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{source}: not a Dinov2Model state dict; unknown keys {sorted(unknown)[:10]}")
    for i, parts in qkv.items():
        for leaf in ("weight", "bias"):
            names = [f"{n}.{leaf}" for n in ("query", "key", "value")]
            missing = [n for n in names if n not in parts]
            if missing:
                raise CheckpointError(f"{source}: encoder.layer.{i} lacks attention.attention.{missing}")
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts[n] for n in names], dim=0)
    return out


def module_tree_state(obj: Any, source: str) -> StateDict:
    """Tensors of a whole pickled ``nn.Module`` read as inert stand-ins, by dotted name."""
    out: StateDict = {}

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, Inert):
            raise CheckpointError(f"{source}: expected a pickled module at {prefix or '<root>'}, got "
                                  f"{type(node).__name__}")
        state = node.__dict__.get("state")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{source}: module {prefix or '<root>'} has no pickled state")
        skip = set(state.get("_non_persistent_buffers_set") or ())
        for table in ("_parameters", "_buffers"):
            for name, t in (state.get(table) or {}).items():
                if t is None or (table == "_buffers" and name in skip):
                    continue
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{source}: {prefix}{name} is a {type(t).__name__}, not a tensor")
                out[prefix + name] = t.detach()
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(obj, "")
    return out


def read_module_pickle(path: Path) -> Any:
    """``torch.load`` of a whole pickled model with its framework classes as inert stand-ins."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=torch_pickle_module(str(path), inert=XRV_INERT))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read this pickled model: {exc}") from exc


def _extract_module(obj: Any, source: str) -> StateDict:
    if isinstance(obj, Inert):  # the stand-in of the pickled module (itself a dict subclass)
        return module_tree_state(obj, source)
    return as_state_dict(obj, source)  # a plain state dict of the same model is accepted too


for _fmt in (
    CheckpointFormat("hf-dinov2", "HuggingFace Dinov2Model state dict (model.safetensors or pytorch_model.bin)",
                     read=read_any, convert=hf_dinov2_to_timm),
    CheckpointFormat("mae", "MAE pretraining checkpoint {'model': timm ViT encoder + decoder, ...} (RETFound)",
                     unwrap=("model",)),
    CheckpointFormat("xrv-pickle", "torchxrayvision whole pickled model (torch.save(model)), read without "
                     "torchxrayvision through the restricted unpickler", read=read_module_pickle,
                     extract=_extract_module),
):
    register_format(_fmt)
