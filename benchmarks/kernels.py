"""Time every form of every op under linearize/kernels/ against causal softmax attention (torch SDPA).

For each op (linear_attn, gated_linear_attn, gated_slot_attn, gated_delta, window_linear; whichever import)
and each form it has here (reference, chunked, and fla / triton on CUDA), a form is first checked against the
op's float64 reference on a small shape; a form that fails is reported and not timed. Then forward and
forward+backward are timed over sequence lengths at a constant number of tokens B·T. See README.md.

CPU timings use one thread by default: with OpenMP's active wait on a loaded machine, multi-threaded timings
swing by orders of magnitude (set OMP_WAIT_POLICY=PASSIVE when you raise --threads).
"""

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Op:
    """An op as the benchmark sees it: how to build its inputs and which impls are its forms."""

    name: str
    fn: Callable
    forms: tuple[str, ...]  # impl names other than "reference"; a CUDA-only one is skipped on CPU
    cuda_only: tuple[str, ...]
    make: Callable  # (B, T, H, D, device, dtype, gen) -> (tensors, kwargs); tensors get the grads


def _feature(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def _make_linear_attn(B, T, H, D, device, dtype, gen):
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    return [_feature(q), _feature(k), v], {}


def _make_gla(B, T, H, D, device, dtype, gen):
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, D, generator=gen)) / 16  # fla's GLA layer: gate_logit_normalizer 16
    return [q, k, v, g], {}


def _make_gsa(B, T, H, D, device, dtype, gen):
    M = 64  # fla's GSA layer default num_slots
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    s = torch.randn(B, T, H, M, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, M, generator=gen) + 2)
    return [q, k, v, s, g], {}


def _make_gated_delta(B, T, H, D, device, dtype, gen):
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3)
    beta = torch.rand(B, T, H, generator=gen).sigmoid()
    return [q, k, v, g, beta], {"use_qk_l2norm": True}


def _make_window_linear(B, T, H, D, device, dtype, gen):
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    fq, fk = (
        _feature(torch.randn(B, T, H, D, generator=gen)),
        _feature(torch.randn(B, T, H, D, generator=gen)),
    )
    return [q, k, v, fq, fk], {"window": 64, "window_factor": torch.full((H,), 0.5)}


OP_SPECS = [
    # name, module, function, forms beyond the reference, CUDA-only forms, input maker
    ("linear_attn", "linearize.kernels.linear_attn", "linear_attn", ("chunked", "fla"), ("fla",), _make_linear_attn),
    ("gated_linear_attn", "linearize.kernels.gated_linear_attn", "gated_linear_attn", ("chunked", "fla"), ("fla",),
     _make_gla),
    ("gated_slot_attn", "linearize.kernels.gated_slot_attn", "gated_slot_attn", ("chunked", "fla"), ("fla",),
     _make_gsa),
    ("gated_delta", "linearize.kernels.gated_delta", "gated_delta", ("chunked", "fla"), ("fla",), _make_gated_delta),
    ("window_linear", "linearize.kernels.window_linear", "window_linear", ("chunked", "triton"), ("triton",),
     _make_window_linear),
]  # fmt: skip


def load_ops(names: list[str] | None) -> tuple[list[Op], list[str]]:
    """The ops that import (an op another engineer has not landed yet is skipped, with a note)."""
    ops, notes = [], []
    for name, module, fn, forms, cuda_only, make in OP_SPECS:
        if names and name not in names:
            continue
        try:
            mod = importlib.import_module(module)
            ops.append(Op(name, getattr(mod, fn), forms, cuda_only, make))
        except (ImportError, AttributeError) as e:
            notes.append(f"{name}: skipped, does not import ({type(e).__name__}: {e})")
    return ops, notes


def build(op: Op, B, T, H, D, device, dtype, seed=0):
    """Inputs as leaves in `dtype` on `device` (tensor kwargs too), plus the gradient of the output."""
    gen = torch.Generator().manual_seed(seed)
    tensors, kwargs = op.make(B, T, H, D, device, dtype, gen)
    tensors = [x.to(device=device, dtype=dtype).requires_grad_() for x in tensors]
    kwargs = {k: (x.to(device=device, dtype=dtype) if torch.is_tensor(x) else x) for k, x in kwargs.items()}
    return tensors, kwargs


def run(op: Op, impl: str, tensors, kwargs, backward: bool, do: torch.Tensor | None = None):
    for x in tensors:
        x.grad = None
    o, _ = op.fn(*tensors, impl=impl, **kwargs)
    if backward:
        o.backward(torch.ones_like(o) if do is None else do)
    return o


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return ((a - b).norm() / (b.norm() + 1e-300)).item()


def check_form(op: Op, impl: str, device, dtype) -> tuple[bool, str]:
    """The form against the float64 reference on a small shape (CPU), outputs and all input grads."""
    B, T, H, D = 2, 100, 2, 16
    ref_in, ref_kw = build(op, B, T, H, D, "cpu", torch.float64)
    got_in, got_kw = build(op, B, T, H, D, device, dtype)
    do = torch.randn(
        B, T, H, ref_in[2].shape[-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    try:
        ref_o = run(op, "reference", ref_in, ref_kw, True, do)
        got_o = run(op, impl, got_in, got_kw, True, do.to(device=device, dtype=dtype))
    except Exception as e:  # a broken form is reported, not timed
        return False, f"{type(e).__name__}: {e}"
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    errs = {"o": rel_rms(got_o.cpu(), ref_o)}
    for i, (a, b) in enumerate(zip(got_in, ref_in)):
        if b.grad is not None:
            errs[f"grad{i}"] = math.inf if a.grad is None else rel_rms(a.grad.cpu(), b.grad)
    worst = max(errs, key=errs.get)
    ok = errs[worst] < tol
    return ok, f"worst rel. RMS error {errs[worst]:.1e} ({worst}), tolerance {tol:.0e}"


def timeit(fn: Callable, device: str, min_time: float, min_reps: int = 3) -> float:
    """Median milliseconds of fn() after one warm-up call; repeats until min_time seconds or min_reps calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 50:
            break
    return statistics.median(times)


def time_sdpa(B, T, H, D, device, dtype, min_time) -> tuple[float, float]:
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return timeit(fwd, device, min_time), timeit(fwd_bwd, device, min_time)


def time_flash(B, T, H, D, device, dtype, min_time) -> tuple[float, float] | None:
    """flash-attention's causal forward and forward+backward ([B, T, H, D] layout), when the package is
    installed and the device is CUDA; else None."""
    if device != "cuda" or importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_func

    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def fwd():
        with torch.no_grad():
            flash_attn_func(q, k, v, causal=True)

    def fwd_bwd():
        flash_attn_func(q, k, v, causal=True).sum().backward()

    return timeit(fwd, device, min_time), timeit(fwd_bwd, device, min_time)


def time_form(op: Op, impl: str, B, T, H, D, device, dtype, min_time) -> tuple[float, float]:
    tensors, kwargs = build(op, B, T, H, D, device, dtype)

    def fwd():
        with torch.no_grad():
            run(op, impl, tensors, kwargs, False)

    return timeit(fwd, device, min_time), timeit(
        lambda: run(op, impl, tensors, kwargs, True), device, min_time
    )


def windowed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal softmax attention over the last `window` keys, [B, T, H, D] in and out: each block of `window`
    queries attends to its own block and the one before through SDPA with a band mask (the softmax half of
    the unfused window + linear pair)."""
    B, T, H, D = q.shape
    n = -(-T // window)
    pad = n * window - T
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).view(B, n, window, H, D) for x in (q, k, v))
    k, v = (torch.cat([F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1], x], dim=2) for x in (k, v))
    j, m = torch.arange(window, device=q.device)[:, None], torch.arange(2 * window, device=q.device)[None]
    band = (m > j) & (m <= j + window)
    mask = band.expand(n, window, 2 * window).clone()
    mask[0, :, :window] = False  # the first block has no block before it
    qs, ks, vs = (x.permute(0, 1, 3, 2, 4).reshape(B * n, H, -1, D) for x in (q, k, v))
    mask = mask[None, :, None].expand(B, n, 1, window, 2 * window).reshape(B * n, 1, window, 2 * window)
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
    return o.view(B, n, H, window, D).permute(0, 1, 3, 2, 4).reshape(B, n * window, H, D)[:, :T]


def window_compare(seq_lens, tokens, H, D, device, dtype, min_time) -> list[dict]:
    """window_linear's fused form against the unfused pair (linear attention + windowed SDPA) and against the
    linear attention alone: fla's chunk_linear_attn on CUDA, our chunked linear_attn on CPU."""
    from linearize.kernels import linear_attn

    if device == "cuda":
        from fla.ops.linear_attn import chunk_linear_attn

        fused = "triton"
    else:  # the code path only: CPU has neither fla nor our Triton kernel

        def chunk_linear_attn(q, k, v, normalize=True):
            return linear_attn(q, k, v, normalize=normalize, impl="chunked")

        fused = "chunked"
    op = next(o for o in load_ops(["window_linear"])[0])

    def measure(T: int) -> dict:
        B = max(1, tokens // T)
        (q, k, v, fq, fk), kw = build(op, B, T, H, D, device, dtype)

        def lin():
            return chunk_linear_attn(fq, fk, v, normalize=True)[0]

        def pair():
            return lin() + windowed_sdpa(q, k, v, kw["window"])

        def fwd_bwd(fn):
            def go():
                fn().sum().backward()

            return go

        row = dict(B=B, T=T, H=H, D=D, window=kw["window"], fused_form=fused)
        row["triton_fwd_bwd_ms"] = timeit(
            lambda: run(op, fused, [q, k, v, fq, fk], kw, True), device, min_time
        )
        row["pair_fwd_bwd_ms"] = timeit(fwd_bwd(pair), device, min_time)
        row["chunk_linear_fwd_bwd_ms"] = timeit(fwd_bwd(lin), device, min_time)
        print(
            f"window_linear {fused} T={T:6d}: f+b {row['triton_fwd_bwd_ms']:.2f} ms, unfused pair "
            f"{row['pair_fwd_bwd_ms']:.2f} ms, chunk_linear_attn {row['chunk_linear_fwd_bwd_ms']:.2f} ms"
        )
        return row

    rows = [measure(T) for T in seq_lens]
    return rows


def decode_times(ops: list[Op], seq_lens, H, D, device, dtype, min_time) -> list[dict]:
    """Per op, the time of one decode step (batch 1) from the state after a prefill of T tokens, next to
    SDPA's one-query step over a KV cache of T keys."""
    import linearize.kernels as kernels
    from linearize.kernels.window_linear import window_linear_step

    def measure(op: Op, impl: str, step: Callable, T: int) -> dict:
        tensors, kw = build(op, 1, T, H, D, device, dtype)
        with torch.no_grad():
            _, state = op.fn(*tensors, impl=impl, output_final_state=True, **kw)
            one = [x[:, -1:].detach() for x in tensors]
            ms = timeit(lambda: step(*one, state, **kw), device, min_time)
            q1 = torch.randn(1, H, 1, D, device=device, dtype=dtype)
            kc, vc = (torch.randn(1, H, T, D, device=device, dtype=dtype) for _ in range(2))
            sdpa = timeit(lambda: F.scaled_dot_product_attention(q1, kc, vc), device, min_time)
        print(f"decode {op.name:18s} T={T:6d}: step {ms:.3f} ms, SDPA over the cache {sdpa:.3f} ms")
        return dict(op=op.name, prefill_form=impl, T=T, H=H, D=D, step_ms=ms, sdpa_decode_ms=sdpa)

    rows = []
    for op in ops:
        step = window_linear_step if op.name == "window_linear" else getattr(kernels, f"{op.name}_step")
        impl = next((f for f in op.forms if f in op.cuda_only), "chunked") if device == "cuda" else "chunked"
        rows += [measure(op, impl, step, T) for T in seq_lens]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA"
    )
    p.add_argument("--out", default="results.json", help="JSON file for the results")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, see module docstring)"
    )
    p.add_argument("--ops", nargs="*", help="subset of ops (default: all that import)")
    p.add_argument("--seq-lens", type=int, nargs="*", help="default: 256..8192 (CPU), 1024..32768 (CUDA)")
    p.add_argument("--tokens", type=int, help="B·T, held constant (default: 8192 on CPU, 32768 on CUDA)")
    p.add_argument("--shapes", nargs="*", help="H:D pairs (default: 4:64 on CPU, 16:128 32:64 on CUDA)")
    p.add_argument(
        "--ref-max-t", type=int, default=2048, help="time the python-loop reference only up to here"
    )
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of repeats per measurement")
    p.add_argument("--forms", nargs="*", help="check and time only these forms (SDPA is always timed)")
    p.add_argument(
        "--window-compare",
        action="store_true",
        help="also time window_linear against the unfused pair and against chunk_linear_attn (first H:D)",
    )
    p.add_argument("--decode", action="store_true", help="also time one decode step vs context (first H:D)")
    args = p.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    dtype = DTYPES[args.dtype or ("float32" if device == "cpu" else "bfloat16")]
    cpu = device == "cpu"
    torch.set_num_threads(args.threads)
    seq_lens = args.seq_lens or (
        [256, 512, 1024, 2048, 4096, 8192] if cpu else [1024, 2048, 4096, 8192, 16384, 32768]
    )
    tokens = args.tokens or (8192 if cpu else 32768)
    shapes = [
        tuple(int(x) for x in s.split(":"))
        for s in (args.shapes or (["4:64"] if cpu else ["16:128", "32:64"]))
    ]

    ops, notes = load_ops(args.ops)
    meta = {
        "device": torch.cuda.get_device_name() if not cpu else platform.processor() or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "tokens_per_batch": tokens,
        "notes": notes,
    }
    for n in notes:
        print(n)

    checks, rows = {}, []
    for op in ops:
        forms = ["reference"] + [f for f in op.forms if not (cpu and f in op.cuda_only)]
        if args.forms:
            forms = [f for f in forms if f in args.forms]
        for impl in [f for f in forms if f != "reference"]:
            ok, msg = check_form(op, impl, device, dtype)
            checks[f"{op.name}/{impl}"] = {"ok": ok, "detail": msg}
            print(f"check {op.name:18s} {impl:8s} {'OK  ' if ok else 'FAIL'} {msg}")
            if not ok:
                forms.remove(impl)
        for H, D in shapes:
            for T in seq_lens:
                B = max(1, tokens // T)
                sdpa_f, sdpa_fb = time_sdpa(B, T, H, D, device, dtype, args.min_time)
                flash = time_flash(B, T, H, D, device, dtype, args.min_time)
                ref = None
                for impl in forms:
                    if impl == "reference" and T > args.ref_max_t:
                        continue
                    f, fb = time_form(op, impl, B, T, H, D, device, dtype, args.min_time)
                    if impl == "reference":
                        ref = (f, fb)
                    row = dict(op=op.name, form=impl, B=B, T=T, H=H, D=D, fwd_ms=f, fwd_bwd_ms=fb)
                    row["sdpa_fwd_ms"], row["sdpa_fwd_bwd_ms"] = sdpa_f, sdpa_fb
                    row["speedup_vs_sdpa_fwd"], row["speedup_vs_sdpa_fwd_bwd"] = sdpa_f / f, sdpa_fb / fb
                    if flash is not None:  # flash-attention, where installed (CUDA)
                        row["flash_fwd_ms"], row["flash_fwd_bwd_ms"] = flash
                        row["speedup_vs_flash_fwd_bwd"] = flash[1] / fb
                    row["speedup_vs_reference_fwd"] = ref[0] / f if ref else None
                    row["speedup_vs_reference_fwd_bwd"] = ref[1] / fb if ref else None
                    rows.append(row)
                    print_row(row, header=len(rows) == 1)

    out = {"meta": meta, "checks": checks, "results": rows}
    H, D = shapes[0]
    if args.window_compare:
        out["window_compare"] = window_compare(seq_lens, tokens, H, D, device, dtype, args.min_time)
    if args.decode:
        out["decode"] = decode_times(ops, seq_lens, H, D, device, dtype, args.min_time)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.out}")


def print_row(r: dict, header: bool) -> None:
    if header:
        print(
            f"{'op':18s} {'form':9s} {'B':>3s} {'T':>6s} {'H:D':>7s} {'fwd ms':>9s} {'f+b ms':>9s} "
            f"{'sdpa f':>9s} {'sdpa f+b':>9s} {'xSDPA f':>8s} {'xSDPA fb':>8s} {'xref f':>7s} {'xref fb':>7s}"
        )

    def x(v):
        return f"{v:.2f}" if v is not None else "-"

    print(
        f"{r['op']:18s} {r['form']:9s} {r['B']:3d} {r['T']:6d} {str(r['H']) + ':' + str(r['D']):>7s} "
        f"{r['fwd_ms']:9.2f} {r['fwd_bwd_ms']:9.2f} {r['sdpa_fwd_ms']:9.2f} {r['sdpa_fwd_bwd_ms']:9.2f} "
        f"{x(r['speedup_vs_sdpa_fwd']):>8s} {x(r['speedup_vs_sdpa_fwd_bwd']):>8s} "
        f"{x(r['speedup_vs_reference_fwd']):>7s} {x(r['speedup_vs_reference_fwd_bwd']):>7s}"
    )


if __name__ == "__main__":
    from linearize.host import keep_freed_memory

    keep_freed_memory()  # as the `linearize` command does
    main()
