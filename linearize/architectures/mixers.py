"""Mixers: what sits in `layer.self_attn` of a converted model.

A mixer is built from the teacher's attention module: it takes over its projections, q/k norms and
attributes (so state-dict keys stay the teacher's), adds its own small parameters, and keeps the
teacher attention's class to compute softmax attention with the same weights when asked.
`forward` has the teacher attention's signature and returns `(output, None)`, so decoder layers are
untouched.

Modes (set with `mode(model, name)`):
- "student": the mixer's own math.
- "teacher": softmax attention through the teacher class's own forward (same weights).
- "align":   stage 1 — returns the teacher output (so every layer sees the teacher's input) and
             records MSE(student output, teacher output) in `alignment_loss`.
- "window_only", "linear_only", "no_attention": branch controls of `WindowLinearMixer` (see its
             docstring); kept softmax layers stay softmax, any other mixer refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .feature_maps import FEATURE_MAP_CLASSES
from .ops import WindowLinearState, linear_attn, window_linear, window_linear_step

CONTROL_MODES = ("window_only", "linear_only", "no_attention")
MODES = ("student", "teacher", "align", *CONTROL_MODES)


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

    supported_modes: tuple[str, ...] = ("student", "teacher", "align")

    def new_parameter_names(self) -> list[str]:
        """Names (relative to this module) of parameters the teacher did not have."""
        return []

    def rotary_qkv(self, hidden_states, position_embeddings):
        """q: [B, T, H, D], k, v: [B, T, H_kv, D] after the teacher's q/k norms and RoPE."""
        batch, seq = hidden_states.shape[:2]
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim)
        if getattr(self, "q_norm", None) is not None:  # Qwen3's per-head RMSNorm
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # [B, T, H, D] layout
        return q, k, v

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
    """The teacher's softmax attention, unchanged (layers a plan keeps); the branch controls leave it be."""

    supported_modes = MODES

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
        q, k, v = self.rotary_qkv(hidden_states, position_embeddings)
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


class WindowLinearMixer(Mixer):
    """LoLCATs' hybrid attention: softmax over the last W tokens plus feature-mapped linear attention over
    the older ones, with one shared normaliser and a learned per-head mix w = sigmoid(window_factor_logit):

        o_t = (w sum_{window} e^{s_ts - m_t} v_s + (1-w) sum_{older} phi(q_t).phi(k_s) v_s) / (same, v_s = 1)

    (op `window_linear`, see linearize/kernels/window_linear/README.md). q and k are taken after q/k norms
    and RoPE for both parts. Decoding keeps a fixed-size `WindowLinearState` per layer (W window slots and
    one [F, V+1] state per head) as the five recurrent states of the layer's cache entry
    (`config.number_of_conv_states` = 5, see `configuration_linearize.linearized_cache_fields`).

    Padded keys (`padding_mask` = 0) enter neither part: their feature keys are zeroed, and their softmax
    scores get PAD_SCORE through one extra q/k column (q: 1/scale, k: 0 or PAD_SCORE), which also travels
    in the cached window slots. A finite score rather than -inf: a padded query whose window holds only
    padded keys gets a finite (unused) output instead of NaN, and e^PAD_SCORE is exactly 0 in float32 for
    every real query, whose window always holds its own key. The column is added only where padding or a
    cache can occur (not in training on packed blocks), and exactly 0 for real keys.

    Branch controls (modes), for the evals' `controls` task:
    - "window_only": the window branch alone (w = 1): the same op with phi(q) = 0, so the output is the
      windowed softmax up to eps / w in the denominator.
    - "linear_only": the linear branch alone over ALL keys s <= t (the window's keys included), i.e. the
      `linear` mixer's normalised linear attention with these feature maps.
    - "no_attention": zeros before o_proj, i.e. o_proj(0) (o_proj's bias where it has one).
    A cache belongs to the mode that filled it; linear_only keeps its state in recurrent state 0.
    """

    supported_modes = MODES
    PAD_SCORE = -30000.0  # representable in fp16/bf16; e^(PAD_SCORE - m) underflows to 0
    num_states = len(WindowLinearState._fields)

    def __init__(self, teacher_attn: nn.Module, spec: dict[str, Any]):
        super().__init__(teacher_attn, spec)
        fmap = FEATURE_MAP_CLASSES[spec["feature_map"]]
        self.feature_map_q = fmap(self.num_heads, self.head_dim)
        self.feature_map_k = fmap(self.num_kv_heads, self.head_dim)
        self.window = int(spec.get("window", 64))
        init = float(spec.get("window_factor_init", 0.5))
        self.window_factor_logit = nn.Parameter(torch.full((self.num_heads,), math.log(init / (1 - init))))
        self.eps = float(spec.get("eps", 1e-6))
        self.impl = spec.get("impl", "auto")
        self.softmax_scale = float(getattr(self, "scaling", self.head_dim**-0.5))

    def new_parameter_names(self) -> list[str]:
        return [
            n
            for n, _ in self.named_parameters()
            if n.startswith(("feature_map_q.", "feature_map_k.")) or n == "window_factor_logit"
        ]

    def cached_state(self, cache) -> WindowLinearState | None:
        if cache is None:
            return None
        layer = cache.layers[self.layer_idx]
        if getattr(layer, "number_of_states", 0) < self.num_states:
            raise ValueError(
                f"layer {self.layer_idx}: the window_linear mixer keeps {self.num_states} recurrent states, but "
                f"its cache layer {type(layer).__name__} has {getattr(layer, 'number_of_states', 0)}; build the "
                f"cache from a converted config (config.number_of_conv_states = {self.num_states})"
            )
        parts = [cache.get_recurrent_state(self.layer_idx, i) for i in range(self.num_states)]
        return None if parts[0] is None else WindowLinearState(*parts)

    def store_state(self, cache, state) -> None:
        for i, part in enumerate(state):
            cache.update_recurrent_state(part, self.layer_idx, i)
            # transformers marks a state as present only when a conv state is written; we have none
            cache.layers[self.layer_idx].has_previous_state[i] = True

    def student_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        batch, seq = hidden_states.shape[:2]
        if self.mode == "no_attention":
            return self.o_proj(hidden_states.new_zeros(batch, seq, self.num_heads * self.head_dim))
        q, k, v = self.rotary_qkv(hidden_states, position_embeddings)
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        padding_mask = kwargs.get("padding_mask")
        keep = None if padding_mask is None else padding_mask[:, -seq:].bool()
        if keep is not None:  # padded keys must not enter the state or the normaliser
            fk = fk * keep[:, :, None, None].to(fk.dtype)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, fk, v = (x.repeat_interleave(groups, dim=2) for x in (k, fk, v))
        if self.mode == "linear_only":
            out = self.linear_only(fq, fk, v, cache)
        else:
            out = self.window_linear(q, k, v, fq, fk, keep, cache)
        return self.o_proj(out.reshape(batch, seq, -1).to(hidden_states.dtype))

    def linear_only(self, fq, fk, v, cache):
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        out, final = linear_attn(
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
            cache.update_recurrent_state(final, self.layer_idx)
            cache.layers[self.layer_idx].has_previous_state[0] = True
        return out

    def window_linear(self, q, k, v, fq, fk, keep, cache):
        if self.mode == "window_only":
            fq = torch.zeros_like(fq)
        if cache is not None or (keep is not None and not bool(keep.all())):
            pad = torch.zeros_like(k[..., :1])
            if keep is not None:
                pad = pad.masked_fill(~keep[:, :, None, None], self.PAD_SCORE)
            q = torch.cat([q, torch.full_like(q[..., :1], 1 / self.softmax_scale)], dim=-1)
            k = torch.cat([k, pad], dim=-1)
        state = self.cached_state(cache)
        window_factor = torch.sigmoid(self.window_factor_logit.float())
        args = dict(window=self.window, window_factor=window_factor, scale=self.softmax_scale, eps=self.eps)
        if state is not None and q.shape[1] == 1:
            out, final = window_linear_step(q, k, v, fq, fk, state, **args)
        else:
            out, final = window_linear(
                q,
                k,
                v,
                fq,
                fk,
                initial_state=state,
                output_final_state=cache is not None,
                impl=self.impl,
                **args,
            )
        if cache is not None:
            self.store_state(cache, final)
        return out


MIXER_CLASSES: dict[str, type[Mixer]] = {
    "linear": LinearMixer,
    "softmax": SoftmaxMixer,
    "window_linear": WindowLinearMixer,
}


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
    for m in found:
        if name not in m.supported_modes:
            raise ValueError(
                f"mode {name!r} needs a window_linear mixer; layer {m.layer_idx} is {type(m).__name__}"
            )
    previous = [m.mode for m in found]
    for m in found:
        m.mode = name
    try:
        yield found
    finally:
        for m, prev in zip(found, previous):
            m.mode = prev
