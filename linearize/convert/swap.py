"""Module swap: turn a loaded teacher into a student, in place.

The plan (a plain dict, stored in the converted config as `linearize`) says which mixer each layer
gets; `apply_plan` is the same function the converted checkpoint's model class runs when it loads.
"""

from __future__ import annotations

from torch import nn

from linearize.architectures.mixers import apply_plan
from linearize.config import RecipeError, StudentConfig, parse_layer_plan
from linearize.convert.teachers import family_of


def plan_for(student: StudentConfig, teacher_config) -> dict:
    """The conversion plan for this teacher, its layer plan resolved against the number of layers.

    `student.mixer=softmax` with `layers=all` keeps every layer softmax: the teacher itself, trained by
    stage logits alone (the fine-tuned-teacher control). Any other mixer must convert at least one layer.

    An `auto:N` plan starts with every layer converted (`softmax_layers` empty) and records N as
    `auto_softmax`; the pipeline fills `softmax_layers` and `layer_ranking` after stage 1."""
    family = family_of(teacher_config)
    n = teacher_config.num_hidden_layers
    kind, arg = parse_layer_plan(student.layers)
    if student.mixer == "softmax" and kind != "all":
        raise RecipeError(
            f"student.mixer=softmax keeps every layer's softmax attention (the fine-tuned-teacher control), so "
            f"student.layers must be `all`, got {student.layers!r}"
        )
    auto = 0
    if kind == "list":
        bad = [i for i in arg if i >= n]
        if bad:
            raise RecipeError(f"student.layers {bad} out of range: the teacher has {n} layers (0..{n - 1})")
        kept = arg
    elif kind == "every":
        kept = [i for i in range(n) if i % arg == arg - 1]
    elif kind == "auto":
        if arg >= n:
            raise RecipeError(
                f"student.layers=auto:{arg} would keep every layer of this {n}-layer teacher as softmax; "
                f"use auto:N with N < {n}"
            )
        kept, auto = [], arg
    else:
        # the control keeps every layer, and says so: the exported config's layer types and cache follow
        kept = list(range(n)) if student.mixer == "softmax" else []
    if len(kept) == n and student.mixer != "softmax":
        raise RecipeError(
            f"student.layers={student.layers!r} keeps all {n} layers as softmax, so nothing is converted"
        )
    plan = {
        "teacher_model_type": family.model_type,
        "mixer": student.mixer,
        "feature_map": student.feature_map,
        "feature_dim": student.feature_dim,
        "feature_bias": student.feature_bias,
        "layers": student.layers,
        "softmax_layers": kept,
        "eps": student.eps,
        "impl": student.impl,
        "window": student.window,
        "window_factor_init": student.window_factor_init,
        "gated_window": student.gated_window,
        "num_slots": student.num_slots,
    }
    if auto:
        plan["auto_softmax"] = auto
    return plan


def swap(model: nn.Module, plan: dict) -> nn.Module:
    """Replace every decoder layer's `self_attn` of a *ForCausalLM teacher by its planned mixer."""
    family_of(model.config)
    apply_plan(model.model.layers, plan)
    # The in-memory student still runs the family's stock forward, whose cache has no recurrent-state
    # layers; it computes without a cache. The exported model class (modeling_linearize) has both.
    model.config.use_cache = False
    if model.generation_config is not None:
        model.generation_config.use_cache = False
    return model
