"""Recipe ablations at equal distillation tokens: one recipe, one budget, several variants of its settings.

Each variant is a name and recipe overrides (`NAME` alone is the recipe as shipped):

    python benchmarks/ablate.py --teacher ~/.cache/linearize-assets/smollm2-135m-instruct \\
        --recipe smollm2-135m-to-linear --budget 150k --train teacher:300k --out /work/abl --git-commit \\
        --variant shipped --variant "s1-batch2:stages.attention.batch_size=2"

The budget is split between the stages as the shipped recipe splits its own tokens (as
`benchmarks/quality.py` splits it), or as a variant's `split=<stage-1 share>` says; each stage's steps follow
from the variant's tokens per step, so a variant that changes a batch size keeps the tokens and changes the
number of steps. Each variant
is one `linearize convert`; its held-out perplexities (the run's own `eval.json`: the teacher, the student
after each stage, on the recipe's held-out text) are written as
`<results>/ablations/<recipe>@<budget>/<variant>.json` as soon as it finishes (committed with
`--git-commit`), and a variant whose JSON exists is skipped: the list grows over sessions. `ablations.md`
beside them is rebuilt from every JSON of the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import (  # noqa: E402  (a sibling script, not a package)
    REPO,
    budget_label,
    commit_result,
    data_overrides,
    execute,
    machine,
    parse_budget,
    parse_sets,
    scaled_stages,
    shown,
)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`NAME` or `NAME:KEY=VALUE;KEY=VALUE` -> (name, overrides)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or "/" in name:
        raise SystemExit(f"--variant {text!r}: give NAME or NAME:KEY=VALUE;KEY=VALUE (a name without '/')")
    pairs = [p.strip() for p in rest.split(";") if p.strip()]
    return name, parse_sets(pairs)


def variant_overrides(args, overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, int]]:
    """All overrides of one variant's convert run (its own, then the budget's steps) and its stage tokens.

    The budget is split between the stages as the shipped recipe splits its own tokens, or as the variant's
    `split=<stage-1 share>` says; each stage's steps then follow from the variant's tokens per step."""
    from linearize.config import load_recipe

    overrides = dict(overrides)
    split = overrides.pop("split", None)
    common = {
        **data_overrides(args.train),
        "data.sampling.cache_dir": str(args.text_dir),
        **args.sets,
        "teacher.path": args.teacher,
    }
    shipped = load_recipe(args.recipe, common)
    recipe = load_recipe(args.recipe, {**common, **overrides})
    shares = None
    if split is not None:
        share = float(split)
        if not 0 <= share <= 1:
            raise SystemExit(f"split={split}: give stage 1's share of the tokens, between 0 and 1")
        shares = {"attention": share, "logits": 1 - share}
    stages, tokens = scaled_stages(recipe, args.budget, shares, reference=shipped)
    common.pop("teacher.path")
    return {**common, **overrides, **stages}, tokens


def write_result(
    args, name: str, own: dict, overrides: dict, tokens: dict, run_dir: Path, seconds: float, command: str
) -> Path:
    """One variant's result JSON (committed with --git-commit)."""
    evals = json.loads((run_dir / "eval.json").read_text())
    teacher = evals["teacher"]["ppl"]
    result = {
        "recipe": args.recipe,
        "budget": args.budget,
        "variant": name,
        "variant_overrides": own,
        "overrides": overrides,
        "tokens": {**tokens, "total": sum(tokens.values())},
        "heldout_ppl": {k: v["ppl"] for k, v in evals.items()},
        "x_teacher": {k: v["ppl"] / teacher for k, v in evals.items()},
        "seconds": seconds,
        "command": command,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = args.folder / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    if args.git_commit:
        commit_result(path, f"ablation {args.folder.name} {name}")
    return path


def write_table(folder: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    rows.sort(key=lambda r: r["heldout_ppl"].get("student_after_logits", float("inf")))
    lines = [
        f"# Ablations of `{rows[0]['recipe']}` at {budget_label(rows[0]['budget'])} distillation tokens",
        "",
        "Held-out perplexity (the recipe's held-out teacher-written text, the run's own eval) of the student "
        "after each stage, and its ratio to the teacher; every variant at the same total tokens.",
        "",
        "| variant | overrides | tokens (stage 1 / stage 2) | after stage 1 | after stage 2 | × teacher "
        "| wall time | threads |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ppl, x = r["heldout_ppl"], r["x_teacher"]
        own = "; ".join(f"`{k}={v}`" for k, v in r.get("variant_overrides", {}).items()) or "as shipped"
        lines.append(
            f"| {r['variant']} | {own} | {r['tokens']['attention']:,} / {r['tokens']['logits']:,} | "
            f"{ppl.get('student_after_attention', float('nan')):.2f} | "
            f"{ppl.get('student_after_logits', float('nan')):.2f} | "
            f"{x.get('student_after_logits', float('nan')):.2f} | {r['seconds'] / 60:.0f} min | "
            f"{r['machine']['threads']} |"
        )
    teacher = rows[0]["heldout_ppl"]["teacher"]
    lines += ["", f"Teacher held-out perplexity {teacher:.3f}. CPU: {rows[0]['machine']['cpu']}.", ""]
    text = "\n".join(lines)
    (folder / "ablations.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--budget", required=True, help="total distillation tokens, e.g. 150k")
    p.add_argument("--variant", action="append", required=True, help="NAME or NAME:KEY=VALUE;KEY=VALUE")
    p.add_argument("--train", default="teacher:300k", help="data.train of every variant")
    p.add_argument("--text-dir", default=REPO / "benchmarks" / "teacher-text", type=Path)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=Path("out/ablations"), type=Path, help="run folders")
    p.add_argument("--results", default=REPO / "benchmarks" / "results" / "smollm2-cpu", type=Path)
    p.add_argument("--git-commit", action="store_true")
    args = p.parse_args(argv)
    args.budget = parse_budget(args.budget)
    args.sets = parse_sets(args.sets)
    args.train = [t.strip() for t in args.train.split(",") if t.strip()]
    args.folder = args.results / "ablations" / f"{args.recipe}@{budget_label(args.budget)}"
    variants = [parse_variant(v) for v in args.variant]
    planned = [(name, own, *variant_overrides(args, own)) for name, own in variants]  # all resolve first
    for name, own, overrides, tokens in planned:
        if (args.folder / f"{name}.json").is_file():
            print(f"[ablate] {name}: done")
            continue
        run_dir = args.out / f"{args.recipe}@{budget_label(args.budget)}" / name
        pairs = {"recipe": args.recipe, "teacher.path": args.teacher, "output_dir": str(run_dir), **overrides}
        pairs["eval.tasks"] = "[]"
        command = [sys.executable, "-m", "linearize", "convert", *(f"{k}={v}" for k, v in pairs.items())]
        seconds = execute(command, run_dir.parent / f"{name}.log", f"variant {name}")
        path = write_result(args, name, own, overrides, tokens, run_dir, seconds, shown(command))
        result = json.loads(path.read_text())
        print(f"[ablate] {name}: {result['heldout_ppl']}", flush=True)
    print(write_table(args.folder))


if __name__ == "__main__":
    main()
