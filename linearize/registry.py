"""The names a recipe may choose (mixers, feature maps, eval tasks) and where each is implemented.

Lazy tables (name -> "module:object"): naming or validating a choice imports neither torch nor lm-eval,
so the recipe schema (`linearize.config`) checks them without depending on the packages that implement
them; `linearize.architectures.resolve` and `linearize.evals.resolve_task` import on first use.
"""

from __future__ import annotations

MIXERS: dict[str, str] = {
    "linear": "linearize.architectures.mixers:LinearMixer",
    "softmax": "linearize.architectures.mixers:SoftmaxMixer",
    "window_linear": "linearize.architectures.mixers:WindowLinearMixer",
    "gated": "linearize.architectures.mixers:GatedMixer",
    "gated_slot": "linearize.architectures.mixers:GatedSlotMixer",
    "gated_delta": "linearize.architectures.mixers:GatedDeltaMixer",
}
FEATURE_MAPS: dict[str, str] = {
    "hedgehog": "linearize.architectures.feature_maps:Hedgehog",
    "t2r": "linearize.architectures.feature_maps:T2R",
    "elu": "linearize.architectures.feature_maps:EluPlusOne",
    "relu": "linearize.architectures.feature_maps:Relu",
}
LEARNED_FEATURE_MAPS = ("hedgehog", "t2r")
"""Feature maps with a learned projection (the ones `student.settings.feature_dim` / `feature_bias` apply to)."""

EVAL_TASKS: dict[str, str] = {
    "ppl": "linearize.evals.perplexity:ppl_task",
    "recall": "linearize.evals.recall:recall_task",
    "cloze": "linearize.evals.cloze:cloze_task",
    "speed": "linearize.evals.speed:speed_task",
    "controls": "linearize.evals.controls:controls_task",
}
LM_EVAL_PREFIX = "lm_eval:"
"""`lm_eval:<task>` runs any lm-evaluation-harness task (optional extra `linearize[eval]`) ..."""
LM_EVAL_TASK = "linearize.evals.lmeval:lm_eval_task"
"""... through this function."""


def is_eval_task(name: str) -> bool:
    return name in EVAL_TASKS or (name.startswith(LM_EVAL_PREFIX) and len(name) > len(LM_EVAL_PREFIX))
