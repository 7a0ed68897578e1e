"""Chunked gated delta rule (Gated DeltaNet) in plain torch (the CPU path), in the WY / UT-transform form of
fla's `naive_chunk_gated_delta_rule`, with a triangular solve in place of its row-by-row loop.

Self-contained on purpose: imports only torch, because this file is copied verbatim into exported checkpoints
that run without linearize installed.
"""

import torch
import torch.nn.functional as F


def check_gated_delta_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    """Raise ValueError, stating the rule, unless q, k: [B, T, H, K], v: [B, T, H, V], g, beta: [B, T, H] and
    initial_state is None or [B, H, K, V]."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [B, T, H, K], got {list(q.shape)} and {list(k.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with the same B, T, H as q {list(q.shape)}, got {list(v.shape)}"
        )
    if g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(
            f"g and beta must be [B, T, H] = {list(q.shape[:3])} (one gate per head and token), "
            f"got {list(g.shape)} and {list(beta.shape)}"
        )
    if initial_state is not None:
        B, _, H, K = q.shape
        want = [B, H, K, v.shape[-1]]
        if list(initial_state.shape) != want:
            raise ValueError(
                f"initial_state must have shape [B, H, K, V] = {want}, got {list(initial_state.shape)}"
            )


def gated_delta_chunked(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, chunk by chunk (see README.md). Any T (the tail chunk is padded).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log α, <= 0), beta: [B, T, H]; initial_state: [B, H, K, V].
    use_qk_l2norm: L2-normalise q and k over K first (x / sqrt(Σ x² + 1e-6), as fla).
    Returns o: [B, T, H, V] in v.dtype, and the final state [B, H, K, V] (or None), float32
    (float64 for float64 inputs).
    """
    check_gated_delta_args(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if T == 0:
        return v.new_zeros(B, 0, H, V, dtype=out_dtype), (S if output_final_state else None)
    q, k, v, g, beta = (x.to(dtype).transpose(1, 2) for x in (q, k, v, g, beta))  # head-major
    if use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * scale
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    pad = N * C - T
    # Padded tail: k = v = 0, beta = 0 and g = 0 leave the state untouched; padded outputs are dropped.
    qc, kc, vc = (F.pad(x, (0, 0, 0, pad)).reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    gc, bc = (F.pad(x, (0, pad)).reshape(B, H, N, C) for x in (g, beta))

    gam = gc.cumsum(-1)  # log-decay from the chunk start, [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[t, j] = exp(γ_t − γ_j) for t >= j; masked before the exp so t < j cannot overflow.
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = kc * bc[..., None]
    # UT transform: (I + A) U = β V − diag(β e^γ) K S_n with A = strictly-lower(β_t k_t·k_j e^{γ_t−γ_j}).
    A = (kb @ kc.transpose(-1, -2) * decay).tril(-1)
    eye = torch.eye(C, dtype=dtype, device=q.device)
    rhs = torch.cat([vc * bc[..., None], kb * gam.exp()[..., None]], dim=-1)
    uw = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    u, w = uw[..., :V], uw[..., V:]  # U_n = u_n − w_n S_n

    attn = qc @ kc.transpose(-1, -2) * decay  # [B, H, N, C, C], diagonal included
    q_in = qc * gam.exp()[..., None]
    k_out = kc * (gam[..., -1:] - gam).exp()[..., None]
    dec = gam[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]
    states, Us = [], []
    # Only the state recurrence is sequential; the outputs are batched matmuls after it. unbind, not
    # indexing: the backward of x[:, :, n] would build a zero-filled full-size x for every n.
    for u_n, w_n, k_n, dec_n in zip(*(x.unbind(2) for x in (u, w, k_out, dec))):
        states.append(S)
        Us.append(u_n - w_n @ S)
        S = S * dec_n + k_n.transpose(-1, -2) @ Us[-1]
    o = q_in @ torch.stack(states, dim=2) + attn @ torch.stack(Us, dim=2)  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), (S if output_final_state else None)
