"""Errors raised while fetching, reading and converting checkpoints."""
from __future__ import annotations

from medxfer.errors import MedxferError, UsageError


class CheckpointError(UsageError):
    """A checkpoint file that cannot be read or does not fit the model (message names the file)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for a global outside the allowlist; nothing from it was executed."""


class WeightsUnavailableError(MedxferError, RuntimeError):
    """Pretrained weights are neither cached nor downloadable (e.g. offline)."""


class DownloadError(MedxferError, RuntimeError):
    """A download failed or its content does not match the published hash."""


class HashMismatchError(DownloadError):
    """A file whose digest differs from the published one (wrong, truncated or tampered)."""
