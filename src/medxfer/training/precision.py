"""The arithmetic a training step runs in: fp32, or bf16/fp16 autocast (fp16 with a gradient
scaler). It changes the numbers, so its name enters run keys and checkpoint keys."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from medxfer.errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 / AMX), where bf16 autocast pays."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device | str, precision: str) -> tuple[AbstractContextManager, torch.amp.GradScaler | None]:
    """(autocast context, gradient scaler or None) for ``precision`` on ``device``."""
    dev = torch.device(device)
    if precision == "fp32":
        return nullcontext(), None
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16), None
    if precision == "fp16":
        if dev.type != "cuda":
            raise UsageError("fp16 training needs a CUDA device (use bf16 or fp32 on a CPU)")
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def cuda_amp_name(device: torch.device | str) -> str:
    """Mixed precision on CUDA: bf16 where the GPU supports it, else fp16."""
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
