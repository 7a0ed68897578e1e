"""Choosing an op's form: the one rule every op's `resolve_impl` follows."""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def importable(module: str) -> bool:
    """Whether `module` imports (checked once; only asked for CUDA tensors, so CPU users never import it)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def resolve_impl(
    impl: str, tensor: torch.Tensor, impls: tuple[str, ...], gpu_form: str, gpu_module: str
) -> str:
    """Map `impl` to a concrete form: "auto" is `gpu_form` for CUDA tensors when `gpu_module` imports, else
    "chunked". "auto" never picks the reference (a python loop over T or a quadratic form)."""
    if impl not in impls:
        raise ValueError(f"impl must be one of {', '.join(repr(i) for i in impls)}, got {impl!r}")
    if impl != "auto":
        return impl
    return gpu_form if tensor.is_cuda and importable(gpu_module) else "chunked"
