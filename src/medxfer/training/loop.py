"""The one seeded, resumable training loop (finetuning and pretraining share it).

:class:`Trainer` owns the optimiser step: zero the gradients, accumulate the losses of
``accumulate`` micro-batches (each scaled by 1/accumulate, so a large effective batch fits a
small GPU), optionally clip, step the optimiser (through the gradient scaler for fp16) and
the schedule. Callers provide the loss of one micro-batch and hooks for what happens after an
update (a momentum teacher), after a step (validation, early stopping) and at a checkpoint.

Checkpoints are atomic and keyed. They hold the module's parameters and buffers (the
non-persistent ones too, e.g. a memory bank), the optimiser, schedule, gradient scaler, the
named generators' states, the step and the caller's extra state, so a killed run resumes to
exactly the numbers of an uninterrupted one on the same device. Batch samplers are replayed
from their seed by the caller (:meth:`medxfer.training.batches.SeededBatches.skip`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medxfer.progress import bar
from medxfer.training.checkpoint import (
    load_checkpoint,
    nonpersistent_buffers,
    restore_buffers,
    save_checkpoint,
    snapshot_state,
)
from medxfer.training.precision import autocast

log = logging.getLogger(__name__)

LossFn = Callable[[int, int], torch.Tensor]  # (step, micro-batch) -> loss of that micro-batch
StepHook = Callable[[int, float], bool]  # (step done, mean loss) -> stop?


@dataclass
class LoopState:
    """Where a run is: steps done, the step it resumed from (None: from scratch) and the
    caller's extra state restored from the checkpoint."""

    step: int = 0
    resumed_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False


class Trainer:
    """See the module docstring. ``generators`` are the named local generators whose states
    must survive a resume (augmentation); ``precision`` is ``"fp32"``, ``"bf16"`` or ``"fp16"``."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, *, device: torch.device, max_steps: int,
                 key: str, checkpoint_path: Path | None = None, generators: dict[str, torch.Generator] | None = None,
                 precision: str = "fp32", accumulate: int = 1, clip_grad: float | None = None, desc: str = "train",
                 on_checkpoint: Callable[[int], None] | None = None,
                 diverged: Callable[[int, float], str] | None = None) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.max_steps = max_steps
        self.key = key
        self.checkpoint_path = checkpoint_path
        self.generators = dict(generators or {})
        self.precision = precision
        self.autocast, self.scaler = autocast(device, precision)
        self.accumulate = accumulate
        self.clip_grad = clip_grad
        self.desc = desc
        self.on_checkpoint = on_checkpoint
        self.diverged = diverged or (lambda step, loss: f"{desc} diverged at step {step} (loss {loss})")
        self.state = LoopState()

    # ------------------------------------------------------------------ checkpoints
    def resume(self) -> LoopState:
        """Load the checkpoint when it matches the key; returns the state (step 0 without one)."""
        ck = load_checkpoint(self.checkpoint_path, self.key, self.desc)
        if ck is None:
            return self.state
        self.module.load_state_dict(ck["module"])
        restore_buffers(self.module, ck.get("buffers", {}))
        self.optimizer.load_state_dict(ck["opt"])
        self.scheduler.load_state_dict(ck["sched"])
        for name, g in self.generators.items():
            g.set_state(ck["generators"][name])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.state = LoopState(step=int(ck["step"]), resumed_from=int(ck["step"]), extra=dict(ck["extra"]))
        log.info("%s: resuming at step %d from %s", self.desc, self.state.step, self.checkpoint_path)
        return self.state

    def save(self, extra: dict[str, Any]) -> None:
        """Write the checkpoint now (atomically) and call ``on_checkpoint(step)``."""
        if self.checkpoint_path is None:
            return
        save_checkpoint(self.checkpoint_path, {
            "key": self.key, "module": snapshot_state(self.module), "buffers": nonpersistent_buffers(self.module),
            "opt": self.optimizer.state_dict(), "sched": self.scheduler.state_dict(),
            "generators": {n: g.get_state() for n, g in self.generators.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.state.step, "extra": extra,
        })
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.state.step)

    # ------------------------------------------------------------------ the loop
    def run(self, loss_fn: LossFn, *, checkpoint_at: Callable[[int], bool],
            extra_state: Callable[[], dict[str, Any]] = dict,
            after_update: Callable[[int], None] | None = None, after_step: StepHook | None = None) -> LoopState:
        """Train from ``self.state.step`` to ``max_steps`` (or until ``after_step`` says stop).

        Per step: ``loss_fn(step, micro)`` for each micro-batch (inside autocast), backward,
        optimiser and schedule step, ``after_update(step)``, ``after_step(step, mean loss)``,
        then a checkpoint when ``checkpoint_at(step)``.
        """
        st = self.state
        self.module.train()
        steps = bar(total=self.max_steps, initial=st.step, desc=self.desc, unit="step")
        try:
            while st.step < self.max_steps:
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for micro in range(self.accumulate):
                    with self.autocast:
                        loss = loss_fn(st.step, micro)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(self.diverged(st.step, loss.item()))
                    part = loss / self.accumulate if self.accumulate > 1 else loss
                    (self.scaler.scale(part) if self.scaler is not None else part).backward()
                    total += float(loss.item())
                if self.clip_grad is not None:
                    if self.scaler is not None:
                        self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
                st.step += 1
                if after_update is not None:
                    after_update(st.step)
                steps.update(1)
                stop = after_step(st.step, total / self.accumulate) if after_step is not None else False
                if checkpoint_at(st.step):
                    self.save(extra_state())
                if stop:
                    st.stopped = True
                    break
        finally:
            steps.close()
        return st
