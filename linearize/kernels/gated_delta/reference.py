"""Step-by-step recurrence for the gated delta rule (Gated DeltaNet): the specification the other forms must
match."""

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(Σ x² + eps) over the last dimension, as fla's `l2norm` (eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_reference(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, one token at a time:
    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = scale · q_tᵀ S_t.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log α, <= 0), beta: [B, T, H]; initial_state: [B, H, K, V].
    use_qk_l2norm: L2-normalise q and k over K first (fla's use_qk_l2norm_in_kernel).
    Returns o: [B, T, H, V] in v.dtype, and the final state [B, H, K, V] (or None).
    Math runs in float64 for float64 inputs, else float32.
    """
    B, T, H, K = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        S = S * g[:, t, :, None, None].exp()
        k_t = k[:, t]
        # delta rule: replace the value the state currently stores under k_t by a β-mix towards v_t
        u_t = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., :, None] * u_t[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1])
    return o.to(v.dtype), (S if output_final_state else None)
