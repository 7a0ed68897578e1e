"""Quadratic form of sliding-window + linear attention (LoLCATs' hybrid_attention_quadratic): the
specification the other forms must match."""

import math

import torch

from .chunked import WindowLinearState, check_window_linear_args


def window_linear_reference(
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
    """Full [T, W+T] score matrices with a window mask and an old-keys mask.

    q, k: [B, T, H, D]; fq, fk: [B, T, H, F]; v: [B, T, H, V]; window_factor: [H] in (0, 1).
    initial_state: its W window slots are a prefix of keys at positions -W .. -1 (the last min(seen, W) of
    them real), and its linear_state is added to the linear part of every query.
    Returns o: [B, T, H, V] in v.dtype and the final WindowLinearState (or None). Math runs in float64 for
    float64 inputs, else float32.
    """
    check_window_linear_args(q, k, v, fq, fk, window, window_factor, initial_state)
    B, T, H, D = q.shape
    V, Fd, W = v.shape[-1], fq.shape[-1], window
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D**-0.5 if scale is None else scale
    if initial_state is None:
        z = q.new_zeros
        initial_state = WindowLinearState(
            z(B, H, Fd, V + 1, dtype=dtype),
            z(B, W, H, D),
            z(B, W, H, Fd),
            z(B, W, H, V),
            z(B, dtype=torch.long),
        )
    st = initial_state
    kk = torch.cat([st.k_window.to(dtype), k.to(dtype)], dim=1)  # [B, W+T, H, D], positions -W .. T-1
    ff = torch.cat([st.fk_window.to(dtype), fk.to(dtype)], dim=1)
    vv = torch.cat([st.v_window.to(dtype), v.to(dtype)], dim=1)
    vv = torch.cat([vv, vv.new_ones(B, W + T, H, 1)], dim=-1)  # ones column: the denominator
    pos_k = torch.arange(-W, T, device=q.device)
    pos_q = torch.arange(T, device=q.device)
    real = pos_k[None, :] >= -st.seen.clamp(max=W)[:, None]  # [B, W+T]: slots that hold a token
    lag = pos_q[:, None] - pos_k[None, :]  # t - s
    in_window = ((lag >= 0) & (lag < W))[None] & real[:, None]  # [B, T, W+T]
    in_old = (lag >= W)[None] & real[:, None]
    w = window_factor.to(dtype)[:, None, None]  # [H, 1, 1]

    s = torch.einsum("bthd,bshd->bhts", q.to(dtype) * scale, kk)
    s = s.masked_fill(~in_window[:, None], -math.inf)
    a = w * torch.exp(s - s.amax(dim=-1, keepdim=True))
    lin = torch.einsum("bthf,bshf->bhts", fq.to(dtype), ff)
    b = (1 - w) * torch.where(in_old[:, None], lin, torch.zeros((), dtype=dtype))
    S0 = st.linear_state.to(dtype)
    out = torch.einsum("bhts,bshv->bthv", a + b, vv)
    out = out + (1 - w[:, 0]) * torch.einsum("bthf,bhfv->bthv", fq.to(dtype), S0)
    o = (out[..., :V] / (out[..., V:] + eps)).to(v.dtype)
    if not output_final_state:
        return o, None
    left = (pos_k <= T - 1 - W)[None] & real  # keys outside the window of the next token
    ff_left = torch.where(left[:, :, None, None], ff, torch.zeros((), dtype=dtype))
    S = S0 + torch.einsum("bshf,bshv->bhfv", ff_left, vv)
    keep = real[:, T:, None, None]
    zero = torch.zeros((), dtype=dtype)
    final = WindowLinearState(
        linear_state=S,
        k_window=torch.where(keep, kk[:, T:], zero).to(k.dtype),
        fk_window=torch.where(keep, ff[:, T:], zero).to(fk.dtype),
        v_window=torch.where(keep, vv[:, T:, :, :V], zero).to(v.dtype),
        seen=st.seen + T,
    )
    return o, final
