"""gated_linear_attn: chunked and step forms each checked directly against the float64 reference recurrence,
and the reference against fla's own naive recurrence (so the fla/GPU path means the same thing)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import one_thread, rel_rms  # noqa: F401  (autouse fixture)

from linearize.kernels.gated_linear_attn import (
    gated_linear_attn,
    gated_linear_attn_chunked,
    gated_linear_attn_reference,
    gated_linear_attn_step,
    resolve_impl,
)

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "linearize" / "kernels" / "gated_linear_attn"

# Observed: fp32 chunked/step vs fp64 reference stays below ~2e-6 (outputs, states and grads of q, k, v, g,
# h0); bf16/fp16 inputs give ~5e-3 on outputs, mostly from rounding the inputs themselves.
FP32_TOL = 1e-5
LOWP_TOL = 2e-2


def make_inputs(B, T, H, K, V, with_state, seed=0, decay=1.0):
    """float64 q, k, g: [B, T, H, K], v: [B, T, H, V], state: [B, H, K, V] or None.
    g = logsigmoid(x) / 16 * decay, as GLA layers make it (gate_logit_normalizer=16), scaled up by `decay`."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)) / 16 * decay
    state = None
    if with_state:
        _, state = gated_linear_attn_reference(
            *make_inputs(B, 7, H, K, V, False, seed=seed + 1)[:4], output_final_state=True
        )
    return q, k, v, g, state


def nan_filled_copy(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Copy of x in a buffer that started as NaN, so any read of an unwritten element shows up."""
    out = torch.full(x.shape, float("nan"), dtype=dtype)
    out.copy_(x)
    return out


def leaves(*xs, dtype):
    return [None if x is None else x.detach().to(dtype).requires_grad_() for x in xs]


def run_with_grads(fn, q, k, v, g, h0, do, dS, **kw):
    """o, final state, and grads of <o, do> + <S, dS> wrt (q, k, v, g, h0)."""
    o, S = fn(q, k, v, g, initial_state=h0, output_final_state=True, **kw)
    (o * do.to(o.dtype)).sum().add((S * dS.to(S.dtype)).sum()).backward()
    grads = [None if x is None else x.grad for x in (q, k, v, g, h0)]
    return o, S, grads


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("K,V", [(8, 8), (16, 32)])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_matches_reference(T, K, V, with_state):
    B, H = 2, 2
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, with_state, seed=T + K)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    scale = None if K == 8 else 0.3

    ref = run_with_grads(
        gated_linear_attn_reference, *leaves(q, k, v, g, h0, dtype=torch.float64), do, dS, scale=scale
    )
    h0_32 = None if h0 is None else nan_filled_copy(h0)
    got = run_with_grads(
        gated_linear_attn_chunked, *leaves(q, k, v, g, h0_32, dtype=torch.float32), do, dS, scale=scale
    )

    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[1].shape == (B, H, K, V)
    assert rel_rms(got[0], ref[0]) < FP32_TOL
    assert rel_rms(got[1], ref[1]) < FP32_TOL
    for name, a, b in zip("q k v g h0".split(), got[2], ref[2]):
        if b is not None:
            assert rel_rms(a, b) < FP32_TOL, name


@pytest.mark.parametrize("chunk_size", [64, 48])
@pytest.mark.parametrize("decay", [30.0, 400.0])
def test_chunked_strong_decay_stays_finite(decay, chunk_size):
    """Decays far past exp's fp32 range (~88 nats) inside a chunk and inside blocks of 2 to 16 tokens
    (decay=400: ~17 nats per token on average): the halving factorisation must not overflow or lose the
    pairs it keeps. chunk_size=48 also runs the chunks zero-padded to 64."""
    B, T, H, K, V = 1, 130, 2, 8, 8
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, True, seed=5, decay=decay)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    ref = run_with_grads(gated_linear_attn_reference, *leaves(q, k, v, g, h0, dtype=torch.float64), do, dS)
    got = run_with_grads(
        gated_linear_attn_chunked,
        *leaves(q, k, v, g, h0, dtype=torch.float32),
        do,
        dS,
        chunk_size=chunk_size,
    )
    assert rel_rms(got[0], ref[0]) < 1e-4
    assert rel_rms(got[1], ref[1]) < 1e-4
    for name, a, b in zip("q k v g h0".split(), got[2], ref[2]):
        assert rel_rms(a, b) < 1e-4, name


def test_chunked_float64_stays_float64():
    B, T, H, K, V = 2, 130, 2, 8, 16
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, True, seed=9, decay=4.0)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    ref = run_with_grads(gated_linear_attn_reference, *leaves(q, k, v, g, h0, dtype=torch.float64), do, dS)
    got = run_with_grads(gated_linear_attn_chunked, *leaves(q, k, v, g, h0, dtype=torch.float64), do, dS)
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    assert rel_rms(got[0], ref[0]) < 1e-12
    assert rel_rms(got[1], ref[1]) < 1e-12
    for name, a, b in zip("q k v g h0".split(), got[2], ref[2]):
        assert a.dtype == torch.float64 and rel_rms(a, b) < 1e-12, name


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("with_state", [True, False])
def test_step_matches_reference(T, with_state):
    B, H, K, V = 2, 2, 16, 32
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, with_state, seed=T)
    ref_o, ref_S = gated_linear_attn_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    q, k, v, g = q.float(), k.float(), v.float(), g.float()
    S = None if h0 is None else nan_filled_copy(h0)
    outs = []
    for t in range(T):
        o, S = gated_linear_attn_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], S)
        outs.append(o)
    assert S.dtype == torch.float32
    assert rel_rms(torch.cat(outs, dim=1), ref_o) < FP32_TOL
    assert rel_rms(S, ref_S) < FP32_TOL


def test_step_gradients_match_reference():
    B, T, H, K, V = 2, 9, 2, 8, 16
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, True, seed=11)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)

    def stepped(q, k, v, g, initial_state, output_final_state):
        S, outs = initial_state, []
        for t in range(q.shape[1]):
            o, S = gated_linear_attn_step(*(x[:, t : t + 1] for x in (q, k, v, g)), S)
            outs.append(o)
        return torch.cat(outs, dim=1), S

    ref = run_with_grads(gated_linear_attn_reference, *leaves(q, k, v, g, h0, dtype=torch.float64), do, dS)
    got = run_with_grads(stepped, *leaves(q, k, v, g, h0, dtype=torch.float32), do, dS)
    for name, a, b in zip("q k v g h0".split(), got[2], ref[2]):
        assert rel_rms(a, b) < FP32_TOL, name


@pytest.mark.parametrize("P", [1, 64, 100])
def test_chunked_prefill_then_step_decode(P):
    B, T, H, K, V = 2, 130, 2, 8, 16
    q, k, v, g, _ = make_inputs(B, T, H, K, V, False, seed=P)
    ref_o, ref_S = gated_linear_attn_reference(q, k, v, g, output_final_state=True)
    q, k, v, g = q.float(), k.float(), v.float(), g.float()
    o, S = gated_linear_attn(q[:, :P], k[:, :P], v[:, :P], g[:, :P], output_final_state=True)
    outs = [o]
    for t in range(P, T):
        o, S = gated_linear_attn_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], S)
        outs.append(o)
    assert rel_rms(torch.cat(outs, dim=1), ref_o) < FP32_TOL
    assert rel_rms(S, ref_S) < FP32_TOL


@pytest.mark.parametrize("chunk_size", [1, 16, 48, 64, 100])
def test_chunk_sizes_not_dividing_T(chunk_size):
    B, T, H, K, V = 2, 65, 2, 8, 8
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, True, seed=chunk_size)
    ref_o, ref_S = gated_linear_attn_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    o, S = gated_linear_attn(
        *(x.float() for x in (q, k, v, g)),
        initial_state=nan_filled_copy(h0),
        output_final_state=True,
        impl="chunked",
        chunk_size=chunk_size,
    )
    assert rel_rms(o, ref_o) < FP32_TOL
    assert rel_rms(S, ref_S) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    B, T, H, K, V = 2, 257, 2, 16, 32
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, True, seed=3)
    ref_o, ref_S = gated_linear_attn_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    lp = [x.to(dtype) for x in (q, k, v, g)]
    o, S = gated_linear_attn_chunked(*lp, initial_state=h0.float(), output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert rel_rms(o, ref_o) < LOWP_TOL
    assert rel_rms(S, ref_S) < LOWP_TOL
    o_step, S_step = gated_linear_attn_step(*(x[:, :1] for x in lp), h0.float())
    assert o_step.dtype == dtype and S_step.dtype == torch.float32
    assert rel_rms(o_step, ref_o[:, :1]) < LOWP_TOL


def test_chunked_under_bf16_autocast_trains_in_float32():
    """Stage 2 runs the student under bf16 autocast: the chunked form keeps its float32 math inside (autocast
    would otherwise make the forward's products bf16 and the written-out backward's float32, and crash), so
    outputs and gradients match the float32 form run without autocast."""
    B, T, H, K, V = 1, 200, 2, 16, 16  # chunks of 64: products of the 4x4 and larger levels
    q, k, v, g, _ = make_inputs(B, T, H, K, V, False, seed=5)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    results = []
    for autocast in (False, True):
        xs = leaves(q, k, v, dtype=torch.bfloat16) + leaves(g, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, _ = gated_linear_attn_chunked(*xs)
        (o.float() * do.float()).sum().backward()
        results.append([o, *(x.grad for x in xs)])
    for plain, cast in zip(*results):
        assert cast.dtype == plain.dtype and rel_rms(cast, plain) < 1e-6


@pytest.mark.parametrize("with_state", [True, False])
def test_reference_matches_fla_naive(with_state):
    """Pins our semantics (decay before update, scale default, [B, H, K, V] state) to fla's, on CPU.
    fla's naive GLA computes in float32 whatever the input dtype, so it is compared with our float64."""
    naive = pytest.importorskip("fla.ops.gla.naive")
    B, T, H, K, V = 2, 65, 2, 16, 32
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, with_state, seed=7, decay=8.0)
    ref_o, ref_S = gated_linear_attn_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    fla_o, fla_S = naive.naive_recurrent_gla(
        *(x.float() for x in (q, k, v, g)),
        initial_state=None if h0 is None else h0.float(),
        output_final_state=True,
    )
    assert rel_rms(fla_o, ref_o) < FP32_TOL
    assert rel_rms(fla_S, ref_S) < FP32_TOL


def test_reference_is_dense_gated_attention():
    """The specification itself, against the quadratic form o_t = Σ_{j≤t} Σ_k q_t k_j exp(b_t − b_j) v_j."""
    q, k, v, g, _ = make_inputs(1, 20, 1, 4, 3, False, decay=4.0)
    q, k, v, g = q[0, :, 0], k[0, :, 0], v[0, :, 0], g[0, :, 0]
    b = g.cumsum(0)
    A = torch.einsum("tk,jk,tjk->tj", q * 0.5, k, (b[:, None] - b[None, :]).exp()).tril()
    o, _ = gated_linear_attn_reference(*(x[None, :, None] for x in (q, k, v, g)), scale=0.5)
    assert rel_rms(o[0, :, 0], A @ v) < 1e-12


def test_empty_sequence_keeps_state():
    q, k, v, g, h0 = make_inputs(2, 0, 2, 8, 8, True)
    for impl in ("chunked", "reference"):
        o, S = gated_linear_attn(q, k, v, g, initial_state=h0, output_final_state=True, impl=impl)
        assert o.shape == (2, 0, 2, 8)
        assert torch.equal(S, h0)


def test_final_state_only_when_asked():
    q, k, v, g, _ = make_inputs(2, 5, 2, 8, 8, False)
    for impl in ("auto", "chunked", "reference"):
        assert gated_linear_attn(q, k, v, g, impl=impl)[1] is None


def test_resolve_impl():
    x = torch.zeros(1)
    assert resolve_impl("auto", x) == "chunked"
    for impl in ("chunked", "reference", "fla"):
        assert resolve_impl(impl, x) == impl


def test_bad_inputs_state_the_rule():
    q, k, v, g, h0 = make_inputs(2, 5, 2, 8, 4, True)
    with pytest.raises(ValueError, match=r"q, k and g must have the same shape \[B, T, H, K\]"):
        gated_linear_attn(q, k[..., :4], v, g)
    with pytest.raises(ValueError, match=r"q, k and g must have the same shape \[B, T, H, K\]"):
        gated_linear_attn(q, k, v, g[..., 0])
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\] with the same B, T, H as q"):
        gated_linear_attn(q, k, v[:1], g)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, K, V\] = \[2, 2, 8, 4\]"):
        gated_linear_attn(q, k, v, g, initial_state=h0[..., :3])
    with pytest.raises(
        ValueError, match=r"impl must be one of 'auto', 'chunked', 'reference', 'fla', got 'tri'"
    ):
        gated_linear_attn(q, k, v, g, impl="tri")
    with pytest.raises(ValueError, match=r"impl='fla' needs CUDA tensors"):
        gated_linear_attn(q, k, v, g, impl="fla")
    with pytest.raises(ValueError, match=r"cu_seqlens must rise strictly"):
        gated_linear_attn(q[:1], k[:1], v[:1], g[:1], cu_seqlens=torch.tensor([0, 2, q.shape[1] + 1]))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        gated_linear_attn(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match=r"q, k and g must have the same shape \[B, 1, H, K\]"):
        gated_linear_attn_step(q, k, v, g, h0)
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, K, V\]"):
        gated_linear_attn_step(q[:, :1], k[:, :1], v[:, :1], g[:, :1], h0[..., :3])
