"""window_linear: chunked, step and Triton (interpreted on CPU) forms each checked directly against the
float64 quadratic reference."""

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_checks import rel_rms

from linearize.kernels.window_linear import (
    WindowLinearState,
    resolve_impl,
    window_linear,
    window_linear_chunked,
    window_linear_reference,
    window_linear_step,
)

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "linearize" / "kernels" / "window_linear"

# Observed: fp32 chunked/step/triton vs the fp64 reference stay below ~4e-7 on outputs, states and grads
# (window_factor's gradient ~2e-8, measured against the size of its terms, see wf_error); bf16 inputs give
# ~3e-3 and fp16 ~4e-4 on outputs, mostly from rounding the inputs themselves. Against the reference on the
# rounded inputs, triton's outputs, states and grads stay below ~3e-3 (bf16) and ~4e-4 (fp16).
FP32_TOL = 1e-5
LOWP_TOL = 2e-2
B, H = 2, 2


def make_inputs(T, D=8, F=8, V=16, seed=0):
    """float64 q, k: [B, T, H, D]; v: [B, T, H, V]; fq, fk: [B, T, H, F] (non-negative); window_factor [H]."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    fq, fk = (torch.randn(B, T, H, F, generator=g, dtype=torch.float64).softmax(-1) for _ in range(2))
    wf = torch.randn(H, generator=g, dtype=torch.float64).sigmoid()
    return q, k, v, fq, fk, wf


def make_state(window, P, D=8, F=8, V=16, seed=100):
    """A float64 state after P earlier tokens (P < W leaves zero-padded window slots)."""
    q, k, v, fq, fk, wf = make_inputs(P, D, F, V, seed=seed)
    return window_linear_reference(q, k, v, fq, fk, window=window, window_factor=wf, output_final_state=True)[
        1
    ]


def nan_filled_copy(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Copy of x in a buffer that started as NaN, so any read of an unwritten element shows up."""
    out = torch.full(x.shape, float("nan"), dtype=dtype)
    out.copy_(x)
    return out


def state_as(st: WindowLinearState | None, dtype, grad=False) -> WindowLinearState | None:
    """The state for a form running on `dtype` inputs: linear_state float32 (float64 for float64), windows in
    `dtype`; leaves when grad."""
    if st is None:
        return None
    ls_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ls = nan_filled_copy(st.linear_state, ls_dtype)
    wins = [w.detach().to(dtype) for w in st[1:4]]
    if grad:
        ls, *wins = (x.requires_grad_() for x in (ls, *wins))
    return WindowLinearState(ls, *wins, st.seen.clone())


def run_with_grads(fn, inputs, state, dtype, do, dS, **kw):
    """o, final state, and grads of <o, do> + <linear_state, dS> + <v_window, 1> wrt q, k, v, fq, fk,
    window_factor and the initial state's float tensors."""
    q, k, v, fq, fk = (x.detach().to(dtype).requires_grad_() for x in inputs[:5])
    wf = inputs[5].detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    st = state_as(state, dtype, grad=True)
    o, S = fn(q, k, v, fq, fk, window_factor=wf, initial_state=st, output_final_state=True, **kw)
    loss = (o * do.to(o.dtype)).sum() + (S.linear_state * dS.to(S.linear_state.dtype)).sum()
    loss = loss + S.v_window.float().sum()
    loss.backward()
    grads = dict(zip("q k v fq fk window_factor".split(), (x.grad for x in (q, k, v, fq, fk, wf))))
    if st is not None:
        grads.update({f"state.{n}": getattr(st, n).grad for n in ("linear_state", "k_window", "v_window")})
    return o, S, grads


def wf_error(a, b, o_ref, do, wf) -> float:
    """window_factor's gradient sums do_t · ∂o_t/∂w over tokens, and each term is itself a near-cancellation
    (o_t/w - o_t when few keys are old), so its fp32 error is measured against the size of the summed terms,
    |do||o| / (w (1-w)), not against the (possibly O(eps)) sum."""
    assert torch.isfinite(a).all()
    size = (do.abs() * o_ref.detach().abs()).sum((0, 1, 3)) / (wf * (1 - wf))
    return ((a.double() - b.double()).norm() / size.norm()).item()


def check_against_reference(
    fn, T, W, with_state, dtype=torch.float32, tol=FP32_TOL, D=8, F=8, V=16, form_kw=None, **kw
):
    """Outputs, final state and every gradient of `fn` on `dtype` inputs against the float64 reference. For
    16-bit dtypes the reference sees the inputs rounded to `dtype`: rounding q, k moves some windows' arg-max
    key, which changes dq, dk by several percent in every form (chunked included), so the unrounded reference
    would measure the inputs, not the form's arithmetic."""
    q, k, v, fq, fk, wf = inputs = make_inputs(T, D=D, F=F, V=V, seed=T + 7 * W)
    st = make_state(W, P=5 if W > 5 else 2 * W + 3, D=D, F=F, V=V) if with_state else None
    if dtype in (torch.bfloat16, torch.float16):
        inputs = tuple(x.to(dtype).double() for x in inputs[:5]) + (wf,)
        if st is not None:
            st = st._replace(**{n: getattr(st, n).to(dtype).double() for n in st._fields[1:4]})
    g = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    dS = torch.randn(B, H, F, V + 1, generator=g, dtype=torch.float64)
    ref = run_with_grads(window_linear_reference, inputs, st, torch.float64, do, dS, window=W, **kw)
    got = run_with_grads(fn, inputs, st, dtype, do, dS, window=W, **kw, **(form_kw or {}))

    assert got[0].dtype == dtype and got[1].linear_state.dtype == torch.float32
    assert got[1].k_window.shape == (B, W, H, D) and got[1].linear_state.shape == (B, H, F, V + 1)
    assert torch.equal(got[1].seen, ref[1].seen)
    assert rel_rms(got[0], ref[0]) < tol
    for name in ("linear_state", "k_window", "fk_window", "v_window"):
        assert rel_rms(getattr(got[1], name), getattr(ref[1], name)) < tol, name
    one_key = W == 1 or (T == 1 and not with_state)  # every window holds one key: dq, dk are exactly 0
    for name, b in ref[2].items():
        a = got[2][name]
        if name == "window_factor":
            assert wf_error(a, b, ref[0], do, wf) < tol, name
        elif name in ("q", "k") and one_key:
            assert (a.double() - b).abs().max() < 1e-5, name
        else:
            assert rel_rms(a, b) < tol, name


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("W", [1, 16, 64, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference(T, W, with_state):
    scale = None if W != 16 else 0.3
    check_against_reference(window_linear_chunked, T, W, with_state, scale=scale, D=16 if T == 65 else 8)


@pytest.mark.parametrize("chunk_size", [1, 16, 48, 100])
@pytest.mark.parametrize("W", [16, 100])
def test_chunk_sizes_not_dividing_T(chunk_size, W):
    check_against_reference(window_linear_chunked, 65, W, True, form_kw=dict(chunk_size=chunk_size))


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("W", [1, 16, 64, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_step_matches_reference(T, W, with_state):
    q, k, v, fq, fk, wf = make_inputs(T, seed=T + W)
    st = make_state(W, P=7) if with_state else None
    ref_o, ref_S = window_linear_reference(
        q, k, v, fq, fk, window=W, window_factor=wf, initial_state=st, output_final_state=True
    )
    S = state_as(st, torch.float32)
    outs = []
    for t in range(T):
        x = (y[:, t : t + 1].float() for y in (q, k, v, fq, fk))
        o, S = window_linear_step(*x, S, window=W, window_factor=wf.float())
        outs.append(o)
    assert S.linear_state.dtype == torch.float32
    assert rel_rms(torch.cat(outs, dim=1), ref_o) < FP32_TOL
    for a, b in zip(S[:4], ref_S[:4]):
        assert rel_rms(a, b) < FP32_TOL
    assert torch.equal(S.seen, ref_S.seen)


@pytest.mark.parametrize("P", [1, 64, 100])
@pytest.mark.parametrize("W", [16, 100])
def test_chunked_prefill_then_step_decode(P, W):
    T = 130
    q, k, v, fq, fk, wf = make_inputs(T, seed=P + W)
    ref_o, ref_S = window_linear_reference(
        q, k, v, fq, fk, window=W, window_factor=wf, output_final_state=True
    )
    xs = [x.float() for x in (q, k, v, fq, fk)]
    o, S = window_linear(*(x[:, :P] for x in xs), window=W, window_factor=wf.float(), output_final_state=True)
    outs = [o]
    for t in range(P, T):
        o, S = window_linear_step(*(x[:, t : t + 1] for x in xs), S, window=W, window_factor=wf.float())
        outs.append(o)
    assert rel_rms(torch.cat(outs, dim=1), ref_o) < FP32_TOL
    for a, b in zip(S[:4], ref_S[:4]):
        assert rel_rms(a, b) < FP32_TOL


def test_step_state_memory_does_not_grow():
    W = 16
    q, k, v, fq, fk, wf = (x.float() for x in make_inputs(300, seed=5))
    S, sizes = None, {}
    for t in range(300):
        _, S = window_linear_step(
            *(x[:, t : t + 1] for x in (q, k, v, fq, fk)), S, window=W, window_factor=wf
        )
        if t + 1 in (10, 300):
            sizes[t + 1] = [(tuple(x.shape), x.dtype, x.numel() * x.element_size()) for x in S]
    assert sizes[10] == sizes[300]
    assert int(S.seen[0]) == 300


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    T, W = 257, 16
    q, k, v, fq, fk, wf = make_inputs(T, seed=3)
    st = make_state(W, P=40)
    ref_o, ref_S = window_linear_reference(
        q, k, v, fq, fk, window=W, window_factor=wf, initial_state=st, output_final_state=True
    )
    lp = [x.to(dtype) for x in (q, k, v, fq, fk)]
    o, S = window_linear_chunked(
        *lp, window=W, window_factor=wf.float(), initial_state=state_as(st, dtype), output_final_state=True
    )
    assert o.dtype == dtype and S.linear_state.dtype == torch.float32 and S.k_window.dtype == dtype
    assert rel_rms(o, ref_o) < LOWP_TOL
    assert rel_rms(S.linear_state, ref_S.linear_state) < LOWP_TOL
    o_step, S_step = window_linear_step(
        *(x[:, :1] for x in lp), state_as(st, dtype), window=W, window_factor=wf.float()
    )
    assert o_step.dtype == dtype and S_step.linear_state.dtype == torch.float32
    assert rel_rms(o_step, ref_o[:, :1]) < LOWP_TOL


def test_reference_is_lolcats_hybrid_attention_quadratic():
    """The specification itself against a dense transcription of LoLCATs' hybrid_attention_quadratic: masks
    from tril/triu, softmax max over the window only, one shared denominator."""
    T, W = 20, 6
    q, k, v, fq, fk, wf = make_inputs(T, seed=9)
    q, k, v, fq, fk = (x[0, :, 0] for x in (q, k, v, fq, fk))
    wf = wf[:1]
    ones = torch.ones(T, T, dtype=torch.bool)
    mask_window = ones.tril() & ones.triu(-(W - 1))
    mask_linear = ones.tril(-W)
    a_sm = (q @ k.T * q.shape[-1] ** -0.5).masked_fill(~mask_window, -1e8)
    a_sm = wf * torch.exp(a_sm - a_sm.amax(-1, keepdim=True))
    a_ln = (1 - wf) * (fq @ fk.T).masked_fill(~mask_linear, 0)
    want = (a_sm + a_ln) @ v / ((a_sm + a_ln).sum(-1, keepdim=True) + 1e-6)
    o, _ = window_linear_reference(*(x[None, :, None] for x in (q, k, v, fq, fk)), window=W, window_factor=wf)
    assert rel_rms(o[0, :, 0], want) < 1e-12


def test_large_scores_do_not_overflow():
    """Max-subtraction inside the window: scores of ~1e4 stay finite in every form."""
    q, k, v, fq, fk, wf = (x.float() for x in make_inputs(65, seed=4))
    q = q * 3e3
    ref, _ = window_linear_reference(
        q.double(), k.double(), v.double(), fq.double(), fk.double(), window=16, window_factor=wf.double()
    )
    for impl in ("chunked", "reference"):
        o, _ = window_linear(q, k, v, fq, fk, window=16, window_factor=wf, impl=impl)
        assert rel_rms(o, ref) < FP32_TOL
    o, S = None, None
    outs = []
    for t in range(65):
        o, S = window_linear_step(
            *(x[:, t : t + 1] for x in (q, k, v, fq, fk)), S, window=16, window_factor=wf
        )
        outs.append(o)
    assert rel_rms(torch.cat(outs, 1), ref) < FP32_TOL


def test_empty_sequence_keeps_state():
    q, k, v, fq, fk, wf = make_inputs(0)
    st = make_state(16, P=20)
    for impl in ("chunked", "reference"):
        o, S = window_linear(
            q, k, v, fq, fk, window=16, window_factor=wf, initial_state=st, output_final_state=True, impl=impl
        )
        assert o.shape == (B, 0, H, 16)
        for a, b in zip(S, st):
            assert torch.equal(a, b)


def test_final_state_only_when_asked():
    q, k, v, fq, fk, wf = make_inputs(5)
    for impl in ("auto", "chunked", "reference"):
        assert window_linear(q, k, v, fq, fk, window=3, window_factor=wf, impl=impl)[1] is None


def test_resolve_impl():
    x = torch.zeros(1)
    assert resolve_impl("auto", x) == "chunked"
    for impl in ("chunked", "reference", "triton"):
        assert resolve_impl(impl, x) == impl


def test_bad_inputs_state_the_rule(monkeypatch):
    q, k, v, fq, fk, wf = make_inputs(5)
    st = make_state(4, P=6)
    kw = dict(window=4, window_factor=wf)
    with pytest.raises(ValueError, match=r"q and k must have the same shape \[B, T, H, D\]"):
        window_linear(q, k[..., :4], v, fq, fk, **kw)
    with pytest.raises(ValueError, match=r"fq and fk must have the same shape \[B, T, H, F\]"):
        window_linear(q, k, v, fq, fk[..., :4], **kw)
    with pytest.raises(
        ValueError, match=r"fq and fk must have the same shape \[B, T, H, F\] with the same B"
    ):
        window_linear(q, k, v, fq[:1], fk[:1], **kw)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\] with the same B, T, H as q"):
        window_linear(q, k, v[:, :3], fq, fk, **kw)
    with pytest.raises(ValueError, match=r"q, k, v, fq, fk must share one floating dtype"):
        window_linear(q, k, v.float(), fq, fk, **kw)
    with pytest.raises(ValueError, match=r"q, k, v, fq, fk must share one floating dtype"):
        window_linear(*(x.long() for x in (q, k, v, fq, fk)), **kw)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"window must be an integer >= 1"):
            window_linear(q, k, v, fq, fk, window=bad, window_factor=wf)
    with pytest.raises(ValueError, match=r"window_factor must be a tensor of shape \[H\] = \[2\]"):
        window_linear(q, k, v, fq, fk, window=4, window_factor=wf[:1])
    with pytest.raises(ValueError, match=r"window_factor must be a tensor of shape \[H\]"):
        window_linear(q, k, v, fq, fk, window=4, window_factor=0.5)
    for bad in ([0.0, 0.5], [0.5, 1.0], [2.0, 0.5]):
        with pytest.raises(ValueError, match=r"window_factor must lie in the open interval \(0, 1\)"):
            window_linear(q, k, v, fq, fk, window=4, window_factor=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"initial_state must be a WindowLinearState or None, got tuple"):
        window_linear(q, k, v, fq, fk, **kw, initial_state=tuple(st))
    with pytest.raises(
        ValueError, match=r"initial_state.k_window must have shape \[B, W, H, D\] = \[2, 3, 2, 8\]"
    ):
        window_linear(q, k, v, fq, fk, window=3, window_factor=wf, initial_state=st)
    with pytest.raises(ValueError, match=r"initial_state.linear_state must have shape \[B, H, F, V\+1\]"):
        window_linear(q, k, v, fq, fk, **kw, initial_state=st._replace(linear_state=st.linear_state[..., :4]))
    with pytest.raises(
        ValueError, match=r"impl must be one of 'auto', 'chunked', 'reference', 'triton', got 'tri'"
    ):
        window_linear(q, k, v, fq, fk, **kw, impl="tri")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"impl='triton' needs CUDA tensors"):
        window_linear(q, k, v, fq, fk, **kw, impl="triton")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        window_linear(q, k, v, fq, fk, **kw, chunk_size=0)
    with pytest.raises(ValueError, match=r"a decode step takes one token: q must be \[B, 1, H, D\]"):
        window_linear_step(q, k, v, fq, fk, None, **kw)
    one = [x[:, :1] for x in (q, k, v, fq, fk)]
    with pytest.raises(ValueError, match=r"state.v_window must have shape \[B, W, H, V\]"):
        window_linear_step(*one, st._replace(v_window=st.v_window[..., :3]), **kw)


def test_no_kernel_library_at_module_level():
    """Only triton.py imports triton at module level; the dispatch imports it inside the call that needs it."""
    for path in PKG.glob("*.py"):
        if path.name == "triton.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("triton", "fla") for n in names), (path.name, names)


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess of test_interpreted_kernels"
)


def test_interpreted_kernels():
    """The Triton form's tests (the `triton` ones below), run by pytest in a subprocess with TRITON_INTERPRET=1
    set before anything imports triton: `import linearize` pulls in transformers, torch._dynamo and with them
    triton, and triton.language's own helpers are interpreted only when the variable is set at that import."""
    pytest.importorskip("triton")
    if INTERPRETING:
        pytest.skip("already inside the interpreter subprocess")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "triton", "-p", "no:cacheprovider", "-rs"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    tail = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and "skipped" not in res.stdout and "deselected" in res.stdout, tail


@pytest.fixture(scope="module")
def interpreted_triton():
    """Our Triton module; its kernels must really be the interpreter's (CPU tensors, numpy underneath)."""
    from triton.runtime.interpreter import InterpretedFunction

    from linearize.kernels.window_linear import triton as mod

    assert mod.INTERPRET
    kernels = [name for name in dir(mod) if name.endswith("_kernel")]
    assert len(kernels) == 8, kernels  # window: fwd, dq, dkv; linear: states, fwd, bwd states, dv, dq+dk
    for name in kernels:
        assert isinstance(getattr(mod, name), InterpretedFunction), name
    return mod


def triton_form(*args, **kw):
    return window_linear(*args, impl="triton", **kw)


@needs_interpreter
@pytest.mark.parametrize(
    "T,W,with_state",
    [
        (1, 16, False),
        (1, 1, True),
        (17, 1, False),
        (17, 16, True),
        (64, 16, False),
        (65, 64, True),
        (65, 100, False),
        (100, 16, True),
        (257, 16, True),
    ],
)
def test_triton_matches_reference(interpreted_triton, T, W, with_state):
    """Linear chunks are 64 tokens: T = 100 and 257 carry the linear state across 2 and 5 chunks."""
    check_against_reference(triton_form, T, W, with_state, scale=None if W != 64 else 0.3)


@needs_interpreter
def test_triton_odd_sizes_and_several_tiles(interpreted_triton):
    """D, F, V not powers of two (masked tiles); F = 72 and V = 40 span three and two 32-wide tiles (of the
    state scans, the F and V loops, the F- and V-tiled grids); three chunks, an initial state, W dividing
    nothing."""
    check_against_reference(triton_form, 130, 7, True, D=24, F=72, V=40)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision(interpreted_triton, dtype):
    check_against_reference(triton_form, 65, 16, True, dtype=dtype, tol=LOWP_TOL)


@needs_interpreter
def test_triton_float64_inputs_run_in_float32(interpreted_triton):
    T, W = 17, 4
    q, k, v, fq, fk, wf = make_inputs(T, seed=6)
    st = make_state(W, P=9)
    kw = dict(window=W, window_factor=wf, initial_state=st, output_final_state=True)
    ref_o, ref_S = window_linear_reference(q, k, v, fq, fk, **kw)
    o, S = window_linear(q, k, v, fq, fk, impl="triton", **kw)
    assert o.dtype == torch.float64 and S.linear_state.dtype == torch.float64
    assert rel_rms(o, ref_o) < FP32_TOL and rel_rms(S.linear_state, ref_S.linear_state) < FP32_TOL


@needs_interpreter
def test_triton_refuses_int32_overflow(interpreted_triton):
    """The kernels index with int32: a call whose per-chunk states would pass 2**31 elements is refused before
    anything is allocated (meta tensors: no memory)."""
    B_, T, H_, D, F = 8, 65536, 32, 64, 128
    q = torch.empty(B_, T, H_, D, device="meta")
    fq = torch.empty(B_, T, H_, F, device="meta")
    with pytest.raises(ValueError, match=r"int32, so each must hold < 2\*\*31 elements.*split the batch"):
        interpreted_triton.window_linear_triton(
            q, q, q, fq, fq, window=64, window_factor=torch.full((H_,), 0.5)
        )


@needs_interpreter
def test_triton_empty_sequence_keeps_state(interpreted_triton):
    q, k, v, fq, fk, wf = (x.float() for x in make_inputs(0))
    st = state_as(make_state(16, P=20), torch.float32)
    o, S = window_linear(
        q, k, v, fq, fk, window=16, window_factor=wf, initial_state=st, output_final_state=True, impl="triton"
    )
    assert o.shape == (B, 0, H, 16)
    for a, b in zip(S, st):
        assert torch.equal(a, b)


@needs_interpreter
def test_triton_fills_every_output(interpreted_triton):
    """The kernels' outputs start as NaN; every row of every (batch, head) must be written."""
    T, W = 40, 7
    q, k, v, fq, fk, wf = (x.float() for x in make_inputs(T, seed=2))
    state = interpreted_triton.empty_window_linear_state(q, v, fq, W)
    k_ext, fk_ext, v_aug_ext, _ = interpreted_triton.extend_with_window(state, k, fk, v, torch.float32)
    lo = torch.full((B,), W, dtype=torch.int32)
    num, den = interpreted_triton._WindowPart.apply(
        q, k_ext.contiguous(), v_aug_ext[..., :16].contiguous(), lo, W, 8**-0.5
    )
    assert torch.isfinite(num).all() and torch.isfinite(den).all() and (den >= 1).all()
    assert not math.isnan(float(num.sum()))
    fk_ext = fk_ext.contiguous().requires_grad_()
    s0 = torch.rand(B, H, 8, 17).requires_grad_()
    num, den, S = interpreted_triton._LinearPart.apply(
        fq.contiguous(), fk_ext, v_aug_ext[..., :16].contiguous(), s0
    )
    assert all(torch.isfinite(x).all() for x in (num, den, S))
    (num.sum() + den.sum() + S.sum()).backward()
    assert torch.isfinite(fk_ext.grad).all() and torch.isfinite(s0.grad).all()


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spilling():
    """What the interpreter cannot check: every kernel, with its GPU launch parameters at D = F = V = 128,
    compiles for sm_90 (no GPU needed: triton's bundled ptxas), fits in shared memory and spills at most a few
    hundred bytes per thread (64x64 fp32 tiles at 4 warps spilled ~10 KB)."""
    if INTERPRETING:
        pytest.skip("needs the compiled (not interpreted) kernels")
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from linearize.kernels.window_linear import triton as mod

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("triton's CUDA backend tools are not installed")
    (window, window_kv), (chunk, scan) = mod._blocks(128, 128), mod._linear_blocks(128, 128)
    configs = {"_window_bwd_dkv_kernel": window_kv, "_linear_states_kernel": scan}
    configs["_linear_bwd_states_kernel"] = scan
    types = {"LO": "*i32", "ARG": "*i32", "T": "i32", "TE": "i32", "H": "i32", "W": "i32", "NT": "i32"}
    for name in [n for n in dir(mod) if n.endswith("_kernel")]:
        kernel = getattr(mod, name)
        cfg = dict(configs.get(name, window if name.startswith("_window") else chunk))
        opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        consts = {"D": 128, "F": 128, "V": 128, **cfg}
        consts = {p.name: consts[p.name] for p in kernel.params if p.is_constexpr}
        sig = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "*fp32") for p in kernel.params}
        sig["scale"] = "fp32"
        sig = {p.name: sig[p.name] for p in kernel.params}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}_{os.getpid()}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
        cubin.unlink()
        stack = int(usage.split("STACK:")[1].split()[0])
        assert stack <= 512 and compiled.metadata.shared <= 227 * 1024, (
            name,
            usage,
            compiled.metadata.shared,
        )
