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
    """Raise ValueError, stating the rule, unless q: [B, T, H, K], k: [B, T, H_kv, K], v: [B, T, H_kv, V]
    with H a multiple of H_kv (grouped-query attention: H_kv = H is plain multi-head), and initial_state is
    None or [B, H_kv, K, V+1] (normalize) / [B, H_kv, K, V] (not normalize)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q must be [B, T, H, K] and k [B, T, H_kv, K] with the same B, T, K, got {list(q.shape)} and "
            f"{list(k.shape)}"
        )
    if q.shape[2] % max(k.shape[2], 1) or k.shape[2] == 0:
        raise ValueError(
            f"q's heads ({q.shape[2]}) must be a multiple of k's ({k.shape[2]}): each key/value head serves "
            "H / H_kv query heads"
        )
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H_kv, V] with the same B, T, H_kv as k {list(k.shape)}, got {list(v.shape)}"
        )
    if initial_state is not None:
        B, _, Hk, K = k.shape
        V = v.shape[-1]
        want, rule = (
            ([B, Hk, K, V + 1], "[B, H_kv, K, V+1]") if normalize else ([B, Hk, K, V], "[B, H_kv, K, V]")
        )
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

    q: [B, T, H, K]; k: [B, T, H_kv, K]; v: [B, T, H_kv, V] (H_kv divides H; query head h reads key/value
    head h // (H / H_kv), as `repeat_interleave` would give); initial_state: [B, H_kv, K, V'] with V' = V + 1
    when normalize (last column = running key sum) else V' = V.

    Precision: the products run in the inputs' dtype (bf16/fp16 inputs: half-precision products, as fla's
    kernels take them), the states between chunks and the normaliser's division in float32 (float64 for
    float64 inputs).
    Returns o: [B, T, H, V] in v.dtype, and the final state [B, H_kv, K, V'] (or None) in the state dtype.
    """
    check_linear_attn_args(q, k, v, initial_state, normalize)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    B, T, H, K = q.shape
    Hk, V = k.shape[2], v.shape[-1]
    G = H // Hk
    # Low-precision state sums drift over long sequences, so the states are at least float32.
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    compute = torch.promote_types(q.dtype, v.dtype)  # the products' dtype
    scale = K**-0.5 if scale is None else scale
    q, k, v_aug = q.to(compute), k.to(compute), v.to(compute)
    if scale != 1.0:  # (the mixers' feature maps come scaled: a full-size multiply saved)
        q = q * scale
    if normalize:
        # A ones column turns the denominator into one more value column of the same recurrence.
        v_aug = torch.cat([v_aug, v_aug.new_ones(B, T, Hk, 1)], dim=-1)
    Va = v_aug.shape[-1]
    C = max(1, min(chunk_size, T))
    N = -(-T // C)

    def pad(x: torch.Tensor) -> torch.Tensor:
        # Zero keys/values add nothing to the state; padded queries' outputs are dropped.
        return F.pad(x, (0, 0, 0, 0, 0, N * C - T)) if N * C > T else x

    # Chunks, contiguous once (each is used by two products, forward and backward). A query row of a chunk
    # is (position c, group member g), c * G + g: the G query heads of one key/value head share its keys.
    qc = pad(q).view(B, N, C, Hk, G, K).permute(0, 3, 1, 2, 4, 5).reshape(B, Hk, N, C * G, K)
    kc = pad(k).transpose(1, 2).contiguous().view(B, Hk, N, C, K)
    vc = pad(v_aug).transpose(1, 2).contiguous().view(B, Hk, N, C, Va)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril().repeat_interleave(G, dim=0)
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0)  # [B, Hk, N, C * G, C]
    # The state before chunk n is the sum of the chunks before it: a product with a strictly lower
    # triangular matrix of ones over the chunk axis (cumsum along a middle axis, and its backward's flip,
    # are several times slower on CPU), in the state dtype. [B, Hk, N, K * Va] -> [B, Hk, N, K, Va].
    increments = (kc.transpose(-1, -2) @ vc).to(dtype).view(B, Hk, N, K * Va)
    before = torch.ones(N, N, dtype=dtype, device=q.device).tril(-1)
    states = (before @ increments).view(B, Hk, N, K, Va)
    if initial_state is not None:
        states = states + initial_state.to(dtype)[:, :, None]
    o = scores @ vc + qc @ states.to(compute)  # [B, Hk, N, C * G, Va]
    o = o.view(B, Hk, N * C, G, Va).permute(0, 2, 1, 3, 4).reshape(B, N * C, H, Va)[:, :T]
    if normalize:
        o = o[..., :V].to(dtype) / (o[..., V:].to(dtype) + eps)
    final = None
    if output_final_state:  # the sum of every chunk (of none when T = 0), after the initial state
        final = increments.sum(dim=2).view(B, Hk, K, Va)
        final = final if initial_state is None else final + initial_state.to(dtype)
    return o.to(v.dtype), final
