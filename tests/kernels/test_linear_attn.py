"""linear_attn: chunked and step forms each checked directly against the float64 reference recurrence."""

from pathlib import Path

import pytest
import torch
from kernel_checks import rel_rms

from linearize.kernels.linear_attn import (
    linear_attn,
    linear_attn_chunked,
    linear_attn_reference,
    linear_attn_step,
    resolve_impl,
)

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "linearize" / "kernels" / "linear_attn"

# Observed: fp32 chunked/step vs fp64 reference stays below ~1e-6 (outputs, states and grads);
# bf16/fp16 inputs give ~3e-3 on outputs, mostly from rounding the inputs themselves.
FP32_TOL = 1e-5
LOWP_TOL = 2e-2


def make_inputs(B, T, H, K, V, normalize, with_state, seed=0, scale=None):
    """float64 q, k: [B, T, H, K], v: [B, T, H, V], state: [B, H, K, V(+1)] or None.
    Normalised inputs are non-negative and the state is a sum over a few earlier tokens, so its last column
    is a real key sum."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    if normalize:
        q, k = torch.nn.functional.elu(q) + 1, k.softmax(-1)
    state = None
    if with_state:
        _, state = linear_attn_reference(
            *make_inputs(B, 7, H, K, V, normalize, False, seed=seed + 1)[:3],
            normalize=normalize,
            output_final_state=True,
        )
    return q, k, v, state


def nan_filled_copy(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Copy of x in a buffer that started as NaN, so any read of an unwritten element shows up."""
    out = torch.full(x.shape, float("nan"), dtype=dtype)
    out.copy_(x)
    return out


def leaves(*xs, dtype):
    return [None if x is None else x.detach().to(dtype).requires_grad_() for x in xs]


def run_with_grads(fn, q, k, v, h0, do, dS, **kw):
    """o, final state, and grads of <o, do> + <S, dS> wrt (q, k, v, h0)."""
    o, S = fn(q, k, v, initial_state=h0, output_final_state=True, **kw)
    (o * do.to(o.dtype)).sum().add((S * dS.to(S.dtype)).sum()).backward()
    grads = [None if x is None else x.grad for x in (q, k, v, h0)]
    return o, S, grads


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("K,V", [(8, 8), (16, 32)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_matches_reference(T, K, V, normalize, with_state):
    B, H = 2, 2
    q, k, v, h0 = make_inputs(B, T, H, K, V, normalize, with_state, seed=T + K)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    dS = torch.randn(B, H, K, V + normalize, generator=g, dtype=torch.float64)
    scale = None if K == 8 else 0.3

    ref = run_with_grads(
        linear_attn_reference,
        *leaves(q, k, v, h0, dtype=torch.float64),
        do,
        dS,
        normalize=normalize,
        scale=scale,
    )
    h0_32 = None if h0 is None else nan_filled_copy(h0)
    got = run_with_grads(
        linear_attn_chunked,
        *leaves(q, k, v, h0_32, dtype=torch.float32),
        do,
        dS,
        normalize=normalize,
        scale=scale,
    )

    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[1].shape == (B, H, K, V + normalize)
    assert rel_rms(got[0], ref[0]) < FP32_TOL
    assert rel_rms(got[1], ref[1]) < FP32_TOL
    for name, a, b in zip("q k v h0".split(), got[2], ref[2]):
        if b is None:
            continue
        if name == "q" and normalize and T == 1 and h0 is None:
            # o_1 = v_1 * d / (d + eps): dq is O(eps), a cancellation fp32 cannot resolve relatively.
            assert (a - b).abs().max() < 1e-6
        else:
            assert rel_rms(a, b) < FP32_TOL, name


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_step_matches_reference(T, normalize, with_state):
    B, H, K, V = 2, 2, 16, 32
    q, k, v, h0 = make_inputs(B, T, H, K, V, normalize, with_state, seed=T)
    ref_o, ref_S = linear_attn_reference(
        q, k, v, normalize=normalize, initial_state=h0, output_final_state=True
    )
    q, k, v = q.float(), k.float(), v.float()
    S = None if h0 is None else nan_filled_copy(h0)
    outs = []
    for t in range(T):
        o, S = linear_attn_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], S, normalize=normalize)
        outs.append(o)
    assert S.dtype == torch.float32
    assert rel_rms(torch.cat(outs, dim=1), ref_o) < FP32_TOL
    assert rel_rms(S, ref_S) < FP32_TOL


@pytest.mark.parametrize("P", [1, 64, 100])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_prefill_then_step_decode(P, normalize):
    B, T, H, K, V = 2, 130, 2, 8, 16
    q, k, v, _ = make_inputs(B, T, H, K, V, normalize, False, seed=P)
    ref_o, ref_S = linear_attn_reference(q, k, v, normalize=normalize, output_final_state=True)
    q, k, v = q.float(), k.float(), v.float()
    o, S = linear_attn(q[:, :P], k[:, :P], v[:, :P], normalize=normalize, output_final_state=True)
    outs = [o]
    for t in range(P, T):
        o, S = linear_attn_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], S, normalize=normalize)
        outs.append(o)
    assert rel_rms(torch.cat(outs, dim=1), ref_o) < FP32_TOL
    assert rel_rms(S, ref_S) < FP32_TOL


@pytest.mark.parametrize("chunk_size", [1, 16, 48, 64, 100])
def test_chunk_sizes_not_dividing_T(chunk_size):
    B, T, H, K, V = 2, 65, 2, 8, 8
    q, k, v, h0 = make_inputs(B, T, H, K, V, True, True, seed=chunk_size)
    ref_o, ref_S = linear_attn_reference(q, k, v, initial_state=h0, output_final_state=True)
    o, S = linear_attn(
        q.float(),
        k.float(),
        v.float(),
        initial_state=nan_filled_copy(h0),
        output_final_state=True,
        impl="chunked",
        chunk_size=chunk_size,
    )
    assert rel_rms(o, ref_o) < FP32_TOL
    assert rel_rms(S, ref_S) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_low_precision_inputs(dtype, normalize):
    B, T, H, K, V = 2, 257, 2, 16, 32
    q, k, v, h0 = make_inputs(B, T, H, K, V, normalize, True, seed=3)
    ref_o, ref_S = linear_attn_reference(
        q, k, v, normalize=normalize, initial_state=h0, output_final_state=True
    )
    lp = [x.to(dtype) for x in (q, k, v)]
    o, S = linear_attn_chunked(*lp, normalize=normalize, initial_state=h0.float(), output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert rel_rms(o, ref_o) < LOWP_TOL
    assert rel_rms(S, ref_S) < LOWP_TOL
    o_step, S_step = linear_attn_step(*(x[:, :1] for x in lp), h0.float(), normalize=normalize)
    assert o_step.dtype == dtype and S_step.dtype == torch.float32
    assert rel_rms(o_step, ref_o[:, :1]) < LOWP_TOL


def test_reference_is_dense_causal_attention():
    """The specification itself, against the quadratic form: o = tril(s Q K^T) V / (rowsum + eps)."""
    q, k, v, _ = make_inputs(1, 20, 1, 4, 3, True, False)
    A = (q[0, :, 0] * 0.5 @ k[0, :, 0].T).tril()
    want = (A @ v[0, :, 0]) / (A.sum(-1, keepdim=True) + 1e-6)
    o, _ = linear_attn_reference(q, k, v, scale=0.5)
    assert rel_rms(o[0, :, 0], want) < 1e-12
    o, _ = linear_attn_reference(q, k, v, scale=0.5, normalize=False)
    assert rel_rms(o[0, :, 0], A @ v[0, :, 0]) < 1e-12


def test_empty_sequence_keeps_state():
    q, k, v, h0 = make_inputs(2, 0, 2, 8, 8, True, True)
    for impl in ("chunked", "reference"):
        o, S = linear_attn(q, k, v, initial_state=h0, output_final_state=True, impl=impl)
        assert o.shape == (2, 0, 2, 8)
        assert torch.equal(S, h0)


def test_final_state_only_when_asked():
    q, k, v, _ = make_inputs(2, 5, 2, 8, 8, True, False)
    for impl in ("auto", "chunked", "reference"):
        assert linear_attn(q, k, v, impl=impl)[1] is None


def test_resolve_impl():
    x = torch.zeros(1)
    assert resolve_impl("auto", x) == "chunked"
    for impl in ("chunked", "reference", "fla"):
        assert resolve_impl(impl, x) == impl


def test_bad_inputs_state_the_rule():
    q, k, v, h0 = make_inputs(2, 5, 2, 8, 4, True, True)
    with pytest.raises(
        ValueError, match=r"q must be \[B, T, H, K\] and k \[B, T, H_kv, K\] with the same B, T, K"
    ):
        linear_attn(q, k[..., :4], v)
    with pytest.raises(ValueError, match=r"q's heads \(2\) must be a multiple of k's \(3\)"):
        linear_attn(q, torch.cat([k, k[:, :, :1]], dim=2), v)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H_kv, V\] with the same B, T, H_kv as k"):
        linear_attn(q, k, v[:1])
    with pytest.raises(
        ValueError, match=r"initial_state must have shape \[B, H_kv, K, V\+1\] = \[2, 2, 8, 5\]"
    ):
        linear_attn(q, k, v, initial_state=h0[..., :4])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H_kv, K, V\] = \[2, 2, 8, 4\]"):
        linear_attn(q, k, v, initial_state=h0, normalize=False)
    with pytest.raises(
        ValueError, match=r"impl must be one of 'auto', 'chunked', 'reference', 'fla', got 'tri'"
    ):
        linear_attn(q, k, v, impl="tri")
    with pytest.raises(ValueError, match=r"impl='fla' needs CUDA tensors"):
        linear_attn(q, k, v, impl="fla")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        linear_attn(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match=r"q must be \[B, 1, H, K\] and k \[B, 1, H_kv, K\]"):
        linear_attn_step(q, k, v, h0)
    with pytest.raises(ValueError, match=r"state must have shape \[B, H_kv, K, V\+1\]"):
        linear_attn_step(q[:, :1], k[:, :1], v[:, :1], h0[..., :4])


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize("normalize", [True, False])
def test_grouped_query_heads_equal_repeated_keys(impl, normalize):
    """GQA: 6 query heads on 2 key/value heads give what 6 heads on the repeated keys and values give (query
    head h reads key/value head h // 3), with one state per key/value head, in the forward and the grads; the
    step form continues from that state."""
    B, T, H, Hk, K, V = 2, 70, 6, 2, 8, 16
    q, _, _, _ = make_inputs(B, T, H, K, V, normalize, False, seed=3)
    _, k, v, h0 = make_inputs(B, T, Hk, K, V, normalize, True, seed=4)
    g = torch.Generator().manual_seed(5)
    do = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    dS = torch.randn(B, Hk, K, V + normalize, generator=g, dtype=torch.float64)

    def repeated(q, k, v, initial_state, output_final_state, normalize):
        o, S = linear_attn_reference(
            q,
            *(x.repeat_interleave(H // Hk, dim=2) for x in (k, v)),
            initial_state=initial_state.repeat_interleave(H // Hk, dim=1),
            output_final_state=output_final_state,
            normalize=normalize,
        )
        return o, S[:, :: H // Hk]  # the heads of a group end in the same state

    ref = run_with_grads(repeated, *leaves(q, k, v, h0, dtype=torch.float64), do, dS, normalize=normalize)
    dtype = torch.float64 if impl == "reference" else torch.float32
    got = run_with_grads(
        linear_attn, *leaves(q, k, v, h0, dtype=dtype), do, dS, normalize=normalize, impl=impl
    )
    assert got[1].shape == (B, Hk, K, V + normalize)
    for a, b in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        assert rel_rms(a, b) < FP32_TOL

    o, S = linear_attn(
        q[:, :50].float(),
        k[:, :50].float(),
        v[:, :50].float(),
        initial_state=h0.float(),
        output_final_state=True,
        normalize=normalize,
    )
    outs = [o]
    for t in range(50, T):
        o, S = linear_attn_step(
            q[:, t : t + 1].float(), k[:, t : t + 1].float(), v[:, t : t + 1].float(), S, normalize=normalize
        )
        outs.append(o)
    assert rel_rms(torch.cat(outs, dim=1), ref[0]) < FP32_TOL
    assert rel_rms(S, ref[1]) < FP32_TOL
