"""Causal linear attention: o_t = sum_{s<=t} (scale q_t . k_s) v_s, optionally normalised. See README.md.

fla (and with it triton) is imported only inside the call that needs it, so importing this package stays
light.
"""

import torch

from .. import dispatch
from .chunked import check_linear_attn_args, linear_attn_chunked
from .reference import linear_attn_reference
from .step import linear_attn_step

__all__ = [
    "IMPLS",
    "linear_attn",
    "linear_attn_chunked",
    "linear_attn_reference",
    "linear_attn_step",
    "resolve_impl",
]

IMPLS = ("auto", "chunked", "reference", "fla")


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """ "auto" is "fla" for CUDA tensors when fla imports, else "chunked"; never the reference."""
    return dispatch.resolve_impl(impl, tensor, IMPLS, gpu_form="fla", gpu_module="fla.ops.linear_attn")


def _linear_attn_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None,
    normalize: bool,
    eps: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise ValueError(f"impl='fla' needs CUDA tensors, got q, k, v on {q.device}, {k.device}, {v.device}")
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError as e:
        raise ImportError(
            "impl='fla' needs flash-linear-attention (the `fla` package) to be importable"
        ) from e
    V = v.shape[-1]
    groups = q.shape[2] // k.shape[2]
    if groups > 1:  # fla's linear attention takes one key/value head per query head: the GQA groups expanded
        k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
        if initial_state is not None:
            initial_state = initial_state.repeat_interleave(groups, dim=1)
    v_aug = torch.cat([v, v.new_ones(*v.shape[:3], 1)], dim=-1) if normalize else v
    # fla's own normalize keeps the key sum in a separate tensor; ours rides in the state's last column,
    # so fla only runs the unnormalised recurrence (fp32 state) and the division stays here.
    o, final_state = chunk_linear_attn(
        q,
        k,
        v_aug,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        normalize=False,
    )
    if normalize:
        # fla returns o in v.dtype: numerator and denominator are each rounded once before this fp32 divide.
        o = o.float()
        o = o[..., :V] / (o[..., V:] + eps)
    if final_state is not None and groups > 1:  # the heads of a group hold the same state: keep one each
        final_state = final_state.unflatten(1, (-1, groups))[:, :, 0]
    return o.to(v.dtype), (final_state.float() if final_state is not None else None)


def linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention over a whole sequence.

    q: [B, T, H, K], k: [B, T, H_kv, K], already feature-mapped (non-negative when normalize); v: [B, T, H_kv, V].
    H_kv divides H (grouped-query attention; H_kv = H is multi-head): query head h reads key/value head
    h // (H / H_kv), and the state is kept once per key/value head.
    scale: multiplies q; None means K ** -0.5.
    normalize: o_t = num_t / (den_t + eps), den_t = sum_{s<=t} scale q_t . k_s (initial state included).
    initial_state: [B, H_kv, K, V+1] when normalize (last column = running key sum), else [B, H_kv, K, V];
    float32.
    impl: "auto" | "chunked" | "reference" | "fla" (see resolve_impl). chunk_size: used by "chunked".
    Returns o: [B, T, H, V] in v.dtype, and the final state (same layout as initial_state, float32;
    float64 for float64 inputs) when output_final_state, else None.
    """
    impl = resolve_impl(impl, q)
    check_linear_attn_args(q, k, v, initial_state, normalize)
    kwargs = dict(
        scale=scale,
        normalize=normalize,
        eps=eps,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    if impl == "chunked":
        return linear_attn_chunked(q, k, v, chunk_size=chunk_size, **kwargs)
    if impl == "reference":
        return linear_attn_reference(q, k, v, **kwargs)
    return _linear_attn_fla(q, k, v, **kwargs)
