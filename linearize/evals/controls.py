"""Controls: what a conversion must beat to be worth its training.

- `window`: the zero-training baseline — the stock teacher restricted to a sliding window of `window`
  tokens plus the first `sinks` tokens (attention sinks), through an explicit 4D boolean attention
  mask (no patching). It is scored on perplexity and recall next to teacher and student; a student
  that does not beat it is flagged in the report.
- `branches`: per-branch controls of a hybrid student (window only / linear only / no attention): while
  one is scored, each hybrid mixer (`window_linear`, `gated` with a window) stands in `layer.self_attn`
  behind a `BranchControl` that runs that branch alone; see `hybrid_branch_controls`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from linearize.evals import EvalError
from linearize.evals.context import (
    BRANCHES,
    HYBRID_MIXERS,
    Scorer,
    is_hybrid,
    sliding_window_mask,  # noqa: F401  (part of this module's interface)
    window_scorer,
)
from linearize.evals.perplexity import ppl_blocks, scorer_perplexity
from linearize.evals.recall import recall_scores

if TYPE_CHECKING:
    from linearize.evals.context import EvalContext


def window_control(ctx: EvalContext) -> dict:
    s = ctx.settings
    blocks, meta = ppl_blocks(ctx)
    scorers = [ctx.teacher, ctx.student, window_scorer(ctx)]
    ppl = {"meta": meta, **{sc.name: scorer_perplexity(sc, blocks, s.batch_size) for sc in scorers}}
    recall = recall_scores(ctx, scorers)
    student, window = "student", "sliding_window"
    beats = {
        "ppl": ppl[student]["ppl"] < ppl[window]["ppl"],
        "mqar": (recall["mqar"][student]["mean"] or 0) > (recall["mqar"][window]["mean"] or 0),
        "passkey": (recall["passkey"][student]["mean"] or 0) > (recall["passkey"][window]["mean"] or 0),
    }
    return {
        "window": s.window,
        "sinks": s.sinks,
        "ppl": ppl,
        "recall": recall,
        "student_beats_window": beats,
        "verdict": "student beats the sliding-window baseline on "
        + (", ".join(k for k, v in beats.items() if v) or "nothing")
        + (
            ""
            if all(beats.values())
            else "; it does NOT beat it on " + ", ".join(k for k, v in beats.items() if not v)
        ),
    }


def hybrid_branch_controls(ctx: EvalContext) -> dict:
    """Per-branch controls of a hybrid student: the student with only its window branch, only its linear
    branch, and with no attention at all, scored on the student's metrics (held-out perplexity, MQAR and
    passkey accuracy) next to the whole student. A student that does not beat each of its own branches on
    perplexity is flagged (`student_beats_branches`, `verdict`): the other branch then adds nothing.

    Each branch runs through the hybrid mixers' `forward_branch` (see `branch_control`); a student without
    a window branch is an error.
    """
    mixer = ctx.student_plan.get("mixer")
    if not is_hybrid(ctx.student_plan):
        raise EvalError(
            f"controls for hybrid branches need a hybrid student ({' or '.join(HYBRID_MIXERS)}); this "
            f"student's mixer is {mixer!r}. Run controls=window for the sliding-window baseline."
        )
    blocks, meta = ppl_blocks(ctx)
    scorers = [ctx.student] + [Scorer(b, ctx.student.model, branch=b) for b in BRANCHES]
    recall = recall_scores(ctx, scorers)
    out = {"meta": meta}
    for sc in scorers:
        out[sc.name] = {
            **scorer_perplexity(sc, blocks, ctx.settings.batch_size),
            "mqar": recall["mqar"][sc.name]["mean"],
            "passkey": recall["passkey"][sc.name]["mean"],
        }
    student = out[ctx.student.name]["ppl"]
    beats = {b: student < out[b]["ppl"] for b in BRANCHES}
    out["student_beats_branches"] = beats
    out["verdict"] = (
        "the student beats each of its branches alone on perplexity"
        if all(beats.values())
        else "the student does NOT beat its "
        + ", ".join(b for b, v in beats.items() if not v)
        + " control on perplexity: the other branch adds nothing there"
    )
    return out


CONTROLS = {"window": window_control, "branches": hybrid_branch_controls}


def controls_task(ctx: EvalContext) -> dict:
    """The controls named in settings.controls, each next to teacher and student."""
    asked = list(ctx.settings.controls)
    hybrid = is_hybrid(ctx.student_plan)
    if hybrid and "branches" not in asked:
        asked.append("branches")
    return {name: CONTROLS[name](ctx) for name in asked}
