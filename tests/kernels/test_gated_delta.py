"""gated_delta: chunked and step forms each checked directly against the float64 reference recurrence, and the
reference against fla's own naive recurrent and chunked forms (so the fla/GPU path means the same thing)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import one_thread, rel_rms  # noqa: F401  (autouse fixture)

from linearize.kernels.gated_delta import (
    gated_delta,
    gated_delta_chunked,
    gated_delta_reference,
    gated_delta_step,
    resolve_impl,
)

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "linearize" / "kernels" / "gated_delta"

# Observed: fp32 chunked/step vs fp64 reference stays below ~1e-6 (outputs, states and grads of q, k, v, g,
# beta, h0); bf16/fp16 inputs give ~5e-3 on outputs, mostly from rounding the inputs themselves.
FP32_TOL = 1e-5
LOWP_TOL = 2e-2
NAMES = "q k v g beta h0".split()


def make_inputs(B, T, H, K, V, with_state, seed=0, unit_keys=True):
    """float64 q, k: [B, T, H, K], v: [B, T, H, V], g, beta: [B, T, H], state: [B, H, K, V] or None.
    k is unit-norm unless unit_keys=False (then the op's use_qk_l2norm must normalise it); g = logsigmoid
    around α ≈ 0.95, beta = sigmoid, as Gated DeltaNet layers make them."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    if unit_keys:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64) + 3)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64).sigmoid()
    state = None
    if with_state:
        _, state = gated_delta_reference(
            *make_inputs(B, 7, H, K, V, False, seed=seed + 1)[:5], output_final_state=True
        )
    return q, k, v, g, beta, state


def nan_filled_copy(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Copy of x in a buffer that started as NaN, so any read of an unwritten element shows up."""
    out = torch.full(x.shape, float("nan"), dtype=dtype)
    out.copy_(x)
    return out


def leaves(*xs, dtype):
    return [None if x is None else x.detach().to(dtype).requires_grad_() for x in xs]


def run_with_grads(fn, q, k, v, g, beta, h0, do, dS, **kw):
    """o, final state, and grads of <o, do> + <S, dS> wrt (q, k, v, g, beta, h0)."""
    o, S = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)
    (o * do.to(o.dtype)).sum().add((S * dS.to(S.dtype)).sum()).backward()
    grads = [None if x is None else x.grad for x in (q, k, v, g, beta, h0)]
    return o, S, grads


def stepped(q, k, v, g, beta, initial_state=None, output_final_state=True, **kw):
    """The whole sequence through gated_delta_step, one token at a time."""
    S, outs = initial_state, []
    for t in range(q.shape[1]):
        o, S = gated_delta_step(*(x[:, t : t + 1] for x in (q, k, v, g, beta)), S, **kw)
        outs.append(o)
    return torch.cat(outs, dim=1), S


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("K,V", [(8, 8), (16, 32)])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_matches_reference(T, K, V, with_state):
    B, H = 2, 2
    l2 = K == 16  # both key conventions: unit-norm keys given, or normalised inside the op
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, with_state, seed=T + K, unit_keys=not l2)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    kw = dict(scale=None if K == 8 else 0.3, use_qk_l2norm=l2)

    ref = run_with_grads(
        gated_delta_reference, *leaves(q, k, v, g, beta, h0, dtype=torch.float64), do, dS, **kw
    )
    h0_32 = None if h0 is None else nan_filled_copy(h0)
    got = run_with_grads(
        gated_delta_chunked, *leaves(q, k, v, g, beta, h0_32, dtype=torch.float32), do, dS, **kw
    )

    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[1].shape == (B, H, K, V)
    assert rel_rms(got[0], ref[0]) < FP32_TOL
    assert rel_rms(got[1], ref[1]) < FP32_TOL
    for name, a, b in zip(NAMES, got[2], ref[2]):
        if b is not None:
            assert rel_rms(a, b) < FP32_TOL, name


def test_chunked_float64_stays_float64():
    B, T, H, K, V = 2, 130, 2, 8, 16
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, True, seed=9)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    ref = run_with_grads(gated_delta_reference, *leaves(q, k, v, g, beta, h0, dtype=torch.float64), do, dS)
    got = run_with_grads(gated_delta_chunked, *leaves(q, k, v, g, beta, h0, dtype=torch.float64), do, dS)
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    assert rel_rms(got[0], ref[0]) < 1e-12
    assert rel_rms(got[1], ref[1]) < 1e-12
    for name, a, b in zip(NAMES, got[2], ref[2]):
        assert a.dtype == torch.float64 and rel_rms(a, b) < 1e-12, name


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("with_state", [True, False])
def test_step_matches_reference(T, with_state):
    B, H, K, V = 2, 2, 16, 32
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, with_state, seed=T)
    ref_o, ref_S = gated_delta_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, S = stepped(*(x.float() for x in (q, k, v, g, beta)), None if h0 is None else nan_filled_copy(h0))
    assert S.dtype == torch.float32
    assert rel_rms(o, ref_o) < FP32_TOL
    assert rel_rms(S, ref_S) < FP32_TOL


@pytest.mark.parametrize("l2", [True, False])
def test_step_gradients_match_reference(l2):
    B, T, H, K, V = 2, 9, 2, 8, 16
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, True, seed=11, unit_keys=not l2)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    ref = run_with_grads(
        gated_delta_reference, *leaves(q, k, v, g, beta, h0, dtype=torch.float64), do, dS, use_qk_l2norm=l2
    )
    got = run_with_grads(
        stepped, *leaves(q, k, v, g, beta, h0, dtype=torch.float32), do, dS, use_qk_l2norm=l2
    )
    assert rel_rms(got[0], ref[0]) < FP32_TOL
    for name, a, b in zip(NAMES, got[2], ref[2]):
        assert rel_rms(a, b) < FP32_TOL, name


@pytest.mark.parametrize("P", [1, 64, 100])
def test_chunked_prefill_then_step_decode(P):
    B, T, H, K, V = 2, 130, 2, 8, 16
    q, k, v, g, beta, _ = make_inputs(B, T, H, K, V, False, seed=P)
    ref_o, ref_S = gated_delta_reference(q, k, v, g, beta, output_final_state=True)
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    o, S = gated_delta(q[:, :P], k[:, :P], v[:, :P], g[:, :P], beta[:, :P], output_final_state=True)
    o_rest, S = stepped(q[:, P:], k[:, P:], v[:, P:], g[:, P:], beta[:, P:], S)
    assert rel_rms(torch.cat([o, o_rest], dim=1), ref_o) < FP32_TOL
    assert rel_rms(S, ref_S) < FP32_TOL


@pytest.mark.parametrize("chunk_size", [1, 16, 48, 64, 100])
def test_chunk_sizes_not_dividing_T(chunk_size):
    B, T, H, K, V = 2, 65, 2, 8, 8
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, True, seed=chunk_size)
    ref_o, ref_S = gated_delta_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, S = gated_delta(
        *(x.float() for x in (q, k, v, g, beta)),
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
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, True, seed=3)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    ref_o, ref_S = gated_delta_reference(q, k, v, g, beta, **kw)
    lp = [x.to(dtype) for x in (q, k, v, g, beta)]
    o, S = gated_delta_chunked(*lp, **{**kw, "initial_state": h0.float()})
    assert o.dtype == dtype and S.dtype == torch.float32
    assert rel_rms(o, ref_o) < LOWP_TOL
    assert rel_rms(S, ref_S) < LOWP_TOL
    o_step, S_step = gated_delta_step(*(x[:, :1] for x in lp), h0.float(), use_qk_l2norm=True)
    assert o_step.dtype == dtype and S_step.dtype == torch.float32
    assert rel_rms(o_step, ref_o[:, :1]) < LOWP_TOL


@pytest.mark.parametrize("with_state", [True, False])
def test_reference_matches_fla_naive(with_state):
    """Pins our semantics (decay, then delta write; g/beta per head; scale default; [B, H, K, V] state) to
    fla's, on CPU. fla's naive forms compute in float32 whatever the input dtype, so they are compared with
    our float64. fla's naive forms take already-normalised keys; our use_qk_l2norm must equal fla's l2norm."""
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    B, T, H, K, V = 2, 65, 2, 16, 32
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, with_state, seed=7, unit_keys=False)
    ref_o, ref_S = gated_delta_reference(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True
    )
    qn, kn = (x / (x.square().sum(-1, keepdim=True) + 1e-6).sqrt() for x in (q, k))
    h0_32 = None if h0 is None else h0.float()
    rec_o, rec_S = naive.naive_recurrent_gated_delta_rule(
        *(x.float() for x in (qn, kn, v, beta, g)), initial_state=h0_32, output_final_state=True
    )
    chunk_o, chunk_S = naive.naive_chunk_gated_delta_rule(
        *(x.float() for x in (qn, kn, v, g, beta)), initial_state=h0_32, output_final_state=True
    )
    for o, S in ((rec_o, rec_S), (chunk_o, chunk_S)):
        assert rel_rms(o, ref_o) < FP32_TOL
        assert rel_rms(S, ref_S) < FP32_TOL


def test_reference_is_the_delta_rule_matrix_form():
    """The specification itself: S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ as explicit matrices."""
    q, k, v, g, beta, h0 = make_inputs(1, 12, 1, 4, 3, True, seed=2)
    S = h0[0, 0]
    outs = []
    for t in range(12):
        kt, a, b = k[0, t, 0], g[0, t, 0].exp(), beta[0, t, 0]
        S = a * (torch.eye(4, dtype=S.dtype) - b * torch.outer(kt, kt)) @ S + b * torch.outer(kt, v[0, t, 0])
        outs.append(0.5 * q[0, t, 0] @ S)
    o, S_ref = gated_delta_reference(q, k, v, g, beta, scale=0.5, initial_state=h0, output_final_state=True)
    assert rel_rms(o[0, :, 0], torch.stack(outs)) < 1e-12
    assert rel_rms(S_ref[0, 0], S) < 1e-12


def test_empty_sequence_keeps_state():
    q, k, v, g, beta, h0 = make_inputs(2, 0, 2, 8, 8, True)
    for impl in ("chunked", "reference"):
        o, S = gated_delta(q, k, v, g, beta, initial_state=h0, output_final_state=True, impl=impl)
        assert o.shape == (2, 0, 2, 8)
        assert torch.equal(S, h0)


def test_final_state_only_when_asked():
    q, k, v, g, beta, _ = make_inputs(2, 5, 2, 8, 8, False)
    for impl in ("auto", "chunked", "reference"):
        assert gated_delta(q, k, v, g, beta, impl=impl)[1] is None


def test_resolve_impl():
    x = torch.zeros(1)
    assert resolve_impl("auto", x) == "chunked"
    for impl in ("chunked", "reference", "fla"):
        assert resolve_impl(impl, x) == impl


def test_bad_inputs_state_the_rule():
    q, k, v, g, beta, h0 = make_inputs(2, 5, 2, 8, 4, True)
    with pytest.raises(ValueError, match=r"q and k must have the same shape \[B, T, H, K\]"):
        gated_delta(q, k[..., :4], v, g, beta)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\] with the same B, T, H as q"):
        gated_delta(q, k, v[:1], g, beta)
    with pytest.raises(ValueError, match=r"g and beta must be \[B, T, H\] = \[2, 5, 2\] \(one gate per head"):
        gated_delta(q, k, v, g[..., None].expand(2, 5, 2, 8), beta)
    with pytest.raises(ValueError, match=r"g and beta must be \[B, T, H\]"):
        gated_delta(q, k, v, g, beta[:, :4])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, K, V\] = \[2, 2, 8, 4\]"):
        gated_delta(q, k, v, g, beta, initial_state=h0[..., :3])
    with pytest.raises(
        ValueError, match=r"impl must be one of 'auto', 'chunked', 'reference', 'fla', got 'x'"
    ):
        gated_delta(q, k, v, g, beta, impl="x")
    with pytest.raises(ValueError, match=r"impl='fla' needs CUDA tensors"):
        gated_delta(q, k, v, g, beta, impl="fla")
    with pytest.raises(ValueError, match=r"cu_seqlens must rise strictly"):
        gated_delta(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 2, q.shape[1] + 1]))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        gated_delta(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match=r"q and k must have the same shape \[B, 1, H, K\]"):
        gated_delta_step(q, k, v, g, beta, h0)
    with pytest.raises(ValueError, match=r"g and beta must be \[B, 1, H\]"):
        gated_delta_step(q[:, :1], k[:, :1], v[:, :1], g, beta, h0)
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, K, V\]"):
        gated_delta_step(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], h0[..., :3])
