"""Hardware-dependent speed choices, resolved at run time and recorded in results.json."""
from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast only with native support (AVX512-BF16 or AMX); emulated bf16 is ~100x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision, accelerator: str) -> str:
    """`auto`: bf16 autocast where the hardware runs it natively, else full fp32 (and the run records which)."""
    if precision not in (None, "auto"):
        return str(precision)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"
