"""Gated delta rule (Gated DeltaNet): S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,
o_t = scale · q_tᵀ S_t, with g = log α. Semantics are fla's `chunk_gated_delta_rule` /
`fused_recurrent_gated_delta_rule`. See README.md.

fla (and with it triton) is imported only inside the call that needs it, so importing this package stays
light.
"""

import torch

from .. import dispatch
from .chunked import check_gated_delta_args, gated_delta_chunked
from .reference import gated_delta_reference
from .step import gated_delta_step

__all__ = [
    "IMPLS",
    "gated_delta",
    "gated_delta_chunked",
    "gated_delta_reference",
    "gated_delta_step",
    "resolve_impl",
]

IMPLS = ("auto", "chunked", "reference", "fla")


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """ "auto" is "fla" for CUDA tensors when fla imports, else "chunked"; never the reference."""
    return dispatch.resolve_impl(impl, tensor, IMPLS, gpu_form="fla", gpu_module="fla.ops.gated_delta_rule")


def _gated_delta_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not all(x.is_cuda for x in (q, k, v, g, beta)):
        raise ValueError(
            f"impl='fla' needs CUDA tensors, got q, k, v, g, beta on "
            f"{', '.join(str(x.device) for x in (q, k, v, g, beta))}"
        )
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:
        raise ImportError(
            "impl='fla' needs flash-linear-attention (the `fla` package) to be importable"
        ) from e
    o, final_state = chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        cu_seqlens=cu_seqlens,
    )
    return o.to(v.dtype), (final_state.float() if final_state is not None else None)


def gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over a whole sequence (argument order as fla's `chunk_gated_delta_rule`).

    q, k: [B, T, H, K] (fla expects unit-norm keys: pass them normalised or set use_qk_l2norm);
    v: [B, T, H, V]; g: [B, T, H], log of the per-head decay α (<= 0); beta: [B, T, H], write strength
    (in [0, 1], e.g. a sigmoid).
    scale: multiplies q; None means K ** -0.5.
    initial_state: [B, H, K, V] float32 (with cu_seqlens: [N, H, K, V], one per sequence).
    use_qk_l2norm: L2-normalise q and k over K first (fla's use_qk_l2norm_in_kernel, eps 1e-6 in the root).
    cu_seqlens: [N+1] cumulative lengths of N packed sequences (B must be 1); the torch forms run them one
    at a time.
    impl: "auto" | "chunked" | "reference" | "fla" (see resolve_impl). chunk_size: used by "chunked" (any
    positive size; fla's kernels fix their own).
    Returns o: [B, T, H, V] in v.dtype, and the final state [B, H, K, V] (float32; float64 for float64
    inputs) when output_final_state, else None.
    """
    impl = resolve_impl(impl, q)
    kwargs = dict(
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
    )
    if impl == "fla":
        return _gated_delta_fla(q, k, v, g, beta, cu_seqlens=cu_seqlens, **kwargs)
    if cu_seqlens is not None:  # torch forms: one packed sequence at a time, each from its own state
        return dispatch.over_sequences(
            lambda *xs, **kw: gated_delta(
                *xs, scale=scale, use_qk_l2norm=use_qk_l2norm, impl=impl, chunk_size=chunk_size, **kw
            ),
            (q, k, v, g, beta),
            cu_seqlens,
            initial_state,
            output_final_state,
        )
    check_gated_delta_args(q, k, v, g, beta, initial_state)
    if impl == "chunked":
        return gated_delta_chunked(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
    return gated_delta_reference(q, k, v, g, beta, **kwargs)
