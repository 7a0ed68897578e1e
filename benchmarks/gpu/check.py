"""The GPU check's steps, each time-boxed, with their results in one folder (results.json, summary.md).

Run through benchmarks/gpu_check.sh. Standard library only: it installs everything else itself.

    python3 benchmarks/gpu/check.py --out $OUT                 # install, then every step
    python3 benchmarks/gpu/check.py --stage-part .gpu/part1    # first call: stage half the GGUF, nothing else
    python3 benchmarks/gpu/check.py --dry-run                  # CPU: resolve every command, check the carry
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import carry  # noqa: E402  (a sibling script, not a package)

REPO = carry.REPO
BUDGET_S = 420  # the steps' time boxes together: well under 8 minutes of the machine
SEQ_LENS = [1024, 2048, 4096, 8192, 16384, 32768]
RECIPES = ["smollm2-135m-to-linear", "smollm2-135m-lolcats"]
CONVERT_BUDGET = "2M"
TINY = ["recipe=tiny", "stages.attention.steps=4"]
# (op, fast form) pairs whose forward+backward must beat SDPA by these factors at 16k and 32k tokens
SPEEDUP_TARGETS = {16384: 5.0, 32768: 8.0}
WINDOW_VS_PAIR = 1.2  # window_linear's Triton kernel at least this much faster than the unfused pair
WINDOW_VS_CHUNK = 1.25  # and at most this much slower than fla's chunk_linear_attn alone
DECODE_FLAT = 1.25  # decode time per token at 32k over that at 1k, at most


@dataclass
class Step:
    """One time-boxed step: its commands run in order; it stops at the first that fails."""

    name: str
    what: str
    timeout: int
    commands: list[list[str]]
    needs: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def plan(py: str, out: Path, stage: Path, carry_dir: Path) -> list[Step]:
    """Every step's commands, resolved. `stage` (outside the repo) holds the installs, the GGUF and run folders."""
    site, work, teacher = stage / "site", stage / "work", stage / "smollm2"
    wheels = sorted(str(p) for p in (carry_dir / "wheels").glob("*.whl")) or [
        str(carry_dir / "wheels" / "*.whl")
    ]
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    pip.append("--upgrade")  # a rerun on the same warm machine replaces the first install
    versions = (
        "import importlib.metadata as m, torch; print('cuda', torch.cuda.is_available(), torch.__version__); "
        "[print(p, m.version(p)) for p in ('transformers','huggingface_hub','datasets','flash-linear-attention',"
        "'peft','accelerate','deepspeed','triton','linearize')]; import linearize, fla, datasets, deepspeed"
    )
    kernels = [py, "benchmarks/kernels.py", "--device", "cuda", "--out", str(out / "kernels.json")]
    kernels += ["--forms", "fla", "triton", "--seq-lens", *map(str, SEQ_LENS), "--shapes", "16:128"]
    kernels += ["--min-time", "0.1", "--window-compare", "--decode"]
    convert = [
        [py, str(stage / "gguf" / "materialize.py"), str(teacher)],
        *(
            [py, "benchmarks/ablate.py", "--teacher", str(teacher), "--recipe", r, "--budget", CONVERT_BUDGET]
            + ["--variant", "gpu", "--out", str(work / "convert"), "--results", str(work / "results")]
            for r in RECIPES
        ),
    ]
    launch = [py, "-m", "accelerate.commands.launch", "--num_processes", "1", "--config_file"]
    distributed = [
        [*launch, f"linearize/launch/{s}.yaml", "-m", "linearize", "distill", f"stage={st}", *TINY]
        + [f"output_dir={work / s}"]
        for s in ("fsdp2", "zero3")
        for st in ("attention",)
    ]
    export = work / "convert" / f"{RECIPES[0]}@{CONVERT_BUDGET}" / "gpu" / "final"
    return [
        Step("install", "the pinned wheels and linearize into a folder on PYTHONPATH", 45,
             [[*pip, "--target", str(site), *wheels],
              [*pip, "--no-build-isolation", "--target", str(site), "."],
              [py, "-c", versions]],
             needs=[carry_dir / "wheels" / "manifest.json"]),
        Step("kernel_tests", "every fla / Triton form vs the reference, bf16 and fp16, real sizes", 90,
             [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_cuda_forms.py",
               "--junitxml", str(out / "kernel-tests.xml")]],
             needs=[REPO / "tests/kernels/test_cuda_forms.py"], env={"LINEARIZE_TEST_DEVICE": "cuda"}),
        Step("kernel_bench", "every op vs SDPA at 1k-32k, window_linear vs the unfused pair, decode", 105,
             [kernels], needs=[REPO / "benchmarks/kernels.py"]),
        Step("convert", f"SmolLM2-135M, {' and '.join(RECIPES)}, {CONVERT_BUDGET} tokens each", 110,
             convert, needs=[REPO / "benchmarks/ablate.py", *(REPO / f"linearize/recipes/{r}.yaml" for r in RECIPES)]),
        Step("distributed", "linearize distill, FSDP2 and ZeRO-3, one GPU, tiny recipe, 4 steps of stage attention", 50,
             distributed, needs=[REPO / "linearize/launch/fsdp2.yaml", REPO / "linearize/launch/zero3.yaml"]),
        Step("generate", "greedy generate() of the export with its cache vs a full forward", 20,
             [[py, "benchmarks/gpu/generate_check.py", "--model", str(export), "--out",
               str(work / "generate.json")]],
             needs=[REPO / "benchmarks/gpu/generate_check.py"]),
    ]  # fmt: skip


def shown(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def flags_known(cmd: list[str]) -> list[str]:
    """Flags a repo script is given that its source does not mention (a renamed option would fail there)."""
    script = next((REPO / c for c in cmd[1:3] if c.endswith(".py") and (REPO / c).exists()), None)
    if script is None:
        return []
    text = script.read_text()
    return [f"{script.name}: unknown flag {c}" for c in cmd if c.startswith("--") and f'"{c}"' not in text]


def dry_run(steps: list[Step], carry_dir: Path, stage: Path) -> int:
    """Print the plan and every problem that would stop it on the GPU machine; 0 when there is none."""
    problems = []
    pins = carry.read_pins()
    wheel_problems = carry.check_wheels(carry_dir / "wheels", pins)
    problems += wheel_problems
    print(f"pins: {len(pins)} ({', '.join(f'{k}=={v}' for k, v in pins.items())})")
    if not wheel_problems:
        n = len(list((carry_dir / "wheels").glob("*.whl")))
        print(
            f"wheels: {n} match pins.txt and manifest.json, "
            f"{carry.folder_size(carry_dir / 'wheels') / carry.MIB:.1f} MiB"
        )
    gguf_json = carry_dir / "part1" / "gguf.json"
    if gguf_json.exists():
        meta = json.loads(gguf_json.read_text())
        for i, part in enumerate(meta["parts"], 1):
            f = carry_dir / f"part{i}" / part["file"]
            if not f.exists() or f.stat().st_size != part["size"]:
                problems.append(f"{f}: missing or not {part['size']} bytes; rerun prepare_wheels.py")
        if not (carry_dir / "part1" / "materialize.py").exists():
            problems.append(f"{carry_dir / 'part1' / 'materialize.py'} missing; rerun prepare_wheels.py")
        print(
            f"gguf: {meta['name']} {meta['size'] / carry.MIB:.1f} MiB in 2 parts, sha256 {meta['sha256'][:16]}..."
        )
    else:
        problems.append(f"{gguf_json} missing: run python benchmarks/gpu/prepare_wheels.py (splits the GGUF)")
    sizes = carry.call_sizes(carry_dir)
    problems += carry.check_sizes(sizes)
    print(
        f"sizes: tree {sizes['tree'] / carry.MIB:.1f} MiB; call 1 (tree + part1) {sizes['call1'] / carry.MIB:.1f} MiB; "
        f"call 2 (tree + wheels + part2) {sizes['call2'] / carry.MIB:.1f} MiB; "
        f"limit {carry.CALL_LIMIT // carry.MIB} MiB"
    )
    total = sum(s.timeout for s in steps)
    if total > BUDGET_S:
        problems.append(f"the steps' time boxes add to {total} s, over the {BUDGET_S} s budget")
    print(f"time boxes: {total} s of {BUDGET_S} s ({', '.join(f'{s.name} {s.timeout}' for s in steps)})")
    for i, s in enumerate(steps):
        print(f"\n[{i}] {s.name} (timeout {s.timeout} s): {s.what}")
        for k, v in s.env.items():
            print(f"    env {k}={v}")
        for cmd in s.commands:
            print(f"    $ {shown(cmd)}")
            problems += flags_known(cmd)
        for need in s.needs:
            if not need.exists():
                problems.append(f"step {s.name}: {need} missing")
    print(f"\nstage folder on the GPU machine: {stage}")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("dry run: OK" if not problems else f"dry run: {len(problems)} problem(s)")
    return 0 if not problems else 1


def run_step(step: Step, env: dict[str, str], log) -> dict:
    """Run the step's commands under one time box; the record: status, seconds, each command's exit code."""
    start, rcs = time.monotonic(), []
    status = "ok"
    for cmd in step.commands:
        left = step.timeout - (time.monotonic() - start)
        if left <= 1:
            status = "timeout"
            break
        log.write(f"\n===== {step.name}: {shown(cmd)}\n")
        log.flush()
        try:
            res = subprocess.run(
                cmd, cwd=REPO, env={**env, **step.env}, stdout=log, stderr=subprocess.STDOUT, timeout=left
            )
        except subprocess.TimeoutExpired:
            rcs.append(None)
            status = "timeout"
            break
        rcs.append(res.returncode)
        if res.returncode != 0:
            status = "failed"
            break
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "returncodes": rcs}


def kernel_test_results(xml: Path) -> dict:
    if not xml.exists():
        return {}
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for c in suite.iter("testcase"):
        outcome = "failed" if c.find("failure") is not None or c.find("error") is not None else "passed"
        outcome = "skipped" if c.find("skipped") is not None else outcome
        props = {p.get("name"): p.get("value") for p in c.iter("property")}
        cases.append({"name": c.get("name"), "outcome": outcome, **props})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    return {"counts": counts, "cases": cases}


def targets(bench: dict) -> list[dict]:
    """Each target as {target, value, limit, ok}, from benchmarks/kernels.py's JSON."""
    rows = []
    for r in bench.get("results", []):
        if r["form"] in ("fla", "triton") and r["T"] in SPEEDUP_TARGETS:
            lim = SPEEDUP_TARGETS[r["T"]]
            v = r["speedup_vs_sdpa_fwd_bwd"]
            rows.append(dict(target=f"{r['op']}/{r['form']} f+b vs SDPA at T={r['T']}", value=v, limit=f">= {lim}",
                             ok=v >= lim))  # fmt: skip
    for r in bench.get("window_compare", []):
        if r["T"] in SPEEDUP_TARGETS:
            v1, v2 = (
                r["pair_fwd_bwd_ms"] / r["triton_fwd_bwd_ms"],
                r["triton_fwd_bwd_ms"] / r["chunk_linear_fwd_bwd_ms"],
            )
            rows.append(
                dict(
                    target=f"window_linear triton vs unfused pair at T={r['T']} (x faster)",
                    value=v1,
                    limit=f">= {WINDOW_VS_PAIR}",
                    ok=v1 >= WINDOW_VS_PAIR,
                )
            )
            rows.append(dict(target=f"window_linear triton over chunk_linear_attn at T={r['T']} (x slower)",
                             value=v2, limit=f"<= {WINDOW_VS_CHUNK}", ok=v2 <= WINDOW_VS_CHUNK))  # fmt: skip
    by_op: dict[str, dict[int, float]] = {}
    for r in bench.get("decode", []):
        by_op.setdefault(r["op"], {})[r["T"]] = r["step_ms"]
    for op, t in by_op.items():
        lo, hi = min(t), max(t)
        v = t[hi] / t[lo]
        rows.append(dict(target=f"{op} decode ms/token at {hi} over {lo}", value=v, limit=f"<= {DECODE_FLAT}",
                         ok=v <= DECODE_FLAT))  # fmt: skip
    return rows


def convert_results(work: Path) -> list[dict]:
    """Per recipe: held-out perplexities (eval.json) and each stage's median tokens/s and peak memory."""
    rows = []
    for r in RECIPES:
        run = work / "convert" / f"{r}@{CONVERT_BUDGET}" / "gpu"
        row = {"recipe": r, "run": str(run)}
        if (run / "eval.json").exists():
            row["eval"] = json.loads((run / "eval.json").read_text())
        stages: dict[str, list[dict]] = {}
        if (run / "metrics.jsonl").exists():
            for line in (run / "metrics.jsonl").read_text().splitlines():
                m = json.loads(line)
                stages.setdefault(str(m.get("stage")), []).append(m)
        for name, ms in stages.items():
            tps = [m[k] for m in ms for k in m if "tokens_per_s" in k or k == "tok_s"]
            peaks = [m[k] for m in ms for k in m if "peak" in k and isinstance(m[k], int | float)]
            row[f"{name}_tokens_per_s"] = statistics.median(tps) if tps else None
            row[f"{name}_peak_memory"] = max(peaks) if peaks else None
        rows.append(row)
    return rows


def fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summary(res: dict) -> str:
    lines = [f"# GPU check — {res['device']}", "", f"{res['date']}, commit {res['commit']}", ""]
    lines += ["| step | status | s | what |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']} | {v['what']} |" for k, v in res["steps"].items()]
    kt = res.get("kernel_tests", {})
    if kt:
        lines += ["", f"kernel tests: {kt['counts']}"]
        lines += [f"- FAILED {c['name']}" for c in kt["cases"] if c["outcome"] == "failed"]
    if res.get("targets"):
        lines += ["", "| target | value | limit | |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']:.2f} | {t['limit']} | {'pass' if t['ok'] else 'MISS'} |"
                  for t in res["targets"]]  # fmt: skip
    for row in res.get("convert", []):
        lines += [
            "",
            f"{row['recipe']}: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in row.items() if k not in ("recipe", "run", "eval")),
        ]
        if "eval" in row:
            lines += ["```", json.dumps(row["eval"])[:1500], "```"]
    if res.get("generate"):
        lines += ["", f"generate: {json.dumps(res['generate'])}"]
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return res.stdout.strip() or "unknown (no git there)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "out" / "gpu-check"))
    p.add_argument("--carry", type=Path, default=carry.CARRY, help="the carried folder (default .gpu/)")
    p.add_argument(
        "--stage", type=Path, default=Path("/tmp/linearize-gpu"), help="installs, GGUF, run folders"
    )
    p.add_argument(
        "--stage-part", type=Path, help="stage this carried GGUF part folder and exit (first call)"
    )
    p.add_argument("--steps", nargs="*", help="run only these steps (install always runs)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    py = sys.executable
    steps = plan(py, args.out.resolve(), args.stage, args.carry.resolve())
    if args.dry_run:
        raise SystemExit(dry_run(steps, args.carry, args.stage))
    try:
        if args.stage_part:
            print("staged: " + ", ".join(carry.stage_part(args.stage_part, args.stage / "gguf")))
            return
        for part in ("part1", "part2"):  # whichever this call carried
            if (args.carry / part / "gguf.json").exists():
                carry.stage_part(args.carry / part, args.stage / "gguf")
        gguf_note = f"joined {carry.join_gguf(args.stage / 'gguf')}"
    except (carry.CarryError, FileNotFoundError) as e:
        gguf_note = f"no SmolLM2 teacher: {e}"
    print(gguf_note, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(args.stage / "site"), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(args.stage / "site" / "bin"), env.get("PATH", "")])
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(), "gguf": gguf_note, "steps": {}}
    res["device"] = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
        or "no nvidia-smi"
    )
    with open(args.out / "logs.txt", "w") as log:
        for step in steps:
            if args.steps and step.name not in args.steps and step.name != "install":
                continue
            if step.name in ("convert", "generate") and gguf_note.startswith("no "):
                res["steps"][step.name] = {"status": "skipped", "seconds": 0, "what": gguf_note}
                continue
            print(f"--- {step.name} (<= {step.timeout} s)", flush=True)
            res["steps"][step.name] = {**run_step(step, env, log), "what": step.what}
            print(f"    {res['steps'][step.name]}", flush=True)
            (args.out / "results.json").write_text(json.dumps(res, indent=1))
    res["kernel_tests"] = kernel_test_results(args.out / "kernel-tests.xml")
    bench = args.out / "kernels.json"
    res["targets"] = targets(json.loads(bench.read_text())) if bench.exists() else []
    res["convert"] = convert_results(args.stage / "work")
    gen = args.stage / "work" / "generate.json"
    res["generate"] = json.loads(gen.read_text()) if gen.exists() else None
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    text = summary(res)
    (args.out / "summary.md").write_text(text)
    print(re.sub(r"```.*?```\n", "", text, flags=re.S))


if __name__ == "__main__":
    main()
