"""Where the student lives between training steps: whole on every device, or (FSDP2) whole on none.

Under one process, DDP and DeepSpeed every process holds the whole model on its device outside the training
steps (`WholeStudent`). Under FSDP2 only rank 0 holds it whole, in CPU memory, and every other process an
empty copy on the meta device (`ShardedStudent`): evaluation, sampling and the teacher's logit cache run on
the model sharded over the processes, so a teacher bigger than a device (Qwen2.5-72B on 80 GB GPUs) loads,
trains, evaluates and exports.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules with every parameter empty on the meta device (ties kept, requires_grad
    kept) and its buffers copied: the skeleton a gathered state dict is assigned into."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


class WholeStudent:
    """The model whole on this process's device: `plain()` and `sharded()` are the same module."""

    def __init__(self, model: nn.Module):
        self.model = model

    def plain(self) -> nn.Module:
        return self.model

    def sharded(self) -> nn.Module:
        return self.model

    def replace(self, model: nn.Module) -> None:
        self.model = model


class ShardedStudent:
    """FSDP2: the model whole in rank 0's CPU memory and empty (meta) on every other process (`plain()`), or
    sharded over the processes (`sharded()`), whichever was asked for last.

    `sharded()` shards the plain model in place with the weights broadcast from rank 0 (see
    `linearize.distill.loop.shard_fsdp2`); `plain()` gathers the sharded one's full state dict into rank 0's
    CPU memory and assigns it to an empty copy of the model made before sharding (FSDP2 has no way back).
    Both are collective: every process calls them at the same point. Structural changes (swapping mixers,
    LoRA, loading weights from a file on rank 0) go to `plain()`; forwards go to `sharded()`.
    """

    def __init__(self, model: nn.Module, accelerator):
        self.model, self.accelerator = model, accelerator
        self.skeleton: nn.Module | None = None  # set while sharded

    def plain(self) -> nn.Module:
        if self.skeleton is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # cpu_offload with full_state_dict: rank 0 receives the whole state dict in CPU memory, the others
            # none, one tensor at a time
            state = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            model, self.skeleton = self.skeleton, None
            if self.accelerator.is_main_process:
                assign_state(model, state)
            self.model = model
        return self.model

    def sharded(self) -> nn.Module:
        if self.skeleton is None:
            from linearize.distill.loop import shard_fsdp2

            self.skeleton = meta_copy(self.model)
            self.model = shard_fsdp2(self.accelerator, self.model)
        return self.model

    def replace(self, model: nn.Module) -> None:
        if self.skeleton is not None:
            raise RuntimeError("replace the plain model: call plain() first")
        self.model = model


def assign_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put `state`'s tensors in place of `model`'s (meta) parameters and buffers, each in the dtype the model
    had it in (FSDP2 upcasts trained 16-bit parameters to fp32), and tie the tied weights again."""
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(
            f"gathered state dict does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, assign=True)
    tie = getattr(model, "tie_weights", None)
    if tie is not None:
        tie()


def load_empty(config, dtype: torch.dtype) -> nn.Module:
    """`config`'s model with its parameters on the meta device and its buffers real (computed from the
    config: rotary frequencies), as every process but rank 0 holds it under FSDP2."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # as from_pretrained does: lm_head is embed_tokens where the config ties them
    return model.eval()
