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

    q: [B, 1, H, K]; k: [B, 1, H_kv, K]; v: [B, 1, H_kv, V] (H_kv divides H; query head h reads key/value
    head h // (H / H_kv)); state: [B, H_kv, K, V'] with V' = V + 1 when normalize (last column = running key
    sum) else V' = V, or None for an empty history.
    Returns o: [B, 1, H, V] in v.dtype and new_state: [B, H_kv, K, V'], float32 (float64 for float64 inputs).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] != 1 or k.shape[1] != 1 or q.shape[::3] != k.shape[::3]:
        raise ValueError(
            f"q must be [B, 1, H, K] and k [B, 1, H_kv, K] with the same B, K, got {list(q.shape)} and "
            f"{list(k.shape)}"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"q's heads ({q.shape[2]}) must be a multiple of k's ({k.shape[2]})")
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be [B, 1, H_kv, V] with the same B, H_kv as k {list(k.shape)}, got {list(v.shape)}"
        )
    B, _, H, K = q.shape
    Hk, V = k.shape[2], v.shape[-1]
    Va = V + 1 if normalize else V
    if state is not None and list(state.shape) != [B, Hk, K, Va]:
        rule = "[B, H_kv, K, V+1]" if normalize else "[B, H_kv, K, V]"
        raise ValueError(
            f"state must have shape {rule} = {[B, Hk, K, Va]} when normalize={normalize}, "
            f"got {list(state.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    scale = K**-0.5 if scale is None else scale
    q, k, v_aug = q[:, 0].to(dtype) * scale, k[:, 0].to(dtype), v[:, 0].to(dtype)  # [B, H, *]
    if normalize:
        v_aug = torch.cat([v_aug, v_aug.new_ones(B, Hk, 1)], dim=-1)
    new_state = k[..., :, None] * v_aug[..., None, :]
    if state is not None:
        new_state = new_state + state.to(dtype)
    o = torch.einsum("bngk,bnkv->bngv", q.reshape(B, Hk, H // Hk, K), new_state).reshape(B, H, Va)
    if normalize:
        o = o[..., :V] / (o[..., V:] + eps)
    return o[:, None].to(v.dtype), new_state
