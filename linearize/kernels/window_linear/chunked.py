"""Chunked sliding-window + linear attention in plain torch (the CPU path), and the decode state it shares
with the other forms.

Self-contained on purpose: imports only torch, because this file is copied verbatim into exported checkpoints
that run without linearize installed.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class WindowLinearState(NamedTuple):
    """Everything a decode step needs; its size does not depend on the number of tokens seen.

    linear_state: [B, H, F, V+1], float32 (float64 for float64 inputs): sum of fk_s [v_s, 1]ᵀ over the keys
        that have LEFT the window (last column = their feature-key sum, the normaliser).
    k_window: [B, W, H, D], fk_window: [B, W, H, F], v_window: [B, W, H, V], in the input dtype: the last W
        keys (raw and feature-mapped) and values, older first. Slots before the first token are zero.
    seen: [B] int64, tokens seen so far; the last min(seen, W) window slots hold real tokens.
    """

    linear_state: torch.Tensor
    k_window: torch.Tensor
    fk_window: torch.Tensor
    v_window: torch.Tensor
    seen: torch.Tensor


def empty_window_linear_state(
    q: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, window: int
) -> WindowLinearState:
    """The state before any token, shaped for q: [B, *, H, D], v: [B, *, H, V], fq: [B, *, H, F]."""
    B, _, H, D = q.shape
    V, Fd = v.shape[-1], fq.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    return WindowLinearState(
        linear_state=q.new_zeros(B, H, Fd, V + 1, dtype=dtype),
        k_window=q.new_zeros(B, window, H, D),
        fk_window=fq.new_zeros(B, window, H, Fd),
        v_window=v.new_zeros(B, window, H, V),
        seen=torch.zeros(B, dtype=torch.int64, device=q.device),
    )


def check_window_linear_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window: int,
    window_factor: torch.Tensor,
    state: WindowLinearState | None,
    state_name: str = "initial_state",
    tokens: str = "T",
) -> None:
    """Raise ValueError, stating the rule, unless q, k: [B, T, H, D], fq, fk: [B, T, H, F], v: [B, T, H, V]
    share one floating dtype, window is an integer >= 1, window_factor is [H] with values in (0, 1), and
    state is None or a WindowLinearState of the documented shapes."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [B, {tokens}, H, D], got {list(q.shape)} and {list(k.shape)}"
        )
    if tokens == "1" and q.shape[1] != 1:
        raise ValueError(f"a decode step takes one token: q must be [B, 1, H, D], got {list(q.shape)}")
    if fq.dim() != 4 or fq.shape != fk.shape or fq.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"fq and fk must have the same shape [B, {tokens}, H, F] with the same B, {tokens}, H as q "
            f"{list(q.shape)}, got {list(fq.shape)} and {list(fk.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, {tokens}, H, V] with the same B, {tokens}, H as q {list(q.shape)}, "
            f"got {list(v.shape)}"
        )
    dtypes = [x.dtype for x in (q, k, v, fq, fk)]
    if len(set(dtypes)) != 1 or not dtypes[0].is_floating_point:
        raise ValueError(f"q, k, v, fq, fk must share one floating dtype, got {[str(d) for d in dtypes]}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    B, _, H, D = q.shape
    if not isinstance(window_factor, torch.Tensor) or list(window_factor.shape) != [H]:
        got = list(window_factor.shape) if isinstance(window_factor, torch.Tensor) else type(window_factor)
        raise ValueError(f"window_factor must be a tensor of shape [H] = [{H}], got {got}")
    if not bool(((window_factor > 0) & (window_factor < 1)).all()):
        raise ValueError(
            "window_factor must lie in the open interval (0, 1) (pass sigmoid of the logits), "
            f"got values in [{window_factor.min().item()}, {window_factor.max().item()}]"
        )
    if state is None:
        return
    if not isinstance(state, WindowLinearState):
        raise ValueError(f"{state_name} must be a WindowLinearState or None, got {type(state).__name__}")
    V, Fd = v.shape[-1], fq.shape[-1]
    want = {
        "linear_state": ([B, H, Fd, V + 1], "[B, H, F, V+1]"),
        "k_window": ([B, window, H, D], "[B, W, H, D]"),
        "fk_window": ([B, window, H, Fd], "[B, W, H, F]"),
        "v_window": ([B, window, H, V], "[B, W, H, V]"),
        "seen": ([B], "[B]"),
    }
    for name, (shape, rule) in want.items():
        got = list(getattr(state, name).shape)
        if got != shape:
            raise ValueError(f"{state_name}.{name} must have shape {rule} = {shape} (W = window), got {got}")


def extend_with_window(
    state: WindowLinearState, k: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state's W window slots followed by the T new tokens: k_ext [B, W+T, H, D], fk_ext [B, W+T, H, F],
    v_aug_ext [B, W+T, H, V+1] (a ones column appended), in `dtype`, with slots of never-seen tokens zeroed;
    and valid [B, W+T] (False on those slots). New token t sits at index W + t."""
    W = state.k_window.shape[1]
    B, T = k.shape[:2]
    n_prev = state.seen.clamp(max=W)
    idx = torch.arange(W + T, device=k.device)
    valid = idx[None, :] >= (W - n_prev)[:, None]
    m = valid[:, :, None, None]

    def ext(window: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([window.to(dtype), x.to(dtype)], dim=1)
        return torch.where(m, x, torch.zeros((), dtype=dtype, device=x.device))

    k_ext, fk_ext, v_ext = ext(state.k_window, k), ext(state.fk_window, fk), ext(state.v_window, v)
    v_aug_ext = torch.cat([v_ext, m.to(dtype).expand(*v_ext.shape[:3], 1)], dim=-1)
    return k_ext, fk_ext, v_aug_ext, valid


def window_part_chunked(
    qs: torch.Tensor,
    k_ext: torch.Tensor,
    v_aug_ext: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    chunk_size: int,
) -> torch.Tensor:
    """Unnormalised max-subtracted softmax over the window: for query t (index W + t in the extended keys)
    returns sum_s exp(s_ts - m_t) [v_s, 1] over the window keys s, as [B, T, H, V+1].

    qs: [B, T, H, D] (already scaled); k_ext: [B, W+T, H, D]; v_aug_ext: [B, W+T, H, V+1]; valid: [B, W+T].
    """
    B, T, H, D = qs.shape
    Va = v_aug_ext.shape[-1]
    W = window
    if T == 0:
        return qs.new_zeros(B, 0, H, Va)
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    L = C + W - 1  # keys any query of one chunk can see: extended indices nC+1 .. nC+C+W-1
    qc = F.pad(qs, (0, 0, 0, 0, 0, N * C - T)).reshape(B, N, C, H, D).permute(0, 3, 1, 2, 4)

    def band(x: torch.Tensor) -> torch.Tensor:
        # [B, W+T, H, E] -> [B, H, N, L, E]; band n = extended indices nC+1 .. nC+L. Padded keys only reach
        # padded queries, whose outputs are dropped.
        x = F.pad(x[:, 1:], (0, 0, 0, 0, 0, N * C - T))
        return x.unfold(1, L, C).permute(0, 2, 1, 4, 3)

    kb, vb = band(k_ext), band(v_aug_ext)
    # Padded slots count as valid so that a padded query's row is never fully masked (no NaN in backward).
    vmask = F.pad(valid[:, 1:], (0, N * C - T), value=True).unfold(1, L, C)  # [B, N, L]
    i = torch.arange(C, device=qs.device)[:, None]
    r = torch.arange(L, device=qs.device)[None, :]
    in_window = (r >= i) & (r <= i + W - 1)  # key index nC+1+r in (t, t+W] for query t = nC+i
    mask = in_window[None, None, None] & vmask[:, None, :, None, :]  # [B, 1, N, C, L]
    scores = (qc @ kb.transpose(-1, -2)).masked_fill(~mask, -math.inf)
    # Every row keeps its own key (r = i + W - 1), so the max is finite.
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    out = p @ vb  # [B, H, N, C, Va]
    return out.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Va)[:, :T]


def linear_part_chunked(
    fq: torch.Tensor, fk: torch.Tensor, v_aug: torch.Tensor, S0: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised causal linear attention o_t = fq_t (S0 + sum_{s<=t} fk_s v_aug_sᵀ), chunk by chunk.

    fq, fk: [B, T, H, F]; v_aug: [B, T, H, Va]; S0: [B, H, F, Va]. Returns o [B, T, H, Va] and the final
    state [B, H, F, Va]."""
    B, T, H, Fd = fq.shape
    Va = v_aug.shape[-1]
    C = max(1, min(chunk_size, T))
    N = -(-T // C)

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, E] -> [B, H, N, C, E]; zero keys/values add nothing, padded queries are dropped.
        x = F.pad(x, (0, 0, 0, 0, 0, N * C - T))
        return x.reshape(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    qc, kc, vc = to_chunks(fq), to_chunks(fk), to_chunks(v_aug)
    causal = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0)
    states = torch.cat([S0[:, :, None], kc.transpose(-1, -2) @ vc], dim=2).cumsum(dim=2)  # [B, H, N+1, F, Va]
    o = scores @ vc + qc @ states[:, :, :N]
    return o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Va)[:, :T], states[:, :, N]


def combine_parts(
    win: torch.Tensor, lin: torch.Tensor, window_factor: torch.Tensor, eps: float
) -> torch.Tensor:
    """o = (w num_win + (1-w) num_lin) / (w den_win + (1-w) den_lin + eps); win, lin: [B, T, H, V+1] with the
    denominator in the last column; window_factor: [H]. Returns [B, T, H, V]."""
    w = window_factor.to(win.dtype)[:, None]
    mix = w * win + (1 - w) * lin
    return mix[..., :-1] / (mix[..., -1:] + eps)


def window_linear_chunked(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, WindowLinearState | None]:
    """Sliding-window softmax + linear attention over older keys, chunk by chunk (see README.md).

    q, k: [B, T, H, D]; fq, fk: [B, T, H, F] (feature-mapped, non-negative); v: [B, T, H, V];
    window: W >= 1; window_factor: [H] in (0, 1); scale: multiplies q·k, None means D ** -0.5.
    initial_state: WindowLinearState or None. Any T and W (the tail chunk is zero-padded).
    Returns o: [B, T, H, V] in v.dtype, and the final WindowLinearState (or None).
    """
    check_window_linear_args(q, k, v, fq, fk, window, window_factor, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    T, D = q.shape[1], q.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5 if scale is None else scale
    state = empty_window_linear_state(q, v, fq, window) if initial_state is None else initial_state
    k_ext, fk_ext, v_aug_ext, valid = extend_with_window(state, k, fk, v, dtype)
    win = window_part_chunked(q.to(dtype) * scale, k_ext, v_aug_ext, valid, window, chunk_size)
    # Key s leaves the window of query t once s <= t - W: in extended indices that is j <= t, so the linear
    # part is causal linear attention over the extended keys shifted by W.
    lin, S = linear_part_chunked(
        fq.to(dtype), fk_ext[:, :T], v_aug_ext[:, :T], state.linear_state.to(dtype), chunk_size
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
