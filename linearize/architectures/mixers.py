"""Mixers: what sits in `layer.self_attn` of a converted model.

A mixer is built from the teacher's attention module: it takes over its projections, q/k norms and
attributes (so state-dict keys stay the teacher's), adds its own small parameters, and keeps the
teacher attention's class to compute softmax attention with the same weights when asked.
`forward` has the teacher attention's signature and returns `(output, None)`, so decoder layers are
untouched.

Modes (set with `set_mode`):
- "student": the mixer's own math.
- "teacher": softmax attention through the teacher class's own forward (same weights).
- "align":   stage 1 — returns the teacher output (so every layer sees the teacher's input) and
             records MSE(student output, teacher output) in `alignment_loss`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .feature_maps import FEATURE_MAP_CLASSES
from .ops import linear_attn

MODES = ("student", "teacher", "align")


class Mixer(nn.Module):
    """Base class: owns the teacher attention's submodules and attributes, not the teacher module."""

    def __init__(self, teacher_attn: nn.Module, spec: dict[str, Any]):
        super().__init__()
        self.teacher_cls = type(teacher_attn)
        for name, child in teacher_attn.named_children():
            self.add_module(name, child)
        for name, value in vars(teacher_attn).items():
            if not name.startswith("_") and name != "training" and not isinstance(value, nn.Module):
                setattr(self, name, value)
        self.spec = dict(spec)
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.mode = "student"
        self.alignment_loss: torch.Tensor | None = None

    def new_parameter_names(self) -> list[str]:
        """Names (relative to this module) of parameters the teacher did not have."""
        return []

    def softmax_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        """The teacher's attention, computed by its own class with this mixer's weights."""
        return self.teacher_cls.forward(
            self, hidden_states, position_embeddings, attention_mask, cache, **kwargs
        )

    def student_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        raise NotImplementedError

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if self.mode == "teacher":
            return self.softmax_forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        if self.mode == "align":
            with torch.no_grad():
                target, _ = self.softmax_forward(
                    hidden_states, position_embeddings, attention_mask, None, **kwargs
                )
            out = self.student_forward(hidden_states, position_embeddings, attention_mask, None, **kwargs)
            self.alignment_loss = torch.nn.functional.mse_loss(out.float(), target.float())
            return target, None
        return self.student_forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs), None


class SoftmaxMixer(Mixer):
    """The teacher's softmax attention, unchanged (layers a plan keeps)."""

    def student_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        return self.softmax_forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)[0]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if self.mode == "align":  # nothing to align: pass the teacher output on
            self.alignment_loss = None
            return self.softmax_forward(hidden_states, position_embeddings, attention_mask, None, **kwargs)
        return self.softmax_forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)


class LinearMixer(Mixer):
    """Normalised causal linear attention over feature-mapped q and k (after RoPE), GQA-aware.

    out_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps).
    Decoding keeps one fixed-size state per layer: [batch, heads, feature_dim, head_dim + 1], whose last
    column is the running key sum of the normaliser.
    """

    def __init__(self, teacher_attn: nn.Module, spec: dict[str, Any]):
        super().__init__(teacher_attn, spec)
        fmap = FEATURE_MAP_CLASSES[spec["feature_map"]]
        self.feature_map_q = fmap(self.num_heads, self.head_dim)
        self.feature_map_k = fmap(self.num_kv_heads, self.head_dim)
        self.eps = float(spec.get("eps", 1e-6))
        self.impl = spec.get("impl", "auto")

    def new_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(("feature_map_q.", "feature_map_k."))]

    def student_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        batch, seq = hidden_states.shape[:2]
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim)
        if getattr(self, "q_norm", None) is not None:  # Qwen3's per-head RMSNorm
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # [B, T, H, D] layout
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        padding_mask = kwargs.get("padding_mask")
        if padding_mask is not None:  # padded keys must not enter the state or the normaliser
            fk = fk * padding_mask[:, -seq:, None, None].to(fk.dtype)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            fk = fk.repeat_interleave(groups, dim=2)
            v = v.repeat_interleave(groups, dim=2)
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        out, final_state = linear_attn(
            fq,
            fk,
            v,
            scale=1.0,
            normalize=True,
            eps=self.eps,
            initial_state=state,
            output_final_state=cache is not None,
            impl=self.impl,
        )
        if cache is not None:
            cache.update_recurrent_state(final_state, self.layer_idx)
            # transformers marks a state as present only when a conv state is written; we have none
            cache.layers[self.layer_idx].has_previous_state[0] = True
        return self.o_proj(out.reshape(batch, seq, -1).to(hidden_states.dtype))


MIXER_CLASSES: dict[str, type[Mixer]] = {"linear": LinearMixer, "softmax": SoftmaxMixer}


def build_mixer(teacher_attn: nn.Module, spec: dict[str, Any]) -> Mixer:
    """The mixer named by `spec["mixer"]`, built from a teacher attention module."""
    return MIXER_CLASSES[spec["mixer"]](teacher_attn, spec)


def layer_mixer_name(spec: dict[str, Any], layer_idx: int) -> str:
    return "softmax" if layer_idx in spec.get("softmax_layers", []) else spec["mixer"]


def apply_plan(layers: nn.ModuleList, spec: dict[str, Any]) -> None:
    """Replace each decoder layer's `self_attn` by the mixer the plan gives it (in place).

    Runs at conversion and again when a converted checkpoint is loaded, so both build the same model.
    """
    for idx, layer in enumerate(layers):
        attn = layer.self_attn
        if isinstance(attn, Mixer):
            raise ValueError(
                f"layer {idx} is already converted ({type(attn).__name__}); convert the teacher once"
            )
        layer.self_attn = build_mixer(attn, {**spec, "mixer": layer_mixer_name(spec, idx)})


def mixers(model: nn.Module) -> list[Mixer]:
    return [m for m in model.modules() if isinstance(m, Mixer)]


@contextmanager
def mode(model: nn.Module, name: str) -> Iterator[list[Mixer]]:
    """Temporarily put every mixer of `model` in mode `name`; yields the mixers."""
    if name not in MODES:
        raise ValueError(f"unknown mixer mode {name!r}; known: {', '.join(MODES)}")
    found = mixers(model)
    previous = [m.mode for m in found]
    for m in found:
        m.mode = name
    try:
        yield found
    finally:
        for m, prev in zip(found, previous):
            m.mode = prev
