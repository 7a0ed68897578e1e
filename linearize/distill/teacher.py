"""The teacher signal of the stages: a live softmax model, or an on-disk top-k logit cache.

Both answer `kl(student_logits, input_ids, temperature)` for stage logits; the live teacher also captures
each converted layer's attention input and output for stage attention. The live model is the loaded
teacher itself (it shares the student's weights while the student trains none of them: stage attention,
LoRA) or a frozen copy (`trainable=attention|all`, or a placement that cannot share weights: FSDP2,
ZeRO-3); `linearize.pipeline` decides which and places it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from linearize.distill.logit_cache import LogitCache, kl_from_topk
from linearize.distill.losses import kl_teacher_student


class Teacher(Protocol):
    """Where stage logits gets the teacher's distribution."""

    def kl(self, student_logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """KL(teacher || student) per token, averaged, for the student's logits [B, T, V] of `input_ids`."""
        ...


@dataclass
class Captured:
    """One batch's teacher attention at the converted layers: each layer's input (the normed hidden state
    [B, T, hidden]) and output (before the residual add), and the rotary (cos, sin) all layers share."""

    layers: list[int]
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]


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
        handles = [decoder[i].self_attn.register_forward_hook(hook(i), with_kwargs=True) for i in layers]
        try:
            self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i in layers if i not in inputs]
        if missing:
            raise RuntimeError(f"the teacher's forward did not run the attention of layers {missing}")
        return Captured(layers, [inputs[i] for i in layers], [outputs[i] for i in layers], rotary[0])


class CachedTeacher:
    """The teacher's top-k logits read from a `LogitCache` written before stage logits: no teacher runs."""

    def __init__(self, cache: LogitCache):
        self.cache = cache

    def kl(self, student_logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        top = self.cache.lookup(input_ids).to(student_logits.device)
        return kl_from_topk(student_logits, top.values, top.indices, top.lse, temperature)
