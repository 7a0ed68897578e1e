"""Conversion quality at equal tokens: every recipe on one teacher, at several distillation budgets.

For each recipe and each budget (total distillation tokens, split between the stages in the recipe's own
ratio by scaling `stages.*.steps` and `warmup_steps`), `linearize convert` runs in a subprocess; then, for
each distinct stage-2 setting that trains on the text (cross-entropy > 0), the fine-tuned-teacher control
(`student.mixer=softmax`: the teacher itself, same data, same stage-2 tokens, same LoRA/full setting). A
stage 2 on KL alone cannot move a softmax student away from its teacher (the KL to itself has no
gradient), so for those recipes the fine-tuned teacher is the teacher. Then `linearize eval` scores every
export next to the teacher: held-out perplexity on unseen TinyStories (the run's held-out documents) and on
the Wizard of Oz, recall (MQAR, passkey), the controls (the zero-training sliding-window teacher; branch
controls for hybrid mixers) and long-context perplexity at 2k/4k/8k tokens (capped at the teacher's
context). A rerun resumes: `convert` resumes from its checkpoints, and finished runs and evaluations are
skipped. Writes `<out>/quality.md`, `<out>/quality.json` and `<out>/quality_vs_tokens.png`. See README.md.

    python benchmarks/quality.py --teacher ~/.cache/linearize-assets/smollm2-135m-instruct --budgets 2M,50M
    python benchmarks/quality.py --teacher bundled:stories260K --recipes tiny,tiny-lolcats \\
        --budgets 20k,40k --out /tmp/quality-smoke --eval-quick
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = (
    "smollm2-135m-to-linear,smollm2-135m-to-hybrid,smollm2-135m-lolcats,smollm2-135m-liger,"
    "smollm2-135m-radlads,smollm2-135m-gsa-t2r"
)
WIZARD = REPO.parent / "shared" / "assets" / "corpora" / "wizard_of_oz.txt"
LONG_CONTEXTS = (2048, 4096, 8192)
UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
STAGES = ("attention", "logits")
# --eval-quick: a smoke-sized evaluation (a few samples per cell, a few perplexity windows)
QUICK = {
    "mqar_pairs": "[4,8]",
    "mqar_lengths": "[64,128]",
    "mqar_samples": "2",
    "passkey_lengths": "[128,256]",
    "passkey_depths": "[0,0.5,1]",
    "passkey_samples": "2",
    "ppl_max_blocks": "8",
}
DOC_SEPARATOR = "<|endoftext|>"


class UsageError(Exception):
    """A bad argument, found before any work starts."""


def parse_budget(text: str) -> int:
    """`500k`, `2M`, `50M`, `1.5M`, `20000` -> tokens."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMbBgG]?)", text.strip())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(
            f"budget {text!r} is not a token count; use e.g. 500k, 2M, 50M (k = 1e3, M = 1e6, B = 1e9)"
        )
    return int(round(float(match.group(1)) * UNITS[match.group(2).lower()]))


def budget_label(tokens: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if tokens >= size and tokens % (size // 10) == 0:
            return f"{tokens / size:g}{unit}"
    return str(tokens)


@dataclass
class Run:
    """One `linearize convert` run: a student of a recipe at a budget, or a fine-tuned-teacher control."""

    recipe: str
    budget: int
    run_dir: Path
    overrides: dict[str, str]
    tokens: dict[str, int]
    control: bool = False
    evals: dict[str, Path] = field(default_factory=dict)
    """eval name -> its `linearize eval` output folder (results.json inside)."""

    @property
    def final(self) -> Path:
        return self.run_dir / "final"

    @property
    def name(self) -> str:
        return (
            f"{'fine-tuned teacher as ' if self.control else ''}{self.recipe} @ {budget_label(self.budget)}"
        )


def scaled_stages(recipe, budget: int) -> tuple[dict[str, str], dict[str, int]]:
    """Overrides giving `recipe` `budget` distillation tokens in all, split as the recipe splits its own
    (one process: the benchmark runs `convert` unlaunched), and the tokens each stage then gets."""
    per_step = {s: getattr(recipe.stages, s).tokens_per_step(1, recipe.data.seq_len) for s in STAGES}
    own = {s: recipe.stage_tokens(s, 1) for s in STAGES}
    if not sum(own.values()):
        raise UsageError(f"recipe {recipe.name} trains no stage, so it has no budget to scale")
    overrides, tokens = {}, {}
    for s in STAGES:
        cfg = getattr(recipe.stages, s)
        steps = max(1, round(budget * own[s] / sum(own.values()) / per_step[s])) if own[s] else 0
        warmup = min(steps, round(cfg.warmup_steps * steps / cfg.steps)) if cfg.steps else 0
        overrides[f"stages.{s}.steps"] = str(steps)
        overrides[f"stages.{s}.warmup_steps"] = str(warmup)
        tokens[s] = steps * per_step[s]
    return overrides, tokens


def control_overrides(recipe) -> dict[str, str] | None:
    """The fine-tuned-teacher control of a recipe: its stage 2 on a student that keeps every layer softmax;
    None when stage 2 is KL alone (the control is then the teacher itself)."""
    if recipe.stages.logits.ce_weight == 0:
        return None
    return {
        "student.mixer": "softmax",
        "student.settings": "{}",
        "student.layers": "all",
    }


def data_overrides(train: list[Path]) -> dict[str, str]:
    if not train:
        return {}
    overrides = {"data.train": json.dumps([str(p) for p in train])}
    texts = [p for p in train if p.suffix == ".txt"]
    if texts and not any(
        any(line.strip() == DOC_SEPARATOR for line in p.open(errors="replace")) for p in texts
    ):
        # no `<|endoftext|>` lines (tinystories_lowercase.txt): one document per blank-line-separated part,
        # so that data.heldout_docs has documents to hold out
        overrides["data.doc_separator"] = "''"
    return overrides


def plan_runs(args) -> tuple[list[Run], dict[tuple[str, int], Run | None]]:
    """Every convert run, students first; and for each (recipe, budget) its control run (None: the teacher)."""
    from linearize.config import load_recipe

    runs: list[Run] = []
    controls: dict[tuple[str, int], Run | None] = {}
    by_key: dict[str, Run] = {}
    data = data_overrides(args.train)
    for name in args.recipes:
        recipe = load_recipe(name, data)
        for budget in args.budgets:
            stages, tokens = scaled_stages(recipe, budget)
            run_dir = args.out / name / budget_label(budget)
            runs.append(Run(name, budget, run_dir, {**data, **stages}, tokens))
            extra = control_overrides(recipe)
            if extra is None:
                controls[(name, budget)] = None
                continue
            # the control trains stage 2 on the student's stage-2 tokens: stage 1 has nothing to align
            over = {**data, **extra, **{k: v for k, v in stages.items() if ".logits." in k}}
            resolved = load_recipe(name, {**over, "teacher.path": args.teacher})
            key = json.dumps(
                [resolved.to_dict()[k] for k in ("seed", "teacher", "data", "train")]
                + [resolved.to_dict()["stages"]["logits"]],
                sort_keys=True,
            )
            if key not in by_key:
                by_key[key] = Run(
                    name,
                    budget,
                    args.out / "finetuned-teacher" / name / budget_label(budget),
                    over,
                    {"attention": 0, "logits": tokens["logits"]},
                    control=True,
                )
                runs.append(by_key[key])
            controls[(name, budget)] = by_key[key]
    return runs, controls


def teacher_context(teacher: str) -> int | None:
    """max_position_embeddings of the teacher when its config is at hand (bundled or a folder), else None."""
    from linearize.convert.teachers import resolve_path

    folder = Path(resolve_path(teacher))
    if not (folder / "config.json").is_file():
        return None
    return int(json.loads((folder / "config.json").read_text()).get("max_position_embeddings", 0)) or None


def long_lengths(context: int | None, quick: bool) -> list[int]:
    """2k/4k/8k capped at the teacher's context (the full context when it is shorter than 2k)."""
    if context is None:
        return list(LONG_CONTEXTS)
    lengths = [n for n in LONG_CONTEXTS if n <= context] or [context]
    return lengths[-1:] if quick else lengths


def convert_command(args, run: Run) -> list[str]:
    pairs = {
        "recipe": run.recipe,
        "teacher.path": args.teacher,
        "output_dir": str(run.run_dir),
        **run.overrides,
        "eval.tasks": "[]",  # scored below, with the same settings for every export
    }
    return [sys.executable, "-m", "linearize", "convert", *(f"{k}={v}" for k, v in pairs.items())]


def eval_commands(args, run: Run, seq_len: int, context: int | None) -> dict[str, list[str]]:
    """eval name -> `linearize eval` command; each writes results.json into run.evals[name]."""
    common = {"model": str(run.final), "teacher": args.teacher, "ppl_mode": "window"}
    if args.eval_quick:
        common |= QUICK
    evals: dict[str, dict[str, str]] = {
        "tinystories": {
            "tasks": "ppl,recall" if run.control else "ppl,recall,controls",
            "ppl_seq_len": str(seq_len),
        }
    }
    long_text = {}
    if args.wizard:
        evals["wizard"] = {
            "tasks": "ppl",
            "ppl_data": json.dumps([str(args.wizard)]),
            "ppl_seq_len": str(seq_len),
        }
        long_text = {"ppl_data": evals["wizard"]["ppl_data"]}
    for n in long_lengths(context, args.eval_quick):
        evals[f"long_{n}"] = {
            "tasks": "ppl",
            **long_text,
            "ppl_seq_len": str(n),
            "batch_size": str(max(1, 8 * seq_len // n)),
            **({"ppl_max_blocks": "4"} if args.eval_quick else {}),
        }
    commands = {}
    for name, pairs in evals.items():
        run.evals[name] = run.run_dir / "quality-eval" / name
        pairs = {**common, **pairs, "out": str(run.evals[name])}
        commands[name] = [sys.executable, "-m", "linearize", "eval", *(f"{k}={v}" for k, v in pairs.items())]
    return commands


def shown(command: list[str]) -> str:
    """The command as a user would type it (`linearize ...` for the installed console script)."""
    return shlex.join(["linearize", *command[3:]])


def execute(command: list[str], log: Path, what: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[quality] {what}: {shown(command)}", flush=True)
    began = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"[quality] {what} failed (exit {done.returncode}); last lines of {log}:\n{tail}")
    print(f"[quality] {what} done in {time.perf_counter() - began:.0f}s (log: {log})", flush=True)


def read_eval(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())["tasks"]


def metrics(run: Run) -> dict:
    """Student-side numbers of a run's evaluations, and the teacher's and sliding window's beside them."""
    student, teacher, window, verdicts = {}, {}, {}, {}
    for name, folder in run.evals.items():
        tasks = read_eval(folder)
        key = name if name in ("tinystories", "wizard") else None
        ppl = tasks["ppl"]
        if key:
            student[f"ppl_{key}"], teacher[f"ppl_{key}"] = ppl["student"]["ppl"], ppl["teacher"]["ppl"]
        else:
            n = int(name.split("_")[1])
            student.setdefault("ppl_long", {})[n] = ppl["student"]["ppl"]
            teacher.setdefault("ppl_long", {})[n] = ppl["teacher"]["ppl"]
            student.setdefault("long_text", {})[n] = ppl["meta"]["source"]
        if "recall" in tasks:
            for task in ("mqar", "passkey"):
                student[task] = tasks["recall"][task]["student"]["mean"]
                teacher[task] = tasks["recall"][task]["teacher"]["mean"]
        controls = tasks.get("controls", {})
        if "window" in controls:
            w = controls["window"]
            window = {
                "ppl_tinystories": w["ppl"]["sliding_window"]["ppl"],
                "mqar": w["recall"]["mqar"]["sliding_window"]["mean"],
                "passkey": w["recall"]["passkey"]["sliding_window"]["mean"],
                "window": w["window"],
                "sinks": w["sinks"],
            }
            verdicts["window"] = w["verdict"]
            verdicts["beats_window"] = w["student_beats_window"]
        if "branches" in controls:
            verdicts["branches"] = controls["branches"]["verdict"]
    return {"student": student, "teacher": teacher, "sliding_window": window, "verdicts": verdicts}


def ratio(a, b):
    return a / b if a is not None and b else None


def collect(args, runs: list[Run], controls: dict) -> dict:
    rows = []
    teacher: dict = {}
    window: dict = {}
    for run in runs:
        if run.control:
            continue
        m = metrics(run)
        teacher = teacher or m["teacher"]
        window = window or m["sliding_window"]
        ctrl = controls[(run.recipe, run.budget)]
        ctrl_metrics = metrics(ctrl)["student"] if ctrl is not None else m["teacher"]
        s = m["student"]
        rows.append(
            {
                "recipe": run.recipe,
                "budget": run.budget,
                "tokens": {**run.tokens, "total": sum(run.tokens.values())},
                "run_dir": str(run.run_dir),
                "student": s,
                "finetuned_teacher": {
                    "run_dir": str(ctrl.run_dir) if ctrl else None,
                    "is_teacher": ctrl is None,
                    "tokens": ctrl.tokens["logits"] if ctrl else 0,
                    **{k: ctrl_metrics.get(k) for k in ("ppl_tinystories", "ppl_wizard", "mqar", "passkey")},
                },
                "x_teacher": {
                    "tinystories": ratio(s.get("ppl_tinystories"), m["teacher"].get("ppl_tinystories")),
                    "wizard": ratio(s.get("ppl_wizard"), m["teacher"].get("ppl_wizard")),
                    "long": {
                        n: ratio(v, m["teacher"]["ppl_long"][n]) for n, v in s.get("ppl_long", {}).items()
                    },
                },
                "x_finetuned_teacher": {
                    "tinystories": ratio(s.get("ppl_tinystories"), ctrl_metrics.get("ppl_tinystories")),
                    "wizard": ratio(s.get("ppl_wizard"), ctrl_metrics.get("ppl_wizard")),
                },
                "x_sliding_window": ratio(
                    s.get("ppl_tinystories"), m["sliding_window"].get("ppl_tinystories")
                ),
                "verdicts": m["verdicts"],
            }
        )
    verdicts = {}
    for budget in args.budgets:
        here = [r for r in rows if r["budget"] == budget]
        best = min(here, key=lambda r: r["student"]["ppl_tinystories"])
        losers = [r for r in here if not r["verdicts"].get("beats_window", {}).get("ppl", False)]
        line = (
            f"{budget_label(budget)} tokens: best is {best['recipe']} (held-out TinyStories ppl "
            f"{best['student']['ppl_tinystories']:.3f}, {best['x_teacher']['tinystories']:.2f}x the teacher); "
        )
        if losers:
            line += "NOT every student beats the sliding-window baseline on perplexity: " + ", ".join(
                f"{r['recipe']} ({r['student']['ppl_tinystories']:.3f} vs {window['ppl_tinystories']:.3f})"
                for r in losers
            )
        else:
            line += (
                f"every student beats the sliding-window baseline (ppl {window.get('ppl_tinystories', 0):.3f}) "
                "on perplexity"
            )
        verdicts[budget_label(budget)] = line
    return {
        "settings": {
            "teacher": args.teacher,
            "recipes": args.recipes,
            "budgets": args.budgets,
            "train": [str(p) for p in args.train] or "each recipe's data.train",
            "wizard": str(args.wizard) if args.wizard else None,
            "eval_quick": args.eval_quick,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "teacher": teacher,
        "sliding_window": window,
        "runs": rows,
        "verdicts": verdicts,
    }


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def write_markdown(result: dict, path: Path) -> None:
    t, w = result["teacher"], result["sliding_window"]
    longs = sorted({n for r in result["runs"] for n in r["student"].get("ppl_long", {})})
    lines = [
        "# Conversion quality at equal distillation tokens",
        "",
        f"Teacher `{result['settings']['teacher']}`. Perplexity on held-out TinyStories (documents held out of "
        "training) and on the Wizard of Oz (never trained on); ratios are student / reference (lower is better). "
        "The fine-tuned teacher keeps softmax and trains stage 2 exactly as the recipe does (same data and "
        "tokens, plotted at its student's total); for a stage 2 on KL alone it is the teacher itself. "
        f"The sliding window is the teacher restricted to {w.get('window')} tokens + {w.get('sinks')} sinks, "
        "no training. MQAR and passkey: mean accuracy.",
        "",
        f"Teacher: TinyStories ppl {fmt(t.get('ppl_tinystories'))}, Wizard of Oz ppl {fmt(t.get('ppl_wizard'))}, "
        + ", ".join(f"{n} tokens {fmt(v)}" for n, v in sorted(t.get("ppl_long", {}).items()))
        + f"; MQAR {fmt(t.get('mqar'), '.2f')}, passkey {fmt(t.get('passkey'), '.2f')}.",
        f"Sliding window: TinyStories ppl {fmt(w.get('ppl_tinystories'))}; MQAR {fmt(w.get('mqar'), '.2f')}, "
        f"passkey {fmt(w.get('passkey'), '.2f')}.",
        "",
        "| recipe | tokens | TinyStories ppl | Wizard ppl | × teacher (TS / Wiz) | × fine-tuned teacher (TS / Wiz) "
        "| × sliding window (TS) | "
        + " | ".join(f"ppl {n} (× teacher)" for n in longs)
        + (" | " if longs else "")
        + "MQAR | passkey |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(longs) + "---:|---:|",
    ]
    for r in sorted(result["runs"], key=lambda r: (r["budget"], r["student"]["ppl_tinystories"])):
        s, xt, xf = r["student"], r["x_teacher"], r["x_finetuned_teacher"]
        ft = " (= teacher)" if r["finetuned_teacher"]["is_teacher"] else ""
        cells = [
            f"`{r['recipe']}`",
            f"{r['tokens']['total']:,}",
            fmt(s.get("ppl_tinystories")),
            fmt(s.get("ppl_wizard")),
            f"{fmt(xt['tinystories'], '.2f')} / {fmt(xt['wizard'], '.2f')}",
            f"{fmt(xf['tinystories'], '.2f')} / {fmt(xf['wizard'], '.2f')}{ft}",
            fmt(r["x_sliding_window"], ".2f"),
            *(f"{fmt(s['ppl_long'].get(n))} ({fmt(xt['long'].get(n), '.2f')})" for n in longs),
            fmt(s.get("mqar"), ".2f"),
            fmt(s.get("passkey"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {line}" for line in result["verdicts"].values())]
    notes = [r for r in result["runs"] if "branches" in r["verdicts"]]
    if notes:
        lines += [
            "",
            "Hybrid branch controls:",
            *(f"- `{r['recipe']}` @ {budget_label(r['budget'])}: {r['verdicts']['branches']}" for r in notes),
        ]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    texts = [("tinystories", "held-out TinyStories")]
    if result["teacher"].get("ppl_wizard") is not None:
        texts.append(("wizard", "The Wonderful Wizard of Oz"))
    fig, axes = plt.subplots(1, len(texts), figsize=(6.5 * len(texts), 4.8), squeeze=False)
    recipes = list(dict.fromkeys(r["recipe"] for r in result["runs"]))
    for ax, (key, title) in zip(axes[0], texts):
        for name in recipes:
            rows = sorted(
                (r for r in result["runs"] if r["recipe"] == name), key=lambda r: r["tokens"]["total"]
            )
            ax.plot(
                [r["tokens"]["total"] for r in rows],
                [r["student"][f"ppl_{key}"] for r in rows],
                "o-",
                label=name,
            )
            ft = [r for r in rows if not r["finetuned_teacher"]["is_teacher"]]
            if ft:
                ax.plot(
                    [r["tokens"]["total"] for r in ft],
                    [r["finetuned_teacher"][f"ppl_{key}"] for r in ft],
                    "x--",
                    color=ax.lines[-1].get_color(),
                    alpha=0.6,
                    label=f"fine-tuned teacher (stage 2 of {name})",
                )
        ax.axhline(result["teacher"][f"ppl_{key}"], color="black", lw=1.2, label="teacher")
        if key == "tinystories" and result["sliding_window"]:
            ax.axhline(
                result["sliding_window"]["ppl_tinystories"],
                color="gray",
                ls=":",
                lw=1.5,
                label=f"sliding window ({result['sliding_window']['window']} tokens, no training)",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers (20,000; 30), not 2 x 10^4
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:g}"))
            axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:g}"))
        ax.set_xlabel("distillation tokens, both stages (log scale)")
        ax.set_ylabel("perplexity, log scale (lower is better)")
        ax.set_title(f"{title}: perplexity vs distillation tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"teacher {result['settings']['teacher']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None):
    from linearize.config import RecipeError, shipped_recipes

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher folder, Hub id or bundled:stories260K")
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated shipped recipe names")
    p.add_argument("--budgets", default="2M,50M", help="total distillation tokens per run, e.g. 500k,2M,50M")
    p.add_argument("--out", default="out/quality", type=Path, help="output folder (runs, logs, report)")
    p.add_argument(
        "--train", default="", help="comma-separated training files replacing the recipes' data.train"
    )
    p.add_argument(
        "--wizard", default=None, help=f"second held-out text (default {WIZARD}, skipped when absent)"
    )
    p.add_argument(
        "--eval-quick", action="store_true", help="smoke-sized evaluation: few samples and windows"
    )
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    args = p.parse_args(argv)
    try:
        shipped = shipped_recipes()
        args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
        unknown = [r for r in args.recipes if r not in shipped]
        if unknown or not args.recipes:
            raise UsageError(
                f"unknown recipe {unknown[0] if unknown else '(none given)'!r}; shipped recipes: "
                + ", ".join(sorted(shipped))
            )
        if len(set(args.recipes)) < len(args.recipes):
            raise UsageError(f"--recipes names a recipe twice: {','.join(args.recipes)}")
        args.budgets = sorted({parse_budget(b) for b in args.budgets.split(",") if b.strip()})
        if not args.budgets:
            raise UsageError("--budgets is empty; e.g. --budgets 2M,50M")
        args.train = [Path(t).expanduser() for t in args.train.split(",") if t.strip()]
        missing = [str(t) for t in args.train if not t.is_file()]
        if missing:
            raise UsageError(f"--train file {missing[0]} does not exist")
        if args.wizard is not None:
            args.wizard = Path(args.wizard).expanduser()
            if not args.wizard.is_file():
                raise UsageError(f"--wizard file {args.wizard} does not exist")
        elif WIZARD.is_file():
            args.wizard = WIZARD
        else:
            print(f"[quality] {WIZARD} is absent: no Wizard of Oz perplexity (give --wizard <file>)")
        from linearize.convert.teachers import TeacherError, resolve_path

        try:
            resolve_path(args.teacher)
        except TeacherError as err:
            raise UsageError(str(err)) from None
        for name in args.recipes:  # every recipe resolves with the data and budgets asked
            check_recipe(name, args)
    except (UsageError, RecipeError) as err:
        p.error(str(err))
    args.out = args.out.expanduser()
    return args


def check_recipe(name: str, args) -> None:
    """`name` resolves with the data, teacher and every budget asked (a RecipeError or UsageError if not)."""
    from linearize.config import load_recipe

    recipe = load_recipe(name, {**data_overrides(args.train), "teacher.path": args.teacher})
    for budget in args.budgets:
        overrides, _ = scaled_stages(recipe, budget)
        load_recipe(name, {**data_overrides(args.train), **overrides})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from linearize.checkpoint import is_complete
    from linearize.config import load_recipe

    runs, controls = plan_runs(args)
    context = teacher_context(args.teacher)
    logs = args.out / "logs"
    for run in runs:
        seq_len = load_recipe(run.recipe, run.overrides).data.seq_len
        label = run.name
        convert = convert_command(args, run)
        if args.dry_run:
            print(shown(convert))
        elif is_complete(run.final):
            print(f"[quality] {label}: already converted ({run.final})")
        else:
            execute(
                convert,
                logs / f"{run.run_dir.relative_to(args.out).as_posix().replace('/', '_')}.convert.log",
                f"convert {label}",
            )
        if not args.dry_run:  # the export knows the context for sure
            context = (
                json.loads((run.final / "config.json").read_text()).get("max_position_embeddings") or context
            )
        for name, command in eval_commands(args, run, seq_len, context).items():
            if args.dry_run:
                print(shown(command))
            elif (run.evals[name] / "results.json").is_file():
                print(f"[quality] {label}: eval {name} already done")
            else:
                log = (
                    logs / f"{run.run_dir.relative_to(args.out).as_posix().replace('/', '_')}.eval-{name}.log"
                )
                execute(command, log, f"eval {name} of {label}")
    if args.dry_run:
        if context is None:
            print(
                f"# long-context lengths {list(LONG_CONTEXTS)} are capped at the teacher's context once known"
            )
        return
    result = collect(args, runs, controls)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out / "quality.md")
    plot(result, args.out / "quality_vs_tokens.png")
    print((args.out / "quality.md").read_text())
    print(f"[quality] wrote {args.out / 'quality.md'}, quality.json, quality_vs_tokens.png")


if __name__ == "__main__":
    from linearize.host import keep_freed_memory

    keep_freed_memory()  # as the `linearize` command does
    main()
