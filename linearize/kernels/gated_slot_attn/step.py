"""One-token decode for gated slot attention (GSA).

Imports only torch: this file is copied verbatim into exported checkpoints.
"""

import torch


def gated_slot_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Advance both GSA recurrences by one token (see reference.py).

    q, k: [B, 1, H, K]; v: [B, 1, H, V]; s, g: [B, 1, H, M] (g is required: fla's additive gate for g=None
    normalises over the whole sequence, which a single step does not see); state: (Hk [B, H, K, M],
    Hv [B, H, M, V]), or None for an empty history.
    Returns o: [B, 1, H, V] in v.dtype and the new (Hk, Hv), float32 (float64 for float64 inputs).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape[1] != 1:
        raise ValueError(
            f"q and k must have the same shape [B, 1, H, K], got {list(q.shape)} and {list(k.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, 1, H, V] with the same B, H as q {list(q.shape)}, got {list(v.shape)}"
        )
    if s.dim() != 4 or s.shape[:3] != q.shape[:3] or g is None or g.shape != s.shape:
        raise ValueError(
            f"s and g must both be [B, 1, H, M] with the same B, H as q {list(q.shape)}, "
            f"got {list(s.shape)} and {None if g is None else list(g.shape)}"
        )
    B, _, H, K = q.shape
    M, V = s.shape[-1], v.shape[-1]
    if state is not None and (
        len(state) != 2 or list(state[0].shape) != [B, H, K, M] or list(state[1].shape) != [B, H, M, V]
    ):
        raise ValueError(
            f"state must be a pair of shapes ([B, H, K, M], [B, H, M, V]) = ({[B, H, K, M]}, {[B, H, M, V]}), "
            f"got {[list(x.shape) for x in state]}"
        )
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    scale = K**-0.5 if scale is None else scale
    q, k, v_, s, g = (x[:, 0].to(dtype) for x in (q, k, v, s, g))
    hk = k[..., :, None] * s[..., None, :]
    hv = s[..., :, None] * v_[..., None, :]
    if state is not None:
        a = g.exp()
        hk = hk + state[0].to(dtype) * a[..., None, :]
        hv = hv + state[1].to(dtype) * a[..., :, None]
    attn = torch.einsum("bhk,bhkm->bhm", q * scale, hk).softmax(-1)
    o = torch.einsum("bhm,bhmv->bhv", attn, hv)
    return o[:, None].to(v.dtype), (hk, hv)
