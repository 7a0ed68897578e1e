"""Module swap: build the student from a loaded teacher, sharing the teacher's weights.

The plan (`Plan`, stored in the converted config as the plain dict `plan.spec()` under `linearize`) says
which mixer each layer gets; `apply_plan` is the same function the converted checkpoint's model class runs
when it loads.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from linearize.architectures.mixers import apply_plan
from linearize.config import MixerSettings, RecipeError, StudentConfig, parse_layer_plan
from linearize.convert.teachers import family_of


@dataclass
class Plan:
    """What the swap does to a teacher: the mixer and its settings, and which layers keep softmax.

    `spec()` is the plain dict the converted config stores as `linearize` and the checkpoint's own code
    (`linearize.architectures.mixers.apply_plan`) reads when it loads, where linearize is not installed."""

    teacher_model_type: str
    mixer: str
    settings: MixerSettings
    layers: str | list[int]
    """The recipe's layer plan as written (`all`, a list, `every:K`, `auto:N`)."""
    softmax_layers: list[int]
    """Layers that keep the teacher's softmax attention (resolved; an `auto:N` plan fills it after stage 1)."""
    impl: str
    auto_softmax: int = 0
    """`auto:N`: N, until `softmax_layers` is chosen from `layer_ranking`."""
    layer_ranking: list[dict] = field(default_factory=list)
    """`auto:N`: every converted layer's stage-1 alignment loss, highest first."""

    def spec(self) -> dict[str, Any]:
        spec = {
            "teacher_model_type": self.teacher_model_type,
            "mixer": self.mixer,
            **dataclasses.asdict(self.settings),
            "layers": self.layers,
            "softmax_layers": list(self.softmax_layers),
            "impl": self.impl,
        }
        if self.auto_softmax:
            spec["auto_softmax"] = self.auto_softmax
        if self.layer_ranking:
            spec["layer_ranking"] = self.layer_ranking
        return spec


def plan_for(student: StudentConfig, teacher_config: PretrainedConfig) -> Plan:
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
    return Plan(
        teacher_model_type=family.model_type,
        mixer=student.mixer,
        settings=copy.deepcopy(student.settings),
        layers=copy.deepcopy(student.layers),
        softmax_layers=kept,
        impl=student.impl,
        auto_softmax=auto,
    )


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that holds the very same parameter and buffer objects (no weight is
    copied): a change to the copy's structure leaves `model` as it was."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def weight_sharing_view(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` whose new parameter objects hold the very same tensors (no weight is copied):
    a placement that shards it (FSDP2, ZeRO-3 replace or empty each parameter's data) leaves `model` whole."""
    memo: dict[int, object] = {id(p): nn.Parameter(p.data, requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo).requires_grad_(False).eval()


def swap(teacher: nn.Module, plan: Plan) -> nn.Module:
    """The student of a *ForCausalLM teacher: a copy of it sharing every weight, each decoder layer's
    `self_attn` replaced by its planned mixer (built on the copy's projections). `teacher` stays the
    teacher: it computes the teacher's outputs with the student's frozen weights at no memory cost, as long
    as the student trains none of them (stage attention, LoRA)."""
    family_of(teacher.config)
    student = shared_copy(teacher)
    apply_plan(student.model.layers, plan.spec())
    # The in-memory student still runs the family's stock forward, whose cache has no recurrent-state
    # layers; it computes without a cache. The exported model class (modeling_linearize) has both.
    student.config.use_cache = False
    if student.generation_config is not None:
        student.generation_config.use_cache = False
    return student
