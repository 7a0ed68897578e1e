"""One-token decode for the gated delta rule (Gated DeltaNet).

Imports only torch: this file is copied verbatim into exported checkpoints.
"""

import torch


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance S = exp(g) (I − β k kᵀ) S + β k vᵀ, o = scale · qᵀ S by one token.

    q, k: [B, 1, H, K]; v: [B, 1, H, V]; g, beta: [B, 1, H]; state: [B, H, K, V], or None for an empty
    history. use_qk_l2norm: L2-normalise q and k over K first (x / sqrt(Σ x² + 1e-6), as fla).
    Returns o: [B, 1, H, V] in v.dtype and new_state: [B, H, K, V], float32 (float64 for float64 inputs).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape[1] != 1:
        raise ValueError(
            f"q and k must have the same shape [B, 1, H, K], got {list(q.shape)} and {list(k.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, 1, H, V] with the same B, H as q {list(q.shape)}, got {list(v.shape)}"
        )
    if g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(
            f"g and beta must be [B, 1, H] = {list(q.shape[:3])}, got {list(g.shape)} and {list(beta.shape)}"
        )
    B, _, H, K = q.shape
    V = v.shape[-1]
    if state is not None and list(state.shape) != [B, H, K, V]:
        raise ValueError(f"state must have shape [B, H, K, V] = {[B, H, K, V]}, got {list(state.shape)}")
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    scale = K**-0.5 if scale is None else scale
    q, k, v_, g, beta = (x[:, 0].to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if state is None:
        new_state = k[..., :, None] * (beta[..., None] * v_)[..., None, :]
    else:
        S = state.to(dtype) * g.exp()[..., None, None]
        u = beta[..., None] * (v_ - torch.einsum("bhk,bhkv->bhv", k, S))
        new_state = S + k[..., :, None] * u[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q * scale, new_state)
    return o[:, None].to(v.dtype), new_state
