"""Triton form of window_linear: the banded softmax (window) part runs in our Triton kernels, forward and
backward; the linear part (causal linear attention over keys shifted by W) runs in torch's chunked scan.
See README.md, "Triton design".

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how it is tested without a GPU): in
interpreter mode the block sizes are fixed (Triton's autotuner wants a GPU driver even when interpreting).
"""

import os

import torch
import triton
import triton.language as tl

from .chunked import (
    WindowLinearState,
    combine_parts,
    empty_window_linear_state,
    extend_with_window,
    linear_part_chunked,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _window_fwd_kernel(
    Q, K, Vv, LO, NUM, DEN, M, ARG,
    T, H, W, scale,
    D: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # One program: BM queries of one (batch, head). Q: [B, T, H, D]; K: [B, W+T, H, D]; Vv: [B, W+T, H, V];
    # query t sees extended keys j in (t, t+W], j >= LO[b]. NUM: [B, T, H, V], DEN/M/ARG: [B, H, T].
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    TE = T + W
    lo = tl.load(LO + b)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BV)
    q = tl.load(
        Q + (b * T + offs_m[:, None]) * H * D + h * D + offs_d[None, :],
        mask=(offs_m[:, None] < T) & (offs_d[None, :] < D),
        other=0.0,
    )
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    arg = tl.zeros([BM], dtype=tl.int32)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    start = tl.maximum(pid_m * BM + 1, lo)
    end = tl.minimum(pid_m * BM + BM + W, TE)
    for j0 in range(start, end, BN):
        offs_n = j0 + tl.arange(0, BN)
        k = tl.load(
            K + (b * TE + offs_n[:, None]) * H * D + h * D + offs_d[None, :],
            mask=(offs_n[:, None] < TE) & (offs_d[None, :] < D),
            other=0.0,
        )
        v = tl.load(
            Vv + (b * TE + offs_n[:, None]) * H * V + h * V + offs_v[None, :],
            mask=(offs_n[:, None] < TE) & (offs_v[None, :] < V),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        inwin = (
            (offs_n[None, :] > offs_m[:, None])
            & (offs_n[None, :] <= offs_m[:, None] + W)
            & (offs_n[None, :] >= lo)
            & (offs_n[None, :] < TE)
        )
        s = tl.where(inwin, s, float("-inf"))
        bmax = tl.max(s, 1)
        barg = tl.argmax(s, 1) + j0
        arg = tl.where(bmax > m_i, barg, arg)
        m_new = tl.maximum(m_i, bmax)
        # A row with no window key yet has m_new = -inf; a finite stand-in keeps exp() free of NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    row = offs_m < T
    tl.store(
        NUM + (b * T + offs_m[:, None]) * H * V + h * V + offs_v[None, :],
        acc,
        mask=row[:, None] & (offs_v[None, :] < V),
    )
    tl.store(DEN + pid_bh * T + offs_m, l_i, mask=row)
    tl.store(M + pid_bh * T + offs_m, m_i, mask=row)
    tl.store(ARG + pid_bh * T + offs_m, arg, mask=row)


@triton.jit
def _window_grad_scores(
    q, k, v, gnum, gden, m, arg, dlt, offs_m, offs_n, T, TE, W, lo, scale,
):  # fmt: skip
    # a_ts = exp(s_ts - m_t) on the window; ds_ts = a_ts (gnum_t·v_s + gden_t) - [s = argmax_t] dlt_t, where
    # dlt_t = gnum_t·num_t + gden_t·den_t is the gradient through the max m_t (the linear part is not
    # rescaled by it, so the max does not cancel).
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    inwin = (
        (offs_n[None, :] > offs_m[:, None])
        & (offs_n[None, :] <= offs_m[:, None] + W)
        & (offs_n[None, :] >= lo)
        & (offs_n[None, :] < TE)
        & (offs_m[:, None] < T)
    )
    a = tl.where(inwin, tl.exp(tl.where(inwin, s - m[:, None], 0.0)), 0.0)
    dp = tl.dot(gnum, tl.trans(v), input_precision="ieee")
    ds = a * (dp + gden[:, None])
    ds = ds - tl.where(inwin & (offs_n[None, :] == arg[:, None]), dlt[:, None], 0.0)
    return a, ds


@triton.jit
def _window_bwd_dq_kernel(
    Q, K, Vv, LO, GNUM, GDEN, M, ARG, DLT, DQ,
    T, H, W, scale,
    D: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # Same tiling as the forward: BM queries, a loop over the key blocks of their windows.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    TE = T + W
    lo = tl.load(LO + b)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BV)
    row = offs_m < T
    q = tl.load(
        Q + (b * T + offs_m[:, None]) * H * D + h * D + offs_d[None, :],
        mask=row[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    gnum = tl.load(
        GNUM + (b * T + offs_m[:, None]) * H * V + h * V + offs_v[None, :],
        mask=row[:, None] & (offs_v[None, :] < V),
        other=0.0,
    )
    gden = tl.load(GDEN + pid_bh * T + offs_m, mask=row, other=0.0)
    m = tl.load(M + pid_bh * T + offs_m, mask=row, other=0.0)
    arg = tl.load(ARG + pid_bh * T + offs_m, mask=row, other=-1)
    dlt = tl.load(DLT + pid_bh * T + offs_m, mask=row, other=0.0)
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    start = tl.maximum(pid_m * BM + 1, lo)
    end = tl.minimum(pid_m * BM + BM + W, TE)
    for j0 in range(start, end, BN):
        offs_n = j0 + tl.arange(0, BN)
        col = offs_n < TE
        k = tl.load(
            K + (b * TE + offs_n[:, None]) * H * D + h * D + offs_d[None, :],
            mask=col[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        v = tl.load(
            Vv + (b * TE + offs_n[:, None]) * H * V + h * V + offs_v[None, :],
            mask=col[:, None] & (offs_v[None, :] < V),
            other=0.0,
        )
        a, ds = _window_grad_scores(q, k, v, gnum, gden, m, arg, dlt, offs_m, offs_n, T, TE, W, lo, scale)
        dq += tl.dot(ds, k, input_precision="ieee")
    tl.store(
        DQ + (b * T + offs_m[:, None]) * H * D + h * D + offs_d[None, :],
        dq * scale,
        mask=row[:, None] & (offs_d[None, :] < D),
    )


@triton.jit
def _window_bwd_dkv_kernel(
    Q, K, Vv, LO, GNUM, GDEN, M, ARG, DLT, DK, DV,
    T, H, W, scale,
    D: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # One program: BN extended keys of one (batch, head); key j is in the window of queries t in [j-W, j-1].
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    TE = T + W
    lo = tl.load(LO + b)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BV)
    col = offs_n < TE
    k = tl.load(
        K + (b * TE + offs_n[:, None]) * H * D + h * D + offs_d[None, :],
        mask=col[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    v = tl.load(
        Vv + (b * TE + offs_n[:, None]) * H * V + h * V + offs_v[None, :],
        mask=col[:, None] & (offs_v[None, :] < V),
        other=0.0,
    )
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BV], dtype=tl.float32)
    start = tl.maximum(pid_n * BN - W, 0)
    end = tl.minimum(pid_n * BN + BN - 1, T)
    for i0 in range(start, end, BM):
        offs_m = i0 + tl.arange(0, BM)
        row = offs_m < T
        q = tl.load(
            Q + (b * T + offs_m[:, None]) * H * D + h * D + offs_d[None, :],
            mask=row[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        gnum = tl.load(
            GNUM + (b * T + offs_m[:, None]) * H * V + h * V + offs_v[None, :],
            mask=row[:, None] & (offs_v[None, :] < V),
            other=0.0,
        )
        gden = tl.load(GDEN + pid_bh * T + offs_m, mask=row, other=0.0)
        m = tl.load(M + pid_bh * T + offs_m, mask=row, other=0.0)
        arg = tl.load(ARG + pid_bh * T + offs_m, mask=row, other=-1)
        dlt = tl.load(DLT + pid_bh * T + offs_m, mask=row, other=0.0)
        a, ds = _window_grad_scores(q, k, v, gnum, gden, m, arg, dlt, offs_m, offs_n, T, TE, W, lo, scale)
        dv += tl.dot(tl.trans(a), gnum, input_precision="ieee")
        dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    tl.store(
        DK + (b * TE + offs_n[:, None]) * H * D + h * D + offs_d[None, :],
        dk * scale,
        mask=col[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DV + (b * TE + offs_n[:, None]) * H * V + h * V + offs_v[None, :],
        dv,
        mask=col[:, None] & (offs_v[None, :] < V),
    )


def _blocks(D: int, V: int) -> dict:
    """Fixed launch parameters (the interpreter cannot autotune). 16 is the smallest tl.dot tile; the
    interpreter runs fastest with few, mid-sized blocks."""
    block = 32 if INTERPRET else 64
    return dict(
        BD=max(16, triton.next_power_of_2(D)),
        BV=max(16, triton.next_power_of_2(V)),
        BM=block,
        BN=block,
        num_warps=1 if INTERPRET else 4,
    )


class _WindowPart(torch.autograd.Function):
    """(qs, k_ext, v_ext, lo) -> (num [B, T, H, V], den [B, H, T]): the unnormalised max-subtracted window
    softmax, num_t = Σ_{s in window} exp(s_ts - m_t) v_s, den_t = Σ exp(s_ts - m_t), s_ts = scale q_t·k_s.
    All float32 and contiguous; lo: [B] int32, the first real extended key."""

    @staticmethod
    def forward(ctx, q, k_ext, v_ext, lo, window: int, scale: float):
        B, T, H, D = q.shape
        V = v_ext.shape[-1]
        cfg = _blocks(D, V)
        # Outputs are fully written by the kernel: NaN-filled so that a missed element cannot hide.
        num = torch.full((B, T, H, V), float("nan"), dtype=torch.float32, device=q.device)
        den, m = (torch.full((B, H, T), float("nan"), dtype=torch.float32, device=q.device) for _ in range(2))
        arg = torch.full((B, H, T), -1, dtype=torch.int32, device=q.device)
        grid = (triton.cdiv(T, cfg["BM"]), B * H)
        _window_fwd_kernel[grid](q, k_ext, v_ext, lo, num, den, m, arg, T, H, window, scale, D=D, V=V, **cfg)
        ctx.save_for_backward(q, k_ext, v_ext, lo, num, den, m, arg)
        ctx.window, ctx.scale = window, scale
        return num, den

    @staticmethod
    def backward(ctx, gnum, gden):
        q, k_ext, v_ext, lo, num, den, m, arg = ctx.saved_tensors
        B, T, H, D = q.shape
        V = v_ext.shape[-1]
        TE = k_ext.shape[1]
        cfg = _blocks(D, V)
        gnum = gnum.float().contiguous()
        gden = gden.float().contiguous()
        dlt = ((gnum * num).sum(-1).permute(0, 2, 1) + gden * den).contiguous()  # [B, H, T]
        dq = torch.full_like(q, float("nan"))
        dk = torch.full_like(k_ext, float("nan"))
        dv = torch.full_like(v_ext, float("nan"))
        args = (q, k_ext, v_ext, lo, gnum, gden, m, arg, dlt)
        meta = (T, H, ctx.window, ctx.scale)
        _window_bwd_dq_kernel[(triton.cdiv(T, cfg["BM"]), B * H)](*args, dq, *meta, D=D, V=V, **cfg)
        _window_bwd_dkv_kernel[(triton.cdiv(TE, cfg["BN"]), B * H)](*args, dk, dv, *meta, D=D, V=V, **cfg)
        return dq, dk, dv, None, None, None


def window_linear_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    window: int,
    window_factor: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
    initial_state: WindowLinearState | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, WindowLinearState | None]:
    """Same contract as window_linear_chunked (arguments already checked by `window_linear`). The math is
    float32 for every input dtype, float64 included."""
    B, T, H, D = q.shape
    V = v.shape[-1]
    dtype = torch.float32
    scale = D**-0.5 if scale is None else scale
    state = empty_window_linear_state(q, v, fq, window) if initial_state is None else initial_state
    k_ext, fk_ext, v_aug_ext, _ = extend_with_window(state, k, fk, v, dtype)
    lo = (window - state.seen.clamp(max=window)).to(torch.int32).contiguous()
    if T == 0:
        win = q.new_zeros(B, 0, H, V + 1, dtype=dtype)
    else:
        num, den = _WindowPart.apply(
            (q.to(dtype)).contiguous(),
            k_ext.contiguous(),
            v_aug_ext[..., :V].contiguous(),
            lo,
            window,
            float(scale),
        )
        win = torch.cat([num, den.permute(0, 2, 1)[..., None]], dim=-1)
    lin, S = linear_part_chunked(
        fq.to(dtype), fk_ext[:, :T], v_aug_ext[:, :T], state.linear_state.to(dtype), chunk_size=64
    )
    o = combine_parts(win, lin, window_factor, eps).to(v.dtype)
    if not output_final_state:
        return o, None
    final = WindowLinearState(
        linear_state=S,
        k_window=k_ext[:, T:].to(k.dtype),
        fk_window=fk_ext[:, T:].to(fk.dtype),
        v_window=v_aug_ext[:, T:, :, :-1].to(v.dtype),
        seen=state.seen + T,
    )
    return o, final
