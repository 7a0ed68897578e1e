"""Every fast form of every op (fla, our Triton, chunked) against the op's reference on one device, in bf16
and fp16: outputs, final state and every gradient (inputs and initial state).

On a CPU machine this runs the chunked forms on a small shape (so the check itself cannot rot); the GPU
check runs it with LINEARIZE_TEST_DEVICE=cuda at real sizes (LINEARIZE_KERNEL_SHAPE=B,T,H,D overrides).
Inputs come from benchmarks/kernels.py's makers, the ones the speed table times.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from kernel_checks import rel_rms

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kernels_benchmark", REPO / "benchmarks" / "kernels.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

DEVICE = os.environ.get("LINEARIZE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
# T odd (not a multiple of any chunk), D = 128 as in 7B-class models; the reference loops over T on the device
SHAPE = tuple(
    int(x)
    for x in os.environ.get(
        "LINEARIZE_KERNEL_SHAPE", "2,2047,4,128" if DEVICE == "cuda" else "1,70,2,16"
    ).split(",")
)
TOL = (
    3e-2  # the benchmark's check: 16-bit inputs, float32 states, against the reference on the rounded inputs
)
OPS = {op.name: op for op in bench.load_ops(None)[0]}
CASES = [
    (name, form)
    for name, op in OPS.items()
    for form in op.forms
    if DEVICE == "cuda" or form not in op.cuda_only
]


def cast_state(state, dtype, grad: bool):
    """The state as a form on `dtype` inputs takes it: float32 (float64 for the reference), window_linear's
    key/value windows in `dtype`; floating leaves with grads when `grad`."""
    sdtype = torch.float64 if dtype == torch.float64 else torch.float32

    def leaf(x, dt):
        x = x.detach().to(dt)
        return x.requires_grad_() if grad else x

    if hasattr(state, "linear_state"):  # WindowLinearState
        wins = {n: leaf(getattr(state, n), dtype) for n in ("k_window", "fk_window", "v_window")}
        return state._replace(linear_state=leaf(state.linear_state, sdtype), **wins)
    if isinstance(state, tuple):
        return tuple(leaf(x, sdtype) for x in state)
    return leaf(state, sdtype)


def state_tensors(state) -> dict[str, torch.Tensor]:
    if hasattr(state, "_fields"):
        return {n: getattr(state, n) for n in state._fields if getattr(state, n).is_floating_point()}
    if isinstance(state, tuple):
        return {f"state{i}": x for i, x in enumerate(state)}
    return {"state": state}


def run(op, impl, inputs, kw, state, do, dS):
    """o, final state tensors and the grads of <o, do> + Σ <S_i, dS_i> wrt inputs and initial state."""
    o, final = op.fn(*inputs, impl=impl, initial_state=state, output_final_state=True, **kw)
    finals = state_tensors(final)
    loss = (o.float() * do.to(o.device, torch.float32)).sum() if o.dtype != torch.float64 else (o * do).sum()
    for name, S in finals.items():
        loss = loss + (S * dS[name].to(S.device, S.dtype)).sum()
    loss.backward()
    grads = {f"d{i}": x.grad for i, x in enumerate(inputs)}
    grads.update({f"d_initial.{n}": x.grad for n, x in state_tensors(state).items() if x.requires_grad})
    return o, finals, grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,form", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_form_matches_reference(name, form, dtype, record_property):
    op = OPS[name]
    B, T, H, D = SHAPE
    pre, kw = bench.build(op, B, 33, H, D, DEVICE, torch.float64, seed=5)
    with torch.no_grad():
        _, state0 = op.fn(*pre, impl="reference", output_final_state=True, **kw)
    x, kw = bench.build(op, B, T, H, D, DEVICE, dtype, seed=T)
    ref_in = [t.detach().double().requires_grad_() for t in x]  # the reference sees the rounded inputs
    got_in = [t.detach().requires_grad_() for t in x]
    kw_ref = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(*x[2].shape[:3], x[2].shape[-1], generator=gen, dtype=torch.float64).to(DEVICE)
    dS = {
        n: torch.randn(s.shape, generator=gen, dtype=torch.float64) for n, s in state_tensors(state0).items()
    }

    ref = run(op, "reference", ref_in, kw_ref, cast_state(state0, torch.float64, True), do, dS)
    got = run(op, form, got_in, kw, cast_state(state0, dtype, True), do, dS)

    errs = {"o": rel_rms(got[0], ref[0])}
    errs.update({f"final.{n}": rel_rms(got[1][n], S) for n, S in ref[1].items()})
    for n, g in ref[2].items():
        if g is not None:
            assert got[2][n] is not None, f"{n}: no gradient"
            errs[n] = rel_rms(got[2][n], g)
    worst = max(errs, key=errs.get)
    record_property("shape", f"{B},{T},{H},{D}")
    record_property("worst", f"{worst} {errs[worst]:.2e}")
    assert errs[worst] < TOL, f"{name}/{form} {dtype}: {errs}"
