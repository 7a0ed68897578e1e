"""One-token decode for causal linear attention.

Imports only torch: this file is copied verbatim into exported checkpoints.
"""

import torch


def linear_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None,
    *,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the recurrence by one token.

    q, k: [B, 1, H, K]; v: [B, 1, H, V]; state: [B, H, K, V'] with V' = V + 1 when normalize (last column =
    running key sum) else V' = V, or None for an empty history.
    Returns o: [B, 1, H, V] in v.dtype and new_state: [B, H, K, V'], float32 (float64 for float64 inputs).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape[1] != 1:
        raise ValueError(
            f"q and k must have the same shape [B, 1, H, K], got {list(q.shape)} and {list(k.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, 1, H, V] with the same B, H as q {list(q.shape)}, got {list(v.shape)}"
        )
    B, _, H, K = q.shape
    V = v.shape[-1]
    Va = V + 1 if normalize else V
    if state is not None and list(state.shape) != [B, H, K, Va]:
        rule = "[B, H, K, V+1]" if normalize else "[B, H, K, V]"
        raise ValueError(
            f"state must have shape {rule} = {[B, H, K, Va]} when normalize={normalize}, "
            f"got {list(state.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    scale = K**-0.5 if scale is None else scale
    q, k, v_aug = q[:, 0].to(dtype) * scale, k[:, 0].to(dtype), v[:, 0].to(dtype)  # [B, H, *]
    if normalize:
        v_aug = torch.cat([v_aug, v_aug.new_ones(B, H, 1)], dim=-1)
    new_state = k[..., :, None] * v_aug[..., None, :]
    if state is not None:
        new_state = new_state + state.to(dtype)
    o = torch.einsum("bhk,bhkv->bhv", q, new_state)
    if normalize:
        o = o[..., :V] / (o[..., V:] + eps)
    return o[:, None].to(v.dtype), new_state
