"""Distillation throughput next to the teacher's own forward and the machine's matmul bound, in one run.

For a teacher and a recipe: the machine's bf16 (or fp32) matrix-product rate (GFLOP/s on a hidden-wide
product), the teacher's forward tokens/s (no grad, the recipe's batch and length, weights in the compute
dtype), and the tokens/s of stage attention and stage logits as `linearize convert` trains them (the
median step of `metrics.jsonl` after the first `--skip` steps, the same batch and length). Each rate is
printed as a fraction of the bound `matmul rate / teacher FLOPs per token` and as a ratio to the teacher's
forward. Writes the rows as JSON.

    python benchmarks/throughput.py --teacher ~/.cache/linearize-assets/smollm2-135m-instruct \\
        --recipe smollm2-135m-to-linear --out benchmarks/results/throughput-smollm2-cpu.json
    python benchmarks/throughput.py --teacher bundled:stories260K --recipe tiny --steps 6   # smoke

Everything else on the machine slows every row alike only if it runs the whole time: compare ratios within
one run, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from linearize.config import load_recipe, teacher_text_tokens
from linearize.convert.teachers import load_teacher
from linearize.host import keep_freed_memory
from linearize.pipeline import convert

STAGES = ("attention", "logits")
TEXT_DIR = Path(__file__).resolve().parent / "teacher-text"


def matmul_rate(
    dtype: torch.dtype, hidden: int, intermediate: int, tokens: int = 4096, seconds: float = 2.0
) -> float:
    """GFLOP/s of [tokens, hidden] @ [hidden, intermediate] products in `dtype` (median of repeats)."""
    a = torch.randn(tokens, hidden, dtype=dtype)
    b = torch.randn(hidden, intermediate, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * tokens * hidden * intermediate / statistics.median(times) / 1e9


def forward_flops_per_token(config, seq_len: int) -> float:
    """Matrix-product FLOPs of one token of a decoder forward with logits: every linear layer (2 FLOPs per
    weight) and causal attention's scores and weighted sum (2 * 2 * heads * head_dim * seq_len / 2)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (config.num_key_value_heads or heads) * head_dim
    intermediate = config.intermediate_size
    per_layer = (
        hidden * heads * head_dim + 2 * hidden * kv + heads * head_dim * hidden + 3 * hidden * intermediate
    )
    attention = 2 * heads * head_dim * seq_len  # causal: half of the 2 x (QK^T and PV) products
    return 2 * (layers * per_layer + hidden * config.vocab_size) + layers * attention


@torch.no_grad()
def teacher_forward_rate(model, batch: int, seq_len: int, seconds: float) -> float:
    """tokens/s of the full forward (logits of every position) on random token ids."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    model(input_ids=ids, use_cache=False)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - t0)
    return batch * seq_len / statistics.median(times)


def stage_rates(recipe_name: str, overrides: dict[str, str], steps: int, skip: int, folder: Path) -> dict:
    """Median tokens/s of the steps after the first `skip` of each stage, as `linearize convert` trains."""
    run = {
        **overrides,
        "output_dir": str(folder),
        "stages.attention.steps": str(steps),
        "stages.logits.steps": str(steps),
        "train.log_every": "1",
        "train.checkpoint_every": str(10 * steps),
        "eval.tasks": "[]",
    }
    recipe = load_recipe(recipe_name, run)
    convert(recipe)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rates = {}
    for stage in STAGES:
        measured = [r["tok_s"] for r in records if r["stage"] == stage][skip:]
        if measured:
            rates[stage] = {"tok_s": statistics.median(measured), "steps": len(measured)}
    return {"rates": rates, "recipe": recipe.to_dict()}


def main(argv: list[str] | None = None) -> None:
    malloc = (
        keep_freed_memory()
    )  # as the `linearize` command does (LINEARIZE_SYSTEM_MALLOC=1: glibc's defaults)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher folder (or bundled:stories260K)")
    p.add_argument("--recipe", default="smollm2-135m-to-linear")
    p.add_argument("--steps", type=int, default=8, help="steps per stage (the first --skip are not timed)")
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0, help="time spent measuring the teacher forward")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="teacher weights")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)

    overrides = {"teacher.path": args.teacher, "teacher.dtype": args.dtype}
    overrides["train.precision"] = "bf16" if args.dtype == "bfloat16" else "fp32"
    if any(teacher_text_tokens(s) for s in load_recipe(args.recipe).data.train):
        # the committed teacher-written text (benchmarks/README.md): nothing to generate before measuring
        overrides |= {"data.train": "[teacher:300k]", "data.sampling.cache_dir": str(TEXT_DIR)}
    for pair in args.set:
        key, _, value = pair.partition("=")
        overrides[key] = value
    recipe = load_recipe(args.recipe, overrides)
    batch, seq_len = recipe.stages.attention.batch_size, recipe.data.seq_len
    if recipe.stages.logits.batch_size != batch:
        print(f"note: stage logits runs batch {recipe.stages.logits.batch_size}, stage attention {batch}")
    dtype = getattr(torch, args.dtype)
    teacher, _ = load_teacher(recipe.teacher.path, args.dtype)
    config = teacher.config
    flops = forward_flops_per_token(config, seq_len)
    rate = matmul_rate(dtype, config.hidden_size, config.intermediate_size)
    bound = rate * 1e9 / flops
    forward = teacher_forward_rate(teacher, batch, seq_len, args.seconds)
    del teacher
    with tempfile.TemporaryDirectory() as tmp:
        stages = stage_rates(args.recipe, overrides, args.steps, args.skip, Path(tmp) / "run")

    rows = [{"what": "teacher forward (no grad)", "tok_s": forward}]
    rows += [{"what": f"stage {s}", **stages["rates"][s]} for s in STAGES if s in stages["rates"]]
    for row in rows:
        row["of_bound"] = row["tok_s"] / bound
        row["x_teacher_forward"] = row["tok_s"] / forward
    print(
        f"{args.recipe} on {recipe.teacher.path}: batch {batch} x {seq_len} tokens, {args.dtype} weights; "
        f"{rate:,.0f} GFLOP/s {args.dtype} matmul, {flops / 1e9:.3f} GFLOP per token -> bound {bound:,.0f} tok/s"
    )
    print(f"{'':<28}{'tokens/s':>10}{'of bound':>10}{'x teacher fwd':>15}")
    for row in rows:
        print(
            f"{row['what']:<28}{row['tok_s']:>10,.0f}{row['of_bound']:>10.2f}{row['x_teacher_forward']:>15.2f}"
        )
    if args.out:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout
        meta = {
            "recipe": args.recipe,
            "teacher": recipe.teacher.path,
            "batch": batch,
            "seq_len": seq_len,
            "dtype": args.dtype,
            "matmul_gflops": rate,
            "flops_per_token": flops,
            "bound_tok_s": bound,
            "threads": torch.get_num_threads(),
            "malloc_keeps_freed_memory": malloc,
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "commit": commit.strip(),
            "command": " ".join(sys.argv),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "recipe": stages["recipe"]}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
