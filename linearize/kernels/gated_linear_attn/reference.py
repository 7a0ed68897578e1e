"""Step-by-step recurrence for gated linear attention (GLA): the specification the other forms must match."""

import torch


def gated_linear_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA, one token at a time: S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ, o_t = scale · q_tᵀ S_t.

    q, k, g: [B, T, H, K] (g: log-decay, <= 0); v: [B, T, H, V]; initial_state: [B, H, K, V].
    Returns o: [B, T, H, V] in v.dtype, and the final state [B, H, K, V] (or None).
    Math runs in float64 for float64 inputs, else float32.
    """
    B, T, H, K = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K**-0.5 if scale is None else scale
    q, k, v, g = q.to(dtype) * scale, k.to(dtype), v.to(dtype), g.to(dtype)
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        S = S * g[:, t, :, :, None].exp() + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1])
    return o.to(v.dtype), (S if output_final_state else None)
