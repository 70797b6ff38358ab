"""Learning-rate and momentum schedules shared by finetuning and pretraining."""
from __future__ import annotations

import math

import torch


def cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing over ``total_steps`` (torch's ``CosineAnnealingLR``, which finetuning
    has always used), after an optional linear warm-up of ``warmup_steps`` from 1/warmup of
    the base rate. The scheduler is stepped once per optimiser step."""
    if warmup_steps <= 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    warmup_steps = min(warmup_steps, max(total_steps - 1, 1))
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1))
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, decay], milestones=[warmup_steps])


def cosine_value(step: int, total_steps: int, start: float, end: float) -> float:
    """A value moving from ``start`` (step 0) to ``end`` (step ``total_steps``) along a half
    cosine, e.g. BYOL's and DINO's teacher momentum 0.996 -> 1."""
    if total_steps <= 0:
        return end
    t = min(max(step, 0), total_steps) / total_steps
    return end - (end - start) * (math.cos(math.pi * t) + 1.0) / 2.0
