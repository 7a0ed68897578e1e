"""Gated linear attention (GLA): S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ, o_t = scale · q_tᵀ S_t.
Semantics are fla's `chunk_gla` / `fused_recurrent_gla`. See README.md.

fla (and with it triton) is imported only inside the call that needs it, so importing this package stays
light.
"""

import torch

from .. import dispatch
from .chunked import check_gated_linear_attn_args, gated_linear_attn_chunked
from .reference import gated_linear_attn_reference
from .step import gated_linear_attn_step

__all__ = [
    "IMPLS",
    "gated_linear_attn",
    "gated_linear_attn_chunked",
    "gated_linear_attn_reference",
    "gated_linear_attn_step",
    "resolve_impl",
]

IMPLS = ("auto", "chunked", "reference", "fla")


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """ "auto" is "fla" for CUDA tensors when fla imports, else "chunked"; never the reference."""
    return dispatch.resolve_impl(impl, tensor, IMPLS, gpu_form="fla", gpu_module="fla.ops.gla")


def _gated_linear_attn_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not all(x.is_cuda for x in (q, k, v, g)):
        raise ValueError(
            f"impl='fla' needs CUDA tensors, got q, k, v, g on {q.device}, {k.device}, {v.device}, {g.device}"
        )
    try:
        from fla.ops.gla import chunk_gla
    except ImportError as e:
        raise ImportError(
            "impl='fla' needs flash-linear-attention (the `fla` package) to be importable"
        ) from e
    o, final_state = chunk_gla(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    return o.to(v.dtype), (final_state.float() if final_state is not None else None)


def gated_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention over a whole sequence.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K], per-key-dimension log-decay (<= 0, e.g.
    logsigmoid of a gate projection), applied before the token's own update.
    scale: multiplies q; None means K ** -0.5.
    initial_state: [B, H, K, V] float32 (with cu_seqlens: [N, H, K, V], one per sequence).
    cu_seqlens: [N+1] cumulative lengths of N packed sequences (B must be 1); the torch forms run them one
    at a time.
    impl: "auto" | "chunked" | "reference" | "fla" (see resolve_impl). chunk_size: used by "chunked".
    Returns o: [B, T, H, V] in v.dtype, and the final state [B, H, K, V] (float32; float64 for float64
    inputs) when output_final_state, else None.
    """
    impl = resolve_impl(impl, q)
    if impl == "fla":
        return _gated_linear_attn_fla(
            q,
            k,
            v,
            g,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    if cu_seqlens is not None:  # torch forms: one packed sequence at a time, each from its own state
        return dispatch.over_sequences(
            lambda *xs, **kw: gated_linear_attn(*xs, scale=scale, impl=impl, chunk_size=chunk_size, **kw),
            (q, k, v, g),
            cu_seqlens,
            initial_state,
            output_final_state,
        )
    check_gated_linear_attn_args(q, k, v, g, initial_state)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if impl == "chunked":
        return gated_linear_attn_chunked(q, k, v, g, chunk_size=chunk_size, **kwargs)
    return gated_linear_attn_reference(q, k, v, g, **kwargs)
