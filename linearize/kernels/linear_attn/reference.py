"""Step-by-step recurrence for causal linear attention: the specification the other forms must match."""

import torch


def linear_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention, one token at a time.

    q: [B, T, H, K]; k: [B, T, H_kv, K]; v: [B, T, H_kv, V] (H_kv divides H; query head h reads key/value
    head h // (H / H_kv)); initial_state: [B, H_kv, K, V'] with V' = V + 1 when normalize (last column =
    running key sum) else V' = V.
    Returns o: [B, T, H, V] in v.dtype, and the final state [B, H_kv, K, V'] (or None).
    Math runs in float64 for float64 inputs, else float32.
    """
    B, T, H, K = q.shape
    Hk, V = k.shape[2], v.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K**-0.5 if scale is None else scale
    q, k, v_aug = q.to(dtype) * scale, k.to(dtype), v.to(dtype)
    if normalize:
        v_aug = torch.cat([v_aug, v_aug.new_ones(B, T, Hk, 1)], dim=-1)
    S = q.new_zeros(B, Hk, K, v_aug.shape[-1]) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        S = S + k[:, t, :, :, None] * v_aug[:, t, :, None, :]
        grouped = q[:, t].reshape(B, Hk, H // Hk, K)  # the query heads that share each key/value head
        outs.append(torch.einsum("bngk,bnkv->bngv", grouped, S).reshape(B, H, -1))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v_aug.shape[-1])
    if normalize:
        o = o[..., :V] / (o[..., V:] + eps)
    return o.to(v.dtype), (S if output_final_state else None)
