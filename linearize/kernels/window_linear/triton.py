"""Triton form of window_linear: both parts run in our Triton kernels, forward and backward: the banded
softmax (window) part, and the linear part (causal linear attention over keys shifted by W, a chunked scan);
only their elementwise combination is torch. See README.md, "Triton design".

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how it is tested without a GPU): in
interpreter mode the block sizes are fixed (Triton's autotuner wants a GPU driver even when interpreting).
"""

import os

import torch
import triton
import triton.language as tl

from .chunked import WindowLinearState, empty_window_linear_state, extend_with_window

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


@triton.jit
def _linear_states_kernel(
    FK, Vv, S0, HS, ZS, SF,
    T, TE, H, NT,
    F: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    # One program: a [BF, BV] tile of the state of one (batch, head), scanned over the NT chunks of BT keys.
    # FK: [B, TE, H, F], Vv: [B, TE, H, V] (only the first T extended keys are read); S0, SF: [B, H, F, V+1]
    # (last column: the feature-key sum z); HS: [B, H, NT, F, V] and ZS: [B, H, NT, F], the state before each
    # chunk. z is kept by every program and stored by those with pid_v == 0.
    pid_f = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_f = pid_f * BF + tl.arange(0, BF)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mf = offs_f < F
    mfv = mf[:, None] & (offs_v[None, :] < V)
    mz = offs_f < tl.where(pid_v == 0, F, 0)  # z is stored by the first V tile only
    s_ptrs = (pid_bh * F + offs_f[:, None]) * (V + 1) + offs_v[None, :]
    z_ptrs = (pid_bh * F + offs_f) * (V + 1) + V
    state = tl.load(S0 + s_ptrs, mask=mfv, other=0.0)
    z = tl.load(S0 + z_ptrs, mask=mf, other=0.0)
    for i in range(NT):
        tl.store(HS + ((pid_bh * NT + i) * F + offs_f[:, None]) * V + offs_v[None, :], state, mask=mfv)
        tl.store(ZS + (pid_bh * NT + i) * F + offs_f, z, mask=mz)
        offs_t = i * BT + tl.arange(0, BT)
        mt = offs_t < T
        fk = tl.load(
            FK + (b * TE + offs_t[:, None]) * H * F + h * F + offs_f[None, :],
            mask=mt[:, None] & mf[None, :],
            other=0.0,
        )
        v = tl.load(
            Vv + (b * TE + offs_t[:, None]) * H * V + h * V + offs_v[None, :],
            mask=mt[:, None] & (offs_v[None, :] < V),
            other=0.0,
        )
        state += tl.dot(tl.trans(fk), v, input_precision="ieee")
        z += tl.sum(fk, 0)
    tl.store(SF + s_ptrs, state, mask=mfv)
    tl.store(SF + z_ptrs, z, mask=mz)


@triton.jit
def _linear_fwd_kernel(
    FQ, FK, Vv, HS, ZS, NUM, DEN,
    T, TE, H, NT,
    F: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    # One program: chunk i (queries i*BT .. and the extended keys of the same indices) x one V tile, of one
    # (batch, head); F in tiles of BF. With A = (fq fkᵀ) ⊙ [j ≤ t]: num = fq h_i + A v, den = fq·z_i + A 1
    # (stored by the first V tile). FQ: [B, T, H, F]; NUM: [B, T, H, V]; DEN: [B, H, T].
    i = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = i * BT + tl.arange(0, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mt = offs_t < T
    mv = offs_v < V
    num = tl.zeros([BT, BV], dtype=tl.float32)
    a = tl.zeros([BT, BT], dtype=tl.float32)
    den = tl.zeros([BT], dtype=tl.float32)
    for f0 in range(0, F, BF):
        offs_f = f0 + tl.arange(0, BF)
        mf = offs_f < F
        fq = tl.load(
            FQ + (b * T + offs_t[:, None]) * H * F + h * F + offs_f[None, :],
            mask=mt[:, None] & mf[None, :],
            other=0.0,
        )
        fk = tl.load(
            FK + (b * TE + offs_t[:, None]) * H * F + h * F + offs_f[None, :],
            mask=mt[:, None] & mf[None, :],
            other=0.0,
        )
        hs = tl.load(
            HS + ((pid_bh * NT + i) * F + offs_f[:, None]) * V + offs_v[None, :],
            mask=mf[:, None] & mv[None, :],
            other=0.0,
        )
        z = tl.load(ZS + (pid_bh * NT + i) * F + offs_f, mask=mf, other=0.0)
        num += tl.dot(fq, hs, input_precision="ieee")
        a += tl.dot(fq, tl.trans(fk), input_precision="ieee")
        den += tl.sum(fq * z[None, :], 1)
    a = tl.where(offs_t[None, :] <= offs_t[:, None], a, 0.0)
    v = tl.load(
        Vv + (b * TE + offs_t[:, None]) * H * V + h * V + offs_v[None, :],
        mask=mt[:, None] & mv[None, :],
        other=0.0,
    )
    num += tl.dot(a, v, input_precision="ieee")
    den += tl.sum(a, 1)
    tl.store(
        NUM + (b * T + offs_t[:, None]) * H * V + h * V + offs_v[None, :], num, mask=mt[:, None] & mv[None, :]
    )
    tl.store(DEN + pid_bh * T + offs_t, den, mask=offs_t < tl.where(pid_v == 0, T, 0))


@triton.jit
def _linear_bwd_states_kernel(
    FQ, GNUM, GDEN, GSF, DHS, DZS, DS0,
    T, H, NT,
    F: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    # The reverse scan: DHS[i], DZS[i] = the gradient of the state AFTER chunk i (what chunk i's keys feed),
    # starting from GSF (the final state's gradient, [B, H, F, V+1]); chunk i's queries add fq_iᵀ gnum_i to it
    # on the way down, and what is left at the start is the initial state's gradient DS0. Tiled as the forward
    # scan; GNUM: [B, T, H, V], GDEN: [B, H, T].
    pid_f = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_f = pid_f * BF + tl.arange(0, BF)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mf = offs_f < F
    mv = offs_v < V
    mfv = mf[:, None] & mv[None, :]
    mz = offs_f < tl.where(pid_v == 0, F, 0)  # z is stored by the first V tile only
    s_ptrs = (pid_bh * F + offs_f[:, None]) * (V + 1) + offs_v[None, :]
    z_ptrs = (pid_bh * F + offs_f) * (V + 1) + V
    dh = tl.load(GSF + s_ptrs, mask=mfv, other=0.0)
    dz = tl.load(GSF + z_ptrs, mask=mf, other=0.0)
    for i in range(NT - 1, -1, -1):
        tl.store(DHS + ((pid_bh * NT + i) * F + offs_f[:, None]) * V + offs_v[None, :], dh, mask=mfv)
        tl.store(DZS + (pid_bh * NT + i) * F + offs_f, dz, mask=mz)
        offs_t = i * BT + tl.arange(0, BT)
        mt = offs_t < T
        fq = tl.load(
            FQ + (b * T + offs_t[:, None]) * H * F + h * F + offs_f[None, :],
            mask=mt[:, None] & mf[None, :],
            other=0.0,
        )
        gnum = tl.load(
            GNUM + (b * T + offs_t[:, None]) * H * V + h * V + offs_v[None, :],
            mask=mt[:, None] & mv[None, :],
            other=0.0,
        )
        gden = tl.load(GDEN + pid_bh * T + offs_t, mask=mt, other=0.0)
        dh += tl.dot(tl.trans(fq), gnum, input_precision="ieee")
        dz += tl.sum(fq * gden[:, None], 0)
    tl.store(DS0 + s_ptrs, dh, mask=mfv)
    tl.store(DS0 + z_ptrs, dz, mask=mz)


@triton.jit
def _linear_bwd_dv_kernel(
    FQ, FK, GNUM, DHS, DV,
    T, TE, H, NT,
    F: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    # One program: chunk i x one V tile, F in tiles: dv = Aᵀ gnum + fk dh_i, with A = (fq fkᵀ) ⊙ [j ≤ t] and
    # dh_i the gradient of the state after chunk i. DV: [B, TE, H, V], rows < T written.
    i = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = i * BT + tl.arange(0, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mt = offs_t < T
    mv = offs_v < V
    dv = tl.zeros([BT, BV], dtype=tl.float32)
    a = tl.zeros([BT, BT], dtype=tl.float32)
    for f0 in range(0, F, BF):
        offs_f = f0 + tl.arange(0, BF)
        mf = offs_f < F
        fq = tl.load(
            FQ + (b * T + offs_t[:, None]) * H * F + h * F + offs_f[None, :],
            mask=mt[:, None] & mf[None, :],
            other=0.0,
        )
        fk = tl.load(
            FK + (b * TE + offs_t[:, None]) * H * F + h * F + offs_f[None, :],
            mask=mt[:, None] & mf[None, :],
            other=0.0,
        )
        dhs = tl.load(
            DHS + ((pid_bh * NT + i) * F + offs_f[:, None]) * V + offs_v[None, :],
            mask=mf[:, None] & mv[None, :],
            other=0.0,
        )
        a += tl.dot(fq, tl.trans(fk), input_precision="ieee")
        dv += tl.dot(fk, dhs, input_precision="ieee")
    a = tl.where(offs_t[None, :] <= offs_t[:, None], a, 0.0)
    gnum = tl.load(
        GNUM + (b * T + offs_t[:, None]) * H * V + h * V + offs_v[None, :],
        mask=mt[:, None] & mv[None, :],
        other=0.0,
    )
    dv += tl.dot(tl.trans(a), gnum, input_precision="ieee")
    tl.store(
        DV + (b * TE + offs_t[:, None]) * H * V + h * V + offs_v[None, :], dv, mask=mt[:, None] & mv[None, :]
    )


@triton.jit
def _linear_bwd_dqk_kernel(
    FQ, FK, Vv, HS, ZS, DHS, DZS, GNUM, GDEN, DFQ, DFK,
    T, TE, H, NT,
    F: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    # One program: chunk i x one F tile, V in tiles. With dA = (gnum vᵀ + gden) ⊙ [j ≤ t]:
    # dfq = gnum h_iᵀ + gden z_iᵀ + dA fk,  dfk = dAᵀ fq + v dh_iᵀ + dz_i  ((dh_i, dz_i): the gradient of the
    # state after chunk i). DFQ: [B, T, H, F]; DFK: [B, TE, H, F], rows < T written.
    i = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = i * BT + tl.arange(0, BT)
    offs_f = pid_f * BF + tl.arange(0, BF)
    mt = offs_t < T
    mf = offs_f < F
    da = tl.zeros([BT, BT], dtype=tl.float32)
    dfq = tl.zeros([BT, BF], dtype=tl.float32)
    dfk = tl.zeros([BT, BF], dtype=tl.float32)
    for v0 in range(0, V, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < V
        v = tl.load(
            Vv + (b * TE + offs_t[:, None]) * H * V + h * V + offs_v[None, :],
            mask=mt[:, None] & mv[None, :],
            other=0.0,
        )
        gnum = tl.load(
            GNUM + (b * T + offs_t[:, None]) * H * V + h * V + offs_v[None, :],
            mask=mt[:, None] & mv[None, :],
            other=0.0,
        )
        hs = tl.load(
            HS + ((pid_bh * NT + i) * F + offs_f[:, None]) * V + offs_v[None, :],
            mask=mf[:, None] & mv[None, :],
            other=0.0,
        )
        dhs = tl.load(
            DHS + ((pid_bh * NT + i) * F + offs_f[:, None]) * V + offs_v[None, :],
            mask=mf[:, None] & mv[None, :],
            other=0.0,
        )
        da += tl.dot(gnum, tl.trans(v), input_precision="ieee")
        dfq += tl.dot(gnum, tl.trans(hs), input_precision="ieee")
        dfk += tl.dot(v, tl.trans(dhs), input_precision="ieee")
    gden = tl.load(GDEN + pid_bh * T + offs_t, mask=mt, other=0.0)
    z = tl.load(ZS + (pid_bh * NT + i) * F + offs_f, mask=mf, other=0.0)
    dz = tl.load(DZS + (pid_bh * NT + i) * F + offs_f, mask=mf, other=0.0)
    mtf = mt[:, None] & mf[None, :]
    fq = tl.load(FQ + (b * T + offs_t[:, None]) * H * F + h * F + offs_f[None, :], mask=mtf, other=0.0)
    fk = tl.load(FK + (b * TE + offs_t[:, None]) * H * F + h * F + offs_f[None, :], mask=mtf, other=0.0)
    da = tl.where(offs_t[None, :] <= offs_t[:, None], da + gden[:, None], 0.0)
    dfq += tl.dot(da, fk, input_precision="ieee") + gden[:, None] * z[None, :]
    dfk += tl.dot(tl.trans(da), fq, input_precision="ieee") + dz[None, :]
    tl.store(DFQ + (b * T + offs_t[:, None]) * H * F + h * F + offs_f[None, :], dfq, mask=mtf)
    tl.store(DFK + (b * TE + offs_t[:, None]) * H * F + h * F + offs_f[None, :], dfk, mask=mtf)


# Launch parameters are fixed: the interpreter cannot autotune, and there is no GPU to tune on yet. They are
# the ones that ptxas compiles for sm_90 with (almost) no register spilling at D = F = V = 128 (fp32 "ieee"
# dots run on FMA units, and a 64-deep one holds whole operand rows per thread: 64x64 tiles at 4 warps
# spilled ~10 KB per thread). The interpreter runs the same blocks with one warp, so the tests cover the
# shipped tiling (BM != BN in the window forward, 32-wide F and V tiles).


def _warps(n: int) -> int:
    return 1 if INTERPRET else n


def _blocks(D: int, V: int) -> tuple[dict, dict]:
    """The window kernels' (forward and dq, dkv) launch parameters; D and V are held whole (BD, BV)."""
    whole = dict(BD=max(16, triton.next_power_of_2(D)), BV=max(16, triton.next_power_of_2(V)))
    kv = dict(BM=32, BN=32, num_warps=_warps(8), **whole)
    if not INTERPRET:
        kv["num_stages"] = 1
    return dict(BM=64, BN=32, num_warps=_warps(8), **whole), kv


def _linear_blocks(F: int, V: int) -> tuple[dict, dict]:
    """The linear kernels' (chunk kernels, state scans) launch parameters: chunks of BT tokens, F and V in
    tiles of at most 32 (registers stay bounded for any F, V)."""
    tiles = dict(
        BT=64,
        BF=max(16, min(32, triton.next_power_of_2(F))),
        BV=max(16, min(32, triton.next_power_of_2(V))),
    )
    return dict(num_warps=_warps(8), **tiles), dict(num_warps=_warps(4), **tiles)


class _WindowPart(torch.autograd.Function):
    """(qs, k_ext, v_ext, lo) -> (num [B, T, H, V], den [B, H, T]): the unnormalised max-subtracted window
    softmax, num_t = Σ_{s in window} exp(s_ts - m_t) v_s, den_t = Σ exp(s_ts - m_t), s_ts = scale q_t·k_s.
    All float32 and contiguous; lo: [B] int32, the first real extended key."""

    @staticmethod
    def forward(ctx, q, k_ext, v_ext, lo, window: int, scale: float):
        B, T, H, D = q.shape
        V = v_ext.shape[-1]
        cfg, _ = _blocks(D, V)
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
        cfg, cfg_kv = _blocks(D, V)
        gnum = gnum.float().contiguous()
        gden = gden.float().contiguous()
        dlt = ((gnum * num).sum(-1).permute(0, 2, 1) + gden * den).contiguous()  # [B, H, T]
        dq = torch.full_like(q, float("nan"))
        dk = torch.full_like(k_ext, float("nan"))
        dv = torch.full_like(v_ext, float("nan"))
        args = (q, k_ext, v_ext, lo, gnum, gden, m, arg, dlt)
        meta = (T, H, ctx.window, ctx.scale)
        _window_bwd_dq_kernel[(triton.cdiv(T, cfg["BM"]), B * H)](*args, dq, *meta, D=D, V=V, **cfg)
        grid = (triton.cdiv(TE, cfg_kv["BN"]), B * H)
        _window_bwd_dkv_kernel[grid](*args, dk, dv, *meta, D=D, V=V, **cfg_kv)
        return dq, dk, dv, None, None, None


class _LinearPart(torch.autograd.Function):
    """(fq, fk_ext, v_ext, s0) -> (num [B, T, H, V], den [B, H, T], final state [B, H, F, V+1]): causal linear
    attention between fq and the first T extended keys, num_t = fq_t (h0 + Σ_{j≤t} fk_j v_jᵀ) and
    den_t = fq_t·(z0 + Σ_{j≤t} fk_j), where s0 = [h0, z0]. fq: [B, T, H, F]; fk_ext: [B, W+T, H, F] (zero on
    never-filled slots, so the ones column of v_aug is implicit); v_ext: [B, W+T, H, V]. All float32 and
    contiguous. Only the inputs are saved: backward recomputes the per-chunk states."""

    @staticmethod
    def _states(fk_ext, v_ext, s0, T, scan):
        """The state before each chunk, hs [B, H, NT, F, V] and zs [B, H, NT, F], and the final state."""
        B, H, F, V1 = s0.shape
        NT = triton.cdiv(T, scan["BT"])
        nan = dict(dtype=torch.float32, device=s0.device)
        hs = torch.full((B, H, NT, F, V1 - 1), float("nan"), **nan)
        zs = torch.full((B, H, NT, F), float("nan"), **nan)
        sf = torch.full_like(s0, float("nan"))
        grid = (triton.cdiv(F, scan["BF"]), triton.cdiv(V1 - 1, scan["BV"]), B * H)
        args = (fk_ext, v_ext, s0, hs, zs, sf, T, v_ext.shape[1], H, NT)
        _linear_states_kernel[grid](*args, F=F, V=V1 - 1, **scan)
        return hs, zs, sf

    @staticmethod
    def forward(ctx, fq, fk_ext, v_ext, s0):
        B, T, H, F = fq.shape
        TE, V = v_ext.shape[1], v_ext.shape[-1]
        chunk, scan = _linear_blocks(F, V)
        hs, zs, sf = _LinearPart._states(fk_ext, v_ext, s0, T, scan)
        num = torch.full((B, T, H, V), float("nan"), dtype=torch.float32, device=fq.device)
        den = torch.full((B, H, T), float("nan"), dtype=torch.float32, device=fq.device)
        NT = hs.shape[2]
        if T > 0:
            grid = (NT, triton.cdiv(V, chunk["BV"]), B * H)
            _linear_fwd_kernel[grid](fq, fk_ext, v_ext, hs, zs, num, den, T, TE, H, NT, F=F, V=V, **chunk)
        ctx.save_for_backward(fq, fk_ext, v_ext, s0)
        return num, den, sf

    @staticmethod
    def backward(ctx, gnum, gden, gsf):
        fq, fk_ext, v_ext, s0 = ctx.saved_tensors
        B, T, H, F = fq.shape
        TE, V = v_ext.shape[1], v_ext.shape[-1]
        chunk, scan = _linear_blocks(F, V)
        hs, zs, _ = _LinearPart._states(fk_ext, v_ext, s0, T, scan)
        NT = hs.shape[2]
        gnum, gden, gsf = (g.float().contiguous() for g in (gnum, gden, gsf))
        dhs, dzs = torch.full_like(hs, float("nan")), torch.full_like(zs, float("nan"))
        ds0 = torch.full_like(gsf, float("nan"))
        grid = (triton.cdiv(F, scan["BF"]), triton.cdiv(V, scan["BV"]), B * H)
        _linear_bwd_states_kernel[grid](fq, gnum, gden, gsf, dhs, dzs, ds0, T, H, NT, F=F, V=V, **scan)
        dfq = torch.full_like(fq, float("nan"))
        dfk, dv = torch.full_like(fk_ext, float("nan")), torch.full_like(v_ext, float("nan"))
        if T > 0:
            grid = (NT, triton.cdiv(V, chunk["BV"]), B * H)
            _linear_bwd_dv_kernel[grid](fq, fk_ext, gnum, dhs, dv, T, TE, H, NT, F=F, V=V, **chunk)
            grid = (NT, triton.cdiv(F, chunk["BF"]), B * H)
            args = (fq, fk_ext, v_ext, hs, zs, dhs, dzs, gnum, gden, dfq, dfk, T, TE, H, NT)
            _linear_bwd_dqk_kernel[grid](*args, F=F, V=V, **chunk)
        # The last W extended keys are newer than every query's old keys: no linear-part gradient.
        dfk[:, T:] = 0
        dv[:, T:] = 0
        return dfq, dfk, dv, ds0


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
    """Same contract as window_linear_chunked (arguments already checked by `window_linear`). The kernels'
    math is float32 for every input dtype: float64 inputs are computed in float32 (their final linear_state
    is returned as float64, as the state's contract says, but carries float32 precision)."""
    B, T, H, D = q.shape
    V, F = v.shape[-1], fq.shape[-1]
    NT = triton.cdiv(T, _linear_blocks(F, V)[0]["BT"])
    largest = max(B * (window + T) * H * max(D, F, V), B * H * NT * F * V)
    if largest >= 2**31:
        raise ValueError(
            f"impl='triton' indexes its buffers with int32, so each must hold < 2**31 elements; this call needs "
            f"{largest} (B={B}, T={T}, H={H}, W={window}, D={D}, F={F}, V={V}): split the batch or the sequence "
            "(carry the final state)"
        )
    dtype = torch.float32
    scale = D**-0.5 if scale is None else scale
    state = empty_window_linear_state(q, v, fq, window) if initial_state is None else initial_state
    k_ext, fk_ext, v_aug_ext, _ = extend_with_window(state, k, fk, v, dtype)
    v_ext = v_aug_ext[..., :V].contiguous()
    fk_ext = fk_ext.contiguous()
    s0 = state.linear_state.to(dtype).contiguous()
    num_lin, den_lin, S = _LinearPart.apply(fq.to(dtype).contiguous(), fk_ext, v_ext, s0)
    if T == 0:
        o = v.new_zeros(B, 0, H, V)
    else:
        lo = (window - state.seen.clamp(max=window)).to(torch.int32).contiguous()
        num_win, den_win = _WindowPart.apply(
            q.to(dtype).contiguous(), k_ext.contiguous(), v_ext, lo, window, float(scale)
        )
        w = window_factor.to(dtype)[:, None]  # [H, 1]: broadcasts over [.., H, V] and [.., H, T]
        num = w * num_win + (1 - w) * num_lin
        den = (w * den_win + (1 - w) * den_lin).permute(0, 2, 1)[..., None]  # [B, T, H, 1]
        o = (num / (den + eps)).to(v.dtype)
    if not output_final_state:
        return o, None
    final = WindowLinearState(
        linear_state=S.to(torch.promote_types(q.dtype, dtype)),
        k_window=k_ext[:, T:].to(k.dtype),
        fk_window=fk_ext[:, T:].to(fk.dtype),
        v_window=v_ext[:, T:].to(v.dtype),
        seen=state.seen + T,
    )
    return o, final
