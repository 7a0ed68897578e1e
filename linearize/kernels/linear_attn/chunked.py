"""Chunked causal linear attention in plain torch (the CPU path).

Self-contained on purpose: imports only torch, because this file is copied verbatim into exported checkpoints
that run without linearize installed.
"""

import torch
import torch.nn.functional as F


def check_linear_attn_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None,
    normalize: bool,
) -> None:
    """Raise ValueError, stating the rule, unless q, k: [B, T, H, K], v: [B, T, H, V] and
    initial_state is None or [B, H, K, V+1] (normalize) / [B, H, K, V] (not normalize)."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [B, T, H, K], got {list(q.shape)} and {list(k.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with the same B, T, H as q {list(q.shape)}, got {list(v.shape)}"
        )
    if initial_state is not None:
        B, _, H, K = q.shape
        V = v.shape[-1]
        want, rule = ([B, H, K, V + 1], "[B, H, K, V+1]") if normalize else ([B, H, K, V], "[B, H, K, V]")
        if list(initial_state.shape) != want:
            raise ValueError(
                f"initial_state must have shape {rule} = {want} when normalize={normalize}, "
                f"got {list(initial_state.shape)}"
            )


def linear_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention, chunk by chunk: exact causal quadratic form inside a chunk, carried state
    between chunks. Any T (the tail chunk is zero-padded).

    q, k: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V'] with V' = V + 1 when normalize
    (last column = running key sum) else V' = V.
    Returns o: [B, T, H, V] in v.dtype, and the final state [B, H, K, V'] (or None), float32
    (float64 for float64 inputs).
    """
    check_linear_attn_args(q, k, v, initial_state, normalize)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    # Low-precision state sums drift over long sequences, so the math is at least float32.
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    scale = K**-0.5 if scale is None else scale
    q, k, v_aug = q.to(dtype), k.to(dtype), v.to(dtype)
    if scale != 1.0:  # (the mixers' feature maps come scaled: a full-size multiply saved)
        q = q * scale
    if normalize:
        # A ones column turns the denominator into one more value column of the same recurrence.
        v_aug = torch.cat([v_aug, v_aug.new_ones(B, T, H, 1)], dim=-1)
    Va = v_aug.shape[-1]
    C = max(1, min(chunk_size, T))
    N = -(-T // C)

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, D] -> [B, H, N, C, D], contiguous once (each is used by two products, forward and
        # backward). Zero keys/values add nothing to the state; padded queries' outputs are dropped.
        if N * C > T:
            x = F.pad(x, (0, 0, 0, 0, 0, N * C - T))
        return x.transpose(1, 2).contiguous().view(B, H, N, C, x.shape[-1])

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v_aug)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0)  # [B, H, N, C, C]
    # The state before chunk n is the sum of the chunks before it: a product with a strictly lower
    # triangular matrix of ones over the chunk axis (cumsum along a middle axis, and its backward's flip,
    # are several times slower on CPU). [B, H, N, K * Va] -> states before each chunk [B, H, N, K, Va].
    increments = (kc.transpose(-1, -2) @ vc).view(B, H, N, K * Va)
    before = torch.ones(N, N, dtype=dtype, device=q.device).tril(-1)
    states = (before @ increments).view(B, H, N, K, Va)
    if initial_state is not None:
        states = states + initial_state.to(dtype)[:, :, None]
    o = scores @ vc + qc @ states  # [B, H, N, C, Va]
    o = o.view(B, H, N * C, Va).transpose(1, 2)[:, :T]
    if normalize:
        o = o[..., :V] / (o[..., V:] + eps)
    final = None
    if output_final_state:  # the sum of every chunk (of none when T = 0), after the initial state
        final = increments.sum(dim=2).view(B, H, K, Va)
        final = final if initial_state is None else final + initial_state.to(dtype)
    return o.to(v.dtype), final
