"""One-token decode for gated linear attention (GLA).

Imports only torch: this file is copied verbatim into exported checkpoints.
"""

import torch


def gated_linear_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the recurrence S = diag(exp(g)) S + k vᵀ, o = scale · qᵀ S by one token.

    q, k, g: [B, 1, H, K]; v: [B, 1, H, V]; state: [B, H, K, V], or None for an empty history.
    Returns o: [B, 1, H, V] in v.dtype and new_state: [B, H, K, V], float32 (float64 for float64 inputs).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != g.shape or q.shape[1] != 1:
        raise ValueError(
            f"q, k and g must have the same shape [B, 1, H, K], "
            f"got {list(q.shape)}, {list(k.shape)} and {list(g.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, 1, H, V] with the same B, H as q {list(q.shape)}, got {list(v.shape)}"
        )
    B, _, H, K = q.shape
    V = v.shape[-1]
    if state is not None and list(state.shape) != [B, H, K, V]:
        raise ValueError(f"state must have shape [B, H, K, V] = {[B, H, K, V]}, got {list(state.shape)}")
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    scale = K**-0.5 if scale is None else scale
    q, k, v_, g = q[:, 0].to(dtype) * scale, k[:, 0].to(dtype), v[:, 0].to(dtype), g[:, 0].to(dtype)
    new_state = k[..., :, None] * v_[..., None, :]
    if state is not None:
        new_state = new_state + state.to(dtype) * g.exp()[..., :, None]
    o = torch.einsum("bhk,bhkv->bhv", q, new_state)
    return o[:, None].to(v.dtype), new_state
