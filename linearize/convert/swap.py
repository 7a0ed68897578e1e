"""Module swap: turn a loaded teacher into a student, in place.

The plan (a plain dict, stored in the converted config as `linearize`) says which mixer each layer
gets; `apply_plan` is the same function the converted checkpoint's model class runs when it loads.
"""

from __future__ import annotations

from torch import nn

from linearize.architectures.mixers import apply_plan
from linearize.config import RecipeError, StudentConfig
from linearize.convert.teachers import family_of


def plan_for(student: StudentConfig, teacher_config) -> dict:
    """The conversion plan for this teacher, validated against its number of layers."""
    family = family_of(teacher_config)
    n = teacher_config.num_hidden_layers
    bad = [i for i in student.softmax_layers if i >= n]
    if bad:
        raise RecipeError(
            f"student.softmax_layers {bad} out of range: the teacher has {n} layers (0..{n - 1})"
        )
    return {
        "teacher_model_type": family.model_type,
        "mixer": student.mixer,
        "feature_map": student.feature_map,
        "softmax_layers": sorted(set(student.softmax_layers)),
        "eps": student.eps,
        "impl": student.impl,
        "window": student.window,
        "window_factor_init": student.window_factor_init,
    }


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
