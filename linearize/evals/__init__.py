"""Evaluation: teacher and student side by side, one report (markdown + PNG plots + results.json).

`TASKS` is a lazy table (name -> "module:function"), so naming or validating a task imports neither
torch nor lm-eval. Every task function takes an `EvalContext` (see `harness.py`) and returns a dict of
plain numbers keyed by model name. `lm_eval:<task>` runs any lm-evaluation-harness task (optional
extra `linearize[eval]`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from linearize.errors import LinearizeError
from linearize.registry import EVAL_TASKS as TASKS
from linearize.registry import LM_EVAL_PREFIX, LM_EVAL_TASK, is_eval_task

__all__ = ["LM_EVAL_PREFIX", "TASKS", "EvalError", "check_task_name", "resolve_task"]


class EvalError(LinearizeError, ValueError):
    """An evaluation that cannot run: the message says what is wrong and what would be valid."""


def check_task_name(name: str) -> None:
    """Raise `EvalError` listing the known tasks when `name` is not one of them."""
    if is_eval_task(name):
        return
    raise EvalError(
        f"unknown eval task {name!r}; known: {', '.join(TASKS)}, or {LM_EVAL_PREFIX}<lm-eval task name>"
    )


def resolve_task(name: str) -> Callable:
    """The function that runs task `name` (imported on first use)."""
    check_task_name(name)
    if name.startswith(LM_EVAL_PREFIX):
        module, obj = LM_EVAL_TASK.split(":")
        return functools.partial(
            getattr(importlib.import_module(module), obj), task=name[len(LM_EVAL_PREFIX) :]
        )
    module, obj = TASKS[name].split(":")
    return getattr(importlib.import_module(module), obj)
