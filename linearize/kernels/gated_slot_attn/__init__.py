"""Gated slot attention (GSA): two gated linear recurrences over M memory slots linked by a softmax over the
slots. Semantics are fla's `chunk_gsa` / `fused_recurrent_gsa`. See README.md.

fla (and with it triton) is imported only inside the call that needs it, so importing this package stays
light.
"""

import torch

from .. import dispatch
from .chunked import check_gated_slot_attn_args, gated_slot_attn_chunked
from .reference import additive_gate, gated_slot_attn_reference
from .step import gated_slot_attn_step

__all__ = [
    "IMPLS",
    "additive_gate",
    "gated_slot_attn",
    "gated_slot_attn_chunked",
    "gated_slot_attn_reference",
    "gated_slot_attn_step",
    "resolve_impl",
]

IMPLS = ("auto", "chunked", "reference", "fla")

State = tuple[torch.Tensor, torch.Tensor]


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """ "auto" is "fla" for CUDA tensors when fla imports, else "chunked"; never the reference."""
    return dispatch.resolve_impl(impl, tensor, IMPLS, gpu_form="fla", gpu_module="fla.ops.gsa")


def _gated_slot_attn_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None,
    *,
    scale: float | None,
    initial_state: State | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, State | None]:
    tensors = (q, k, v, s) if g is None else (q, k, v, s, g)
    if not all(x.is_cuda for x in tensors):
        raise ValueError(
            f"impl='fla' needs CUDA tensors, got q, k, v, s, g on {', '.join(str(x.device) for x in tensors)}"
        )
    try:
        from fla.ops.gsa import chunk_gsa
    except ImportError as e:
        raise ImportError(
            "impl='fla' needs flash-linear-attention (the `fla` package) to be importable"
        ) from e
    o, final_state = chunk_gsa(
        q,
        k,
        v,
        s,
        g,
        scale=scale,
        initial_state=None if initial_state is None else tuple(x.float() for x in initial_state),
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    return o.to(v.dtype), (tuple(x.float() for x in final_state) if output_final_state else None)


def gated_slot_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, State | None]:
    """Gated slot attention over a whole sequence (argument order as fla's `chunk_gsa`).

    q, k: [B, T, H, K]; v: [B, T, H, V]; s: [B, T, H, M], what each token writes into the M slots;
    g: [B, T, H, M], per-slot log-decay (<= 0), or None for fla's additive gate (s' = exp(s − z),
    g = z_{t-1} − z_t with z the running logsumexp of s over time; restarts at every call).
    scale: multiplies q in the slot-score pass; None means K ** -0.5.
    initial_state: (Hk [B, H, K, M], Hv [B, H, M, V]) float32 (with cu_seqlens: N per sequence instead of B).
    cu_seqlens: [N+1] cumulative lengths of N packed sequences (B must be 1); the torch forms run them one
    at a time.
    impl: "auto" | "chunked" | "reference" | "fla" (see resolve_impl). chunk_size: used by "chunked".
    Returns o: [B, T, H, V] in v.dtype, and the final (Hk, Hv) (float32; float64 for float64 inputs) when
    output_final_state, else None.
    """
    impl = resolve_impl(impl, q)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if impl == "fla":
        return _gated_slot_attn_fla(q, k, v, s, g, cu_seqlens=cu_seqlens, **kwargs)
    if cu_seqlens is not None:  # torch forms: one packed sequence at a time, each from its own state
        return dispatch.over_sequences(
            lambda *xs, **kw: gated_slot_attn(*xs, scale=scale, impl=impl, chunk_size=chunk_size, **kw),
            (q, k, v, s) if g is None else (q, k, v, s, g),
            cu_seqlens,
            initial_state,
            output_final_state,
        )
    check_gated_slot_attn_args(q, k, v, s, g, initial_state)
    if impl == "chunked":
        return gated_slot_attn_chunked(q, k, v, s, g, chunk_size=chunk_size, **kwargs)
    return gated_slot_attn_reference(q, k, v, s, g, **kwargs)
