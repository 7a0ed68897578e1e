"""`from linearize.kernels import <op>` gives the op's function (as fla.ops does), not its folder's module."""

import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import one_thread, rel_rms  # noqa: F401  (autouse fixture)

import linearize.kernels as kernels

OPS = ["linear_attn", "window_linear", "gated_linear_attn", "gated_slot_attn", "gated_delta"]
# every op folder has these forms; triton only where the op has its own kernel (fla's live in fla)
FORMS = ["chunked", "reference", "step"]
TRITON_FORMS = {"window_linear"}

B, T, H, K, V, M, W = 2, 65, 2, 8, 16, 4, 16
# Observed: fp32 chunked vs fp32 reference ~1e-7 on these sizes.
FP32_TOL = 1e-5


def make_inputs(op: str) -> tuple[tuple, dict]:
    """float32 positional inputs and keyword arguments of `op`, [B, T, H, *] as its docstring asks."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    if op == "linear_attn":
        return (F.elu(q) + 1, k.softmax(-1), v), {}
    if op == "window_linear":
        fq, fk = randn(B, T, H, K).softmax(-1), randn(B, T, H, K).softmax(-1)
        return (q, k, v, fq, fk), dict(window=W, window_factor=randn(H).sigmoid())
    if op == "gated_linear_attn":
        return (q, k, v, F.logsigmoid(randn(B, T, H, K))), {}
    if op == "gated_slot_attn":
        return (q, k, v, randn(B, T, H, M), F.logsigmoid(randn(B, T, H, M))), {}
    if op == "gated_delta":
        return (q, F.normalize(k, dim=-1), v, F.logsigmoid(randn(B, T, H)), randn(B, T, H).sigmoid()), {}
    raise AssertionError(op)


def state_tensors(state) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def test_all_lists_every_op_and_its_step():
    expected = {name for op in OPS for name in (op, f"{op}_step")} | {"WindowLinearState"}
    assert set(kernels.__all__) == expected
    for name in kernels.__all__:
        assert callable(getattr(kernels, name)), name


@pytest.mark.parametrize("op", OPS)
def test_op_is_the_folders_function_and_matches_its_reference(op):
    folder = importlib.import_module(f"linearize.kernels.{op}")
    fn = getattr(kernels, op)
    assert fn is folder.__dict__[op]
    assert getattr(kernels, f"{op}_step") is folder.__dict__[f"{op}_step"]

    args, kw = make_inputs(op)
    o, S = fn(*args, output_final_state=True, **kw)
    o_ref, S_ref = getattr(folder, f"{op}_reference")(*args, output_final_state=True, **kw)
    assert o.shape == o_ref.shape == (B, T, H, V)
    assert rel_rms(o, o_ref) < FP32_TOL
    for s, s_ref in zip(state_tensors(S), state_tensors(S_ref), strict=True):
        assert rel_rms(s, s_ref) < FP32_TOL


def test_importing_forms_later_keeps_the_function():
    """A submodule's first import binds it on its folder only; `linearize.kernels.<op>` must stay the function.
    Run in a fresh interpreter so each import is a first one (in this process other tests already did them)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        with_triton = False
    else:
        with_triton = True
    imports = [
        f"linearize.kernels.{op}.{form}"
        for op in OPS
        for form in FORMS + (["triton"] if with_triton and op in TRITON_FORMS else [])
    ]
    code = (
        # the first import of all goes through a form, before anything imported linearize.kernels itself
        f"import {imports[-1]}\n"
        + "".join(f"import {m}\n" for m in imports)
        + "import importlib, json, linearize.kernels as K\n"
        + f"for m in {imports!r}: importlib.import_module(m)\n"
        + "from linearize.kernels import *\n"
        + f"print(json.dumps({{op: [type(getattr(K, op)).__name__, getattr(K, op).__module__] for op in {OPS!r}}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {op: ["function", f"linearize.kernels.{op}"] for op in OPS}


def test_importing_and_calling_on_cpu_loads_neither_triton_nor_fla():
    code = (
        "import sys, torch, linearize.kernels\n"
        "from linearize.kernels import *\n"
        "x = torch.rand(1, 5, 1, 4)\n"
        "linear_attn(x, x, x)\n"
        "print(' '.join(m for m in ('triton', 'fla') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
