"""The recipe: a typed tree of dataclasses. YAML is only its serialisation.

Every field has a docstring (the string literal under it); `describe()` reads them back for error
messages and `linearize recipes`. An unknown key, a wrong type or a bad value is a `RecipeError`
raised before any work, naming the field and the valid choices.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from linearize.assets import package_folder
from linearize.errors import LinearizeError
from linearize.registry import (
    EVAL_TASKS,
    FEATURE_MAPS,
    LEARNED_FEATURE_MAPS,
    LM_EVAL_PREFIX,
    MIXERS,
    is_eval_task,
)

Settings = typing.TypeVar("Settings")


class RecipeError(LinearizeError, ValueError):
    """A recipe that cannot run: the message names the field and what would be valid."""


@dataclass(kw_only=True)
class TeacherConfig:
    path: str = "bundled:stories260K"
    """Hugging Face Hub id or local folder of the teacher; `bundled:stories260K` is the tiny teacher
    shipped inside the package."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the teacher's weights are loaded in."""


LAYER_PLAN_FORMS = (
    "`all`, a list of layer indices to keep as softmax, `every:K` (K >= 2) or `auto:N` (N >= 1)"
)


def parse_layer_plan(layers: str | list[int]) -> tuple[str, Any]:
    """("all", None) | ("list", [i, ...]) | ("every", K) | ("auto", N); RecipeError names the valid forms."""
    if isinstance(layers, list):
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise RecipeError(f"student.layers must hold layer indices >= 0, got {layers}")
        return "list", sorted(set(layers))
    if layers == "all":
        return "all", None
    kind, _, count = layers.partition(":")
    if kind in ("every", "auto") and count.isdigit() and int(count) >= (2 if kind == "every" else 1):
        return kind, int(count)
    raise RecipeError(f"student.layers={layers!r} is not a layer plan; use {LAYER_PLAN_FORMS}")


@dataclass(kw_only=True)
class SoftmaxSettings:
    """`softmax`: the teacher's own attention in every layer (the fine-tuned-teacher control); no settings."""


@dataclass(kw_only=True)
class FeatureMapSettings:
    """What every linear-attention mixer has: a feature map phi applied to queries and keys."""

    feature_map: str = "hedgehog"
    """Feature map of the queries and keys (see `linearize.registry.FEATURE_MAPS`)."""
    feature_dim: int | None = None
    """Output size per head of the feature map's learned projection (`hedgehog`, `t2r`); None: the head
    dim. Hedgehog gives 2 x feature_dim features. Wider maps match softmax attention better on small heads
    (stage 1 on the 8-dim heads of the bundled teacher: 4x wider with a bias halves the alignment loss where
    the plain map does not), and the decode state grows with them: feature_dim x (head_dim + 1) per head."""
    feature_bias: bool = False
    """`hedgehog`: a learned per-head bias inside the softmax, softmax(xW + b) (LoLCATs' feature-map MLP
    option). `t2r` always has its bias; `elu` and `relu` have no projection to bias."""
    eps: float = 1e-6
    """Added to the linear-attention denominator (the division is done in float32)."""

    def __post_init__(self) -> None:
        _check_choice("feature_map", self.feature_map, sorted(FEATURE_MAPS))
        if self.eps <= 0:
            raise RecipeError(f"eps must be > 0, got {self.eps}")
        if self.feature_dim is not None and (
            isinstance(self.feature_dim, bool)
            or not isinstance(self.feature_dim, int)
            or self.feature_dim < 1
        ):
            raise RecipeError(f"feature_dim must be an integer >= 1 or null, got {self.feature_dim!r}")
        if self.feature_map not in LEARNED_FEATURE_MAPS and (
            self.feature_dim is not None or self.feature_bias
        ):
            raise RecipeError(
                f"feature_map={self.feature_map!r} has no learned projection, so feature_dim and feature_bias "
                "do not apply; use hedgehog or t2r, or drop them"
            )


def _check_window(window: int, factor_init: float) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise RecipeError(f"window must be an integer >= 1, got {window!r}")
    if not 0 < factor_init < 1:
        raise RecipeError(f"window_factor_init must lie in the open interval (0, 1), got {factor_init}")


@dataclass(kw_only=True)
class LinearSettings(FeatureMapSettings):
    """`linear`: normalised linear attention phi(q) phi(k)^T v (Hedgehog / LoLCATs without a window)."""


@dataclass(kw_only=True)
class WindowLinearSettings(FeatureMapSettings):
    """`window_linear`: softmax over the last `window` tokens plus linear attention over the older ones."""

    window: int = 64
    """Softmax window W: a query sees its last W tokens (itself included) through softmax and all older
    ones through linear attention."""
    window_factor_init: float = 0.5
    """Initial per-head mix w = sigmoid(logit) of the window branch, in (0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window(self.window, self.window_factor_init)


@dataclass(kw_only=True)
class GatedSettings(FeatureMapSettings):
    """`gated`: gated linear attention in the Liger style, optionally with a sliding-window softmax branch."""

    gated_window: bool = False
    """Add Liger's sliding-window softmax branch over the last `window` tokens, mixed per head with the
    gated branch (weight init `window_factor_init`)."""
    window: int = 64
    """Softmax window W of the window branch (with `gated_window`)."""
    window_factor_init: float = 0.5
    """Initial per-head mix w = sigmoid(logit) of the window branch, in (0, 1) (with `gated_window`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window(self.window, self.window_factor_init)


@dataclass(kw_only=True)
class GatedSlotSettings(FeatureMapSettings):
    """`gated_slot`: gated slot attention (GSA): a bounded memory of `num_slots` slots per head."""

    num_slots: int = 64
    """Memory slots M per head."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_slots, bool) or not isinstance(self.num_slots, int) or self.num_slots < 1:
            raise RecipeError(f"num_slots must be an integer >= 1, got {self.num_slots!r}")


@dataclass(kw_only=True)
class GatedDeltaSettings(FeatureMapSettings):
    """`gated_delta`: the gated delta rule (Gated DeltaNet) on feature-mapped queries and keys."""


MIXER_SETTINGS: dict[str, type] = {
    "softmax": SoftmaxSettings,
    "linear": LinearSettings,
    "window_linear": WindowLinearSettings,
    "gated": GatedSettings,
    "gated_slot": GatedSlotSettings,
    "gated_delta": GatedDeltaSettings,
}
"""The settings dataclass of each mixer; `student.settings` is built as the one `student.mixer` selects."""

MixerSettings = (
    SoftmaxSettings
    | LinearSettings
    | WindowLinearSettings
    | GatedSettings
    | GatedSlotSettings
    | GatedDeltaSettings
)


@dataclass(kw_only=True)
class StudentConfig:
    RENAMED: typing.ClassVar[dict[str, str]] = {
        name: f"settings.{name}"
        for name in ("feature_map", "feature_dim", "feature_bias", "eps", "window", "window_factor_init")
        + ("gated_window", "num_slots")
    }
    """Keys of earlier recipes and where they live now (a recipe that uses one is told)."""

    mixer: str = "linear"
    """Mixer that replaces softmax attention in converted layers (see `linearize.registry.MIXERS`)."""
    settings: Any = None
    """The mixer's own settings, a mapping checked against the dataclass `student.mixer` selects (see
    `MIXER_SETTINGS` and `linearize options`); unset keys take that mixer's defaults."""
    layers: str | list[int] = "all"
    """Layer plan: `all` converts every layer; a list of layer indices keeps those as the teacher's softmax
    attention; `every:K` keeps every K-th layer (K-1, 2K-1, ...); `auto:N` converts every layer for
    stage 1, then keeps as softmax the N layers whose stage-1 alignment loss stays highest (the ranking is
    written to the run folder, the config and the model card)."""
    impl: Literal["auto", "chunked", "reference", "fla", "triton"] = "auto"
    """Kernel form of the mixers' ops: `auto` picks Triton/fla on CUDA and chunked torch elsewhere; the
    others force one (the step-by-step `reference` is for debugging; an op without that form refuses)."""

    @property
    def softmax_window(self) -> int | None:
        """The softmax window of a mixer that has one (window_linear; gated with gated_window), else None."""
        if self.mixer == "window_linear" or (self.mixer == "gated" and self.settings.gated_window):
            return self.settings.window
        return None

    def __post_init__(self) -> None:
        _check_choice("student.mixer", self.mixer, sorted(MIXERS))
        parse_layer_plan(self.layers)
        cls = MIXER_SETTINGS[self.mixer]
        if isinstance(self.settings, cls):
            return
        data = {} if self.settings is None else self.settings
        if not isinstance(data, dict):
            raise RecipeError(
                f"student.settings must be a mapping of the {self.mixer} mixer's settings, got {data!r}"
            )
        try:
            self.settings = _build(cls, data, "student.settings")
        except RecipeError as err:
            if not str(err).startswith("unknown"):
                raise
            fields = ", ".join(f.name for f in dataclasses.fields(cls)) or "none"
            raise RecipeError(
                f"student.settings of the {self.mixer} mixer: {err}. Its settings: {fields}; after changing "
                "student.mixer give the new mixer's settings, e.g. student.settings={} for its defaults"
            ) from None


TEACHER_TEXT_PREFIX = "teacher:"
TOKEN_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_token_count(text: str) -> int:
    """`500k`, `2M`, `1.5M`, `20000` -> tokens (k = 1e3, M = 1e6, B = 1e9); a RecipeError for anything else."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMbBgG]?)", str(text).strip())
    if not match or float(match.group(1)) <= 0:
        raise RecipeError(f"{text!r} is not a token count; use e.g. 500k, 2M (k = 1e3, M = 1e6, B = 1e9)")
    return int(round(float(match.group(1)) * TOKEN_UNITS[match.group(2).lower()]))


def teacher_text_tokens(source: str) -> int | None:
    """The token count of a `teacher:<tokens>` data source (text the teacher writes), None for any other."""
    if not source.startswith(TEACHER_TEXT_PREFIX):
        return None
    return parse_token_count(source[len(TEACHER_TEXT_PREFIX) :])


@dataclass(kw_only=True)
class SamplingConfig:
    """How the teacher writes its own text for `teacher:<tokens>` sources (`linearize.teacher_text`)."""

    prompts: list[str] = field(default_factory=lambda: ["bundled:tinystories_docs.txt"])
    """Documents whose openings seed the samples (the first `prompt_words` words of each)."""
    prompt_words: int = 12
    """Words of a document's opening given to the teacher."""
    heldout_prompts: int = 16
    """The last N openings seed only held-out text (`data.heldout: [teacher:...]`), never training text."""
    instructions: list[str] = field(
        default_factory=lambda: [
            "Write a short story that begins with: {opening}",
            "Continue this story in a few paragraphs: {opening}",
            "Tell a story for children that starts like this: {opening}",
            "Write a story with a surprising ending. It begins: {opening}",
        ]
    )
    """With the chat template: the user turns, cycled over samples; `{opening}` is the document's opening."""
    chat: str = "auto"
    """auto: wrap each instruction in the teacher's chat template when its tokenizer has one; always; never
    (the opening alone is the prefix the teacher continues)."""
    temperature: float = 0.8
    """Sampling temperature (the logits are divided by it)."""
    top_p: float = 0.95
    """Nucleus sampling: each token is drawn from the likeliest tokens holding this much probability."""
    max_new_tokens: int = 400
    """Tokens sampled per document at most (a sample ends earlier at the end-of-turn token)."""
    batch_size: int = 64
    """Samples generated together, one part file each (larger batches use a CPU better: 96 on SmolLM2)."""
    seed: int = 0
    """Seeds the order of the openings and each part's sampling (part k: seed * 1000003 + k)."""
    cache_dir: str = "~/.cache/linearize/teacher-text"
    """Where generated text is kept, one folder per (teacher, sampling settings, split), shared by recipes."""

    def __post_init__(self) -> None:
        _check_choice("data.sampling.chat", self.chat, ["auto", "always", "never"])
        if not self.prompts:
            raise RecipeError(
                "data.sampling.prompts is empty: give the documents whose openings seed samples"
            )
        for name in ("prompt_words", "max_new_tokens", "batch_size", "heldout_prompts"):
            if int(getattr(self, name)) < 1:
                raise RecipeError(f"data.sampling.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise RecipeError(
                f"data.sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )
        if not self.instructions or any("{opening}" not in i for i in self.instructions):
            raise RecipeError("data.sampling.instructions must be non-empty and each hold `{opening}`")


@dataclass(kw_only=True)
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["bundled:tinystories_docs.txt"])
    """Training text: local .txt/.jsonl/.json/.parquet files, a Hub dataset name (`hub:NAME`),
    `bundled:tinystories_docs.txt`, or `teacher:<tokens>` (e.g. `teacher:1M`: text the teacher writes itself,
    as `data.sampling` says, generated once and kept; `linearize generate` writes it ahead)."""
    heldout: list[str] = field(default_factory=list)
    """Held-out text for evaluation; empty means the last `heldout_docs` documents of `train`.
    `teacher:<tokens>` here is written from the held-out openings only."""
    max_epochs: float = 4.0
    """A stage that would read the training text more times than this is refused before it starts."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How the teacher writes `teacher:<tokens>` text."""
    heldout_docs: int = 49
    """When `heldout` is empty: how many of the last training documents are held out."""
    text_field: str = "text"
    """Column holding the text in JSONL/parquet/Hub data."""
    doc_separator: str = "<|endoftext|>"
    """A line equal to this separates documents inside a .txt file."""
    seq_len: int = 256
    """Tokens per packed training block."""
    add_bos: bool = True
    """Prepend the tokenizer's BOS token to every document (when it has one)."""
    streaming: bool = False
    """Read the training text as a stream (`datasets` streaming): tokenised and packed on the fly, split
    over processes, in corpus order (shuffle the corpus beforehand), the position in the stream saved in
    every checkpoint so a resumed run continues on the next unseen block. For corpora that do not fit in
    memory; held-out text then comes from `data.heldout` only."""

    def __post_init__(self) -> None:
        if not self.train:
            raise RecipeError("data.train is empty: give at least one file, `hub:NAME` or `bundled:...`")
        if self.seq_len < 2:
            raise RecipeError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.heldout_docs < 0:
            raise RecipeError(f"data.heldout_docs must be >= 0, got {self.heldout_docs}")
        if self.max_epochs <= 0:
            raise RecipeError(f"data.max_epochs must be > 0, got {self.max_epochs}")
        for source in [*self.train, *self.heldout]:
            try:
                teacher_text_tokens(source)
            except RecipeError as err:
                raise RecipeError(f"data source {source!r}: {err}") from None
        if self.streaming and any(teacher_text_tokens(s) for s in self.train):
            raise RecipeError(
                "data.streaming reads files or Hub datasets; teacher:<tokens> text is read whole"
            )
        if self.streaming and not self.heldout and self.heldout_docs:
            raise RecipeError(
                "data.streaming reads the training text once, in order, so it cannot hold documents out of it: "
                "give data.heldout=<files> (or data.heldout_docs=0 for no held-out evaluation)"
            )


@dataclass(kw_only=True)
class StageConfig:
    steps: int = 100
    """Optimizer steps in this stage (0 skips the stage)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 10
    """Linear warmup steps, then cosine decay to `min_lr_ratio * lr`."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    batch_size: int = 8
    """Blocks per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""

    def __post_init__(self) -> None:
        for name in ("steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise RecipeError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise RecipeError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise RecipeError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def tokens_per_step(self, processes: int, seq_len: int) -> int:
        """Tokens one optimizer step trains on: batch_size x grad_accum x processes x seq_len."""
        return self.batch_size * self.grad_accum * processes * seq_len


@dataclass(kw_only=True)
class AttentionStageConfig(StageConfig):
    """Stage 1: every student mixer sees the teacher's layer input; loss = sum over layers of
    MSE(student attention output, teacher attention output); only the mixers' new parameters train."""


@dataclass(kw_only=True)
class LogitsStageConfig(StageConfig):
    """Stage 2: KL(teacher || student) on logits, plus optional cross-entropy."""

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    temperature: float = 1.0
    """Softmax temperature of the KL term (the loss is scaled by temperature**2)."""
    kl_weight: float = 1.0
    """Weight of KL(teacher || student)."""
    ce_weight: float = 0.0
    """Weight of next-token cross-entropy on the training text."""
    trainable: Literal["lora", "attention", "all"] = "lora"
    """`lora`: LoRA on q/k/v/o plus the mixers' new parameters, teacher = same weights with LoRA off and
    softmax on. `attention`: all attention parameters, teacher = a frozen copy. `all`: every parameter
    (embeddings, MLPs, norms too; RADLADS' full-parameter stage), teacher = a frozen copy."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA alpha."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names LoRA wraps inside converted layers."""
    cache_k: int = 0
    """Teacher logits from an on-disk cache of its top-k logits per token, written once before this stage
    (resumable, checked against the data order), so no teacher copy sits beside the student; 0: the live
    teacher. Needs temperature 1."""
    cache_dir: str = ""
    """Folder of the top-k logit cache (default: <run>/logit_cache)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise RecipeError(f"stages.logits.temperature must be > 0, got {self.temperature}")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise RecipeError("stages.logits.kl_weight and ce_weight must be >= 0 and not both 0")
        if self.lora_r < 1:
            raise RecipeError(f"stages.logits.lora_r must be >= 1, got {self.lora_r}")
        if self.cache_k < 0:
            raise RecipeError(f"stages.logits.cache_k must be >= 0 (0: no cache), got {self.cache_k}")
        if self.cache_k and self.temperature != 1.0:
            raise RecipeError(
                "stages.logits.cache_k needs stages.logits.temperature=1: at another temperature the teacher's "
                "normaliser depends on logits outside the top k; set temperature=1 or cache_k=0"
            )


@dataclass(kw_only=True)
class StagesConfig:
    attention: AttentionStageConfig = field(default_factory=AttentionStageConfig)
    """Stage 1: attention-output alignment."""
    logits: LogitsStageConfig = field(default_factory=LogitsStageConfig)
    """Stage 2: logit distillation."""


@dataclass(kw_only=True)
class TrainConfig:
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision of the training steps (weights and optimizer state stay fp32)."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many optimizer steps (and at each stage's end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept per stage (at least 2, so a failed save never leaves none)."""
    log_every: int = 1
    """Append a metrics line to metrics.jsonl every this many steps."""
    skip_nonfinite: int = 0
    """Steps with a non-finite loss to skip (no update; the step is logged with the reason) before the run
    stops; 0: stop at the first, naming the step, the blocks and the layer."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise RecipeError(f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.keep_checkpoints < 2:
            raise RecipeError(f"train.keep_checkpoints must be >= 2, got {self.keep_checkpoints}")
        if self.log_every < 1:
            raise RecipeError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.skip_nonfinite < 0:
            raise RecipeError(f"train.skip_nonfinite must be >= 0, got {self.skip_nonfinite}")


@dataclass(kw_only=True)
class EvalConfig:
    seq_len: int = 256
    """Tokens per held-out perplexity block."""
    max_blocks: int = 0
    """Evaluate at most this many held-out blocks (0: all)."""
    batch_size: int = 8
    """Blocks per evaluation batch."""
    tasks: list[str] = field(default_factory=lambda: ["ppl", "recall", "cloze", "controls"])
    """Tasks of `linearize eval` run on the exported student and its teacher at the end of `convert`
    (report in `<run>/report`): ppl, recall, cloze, speed, controls, lm_eval:<task>; empty: none."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_blocks < 0:
            raise RecipeError(f"eval.max_blocks must be >= 0, got {self.max_blocks}")
        for task in self.tasks:
            if not is_eval_task(task):
                raise RecipeError(
                    f"eval.tasks: {task!r} is not valid; choose from: {', '.join(EVAL_TASKS)}, {LM_EVAL_PREFIX}<task>"
                )


def shipped_accelerate_configs() -> dict[str, Path]:
    """Name → path of every accelerate config shipped in `linearize/launch` (ddp, fsdp2, zero2, ...)."""
    folder = package_folder("launch")
    return {p.stem: p for p in folder.iterdir() if p.suffix == ".yaml"}


def accelerate_config_path(name: str) -> Path:
    """A shipped accelerate config by short name (fsdp2, zero3, ...) or any existing file."""
    shipped = shipped_accelerate_configs()
    if name in shipped:
        return shipped[name]
    if Path(name).is_file():
        return Path(name)
    raise RecipeError(
        f"no accelerate config {name!r}: shipped ones are {', '.join(sorted(shipped))}, or give a path"
    )


@dataclass(kw_only=True)
class LaunchConfig:
    """Where the recipe is meant to run. The launcher decides the processes a run really gets; these
    fields say what the recipe was sized for: token budgets and the memory estimate are computed for them
    offline, and a run refuses to start when the estimate exceeds its device's memory."""

    accelerate_config: str = ""
    """Accelerate config the recipe is launched with: a shipped name (ddp, fsdp2, zero2, zero3,
    multinode-fsdp2; `linearize accelerate-config NAME` prints its path) or a file; empty: one process,
    no launcher. Its distributed type (DDP, FSDP, ZeRO stage) decides what the offline memory estimate
    shards; a run's own estimate follows what it was actually launched with."""
    processes: int = 1
    """Processes per node (one per device)."""
    nodes: int = 1
    """Nodes (machines); the run has `processes * nodes` processes in all."""
    hardware: str = ""
    """The hardware the recipe was sized for, in words (e.g. `8 x H100 80GB`); informative."""
    device_memory_gb: float = 0.0
    """Memory per device (GiB) the recipe was sized for: the memory estimate is checked against it
    offline, and at run time against the smaller of it and the actual device's; 0: the actual device's."""

    def __post_init__(self) -> None:
        for name in ("processes", "nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"launch.{name} must be an integer >= 1, got {value!r}")
        if self.device_memory_gb < 0:
            raise RecipeError(
                f"launch.device_memory_gb must be >= 0 (0: the actual device's), got {self.device_memory_gb}"
            )
        if self.accelerate_config:
            try:
                accelerate_config_path(self.accelerate_config)
            except RecipeError as err:
                raise RecipeError(f"launch.accelerate_config: {err}") from None
        elif self.processes * self.nodes > 1:
            raise RecipeError(
                f"launch.processes * launch.nodes = {self.processes * self.nodes} processes need "
                f"launch.accelerate_config (one of {', '.join(sorted(shipped_accelerate_configs()))}, or a path)"
            )

    @property
    def num_processes(self) -> int:
        return self.processes * self.nodes


@dataclass(kw_only=True)
class Recipe:
    name: str = "tiny"
    """Name of the run; the default output folder is `out/<name>`."""
    description: str = ""
    """One line shown by `linearize recipes`."""
    seed: int = 0
    """Seeds parameter init, data order and LoRA init: a recipe fully determines a run."""
    output_dir: str = ""
    """Run folder (checkpoints, metrics, final export); empty means `out/<name>`."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The softmax-attention model to convert."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """What replaces attention, and where."""
    data: DataConfig = field(default_factory=DataConfig)
    """Distillation and held-out text."""
    stages: StagesConfig = field(default_factory=StagesConfig)
    """The distillation stages, run in order: attention, logits."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Precision, checkpointing and logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation run at the end of `linearize convert`."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """The launch the recipe was sized for: accelerate config, processes, nodes, hardware."""

    def __post_init__(self) -> None:
        if self.name in ("", ".", "..") or set(self.name) & set("/\\\0"):
            raise RecipeError(
                f"name={self.name!r} must be a plain folder name (no '/', '\\' or '..'): the run goes to "
                "out/<name>; to write somewhere else set output_dir=<folder>"
            )
        window = self.student.softmax_window
        if window is not None and window >= self.data.seq_len:
            raise RecipeError(
                f"student.settings.window={window} >= data.seq_len={self.data.seq_len}: every training token "
                f"would see all of its context through the softmax window, so the {self.student.mixer} "
                "student would train as plain softmax attention and its linear part not at all; set "
                f"student.settings.window below {self.data.seq_len} (or raise data.seq_len)"
            )
        if self.data.streaming and self.stages.logits.cache_k:
            raise RecipeError(
                "stages.logits.cache_k needs the training blocks up front (data.streaming=false): the cache is "
                "written over every block before stage 2"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"out/{self.name}")

    def stage_steps(self, stage: str) -> int:
        """Optimizer steps `stage` really runs: stage attention has none when `student.mixer=softmax` (no new
        parameters to align), whatever its `steps` say."""
        if stage == "attention" and self.student.mixer == "softmax":
            return 0
        return getattr(self.stages, stage).steps

    def stage_tokens(self, stage: str, processes: int) -> int:
        """Tokens `stage` trains on over `processes` processes: the steps it really runs x its tokens per step."""
        cfg = getattr(self.stages, stage)
        return self.stage_steps(stage) * cfg.tokens_per_step(processes, self.data.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Short hash of the resolved recipe, recorded in exported weights' metadata. `output_dir` is left
        out: where a run is written does not change what it computes, and the same run in two folders must
        write byte-identical weight files."""
        what = {k: v for k, v in self.to_dict().items() if k != "output_dir"}
        return hashlib.sha256(yaml.safe_dump(what, sort_keys=False).encode()).hexdigest()[:16]


def _check_choice(name: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        raise RecipeError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields (the string literal under each field), inherited ones too."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _coerce(
    path: str, value: Any, tp: Any, error: type[Exception] = RecipeError, what: str = "recipe key"
) -> Any:
    """Check `value` against the annotation `tp`, converting where the conversion is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:  # checked by the dataclass itself (student.settings)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise error(f"{path} must be a mapping of {sorted(f.name for f in dataclasses.fields(tp))}")
        return _build(tp, value, path, error, what)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise error(f"{path}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `key=a` on the command line for a one-item list
        if not isinstance(value, list):
            raise error(f"{path} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{path}[{i}]", v, item_tp, error, what) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(path, value, option, error, what)
            except error:
                continue
        raise error(f"{path}={value!r} does not match {tp}")
    if tp is type(None):
        if value is not None:
            raise error(f"{path} must be null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise error(f"{path} must be a string, got {value!r}")
        return value
    raise error(f"{path}: unsupported annotation {tp}")


def _build(
    cls: type,
    data: dict[str, Any],
    prefix: str = "",
    error: type[Exception] = RecipeError,
    what: str = "recipe key",
    also_valid: Sequence[str] = (),
) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        moved = getattr(cls, "RENAMED", {}).get(unknown[0])
        if moved:
            where = f"{prefix}.{moved}" if prefix else moved
            raise error(f"{what} {key!r} is now {where!r}: move it there")
        raise error(f"unknown {what} {key!r}; valid keys: {', '.join([*also_valid, *names])}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k], error, what) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except error as err:
        if prefix and not str(err).startswith(prefix):
            raise error(f"{prefix}.{err}") from None
        raise


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, error: type[Exception]) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise error(f"cannot set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _annotation(cls: type, dotted: str) -> Any:
    """The annotation of the field `dotted` names inside the dataclass tree `cls`; None when there is none
    (`_build` then reports the unknown key)."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = typing.get_type_hints(tp)[part]
    return tp


def _list_item(tp: Any) -> Any:
    """The item annotation of a list field (`list[int]`, `str | list[int]`); None for any other."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    for option in typing.get_args(tp) if union else (tp,):
        if typing.get_origin(option) is list:
            return typing.get_args(option)[0]
    return None


def _pair_value(raw: Any, tp: Any) -> Any:
    """One command-line value for a field annotated `tp`, before the type check."""
    if not isinstance(raw, str):
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML: the type check names the field, and text fields take it as written
    if tp is str and not isinstance(value, str):
        return raw  # `revision=1.0`, `commit_message=yes`, `output_dir=`: text as written
    item_tp = _list_item(tp)
    if item_tp is not None and value is None and not raw.strip():
        return []
    if item_tp is not None and isinstance(value, str) and "," in value:
        return [_pair_value(part.strip(), item_tp) for part in value.split(",")]
    return value


def parse_pairs_into(
    cls: type[Settings],
    pairs: Mapping[str, Any],
    *,
    base: dict[str, Any] | None = None,
    error: type[Exception] = RecipeError,
    what: str = "recipe key",
    also_valid: Sequence[str] = (),
) -> Settings:
    """The dataclass `cls` from dotted `key=value` pairs laid over `base` (a loaded YAML tree), type-checked.

    Every command's `key=value` arguments go through here. Values are read as YAML (`steps=50`,
    `layers=[0, 3]`, `feature_dim=null`); a list field also takes one item alone or comma-separated items
    (`controls=window,branches`, `mqar_pairs=4,8`) and an empty value as the empty list; a text field
    keeps what was written where YAML reads something else (`revision=1.0`). An unknown key (`unknown
    {what} 'key'`) lists the valid keys, `also_valid` first (keys the command itself takes); a wrong type
    names the field; both are raised as `error`, the command's own error class, as are the dataclass's
    own checks.
    """
    data = copy.deepcopy(base) if base else {}
    for key, raw in pairs.items():
        _set_dotted(data, key, _pair_value(raw, _annotation(cls, key)), error)
    return _build(cls, data, error=error, what=what, also_valid=also_valid)


def shipped_recipes() -> dict[str, Path]:
    """Name → path of every recipe shipped inside the package."""
    folder = package_folder("recipes")
    return {p.stem: p for p in folder.iterdir() if p.suffix == ".yaml"}


def load_recipe(name_or_path: str | None = None, overrides: dict[str, str] | None = None) -> Recipe:
    """Resolve a recipe: a shipped name or a YAML path, then dotted `key=value` overrides.

    Overrides are read by `parse_pairs_into` (`stages.attention.steps=50`, `student.layers=[0,3]`,
    `eval.tasks=ppl,recall`) and go through the same validation as the file.
    """
    name_or_path = name_or_path or "tiny"
    shipped = shipped_recipes()
    if name_or_path in shipped:
        path = shipped[name_or_path]
    elif name_or_path.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
    else:
        raise RecipeError(
            f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(sorted(shipped))} (or a .yaml path)"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise RecipeError(f"recipe file {path} is not valid YAML{at} ({problem}): fix that line") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe file {path}: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path} must hold a mapping of recipe keys (key: value lines), not a {type(data).__name__}"
        )
    return parse_pairs_into(Recipe, overrides or {}, base=data)


def describe(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) of every field, for help output."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if cls is StudentConfig and f.name == "settings":
            rows += _describe_settings(key + ".")
        elif dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, repr(default), docs.get(f.name, "")))
    return rows


CHOICES: dict[str, list[str]] = {
    "student.mixer": sorted(MIXERS),
    "student.settings.feature_map": sorted(FEATURE_MAPS),
    "data.sampling.chat": ["auto", "always", "never"],
}
"""The choices of string fields checked against a list (Literal-typed fields carry theirs in the type)."""


def options(recipe: Recipe) -> list[tuple[str, Any, list[str], str]]:
    """(dotted key, the value `recipe` runs with, its choices or [], docstring) of every field; under
    student.settings, the fields of the recipe's own mixer."""
    rows = []

    def walk(obj: Any, prefix: str) -> None:
        cls = type(obj)
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, value = f"{prefix}{f.name}", getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
                continue
            tp = hints[f.name]
            choices = [str(c) for c in typing.get_args(tp)] if typing.get_origin(tp) is Literal else []
            rows.append((key, value, choices or CHOICES.get(key, []), docs.get(f.name, "")))

    walk(recipe, "")
    return rows


def _describe_settings(prefix: str) -> list[tuple[str, str, str]]:
    """`student.settings.<key>` rows: each key once, with the mixers that have it."""
    rows: dict[str, tuple[str, str, list[str]]] = {}
    for mixer, cls in MIXER_SETTINGS.items():
        for key, default, doc in describe(cls, prefix):
            rows.setdefault(key, (default, doc, []))[2].append(mixer)
    return [(key, default, f"[{', '.join(mixers)}] {doc}") for key, (default, doc, mixers) in rows.items()]
