"""The one place that picks the compute device."""
from __future__ import annotations

import torch


def resolve_device(device: str | None = None) -> str:
    """``device`` as given, or ``"cuda"`` when available, else ``"cpu"``."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def fast_bf16_matmul(device: str | torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bfloat16 matrix products are markedly faster than float32 on ``device``: CUDA
    with bf16 support, or a CPU with AVX512-BF16 / AMX-BF16 (read from ``cpuinfo``; ``False``
    where that file does not exist). Without those instructions bf16 products are emulated and
    slower than float32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
