"""The training loop: one function, top to bottom — prepare, resume, step, log, checkpoint."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from linearize import checkpoint
from linearize.config import Recipe, StageConfig
from linearize.data import IndexedBlocks
from linearize.distributed import Placement, peak_over_processes
from linearize.errors import Interrupted, LinearizeError

if TYPE_CHECKING:
    from linearize.data import StreamedBlocks

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
            if not found and torch.is_tensor(out) and not torch.isfinite(out).all():
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


class TrainingError(LinearizeError, RuntimeError):
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


def train_stage(
    *,
    name: str,
    cfg: StageConfig,
    recipe: Recipe,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    blocks: torch.Tensor | None = None,
    source: IndexedBlocks | StreamedBlocks | None = None,
    stage_dir: Path,
    log: MetricsLog,
    placement: Placement,
) -> StageResult:
    """Train `model`'s parameters that require grad for `cfg.steps` optimizer steps, resuming from the
    newest complete checkpoint under `stage_dir/checkpoints` if there is one.

    `loss_fn(prepared_model, input_ids)` returns the scalar loss of one micro-batch [batch, seq].
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    def build(params):
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, cfg.warmup_steps, max(cfg.steps, 1), min_lr_rate=cfg.min_lr_ratio
        )
        return optimizer, scheduler

    accelerator = placement.accelerator
    module = model
    model, optimizer, scheduler, params = placement.prepare_training(
        model, build, cfg.batch_size, cfg.max_grad_norm
    )
    if not params:
        raise TrainingError(f"stage {name}: nothing to train (no parameter requires grad)")
    rank = accelerator.process_index
    if source is None:  # in-memory blocks: batches are a pure function of (seed, step)
        source = IndexedBlocks(blocks, recipe.seed, cfg.batch_size, rank, accelerator.num_processes)
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
    step = start
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            step_loss = torch.zeros((), device=accelerator.device)
            skip = ""  # why this step is skipped (a non-finite loss the recipe allows to skip), else ""
            for micro in range(cfg.grad_accum):
                batch = source.batch(step * cfg.grad_accum + micro).to(accelerator.device)
                last = micro == cfg.grad_accum - 1
                # under DeepSpeed, accelerator.backward() steps the engine when sync_gradients is set
                accelerator.sync_gradients = last
                with placement.micro_batch(model, last):
                    with accelerator.autocast():
                        loss = loss_fn(model, batch)
                    if last and fault(step + 1, "nan"):
                        loss = loss * float("nan")
                    # every rank learns whether any rank's loss is bad, so all stop together (no rank hangs)
                    bad = accelerator.reduce(
                        torch.isfinite(loss.detach()).logical_not().float(), reduction="sum"
                    )
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
                placement.skip_step(model)
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
            # refresh=False: the bar's mininterval decides when it is drawn
            bar.set_postfix(loss=f"{last_loss:.4g}", tok_s=f"{tok_s:,.0f}", refresh=False)
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
    except KeyboardInterrupt:
        raise interrupted(name, step, cfg.steps, ckpt_root) from None
    finally:
        bar.close()  # before any error message, which then stays the last line
    placement.finish_training(module)
    seconds = time.perf_counter() - began
    rate = (cfg.steps - start) * tokens_per_step / max(seconds, 1e-9)
    peak = peak_over_processes(accelerator)
    return StageResult(cfg.steps, cfg.steps * tokens_per_step, last_loss, seconds, rate, peak)


def interrupted(name: str, step: int, steps: int, ckpt_root: Path) -> Interrupted:
    """The Ctrl-C error of a stage: the step it stopped in and the step a rerun resumes from."""
    found = checkpoint.latest(ckpt_root)
    resume = f"step {found[0]} ({found[1]})" if found else f"the start of stage {name} (no checkpoint yet)"
    return Interrupted(
        f"interrupted (Ctrl-C) at step {step + 1}/{steps} of stage {name}; rerun the same command to resume "
        f"from {resume}"
    )


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
    except checkpoint.SaveError as err:  # a full disk, a quota, a lost mount: the last checkpoint is whole
        previous = checkpoint.latest(root)
        kept = (
            f"the last complete checkpoint, step {previous[0]} ({previous[1]}), is intact"
            if previous
            else "no earlier checkpoint of this stage exists"
        )
        raise TrainingError(
            f"stage {stage}: could not write checkpoint {target}: {err.reason}; {kept}. Free space under {root} "
            "and rerun the same command to resume"
        ) from None
    if accelerator.is_main_process:
        checkpoint.prune(root, recipe.train.keep_checkpoints)
