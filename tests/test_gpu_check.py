"""benchmarks/gpu_check.sh without a GPU: its dry run, the wheel manifest against the pins, the GGUF's split
and join, the size limits and the targets, so the script cannot rot while no GPU is at hand."""

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
import carry  # noqa: E402
import check  # noqa: E402


def fake_wheel_name(name: str, version: str) -> str:
    return f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


def fake_carry(tmp: Path, pins: dict[str, str]) -> Path:
    """A carried folder like prepare_wheels.py writes, with stand-in wheels and a small stand-in GGUF."""
    wheels = tmp / ".gpu" / "wheels"
    wheels.mkdir(parents=True)
    for name, version in pins.items():
        with zipfile.ZipFile(wheels / fake_wheel_name(name, version), "w") as z:
            z.writestr(f"{name}/__init__.py", "")
    carry.write_manifest(wheels, pins)
    src = tmp / "src"
    src.mkdir()
    (src / carry.GGUF_NAME).write_bytes(bytes(range(256)) * 40)
    (src / "materialize.py").write_text("print('materialize')\n")
    carry.split_gguf(src / carry.GGUF_NAME, tmp / ".gpu", 4000)
    return tmp / ".gpu"


def dry_run(carry_dir: Path) -> subprocess.CompletedProcess:
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--carry", str(carry_dir)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    )


def test_dry_run_resolves_every_step(tmp_path):
    res = dry_run(fake_carry(tmp_path, carry.read_pins()))
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "dry run: OK" in res.stdout
    for step in ("install", "kernel_tests", "kernel_bench", "convert", "distributed", "generate"):
        assert f"] {step} (timeout" in res.stdout
    assert "benchmarks/kernels.py --device cuda" in res.stdout
    assert (
        "accelerate.commands.launch --num_processes 1 --config_file linearize/launch/zero3.yaml" in res.stdout
    )
    assert f"{len(carry.read_pins())} match pins.txt and manifest.json" in res.stdout


def test_dry_run_without_prepared_carry_says_what_to_run(tmp_path):
    res = dry_run(tmp_path / "nothing")
    assert res.returncode == 1
    assert "run python benchmarks/gpu/prepare_wheels.py" in res.stdout


def test_manifest_problems_are_named(tmp_path):
    pins = {"alpha": "1.0", "beta-pkg": "2.0", "gamma": "3.0"}
    wheels = fake_carry(tmp_path, pins) / "wheels"
    assert carry.check_wheels(wheels, pins) == []
    (wheels / fake_wheel_name("alpha", "1.0")).rename(wheels / fake_wheel_name("alpha", "1.1"))
    (wheels / "gamma-3.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"x")
    (wheels / fake_wheel_name("gamma", "3.0")).unlink()
    (wheels / fake_wheel_name("beta_pkg", "2.0")).write_bytes(b"changed")
    problems = " | ".join(carry.check_wheels(wheels, pins))
    assert "version 1.1, pins.txt says 1.0" in problems
    assert "do not install on CPython 3.12" in problems
    assert "beta_pkg-2.0-py3-none-any.whl: differs from manifest.json" in problems
    assert "alpha-1.1-py3-none-any.whl: not in manifest.json" in problems


def test_pins_refuse_torch_and_duplicates(tmp_path):
    f = tmp_path / "pins.txt"
    f.write_text("torch==2.11.0\n")
    with pytest.raises(carry.CarryError, match="must not travel"):
        carry.read_pins(f)
    f.write_text("foo_bar==1  # a\nFoo.Bar==2\n")
    with pytest.raises(carry.CarryError, match="pinned twice"):
        carry.read_pins(f)
    assert carry.read_pins() and all("==" not in v for v in carry.read_pins().values())


def test_wheel_tags_for_the_gpu_machine():
    ok = [
        "regex-2026.12.2-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        "multiprocess-0.70.19-py312-none-any.whl",
        "x-1-cp312-abi3-manylinux_2_28_x86_64.whl",
    ]
    bad = ["x-1-cp311-cp311-manylinux_2_17_x86_64.whl", "x-1-cp312-cp312-macosx_11_0_arm64.whl"]
    assert all(carry.Wheel.parse(n).installs_on_target() for n in ok)
    assert not any(carry.Wheel.parse(n).installs_on_target() for n in bad)


def test_gguf_split_stage_join_verify(tmp_path):
    """The two-call plan's CPU side: each call stages its part outside the repo, the second joins them."""
    c = fake_carry(tmp_path, {"alpha": "1.0"})
    meta = json.loads((c / "part1" / "gguf.json").read_text())
    assert [p["size"] for p in meta["parts"]] == [4000, 256 * 40 - 4000]
    stage = tmp_path / "stage"
    carry.stage_part(c / "part1", stage)
    with pytest.raises(carry.CarryError, match="part2 not staged"):
        carry.join_gguf(stage)
    carry.stage_part(c / "part2", stage)
    joined = carry.join_gguf(stage)
    assert joined.read_bytes() == (tmp_path / "src" / carry.GGUF_NAME).read_bytes()
    assert (stage / "materialize.py").exists() and not list(stage.glob("*.part*"))
    assert carry.join_gguf(stage) == joined  # idempotent: the second run finds it joined
    part = c / "part2" / f"{carry.GGUF_NAME}.part2"
    part.write_bytes(b"\0" + part.read_bytes()[1:])
    with pytest.raises(carry.CarryError, match="sha256 differs"):
        carry.stage_part(c / "part2", tmp_path / "stage2")


def test_sizes_over_the_limit_are_refused():
    mib = carry.MIB
    assert carry.check_sizes({"tree": 4 * mib, "call1": 63 * mib, "call2": 62 * mib}) == []
    problems = carry.check_sizes({"tree": 4 * mib, "call1": 63 * mib, "call2": 65 * mib})
    assert problems == ["call2 would send 65.0 MiB, over the 64 MiB a call may carry"]


def test_targets_pass_and_miss():
    bench = {
        "results": [
            dict(op="linear_attn", form="fla", T=16384, speedup_vs_sdpa_fwd_bwd=6.0),
            dict(op="linear_attn", form="fla", T=32768, speedup_vs_sdpa_fwd_bwd=7.0),
            dict(op="linear_attn", form="chunked", T=32768, speedup_vs_sdpa_fwd_bwd=0.1),
        ],
        "window_compare": [
            dict(T=16384, triton_fwd_bwd_ms=10.0, pair_fwd_bwd_ms=13.0, chunk_linear_fwd_bwd_ms=7.0)
        ],
        "decode": [
            dict(op="gated_delta", T=1024, step_ms=0.1),
            dict(op="gated_delta", T=32768, step_ms=0.11),
        ],
    }
    got = {t["target"]: (round(t["value"], 2), t["ok"]) for t in check.targets(bench)}
    assert got == {
        "linear_attn/fla f+b vs SDPA at T=16384": (6.0, True),
        "linear_attn/fla f+b vs SDPA at T=32768": (7.0, False),
        "window_linear triton vs unfused pair at T=16384 (x faster)": (1.3, True),
        "window_linear triton over chunk_linear_attn at T=16384 (x slower)": (1.43, False),
        "gated_delta decode ms/token at 32768 over 1024": (1.1, True),
    }


def test_windowed_sdpa_is_the_band_of_causal_attention():
    spec = importlib.util.spec_from_file_location("kernels_benchmark", REPO / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    B, T, H, D, W = 2, 37, 3, 8, 8
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    band = (j <= i) & (j > i - W)
    want = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=band).transpose(
        1, 2
    )
    assert torch.allclose(bench.windowed_sdpa(q, k, v, W), want, atol=1e-12)
