"""The harness: load teacher and student, run the asked tasks over both, write one report.

`evaluate()` is what `linearize eval` and the end of `linearize convert` call. Models are wrapped in a
`Scorer` (a name, a model and an optional 4D attention mask), so a task scores the teacher, the student
and the controls' sliding-window teacher with the same code.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from linearize.config import Recipe, parse_pairs_into
from linearize.evals import EvalError, check_task_name, resolve_task

TEACHER, STUDENT, WINDOW = "teacher", "student", "sliding_window"


@dataclass(kw_only=True)
class EvalSettings:
    """Sizes and grids of the tasks; `linearize eval key=value` sets any of them."""

    seed: int = 0
    """Seeds every generated sample (MQAR, passkey, cloze sampling)."""
    device: str = ""
    """Device to run on; empty: cuda when available, else cpu."""
    cpu_threads: int = 1
    """torch threads on CPU for the whole evaluation (1 avoids OpenMP spin-waiting on a loaded machine,
    which makes small models 10x slower and timings unstable; 0: torch's default)."""
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


@dataclass
class Scorer:
    """A model under evaluation: its name in the report and an optional attention mask builder."""

    name: str
    model: torch.nn.Module
    mask: Callable[[int, torch.device], torch.Tensor] | None = None
    """seq_len, device -> [1, 1, seq_len, seq_len] boolean mask (True = may attend), for the controls."""
    mixer_mode: str | None = None
    """A mixer mode to score the model in (a hybrid student's branch control, e.g. "window_only")."""

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
        if self.mixer_mode is None:
            return self.model(input_ids=ids, use_cache=False, **kwargs).logits.float()
        from linearize.architectures.mixers import mode

        with mode(self.model, self.mixer_mode):
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


def pick_device(name: str) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def read_recipe(folder: Path) -> dict | None:
    import yaml

    path = folder / "recipe.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def load_student(path: str | Path, device: torch.device):
    """(model, tokenizer, recipe dict or None) of an exported converted checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import linearize  # noqa: F401  (registers the converted classes with the Auto classes)

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise EvalError(
            f"model folder {folder} does not exist or has no config.json; give model=<exported folder> "
            f"(the `final` folder of a `linearize convert` run)"
        )
    config = AutoConfig.from_pretrained(folder)
    if not getattr(config, "linearize", None):
        raise EvalError(
            f"{folder} is not a converted checkpoint (its config has no `linearize` section); "
            f"give model=<folder written by linearize convert>"
        )
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder), read_recipe(folder)


def load_teacher_for(path: str, dtype: str, device: torch.device):
    from linearize.convert.teachers import load_teacher

    model, tokenizer = load_teacher(path, dtype)
    return model.to(device).eval(), tokenizer


def check_same_vocab(teacher, teacher_tok, student, student_tok) -> None:
    """Teacher and student must share a tokenizer, or no number of the report is comparable."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise EvalError(
            f"teacher vocab mismatch: the teacher has {tv} tokens, the student {sv}; give the teacher the "
            f"student was converted from (teacher=<path>)"
        )
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise EvalError(
            "teacher vocab mismatch: teacher and student tokenizers differ; give the teacher the student "
            "was converted from (teacher=<path>)"
        )


def run_info(ctx: EvalContext, model_path: str, teacher_path: str) -> dict:
    """Recipe, token budget, the run's own eval.json and the hardware, for the report's header."""
    info: dict[str, Any] = {
        "model": str(model_path),
        "teacher": teacher_path,
        "student_plan": ctx.student_plan,
        "device": str(ctx.student.device),
        "device_name": torch.cuda.get_device_name(ctx.student.device)
        if ctx.student.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": dataclasses.asdict(ctx.settings),
    }
    if ctx.recipe:
        info["recipe"] = ctx.recipe
        stages = ctx.recipe.get("stages", {})
        seq_len = ctx.recipe.get("data", {}).get("seq_len", 0)
        info["token_budget_per_process"] = {
            name: s.get("steps", 0) * s.get("batch_size", 0) * s.get("grad_accum", 1) * seq_len
            for name, s in stages.items()
        }
    if ctx.run_dir is not None and (ctx.run_dir / "eval.json").is_file():
        info["run_eval"] = json.loads((ctx.run_dir / "eval.json").read_text())
    return info


def evaluate(
    model: str | Path,
    tasks: list[str],
    out: str | Path | None = None,
    teacher: str | None = None,
    settings: EvalSettings | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run `tasks` over the student at `model` and its teacher; write the report to `out`.

    The teacher is `teacher` when given, else the `teacher.path` of the student's recipe.yaml.
    Returns the results dict (what results.json holds).
    """
    from linearize.evals.report import write_report

    settings = settings or EvalSettings()
    if not tasks:
        raise EvalError("no eval tasks given; e.g. tasks=ppl,recall,cloze,speed,controls")
    for name in tasks:
        check_task_name(name)
    runners = {name: resolve_task(name) for name in tasks}
    device = pick_device(settings.device)
    student, student_tok, recipe = load_student(model, device)
    if teacher is None:
        teacher = (recipe or {}).get("teacher", {}).get("path")
        if not teacher:
            raise EvalError(f"{model} has no recipe.yaml naming its teacher; give teacher=<path or hub id>")
    dtype = (recipe or {}).get("teacher", {}).get("dtype", "float32")
    teacher_model, teacher_tok = load_teacher_for(teacher, dtype, device)
    check_same_vocab(teacher_model, teacher_tok, student, student_tok)
    folder = Path(model)
    ctx = EvalContext(
        teacher=Scorer(TEACHER, teacher_model),
        student=Scorer(STUDENT, student),
        tokenizer=student_tok,
        settings=settings,
        recipe=recipe,
        run_dir=folder.resolve().parent
        if recipe and (folder.resolve().parent / "recipe.yaml").is_file()
        else None,
    )
    previous_threads = torch.get_num_threads()
    if device.type == "cpu" and settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    try:
        results: dict[str, Any] = {"info": run_info(ctx, str(model), teacher), "tasks": {}}
        for name, run in runners.items():
            began = time.perf_counter()
            log(f"[eval] {name} ...")
            results["tasks"][name] = run(ctx)
            results["tasks"][name]["seconds"] = round(time.perf_counter() - began, 2)
            log(f"[eval] {name} done in {results['tasks'][name]['seconds']:.1f}s")
    finally:
        torch.set_num_threads(previous_threads)
    if out is None:
        out = folder.resolve().parent / "report"
    results["info"]["report"] = str(out)
    write_report(results, Path(out))
    return results
