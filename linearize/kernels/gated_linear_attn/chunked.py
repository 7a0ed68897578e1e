"""Chunked gated linear attention (GLA) in plain torch (the CPU path).

Self-contained on purpose: imports only torch, because this file is copied verbatim into exported checkpoints
that run without linearize installed.
"""

import torch
import torch.nn.functional as F


def check_gated_linear_attn_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    """Raise ValueError, stating the rule, unless q, k, g: [B, T, H, K], v: [B, T, H, V] and
    initial_state is None or [B, H, K, V]."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != g.shape:
        raise ValueError(
            f"q, k and g must have the same shape [B, T, H, K], "
            f"got {list(q.shape)}, {list(k.shape)} and {list(g.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with the same B, T, H as q {list(q.shape)}, got {list(v.shape)}"
        )
    if initial_state is not None:
        B, _, H, K = q.shape
        want = [B, H, K, v.shape[-1]]
        if list(initial_state.shape) != want:
            raise ValueError(
                f"initial_state must have shape [B, H, K, V] = {want}, got {list(initial_state.shape)}"
            )


def gated_chunk_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None,
    gv: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = (exp(gk_t) exp(gv_t)ᵀ) ⊙ S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t, chunk by chunk (see README.md).

    Head-major and already in the compute dtype: q, k: [B, H, T, K]; v: [B, H, T, V]; gk: [B, H, T, K] or
    None; gv: [B, H, T, V] or None (log-decays, <= 0); initial_state: [B, H, K, V] or None; q already scaled.
    Returns o: [B, H, T, V] and the final state [B, H, K, V].
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    if T == 0:
        return v.new_zeros(B, H, 0, V), S
    C = max(1, min(chunk_size, T))
    N = -(-T // C)

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # Padded tail: zero keys/values add nothing, zero log-decay keeps the state; padded outputs are dropped.
        return F.pad(x, (0, 0, 0, N * C - T)).reshape(B, H, N, C, x.shape[-1])

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    bk = None if gk is None else to_chunks(gk).cumsum(-2)  # log-decay from the chunk start, [B, H, N, C, K]
    bv = None if gv is None else to_chunks(gv).cumsum(-2)
    ninf = float("-inf")

    # Inside a chunk, a pair (t, j) carries exp(b_t - b_j). Factorising it as exp(b_t) exp(-b_j) overflows
    # once the decay inside a chunk passes ~88 nats (fp32), so sub-chunks of c tokens get the explicit
    # [c, c, D] decay tensor on their diagonal, and earlier sub-chunks factorise through a reference
    # position r_i = i*c - 1 that lies between them: exp(b_t - b_r) and exp(b_r - b_j), both exponents <= 0.
    c = max(d for d in range(1, min(C, 16) + 1) if C % d == 0)
    ns = C // c

    def sub(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(B, H, N, ns, c, x.shape[-1])

    tri = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    qs, ks, vs = sub(qc), sub(kc), sub(vc)
    if bk is None:
        A = (qs @ ks.transpose(-1, -2)).masked_fill(~tri, 0)
    else:
        bks = sub(bk)
        Dk = (bks[..., :, None, :] - bks[..., None, :, :]).masked_fill(~tri[..., None], ninf).exp()
        A = (qs[..., :, None, :] * ks[..., None, :, :] * Dk).sum(-1)  # [B, H, N, ns, c, c]
    if bv is None:
        o = A @ vs
    else:
        bvs = sub(bv)
        Dv = (bvs[..., :, None, :] - bvs[..., None, :, :]).masked_fill(~tri[..., None], ninf).exp()
        o = (A[..., None] * Dv * vs[..., None, :, :]).sum(-2)
    o = o.reshape(B, H, N, C, V)

    if ns > 1:
        earlier = torch.arange(C, device=q.device)[None, :] < (torch.arange(ns, device=q.device)[:, None] * c)
        ref = (torch.arange(ns, device=q.device) * c - 1).clamp(min=0)
        qo, ko = qs, kc[..., None, :, :]
        if bk is not None:
            rk = bk[..., ref, :]  # [B, H, N, ns, K]
            qo = qs * (bks - rk[..., None, :]).exp()
            ko = ko * (rk[..., None, :] - bk[..., None, :, :]).masked_fill(~earlier[..., None], ninf).exp()
        A_off = (qo @ ko.transpose(-1, -2)).masked_fill(~earlier[:, None, :], 0)  # [B, H, N, ns, c, C]
        if bv is None:
            o_off = A_off @ vc[..., None, :, :]
        else:
            rv = bv[..., ref, :]
            vo = (
                vc[..., None, :, :]
                * (rv[..., None, :] - bv[..., None, :, :]).masked_fill(~earlier[..., None], ninf).exp()
            )
            o_off = (A_off @ vo) * (bvs - rv[..., None, :]).exp()
        o = o + o_off.reshape(B, H, N, C, V)

    # Between chunks: S_{n+1} = D_n ⊙ S_n + (k decayed to the chunk end)ᵀ (v decayed to the chunk end).
    q_in, k_out, v_out, dec = qc, kc, vc, None
    if bk is not None:
        q_in = qc * bk.exp()
        k_out = kc * (bk[..., -1:, :] - bk).exp()
        dec = bk[..., -1, :, None].exp()
    if bv is not None:
        v_out = vc * (bv[..., -1:, :] - bv).exp()
        dec_v = bv[..., -1, None, :].exp()
        dec = dec_v if dec is None else dec * dec_v
    U = k_out.transpose(-1, -2) @ v_out  # [B, H, N, K, V]
    states = []
    for n in range(N):
        states.append(S)
        S = (S if dec is None else S * dec[:, :, n]) + U[:, :, n]
    o_inter = q_in @ torch.stack(states, dim=2)  # [B, H, N, C, V]
    if bv is not None:
        o_inter = o_inter * bv.exp()
    o = (o + o_inter).reshape(B, H, N * C, V)[:, :, :T]
    return o, S


def gated_linear_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA, chunk by chunk: exact gated causal form inside a chunk, carried decayed state between chunks.
    Any T (the tail chunk is padded).

    q, k, g: [B, T, H, K] (g: log-decay, <= 0); v: [B, T, H, V]; initial_state: [B, H, K, V].
    Returns o: [B, T, H, V] in v.dtype, and the final state [B, H, K, V] (or None), float32
    (float64 for float64 inputs).
    """
    check_gated_linear_attn_args(q, k, v, g, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    K = q.shape[-1]
    # Low-precision decays and state sums drift over long sequences, so the math is at least float32.
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    scale = K**-0.5 if scale is None else scale

    def head_major(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).transpose(1, 2)

    o, S = gated_chunk_scan(
        head_major(q) * scale,
        head_major(k),
        head_major(v),
        head_major(g),
        None,
        None if initial_state is None else initial_state.to(dtype),
        chunk_size,
    )
    return o.transpose(1, 2).to(v.dtype), (S if output_final_state else None)
