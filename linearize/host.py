"""Host-process settings for CPU work: glibc's malloc kept from handing freed memory back to the kernel.

Every tensor of a few MB or more is, by glibc's default, a fresh `mmap` that the kernel zero-fills page by page
on first touch and unmaps on free; a training step allocates hundreds of them (activations, logits, their
gradients), so on a CPU a large share of a step goes to page faults. `keep_freed_memory()` makes malloc serve
every allocation from its heap and never trim it, so freed blocks are reused at the next step: measured on
SmolLM2-135M (benchmarks/throughput.py, 2 cores), the teacher forward +12%, stage attention +13%, stage
logits +62% tokens/s. The cost: the process holds its peak heap until it exits (what a training run needs
anyway). `linearize`'s command line and the benchmark scripts call it first; set LINEARIZE_SYSTEM_MALLOC=1
to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve every allocation from malloc's heap (no per-allocation mmap) and never trim the heap. Returns
    whether it applied: False off Linux/glibc, when LINEARIZE_SYSTEM_MALLOC=1, or when glibc refuses."""
    if os.environ.get("LINEARIZE_SYSTEM_MALLOC") == "1" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt takes a C int: 2**31 - 1 bytes of free heap top is never reached by a step's churn
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX). Without them torch emulates bf16
    products: on an AVX2-only EPYC (torch 2.13, 2 threads) a 576x1536 bf16 matmul ran at 14 GFLOP/s against
    140 in fp32; with AVX-512 BF16, about 950 against 200."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def slow_bf16_note(device_type: str, teacher_dtype: str, precision: str) -> str | None:
    """A warning for a recipe computing in bf16 on a CPU without bf16 instructions (None where it is fine)."""
    asks = [
        s
        for s, on in (
            ("teacher.dtype=bfloat16", teacher_dtype == "bfloat16"),
            ("train.precision=bf16", precision == "bf16"),
        )
        if on
    ]
    if device_type != "cpu" or not asks or cpu_multiplies_bf16():
        return None
    return (
        f"warning: {' and '.join(asks)} on a CPU without bf16 instructions (no AVX-512 BF16 or AMX): torch "
        "emulates bf16 products here, about 10x slower than fp32. For speed on this machine set "
        "teacher.dtype=float32 train.precision=fp32 (memory doubles for the frozen weights)."
    )
