"""Both stages on the bundled teacher, trained by DeepSpeed engines on CPU or by plain torch in one process.

    python -m torch.distributed.run --standalone --nproc_per_node=2 deepspeed_worker.py OUT.json   # ZeRO-2, 3
    python deepspeed_worker.py OUT.json --plain                                                    # reference

Run by tests/distributed/test_deepspeed.py with DS_ACCELERATOR=cpu. Every run trains a fresh student for
stage attention, then the same student for stage logits (trainable=attention, against a frozen teacher copy
prepared by `linearize.distributed.deepspeed_frozen_teacher`), on the same global batch of each step, and writes
each stage's per-step losses (the mean over the global batch) to OUT.json. DeepSpeed is driven the way
accelerate drives it in our loop (`DeepSpeedEngineWrapper`: gradient_accumulation_steps 1 in the config, the
accumulation boundary set per micro-batch), with the torch AdamW and the gradient clipping of the plain run
("torch_adam"), and each stage ends as our `train_stage` does (engine destroyed, `unpartition`); every rank
writes the student's weights after each stage to OUT.rank<R>.pt.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from linearize.config import LogitsStageConfig, StudentConfig
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import load_teacher
from linearize.distill.stages import attention_stage, logits_stage
from linearize.distill.teacher import LiveTeacher

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 32
GRAD_ACCUM = 2  # of the DeepSpeed runs; the plain run takes each step's global batch at once
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}
MAX_GRAD_NORM = 0.02  # below every step's gradient norm here (0.03-0.07 in stage attention, 2-4 in logits)


def batches(vocab: int) -> torch.Tensor:
    """[STEPS, GLOBAL_BATCH, SEQ] token ids, the same in every run."""
    return torch.randint(3, vocab, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def build():
    teacher, _ = load_teacher("bundled:stories260K")
    frozen = copy.deepcopy(teacher).requires_grad_(False).eval()
    torch.manual_seed(0)  # the new parameters' init
    return swap(teacher, plan_for(StudentConfig(), teacher.config)), frozen


def schedule(optimizer):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, 1, STEPS, min_lr_rate=0.1)


def plain(out: str) -> None:
    student, frozen = build()
    data = batches(student.config.vocab_size)
    losses, weights = {}, {}
    for stage in ("attention", "logits"):
        if stage == "attention":
            model, loss_fn = attention_stage(student, LiveTeacher(frozen))
        else:
            model, loss_fn = logits_stage(
                student, LogitsStageConfig(trainable="attention"), LiveTeacher(frozen)
            )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)
        scheduler = schedule(optimizer)
        losses[stage] = []
        for step in range(STEPS):
            loss = loss_fn(model, data[step])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses[stage].append(loss.item())
        weights[stage] = {k: v.clone() for k, v in student.state_dict().items()}
    with open(out, "w") as f:
        json.dump({"plain": losses}, f)
    torch.save({"plain": weights}, weights_path(out))


def weights_path(out: str, rank: int = 0) -> str:
    return out.removesuffix(".json") + f".rank{rank}.pt"


def ds_config(zero: int, world: int) -> dict:
    config = {  # as our train_stage sets accelerate's DeepSpeed config: the loop accumulates itself
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world // GRAD_ACCUM,
        "gradient_accumulation_steps": 1,
        "train_batch_size": GLOBAL_BATCH // GRAD_ACCUM,
        "optimizer": {"type": "AdamW", "params": {**ADAMW, "torch_adam": True}},
        "zero_optimization": {"stage": zero},
        "gradient_clipping": MAX_GRAD_NORM,
        "steps_per_print": 10**9,
    }
    if zero == 3:  # the default threshold (1e5 elements) would keep every tensor of this tiny teacher whole
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def sharded(model: torch.nn.Module) -> bool:
    """Every parameter is a ZeRO-3 partition, this process holding only its part."""
    return all(hasattr(p, "ds_numel") and p.ds_tensor.numel() < p.ds_numel for p in model.parameters())


def distributed(out: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    from linearize.distributed import deepspeed_frozen_teacher, unpartition

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_process = GLOBAL_BATCH // world
    micro = per_process // GRAD_ACCUM
    result, weights = {}, {}
    for zero in (2, 3):
        student, frozen = build()
        data = batches(student.config.vocab_size)
        config = ds_config(zero, world)
        teacher = deepspeed_frozen_teacher(frozen, config, micro, world)
        losses, weights[f"zero{zero}"] = {}, {}
        checks = {"teacher_engine": teacher is not frozen, "teacher_sharded": sharded(frozen)}
        for stage in ("attention", "logits"):
            if stage == "attention":
                model, loss_fn = attention_stage(student, LiveTeacher(teacher))
            else:
                model, loss_fn = logits_stage(
                    student, LogitsStageConfig(trainable="attention"), LiveTeacher(teacher)
                )
            params = [p for p in model.parameters() if p.requires_grad]
            engine, *_ = deepspeed.initialize(
                model=model, model_parameters=params, config=config, lr_scheduler=schedule
            )
            checks[f"{stage}_zero_stage"] = engine.zero_optimization_stage()
            checks[f"{stage}_student_sharded"] = sharded(student)
            wrapped = DeepSpeedEngineWrapper(engine)
            losses[stage] = []
            for step in range(STEPS):
                mine = data[step, rank * per_process : (rank + 1) * per_process]
                step_loss = torch.zeros(())
                for m in range(GRAD_ACCUM):
                    loss = loss_fn(engine, mine[m * micro : (m + 1) * micro])
                    wrapped.backward(loss / GRAD_ACCUM, sync_gradients=m == GRAD_ACCUM - 1)
                    step_loss += loss.detach() / GRAD_ACCUM
                dist.all_reduce(step_loss)
                losses[stage].append(step_loss.item() / world)
            engine.destroy()  # as accelerator.free_memory() does; then the end of our train_stage:
            unpartition(student)
            weights[f"zero{zero}"][stage] = {k: v.clone() for k, v in student.state_dict().items()}
            whole = not any(hasattr(p, "ds_id") for p in student.parameters())
            tied = student.get_input_embeddings().weight is student.get_output_embeddings().weight
            checks[f"{stage}_whole_after"] = whole and tied
        result[f"zero{zero}"] = {"losses": losses, "checks": checks}
    torch.save(weights, weights_path(out, rank))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--plain", action="store_true", help="one process, plain torch AdamW")
    args = parser.parse_args()
    plain(args.out) if args.plain else distributed(args.out)
