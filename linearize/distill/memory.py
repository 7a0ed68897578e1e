"""Memory estimate of a distillation stage, per device, made from the teacher's config alone.

The student is built on the meta device (no weights are read or allocated) and swapped exactly as the
pipeline swaps the real teacher, so the parameters a mixer adds, the LoRA adapters and the trainable set
of each stage are counted exactly. Activations and logits follow stated formulas; see `estimate`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import Accelerator
from transformers import PretrainedConfig

from linearize.architectures.mixers import MIXER_CLASSES
from linearize.config import Recipe, RecipeError
from linearize.convert.swap import plan_for, swap
from linearize.distill.stages import fully_trained_parameters, new_parameters
from linearize.distributed import Sharding

GiB = 2**30

# Activations saved for the backward pass, per token and per layer in the graph, as multiples of one
# `hidden`-wide tensor in the compute dtype (an fp32 tensor counts twice), by kernel form, stage and mixer.
# Stage `attention`: only the mixers' new parameters train and each layer passes on the teacher's output, so
# a converted layer keeps its mixer's tensors (q, k, feature maps and their fp32 projections, the op's
# saved tensors, the fp32 output and target of the MSE) and nothing of its MLP; a softmax layer keeps
# nothing. Stage `logits`: the gradient runs through the whole network, so every layer also keeps its norms'
# fp32 inputs and q/k/v, plus ACTIVATION_INTERMEDIATE `intermediate`-wide tensors of its MLP (gate, up,
# activation). Measured with saved-tensor hooks (head_dim 128, hedgehog's 2 * head_dim features, the
# feature map that keeps most). `chunked`: the torch chunked forms (CPU, `student.impl=chunked`), which
# keep every chunk's state; +10%. `fused`: the CUDA kernels (fla, our Triton window kernel), which keep
# their inputs and recompute the rest in backward, measured with stand-ins that keep only the inputs; +25%.
ACTIVATIONS = {
    "fused": {
        "attention": {"linear": 16, "window_linear": 19, "gated": 26, "gated_slot": 21, "gated_delta": 18},
        "logits": {
            "softmax": 12,
            "linear": 22,
            "window_linear": 24,
            "gated": 32,
            "gated_slot": 27,
            "gated_delta": 23,
        },
    },
    "chunked": {
        "attention": {"linear": 23, "window_linear": 25, "gated": 54, "gated_slot": 50, "gated_delta": 82},
        "logits": {
            "softmax": 12,
            "linear": 31,
            "window_linear": 41,
            "gated": 74,
            "gated_slot": 57,
            "gated_delta": 84,
        },
    },
}
ACTIVATION_INTERMEDIATE = 3


def feature_width_factor(recipe: Recipe, model_config: PretrainedConfig) -> float:
    """How much wider than the measured setting (hedgehog's projection as wide as the head) the recipe's
    feature maps are: a converted layer's activation count is scaled by it, an upper bound (q, k, v and the
    outputs do not grow with the feature width)."""
    head_dim = getattr(model_config, "head_dim", None) or (
        model_config.hidden_size // model_config.num_attention_heads
    )
    width = getattr(recipe.student.settings, "feature_dim", None) or head_dim
    return max(1.0, width / head_dim)


# One layer's forward temporaries on top (the stage-1 recompute of the teacher's softmax attention under
# no_grad, q/k/v, the MLP's intermediates) and the activation gradients of the layer in backward.
WORKSPACE_HIDDEN = 16
WORKSPACE_INTERMEDIATE = 3
# Stage `logits`: [batch, seq, vocab] buffers in the compute dtype: the student's logits, the teacher's, the
# gradient the chunked KL / CE keeps (distill/losses.py; their float32 work is a few rows at a time) and
# backward's scaled copy of it.
LOGIT_COPIES = 4
# CUDA context, cuBLAS/NCCL workspaces and allocator slack that no formula above covers.
RUNTIME_BYTES = GiB // 2
# Decoder layers whose full parameters are gathered at once when weights are sharded (the one computing
# and the one prefetched).
GATHERED_LAYERS = 2


class MemoryBudgetError(RecipeError):
    """A stage whose memory estimate exceeds the device's memory: the message names the fixes."""


@dataclass
class ParameterCounts:
    """Parameters of the student of one stage, counted on the meta device."""

    total: int
    """Every parameter of the model the stage trains (LoRA adapters included)."""
    weight_bytes: int
    """Their bytes in the dtypes they are stored in (the teacher's dtype; new parameters are fp32)."""
    trainable: int
    """Parameters the stage's optimizer updates."""
    trainable_16bit: int
    """Trainable parameters stored in 16 bits (they get an fp32 master copy)."""
    teacher_bytes: int
    """Bytes of the teacher before the swap (the size of a frozen teacher copy)."""
    layer_bytes: int
    """Bytes of the largest decoder layer (what a sharded run gathers per layer)."""
    root_bytes: int
    """Bytes outside the decoder layers (embeddings, final norm, lm_head): gathered for a whole step."""
    layer_mixers: list[str]
    """The mixer of every layer in this stage (`softmax` for the layers kept)."""


@dataclass
class MemoryEstimate:
    """Per-device memory of one stage, in bytes, by part. `total` is their sum."""

    stage: str
    weights: int
    """The student's parameters (sharded over processes when the strategy shards weights)."""
    gathered: int
    """Unsharded parameters held during the step when weights are sharded: GATHERED_LAYERS decoder layers
    and the root module (embeddings, lm_head), in the compute dtype."""
    gradients: int
    """fp32 gradient of every trainable parameter (+ DDP's bucket copy)."""
    optimizer: int
    """AdamW's two fp32 moments per trainable parameter, plus an fp32 master copy of a trainable parameter
    stored in 16 bits (FSDP upcasts it, DeepSpeed keeps one); plain AdamW on 16-bit parameters keeps 16-bit
    moments, so this is an upper bound there."""
    frozen_teacher: int
    """The teacher's own weights: under ZeRO-3 and FSDP2 a sharded view for the whole run (offloaded with the
    weights); elsewhere a whole frozen copy in stage logits with trainable=attention|all and no logit cache
    (the student trains the weights it shares with the teacher), else none."""
    activations: int
    """batch * seq_len * bytes * (sum over layers of the layer's per-token count + WORKSPACE_HIDDEN * hidden
    + WORKSPACE_INTERMEDIATE * intermediate); a layer's count is
    ACTIVATIONS[kernels]["attention"][mixer] * hidden in stage attention (0 for a softmax layer),
    ACTIVATIONS[kernels]["logits"][mixer] * hidden + ACTIVATION_INTERMEDIATE * intermediate in stage logits;
    bytes is 2 in bf16, 4 in fp32."""
    logits: int
    """Stage logits: batch * seq_len * vocab * (2 bytes under bf16, else 4) * LOGIT_COPIES (stage attention
    keeps one position)."""
    runtime: int
    """RUNTIME_BYTES: CUDA context and workspaces."""
    params: ParameterCounts
    sharding: Sharding
    num_processes: int
    steps: int
    tokens: int
    """steps * batch_size * grad_accum * num_processes * seq_len (`Recipe.stage_tokens`)."""
    device_memory: int | None = None
    """Memory of one device the estimate is checked against, when known."""
    whole_model: int = 0
    """The whole model's weights as stored (the larger of teacher and student). Outside the training steps
    every process holds it on its device (the teacher loaded, evaluated, writing the logit cache; the
    student after the stage, evaluated and exported), checked with `runtime` against the device apart from
    `total`; except under FSDP2 (`Sharding.whole_on_host`), where it is whole only in rank 0's CPU memory."""

    PARTS: ClassVar[tuple[str, ...]] = (
        "weights",
        "gathered",
        "gradients",
        "optimizer",
        "frozen_teacher",
        "activations",
        "logits",
        "runtime",
    )

    @property
    def total(self) -> int:
        return sum(getattr(self, part) for part in self.PARTS)

    def parts(self) -> str:
        """The non-zero parts: `weights 1.8 GiB, gradients 4.0 MiB, ...`."""
        return ", ".join(
            f"{part.replace('_', ' ')} {size(getattr(self, part))}"
            for part in self.PARTS
            if getattr(self, part)
        )

    def line(self, verbose: bool = True) -> str:
        """`[memory] attention: ~X GiB per device, Y available (sharding, processes)`; verbose: the parts,
        the steps and the tokens too."""
        room = f", {size(self.device_memory)} available" if self.device_memory else ""
        processes = f"{self.num_processes} process{'es' if self.num_processes > 1 else ''}"
        if not verbose:
            return f"[memory] {self.stage}: ~{size(self.total)} per device{room} ({self.sharding.name}, {processes})"
        return (
            f"[memory] {self.stage}: ~{size(self.total)} per device{room} ({self.parts()}; "
            f"{self.sharding.name}, {processes}), {self.steps:,} step{'s' if self.steps != 1 else ''}, "
            f"{self.tokens:,} tokens"
        )


def size(nbytes: int) -> str:
    """`18.3 GiB`, `512 MiB`, `4.0 KiB`: three significant figures at most."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{nbytes} B"


def student_on_meta(
    model_config: PretrainedConfig, recipe: Recipe, stage: str
) -> tuple[torch.nn.Module, int]:
    """(the student model of `stage`, built on the meta device from the config alone, the teacher's bytes).

    For stage logits an `auto:N` plan keeps N layers softmax (which ones does not change the count)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    plan = plan_for(recipe.student, config)
    if stage == "logits" and plan.auto_softmax:
        plan.softmax_layers = list(range(plan.auto_softmax))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, recipe.teacher.dtype))
        teacher_bytes = _bytes(model.parameters())
        model = swap(model, plan)
    return model, teacher_bytes


def count_parameters(model_config: PretrainedConfig, recipe: Recipe, stage: str) -> ParameterCounts:
    """Parameters of the student of `stage` and which of them train, without loading any weights."""
    from torch import nn

    model, teacher_bytes = student_on_meta(model_config, recipe, stage)
    params = dict(model.named_parameters())
    cfg = getattr(recipe.stages, stage)
    lora = 0
    if stage == "attention":
        trainable = set(new_parameters(model))
    elif cfg.trainable == "lora":
        trainable = set(new_parameters(model))
        # peft wraps every nn.Linear whose name ends in a target; its A [r, in] and B [out, r] stay fp32
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora_targets:
                lora += cfg.lora_r * (module.in_features + module.out_features)
    else:
        trainable = set(fully_trained_parameters(model, cfg.trainable))
    layers = model.model.layers
    names = {cls: name for name, cls in MIXER_CLASSES.items()}
    layer_bytes = max(_bytes(layer.parameters()) for layer in layers)
    in_layers = {id(p) for p in layers.parameters()}
    root_bytes = _bytes(p for p in model.parameters() if id(p) not in in_layers)
    return ParameterCounts(
        total=sum(p.numel() for p in params.values()) + lora,
        weight_bytes=_bytes(params.values()) + 4 * lora,
        trainable=sum(params[n].numel() for n in trainable) + lora,
        trainable_16bit=sum(params[n].numel() for n in trainable if params[n].element_size() < 4),
        teacher_bytes=teacher_bytes,
        layer_bytes=layer_bytes,
        root_bytes=root_bytes,
        layer_mixers=[names[type(layer.self_attn)] for layer in layers],
    )


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def estimate(
    model_config: PretrainedConfig,
    recipe: Recipe,
    stage: str,
    num_processes: int,
    device_memory_bytes: int | None = None,
    sharding: Sharding | None = None,
    kernels: str | None = None,
) -> MemoryEstimate:
    """Per-device memory of `stage` ("attention" or "logits") of `recipe` on `num_processes` processes.

    `model_config` is the teacher's config (nothing is loaded). `sharding` defaults to what
    `recipe.launch.accelerate_config` sets up. `kernels` ("fused" on CUDA, "chunked" on CPU) defaults to
    "chunked" for `student.impl=chunked|reference` and "fused" otherwise (the recipes' GPUs). Compute runs
    in bf16 when `train.precision=bf16` or the teacher is stored in 16 bits, else in fp32 (activation bytes
    2 or 4).
    """
    if stage not in ("attention", "logits"):
        raise ValueError(f"stage must be attention or logits, got {stage!r}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    sharding = sharding or Sharding.from_accelerate_config(recipe.launch.accelerate_config)
    kernels = kernels or ("chunked" if recipe.student.impl in ("chunked", "reference") else "fused")
    if kernels not in ACTIVATIONS:
        raise ValueError(f"kernels must be one of {', '.join(ACTIVATIONS)}, got {kernels!r}")
    cfg = getattr(recipe.stages, stage)
    counts = count_parameters(model_config, recipe, stage)
    n = num_processes

    def shard(nbytes: int, sharded: bool, offloaded: bool = False) -> int:
        return 0 if offloaded else -(-nbytes // n) if sharded else nbytes

    sixteen_bit = recipe.train.precision == "bf16" or recipe.teacher.dtype != "float32"
    act_bytes = 2 if sixteen_bit else 4
    gradients = 4 * counts.trainable * (2 if sharding.gradient_buckets else 1)
    optimizer = 8 * counts.trainable + 4 * counts.trainable_16bit
    gathered = 0
    if sharding.weights or sharding.offload_params:
        # the compute copy of a gathered layer: 16-bit under mixed precision, else as stored
        scale = 2 / 4 if sixteen_bit and recipe.teacher.dtype == "float32" else 1
        gathered = int((GATHERED_LAYERS * counts.layer_bytes + counts.root_bytes) * scale)
    hidden = model_config.hidden_size
    intermediate = getattr(model_config, "intermediate_size", 4 * hidden)
    table = ACTIVATIONS[kernels][stage]
    width = feature_width_factor(recipe, model_config)
    mixer_count = {m: table.get(m, 0) * (1 if m == "softmax" else width) for m in set(counts.layer_mixers)}
    if stage == "attention":
        per_token = sum(mixer_count[m] for m in counts.layer_mixers) * hidden
    else:
        per_token = sum(
            mixer_count[m] * hidden + ACTIVATION_INTERMEDIATE * intermediate for m in counts.layer_mixers
        )
    per_token += WORKSPACE_HIDDEN * hidden + WORKSPACE_INTERMEDIATE * intermediate
    tokens_per_micro = cfg.batch_size * recipe.data.seq_len
    frozen = 0
    if sharding.frozen_teacher:  # the teacher is a sharded view of its own for the whole run
        frozen = shard(counts.teacher_bytes, True, sharding.offload_params)
    elif stage == "logits" and cfg.trainable != "lora" and not cfg.cache_k:  # a whole copy: the student
        frozen = counts.teacher_bytes  # trains the weights it shares with the teacher otherwise
    return MemoryEstimate(
        stage=stage,
        weights=shard(counts.weight_bytes, sharding.weights, sharding.offload_params),
        gathered=gathered,
        gradients=shard(gradients, sharding.gradients),
        optimizer=shard(optimizer, sharding.optimizer, sharding.offload_optimizer),
        frozen_teacher=frozen,
        activations=tokens_per_micro * per_token * act_bytes,
        logits=tokens_per_micro * model_config.vocab_size * act_bytes * LOGIT_COPIES
        if stage == "logits"
        else 0,
        runtime=RUNTIME_BYTES,
        params=counts,
        sharding=sharding,
        num_processes=n,
        steps=recipe.stage_steps(stage),
        tokens=recipe.stage_tokens(stage, n),
        device_memory=device_memory_bytes,
        whole_model=max(counts.weight_bytes, counts.teacher_bytes),
    )


def check_fits(est: MemoryEstimate, available_bytes: int | None = None) -> None:
    """Raise MemoryBudgetError when `est.total` exceeds the device memory (`available_bytes`, else the one
    the estimate was made for), naming the total, the memory and the fixes; or when the whole model (which
    every device holds outside the training steps, see `MemoryEstimate.whole_model`) does not fit."""
    available = available_bytes if available_bytes is not None else est.device_memory
    if available is None:
        return
    if est.total > available:
        stage = est.stage
        fixes = [
            f"more processes (launch.processes / launch.nodes; now {est.num_processes})",
            "shard weights, gradients and optimizer state: launch.accelerate_config=fsdp2 or zero3 "
            f"(now {est.sharding.name})",
            f"a smaller stages.{stage}.batch_size with a larger stages.{stage}.grad_accum (same tokens per step)",
        ]
        if est.frozen_teacher:
            fixes.append(
                "stages.logits.cache_k=32: teacher logits from a disk cache instead of a frozen teacher copy"
            )
        fixes.append("train.precision=bf16 and teacher.dtype=bfloat16")
        raise MemoryBudgetError(
            f"stage {stage} needs ~{size(est.total)} per device ({est.parts()}) but a device has "
            f"{size(available)}; fixes: " + "; ".join(fixes)
        )
    if not est.sharding.whole_on_host and est.whole_model + est.runtime > available:
        raise MemoryBudgetError(
            f"stage {est.stage}: the whole model ({size(est.whole_model)} of weights) does not fit a device "
            f"({size(available)}). Training shards it ({est.sharding.name}), but outside the training steps "
            "every process holds the whole model on its device (loading and evaluating the teacher, writing "
            "the logit cache, evaluating and exporting the student). Use launch.accelerate_config=fsdp2 (or "
            "multinode-fsdp2): under FSDP2 the model is whole only in rank 0's CPU memory and evaluated sharded"
        )


def device_memory(device: str | torch.device, processes_per_node: int = 1) -> int:
    """Bytes one process may use: a CUDA device's total memory, else the machine's RAM shared by the
    processes of this node."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return _ram_bytes() // max(processes_per_node, 1)


def _ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


VERBOSE_ENV = "LINEARIZE_VERBOSE"  # "1": `linearize -v ...` (the memory estimate's parts)


def preflight(
    recipe: Recipe, model_config: PretrainedConfig, stages: list[str], accelerator: Accelerator
) -> list[MemoryEstimate]:
    """Print the estimate of every stage about to run and refuse the run when one does not fit."""
    sharding = Sharding.from_accelerator(accelerator)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    available = device_memory(accelerator.device, local)
    if recipe.launch.device_memory_gb:
        available = min(available, int(recipe.launch.device_memory_gb * GiB))
    found = []
    fused = accelerator.device.type == "cuda" and recipe.student.impl not in ("chunked", "reference")
    for stage in stages:
        est = estimate(
            model_config,
            recipe,
            stage,
            accelerator.num_processes,
            available,
            sharding,
            kernels="fused" if fused else "chunked",
        )
        accelerator.print(est.line(verbose=os.environ.get(VERBOSE_ENV) == "1"))
        found.append(est)
    for est in found:
        check_fits(est)
    if found and sharding.whole_on_host:
        check_host_memory(found, _ram_bytes())
    if found and recipe.eval.tasks and found[0].whole_model + RUNTIME_BYTES > available:
        raise MemoryBudgetError(
            f"eval.tasks {recipe.eval.tasks} evaluate the exported model whole on one device, and it "
            f"({size(found[0].whole_model)} of weights) does not fit one ({size(available)}): set eval.tasks=[] "
            "(the held-out perplexity is still measured, sharded) and evaluate the export where it fits"
        )
    return found


def check_host_memory(found: list[MemoryEstimate], host_bytes: int) -> None:
    """FSDP2: rank 0 holds the whole model in CPU memory (the teacher's view shares its weights until it is
    sharded); refused when this node's RAM is smaller."""
    need = max(est.whole_model for est in found)
    if need > host_bytes:
        raise MemoryBudgetError(
            f"under FSDP2 rank 0 holds the whole model in CPU memory ({size(need)}) but this node has "
            f"{size(host_bytes)} of RAM. Use a node with more memory"
        )
