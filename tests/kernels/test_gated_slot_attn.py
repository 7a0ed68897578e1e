"""gated_slot_attn: chunked and step forms each checked directly against the float64 reference recurrence,
and the reference against fla's own naive recurrence (so the fla/GPU path means the same thing)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import one_thread, rel_rms  # noqa: F401  (autouse fixture)

from linearize.kernels.gated_slot_attn import (
    additive_gate,
    gated_slot_attn,
    gated_slot_attn_chunked,
    gated_slot_attn_reference,
    gated_slot_attn_step,
    resolve_impl,
)

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "linearize" / "kernels" / "gated_slot_attn"

# Observed: fp32 chunked/step vs fp64 reference stays below ~1e-6 (outputs, both states, and grads of q, k,
# v, s, g and both initial states); bf16/fp16 inputs give ~5e-3 on outputs.
FP32_TOL = 1e-5
LOWP_TOL = 2e-2
NAMES = "q k v s g hk0 hv0".split()


def make_inputs(B, T, H, K, V, M, with_state, seed=0):
    """float64 q, k: [B, T, H, K], v: [B, T, H, V], s, g: [B, T, H, M], state: (hk, hv) or None.
    s = softmax-free slot scores (randn), g = logsigmoid around α ≈ 0.9 as GSA layers make it."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    s = torch.randn(B, T, H, M, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, M, generator=gen, dtype=torch.float64) + 2)
    state = None
    if with_state:
        _, state = gated_slot_attn_reference(
            *make_inputs(B, 7, H, K, V, M, False, seed=seed + 1)[:5], output_final_state=True
        )
    return q, k, v, s, g, state


def nan_filled_copy(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Copy of x in a buffer that started as NaN, so any read of an unwritten element shows up."""
    out = torch.full(x.shape, float("nan"), dtype=dtype)
    out.copy_(x)
    return out


def leaves(*xs, dtype):
    return [None if x is None else x.detach().to(dtype).requires_grad_() for x in xs]


def run_with_grads(fn, q, k, v, s, g, hk0, hv0, do, dS, **kw):
    """o, final states, and grads of <o, do> + <Hk, dHk> + <Hv, dHv> wrt (q, k, v, s, g, hk0, hv0)."""
    h0 = None if hk0 is None else (hk0, hv0)
    o, S = fn(q, k, v, s, g, initial_state=h0, output_final_state=True, **kw)
    loss = (o * do.to(o.dtype)).sum()
    for x, dx in zip(S, dS):
        loss = loss + (x * dx.to(x.dtype)).sum()
    loss.backward()
    grads = [None if x is None else x.grad for x in (q, k, v, s, g, hk0, hv0)]
    return o, S, grads


def stepped(q, k, v, s, g, initial_state=None, output_final_state=True, **kw):
    """The whole sequence through gated_slot_attn_step, one token at a time."""
    S, outs = initial_state, []
    for t in range(q.shape[1]):
        o, S = gated_slot_attn_step(*(x[:, t : t + 1] for x in (q, k, v, s, g)), S, **kw)
        outs.append(o)
    return torch.cat(outs, dim=1), S


def grad_targets(B, T, H, K, V, M, seed=1):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = (
        torch.randn(B, H, K, M, generator=gen, dtype=torch.float64),
        torch.randn(B, H, M, V, generator=gen, dtype=torch.float64),
    )
    return do, dS


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("K,V,M", [(8, 8, 4), (16, 32, 16)])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_matches_reference(T, K, V, M, with_state):
    B, H = 2, 2
    q, k, v, s, g, h0 = make_inputs(B, T, H, K, V, M, with_state, seed=T + K)
    do, dS = grad_targets(B, T, H, K, V, M)
    scale = None if K == 8 else 0.3
    hk0, hv0 = (None, None) if h0 is None else h0

    ref = run_with_grads(
        gated_slot_attn_reference, *leaves(q, k, v, s, g, hk0, hv0, dtype=torch.float64), do, dS, scale=scale
    )
    h0_32 = (None, None) if h0 is None else [nan_filled_copy(x) for x in h0]
    got = run_with_grads(
        gated_slot_attn_chunked, *leaves(q, k, v, s, g, *h0_32, dtype=torch.float32), do, dS, scale=scale
    )

    assert got[0].dtype == torch.float32 and all(x.dtype == torch.float32 for x in got[1])
    assert got[1][0].shape == (B, H, K, M) and got[1][1].shape == (B, H, M, V)
    assert rel_rms(got[0], ref[0]) < FP32_TOL
    for a, b in zip(got[1], ref[1]):
        assert rel_rms(a, b) < FP32_TOL
    for name, a, b in zip(NAMES, got[2], ref[2]):
        if b is not None:
            assert rel_rms(a, b) < FP32_TOL, name


@pytest.mark.parametrize("T", [1, 65, 257])
def test_chunked_matches_reference_without_g(T):
    """g=None: fla's additive gate, computed inside the op; grads flow into s through it."""
    B, H, K, V, M = 2, 2, 8, 16, 8
    q, k, v, s, _, h0 = make_inputs(B, T, H, K, V, M, True, seed=T)
    do, dS = grad_targets(B, T, H, K, V, M)
    ref = run_with_grads(
        gated_slot_attn_reference, *leaves(q, k, v, s, None, *h0, dtype=torch.float64), do, dS
    )
    got = run_with_grads(gated_slot_attn_chunked, *leaves(q, k, v, s, None, *h0, dtype=torch.float32), do, dS)
    assert rel_rms(got[0], ref[0]) < FP32_TOL
    for a, b in zip(got[1], ref[1]):
        assert rel_rms(a, b) < FP32_TOL
    for name, a, b in zip(NAMES, got[2], ref[2]):
        if b is None:
            continue
        if name == "s" and T == 1:
            # s'_1 = exp(s_1 − logsumexp(s_1)) = 1 and g_1 = 0 whatever s_1: ds is exactly 0, only rounding.
            assert a.abs().max() < 1e-5 and b.abs().max() < 1e-12
        else:
            assert rel_rms(a, b) < FP32_TOL, name


@pytest.mark.parametrize("chunk_size", [64, 48])
@pytest.mark.parametrize("decay", [30.0, 400.0])
def test_chunked_strong_decay_stays_finite(decay, chunk_size):
    """Slot decays far past exp's fp32 range (~88 nats) inside a chunk and inside blocks of 2 to 16 tokens
    (decay=400: ~50 nats per token on average), on the value side (slot pass) and the key side (value pass):
    the halving factorisation must not overflow or lose the pairs it keeps."""
    B, T, H, K, V, M = 1, 130, 2, 8, 8, 4
    q, k, v, s, g, h0 = make_inputs(B, T, H, K, V, M, True, seed=5)
    g = g * decay
    do, dS = grad_targets(B, T, H, K, V, M, seed=2)
    ref = run_with_grads(gated_slot_attn_reference, *leaves(q, k, v, s, g, *h0, dtype=torch.float64), do, dS)
    got = run_with_grads(
        gated_slot_attn_chunked,
        *leaves(q, k, v, s, g, *h0, dtype=torch.float32),
        do,
        dS,
        chunk_size=chunk_size,
    )
    assert rel_rms(got[0], ref[0]) < 1e-4
    for a, b in zip(got[1], ref[1]):
        assert rel_rms(a, b) < 1e-4
    for name, a, b in zip(NAMES, got[2], ref[2]):
        assert rel_rms(a, b) < 1e-4, name


def test_chunked_strong_additive_gate_stays_finite():
    """g=None with slot scores spiking by up to ~100: the additive gate's log-decays z_{t-1} − z_t then reach
    tens of nats per token."""
    B, T, H, K, V, M = 1, 130, 2, 8, 8, 4
    q, k, v, s, _, h0 = make_inputs(B, T, H, K, V, M, True, seed=6)
    s = s * 30
    do, dS = grad_targets(B, T, H, K, V, M, seed=2)
    ref = run_with_grads(
        gated_slot_attn_reference, *leaves(q, k, v, s, None, *h0, dtype=torch.float64), do, dS
    )
    got = run_with_grads(gated_slot_attn_chunked, *leaves(q, k, v, s, None, *h0, dtype=torch.float32), do, dS)
    assert rel_rms(got[0], ref[0]) < 1e-4
    for a, b in zip(got[1], ref[1]):
        assert rel_rms(a, b) < 1e-4
    for name, a, b in zip(NAMES, got[2], ref[2]):
        if b is not None:
            assert rel_rms(a, b) < 1e-4, name


def test_chunked_float64_stays_float64():
    B, T, H, K, V, M = 2, 130, 2, 8, 16, 4
    q, k, v, s, g, h0 = make_inputs(B, T, H, K, V, M, True, seed=9)
    do, dS = grad_targets(B, T, H, K, V, M, seed=4)
    ref = run_with_grads(gated_slot_attn_reference, *leaves(q, k, v, s, g, *h0, dtype=torch.float64), do, dS)
    got = run_with_grads(gated_slot_attn_chunked, *leaves(q, k, v, s, g, *h0, dtype=torch.float64), do, dS)
    assert got[0].dtype == torch.float64 and all(x.dtype == torch.float64 for x in got[1])
    assert rel_rms(got[0], ref[0]) < 1e-12
    for a, b in zip(got[1], ref[1]):
        assert rel_rms(a, b) < 1e-12
    for name, a, b in zip(NAMES, got[2], ref[2]):
        assert a.dtype == torch.float64 and rel_rms(a, b) < 1e-12, name


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("with_state", [True, False])
def test_step_matches_reference(T, with_state):
    B, H, K, V, M = 2, 2, 16, 32, 16
    q, k, v, s, g, h0 = make_inputs(B, T, H, K, V, M, with_state, seed=T)
    ref_o, ref_S = gated_slot_attn_reference(q, k, v, s, g, initial_state=h0, output_final_state=True)
    o, S = stepped(
        *(x.float() for x in (q, k, v, s, g)), None if h0 is None else tuple(nan_filled_copy(x) for x in h0)
    )
    assert all(x.dtype == torch.float32 for x in S)
    assert rel_rms(o, ref_o) < FP32_TOL
    for a, b in zip(S, ref_S):
        assert rel_rms(a, b) < FP32_TOL


def test_step_gradients_match_reference():
    B, T, H, K, V, M = 2, 9, 2, 8, 16, 4
    q, k, v, s, g, h0 = make_inputs(B, T, H, K, V, M, True, seed=11)
    do, dS = grad_targets(B, T, H, K, V, M, seed=3)
    ref = run_with_grads(gated_slot_attn_reference, *leaves(q, k, v, s, g, *h0, dtype=torch.float64), do, dS)
    got = run_with_grads(stepped, *leaves(q, k, v, s, g, *h0, dtype=torch.float32), do, dS)
    assert rel_rms(got[0], ref[0]) < FP32_TOL
    for name, a, b in zip(NAMES, got[2], ref[2]):
        assert rel_rms(a, b) < FP32_TOL, name


@pytest.mark.parametrize("P", [1, 64, 100])
def test_chunked_prefill_then_step_decode(P):
    B, T, H, K, V, M = 2, 130, 2, 8, 16, 8
    q, k, v, s, g, _ = make_inputs(B, T, H, K, V, M, False, seed=P)
    ref_o, ref_S = gated_slot_attn_reference(q, k, v, s, g, output_final_state=True)
    xs = [x.float() for x in (q, k, v, s, g)]
    o, S = gated_slot_attn(*(x[:, :P] for x in xs), output_final_state=True)
    o_rest, S = stepped(*(x[:, P:] for x in xs), S)
    assert rel_rms(torch.cat([o, o_rest], dim=1), ref_o) < FP32_TOL
    for a, b in zip(S, ref_S):
        assert rel_rms(a, b) < FP32_TOL


@pytest.mark.parametrize("chunk_size", [1, 16, 48, 64, 100])
def test_chunk_sizes_not_dividing_T(chunk_size):
    B, T, H, K, V, M = 2, 65, 2, 8, 8, 4
    q, k, v, s, g, h0 = make_inputs(B, T, H, K, V, M, True, seed=chunk_size)
    ref_o, ref_S = gated_slot_attn_reference(q, k, v, s, g, initial_state=h0, output_final_state=True)
    o, S = gated_slot_attn(
        *(x.float() for x in (q, k, v, s, g)),
        initial_state=tuple(nan_filled_copy(x) for x in h0),
        output_final_state=True,
        impl="chunked",
        chunk_size=chunk_size,
    )
    assert rel_rms(o, ref_o) < FP32_TOL
    for a, b in zip(S, ref_S):
        assert rel_rms(a, b) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    B, T, H, K, V, M = 2, 257, 2, 16, 32, 16
    q, k, v, s, g, h0 = make_inputs(B, T, H, K, V, M, True, seed=3)
    ref_o, ref_S = gated_slot_attn_reference(q, k, v, s, g, initial_state=h0, output_final_state=True)
    lp = [x.to(dtype) for x in (q, k, v, s, g)]
    h0_32 = tuple(x.float() for x in h0)
    o, S = gated_slot_attn_chunked(*lp, initial_state=h0_32, output_final_state=True)
    assert o.dtype == dtype and all(x.dtype == torch.float32 for x in S)
    assert rel_rms(o, ref_o) < LOWP_TOL
    for a, b in zip(S, ref_S):
        assert rel_rms(a, b) < LOWP_TOL
    o_step, _ = gated_slot_attn_step(*(x[:, :1] for x in lp), h0_32)
    assert o_step.dtype == dtype
    assert rel_rms(o_step, ref_o[:, :1]) < LOWP_TOL


@pytest.mark.parametrize("with_g", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_reference_matches_fla_naive(with_g, with_state):
    """Pins our semantics (which side each pass decays, where scale goes, the softmax over slots, the g=None
    additive gate, state layouts) to fla's, on CPU. fla's naive GSA computes in float32 whatever the input
    dtype, so it is compared with our float64."""
    naive = pytest.importorskip("fla.ops.gsa.naive")
    B, T, H, K, V, M = 2, 65, 2, 16, 32, 8
    q, k, v, s, g, h0 = make_inputs(B, T, H, K, V, M, with_state, seed=7)
    g = g if with_g else None
    ref_o, ref_S = gated_slot_attn_reference(q, k, v, s, g, initial_state=h0, output_final_state=True)
    fla_o, fla_S = naive.naive_recurrent_gsa(
        *(x.float() for x in (q, k, v, s)),
        None if g is None else g.float(),
        initial_state=None if h0 is None else tuple(x.float() for x in h0),
        output_final_state=True,
    )
    assert rel_rms(fla_o, ref_o) < FP32_TOL
    for a, b in zip(fla_S, ref_S):
        assert rel_rms(a, b) < FP32_TOL


def test_reference_is_softmax_over_slots():
    """The specification itself, unrolled: scores over slots from the decayed k·s sums, then a softmax-weighted
    read of the decayed s·v sums."""
    q, k, v, s, g, _ = make_inputs(1, 10, 1, 4, 3, 5, False, seed=2)
    q, k, v, s, g = (x[0, :, 0] for x in (q, k, v, s, g))
    b = g.cumsum(0)
    D = (b[:, None, :] - b[None, :, :]).exp() * torch.ones(10, 10).tril()[..., None].double()  # [t, j, m]
    scores = torch.einsum("tk,jk,tjm,jm->tm", q * 0.5, k, D, s)
    want = torch.einsum("tm,tjm,jm,jv->tv", scores.softmax(-1), D, s, v)
    o, _ = gated_slot_attn_reference(*(x[None, :, None] for x in (q, k, v, s, g)), scale=0.5)
    assert rel_rms(o[0, :, 0], want) < 1e-12


def test_additive_gate_is_running_softmax():
    s = torch.randn(1, 6, 1, 3, dtype=torch.float64)
    s2, g = additive_gate(s)
    assert torch.equal(g[:, 0], torch.zeros_like(g[:, 0]))
    # with these gates the slot recurrence h_t = e^{g_t} h_{t-1} + s'_t is the running softmax over time
    h = torch.zeros(3, dtype=torch.float64)
    for t in range(6):
        h = g[0, t, 0].exp() * h + s2[0, t, 0]
        assert rel_rms(h, torch.ones(3, dtype=torch.float64)) < 1e-12


def test_empty_sequence_keeps_state():
    q, k, v, s, g, h0 = make_inputs(2, 0, 2, 8, 8, 4, True)
    for impl in ("chunked", "reference"):
        o, S = gated_slot_attn(q, k, v, s, g, initial_state=h0, output_final_state=True, impl=impl)
        assert o.shape == (2, 0, 2, 8)
        assert all(torch.equal(a, b) for a, b in zip(S, h0))


def test_final_state_only_when_asked():
    q, k, v, s, g, _ = make_inputs(2, 5, 2, 8, 8, 4, False)
    for impl in ("auto", "chunked", "reference"):
        assert gated_slot_attn(q, k, v, s, g, impl=impl)[1] is None


def test_resolve_impl():
    x = torch.zeros(1)
    assert resolve_impl("auto", x) == "chunked"
    for impl in ("chunked", "reference", "fla"):
        assert resolve_impl(impl, x) == impl


def test_bad_inputs_state_the_rule():
    q, k, v, s, g, h0 = make_inputs(2, 5, 2, 8, 4, 3, True)
    with pytest.raises(ValueError, match=r"q and k must have the same shape \[B, T, H, K\]"):
        gated_slot_attn(q, k[..., :4], v, s, g)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\] with the same B, T, H as q"):
        gated_slot_attn(q, k, v[:1], s, g)
    with pytest.raises(ValueError, match=r"s must be \[B, T, H, M\] with the same B, T, H as q"):
        gated_slot_attn(q, k, v, s[:, :4], g)
    with pytest.raises(
        ValueError, match=r"g must be None or have the shape of s \[B, T, H, M\] = \[2, 5, 2, 3\]"
    ):
        gated_slot_attn(q, k, v, s, g[..., :2])
    with pytest.raises(
        ValueError, match=r"initial_state must be a pair of shapes \(\[B, H, K, M\], \[B, H, M, V\]\)"
    ):
        gated_slot_attn(q, k, v, s, g, initial_state=(h0[1], h0[0]))
    with pytest.raises(
        ValueError, match=r"impl must be one of 'auto', 'chunked', 'reference', 'fla', got 'x'"
    ):
        gated_slot_attn(q, k, v, s, g, impl="x")
    with pytest.raises(ValueError, match=r"impl='fla' needs CUDA tensors"):
        gated_slot_attn(q, k, v, s, g, impl="fla")
    with pytest.raises(ValueError, match=r"cu_seqlens must rise strictly"):
        gated_slot_attn(q[:1], k[:1], v[:1], s[:1], g[:1], cu_seqlens=torch.tensor([0, 2, q.shape[1] + 1]))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        gated_slot_attn(q, k, v, s, g, chunk_size=0)
    with pytest.raises(ValueError, match=r"q and k must have the same shape \[B, 1, H, K\]"):
        gated_slot_attn_step(q, k, v, s, g, h0)
    with pytest.raises(ValueError, match=r"s and g must both be \[B, 1, H, M\]"):
        gated_slot_attn_step(q[:, :1], k[:, :1], v[:, :1], s[:, :1], None, h0)
    with pytest.raises(ValueError, match=r"state must be a pair of shapes"):
        gated_slot_attn_step(q[:, :1], k[:, :1], v[:, :1], s[:, :1], g[:, :1], (h0[1], h0[0]))


def test_chunked_under_bf16_autocast_trains_in_float32():
    """As for gated_linear_attn: under bf16 autocast (stage 2) the chunked form keeps its float32 math, so its
    written-out backward runs, and outputs and gradients equal the float32 form run without autocast."""
    B, T, H, K, V, M = 1, 200, 2, 16, 16, 8
    q, k, v, s, g, _ = make_inputs(B, T, H, K, V, M, False, seed=5)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    results = []
    for autocast in (False, True):
        xs = leaves(q, k, v, s, dtype=torch.bfloat16) + leaves(g, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, _ = gated_slot_attn_chunked(*xs)
        (o.float() * do.float()).sum().backward()
        results.append([o, *(x.grad for x in xs)])
    for plain, cast in zip(*results):
        assert cast.dtype == plain.dtype and rel_rms(cast, plain) < 1e-6
