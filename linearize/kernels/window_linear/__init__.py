"""Sliding-window softmax + linear attention over older keys in one op (LoLCATs' hybrid attention).
See README.md.

triton is imported only inside the call that needs it, so importing this package stays light.
"""

import os

import torch

from .. import dispatch
from .chunked import (
    WindowLinearState,
    check_window_linear_args,
    empty_window_linear_state,
    window_linear_chunked,
)
from .reference import window_linear_reference
from .step import window_linear_step as _step

__all__ = [
    "IMPLS",
    "WindowLinearState",
    "empty_window_linear_state",
    "resolve_impl",
    "window_linear",
    "window_linear_chunked",
    "window_linear_reference",
    "window_linear_step",
]

IMPLS = ("auto", "chunked", "reference", "triton")


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """ "auto" is our Triton kernel for CUDA tensors (when triton imports), else "chunked"; never the reference."""
    return dispatch.resolve_impl(impl, tensor, IMPLS, gpu_form="triton", gpu_module="triton")


def window_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    window: int,
    window_factor: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
    initial_state: WindowLinearState | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, WindowLinearState | None]:
    """Sliding-window softmax + linear attention over a whole sequence. For query t:

        o_t = (Σ_{t-W<s<=t} w e^{s_ts - m_t} v_s + Σ_{s<=t-W} (1-w) (fq_t·fk_s) v_s) / (same with v_s = 1, + eps)

    with s_ts = scale q_t·k_s and m_t the max of s_ts over the window.
    q, k: [B, T, H, D] (raw, post-RoPE); fq, fk: [B, T, H, F] (feature-mapped, non-negative);
    v: [B, T, H, V]; all of one floating dtype. window: W >= 1 (the current token included).
    window_factor: [H], in (0, 1) (already sigmoid-ed); differentiable. scale: None means D ** -0.5.
    initial_state: WindowLinearState (see chunked.py) or None.
    impl: "auto" | "chunked" | "reference" | "triton" (see resolve_impl). chunk_size: used by "chunked".
    Returns o: [B, T, H, V] in v.dtype, and the final WindowLinearState when output_final_state, else None.
    Math runs in float32 (float64 for float64 inputs) whatever the input dtype.
    """
    impl = resolve_impl(impl, q)
    check_window_linear_args(q, k, v, fq, fk, window, window_factor, initial_state)
    kwargs = dict(
        window=window,
        window_factor=window_factor,
        scale=scale,
        eps=eps,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    if impl == "chunked":
        return window_linear_chunked(q, k, v, fq, fk, chunk_size=chunk_size, **kwargs)
    if impl == "reference":
        return window_linear_reference(q, k, v, fq, fk, **kwargs)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not all(x.is_cuda for x in (q, k, v, fq, fk)) and not interpreting:
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got q on {q.device}"
        )
    from .triton import window_linear_triton

    return window_linear_triton(q, k, v, fq, fk, **kwargs)


def window_linear_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    state: WindowLinearState | None,
    *,
    window: int,
    window_factor: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, WindowLinearState]:
    """Advance by one token with a fixed-size state (W window slots + the linear state).

    q, k: [B, 1, H, D]; fq, fk: [B, 1, H, F]; v: [B, 1, H, V]; state: WindowLinearState or None (empty
    history); window_factor: [H] in (0, 1).
    Returns o: [B, 1, H, V] in v.dtype and the new WindowLinearState (same shapes as the old one). It
    continues exactly from `window_linear(..., output_final_state=True)`'s final state.
    """
    check_window_linear_args(q, k, v, fq, fk, window, window_factor, state, state_name="state", tokens="1")
    if state is None:
        state = empty_window_linear_state(q, v, fq, window)
    return _step(q, k, v, fq, fk, state, window=window, window_factor=window_factor, scale=scale, eps=eps)
