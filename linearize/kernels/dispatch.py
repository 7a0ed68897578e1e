"""Choosing an op's form: the one rule every op's `resolve_impl` follows."""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


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


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, total: int) -> list[int]:
    """Validate packed-sequence offsets for a [1, total, ...] batch; returns them as a list."""
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch must be 1 packed row, got B = {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or len(cu_seqlens) < 2:
        raise ValueError(
            f"cu_seqlens must be a 1D integer tensor [N+1], got {cu_seqlens.dtype} {list(cu_seqlens.shape)}"
        )
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(
            f"cu_seqlens must rise strictly (no empty sequence) from 0 to T = {total}, the packed length; "
            f"got {offsets[:4]}...{offsets[-2:]}"
        )
    return offsets


def over_sequences(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...] | None]],
    tensors: Sequence[torch.Tensor],
    cu_seqlens: torch.Tensor,
    initial_state: torch.Tensor | tuple[torch.Tensor, ...] | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...] | None]:
    """Variable-length batches on the torch forms: run `fn(*tensors_of_one_sequence, initial_state=...,
    output_final_state=True)` on each packed sequence of a [1, T, ...] batch, each from its own initial state
    (a tensor [N, ...] or a tuple of them, or None), and concatenate the outputs along T. Returns
    (o [1, T, ...], final states stacked to [N, ...] (a tuple when the op's state is a tuple) or None)."""
    offsets = check_cu_seqlens(cu_seqlens, tensors[0].shape[0], tensors[0].shape[1])
    n = len(offsets) - 1
    if initial_state is not None:
        parts = initial_state if isinstance(initial_state, tuple) else (initial_state,)
        if any(p.shape[0] != n for p in parts):
            raise ValueError(
                f"with cu_seqlens of {n} sequences, initial_state needs {n} rows (one per sequence), "
                f"got {[p.shape[0] for p in parts]}"
            )
    outs, finals = [], []
    for i, (start, end) in enumerate(zip(offsets, offsets[1:])):
        state = None
        if initial_state is not None:
            state = (
                tuple(p[i : i + 1] for p in initial_state)
                if isinstance(initial_state, tuple)
                else initial_state[i : i + 1]
            )
        o, final = fn(*(x[:, start:end] for x in tensors), initial_state=state, output_final_state=True)
        outs.append(o)
        finals.append(final)
    o = torch.cat(outs, dim=1)
    if not output_final_state:
        return o, None
    if isinstance(finals[0], tuple):
        return o, tuple(torch.cat(parts, dim=0) for parts in zip(*finals))
    return o, torch.cat(finals, dim=0)
