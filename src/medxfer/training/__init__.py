"""The one seeded, resumable training loop shared by finetuning and pretraining, with its
schedules, checkpoints, seeded batches, precision policy and augmentations."""
from medxfer.training.batches import SeededBatches, load_batch
from medxfer.training.checkpoint import load_checkpoint, save_checkpoint, snapshot_state
from medxfer.training.loop import LoopState, Trainer
from medxfer.training.precision import autocast
from medxfer.training.schedule import cosine, cosine_value

__all__ = ["LoopState", "SeededBatches", "Trainer", "autocast", "cosine", "cosine_value", "load_batch",
           "load_checkpoint", "save_checkpoint", "snapshot_state"]
