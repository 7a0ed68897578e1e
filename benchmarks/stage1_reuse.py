"""Does reusing a captured teacher batch for several stage-1 steps buy alignment quality per second?

Stage attention's step is one teacher forward (the capture) plus every converted mixer's forward and
backward on the captured activations; the teacher forward is about half of it on a CPU. Reusing each
captured batch for `r` optimizer steps trades fresh data for speed. For each `r` in `--reuse`, a fresh
student (same seed, same recipe) trains for the same wall-clock budget with the recipe's optimizer and
learning rate (after a short warmup, held constant, so that runs of different lengths share one schedule), then
its stage-1 loss (sum over layers of MSE to the teacher's attention output) is measured on held-out
blocks. A table and JSON.

    python benchmarks/stage1_reuse.py --teacher ~/.cache/linearize-assets/smollm2-135m-instruct \\
        --seconds 150 --reuse 1 2 4 --out benchmarks/results/stage1-reuse-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from linearize import teacher_text
from linearize.config import load_recipe, teacher_text_tokens
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import load_teacher
from linearize.data import build_splits
from linearize.distill.stages import attention_stage
from linearize.distill.teacher import LiveTeacher

TEXT_DIR = Path(__file__).resolve().parent / "teacher-text"
BF16 = [True]  # --dtype float32 turns bf16 autocast off (a CPU without bf16 instructions emulates it)


@torch.no_grad()
def heldout_loss(aligner, teacher: LiveTeacher, blocks: torch.Tensor, batch: int) -> float:
    total = 0.0
    starts = range(0, len(blocks), batch)
    for start in starts:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16[0]):
            total += aligner(teacher.capture(blocks[start : start + batch], aligner.layers)).item()
    return total / len(starts)


def run(
    recipe, teacher, train: torch.Tensor, heldout: torch.Tensor, reuse: int, seconds: float, warmup: int
) -> dict:
    cfg = recipe.stages.attention
    torch.manual_seed(recipe.seed)
    student = swap(teacher, plan_for(recipe.student, teacher.config)).requires_grad_(False)
    live = LiveTeacher(teacher)
    aligner, _ = attention_stage(student, live)
    params = [p for p in aligner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # a short warmup, then the recipe's learning rate held: the same schedule whatever the number of steps
    # (the recipe's own warmup is sized for its thousands of steps, longer than a run here)
    warmup = max(warmup, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    steps, captures, began = 0, 0, time.perf_counter()
    captured = None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed))
    while time.perf_counter() - began < seconds:
        if steps % reuse == 0:
            first = (captures * cfg.batch_size) % len(train)
            idx = order[first : first + cfg.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16[0]):
                captured = live.capture(train[idx], aligner.layers)
            captures += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16[0]):
            loss = aligner(captured)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    elapsed = time.perf_counter() - began
    result = {
        "reuse": reuse,
        "steps": steps,
        "captured_batches": captures,
        "seconds": elapsed,
        "heldout_loss": heldout_loss(aligner, live, heldout, cfg.batch_size),
    }
    print(
        f"reuse {reuse}: {steps} steps on {captures} captured batches in {elapsed:.0f}s, "
        f"held-out stage-1 loss {result['heldout_loss']:.4f}",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--recipe", default="smollm2-135m-to-linear")
    p.add_argument("--seconds", type=float, default=150.0, help="wall-clock budget of each run")
    p.add_argument("--reuse", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--heldout-blocks", type=int, default=16)
    p.add_argument("--warmup", type=int, default=10, help="optimizer steps of linear warmup")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights and compute")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    BF16[0] = args.dtype == "bfloat16"
    # the committed teacher-written text (benchmarks/README.md), when the recipe trains on teacher text
    data = {"data.train": "[teacher:300k]", "data.sampling.cache_dir": str(TEXT_DIR)}
    recipe = load_recipe(args.recipe, {"teacher.path": args.teacher, "teacher.dtype": args.dtype})
    if any(teacher_text_tokens(s) for s in recipe.data.train):
        recipe = load_recipe(args.recipe, {"teacher.path": args.teacher, "teacher.dtype": args.dtype, **data})
    teacher, tokenizer = load_teacher(recipe.teacher.path, args.dtype)
    text = teacher_text.resolve(recipe.data, recipe.teacher.path, args.dtype, teacher, tokenizer)
    blocks = build_splits(text, tokenizer).train
    heldout, train = blocks[-args.heldout_blocks :], blocks[: -args.heldout_blocks]
    print(
        f"{len(train)} training blocks, {len(heldout)} held-out blocks of {blocks.shape[1]} tokens",
        flush=True,
    )
    rows = [run(recipe, teacher, train, heldout, r, args.seconds, args.warmup) for r in args.reuse]
    print(f"{'reuse':>6}{'steps':>7}{'captures':>10}{'held-out loss':>15}")
    for r in rows:
        print(f"{r['reuse']:>6}{r['steps']:>7}{r['captured_batches']:>10}{r['heldout_loss']:>15.4f}")
    if args.out:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout
        meta = {
            "recipe": args.recipe,
            "teacher": args.teacher,
            "seconds": args.seconds,
            "batch_size": recipe.stages.attention.batch_size,
            "lr": recipe.stages.attention.lr,
            "warmup": args.warmup,
            "dtype": args.dtype,
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "commit": commit.strip(),
            "command": " ".join(sys.argv),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    from linearize.host import keep_freed_memory

    keep_freed_memory()  # as the `linearize` command does
    main()
