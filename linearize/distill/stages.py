"""The two distillation stages: what trains, where the teacher signal comes from, and the loss."""

from __future__ import annotations

import torch

from linearize.architectures.mixers import mixers, mode
from linearize.config import LogitsStageConfig
from linearize.distill.logit_cache import LogitCache, kl_from_topk
from linearize.distill.losses import alignment_loss, kl_teacher_student, next_token_ce


def new_parameters(model: torch.nn.Module) -> list[str]:
    """Full names of the parameters conversion added (feature maps, gates, ...)."""
    names = []
    for mod_name, module in model.named_modules():
        if module in set(mixers(model)):
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


def attention_stage(student: torch.nn.Module):
    """Stage 1: only the new parameters train; every mixer sees the teacher's layer input and the loss
    is the sum over converted layers of MSE(student output, teacher output)."""
    freeze_all_but(student, new_parameters(student))
    found = mixers(student)

    def loss_fn(model, input_ids):
        with mode(student, "align"):
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)  # logits are not needed here
        return alignment_loss(found)

    return loss_fn


@torch.no_grad()
def rank_layers(student: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> list[dict]:
    """Each converted layer's stage-1 alignment loss (MSE to the teacher's attention output, averaged over
    `blocks`), highest first: [{"layer": i, "loss": x}, ...]. An `auto:N` layer plan keeps the first N."""
    found = [m for m in mixers(student) if "align" in m.supported_modes and m.new_parameter_names()]
    totals = dict.fromkeys((m.layer_idx for m in found), 0.0)
    device = next(student.parameters()).device
    batches = range(0, len(blocks), batch_size)
    for start in batches:
        with mode(student, "align"):
            student(
                input_ids=blocks[start : start + batch_size].to(device), use_cache=False, logits_to_keep=1
            )
        for m in found:
            totals[m.layer_idx] += m.alignment_loss.item() / len(batches)
            m.alignment_loss = None
    return sorted(({"layer": i, "loss": x} for i, x in totals.items()), key=lambda r: -r["loss"])


def logits_stage(
    student: torch.nn.Module,
    cfg: LogitsStageConfig,
    frozen_teacher: torch.nn.Module | None,
    cache: LogitCache | None = None,
):
    """Stage 2: KL(teacher || student) on logits (+ CE). Returns (model to train, loss_fn).

    trainable="lora": LoRA on cfg.lora_targets plus the new parameters; the teacher is the same weights
    with LoRA disabled and softmax attention switched back on. trainable="attention": every attention
    parameter trains; trainable="all": every parameter trains. Then the teacher must be `frozen_teacher`,
    an untouched copy (or the cache). With a top-k logit
    `cache` the teacher is not run at all: the KL is computed from the cached top-k logits.
    """
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

        def teacher_logits(input_ids):
            with model.disable_adapter(), mode(model, "teacher"):
                return model(input_ids=input_ids, use_cache=False).logits
    else:
        if frozen_teacher is None and cache is None:
            raise ValueError(
                f"stages.logits.trainable={cfg.trainable} needs a frozen teacher copy or a logit cache"
            )
        model = student
        freeze_all_but(student, fully_trained_parameters(student, cfg.trainable))
        if frozen_teacher is not None:
            frozen_teacher.requires_grad_(False)

        def teacher_logits(input_ids):
            return frozen_teacher(input_ids=input_ids, use_cache=False).logits

    def kl(logits, input_ids):
        if cache is not None:
            top = cache.lookup(input_ids).to(logits.device)
            return kl_from_topk(logits, top.values, top.indices, top.lse, cfg.temperature)
        with torch.no_grad():
            target = teacher_logits(input_ids)
        return kl_teacher_student(logits, target, cfg.temperature)

    def loss_fn(prepared, input_ids):
        logits = prepared(input_ids=input_ids, use_cache=False).logits
        loss = torch.zeros((), device=logits.device)
        if cfg.kl_weight:
            loss = loss + cfg.kl_weight * kl(logits, input_ids)
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * next_token_ce(logits, input_ids)
        return loss

    return model, loss_fn
