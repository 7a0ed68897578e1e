"""Placement: where the teacher and the student live under one process, DDP, DeepSpeed ZeRO or FSDP2.

`Placement` is the one interface the orchestrator and the training loop ask (load the teacher, place it
for evaluation and for the stages, hold the student between stages, prepare a stage's model, undo a
strategy's changes after it); the helpers below it are each one strategy's mechanics.

Under one process, DDP and DeepSpeed every process holds the whole model on its device outside the training
steps (`WholeStudent`). Under FSDP2 only rank 0 holds it whole, in CPU memory, and every other process an
empty copy on the meta device (`ShardedStudent`): evaluation, sampling and the teacher's logit cache run on
the model sharded over the processes, so a teacher bigger than a device (Qwen2.5-72B on 80 GB GPUs) loads,
trains, evaluates and exports. `Sharding` models what each strategy divides over the processes, for the
memory estimate.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from linearize.architectures.mixers import mixers
from linearize.config import Recipe, RecipeError, accelerate_config_path

if TYPE_CHECKING:
    from accelerate import Accelerator
    from deepspeed.runtime.engine import DeepSpeedEngine
    from transformers import PretrainedConfig


class Placement:
    """One process, DDP, DeepSpeed ZeRO or FSDP2 behind one interface. The student shares the teacher's
    weights (see `linearize.convert.swap.swap`); the placement decides where each lives:

    - the teacher as evaluation, sampling and the logit cache run it (`evaluated_teacher`): whole on this
      device, or (FSDP2) a view of its own sharded over the processes;
    - the teacher as the stages run it (`stage_teacher`): the same, or (ZeRO-3) a view of its own in an
      inference engine sharded over the processes; and a frozen copy where stage logits trains the weights
      the student shares with it (`frozen_teacher`);
    - the student between stages (`student`): whole on every device, or (FSDP2) whole in rank 0's CPU memory;
    - a stage's model (`prepare_training`, `skip_step`, `finish_training`)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.sharded = bool(accelerator.is_fsdp2)
        """FSDP2: the model whole on no device, only in rank 0's CPU memory; forwards run sharded."""
        self.zero = zero_stage(accelerator)
        self.teacher_sharded = self.sharded or self.zero == 3
        """The teacher's weights are sharded over the processes: a view of its own, never shared."""

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> Placement:
        placement = cls(make_accelerator(recipe))
        if placement.accelerator.state.deepspeed_plugin is not None:
            # accelerate's ZeRO-3 plugin turns on transformers' zero.Init: every model built or loaded from
            # here on (the teacher, the meta-device student of the memory estimate, the exported model) would
            # come up partitioned. linearize swaps mixers into a whole teacher and lets prepare() partition.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        return placement

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def describe(self) -> str:
        a = self.accelerator
        return (
            f"processes={a.num_processes} backend={a.state.backend or 'none'} device={a.device} "
            f"distributed={a.distributed_type.value}"
        )

    def memory_kind(self) -> str:
        """What `peak_memory` measures here."""
        return "CUDA allocated" if self.device.type == "cuda" else "process RSS"

    def lock_step(self) -> Callable[[int], int] | None:
        """For loops over a share of the data that run forwards of a sharded model: every process must run
        as many as the busiest one (`max_over_processes`); None where each process runs its own model."""
        return (lambda n: max_over_processes(n, self.device)) if self.sharded else None

    def load_teacher(
        self, load: Callable[..., tuple[nn.Module, Any]], path: str, dtype: str
    ) -> tuple[nn.Module, Any]:
        """`load(path, dtype, empty=...)` (`linearize.convert.teachers.load_teacher`): under FSDP2 only rank 0
        reads the weights, every other process builds the model empty and receives its shards from rank 0."""
        model, tokenizer = load(path, dtype, empty=self.sharded and not self.is_main)
        if self.sharded:
            self.print(
                f"[fsdp2] rank 0 holds the whole model in CPU memory; the other {self.num_processes - 1} "
                "process(es) build it empty and receive their shards from rank 0"
            )
        return model, tokenizer

    def evaluated_teacher(self, teacher: nn.Module) -> nn.Module:
        """The teacher as evaluation, sampling and the logit cache run it: whole on this device (the
        student, sharing its parameters, moves with it), or (FSDP2) a view of its own sharded over the
        processes (the student stays whole in rank 0's CPU memory)."""
        teacher.requires_grad_(False).eval()  # before sharding: FSDP2 upcasts only trainable parameters
        if self.sharded:
            return shard_fsdp2(self.accelerator, weight_sharing_view(teacher)).eval()
        return teacher.to(self.device)

    def stage_teacher(self, teacher: nn.Module, batch_size: int) -> nn.Module:
        """The evaluated teacher as the stages run it: under ZeRO-3 a view of its own in an inference engine
        sharded like the student (the student's engine will partition the parameters they would share)."""
        if self.zero == 3:
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            return deepspeed_frozen_teacher(
                weight_sharing_view(teacher), config, batch_size, self.num_processes
            )
        return teacher

    def frozen_teacher(self, teacher: nn.Module) -> nn.Module:
        """The stage teacher for a stage that trains the weights the student shares with it: a frozen whole
        copy on this device, or the sharded teacher itself (already a view of its own)."""
        if self.teacher_sharded:
            return teacher
        return copy.deepcopy(teacher).requires_grad_(False).eval()

    def student(self, model: nn.Module) -> WholeStudent | ShardedStudent:
        """The student between stages (`plain()` to change it, `sharded()` to run it)."""
        if self.sharded:
            return ShardedStudent(model, self.accelerator)
        # the parameters it shares with the teacher move with either; its buffers (rotary) are its own
        return WholeStudent(model.to(self.device))

    def prepare_training(
        self,
        model: nn.Module,
        build: Callable[[list[nn.Parameter]], tuple[torch.optim.Optimizer, Any]],
        batch_size: int,
        max_grad_norm: float,
    ) -> tuple[nn.Module, torch.optim.Optimizer | None, Any, list[nn.Parameter]]:
        """(model, optimizer, scheduler, trained parameters) prepared by accelerate for one stage;
        `build(params)` makes the optimizer and scheduler over the parameters that require grad."""
        if self.sharded:
            # sharded before the optimizer is built over its parameters: prepare() would map an optimizer's
            # parameters to the sharded ones by data_ptr, which is 0 for every empty (meta) parameter of rank > 0
            model = shard_fsdp2(self.accelerator, model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return model, None, None, []
        optimizer, scheduler = build(params)
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None:
            # DeepSpeed takes its batch size from a dataloader, which we do not prepare, and this stage's
            # values replace the last stage's. The loop accumulates itself (it sets sync_gradients), and
            # the recipe's clipping rules, as without DeepSpeed.
            plugin.deepspeed_config.update(
                train_micro_batch_size_per_gpu=batch_size,
                gradient_accumulation_steps=1,
                train_batch_size=batch_size * self.num_processes,
                gradient_clipping=max_grad_norm,
            )
        model, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        # FSDP2 shards in place: the parameters the optimizer steps (and whose norm is clipped) are new objects
        return model, optimizer, scheduler, [p for p in model.parameters() if p.requires_grad]

    def micro_batch(self, model: nn.Module, last: bool) -> AbstractContextManager:
        """Around a micro-batch's forward and backward: gradients are reduced over the processes on the last
        micro-batch of a step only (`no_sync` before it), except under FSDP2, which reduce-scatters every one:
        under no_sync it would hold whole (unsharded) gradients of every parameter until the last, outside
        anything zero_grad() clears after a skipped step."""
        return nullcontext() if last or self.sharded else self.accelerator.no_sync(model)

    def skip_step(self, model: nn.Module) -> None:
        """Forget the gradients of a step that is skipped (a non-finite loss)."""
        if self.accelerator.state.deepspeed_plugin is not None:
            drop_deepspeed_gradients(model)

    def finish_training(self, module: nn.Module) -> None:
        """After a stage: the engines go; DeepSpeed's partitioned or flat-buffer weights become plain ones
        in `module` (the model as it was before `prepare_training`)."""
        self.accelerator.free_memory()
        if self.accelerator.state.deepspeed_plugin is not None:
            unpartition(module)

    def load_exported(self, out: Path, dtype: torch.dtype) -> nn.Module:
        """The exported model as a user loads it (`AutoModelForCausalLM`, in the teacher's dtype), to sample
        from: whole on this device, or (FSDP2) read by rank 0, built empty elsewhere and sharded."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if not self.sharded:
            return AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(self.device)
        if self.is_main:
            model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
        else:
            model = load_empty(AutoConfig.from_pretrained(out), dtype)
        return shard_fsdp2(self.accelerator, model.requires_grad_(False)).eval()


def weight_sharing_view(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` whose new parameter objects hold the very same tensors (no weight is copied):
    a strategy that shards it (FSDP2, ZeRO-3 replace or empty each parameter's data) leaves `model` whole."""
    memo: dict[int, object] = {id(p): nn.Parameter(p.data, requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo).requires_grad_(False).eval()


# ---- collectives and memory


def max_over_processes(n: int, device: torch.device) -> int:
    """The largest `n` of any process (every process calls it); `n` itself without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    count = torch.tensor(n, device=device, dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def peak_over_processes(accelerator: Accelerator) -> int:
    """The largest `peak_memory` of any process (every process must call it)."""
    return max_over_processes(peak_memory(accelerator.device), accelerator.device)


def peak_memory(device: torch.device) -> int:
    """This process's memory high-water mark: allocated CUDA memory since the last
    `torch.cuda.reset_peak_memory_stats` on a GPU, else the peak resident set size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---- what each strategy divides (for the memory estimate)


@dataclass(frozen=True)
class Sharding:
    """What the distributed strategy divides over the processes, read from an accelerate config."""

    name: str
    weights: bool = False
    """Parameters sharded at rest (FSDP full shard, ZeRO-3)."""
    gradients: bool = False
    """Gradients sharded (FSDP, ZeRO-2/3)."""
    optimizer: bool = False
    """Optimizer state (and fp32 master weights) sharded (FSDP, ZeRO-1/2/3)."""
    offload_optimizer: bool = False
    """Optimizer state kept in CPU memory (DeepSpeed offload_optimizer_device, FSDP offload_params)."""
    offload_params: bool = False
    """Parameters kept in CPU memory between uses (DeepSpeed offload_param_device, FSDP offload_params)."""
    gradient_buckets: bool = False
    """DDP: gradients are copied into all-reduce buckets, a second gradient-sized buffer."""
    frozen_teacher: bool = False
    """The teacher is a sharded view of its own for the whole run (ZeRO-3, FSDP2; see
    `Placement`); elsewhere it shares the student's weights, or
    (stage logits training them) every process holds a whole frozen copy."""
    whole_on_host: bool = False
    """FSDP2: outside the training steps too the model is whole on no device, only in rank 0's CPU memory
    (see `ShardedStudent`); elsewhere every process holds it whole on its device."""

    @classmethod
    def from_accelerate_config(cls, config: str | Path | dict | None) -> Sharding:
        """From an accelerate config: a shipped name, a path, the parsed YAML, or None (one process)."""
        if not config:
            return cls(name="single process")
        if not isinstance(config, dict):
            import yaml

            config = yaml.safe_load(accelerate_config_path(str(config)).read_text()) or {}
        kind = config.get("distributed_type", "NO")
        if kind == "FSDP":
            fsdp = config.get("fsdp_config") or {}
            version = int(fsdp.get("fsdp_version", 1))
            reshard = fsdp.get("fsdp_reshard_after_forward", True)
            # FSDP1 names its strategy in fsdp_sharding_strategy or (newer) in fsdp_reshard_after_forward
            strategy = fsdp.get("fsdp_sharding_strategy") or (
                reshard if version == 1 and not isinstance(reshard, bool) else "FULL_SHARD"
            )
            return cls._fsdp(
                version, str(strategy), _truthy(reshard), _truthy(fsdp.get("fsdp_offload_params", False))
            )
        if kind == "DEEPSPEED":
            ds = config.get("deepspeed_config") or {}
            if ds.get("deepspeed_config_file"):
                zero = json.loads(Path(ds["deepspeed_config_file"]).read_text()).get("zero_optimization", {})
                stage = int(zero.get("stage", 0))
                off_opt = (zero.get("offload_optimizer") or {}).get("device", "none")
                off_par = (zero.get("offload_param") or {}).get("device", "none")
            else:
                stage = int(ds.get("zero_stage", 0))
                off_opt = ds.get("offload_optimizer_device", "none")
                off_par = ds.get("offload_param_device", "none")
            return cls._zero(stage, off_opt not in (None, "none"), off_par not in (None, "none"))
        if kind in ("MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_CPU", "MULTI_HPU"):
            return cls(name="DDP", gradient_buckets=True)
        return cls(name="single process")

    @classmethod
    def from_accelerator(cls, accelerator: Accelerator) -> Sharding:
        """From a live Accelerator: what the launcher actually set up."""
        kind = accelerator.distributed_type.value
        state = accelerator.state
        if kind == "FSDP":
            plugin = state.fsdp_plugin
            version = int(getattr(plugin, "fsdp_version", 1) or 1)
            reshard = getattr(plugin, "reshard_after_forward", True)  # FSDP1: a ShardingStrategy
            strategy = getattr(reshard, "name", None) or getattr(
                getattr(plugin, "sharding_strategy", None), "name", "FULL_SHARD"
            )
            offload = plugin.cpu_offload  # FSDP1: CPUOffload(offload_params=...); FSDP2: an offload policy
            if version >= 2:
                offloaded = type(offload).__name__ == "CPUOffloadPolicy"
            else:
                offloaded = bool(getattr(offload, "offload_params", False))
            return cls._fsdp(version, strategy, reshard is not False, offloaded)
        if kind == "DEEPSPEED":
            zero = state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            off_opt = (zero.get("offload_optimizer") or {}).get("device", "none")
            off_par = (zero.get("offload_param") or {}).get("device", "none")
            return cls._zero(
                int(zero.get("stage", 0)), off_opt not in (None, "none"), off_par not in (None, "none")
            )
        if accelerator.num_processes > 1:
            return cls(name="DDP", gradient_buckets=True)
        return cls(name="single process")

    @classmethod
    def _fsdp(cls, version: int, strategy: str, reshard: bool, offload: bool) -> Sharding:
        if version >= 2:
            # reshard_after_forward=False keeps every layer's full parameters from forward to backward
            full = reshard
            name = f"FSDP2{'' if reshard else ' (no reshard after forward)'}"
        else:
            strategy = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD"}.get(strategy, strategy)
            if strategy == "NO_SHARD":
                return cls(name="FSDP NO_SHARD", gradient_buckets=True)
            # a HYBRID strategy shards within a node only: not modelled, counted as not sharding weights
            full = strategy == "FULL_SHARD"
            name = f"FSDP {strategy}"
        return cls(
            name=name + (" + offload" if offload else ""),
            weights=full,
            frozen_teacher=full and version >= 2,
            whole_on_host=version >= 2,
            gradients=True,
            optimizer=True,
            offload_optimizer=offload,
            offload_params=offload,
        )

    @classmethod
    def _zero(cls, stage: int, offload_optimizer: bool, offload_params: bool) -> Sharding:
        return cls(
            name=f"ZeRO-{stage}" + (" + offload" if offload_optimizer or offload_params else ""),
            weights=stage >= 3,
            frozen_teacher=stage >= 3,
            gradients=stage >= 2,
            optimizer=stage >= 1,
            offload_optimizer=offload_optimizer,
            offload_params=offload_params and stage >= 3,
            gradient_buckets=stage == 0,
        )


def _truthy(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


# ---- accelerate, FSDP2


# How long a process waits at a collective (NCCL's default is 10 minutes). Rank 0 alone reads, saves and
# exports the whole model while the others wait: under FSDP2 a 72B teacher is 145 GB to read or write, and
# the export adds a forward on CPU. A process that dies is still noticed at once by torchrun / accelerate.
COLLECTIVE_TIMEOUT_MINUTES = 60


def quiet_tied_weights_warning() -> None:
    """Drop accelerate's "Removed shared tensor {'...lm_head.weight'} while saving. This should be OK" at every
    checkpoint: a model with tied input and output embeddings shares that tensor by design, and the resume
    tests check that a checkpoint reloads to the same weights."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in str(record.msg)  # accelerate prefixes "[RANK n] "

    logger = logging.getLogger("accelerate.utils.other")
    if not any(getattr(f, "__name__", "") == keep.__name__ for f in logger.filters):
        logger.addFilter(keep)


def make_accelerator(recipe: Recipe) -> Accelerator:
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
    quiet_tied_weights_warning()
    if accelerator.distributed_type.value == "FSDP" and not accelerator.is_fsdp2:
        raise RecipeError(
            "FSDP1 (fsdp_version: 1) is not supported: set fsdp_version: 2 in the accelerate config, or use "
            "launch.accelerate_config=fsdp2 (the shipped FSDP2 config)"
        )
    return accelerator


def shard_fsdp2(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """`model` sharded in place by accelerate's FSDP2 preparation, each decoder layer and each mixer (self_attn)
    an FSDP unit of its own: stage attention calls the mixers alone, outside their decoder layers (see
    `linearize.distill.stages.Aligner`). The weights come from rank 0 by broadcast (accelerate's
    cpu_ram_efficient_loading), so every other process may hold `model` empty, on the meta device (see
    `ShardedStudent`)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

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
    `shard_fsdp2`); `plain()` gathers the sharded one's full state dict into rank 0's
    CPU memory and assigns it to an empty copy of the model made before sharding (FSDP2 has no way back).
    Both are collective: every process calls them at the same point. Structural changes (swapping mixers,
    LoRA, loading weights from a file on rank 0) go to `plain()`; forwards go to `sharded()`.
    """

    def __init__(self, model: nn.Module, accelerator: Accelerator):
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


def load_empty(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """`config`'s model with its parameters on the meta device and its buffers real (computed from the
    config: rotary frequencies), as every process but rank 0 holds it under FSDP2."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # as from_pretrained does: lm_head is embed_tokens where the config ties them
    return model.eval()


# ---- DeepSpeed


def zero_stage(accelerator: Accelerator) -> int:
    """The DeepSpeed ZeRO stage the run was launched with (0: no DeepSpeed)."""
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if plugin else 0


def deepspeed_frozen_teacher(
    teacher: nn.Module, student_config: dict, batch_size: int, processes: int
) -> nn.Module:
    """Under ZeRO-3, `teacher` in an inference engine of its own, sharded over the processes like the
    student: the student's DeepSpeed config without optimizer and scheduler (trl's `prepare_deepspeed`).
    ZeRO-0/1/2 do not shard weights: `teacher` itself."""
    if student_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return teacher
    import deepspeed

    config = {k: v for k, v in copy.deepcopy(student_config).items() if k not in ("optimizer", "scheduler")}
    # The student's prepare() fills accelerate's "auto" values later, if at all: the teacher's are set here.
    config.update(
        train_micro_batch_size_per_gpu=batch_size,
        gradient_accumulation_steps=1,
        train_batch_size=batch_size * processes,
    )
    config.pop("gradient_clipping", None)
    hidden = teacher.config.hidden_size
    auto = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    zero = config["zero_optimization"]
    zero.update({k: v for k, v in auto.items() if zero.get(k) == "auto"})
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()  # DeepSpeedEngine.eval() returns None
    return engine


def drop_deepspeed_gradients(engine: DeepSpeedEngine) -> None:
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
