"""The teacher signal of the stages: a live softmax model, or an on-disk top-k logit cache.

Both answer `kl(student_logits, input_ids, temperature)` for stage logits; the live teacher also captures
each converted layer's attention input and output for stage attention. The live model is the loaded
teacher itself (it shares the student's weights while the student trains none of them: stage attention,
LoRA) or a frozen copy (`trainable=attention|all`, or a placement that cannot share weights: FSDP2,
ZeRO-3); `linearize.pipeline` decides which and places it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers.modeling_utils import AttentionInterface

from linearize.distill.logit_cache import LogitCache, kl_from_topk
from linearize.distill.losses import kl_teacher_student


class Teacher(Protocol):
    """Where stage logits gets the teacher's distribution."""

    def kl(self, student_logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """KL(teacher || student) per token, averaged, for the student's logits [B, T, V] of `input_ids`."""
        ...


QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Captured:
    """One batch's teacher attention at the converted layers: each layer's input (the normed hidden state
    [B, T, hidden]) and output (before the residual add), the rotary (cos, sin) all layers share, and each
    layer's q [B, T, H, D], k, v [B, T, H_kv, D] as its attention function received them (after the q/k
    norms and RoPE), or None where the model's attention function could not be observed."""

    layers: list[int]
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    qkv: list[QKV | None] = field(default_factory=list)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a *ForCausalLM model, also inside a DeepSpeed engine (`.module`)."""
    return getattr(model, "module", model).model.layers


class LiveTeacher:
    """A softmax-attention model run under no_grad (in the caller's autocast)."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def kl(self, student_logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        return kl_teacher_student(student_logits, self.logits(input_ids), temperature)

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, layers: list[int]) -> Captured:
        """Run the teacher once over `input_ids` [B, T] and keep the attention input and output of `layers`.

        Forward hooks on those layers' `self_attn` read what the decoder layer passes in and gets back; the
        logits are computed for the last position only (nothing uses them)."""
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        rotary: list[tuple[torch.Tensor, torch.Tensor]] = []

        def hook(idx: int):
            def record(_module, args, kwargs, output):
                inputs[idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                outputs[idx] = output[0] if isinstance(output, tuple) else output
                if not rotary:
                    rotary.append(kwargs["position_embeddings"])

            return record

        decoder = decoder_layers(self.model)
        qkv: dict[int, QKV] = {}
        handles = [decoder[i].self_attn.register_forward_hook(hook(i), with_kwargs=True) for i in layers]
        try:
            with recording_attention(self.model, {decoder[i].self_attn: i for i in layers}, qkv):
                self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i in layers if i not in inputs]
        if missing:
            raise RuntimeError(f"the teacher's forward did not run the attention of layers {missing}")
        return Captured(
            layers,
            [inputs[i] for i in layers],
            [outputs[i] for i in layers],
            rotary[0],
            [qkv.get(i) for i in layers],
        )


@contextmanager
def recording_attention(
    model: nn.Module, modules: dict[nn.Module, int], into: dict[int, QKV]
) -> Iterator[None]:
    """While active, the attention function of `model`'s implementation (sdpa, eager, ...) also records, for
    the attention modules in `modules`, the query, key and value it is called with, as
    `into[modules[module]] = (q [B, T, H, D], k, v [B, T, H_kv, D])` views (transformers passes them as
    [B, heads, T, D], after the q/k norms and RoPE, before GQA's repeat).

    transformers looks the function up by name in its global `AttentionInterface` at every attention call,
    so the recording wrapper is registered under that name for the duration and the original put back. A
    model whose attention does not go through that registry records nothing (`into` stays empty for it)."""
    config = getattr(model, "module", model).config
    name = getattr(config, "_attn_implementation", None) or "eager"
    registry = AttentionInterface._global_mapping
    original = registry.get(name)

    def record(
        module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs
    ):
        idx = modules.get(module)
        if idx is not None:
            into[idx] = (query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        # "eager" is not in the registry: each model file has its own eager_attention_forward
        attend = original or sys.modules[type(module).__module__].eager_attention_forward
        return attend(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(name, record)
    try:
        yield
    finally:
        if original is None:
            del registry[name]
        else:
            AttentionInterface.register(name, original)


class CachedTeacher:
    """The teacher's top-k logits read from a `LogitCache` written before stage logits: no teacher runs."""

    def __init__(self, cache: LogitCache):
        self.cache = cache

    def kl(self, student_logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        top = self.cache.lookup(input_ids).to(student_logits.device)
        return kl_from_topk(student_logits, top.values, top.indices, top.lse, temperature)
