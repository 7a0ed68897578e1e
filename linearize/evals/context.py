"""What an evaluation task sees: its settings (`EvalSettings`), the models under evaluation (`Scorer`), the
run (`EvalContext`), and the
branch controls that run a hybrid student's branches alone (wrappers in the mixers' places)."""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linearize.config import Recipe, parse_pairs_into
from linearize.evals import EvalError


@dataclass(kw_only=True)
class EvalSettings:
    """Sizes and grids of the tasks; `linearize eval key=value` sets any of them."""

    seed: int = 0
    """Seeds every generated sample (MQAR, passkey, cloze sampling)."""
    device: str = ""
    """Device to run on; empty: cuda when available, else cpu."""
    cpu_threads: int = 0
    """torch threads on CPU for the whole evaluation; 0: torch's default, the count `convert` trains with
    (1 avoids OpenMP spin-waiting on a machine busy with other jobs, which makes small models 10x slower)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    ppl_data: list[str] = field(default_factory=list)
    """Perplexity text: .txt/.jsonl/.json/.parquet files, `hub:NAME`, `bundled:NAME`; empty: the run's
    held-out documents (recipe.yaml), else the last 49 bundled TinyStories documents."""
    ppl_mode: typing.Literal["window", "document"] = "window"
    """`window`: documents concatenated and cut into `ppl_seq_len` blocks; `document`: each document
    scored alone (split into `ppl_seq_len` windows when longer)."""
    ppl_seq_len: int = 256
    """Tokens per perplexity window."""
    ppl_max_blocks: int = 0
    """Score at most this many windows (0: all)."""
    ppl_window: bool = False
    """`ppl` also scores the zero-training sliding-window teacher (`window`, `sinks`) on the same windows:
    the baseline a student must beat, at any length (the `controls` task scores it at `ppl_seq_len` with
    recall too)."""
    add_bos: bool = True
    """Prepend BOS to every document and generated sample (when the tokenizer has one)."""
    mqar_pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    """MQAR: numbers of key-value pairs."""
    mqar_lengths: list[int] = field(default_factory=lambda: [128, 256, 512])
    """MQAR: sequence lengths (pairs, filler, then every key queried once)."""
    mqar_samples: int = 16
    """MQAR: sequences per (pairs, length) cell."""
    passkey_lengths: list[int] = field(default_factory=lambda: [256, 384, 512])
    """Passkey: prompt lengths in tokens (capped at the model's context)."""
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Passkey: where the key sits in the filler (0: start, 1: end)."""
    passkey_samples: int = 8
    """Passkey: prompts per (depth, length) cell."""
    passkey_digits: int = 5
    """Passkey: digits of the hidden number."""
    cloze_data: str = "bundled:tinystories_docs.txt"
    """Cloze passages come from the last `cloze_docs` documents of this source."""
    cloze_docs: int = 49
    """Cloze: documents taken from the end of `cloze_data` (held out of the bundled recipe's training)."""
    cloze_passages: int = 200
    """Cloze: passages sampled (each ends at a sentence's last word)."""
    speed_lengths: list[int] = field(default_factory=lambda: [64, 128, 256, 448])
    """Speed: context lengths (capped at the model's context minus `decode_tokens`)."""
    decode_tokens: int = 32
    """Speed: tokens decoded one at a time after each prefill."""
    speed_repeats: int = 3
    """Speed: timed repeats per measurement (the median is reported)."""
    window: int = 64
    """Controls: window of the sliding-window teacher (tokens, the current one included)."""
    sinks: int = 4
    """Controls: attention-sink tokens at the start every query may always see."""
    controls: list[str] = field(default_factory=lambda: ["window"])
    """Controls to run: `window` (sliding window + sinks on the teacher), `branches` (per-branch
    controls of a hybrid window_linear student)."""
    lm_eval_limit: int = 0
    """lm_eval tasks: at most this many documents per task (0: all)."""
    lm_eval_include: list[str] = field(default_factory=list)
    """lm_eval tasks: extra folders of task YAMLs (the shipped `linearize/evals/tasks` is always included)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "ppl_seq_len", "mqar_samples", "passkey_samples", "decode_tokens"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mqar_pairs", "mqar_lengths", "passkey_lengths", "speed_lengths"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise EvalError(
                    f"{name} must be a non-empty list of integers >= 1, got {getattr(self, name)}"
                )
        if any(not 0 <= d <= 1 for d in self.passkey_depths) or not self.passkey_depths:
            raise EvalError(f"passkey_depths must be fractions in [0, 1], got {self.passkey_depths}")
        if self.window < 1 or self.sinks < 0:
            raise EvalError(
                f"window must be >= 1 and sinks >= 0, got window={self.window} sinks={self.sinks}"
            )
        bad = [c for c in self.controls if c not in ("window", "branches")]
        if bad:
            raise EvalError(f"controls={bad[0]!r} is not valid; choose from: window, branches")

    @classmethod
    def from_pairs(cls, pairs: dict[str, str]) -> EvalSettings:
        """Settings from `linearize eval` `key=value` strings, read by `linearize.config.parse_pairs_into`."""
        return parse_pairs_into(
            cls, pairs, error=EvalError, what="eval option", also_valid=("model", "teacher", "tasks", "out")
        )

    @classmethod
    def for_recipe(cls, recipe: Recipe, device: str | torch.device) -> EvalSettings:
        """Settings of the eval run at the end of `convert`: the recipe's seed, `eval` section and BOS rule."""
        return cls(
            seed=recipe.seed,
            device=str(device),
            batch_size=recipe.eval.batch_size,
            ppl_seq_len=recipe.eval.seq_len,
            ppl_max_blocks=recipe.eval.max_blocks,
            add_bos=recipe.data.add_bos,
        )


TEACHER, STUDENT, WINDOW = "teacher", "student", "sliding_window"

HYBRID_MIXERS = ("window_linear", "gated with gated_window")


def is_hybrid(plan: dict) -> bool:
    """Whether a converted model's mixers have branch switches (a window and a linear/gated branch)."""
    return plan.get("mixer") == "window_linear" or (
        plan.get("mixer") == "gated" and bool(plan.get("gated_window"))
    )


BRANCHES = ("window_only", "linear_only", "no_attention")


class BranchControl(nn.Module):
    """A hybrid mixer with one branch alone (its `forward_branch`), in the mixer's place in its layer."""

    def __init__(self, mixer: nn.Module, branch: str):
        super().__init__()
        self.mixer, self.branch = mixer, branch

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.mixer.forward_branch(self.branch, *args, **kwargs)


@contextmanager
def branch_control(model: nn.Module, branch: str | None) -> Iterator[nn.Module]:
    """`model` with every converted layer running `branch` alone (None: the model as it is). Layers the
    plan keeps softmax stay softmax; any other mixer without the branch is an error."""
    if branch is None:
        yield model
        return
    plan = dict(getattr(model.config, "linearize", None) or {})
    kept = set(plan.get("softmax_layers", []))
    layers = model.model.layers
    swapped = []
    try:
        for idx, layer in enumerate(layers):
            if idx in kept:
                continue
            mixer = layer.self_attn
            if branch not in getattr(mixer, "branches", ()):
                raise EvalError(
                    f"branch control {branch!r} needs a hybrid mixer ({' or '.join(HYBRID_MIXERS)}); layer {idx} "
                    f"is {type(mixer).__name__}"
                )
            layer.self_attn = BranchControl(mixer, branch)
            swapped.append((layer, mixer))
        yield model
    finally:
        for layer, mixer in swapped:
            layer.self_attn = mixer


@dataclass
class Scorer:
    """A model under evaluation: its name in the report and an optional attention mask builder."""

    name: str
    model: torch.nn.Module
    mask: Callable[[int, torch.device], torch.Tensor] | None = None
    """seq_len, device -> [1, 1, seq_len, seq_len] boolean mask (True = may attend), for the controls."""
    branch: str | None = None
    """A hybrid student's branch to score alone (a branch control, e.g. "window_only"; see
    `branch_control`)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 logits of a [batch, seq] batch, no cache."""
        ids = ids.to(self.device)
        kwargs = {}
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask(ids.shape[1], ids.device).expand(ids.shape[0], 1, -1, -1)
        with branch_control(self.model, self.branch):
            return self.model(input_ids=ids, use_cache=False, **kwargs).logits.float()


@dataclass
class EvalContext:
    """What a task sees: the two models, the shared tokenizer, settings and what is known of the run."""

    teacher: Scorer
    student: Scorer
    tokenizer: Any
    settings: EvalSettings
    recipe: dict | None = None
    """The run's recipe.yaml, when the student folder has one."""
    run_dir: Path | None = None
    """The run folder (the student folder's parent, when it holds the run's recipe.yaml)."""

    @property
    def scorers(self) -> list[Scorer]:
        return [self.teacher, self.student]

    @property
    def context_length(self) -> int:
        """Longest sequence both models handle (max_position_embeddings of the teacher)."""
        return int(getattr(self.teacher.model.config, "max_position_embeddings", 2048) or 2048)

    @property
    def bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if self.settings.add_bos and bos is not None else []

    @property
    def student_plan(self) -> dict:
        return dict(getattr(self.student.model.config, "linearize", None) or {})

    def generator(self, salt: int) -> torch.Generator:
        """A torch generator seeded from the settings' seed and a per-task salt."""
        return torch.Generator().manual_seed(self.settings.seed * 1_000_003 + salt)


def sliding_window_mask(seq_len: int, device: torch.device, window: int, sinks: int) -> torch.Tensor:
    """[1, 1, seq_len, seq_len] bool: query i sees key j when j <= i and (i - j < window or j < sinks)."""
    i = torch.arange(seq_len, device=device)
    causal = i[:, None] >= i[None, :]
    keep = causal & ((i[:, None] - i[None, :] < window) | (i[None, :] < sinks))
    return keep[None, None]


def window_scorer(ctx: EvalContext) -> Scorer:
    """The teacher restricted to a sliding window of `settings.window` tokens plus `settings.sinks` sinks,
    through an explicit 4D attention mask (no patching): the zero-training baseline."""
    s = ctx.settings
    return Scorer(
        WINDOW, ctx.teacher.model, functools.partial(sliding_window_mask, window=s.window, sinks=s.sinks)
    )
