"""The training loop: one function, top to bottom — prepare, resume, step, log, checkpoint."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from linearize.config import Recipe, RecipeError, StageConfig
from linearize.distill import checkpoint
from linearize.distill.data import IndexedBlocks

# Test hook: "STAGE:STEP[:WHEN][@RANK]" makes the process (only rank RANK, if given) SIGKILL itself at
# optimizer step STEP: WHEN is "after" (the step is done; the default), "mid" (gradients computed, the
# optimizer not yet stepped) or "save" (while writing that step's checkpoint, before it is complete).
# Tests check that a rerun resumes to the same result as an uninterrupted run. WHEN "nan" instead makes
# the loss of that step's last micro-batch NaN (the non-finite-loss handling, on any backend).
FAULT_ENV = "LINEARIZE_FAULT_AFTER_STEP"


def _fault_hook(name: str, rank: int):
    """A function `(step, when)` that kills this process where FAULT_ENV says (or, for when="nan", says
    whether to poison the loss there)."""
    spec = os.environ.get(FAULT_ENV, "")
    where, _, only_rank = spec.partition("@")
    stage, _, rest = where.partition(":")
    step, _, when = rest.partition(":")
    armed = stage == name and (not only_rank or int(only_rank) == rank)

    def hook(done: int, at: str) -> bool:
        hit = armed and int(step) == done and (when or "after") == at
        if hit and at != "nan":
            os.kill(os.getpid(), signal.SIGKILL)
        return hit

    return hook


def _first_nonfinite_layer(model: torch.nn.Module, batch: torch.Tensor, loss_fn) -> str:
    """Rerun the batch with hooks on every decoder layer and its attention: the first module whose output
    is not finite (or 'none' when every layer output is finite and only the loss is not)."""
    import re

    found: list[str] = []
    handles = []

    def watch(module_name):
        def hook(module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            aligned = getattr(module, "alignment_loss", None)  # stage 1: the output is the teacher's
            if found:
                return
            if torch.is_tensor(aligned) and not torch.isfinite(aligned).all():
                found.append(f"{module_name} (its alignment loss)")
            elif torch.is_tensor(out) and not torch.isfinite(out).all():
                found.append(module_name)

        return hook

    for module_name, module in model.named_modules():
        if re.search(r"layers\.\d+(\.self_attn)?$", module_name):
            handles.append(module.register_forward_hook(watch(module_name)))
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else "none (every layer output is finite; the loss itself is not)"


class TrainingError(RuntimeError):
    """A step produced something training cannot continue from (a NaN loss, say)."""


@dataclass
class StageResult:
    steps: int
    tokens: int
    last_loss: float | None
    seconds: float
    tokens_per_second: float = 0.0
    """Over the steps this run made (a resumed stage counts from where it resumed), checkpoints included."""
    peak_memory: int = 0
    """Bytes, the largest over the processes: CUDA memory allocated at its peak during the stage, or on CPU
    the process's peak resident memory so far (see `peak_memory`)."""


def peak_memory(device: torch.device) -> int:
    """This process's memory high-water mark: allocated CUDA memory since the last
    `torch.cuda.reset_peak_memory_stats` on a GPU, else the peak resident set size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended by the main process."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def append(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def drop_after(self, stage: str, step: int) -> None:
        """Forget lines a killed run logged past the checkpoint it resumes from (they are replayed)."""
        if self.enabled and self.path.is_file():
            keep = [r for r in self.records() if not (r.get("stage") == stage and r.get("step", 0) > step)]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


# How long a process waits at a collective (NCCL's default is 10 minutes). Rank 0 alone reads, saves and
# exports the whole model while the others wait: under FSDP2 a 72B teacher is 145 GB to read or write, and
# the export adds a forward on CPU. A process that dies is still noticed at once by torchrun / accelerate.
COLLECTIVE_TIMEOUT_MINUTES = 60


def make_accelerator(recipe: Recipe):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # The schedule counts optimizer steps of the global batch. By default accelerate steps a prepared
    # scheduler once per process per step (it assumes per-process schedules), which would run the
    # warmup and decay num_processes times too fast.
    accelerator = Accelerator(
        mixed_precision="bf16" if recipe.train.precision == "bf16" else "no",
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES))],
    )
    if accelerator.distributed_type.value == "FSDP" and not accelerator.is_fsdp2:
        raise RecipeError(
            "FSDP1 (fsdp_version: 1) is not supported: set fsdp_version: 2 in the accelerate config, or use "
            "launch.accelerate_config=fsdp2 (the shipped FSDP2 config)"
        )
    return accelerator


def shard_fsdp2(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """`model` sharded in place by accelerate's FSDP2 preparation, each decoder layer and each mixer (self_attn)
    an FSDP unit of its own: stage attention's loss leaves a mixer through its second output (see
    `Mixer.forward`), and FSDP2 gathers a unit's weights for backward only when a gradient reaches one of the
    unit's outputs. The weights come from rank 0 by broadcast (accelerate's cpu_ram_efficient_loading), so
    every other process may hold `model` empty, on the meta device (see `linearize.convert.sharded`)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from linearize.architectures.mixers import mixers

    if isinstance(model, FSDPModule):
        return model
    plugin = accelerator.state.fsdp_plugin
    policy = plugin.auto_wrap_policy  # the function, or the partial of it a previous prepare() made
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
        raise RecipeError(
            "under FSDP2 linearize needs fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP in the accelerate config "
            "(each decoder layer and each mixer its own unit), as the shipped fsdp2 config has"
        )
    # The names are this model's: the config's (or a previous model's) that it has, its decoder layer, its
    # mixers. accelerate refuses a name the model lacks (a frozen teacher has no mixers).
    names = [
        *(plugin.transformer_cls_names_to_wrap or []),
        *(getattr(model, "_no_split_modules", None) or []),
    ]
    names += [type(m).__name__ for m in mixers(model)]
    present = {type(m).__name__ for m in model.modules()}
    plugin.transformer_cls_names_to_wrap = sorted(set(names) & present)
    plugin.cpu_ram_efficient_loading = True  # only rank 0 need hold the weights
    return fsdp2_prepare_model(accelerator, model)


def train_stage(
    *,
    name: str,
    cfg: StageConfig,
    recipe: Recipe,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    blocks: torch.Tensor | None = None,
    source=None,
    stage_dir: Path,
    log: MetricsLog,
    accelerator,
) -> StageResult:
    """Train `model`'s parameters that require grad for `cfg.steps` optimizer steps, resuming from the
    newest complete checkpoint under `stage_dir/checkpoints` if there is one.

    `loss_fn(prepared_model, input_ids)` returns the scalar loss of one micro-batch [batch, seq].
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    if accelerator.is_fsdp2:
        # sharded before the optimizer is built over its parameters: prepare() would map an optimizer's
        # parameters to the sharded ones by data_ptr, which is 0 for every empty (meta) parameter of rank > 0
        model = shard_fsdp2(accelerator, model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"stage {name}: nothing to train (no parameter requires grad)")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, cfg.warmup_steps, max(cfg.steps, 1), min_lr_rate=cfg.min_lr_ratio
    )
    per_process = cfg.batch_size
    module = model
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # DeepSpeed takes its batch size from a dataloader, which we do not prepare, and this stage's
        # values replace the last stage's. The loop accumulates itself (see sync_gradients below), and the
        # recipe's clipping rules, as without DeepSpeed.
        plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=per_process,
            gradient_accumulation_steps=1,
            train_batch_size=per_process * accelerator.num_processes,
            gradient_clipping=cfg.max_grad_norm,
        )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # FSDP2 shards in place: the parameters the optimizer steps (and whose norm is clipped) are new objects
    params = [p for p in model.parameters() if p.requires_grad]
    rank = accelerator.process_index
    if source is None:  # in-memory blocks: batches are a pure function of (seed, step)
        source = IndexedBlocks(blocks, recipe.seed, per_process, rank, accelerator.num_processes)
    ckpt_root = stage_dir / "checkpoints"
    start, last_loss, skipped = 0, None, 0
    found = checkpoint.latest(ckpt_root)
    if found is not None:
        # Nothing draws random numbers between here and the first step, so the restored RNG state is
        # exactly the one the killed run had; a stream continues from the position saved with the step.
        accelerator.load_state(str(found[1]))
        info = json.loads((found[1] / checkpoint.MARKER).read_text())
        start, last_loss, skipped = info["step"], info.get("loss"), info.get("skipped", 0)
        data_state = found[1] / f"data_state_{rank}.json"
        if data_state.is_file():
            source.load_state_dict(json.loads(data_state.read_text()))
        accelerator.print(f"[{name}] resuming from {found[1]} (step {start}/{cfg.steps})")
    log.drop_after(name, start)

    tokens_per_step = cfg.tokens_per_step(accelerator.num_processes, source.seq_len)
    fault = _fault_hook(name, accelerator.process_index)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    began = time.perf_counter()
    model.train()
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=name,
        unit="step",
        disable=not accelerator.is_main_process,
        mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not every step
    )
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        step_loss = torch.zeros((), device=accelerator.device)
        skip = ""  # why this step is skipped (a non-finite loss the recipe allows to skip), else ""
        for micro in range(cfg.grad_accum):
            batch = source.batch(step * cfg.grad_accum + micro).to(accelerator.device)
            last = micro == cfg.grad_accum - 1
            # under DeepSpeed, accelerator.backward() steps the engine when sync_gradients is set
            accelerator.sync_gradients = last
            # FSDP2 reduce-scatters every micro-batch: under no_sync it would hold whole (unsharded) gradients
            # of every parameter until the last one, outside anything zero_grad() clears after a skipped step
            with nullcontext() if last or accelerator.is_fsdp2 else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss = loss_fn(model, batch)
                if last and fault(step + 1, "nan"):
                    loss = loss * float("nan")
                # every rank learns whether any rank's loss is bad, so all stop together (no rank hangs)
                bad = accelerator.reduce(torch.isfinite(loss.detach()).logical_not().float(), reduction="sum")
                if bad.item():
                    where = _first_nonfinite_layer(model, batch, loss_fn)
                    skip = (
                        f"stage {name}: non-finite loss on {int(bad.item())} of {accelerator.num_processes} "
                        f"process(es) at step {step + 1} (micro-batch {micro}); on rank {rank}: loss "
                        f"{loss.item()}, {source.describe()}, first non-finite output in {where}"
                    )
                    if skipped >= recipe.train.skip_nonfinite:
                        raise TrainingError(
                            f"{skip}. Lower stages.{name}.lr, use train.precision=fp32, check those blocks, or "
                            f"let train.skip_nonfinite (now {recipe.train.skip_nonfinite}) skip such steps"
                        )
                    break
                accelerator.backward(loss / cfg.grad_accum)
            step_loss += loss.detach() / cfg.grad_accum
        accelerator.sync_gradients = True  # also after a skipped step: zero_grad() clears only when set
        fault(step + 1, "mid")
        if skip:  # every rank saw the same all-reduced verdict: no rank steps, none waits
            skipped += 1
            if plugin is not None:
                drop_deepspeed_gradients(model)
            accelerator.print(f"[{name}] skipped ({skipped}/{recipe.train.skip_nonfinite}): {skip}")
        else:
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            last_loss = accelerator.reduce(step_loss, reduction="mean").item()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        tok_s = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{last_loss:.4g}", tok_s=f"{tok_s:,.0f}", refresh=False)  # mininterval rules
        bar.update(1)
        if done % recipe.train.log_every == 0 or done == cfg.steps:
            peak = peak_over_processes(accelerator)
            log.append(
                {
                    "stage": name,
                    "step": done,
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": done * tokens_per_step,
                    "tok_s": tok_s,
                    "peak_memory_gib": round(peak / 2**30, 3),
                    **({"skipped": skip} if skip else {}),
                }
            )
        if done % recipe.train.checkpoint_every == 0 or done == cfg.steps:
            info = {"stage": name, "step": done, "loss": last_loss, "skipped": skipped}
            _save(accelerator, ckpt_root, info, recipe, source, lambda d=done: fault(d, "save"))
        fault(done, "after")
    bar.close()
    accelerator.free_memory()
    if plugin is not None:  # DeepSpeed left the weights partitioned (ZeRO-3) or in flat buffers (ZeRO-1/2)
        unpartition(module)
    seconds = time.perf_counter() - began
    rate = (cfg.steps - start) * tokens_per_step / max(seconds, 1e-9)
    peak = peak_over_processes(accelerator)
    return StageResult(cfg.steps, cfg.steps * tokens_per_step, last_loss, seconds, rate, peak)


def max_over_processes(n: int, device) -> int:
    """The largest `n` of any process (every process calls it); `n` itself without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    count = torch.tensor(n, device=device, dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def peak_over_processes(accelerator) -> int:
    """The largest `peak_memory` of any process (every process must call it)."""
    return max_over_processes(peak_memory(accelerator.device), accelerator.device)


def drop_deepspeed_gradients(engine) -> None:
    """Forget what the micro-batches of a skipped step accumulated in a DeepSpeed engine, as the engine's own
    overflow handling does: the engine steps (and then clears) only on a step's last micro-batch, and
    accelerate's optimizer.zero_grad() does nothing under DeepSpeed, so they would be added to the next step.
    ZeRO-3's zero_grad() also restarts accumulation; ZeRO-1/2 keep the sums so far, reduced partitions and a
    micro-step count of their own, reset here as their step() does on an overflow."""
    optimizer = engine.optimizer
    optimizer.zero_grad(set_to_none=True)
    if engine.zero_optimization_stage() in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        optimizer._release_preflattened_grad_buffers()
        if optimizer.cpu_offload:
            optimizer.reset_cpu_buffers()
        for held in (optimizer.averaged_gradients, optimizer.all_grad_tensors):  # reduced; summed so far
            for group in held:
                held[group] = None
        optimizer.micro_step_id = INITIAL_MICRO_STEP_ID


def unpartition(model: torch.nn.Module) -> None:
    """Put whole, plain parameters in place of those a ZeRO-3 engine left partitioned (every process
    holding a slice; its engine is gone after `accelerator.free_memory()`), as the model was before
    `prepare()`: evaluation, saving and export read whole weights, and the next stage's engine partitions
    them afresh. Each module's parameters are gathered in turn, on every process; tied ones stay tied.
    ZeRO-1/2 leave the trained parameters whole but as views into one flat buffer of the engine's, which
    safetensors refuses to save: each gets its own storage back."""
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.untyped_storage().nbytes() > p.numel() * p.element_size():
            p.data = p.data.clone()
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return
    import deepspeed

    plain: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        mine = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id") and id(p) not in plain]
        with deepspeed.zero.GatheredParameters(mine):
            plain |= {id(p): torch.nn.Parameter(p.data.clone(), requires_grad=p.requires_grad) for p in mine}
        for name, p in module.named_parameters(recurse=False):
            if id(p) in plain:
                setattr(module, name, plain[id(p)])


def _save(accelerator, root: Path, info: dict, recipe: Recipe, source, fault=lambda: None) -> None:
    step, stage = info["step"], info["stage"]

    def write(tmp: Path) -> None:
        accelerator.save_state(str(tmp))
        state = source.state_dict()
        if state:  # every process saves its own position in its share of the stream
            (tmp / f"data_state_{accelerator.process_index}.json").write_text(json.dumps(state))
        if accelerator.is_main_process:
            (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        fault()

    target = checkpoint.step_dir(root, step)
    try:
        checkpoint.write_atomic(
            target,
            write,
            info=info,
            is_main=accelerator.is_main_process,
            barrier=accelerator.wait_for_everyone,
        )
    except OSError as err:  # a full disk, a quota, a lost mount: the previous checkpoint is still whole
        previous = checkpoint.latest(root)
        kept = (
            f"the last complete checkpoint {previous[1]} is intact" if previous else "no earlier checkpoint"
        )
        raise TrainingError(
            f"stage {stage}: could not write checkpoint {target} ({err.strerror or err}); {kept}. Free space "
            f"under {root} and rerun the same command to resume"
        ) from err
    if accelerator.is_main_process:
        checkpoint.prune(root, recipe.train.keep_checkpoints)
