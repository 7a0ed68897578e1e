"""The harness: load teacher and student, run the asked tasks over both, write one report.

`evaluate()` is what `linearize eval` and the end of `linearize convert` call. Models are wrapped in a
`Scorer` (a name, a model and an optional 4D attention mask), so a task scores the teacher, the student
and the controls' sliding-window teacher with the same code.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from linearize.convert.teachers import load_teacher
from linearize.evals import EvalError, check_task_name, resolve_task
from linearize.evals.context import STUDENT, TEACHER, EvalContext, EvalSettings, Scorer
from linearize.evals.report import write_report

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["EvalContext", "EvalSettings", "Scorer", "evaluate", "load_student"]


def pick_device(name: str) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def read_recipe(folder: Path) -> dict | None:
    import yaml

    path = folder / "recipe.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def load_student(
    path: str | Path, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict | None]:
    """(model, tokenizer, recipe dict or None) of an exported converted checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise EvalError(
            f"model folder {folder} does not exist or has no config.json; give model=<exported folder> "
            f"(the `final` folder of a `linearize convert` run)"
        )
    config = AutoConfig.from_pretrained(folder)
    if not getattr(config, "linearize", None):
        raise EvalError(
            f"{folder} is not a converted checkpoint (its config has no `linearize` section); "
            f"give model=<folder written by linearize convert>"
        )
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder), read_recipe(folder)


def load_teacher_for(
    path: str, dtype: str, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:

    model, tokenizer = load_teacher(path, dtype)
    return model.to(device).eval(), tokenizer


def check_same_vocab(
    teacher: PreTrainedModel,
    teacher_tok: PreTrainedTokenizerBase,
    student: PreTrainedModel,
    student_tok: PreTrainedTokenizerBase,
) -> None:
    """Teacher and student must share a tokenizer, or no number of the report is comparable."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise EvalError(
            f"teacher vocab mismatch: the teacher has {tv} tokens, the student {sv}; give the teacher the "
            f"student was converted from (teacher=<path>)"
        )
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise EvalError(
            "teacher vocab mismatch: teacher and student tokenizers differ; give the teacher the student "
            "was converted from (teacher=<path>)"
        )


def run_info(ctx: EvalContext, model_path: str, teacher_path: str) -> dict:
    """Recipe, token budget, the run's own eval.json and the hardware, for the report's header."""
    info: dict[str, Any] = {
        "model": str(model_path),
        "teacher": teacher_path,
        "student_plan": ctx.student_plan,
        "device": str(ctx.student.device),
        "device_name": torch.cuda.get_device_name(ctx.student.device)
        if ctx.student.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": dataclasses.asdict(ctx.settings),
    }
    if ctx.recipe:
        info["recipe"] = ctx.recipe
        stages = ctx.recipe.get("stages", {})
        seq_len = ctx.recipe.get("data", {}).get("seq_len", 0)
        info["token_budget_per_process"] = {
            name: s.get("steps", 0) * s.get("batch_size", 0) * s.get("grad_accum", 1) * seq_len
            for name, s in stages.items()
        }
    if ctx.run_dir is not None and (ctx.run_dir / "eval.json").is_file():
        info["run_eval"] = json.loads((ctx.run_dir / "eval.json").read_text())
    if ctx.run_dir is not None and (ctx.run_dir / "metrics.jsonl").is_file():  # the loss curves
        lines = (ctx.run_dir / "metrics.jsonl").read_text().splitlines()
        info["training"] = [
            {k: r[k] for k in ("stage", "step", "loss", "tokens") if k in r} for r in map(json.loads, lines)
        ]
    return info


def evaluate(
    model: str | Path,
    tasks: list[str],
    out: str | Path | None = None,
    teacher: str | None = None,
    settings: EvalSettings | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run `tasks` over the student at `model` and its teacher; write the report to `out`.

    The teacher is `teacher` when given, else the `teacher.path` of the student's recipe.yaml.
    Returns the results dict (what results.json holds).
    """

    settings = settings or EvalSettings()
    if not tasks:
        raise EvalError("no eval tasks given; e.g. tasks=ppl,recall,cloze,speed,controls")
    for name in tasks:
        check_task_name(name)
    runners = {name: resolve_task(name) for name in tasks}
    device = pick_device(settings.device)
    student, student_tok, recipe = load_student(model, device)
    if teacher is None:
        teacher = (recipe or {}).get("teacher", {}).get("path")
        if not teacher:
            raise EvalError(f"{model} has no recipe.yaml naming its teacher; give teacher=<path or hub id>")
    dtype = (recipe or {}).get("teacher", {}).get("dtype", "float32")
    teacher_model, teacher_tok = load_teacher_for(teacher, dtype, device)
    check_same_vocab(teacher_model, teacher_tok, student, student_tok)
    folder = Path(model)
    ctx = EvalContext(
        teacher=Scorer(TEACHER, teacher_model),
        student=Scorer(STUDENT, student),
        tokenizer=student_tok,
        settings=settings,
        recipe=recipe,
        run_dir=folder.resolve().parent
        if recipe and (folder.resolve().parent / "recipe.yaml").is_file()
        else None,
    )
    previous_threads = torch.get_num_threads()
    if device.type == "cpu" and settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    try:
        results: dict[str, Any] = {"info": run_info(ctx, str(model), teacher), "tasks": {}}
        for name, run in runners.items():
            began = time.perf_counter()
            log(f"[eval] {name} ...")
            results["tasks"][name] = run(ctx)
            results["tasks"][name]["seconds"] = round(time.perf_counter() - began, 2)
            log(f"[eval] {name} done in {results['tasks'][name]['seconds']:.1f}s")
    finally:
        torch.set_num_threads(previous_threads)
    if out is None:
        out = folder.resolve().parent / "report"
    results["info"]["report"] = str(out)
    write_report(results, Path(out))
    return results
