"""`lm_eval:<task>`: any lm-evaluation-harness task, run by lm-eval's own API on the in-memory models.

`HFLM(pretrained=<model>, tokenizer=<tokenizer>, backend="causal")` wraps each model, and
`simple_evaluate` runs the task with a `TaskManager` that includes the task folder shipped here
(`linearize/evals/tasks`, local JSONL data, offline) plus any `lm_eval_include` folders. Built-in lm-eval
tasks download their data from the Hub, so offline only local-data tasks run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from linearize.assets import package_folder
from linearize.evals import EvalError

if TYPE_CHECKING:
    from linearize.evals.context import EvalContext


def shipped_tasks_folder() -> Path:
    """The folder of lm-eval task YAMLs shipped with linearize (pass it to `--include_path`)."""
    return package_folder("evals") / "tasks"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError(
            "lm_eval:<task> needs lm-evaluation-harness, an optional extra: pip install linearize[eval]"
        ) from None
    return lm_eval, HFLM, TaskManager


def numbers(metrics: dict) -> dict:
    """lm-eval's metric entries ("acc,none": 0.5, "acc_stderr,none": ...) as {name: float}. Only "metric,filter"
    keys are metrics: bookkeeping numbers beside them ("sample_len", the count of documents) are left out."""
    out = {}
    for key, value in metrics.items():
        if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key.replace(",none", "")] = float(value)
    return out


def lm_eval_task(ctx: EvalContext, task: str) -> dict:
    """Metrics of `task` for teacher and student (same lm-eval version, settings and documents)."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    s = ctx.settings
    manager = TaskManager(include_path=[str(shipped_tasks_folder()), *s.lm_eval_include])
    if task not in manager.all_tasks:
        raise EvalError(
            f"lm-eval knows no task {task!r}; shipped offline tasks: "
            f"{', '.join(sorted(p.stem for p in shipped_tasks_folder().glob('*/*.yaml')))}"
        )
    out = {
        "task": task,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "limit": s.lm_eval_limit,
    }
    for scorer in ctx.scorers:
        lm = HFLM(
            pretrained=scorer.model,
            tokenizer=ctx.tokenizer,
            backend="causal",
            batch_size=s.batch_size,
            max_length=ctx.context_length,
            device=str(scorer.device),
        )
        result = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            limit=s.lm_eval_limit or None,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=s.seed,
            numpy_random_seed=s.seed,
            torch_random_seed=s.seed,
            fewshot_random_seed=s.seed,
        )
        out[scorer.name] = {name: numbers(m) for name, m in result["results"].items()}
    return out
