"""In-domain self-supervised pretraining: continue a zoo backbone (or a random one) with MoCo v2,
SimCLR, BYOL or DINO on your own unlabelled images, register it as a model, and evaluate it
beside its parent with the same protocols and statistics.

The methods' losses, heads and momentum updates come from lightly (an extra:
``pip install "medxfer[pretrain]"``); the loop is medxfer's (:mod:`medxfer.training`): seeded,
resumable to identical weights, AMP and channels-last on CUDA, cosine schedule with warm-up,
gradient accumulation. Views are cropped from whole-image stores decoded once
(:mod:`medxfer.pretrain.data`) with per-modality augmentations
(:data:`medxfer.training.augment.VIEW_POLICIES`).
"""
from medxfer.pretrain.core import PretrainOutcome, PretrainParams, loss_curve_text, pretrain
from medxfer.pretrain.data import parse_data, unlabelled_images
from medxfer.pretrain.methods import METHODS

__all__ = ["METHODS", "PretrainOutcome", "PretrainParams", "loss_curve_text", "parse_data", "pretrain",
           "unlabelled_images"]
