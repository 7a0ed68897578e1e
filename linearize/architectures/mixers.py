"""Mixers: what sits in `layer.self_attn` of a converted model.

A mixer is built from the teacher's attention module: it takes over its projections, q/k norms and
attributes (so state-dict keys stay the teacher's) and adds its own small parameters; softmax attention
with the same weights (`softmax_forward`) is its own code, not the teacher class's method.
`forward` has the teacher attention's signature and returns `(output, None)`, so decoder layers are
untouched.

Every non-softmax mixer keeps a fixed-size decode state in its cache layer's recurrent states (how many:
`configuration_linearize.mixer_state_count`); padded keys (`padding_mask` = 0) enter no state.

A mixer's `forward` is always the student's computation: nothing switches it from outside. Stage 1
(`linearize.distill.stages`) calls each mixer on the teacher's captured attention inputs; the hybrid mixers
(`window_linear`, `gated` with a window) also run one branch alone through `forward_branch`, which the
evals' branch controls (`linearize.evals.controls`) call.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .feature_maps import FEATURE_MAP_CLASSES
from .ops import (
    WindowLinearState,
    gated_delta,
    gated_delta_step,
    gated_linear_attn,
    gated_linear_attn_step,
    gated_slot_attn,
    gated_slot_attn_step,
    linear_attn,
    window_linear,
    window_linear_step,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from transformers.cache_utils import Cache

BRANCHES = ("window_only", "linear_only", "no_attention")
"""The branch controls a hybrid mixer runs through `forward_branch`: its window branch alone, its linear
(or gated) branch alone over all keys, and o_proj(0)."""
PAD_SCORE = -30000.0  # softmax score of a padded key: representable in fp16/bf16, e^(PAD_SCORE - m) == 0


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention as transformers' eager implementation computes it: q [B, H, T, D], k/v
    [B, H_kv, S, D] and an additive [B, 1, T, S] mask in; ([B, T, H, D], weights [B, H, T, S]) out."""
    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1) if groups > 1 else x for x in (key, value))
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class Mixer(nn.Module):
    """Base class: owns the teacher attention's submodules and attributes, not the teacher module.

    `teacher_attn` may itself be a mixer (a converted layer rebuilt as another mixer, e.g. turned back
    into softmax by an `auto:N` layer plan): then only the teacher's parts carry over.
    """

    branches: tuple[str, ...] = ()  # the branch controls `forward_branch` runs (hybrid mixers: BRANCHES)
    num_states = 0  # recurrent states this mixer keeps in its cache layer
    reads_teacher_qkv = False  # `attend` takes `teacher_qkv=` (see `rotary_qkv`)

    def __init__(self, teacher_attn: nn.Module, spec: dict[str, Any]):
        super().__init__()
        if isinstance(teacher_attn, Mixer):
            children = {n: getattr(teacher_attn, n) for n in teacher_attn.teacher_children}
            attrs = {n: getattr(teacher_attn, n) for n in teacher_attn.teacher_attrs}
        else:
            children = dict(teacher_attn.named_children())
            attrs = {
                n: v
                for n, v in vars(teacher_attn).items()
                if not n.startswith("_") and n != "training" and not isinstance(v, nn.Module)
            }
        for name, child in children.items():
            self.add_module(name, child)
        for name, value in attrs.items():
            setattr(self, name, value)
        self.teacher_children = tuple(children)
        self.teacher_attrs = tuple(attrs)
        self.spec = dict(spec)
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.eps = float(spec.get("eps", 1e-6))
        self.impl = spec.get("impl", "auto")
        self.softmax_scale = float(getattr(self, "scaling", self.head_dim**-0.5))

    def new_parameter_names(self) -> list[str]:
        """Names (relative to this module) of parameters the teacher did not have."""
        return [n for n, _ in self.named_parameters() if n.split(".")[0] not in self.teacher_children]

    # ---- shared pieces -------------------------------------------------------------------------------
    def add_feature_maps(self) -> int:
        """feature_map_q / feature_map_k from the plan; returns the feature dimension F."""
        fmap = FEATURE_MAP_CLASSES[self.spec["feature_map"]]
        # plans written before these keys existed mean the defaults: width head_dim, no hedgehog bias
        extra = {}
        if self.spec.get("feature_dim"):
            extra["width"] = int(self.spec["feature_dim"])
        if self.spec.get("feature_bias"):
            extra["bias"] = True
        self.feature_map_q = fmap(self.num_heads, self.head_dim, **extra)
        self.feature_map_k = fmap(self.num_kv_heads, self.head_dim, **extra)
        return fmap.feature_dim(self.head_dim, extra.get("width"))

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw q: [B, T, H, D], k, v: [B, T, H_kv, D] (before q/k norms and RoPE)."""
        batch, seq = hidden_states.shape[:2]
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim)
        return q, k, v

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's q/k norms (Qwen3) and RoPE, in the [B, T, H, D] layout."""
        if getattr(self, "q_norm", None) is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)

    def rotary_qkv(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        teacher_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q: [B, T, H, D], k, v: [B, T, H_kv, D] after the teacher's q/k norms and RoPE.

        `teacher_qkv`: the teacher attention's own q, k, v for these hidden states (stage attention captures
        them in the teacher's forward), which frozen projections, norms and RoPE would reproduce: returned as
        they are instead of computed again. Mixers that read them say so with `reads_teacher_qkv`."""
        if teacher_qkv is not None:
            return teacher_qkv
        q, k, v = self.project(hidden_states)
        q, k = self.rotate(q, k, position_embeddings)
        return q, k, v

    def repeat_kv(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, T, H_kv, *] -> [B, T, H, *] (GQA: each kv head serves `groups` query heads)."""
        groups = self.num_heads // self.num_kv_heads
        return tuple(x.repeat_interleave(groups, dim=2) if groups > 1 else x for x in xs)

    @staticmethod
    def key_mask(kwargs: dict, seq: int) -> torch.Tensor | None:
        """[B, T] bool, False at padded positions of this chunk, or None when nothing is padded."""
        padding_mask = kwargs.get("padding_mask")
        return None if padding_mask is None else padding_mask[:, -seq:].bool()

    def load_states(self, cache: Cache | None, count: int, first: int = 0) -> list[torch.Tensor] | None:
        """Recurrent states first..first+count-1 of this layer's cache entry, or None before any write."""
        if cache is None:
            return None
        layer = cache.layers[self.layer_idx]
        have = getattr(layer, "number_of_states", 0)
        if have < first + count:
            raise ValueError(
                f"layer {self.layer_idx}: the {type(self).__name__} keeps {first + count} recurrent states, but "
                f"its cache layer {type(layer).__name__} has {have}; build the cache from a converted config "
                f"(config.number_of_conv_states = {first + count})"
            )
        parts = [cache.get_recurrent_state(self.layer_idx, first + i) for i in range(count)]
        return None if parts[0] is None else parts

    def run_cached(
        self,
        cache: Cache | None,
        seq: int,
        scan: Callable[[Any, bool], tuple[torch.Tensor, Any]],
        step: Callable[[Any], tuple[torch.Tensor, Any]] | None = None,
        count: int = 1,
        first: int = 0,
        pack: Callable[[list[torch.Tensor]], Any] | None = None,
    ) -> torch.Tensor:
        """Run one op from this layer's decode state (recurrent states first..first+count-1) and store the
        state it ends in. `scan(state, output_final_state)` runs the op over the chunk (state None before any
        write); `step(state)` decodes one token from an existing state, when the op has a step form. `pack`
        turns the stored parts into the op's state (default: the tensor itself for one part, else a tuple);
        the op's final state is stored back part by part. Returns the op's output."""
        parts = self.load_states(cache, count, first)
        pack = pack or ((lambda p: p[0]) if count == 1 else tuple)
        state = None if parts is None else pack(parts)
        if step is not None and state is not None and seq == 1:
            out, final = step(state)
        else:
            out, final = scan(state, cache is not None)
        if cache is not None:
            self.store_states(cache, [final] if count == 1 else final, first)
        return out

    def store_states(self, cache: Cache, states: Sequence[torch.Tensor], first: int = 0) -> None:
        for i, part in enumerate(states):
            cache.update_recurrent_state(part, self.layer_idx, first + i)
            # transformers marks a state as present only when a conv state is written; we have none
            cache.layers[self.layer_idx].has_previous_state[first + i] = True

    # ---- forward -------------------------------------------------------------------------------------
    def softmax_forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's softmax attention with this mixer's weights: q/k norms and RoPE, the KV cache, and
        the attention function of the model's `attn_implementation` (transformers' registry; eager here).

        Written out rather than borrowed: calling the teacher class's `forward` on this object breaks on
        transformers releases that wrap attention forwards (5.25's `use_kernelized_func` reads attributes
        only a real teacher attention has), and exports run on whatever transformers their users have."""
        batch, seq = hidden_states.shape[:2]
        q, k, v = (x.transpose(1, 2) for x in self.rotary_qkv(hidden_states, position_embeddings))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        # Qwen2/Qwen3 attention carries its layer's window (None on full layers); Mistral reads its config's
        window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        out, weights = attend(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.softmax_scale,
            sliding_window=window,
            **kwargs,
        )
        return self.o_proj(out.reshape(batch, seq, -1).contiguous()), weights

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The mixer's output [B, T, hidden] (after o_proj)."""
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The replaced attention's signature and returns: (output, None)."""
        return self.attend(hidden_states, position_embeddings, attention_mask, cache, **kwargs), None

    def forward_branch(
        self,
        branch: str,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """`forward` with one branch of a hybrid mixer alone (see BRANCHES); (output, None)."""
        if branch not in self.branches:
            raise ValueError(
                f"branch {branch!r} needs a hybrid mixer (window_linear, or gated with student.settings.gated_window) "
                f"that has it; layer {self.layer_idx} is {type(self).__name__} with branches {self.branches}"
            )
        return self.attend(
            hidden_states, position_embeddings, attention_mask, cache, branch=branch, **kwargs
        ), None

    def heads_out(self, out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """o_proj of [B, T, H, V] head outputs."""
        batch, seq = hidden_states.shape[:2]
        return self.o_proj(out.reshape(batch, seq, -1).to(hidden_states.dtype))

    def no_attention(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """o_proj(0): the "no_attention" control (o_proj's bias where it has one)."""
        batch, seq = hidden_states.shape[:2]
        return self.o_proj(hidden_states.new_zeros(batch, seq, self.num_heads * self.head_dim))


class SoftmaxMixer(Mixer):
    """The teacher's softmax attention, unchanged (layers a plan keeps); the branch controls leave it be."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.softmax_forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)


class LinearMixer(Mixer):
    """Normalised causal linear attention over feature-mapped q and k (after RoPE), GQA-aware.

    out_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps).
    Decoding keeps one fixed-size state per layer: [batch, kv_heads, feature_dim, head_dim + 1], whose last
    column is the running key sum of the normaliser.
    """

    num_states = 1
    reads_teacher_qkv = True

    def __init__(self, teacher_attn: nn.Module, spec: dict[str, Any]):
        super().__init__(teacher_attn, spec)
        self.add_feature_maps()

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        q, k, v = self.rotary_qkv(hidden_states, position_embeddings, kwargs.get("teacher_qkv"))
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        keep = self.key_mask(kwargs, q.shape[1])
        if keep is not None:  # padded keys must not enter the state or the normaliser
            fk = fk * keep[:, :, None, None].to(fk.dtype)
        # GQA in the op: keys and values stay on their H_kv heads (and so does the decode state)
        return self.heads_out(self.linear_attention(fq, fk, v, cache), hidden_states)

    def linear_attention(
        self, fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, cache: Cache | None
    ) -> torch.Tensor:
        args = dict(scale=1.0, normalize=True, eps=self.eps, impl=self.impl)
        return self.run_cached(
            cache,
            fq.shape[1],
            scan=lambda state, final: linear_attn(
                fq, fk, v, initial_state=state, output_final_state=final, **args
            ),
        )


def windowed_attention(
    mixer: WindowLinearMixer | GatedMixer,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    keep: torch.Tensor | None,
    window_factor: torch.Tensor,
    cache: Cache | None,
    first_state: int,
) -> torch.Tensor:
    """Run the `window_linear` op for a mixer, with its decode state at recurrent states
    first_state..first_state+4 of the mixer's cache layer.

    Padded keys get PAD_SCORE through one extra q/k column (q: 1/scale, k: 0 or PAD_SCORE), which also
    travels in the cached window slots. A finite score rather than -inf: a padded query whose window holds
    only padded keys gets a finite (unused) output instead of NaN, and e^PAD_SCORE is exactly 0 in float32
    for every real query, whose window always holds its own key. The column is added only where padding or
    a cache can occur (not in training on packed blocks), and is exactly 0 for real keys.
    """
    if cache is not None or (keep is not None and not bool(keep.all())):
        pad = torch.zeros_like(k[..., :1])
        if keep is not None:
            pad = pad.masked_fill(~keep[:, :, None, None], PAD_SCORE)
        q = torch.cat([q, torch.full_like(q[..., :1], 1 / mixer.softmax_scale)], dim=-1)
        k = torch.cat([k, pad], dim=-1)
    args = dict(window=mixer.window, window_factor=window_factor, scale=mixer.softmax_scale, eps=mixer.eps)
    return mixer.run_cached(
        cache,
        q.shape[1],
        scan=lambda state, final: window_linear(
            q, k, v, fq, fk, initial_state=state, output_final_state=final, impl=mixer.impl, **args
        ),
        step=lambda state: window_linear_step(q, k, v, fq, fk, state, **args),
        count=len(WindowLinearState._fields),
        first=first_state,
        pack=lambda parts: WindowLinearState(*parts),
    )


class WindowLinearMixer(LinearMixer):
    """LoLCATs' hybrid attention: softmax over the last W tokens plus feature-mapped linear attention over
    the older ones, with one shared normaliser and a learned per-head mix w = sigmoid(window_factor_logit):

        o_t = (w sum_{window} e^{s_ts - m_t} v_s + (1-w) sum_{older} phi(q_t).phi(k_s) v_s) / (same, v_s = 1)

    (op `window_linear`, see linearize/kernels/window_linear/README.md). q and k are taken after q/k norms
    and RoPE for both parts. Decoding keeps a fixed-size `WindowLinearState` per layer (W window slots and
    one [F, V+1] state per head) as the five recurrent states of the layer's cache entry.

    Branch controls (`forward_branch`), for the evals' `controls` task:
    - "window_only": the window branch alone (w = 1): the same op with phi(q) = 0, so the output is the
      windowed softmax up to eps / w in the denominator.
    - "linear_only": the linear branch alone over ALL keys s <= t (the window's keys included), i.e. the
      `linear` mixer's normalised linear attention with these feature maps.
    - "no_attention": zeros before o_proj, i.e. o_proj(0) (o_proj's bias where it has one).
    A cache belongs to the branch that filled it; linear_only keeps its state in recurrent state 0.
    """

    branches = BRANCHES
    num_states = len(WindowLinearState._fields)

    def __init__(self, teacher_attn: nn.Module, spec: dict[str, Any]):
        super().__init__(teacher_attn, spec)
        self.window = int(spec.get("window", 64))
        init = float(spec.get("window_factor_init", 0.5))
        self.window_factor_logit = nn.Parameter(torch.full((self.num_heads,), math.log(init / (1 - init))))

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        branch: str | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if branch == "no_attention":
            return self.no_attention(hidden_states)
        q, k, v = self.rotary_qkv(hidden_states, position_embeddings, kwargs.get("teacher_qkv"))
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        keep = self.key_mask(kwargs, q.shape[1])
        if keep is not None:  # padded keys must not enter the state or the normaliser
            fk = fk * keep[:, :, None, None].to(fk.dtype)
        k, fk, v = self.repeat_kv(k, fk, v)
        if branch == "linear_only":
            out = self.linear_attention(fq, fk, v, cache)
        else:
            if branch == "window_only":
                fq = torch.zeros_like(fq)
            window_factor = torch.sigmoid(self.window_factor_logit.float())
            out = windowed_attention(self, q, k, v, fq, fk, keep, window_factor, cache, 0)
        return self.heads_out(out, hidden_states)


class GatedMixer(Mixer):
    """Gated linear attention in the Liger style (Lan et al., 2025), normalised like the `linear` mixer:

        S_t = diag(a_t) S_{t-1} + phi(k_t) [v_t, 1]^T,   o_t = num / (den + eps),   [num, den] = phi(q_t)^T S_t

    with a per-feature forget gate a_t = exp(g_t) that adds no projection: g_t = logsigmoid(pool(k_t) +
    gate_bias) / 16, where pool averages the teacher's key projection k_proj(x_t) (before norm and RoPE)
    down or up to H_kv * F features, as Liger does, and gate_bias [H_kv, F] (zeros) is the only new gate
    parameter. The last state column carries the decayed normaliser. Op `gated_linear_attn` (fla's
    chunk_gla on CUDA). Decode state: [B, H, F, V+1] in recurrent state 0.

    With `gated_window` (Liger Attention), each head also attends by exact softmax to its last W tokens and
    mixes the two separately normalised outputs: o = w * window + (1 - w) * gated, w = sigmoid(logit) per
    head (init `window_factor_init`); the window's decode state (a ring buffer of W keys/values) fills
    recurrent states 1..5. Then the branch controls apply: window_only (w = 1), linear_only (w = 0),
    no_attention (o_proj(0)).
    """

    GATE_NORMALIZER = 16.0

    def __init__(self, teacher_attn: nn.Module, spec: dict[str, Any]):
        super().__init__(teacher_attn, spec)
        self.feature_dim = self.add_feature_maps()
        self.gate_bias = nn.Parameter(torch.zeros(self.num_kv_heads, self.feature_dim))
        self.window = int(spec.get("window", 64)) if spec.get("gated_window") else 0
        self.num_states = 1 + (len(WindowLinearState._fields) if self.window else 0)
        if self.window:
            self.branches = BRANCHES
            init = float(spec.get("window_factor_init", 0.5))
            self.window_factor_logit = nn.Parameter(
                torch.full((self.num_heads,), math.log(init / (1 - init)))
            )

    def log_decay(self, k_raw: torch.Tensor) -> torch.Tensor:
        """g: [B, T, H_kv, F] float32 log forget gate, pooled from the raw key projection."""
        batch, seq = k_raw.shape[:2]
        pooled = F.adaptive_avg_pool1d(
            k_raw.reshape(batch, seq, -1).float(), self.num_kv_heads * self.feature_dim
        )
        pooled = pooled.view(batch, seq, self.num_kv_heads, self.feature_dim) + self.gate_bias.float()
        return F.logsigmoid(pooled) / self.GATE_NORMALIZER

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        branch: str | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if branch == "no_attention":
            return self.no_attention(hidden_states)
        q, k_raw, v = self.project(hidden_states)
        g = self.log_decay(k_raw)
        q, k = self.rotate(q, k_raw, position_embeddings)
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        keep = self.key_mask(kwargs, q.shape[1])
        if keep is not None:  # a padded token writes nothing and decays nothing
            fk = fk * keep[:, :, None, None].to(fk.dtype)
            g = g * keep[:, :, None, None]
        k, fk, v, g = self.repeat_kv(k, fk, v, g)
        if branch == "window_only":
            out = self.window_branch(q, k, v, keep, cache)
        elif branch == "linear_only" or not self.window:
            out = self.gated(fq, fk, v, g, cache)
        else:
            gated = self.gated(fq, fk, v, g, cache)
            window = self.window_branch(q, k, v, keep, cache)
            w = torch.sigmoid(self.window_factor_logit.float())[:, None]
            out = w * window.float() + (1 - w) * gated.float()
        return self.heads_out(out, hidden_states)

    def window_branch(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keep: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """Exact softmax over the last W keys: the window_linear op with phi(q) = phi(k) = 0 (width 1), whose
        output is then sum e^s v / (sum e^s + eps / w) for any mix w; w = 1/2."""
        zeros = q.new_zeros(*q.shape[:3], 1)
        half = torch.full((self.num_heads,), 0.5, device=q.device)
        return windowed_attention(self, q, k, v, zeros, zeros, keep, half, cache, 1)

    def gated(
        self, fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, g: torch.Tensor, cache: Cache | None
    ) -> torch.Tensor:
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        out = self.run_cached(
            cache,
            fq.shape[1],
            scan=lambda state, final: gated_linear_attn(
                fq, fk, v1, g, scale=1.0, initial_state=state, output_final_state=final, impl=self.impl
            ),
            step=lambda state: gated_linear_attn_step(fq, fk, v1, g, state, scale=1.0),
        ).float()
        return out[..., :-1] / (out[..., -1:] + self.eps)


class GatedSlotMixer(Mixer):
    """Gated slot attention (GSA, Zhang et al., 2024) over M memory slots (`num_slots`, default 64):

        Hk_t = diag(a_t) Hk_{t-1} + phi(k_t) s_t^T,   Hv_t = diag(a_t) Hv_{t-1} + s_t v_t^T
        o_t = Hv_t^T softmax(scale * Hk_t^T phi(q_t))

    a softmax over slots instead of over tokens. The slot gate comes from one small new projection
    slot_proj: hidden -> H_kv * M: g = logsigmoid(slot_proj(x)) / 8 (fla's normaliser), a = exp(g), and the
    write strength s = 1 - a, so each slot is an exponential moving average of what it is written (its
    memory needs no extra normaliser). slot_proj starts small and random (std 0.02 / sqrt(hidden/64)):
    every slot begins with a decay near 0.917 per token, and the randomness breaks the slots' symmetry.
    Scores use the teacher's softmax scale on feature-mapped q and k, i.e. the T2R setting: with the
    t2r map (ReLU(xW + b), identity init) phi(q).phi(k) starts as the teacher's ReLU-clipped q.k.
    Op `gated_slot_attn` (fla's chunk_gsa on CUDA). Decode state: (Hk [B, H, F, M], Hv [B, H, M, V]).
    """

    GATE_NORMALIZER = 8.0
    num_states = 2
    reads_teacher_qkv = True

    def __init__(self, teacher_attn: nn.Module, spec: dict[str, Any]):
        super().__init__(teacher_attn, spec)
        self.add_feature_maps()
        self.num_slots = int(spec.get("num_slots", 64))
        hidden = self.config.hidden_size
        self.slot_proj = nn.Linear(hidden, self.num_kv_heads * self.num_slots, bias=False)
        nn.init.normal_(self.slot_proj.weight, std=0.02 / math.sqrt(max(hidden / 64, 1.0)))

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        batch, seq = hidden_states.shape[:2]
        q, k, v = self.rotary_qkv(hidden_states, position_embeddings, kwargs.get("teacher_qkv"))
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        f = self.slot_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.num_slots)
        g = F.logsigmoid(f.float()) / self.GATE_NORMALIZER
        s = 1 - g.exp()
        keep = self.key_mask(kwargs, seq)
        if keep is not None:  # a padded token writes nothing and decays nothing
            m = keep[:, :, None, None]
            fk, s, g = fk * m.to(fk.dtype), s * m, g * m
        fk, v, s, g = self.repeat_kv(fk, v, s, g)
        scale = self.softmax_scale
        out = self.run_cached(
            cache,
            seq,
            scan=lambda state, final: gated_slot_attn(
                fq, fk, v, s, g, scale=scale, initial_state=state, output_final_state=final, impl=self.impl
            ),
            step=lambda state: gated_slot_attn_step(fq, fk, v, s, g, state, scale=scale),
            count=2,
        )
        return self.heads_out(out, hidden_states)


class GatedDeltaMixer(Mixer):
    """Gated DeltaNet (Yang et al., 2025) on the teacher's projections, as in RADLADS-like conversions:

        S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t

    with q, k the feature-mapped (after q/k norms and RoPE) and L2-normalised teacher queries and keys.
    New parameters, all per head and started small: the write strength b_t = sigmoid(beta_proj(x_t))
    (weights std 1e-3, bias 0: b = 0.5), and the decay a_t = exp(g_t), g_t = -exp(A_log) *
    softplus(decay_proj(x_t) + dt_bias) (Mamba-2 style: weights std 1e-3, A in [1, 16], dt in [1e-3, 0.1]
    log-uniform, so heads start with memories from a few to a thousand tokens). Op `gated_delta` (fla's
    chunk_gated_delta_rule on CUDA). Decode state: [B, H, F, V].
    """

    num_states = 1
    reads_teacher_qkv = True

    def __init__(self, teacher_attn: nn.Module, spec: dict[str, Any]):
        super().__init__(teacher_attn, spec)
        self.add_feature_maps()
        hidden, heads = self.config.hidden_size, self.num_heads
        self.beta_proj = nn.Linear(hidden, heads, bias=True)
        self.decay_proj = nn.Linear(hidden, heads, bias=False)
        for proj in (self.beta_proj, self.decay_proj):
            nn.init.normal_(proj.weight, std=1e-3)
        nn.init.zeros_(self.beta_proj.bias)
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        dt = torch.empty(heads).uniform_(math.log(1e-3), math.log(0.1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        seq = hidden_states.shape[1]
        q, k, v = self.rotary_qkv(hidden_states, position_embeddings, kwargs.get("teacher_qkv"))
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        beta = torch.sigmoid(self.beta_proj(hidden_states).float())
        g = -self.A_log.float().exp() * F.softplus(
            self.decay_proj(hidden_states).float() + self.dt_bias.float()
        )
        keep = self.key_mask(kwargs, seq)
        if keep is not None:  # a padded token writes nothing and decays nothing
            fk, beta, g = (
                fk * keep[:, :, None, None].to(fk.dtype),
                beta * keep[..., None],
                g * keep[..., None],
            )
        fk, v = self.repeat_kv(fk, v)
        args = dict(scale=1.0, use_qk_l2norm=True)
        out = self.run_cached(
            cache,
            seq,
            scan=lambda state, final: gated_delta(
                fq, fk, v, g, beta, initial_state=state, output_final_state=final, impl=self.impl, **args
            ),
            step=lambda state: gated_delta_step(fq, fk, v, g, beta, state, **args),
        )
        return self.heads_out(out, hidden_states)


MIXER_CLASSES: dict[str, type[Mixer]] = {
    "linear": LinearMixer,
    "softmax": SoftmaxMixer,
    "window_linear": WindowLinearMixer,
    "gated": GatedMixer,
    "gated_slot": GatedSlotMixer,
    "gated_delta": GatedDeltaMixer,
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


def keep_softmax(layers: nn.ModuleList, indices: list[int]) -> None:
    """Turn the converted layers `indices` back into the teacher's softmax attention (their new
    parameters are dropped), e.g. for the layers an `auto:N` plan keeps."""
    for idx in indices:
        attn = layers[idx].self_attn
        if not isinstance(attn, Mixer):
            raise ValueError(f"layer {idx} is not converted ({type(attn).__name__})")
        layers[idx].self_attn = SoftmaxMixer(attn, {**attn.spec, "mixer": "softmax"})


def mixers(model: nn.Module) -> list[Mixer]:
    return [m for m in model.modules() if isinstance(m, Mixer)]
