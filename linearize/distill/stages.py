"""The two distillation stages: what trains, where the teacher signal comes from, and the loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from linearize.architectures.mixers import Mixer, mixers
from linearize.config import LogitsStageConfig
from linearize.distill.losses import next_token_ce
from linearize.distill.teacher import Captured, LiveTeacher, Teacher

if TYPE_CHECKING:
    from collections.abc import Callable


def new_parameters(model: torch.nn.Module) -> list[str]:
    """Full names of the parameters conversion added (feature maps, gates, ...)."""
    converted, names = set(mixers(model)), []
    for mod_name, module in model.named_modules():
        if module in converted:
            names += [f"{mod_name}.{n}" for n in module.new_parameter_names()]
    return names


def fully_trained_parameters(model: torch.nn.Module, trainable: str) -> list[str]:
    """Full names of the parameters stage logits trains without LoRA: every attention parameter
    (trainable="attention") or every parameter (trainable="all")."""
    names = [n for n, _ in model.named_parameters()]
    return names if trainable == "all" else [n for n in names if ".self_attn." in n]


def freeze_all_but(model: torch.nn.Module, names: list[str]) -> None:
    wanted = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)


def aligned_layers(student: nn.Module) -> list[int]:
    """The decoder layers stage attention trains: those whose mixer has new parameters."""
    layers = [
        i
        for i, layer in enumerate(student.model.layers)
        if isinstance(layer.self_attn, Mixer) and layer.self_attn.new_parameter_names()
    ]
    if not layers:
        raise ValueError("no converted layer has parameters to align: is every layer softmax?")
    return layers


class Aligner(nn.Module):
    """Stage attention's trained model: the student, whose converted mixers are each called on the teacher's
    captured attention input of their layer. `forward(captured)` is the sum over those layers of
    MSE(mixer output, teacher attention output); with `per_layer=True` the [layers] vector of them.

    The student is a submodule (so the placement of the training loop wraps, shards and checkpoints it as it
    does in stage logits) but only its mixers run: no student forward through the network."""

    def __init__(self, student: nn.Module, layers: list[int]):
        super().__init__()
        self.student = student
        self.layers = list(layers)

    def tie_weights(self) -> None:
        """The student's tied weights tied again: accelerate's FSDP2 loading moves the weights to the meta
        device and back, untying them, and restores ties through this method (as it does on the student)."""
        self.student.tie_weights()

    def forward(self, captured: Captured, per_layer: bool = False) -> torch.Tensor:
        decoder = self.student.model.layers
        qkv = captured.qkv or [None] * len(captured.layers)
        losses = []
        for i, x, target, teacher_qkv in zip(captured.layers, captured.inputs, captured.outputs, qkv):
            mixer = decoder[i].self_attn
            extra = {"teacher_qkv": teacher_qkv} if reuses_teacher_qkv(mixer, teacher_qkv) else {}
            out, _ = mixer(x, captured.position_embeddings, None, **extra)
            # the difference in the compute dtype, its mean square in float32
            losses.append((out - target.to(out.dtype)).float().square().mean())
        stacked = torch.stack(losses)
        return stacked if per_layer else stacked.sum()


def reuses_teacher_qkv(mixer: nn.Module, teacher_qkv: tuple | None) -> bool:
    """Whether a mixer can take the teacher's captured q, k, v instead of computing its own: it reads them
    (`reads_teacher_qkv`) and its projections and q/k norms are the teacher's, frozen."""
    if teacher_qkv is None or not getattr(mixer, "reads_teacher_qkv", False):
        return False
    parts = [getattr(mixer, n, None) for n in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm")]
    return not any(p.requires_grad for part in parts if part is not None for p in part.parameters())


def attention_stage(
    student: nn.Module, teacher: LiveTeacher
) -> tuple[Aligner, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """Stage 1: only the new parameters train; each converted mixer learns its layer's (teacher attention
    input -> output) pairs, captured from one teacher forward per batch. Returns (Aligner, loss_fn)."""
    freeze_all_but(student, new_parameters(student))
    aligner = Aligner(student, aligned_layers(student))

    def loss_fn(model, input_ids):
        return model(teacher.capture(input_ids, aligner.layers))

    return aligner, loss_fn


@torch.no_grad()
def rank_layers(
    aligner: nn.Module, teacher: LiveTeacher, blocks: torch.Tensor, batch_size: int
) -> list[dict]:
    """Each converted layer's stage-1 alignment loss (MSE to the teacher's attention output, averaged over
    `blocks`), highest first: [{"layer": i, "loss": x}, ...]. An `auto:N` layer plan keeps the first N.
    `aligner` is an `Aligner`, possibly wrapped or sharded by the training placement."""
    layers = getattr(aligner, "layers", None) or aligner.module.layers
    device = teacher_device(teacher.model)
    starts = range(0, len(blocks), batch_size)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    for start in starts:
        captured = teacher.capture(blocks[start : start + batch_size].to(device), layers)
        totals += aligner(captured, per_layer=True).double().cpu() / len(starts)
    ranked = sorted(zip(layers, totals.tolist()), key=lambda r: -r[1])
    return [{"layer": i, "loss": x} for i, x in ranked]


def teacher_device(model: nn.Module) -> torch.device:
    """Where a (possibly sharded) model's inputs go: the device of its first parameter, else the CPU."""
    param = next(model.parameters(), None)
    device = getattr(param, "device", torch.device("cpu"))
    return torch.device("cpu") if device.type == "meta" else device


def logits_stage(
    student: nn.Module, cfg: LogitsStageConfig, teacher: Teacher
) -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """Stage 2: KL(teacher || student) on logits (+ CE). Returns (model to train, loss_fn).

    trainable="lora": LoRA on cfg.lora_targets plus the new parameters; trainable="attention": every
    attention parameter trains; trainable="all": every parameter trains. `teacher` is a `LiveTeacher` (the
    teacher sharing the student's frozen base weights under LoRA, else a frozen copy) or a `CachedTeacher`
    (top-k logits from disk: no teacher runs)."""
    added = new_parameters(student)
    if cfg.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            student,
            LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=cfg.lora_targets
            ),
        )
        prefixed = {f"base_model.model.{n}" for n in added}
        for n, p in model.named_parameters():
            if n in prefixed:
                p.requires_grad_(True)
    else:
        model = student
        freeze_all_but(student, fully_trained_parameters(student, cfg.trainable))

    def loss_fn(prepared, input_ids):
        logits = prepared(input_ids=input_ids, use_cache=False).logits
        loss = torch.zeros((), device=logits.device)
        if cfg.kl_weight:
            loss = loss + cfg.kl_weight * teacher.kl(logits, input_ids, cfg.temperature)
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * next_token_ce(logits, input_ids)
        return loss

    return model, loss_fn


def trained_student(model: nn.Module) -> nn.Module:
    """The student out of what a stage trained: the Aligner's student, or the LoRA model with its adapters
    folded into the weights."""
    if isinstance(model, Aligner):
        return model.student
    if hasattr(model, "peft_config"):
        return model.merge_and_unload()
    return model
