"""Step-by-step recurrence for gated slot attention (GSA): the specification the other forms must match."""

import torch


def additive_gate(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's gate when no g is given ("vanilla ABC"): with z_t = logcumsumexp_{j≤t} s_j over time,
    s'_t = exp(s_t − z_t) and g_t = z_{t-1} − z_t (g_0 = 0). s: [B, T, H, M]; returns (s', g), same shape.
    The normaliser restarts at t = 0 of every call."""
    z = s.logcumsumexp(dim=1)
    g = torch.cat([z[:, :1], z[:, :-1]], dim=1) - z
    return (s - z).exp(), g


def gated_slot_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """GSA, one token at a time. Two GLA recurrences over M slots, linked by a softmax over the slots:

        Hk_t = Hk_{t-1} diag(exp(g_t)) + k_t s_tᵀ      a_t = softmax(scale · q_tᵀ Hk_t)   (over M)
        Hv_t = diag(exp(g_t)) Hv_{t-1} + s_t v_tᵀ      o_t = a_tᵀ Hv_t

    q, k: [B, T, H, K]; v: [B, T, H, V]; s (slot scores), g (slot log-decay, <= 0): [B, T, H, M];
    g None: fla's additive gate (see additive_gate). initial_state: (Hk [B, H, K, M], Hv [B, H, M, V]).
    Returns o: [B, T, H, V] in v.dtype, and the final (Hk, Hv) (or None).
    Math runs in float64 for float64 inputs, else float32.
    """
    B, T, H, K = q.shape
    M, V = s.shape[-1], v.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K**-0.5 if scale is None else scale
    q, k, v, s = q.to(dtype) * scale, k.to(dtype), v.to(dtype), s.to(dtype)
    s, g = additive_gate(s) if g is None else (s, g.to(dtype))
    if initial_state is None:
        hk, hv = q.new_zeros(B, H, K, M), q.new_zeros(B, H, M, V)
    else:
        hk, hv = initial_state[0].to(dtype), initial_state[1].to(dtype)
    outs = []
    for t in range(T):
        a = g[:, t].exp()  # [B, H, M]
        hk = hk * a[..., None, :] + k[:, t, :, :, None] * s[:, t, :, None, :]
        hv = hv * a[..., :, None] + s[:, t, :, :, None] * v[:, t, :, None, :]
        attn = torch.einsum("bhk,bhkm->bhm", q[:, t], hk).softmax(-1)
        outs.append(torch.einsum("bhm,bhmv->bhv", attn, hv))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(v.dtype), ((hk, hv) if output_final_state else None)
