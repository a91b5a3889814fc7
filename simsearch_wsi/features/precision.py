"""Whether reduced-precision autocast pays off on a device.

bf16 autocast on a CPU is fast only where the CPU computes bf16 natively (the AVX512-BF16 or AMX
instructions). Elsewhere PyTorch emulates it: measured 7-15x *slower* than fp32 on a 2-core AVX2
AMD EPYC (docs/benchmarks.md). So a requested autocast is honoured on CUDA (bf16 only on GPUs
that support it) and on a CPU only with native bf16; otherwise the work runs in fp32.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = ["autocast_pays_off", "cpu_has_native_bf16"]


@cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has the AVX512-BF16 or AMX instructions (plain AVX-512 is not
    enough: oneDNN accepts it but emulates bf16 there)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a build without these queries
        return False


def autocast_pays_off(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether autocast to ``dtype`` on ``device`` is faster than fp32: on CUDA yes (bf16 only
    where the GPU supports it), on a CPU only with native bf16, elsewhere no."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and cpu_has_native_bf16()
