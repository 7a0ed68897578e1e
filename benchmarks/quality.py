"""Conversion quality at equal tokens: every recipe on one teacher, at several distillation budgets.

For each recipe and each budget (total distillation tokens, split between the stages in the recipe's own
ratio by scaling `stages.*.steps` and `warmup_steps`), `linearize convert` runs in a subprocess; then, for
each distinct stage-2 setting that trains on the text (cross-entropy > 0), the fine-tuned-teacher control
(`student.mixer=softmax`: the teacher itself, same data, same stage-2 tokens, same LoRA/full setting). A
stage 2 on KL alone cannot move a softmax student away from its teacher (the KL to itself has no
gradient), so for those recipes the fine-tuned teacher is the teacher. Then `linearize eval` scores every
export next to the teacher: perplexity on the run's held-out text (the recipe's `data.heldout`, e.g.
teacher-written text from openings never trained on, or its held-out documents), on unseen TinyStories
(when the run does not train on them) and on the Wizard of Oz, recall (MQAR, passkey), the controls (the
zero-training sliding-window teacher; branch controls for hybrid mixers) and long-context perplexity at
2k/4k/8k tokens (capped at the teacher's context).

Each (recipe, budget) is a unit: once its conversion and evaluations are done, its result is written as
`<results>/units/<recipe>@<budget>.json` (and committed with `--git-commit`), so the table grows over many
sessions; a rerun resumes (`convert` resumes from its checkpoints; finished runs, evaluations and units are
skipped). `<results>/quality.md`, `quality.json` and `quality_vs_tokens.png` are rebuilt from every unit in
`<results>/units`, whichever session wrote it. See README.md.

    python benchmarks/quality.py --teacher ~/.cache/linearize-assets/smollm2-135m-instruct \\
        --budgets 150k,500k --train teacher:300k --results benchmarks/results/smollm2-cpu --git-commit
    python benchmarks/quality.py --teacher bundled:stories260K --recipes tiny,tiny-lolcats \\
        --budgets 20k,40k --out /tmp/quality-smoke --eval-quick
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from linearize.host import cpu_multiplies_bf16

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = (
    "smollm2-135m-to-linear,smollm2-135m-to-hybrid,smollm2-135m-lolcats,smollm2-135m-liger,"
    "smollm2-135m-radlads,smollm2-135m-gsa-t2r"
)
WIZARD = REPO.parent / "shared" / "assets" / "corpora" / "wizard_of_oz.txt"
TINYSTORIES = "bundled:tinystories_docs.txt"
LONG_CONTEXTS = (2048, 4096, 8192)
LONG_TEXT_TOKENS = 32768
"""Tokens of the Wizard of Oz scored at each length (its first 32k: 64 windows of 512, 16 of 2k, 8 of 4k, 4 of
8k): one CPU evaluation of three models stays within minutes."""
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


def scaled_stages(
    recipe, budget: int, shares: dict[str, float] | None = None, reference=None
) -> tuple[dict[str, str], dict[str, int]]:
    """Overrides giving `recipe` `budget` distillation tokens in all, split as `reference` (default: `recipe`)
    splits its own tokens or as `shares` says (one process: the benchmark runs `convert` unlaunched), and the
    tokens each stage then gets. Warmup keeps `reference`'s fraction of its steps."""
    reference = reference or recipe
    per_step = {s: getattr(recipe.stages, s).tokens_per_step(1, recipe.data.seq_len) for s in STAGES}
    own = shares or {s: reference.stage_tokens(s, 1) for s in STAGES}
    if not sum(own.values()):
        raise UsageError(f"recipe {recipe.name} trains no stage, so it has no budget to scale")
    overrides, tokens = {}, {}
    for s in STAGES:
        ref = getattr(reference.stages, s)
        steps = max(1, round(budget * own[s] / sum(own.values()) / per_step[s])) if own[s] else 0
        warmup = min(steps, round(ref.warmup_steps * steps / ref.steps)) if ref.steps else 0
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


def data_overrides(train: list[Path | str]) -> dict[str, str]:
    """`data.train` (and the separator its text files need) for --train: files and `teacher:<tokens>`."""
    if not train:
        return {}
    overrides = {"data.train": json.dumps([str(p) for p in train])}
    texts = [p for p in train if isinstance(p, Path) and p.suffix == ".txt"]
    if texts and not any(
        any(line.strip() == DOC_SEPARATOR for line in p.open(errors="replace")) for p in texts
    ):
        # no `<|endoftext|>` lines (tinystories_lowercase.txt): one document per blank-line-separated part,
        # so that data.heldout_docs has documents to hold out
        overrides["data.doc_separator"] = "''"
    return overrides


def common_overrides(args) -> dict[str, str]:
    """What every run of the benchmark shares: where teacher-written text is kept, and --set pairs."""
    return {"data.sampling.cache_dir": str(args.text_dir), **args.sets}


def plan_runs(args) -> tuple[list[Run], dict[tuple[str, int], Run | None]]:
    """Every convert run, students first; and for each (recipe, budget) its control run (None: the teacher)."""
    from linearize.config import load_recipe

    runs: list[Run] = []
    controls: dict[tuple[str, int], Run | None] = {}
    by_key: dict[str, Run] = {}
    data = {**data_overrides(args.train), **common_overrides(args)}
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


def eval_commands(
    args, run: Run, seq_len: int, context: int | None, train: list[str]
) -> dict[str, list[str]]:
    """eval name -> `linearize eval` command; each writes results.json into run.evals[name]. `train`: the
    run's training sources (unseen TinyStories is scored only when they are not among them)."""
    # the machine is the benchmark's own: torch's threads (eval's default of 1 suits a loaded machine)
    common = {"model": str(run.final), "teacher": args.teacher, "ppl_mode": "window", "cpu_threads": "0"}
    if args.eval_quick:
        common |= QUICK
    evals: dict[str, dict[str, str]] = {
        # the export's own held-out text (the recipe's data.heldout or held-out documents); for a student, the
        # controls task scores teacher, student and sliding window on its perplexity windows and recall
        "heldout": {
            "tasks": "ppl,recall" if run.control else "controls",
            "ppl_seq_len": str(seq_len),
        }
    }
    if TINYSTORIES not in train:
        evals["tinystories"] = {
            "tasks": "ppl",
            "ppl_data": json.dumps([TINYSTORIES]),
            "ppl_seq_len": str(seq_len),
        }
    long_text = {}
    # a student is scored next to the zero-training sliding-window teacher on every text but its own held-out
    # one (where the controls task scores it, with recall)
    window = {} if run.control else {"ppl_window": "true"}
    if args.wizard:
        evals["wizard"] = {
            "tasks": "ppl",
            "ppl_data": json.dumps([str(args.wizard)]),
            "ppl_seq_len": str(seq_len),
            "ppl_max_blocks": str(max(1, LONG_TEXT_TOKENS // seq_len)),
            **window,
        }
        long_text = {"ppl_data": evals["wizard"]["ppl_data"]}
    for n in long_lengths(context, args.eval_quick):
        evals[f"long_{n}"] = {
            "tasks": "ppl",
            **long_text,
            "ppl_seq_len": str(n),
            "batch_size": str(max(1, 8 * seq_len // n)),
            "ppl_max_blocks": "4" if args.eval_quick else str(max(1, LONG_TEXT_TOKENS // n)),
            **window,
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


def execute(command: list[str], log: Path, what: str) -> float:
    """Run `command` with its output in `log`; its wall time in seconds (SystemExit with the log's tail if
    it fails)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[quality] {what}: {shown(command)}", flush=True)
    began = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"[quality] {what} failed (exit {done.returncode}); last lines of {log}:\n{tail}")
    elapsed = time.perf_counter() - began
    print(f"[quality] {what} done in {elapsed:.0f}s (log: {log})", flush=True)
    return elapsed


def timings(run: Run) -> dict:
    """Wall times of a run's steps so far, kept in its folder (a resumed unit keeps those of earlier sessions)."""
    path = run.run_dir / "quality-seconds.json"
    return json.loads(path.read_text()) if path.is_file() else {"convert": 0.0, "evals": {}}


def save_timings(run: Run, seconds: dict) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "quality-seconds.json").write_text(json.dumps(seconds))


def read_eval(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())["tasks"]


def metrics(run: Run) -> dict:
    """Student-side numbers of a run's evaluations, and the teacher's and sliding window's beside them."""
    student, teacher, window, verdicts = {}, {}, {}, {}
    for name, folder in run.evals.items():
        tasks = read_eval(folder)
        window_control = tasks.get("controls", {}).get("window")
        if window_control:  # teacher and student scored there, next to the sliding window
            tasks.setdefault("ppl", window_control["ppl"])
            tasks.setdefault("recall", window_control["recall"])
        key = name if name in ("heldout", "tinystories", "wizard") else None
        ppl = tasks["ppl"]
        if key:
            student[f"ppl_{key}"], teacher[f"ppl_{key}"] = ppl["student"]["ppl"], ppl["teacher"]["ppl"]
            if "sliding_window" in ppl:
                window[f"ppl_{key}"] = ppl["sliding_window"]["ppl"]
        else:
            n = int(name.split("_")[1])
            student.setdefault("ppl_long", {})[n] = ppl["student"]["ppl"]
            teacher.setdefault("ppl_long", {})[n] = ppl["teacher"]["ppl"]
            student.setdefault("long_text", {})[n] = ppl["meta"]["source"]
            if "sliding_window" in ppl:
                window.setdefault("ppl_long", {})[n] = ppl["sliding_window"]["ppl"]
        if "recall" in tasks:
            for task in ("mqar", "passkey"):
                student[task] = tasks["recall"][task]["student"]["mean"]
                teacher[task] = tasks["recall"][task]["teacher"]["mean"]
        controls = tasks.get("controls", {})
        if "window" in controls:
            w = controls["window"]
            window |= {
                "ppl_heldout": w["ppl"]["sliding_window"]["ppl"],
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


TEXTS = (("heldout", "held-out"), ("tinystories", "TinyStories"), ("wizard", "Wizard of Oz"))


def unit_name(recipe: str, budget: int, control: bool = False) -> str:
    return f"{'finetuned-teacher--' if control else ''}{recipe}@{budget_label(budget)}"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo) or, elsewhere, what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where a result was measured: the CPU, whether it has bf16 instructions, torch's threads, the commit."""
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {
        "cpu": cpu_name(),
        "bf16_instructions": cpu_multiplies_bf16(),
        "threads": torch.get_num_threads(),
        "commit": commit.stdout.strip(),
    }


def commit_result(path: Path, message: str) -> None:
    """Commit one result file alone (the table grows commit by commit, whatever else the tree holds)."""
    subprocess.run(["git", "add", str(path)], cwd=REPO, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message, "--", str(path)], cwd=REPO, check=True)


def write_unit(args, run: Run, control: Run | None, seconds: dict, commands: list[str]) -> Path:
    """The result of one (recipe, budget), or of one fine-tuned-teacher control: metrics, wall time, the
    commands and where they ran; committed with --git-commit."""
    from linearize.config import load_recipe

    recipe = load_recipe(run.recipe, run.overrides)
    unit = {
        "unit": unit_name(run.recipe, run.budget, run.control),
        "recipe": run.recipe,
        "budget": run.budget,
        "control": run.control,
        "tokens": {**run.tokens, "total": sum(run.tokens.values())},
        "train": recipe.data.train,
        "finetuned_teacher": None
        if run.control
        else (unit_name(control.recipe, control.budget, True) if control else "teacher"),
        "metrics": metrics(run),
        "seconds": seconds,
        "commands": commands,
        "machine": machine(),
        "settings": {"teacher": args.teacher, "eval_quick": args.eval_quick, "set": args.sets},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = args.results / "units" / f"{unit['unit']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(unit, indent=1))
    if args.git_commit:
        commit_result(path, f"quality unit {unit['unit']}: {args.teacher}")
    print(f"[quality] unit {unit['unit']} written to {path}", flush=True)
    return path


def load_units(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((results / "units").glob("*.json"))}


def collect(units: dict[str, dict]) -> dict:
    """The table's rows from every student unit, each next to its teacher, its fine-tuned teacher (its
    control's unit, or the teacher) and the zero-training sliding window."""
    rows = []
    teacher: dict = {}
    window: dict = {}
    settings: dict = {}
    for unit in units.values():
        if unit["control"]:
            continue
        m = unit["metrics"]
        teacher = teacher or m["teacher"]
        window = window or m["sliding_window"]
        settings = settings or unit["settings"]
        ctrl = units.get(unit["finetuned_teacher"]) if unit["finetuned_teacher"] != "teacher" else None
        if unit["finetuned_teacher"] != "teacher" and ctrl is None:
            print(f"[quality] {unit['unit']}: its control {unit['finetuned_teacher']} is not done yet")
        ctrl_metrics = ctrl["metrics"]["student"] if ctrl else m["teacher"]
        s, t = m["student"], m["teacher"]
        texts = [key for key, _ in TEXTS]
        rows.append(
            {
                "recipe": unit["recipe"],
                "budget": unit["budget"],
                "tokens": unit["tokens"],
                "train": unit["train"],
                "seconds": unit["seconds"],
                "student": s,
                "finetuned_teacher": {
                    "unit": unit["finetuned_teacher"],
                    "is_teacher": unit["finetuned_teacher"] == "teacher",
                    "done": ctrl is not None or unit["finetuned_teacher"] == "teacher",
                    **{f"ppl_{k}": ctrl_metrics.get(f"ppl_{k}") for k in texts},
                    **{k: ctrl_metrics.get(k) for k in ("mqar", "passkey")},
                },
                "x_teacher": {
                    **{k: ratio(s.get(f"ppl_{k}"), t.get(f"ppl_{k}")) for k in texts},
                    "long": {n: ratio(v, t["ppl_long"][n]) for n, v in s.get("ppl_long", {}).items()},
                },
                "x_finetuned_teacher": {
                    k: ratio(s.get(f"ppl_{k}"), ctrl_metrics.get(f"ppl_{k}"))
                    if (ctrl or not unit["control"])
                    else None
                    for k in texts
                },
                "x_sliding_window": {
                    **{k: ratio(s.get(f"ppl_{k}"), m["sliding_window"].get(f"ppl_{k}")) for k in texts},
                    "long": {
                        n: ratio(v, long_value(m["sliding_window"].get("ppl_long", {}), n))
                        for n, v in s.get("ppl_long", {}).items()
                    },
                },
                "verdicts": m["verdicts"],
            }
        )
    verdicts = {}
    for budget in sorted({r["budget"] for r in rows}):
        here = [r for r in rows if r["budget"] == budget]
        best = min(here, key=lambda r: r["student"]["ppl_heldout"])
        losers = [r for r in here if not r["verdicts"].get("beats_window", {}).get("ppl", False)]
        long_losers = [
            (r, n, x)
            for r in here
            for n, x in sorted(r["x_sliding_window"]["long"].items(), key=lambda i: int(i[0]))
            if x is not None and x >= 1
        ]
        line = (
            f"{budget_label(budget)} tokens: best is {best['recipe']} (held-out ppl "
            f"{best['student']['ppl_heldout']:.3f}, {best['x_teacher']['heldout']:.2f}x the teacher); "
        )
        if losers:
            line += "NOT every student beats the sliding-window baseline on perplexity: " + ", ".join(
                f"{r['recipe']} ({r['student']['ppl_heldout']:.3f} vs {window['ppl_heldout']:.3f})"
                for r in losers
            )
        else:
            line += (
                f"every student beats the sliding-window baseline (ppl {window.get('ppl_heldout', 0):.3f}) "
                "on held-out perplexity"
            )
        if any(r["x_sliding_window"]["long"] for r in here):
            line += (
                "; past the training length, NOT every student beats it: "
                + ", ".join(f"{r['recipe']} at {n} tokens ({x:.2f}x)" for r, n, x in long_losers)
                if long_losers
                else "; every student beats it at every longer context scored"
            )
        verdicts[budget_label(budget)] = line
    return {
        "settings": settings,
        "teacher": teacher,
        "sliding_window": window,
        "runs": rows,
        "verdicts": verdicts,
    }


def long_value(values: dict, n: int):
    """A long-context entry, keyed by int in memory and by str once read back from JSON."""
    return values.get(str(n), values.get(n))


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def write_markdown(result: dict, path: Path, units: dict[str, dict]) -> None:
    t, w = result["teacher"], result["sliding_window"]
    longs = sorted({int(n) for r in result["runs"] for n in r["student"].get("ppl_long", {})})
    texts = [(k, label) for k, label in TEXTS if any(r["student"].get(f"ppl_{k}") for r in result["runs"])]
    lines = [
        "# Conversion quality at equal distillation tokens",
        "",
        f"Teacher `{result['settings'].get('teacher')}`. Perplexity on each run's held-out text (its recipe's "
        "`data.heldout`: teacher-written text from openings never trained on, for the SmolLM2 recipes), on "
        "unseen TinyStories and on the Wizard of Oz (never trained on); ratios are student / reference (lower is "
        "better). The fine-tuned teacher keeps softmax and trains stage 2 exactly as the recipe does (same data "
        "and tokens); for a stage 2 on KL alone it is the teacher itself. "
        f"The sliding window is the teacher restricted to {w.get('window')} tokens + {w.get('sinks')} sinks, "
        "no training. MQAR and passkey: mean accuracy.",
        "",
        "Teacher: "
        + ", ".join(f"{label} ppl {fmt(t.get(f'ppl_{k}'))}" for k, label in texts)
        + "".join(f", {n} tokens {fmt(v)}" for n, v in sorted(t.get("ppl_long", {}).items()))
        + f"; MQAR {fmt(t.get('mqar'), '.2f')}, passkey {fmt(t.get('passkey'), '.2f')}.",
        f"Sliding window: held-out ppl {fmt(w.get('ppl_heldout'))}"
        + "".join(
            f", {n} tokens {fmt(v)}"
            for n, v in sorted(w.get("ppl_long", {}).items(), key=lambda i: int(i[0]))
        )
        + f"; MQAR {fmt(w.get('mqar'), '.2f')}, "
        f"passkey {fmt(w.get('passkey'), '.2f')}.",
        "",
        "| recipe | tokens | "
        + " | ".join(f"{label} ppl" for _, label in texts)
        + " | × teacher ("
        + " / ".join(label for _, label in texts)
        + ") | × fine-tuned teacher ("
        + " / ".join(label for _, label in texts)
        + ") | × sliding window (held-out) | "
        + "".join(f"× sliding window ({n}) | " for n in longs)
        + "".join(f"ppl {n} (× teacher) | " for n in longs)
        + "MQAR | passkey | wall time |",
        "|---|---:|"
        + "---:|" * len(texts)
        + "---:|---:|---:|"
        + "---:|" * 2 * len(longs)
        + "---:|---:|---:|",
    ]
    for r in sorted(result["runs"], key=lambda r: (r["budget"], r["student"]["ppl_heldout"])):
        s, xt, xf = r["student"], r["x_teacher"], r["x_finetuned_teacher"]
        ft = (
            " (= teacher)"
            if r["finetuned_teacher"]["is_teacher"]
            else ("" if r["finetuned_teacher"]["done"] else " (pending)")
        )
        seconds = r["seconds"].get("convert", 0) + sum(r["seconds"].get("evals", {}).values())
        cells = [
            f"`{r['recipe']}`",
            f"{r['tokens']['total']:,}",
            *(fmt(s.get(f"ppl_{k}")) for k, _ in texts),
            " / ".join(fmt(xt.get(k), ".2f") for k, _ in texts),
            " / ".join(fmt(xf.get(k), ".2f") for k, _ in texts) + ft,
            fmt(r["x_sliding_window"]["heldout"], ".2f"),
            *(fmt(long_value(r["x_sliding_window"]["long"], n), ".2f") for n in longs),
            *(
                f"{fmt(long_value(s['ppl_long'], n))} ({fmt(long_value(xt['long'], n), '.2f')})"
                for n in longs
            ),
            fmt(s.get("mqar"), ".2f"),
            fmt(s.get("passkey"), ".2f"),
            f"{seconds / 60:.0f} min",
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
    machines: dict[str, list[str]] = {}
    for name, unit in sorted(units.items()):
        m = unit.get("machine", {})
        bf16 = {True: ", bf16 instructions", False: ", no bf16 instructions"}.get(
            m.get("bf16_instructions"), ""
        )
        extra = " ".join(f"--set {k}={v}" for k, v in unit.get("settings", {}).get("set", {}).items())
        where = f"{m.get('cpu', '?')} ({m.get('threads', '?')} threads{bf16})" + (
            f" with `{extra}`" if extra else ""
        )
        machines.setdefault(where, []).append(name)
    lines += [
        "",
        f"Units: {len(units)} in `units/` (one JSON per recipe and budget, and per fine-tuned-teacher control); "
        "each names its commit, date, wall time and commands. Rebuild this table with "
        "`python benchmarks/quality.py --teacher <teacher> --results <this folder> --report-only`.",
        *(f"- {len(names)} unit(s) on {where}" for where, names in machines.items()),
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    texts = [(k, label) for k, label in TEXTS if result["teacher"].get(f"ppl_{k}") is not None]
    fig, axes = plt.subplots(1, len(texts), figsize=(6.5 * len(texts), 4.8), squeeze=False)
    recipes = list(dict.fromkeys(r["recipe"] for r in result["runs"]))
    for ax, (key, title) in zip(axes[0], texts):
        for name in recipes:
            rows = sorted(
                (r for r in result["runs"] if r["recipe"] == name), key=lambda r: r["tokens"]["total"]
            )
            ax.plot(
                [r["tokens"]["total"] for r in rows],
                [r["student"].get(f"ppl_{key}") for r in rows],
                "o-",
                label=name,
            )
            ft = [
                r for r in rows if not r["finetuned_teacher"]["is_teacher"] and r["finetuned_teacher"]["done"]
            ]
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
        if key == "heldout" and result["sliding_window"]:
            ax.axhline(
                result["sliding_window"]["ppl_heldout"],
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
    fig.suptitle(f"teacher {result['settings'].get('teacher')}", fontsize=9)
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
        "--train",
        default="",
        help="comma-separated training sources replacing the recipes' data.train: files, or teacher:<tokens> "
        "(text the teacher writes, shared by every recipe)",
    )
    p.add_argument(
        "--results", default=None, type=Path, help="where units and the report go (default: --out)"
    )
    p.add_argument(
        "--git-commit", action="store_true", help="commit each unit's JSON as soon as it is written"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the report from the units in --results, run nothing",
    )
    p.add_argument(
        "--wizard", default=None, help=f"second held-out text (default {WIZARD}, skipped when absent)"
    )
    p.add_argument(
        "--eval-quick", action="store_true", help="smoke-sized evaluation: few samples and windows"
    )
    p.add_argument(
        "--text-dir",
        default=REPO / "benchmarks" / "teacher-text",
        type=Path,
        help="where teacher-written text (teacher:<tokens>) is kept: committed, so every session and recipe "
        "trains and is scored on the same text",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every run, e.g. --set teacher.dtype=float32 --set train.precision=fp32 "
        "on a CPU without bf16 instructions",
    )
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    args = p.parse_args(argv)
    try:
        args.sets = parse_sets(args.sets)
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
        from linearize.config import teacher_text_tokens

        args.train = [
            t.strip() if teacher_text_tokens(t.strip()) else Path(t.strip()).expanduser()
            for t in args.train.split(",")
            if t.strip()
        ]
        missing = [str(t) for t in args.train if isinstance(t, Path) and not t.is_file()]
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
    args.results = (args.results or args.out).expanduser()
    return args


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """--set KEY=VALUE words -> {KEY: VALUE}; a word without `=` or a key given twice is a UsageError."""
    sets: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set takes KEY=VALUE (e.g. --set teacher.dtype=float32), got {pair!r}")
        if key in sets:
            raise UsageError(f"--set gives {key} twice")
        sets[key] = value
    return sets


def check_recipe(name: str, args) -> None:
    """`name` resolves with the data, teacher and every budget asked (a RecipeError or UsageError if not)."""
    from linearize.config import load_recipe

    common = {**data_overrides(args.train), **common_overrides(args)}
    recipe = load_recipe(name, {**common, "teacher.path": args.teacher})
    for budget in args.budgets:
        overrides, _ = scaled_stages(recipe, budget)
        load_recipe(name, {**common, **overrides})


def report(args) -> None:
    units = load_units(args.results)
    if not any(not u["control"] for u in units.values()):
        # no table yet: say so, rather than leave a report of units that are gone (superseded)
        args.results.mkdir(parents=True, exist_ok=True)
        for stale in ("quality.json", "quality_vs_tokens.png"):
            (args.results / stale).unlink(missing_ok=True)
        (args.results / "quality.md").write_text(
            "# Conversion quality at equal distillation tokens\n\nNo student unit in `units/` yet"
            + (f" ({len(units)} control unit(s))" if units else "")
            + ": run `benchmarks/quality.py` (see benchmarks/README.md).\n"
            + "".join(
                f"\nSee also `{sub}/`: {what}.\n"
                for sub, what in (
                    ("ablations", "recipe ablations at equal tokens (benchmarks/ablate.py)"),
                    ("superseded", "units whose recipe has changed since"),
                )
                if (args.results / sub).is_dir()
            )
        )
        print(f"[quality] no student unit in {args.results / 'units'} yet: quality.md says so")
        return
    result = collect(units)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "quality.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.results / "quality.md", units)
    plot(result, args.results / "quality_vs_tokens.png")
    print((args.results / "quality.md").read_text())
    print(f"[quality] wrote {args.results / 'quality.md'}, quality.json, quality_vs_tokens.png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only:
        return report(args)
    from linearize.checkpoint import is_complete
    from linearize.config import load_recipe

    runs, controls = plan_runs(args)
    context = teacher_context(args.teacher)
    logs = args.out / "logs"
    for run in runs:
        unit_file = args.results / "units" / f"{unit_name(run.recipe, run.budget, run.control)}.json"
        if unit_file.is_file() and not args.dry_run:
            print(f"[quality] {run.name}: unit done ({unit_file})")
            continue
        recipe = load_recipe(run.recipe, run.overrides)
        label = run.name
        convert = convert_command(args, run)
        commands = [shown(convert)]
        seconds = timings(run)
        if args.dry_run:
            print(shown(convert))
        elif is_complete(run.final):
            print(f"[quality] {label}: already converted ({run.final})")
        else:
            stem = run.run_dir.relative_to(args.out).as_posix().replace("/", "_")
            seconds["convert"] += execute(convert, logs / f"{stem}.convert.log", f"convert {label}")
            save_timings(run, seconds)
        if not args.dry_run:  # the export knows the context for sure
            context = (
                json.loads((run.final / "config.json").read_text()).get("max_position_embeddings") or context
            )
        for name, command in eval_commands(
            args, run, recipe.data.seq_len, context, recipe.data.train
        ).items():
            commands.append(shown(command))
            if args.dry_run:
                print(shown(command))
            elif (run.evals[name] / "results.json").is_file():
                print(f"[quality] {label}: eval {name} already done")
            else:
                stem = run.run_dir.relative_to(args.out).as_posix().replace("/", "_")
                log = logs / f"{stem}.eval-{name}.log"
                seconds["evals"][name] = execute(command, log, f"eval {name} of {label}")
                save_timings(run, seconds)
        if not args.dry_run:
            write_unit(args, run, controls.get((run.recipe, run.budget)), seconds, commands)
    if args.dry_run:
        if context is None:
            print(
                f"# long-context lengths {list(LONG_CONTEXTS)} are capped at the teacher's context once known"
            )
        return
    report(args)


if __name__ == "__main__":
    from linearize.host import keep_freed_memory

    keep_freed_memory()  # as the `linearize` command does
    main()
