"""Whether reduced-precision autocast pays off on a device.

bf16 autocast on a CPU is fast only where the CPU computes bf16 natively (AVX-512 BF16, AMX; what
oneDNN reports as bf16 support). Elsewhere PyTorch emulates it: measured 7x *slower* than fp32
for a ResNet-18 training step on a 2-core AVX2 AMD EPYC (docs/benchmarks.md). So a requested
autocast is honoured on CUDA, and on a CPU only with native bf16; otherwise the work runs in fp32.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = ["autocast_pays_off", "cpu_has_native_bf16"]


@cache
def cpu_has_native_bf16() -> bool:
    """True when oneDNN reports bf16 support on this CPU (AVX-512 BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def autocast_pays_off(device: torch.device | str) -> bool:
    """Whether autocast on ``device`` is faster than fp32: CUDA yes, CPU with native bf16 yes,
    anything else no."""
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    return kind == "cpu" and cpu_has_native_bf16()
