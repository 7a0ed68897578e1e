"""One-token decode for sliding-window + linear attention, with a fixed-size state.

Imports only torch: this file is copied verbatim into exported checkpoints. So it does not import
chunked.py's WindowLinearState: it takes any NamedTuple with its five fields and returns the same type
(`state._replace`). Argument checks and the empty state live in the public `window_linear_step`.
"""

import math
from typing import NamedTuple

import torch


def window_linear_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    state: NamedTuple,
    *,
    window: int,
    window_factor: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, NamedTuple]:
    """Advance by one token (arguments unchecked: `linearize.kernels.window_linear.window_linear_step`
    checks them and accepts state=None).

    q, k: [B, 1, H, D]; fq, fk: [B, 1, H, F]; v: [B, 1, H, V]; window_factor: [H] in (0, 1);
    state: WindowLinearState (linear_state [B, H, F, V+1], k/fk/v_window [B, W, H, *] older first, seen [B]).
    Returns o: [B, 1, H, V] in v.dtype and the new state, of the same type and shapes as the old one: the
    oldest window slot moves into linear_state, the new token enters the window.
    """
    D, V, W = q.shape[-1], v.shape[-1], window
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5 if scale is None else scale
    zero = torch.zeros((), dtype=dtype, device=q.device)

    # Slot 0 holds token t - W, which leaves the window now (a real token only once W tokens were seen).
    leaving = (state.seen >= W)[:, None, None]
    f0 = torch.where(leaving, state.fk_window[:, 0].to(dtype), zero)  # [B, H, F]
    v0 = torch.cat([state.v_window[:, 0].to(dtype), torch.ones_like(f0[..., :1])], dim=-1)
    S = state.linear_state.to(dtype) + f0[..., :, None] * v0[..., None, :]

    k_win = torch.cat([state.k_window[:, 1:].to(k.dtype), k], dim=1)  # [B, W, H, D], older first
    fk_win = torch.cat([state.fk_window[:, 1:].to(fk.dtype), fk], dim=1)
    v_win = torch.cat([state.v_window[:, 1:].to(v.dtype), v], dim=1)
    seen = state.seen + 1
    real = torch.arange(W, device=q.device)[None, :] >= (W - seen.clamp(max=W))[:, None]  # [B, W]

    # Broadcast-and-sum rather than einsum: at decode sizes einsum's dispatch dominates the arithmetic.
    s = (q.to(dtype) * scale * k_win.to(dtype)).sum(-1)  # [B, W, H]
    s = s.masked_fill(~real[:, :, None], -math.inf)
    w = window_factor.to(dtype)  # [H]
    a = w * torch.exp(s - s.amax(dim=1, keepdim=True))  # [B, W, H]
    v_real = torch.where(real[:, :, None, None], v_win.to(dtype), zero)
    num = (a[..., None] * v_real).sum(1)  # [B, H, V]
    lin = (fq[:, 0].to(dtype)[..., None] * S).sum(-2)  # [B, H, V+1]
    out = torch.cat([num, a.sum(1)[..., None]], dim=-1) + (1 - w)[:, None] * lin
    o = out[..., :V] / (out[..., V:] + eps)
    new_state = state._replace(linear_state=S, k_window=k_win, fk_window=fk_win, v_window=v_win, seen=seen)
    return o[:, None].to(v.dtype), new_state
