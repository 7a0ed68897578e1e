"""Chunked gated slot attention (GSA) in plain torch (the CPU path): two gated chunk scans linked by a softmax
over the slots.

Self-contained on purpose: imports only torch, because this file is copied verbatim into exported checkpoints
that run without linearize installed. That is why `gated_chunk_scan` and its helpers (`_halves`, `_mm`,
`_IntraChunk`) are a copy of those in `gated_linear_attn/chunked.py` (tests check each copy against its own
reference).
"""

import torch
import torch.nn.functional as F


def check_gated_slot_attn_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Raise ValueError, stating the rule, unless q, k: [B, T, H, K], v: [B, T, H, V], s and g (or None):
    [B, T, H, M], and initial_state is None or a pair ([B, H, K, M], [B, H, M, V])."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [B, T, H, K], got {list(q.shape)} and {list(k.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with the same B, T, H as q {list(q.shape)}, got {list(v.shape)}"
        )
    if s.dim() != 4 or s.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"s must be [B, T, H, M] with the same B, T, H as q {list(q.shape)}, got {list(s.shape)}"
        )
    if g is not None and g.shape != s.shape:
        raise ValueError(
            f"g must be None or have the shape of s [B, T, H, M] = {list(s.shape)}, got {list(g.shape)}"
        )
    if initial_state is not None:
        B, _, H, K = q.shape
        M, V = s.shape[-1], v.shape[-1]
        if (
            len(initial_state) != 2
            or list(initial_state[0].shape) != [B, H, K, M]
            or list(initial_state[1].shape) != [B, H, M, V]
        ):
            raise ValueError(
                f"initial_state must be a pair of shapes ([B, H, K, M], [B, H, M, V]) = "
                f"({[B, H, K, M]}, {[B, H, M, V]}), got {[list(x.shape) for x in initial_state]}"
            )


def _halves(x: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., P, D] -> first and second halves of its blocks of 2h rows, each [..., P // 2h, h, D] (views)."""
    return x.unflatten(-2, (-1, 2, h)).unbind(-3)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b over the batch dims. Elementwise when the inner or both outer sizes are 1 or 2: CPU bmm runs
    such tiny matrices one at a time, several times slower."""
    if a.shape[-1] == 1:
        return a * b
    if a.shape[-1] == 2:
        return torch.addcmul(a[..., :1] * b[..., :1, :], a[..., 1:], b[..., 1:, :])
    if a.shape[-2] == 1 and b.shape[-1] == 1:
        return (a * b.mT).sum(-1, keepdim=True)
    return a @ b


class _IntraChunk(torch.autograd.Function):
    """o_t = Σ_{s≤t} (q_t ⊙ e^{bk_t − bk_s})·k_s (e^{bv_t − bv_s} ⊙ v_s) over the rows of each [P, D] block, by
    halving (see README.md): every exponent it takes is <= 0. q, k, bk: [..., P, K], v, bv: [..., P, V],
    P a power of two, bk and bv (cumulative log-decays, non-increasing along P) each optional; keep: whether
    to keep what the backward needs (not under no_grad: it is several times the size of the inputs).

    The backward is written out because autograd spends most of its time zero-filling and summing full-size
    gradients of the half-block views; the decay gradients follow from the identities
    dL/dbk = q ⊙ dq − k ⊙ dk and dL/dbv = o ⊙ do − v ⊙ dv (a pair's exponent enters with + at its query
    and − at its key).
    """

    @staticmethod
    def forward(ctx, q, k, v, bk, bv, keep):
        o = torch.zeros_like(v)
        levels = []
        h = 1
        while h < q.shape[-2]:
            qh, kh, vh = _halves(q, h)[1], _halves(k, h)[0], _halves(v, h)[0]
            eq = ek = e_in = e_out = None
            # Reference row r: the last key row. Queries sit after it, keys at or before it; at h = 1 the
            # only key row is r itself, so the key-side factor is e^0.
            if bk is not None:
                b1, b2 = _halves(bk, h)
                r = b1[..., -1:, :]
                eq = (b2 - r).exp_()
                qh = qh * eq
                if h > 1:
                    ek = (r - b1).exp_()
                    kh = kh * ek
            if bv is not None:
                b1, b2 = _halves(bv, h)
                r = b1[..., -1:, :]
                e_out = (b2 - r).exp_()
                if h > 1:
                    e_in = (r - b1).exp_()
                    vh = vh * e_in
            A = _mm(qh, kh.mT)  # [..., P // 2h, h, h]
            y = _mm(A, vh)
            _halves(o, h)[1].add_(y if e_out is None else y * e_out)
            if keep:
                levels.append((qh, kh, vh, A, eq, ek, e_in, e_out))
            h *= 2
        if keep:
            ctx.levels = levels
            ctx.save_for_backward(q, k, v, o)
            ctx.decays = (bk is not None, bv is not None)
        return o + (q * k).sum(-1, keepdim=True) * v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o = ctx.saved_tensors  # o: the pairs s < t only
        # An expanded (stride-0) gradient, as from o.sum(), would send bmm down its one-matrix-at-a-time path.
        do = do.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        h = 1
        for qh, kh, vh, A, eq, ek, e_in, e_out in ctx.levels:
            dy = _halves(do, h)[1]
            if e_out is not None:
                dy = dy * e_out
            dvh, dA = _mm(A.mT, dy), _mm(dy, vh.mT)
            dqh, dkh = _mm(dA, kh), _mm(dA.mT, qh)
            _halves(dv, h)[0].add_(dvh if e_in is None else dvh * e_in)
            _halves(dq, h)[1].add_(dqh if eq is None else dqh * eq)
            _halves(dk, h)[0].add_(dkh if ek is None else dkh * ek)
            h *= 2
        ctx.levels = None
        has_bk, has_bv = ctx.decays
        # The pairs s = t carry no decay; leaving them out makes the decay gradients exactly 0 where they are.
        dbk = q * dq - k * dk if has_bk else None
        dbv = o * do - v * dv if has_bv else None
        w = (do * v).sum(-1, keepdim=True)
        dq, dk, dv = dq.addcmul_(w, k), dk.addcmul_(w, q), dv.addcmul_((q * k).sum(-1, keepdim=True), do)
        return dq, dk, dv, dbk, dbv, None


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
    P = 1 << (C - 1).bit_length()  # chunks are zero-padded to a power of two for the halving

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # Zero keys/values add nothing and zero log-decay keeps the state; padded outputs are dropped.
        x = F.pad(x, (0, 0, 0, N * C - T)).reshape(B, H, N, C, x.shape[-1])
        return x if P == C else F.pad(x, (0, 0, 0, P - C))

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    bk = None if gk is None else to_chunks(gk).cumsum(-2)  # log-decay from the chunk start, [B, H, N, P, K]
    bv = None if gv is None else to_chunks(gv).cumsum(-2)
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (qc, kc, vc, bk, bv))
    o = _IntraChunk.apply(qc, kc, vc, bk, bv, keep)

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
    U = k_out.mT @ v_out  # [B, H, N, K, V]
    states = []
    # unbind, not indexing: the backward of U[:, :, n] would build a zero-filled full-size U for every n
    for U_n, dec_n in zip(U.unbind(2), [None] * N if dec is None else dec.unbind(2)):
        states.append(S)
        S = (S if dec_n is None else S * dec_n) + U_n
    o_inter = q_in @ torch.stack(states, dim=2)  # [B, H, N, P, V]
    if bv is not None:
        o_inter = o_inter * bv.exp()
    o = (o + o_inter)[..., :C, :].reshape(B, H, N * C, V)[:, :, :T]
    return o, S


def gated_slot_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """GSA, chunk by chunk: the slot pass is a gated scan with the decay on its value side (the M slots), the
    value pass one with the decay on its key side. Any T (the tail chunk is padded).

    q, k: [B, T, H, K]; v: [B, T, H, V]; s, g: [B, T, H, M] (g None: fla's additive gate, see
    reference.additive_gate); initial_state: (Hk [B, H, K, M], Hv [B, H, M, V]).
    Returns o: [B, T, H, V] in v.dtype, and the final (Hk, Hv) (or None), float32 (float64 for float64 inputs).
    """
    check_gated_slot_attn_args(q, k, v, s, g, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    K = q.shape[-1]
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    scale = K**-0.5 if scale is None else scale
    s = s.to(dtype)
    if g is None:
        z = s.logcumsumexp(dim=1)
        s, g = (s - z).exp(), torch.cat([z[:, :1], z[:, :-1]], dim=1) - z

    def head_major(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).transpose(1, 2).contiguous()

    hk0, hv0 = (None, None) if initial_state is None else (x.to(dtype) for x in initial_state)
    s_h, g_h = head_major(s), head_major(g)
    # autocast off: it would run the forward's products in bf16 (not the float32 math above) while the
    # written-out backward of the intra-chunk Function runs in float32, a dtype mismatch there
    with torch.autocast(q.device.type, enabled=False):
        scores, hk = gated_chunk_scan(head_major(q) * scale, head_major(k), s_h, None, g_h, hk0, chunk_size)
        o, hv = gated_chunk_scan(scores.softmax(-1), s_h, head_major(v), g_h, None, hv0, chunk_size)
    return o.transpose(1, 2).to(v.dtype), ((hk, hv) if output_final_state else None)
