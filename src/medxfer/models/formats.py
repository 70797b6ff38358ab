"""The published checkpoint layouts medxfer can convert (see MODEL_ZOO.md).

Prefix and heads are per model (``ModelSpec.prefix`` / ``ModelSpec.drop``); a format says how
to read the file, which container to unwrap and which renaming to apply.
"""
from __future__ import annotations

from medxfer.models.checkpoint import CheckpointFormat, read_any, register_format
from medxfer.models.haiku import extract_byol, haiku_to_torchvision
from medxfer.models.safe_pickle import load_pickle

FORMATS_BUILTIN = (
    CheckpointFormat("torchvision", "flat torchvision state dict (torch.hub / download.pytorch.org)"),
    CheckpointFormat("moco", "MoCo / MoCo-CXR training dict {'epoch','arch','state_dict','optimizer'}",
                     unwrap=("state_dict",)),
    CheckpointFormat("pycontrast", "PyContrast (PIRL) dict {'model','contrast','optimizer','epoch'}",
                     unwrap=("model",)),
    CheckpointFormat("swav", "SwAV / DINO / Barlow Twins / VICReg hub file: flat, optionally under 'state_dict'",
                     unwrap=("state_dict",)),
    CheckpointFormat("simclr-converted", "SimCLR-v1 TF checkpoint converted by tonylins/simclr-converter: "
                     "{'state_dict': torchvision names}", unwrap=("state_dict",)),
    CheckpointFormat("lightning", "PyTorch Lightning checkpoint (read without Lightning): ['state_dict']",
                     unwrap=("state_dict",)),
    CheckpointFormat("byol-haiku", "BYOL JAX/Haiku pickle (restricted unpickler), online network",
                     read=load_pickle, extract=extract_byol, convert=haiku_to_torchvision),
    CheckpointFormat("dinov2", "DINOv2 backbone state dict (flat, timm-style ViT names)"),
    CheckpointFormat("auto", "a user's checkpoint (.pth/.pt, or .safetensors): flat or under 'state_dict'/'model'",
                     read=read_any, unwrap=("state_dict", "model")),
    CheckpointFormat("safetensors", "a flat headless trunk state dict in safetensors (what medxfer writes)",
                     read=read_any),
)

for _fmt in FORMATS_BUILTIN:
    register_format(_fmt)
