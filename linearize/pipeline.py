"""`linearize convert`, top to bottom: load → swap → evaluate the teacher → stage attention → stage logits →
export, one short function each; where the models live is the `Placement`'s business (linearize.distributed).

Every stage ends in a complete `final/` folder; a rerun of the same command skips finished stages,
resumes an interrupted one from its newest complete checkpoint, and reuses evaluations already made.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from linearize import checkpoint, host, teacher_text
from linearize.architectures.mixers import keep_softmax
from linearize.config import Recipe, RecipeError, load_recipe
from linearize.convert.export import export, hardware
from linearize.convert.swap import Plan, plan_for, swap
from linearize.convert.teachers import load_teacher, read_config
from linearize.data import Splits, StreamedBlocks, build_splits
from linearize.distill.logit_cache import LogitCache, write_logit_cache
from linearize.distill.loop import MetricsLog, train_stage
from linearize.distill.memory import preflight
from linearize.distill.stages import (
    Aligner,
    aligned_layers,
    attention_stage,
    logits_stage,
    rank_layers,
    trained_student,
)
from linearize.distill.teacher import CachedTeacher, LiveTeacher
from linearize.distributed import Placement, ShardedStudent, WholeStudent
from linearize.evals.context import sliding_window_mask
from linearize.evals.harness import EvalSettings, evaluate
from linearize.evals.perplexity import perplexity

STAGES = ("attention", "logits")
REPORT_NAMES = {
    "sliding_window": f"teacher, sliding window + {EvalSettings.sinks} sinks, no training",
    "student_untrained": "student, untrained",
    "student_after_attention": "student after stage attention",
    "student_after_logits": "student after stage logits",
    "student_after_layer_plan": "student after the layer plan",
}


class EvalLog:
    """eval.json of a run: named results, computed once (a resumed run reuses them)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.results: dict = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, name: str, compute: Callable[[], dict]) -> dict:
        if name not in self.results:
            self.results[name] = compute()
            if self.enabled:
                self.path.write_text(json.dumps(self.results, indent=1))
        return self.results[name]


# Fields that describe a run without changing it: a new wording of these does not make another recipe.
DESCRIPTIVE_FIELDS = ("description", "launch.hardware")


def recipe_differences(saved: Path, recipe: Recipe) -> list[str]:
    """The fields (dotted) in which `recipe` differs from the resolved recipe saved at `saved`, as
    "key: <saved> then, <now> now", descriptive fields left out. The saved recipe is read through the schema
    when it still validates, so a field added to the schema since (at its default) is no difference."""
    import yaml

    try:
        before = load_recipe(str(saved)).to_dict()
    except RecipeError:  # a field since removed or renamed: compare the raw text's tree
        before = yaml.safe_load(saved.read_text()) or {}
    now = recipe.to_dict()

    def walk(a, b, prefix: str):
        for key in sorted(set(a) | set(b), key=str):
            name = f"{prefix}{key}"
            x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
            if isinstance(x, dict) and isinstance(y, dict):
                yield from walk(x, y, f"{name}.")
            elif x != y and name not in DESCRIPTIVE_FIELDS:
                yield f"{name}: {x!r} then, {y!r} now"

    return list(walk(before, now, ""))


def check_writable(run_dir: Path) -> None:
    """Refuse a run folder that cannot be created or written (a file in its place, a read-only file system,
    no permission), before any work: a probe file is created and removed in its nearest existing folder."""
    import tempfile

    existing = checkpoint.nearest_existing(run_dir)
    if not existing.is_dir():
        what = "output_dir" if existing == run_dir else f"output_dir {run_dir}: its parent"
        raise RecipeError(f"{what} {existing} is a file, not a folder; set output_dir=<a folder path>")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise RecipeError(
            f"cannot write the run folder {run_dir}: {existing} is not writable ({err.strerror or err}); "
            "set output_dir=<a writable folder>"
        ) from None


def check_run_dir(recipe: Recipe) -> Path:
    """Refuse a run folder that cannot be written or holds a run of another recipe (nothing is written)."""
    run_dir = recipe.run_dir
    check_writable(run_dir)
    saved = run_dir / "recipe.yaml"
    differences = recipe_differences(saved, recipe) if saved.is_file() else []
    if differences:
        shown = "; ".join(differences[:4]) + (
            f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
        )
        raise RecipeError(
            f"{run_dir} holds a run of a different recipe ({shown}; see {saved}); rerun with the same recipe "
            f"and overrides to resume, set output_dir=<new folder>, or delete {run_dir}"
        )
    return run_dir


def claim_run_dir(recipe: Recipe, is_main: bool) -> Path:
    """Create the run folder and record the resolved recipe in it."""
    run_dir = check_run_dir(recipe)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    return run_dir


def save_weights(
    model: torch.nn.Module, folder: Path, recipe: Recipe, is_main: bool, barrier: Callable[[], None]
) -> None:
    from safetensors.torch import save_model

    checkpoint.write_atomic(
        folder,
        lambda tmp: save_model(model, str(tmp / "model.safetensors")) if is_main else None,
        info={"recipe_hash": recipe.hash()},
        is_main=is_main,
        barrier=barrier,
    )
    if is_main:
        (folder / "recipe.yaml").write_text(recipe.to_yaml())


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import load_model

    load_model(model, str(folder / "model.safetensors"))


@dataclass
class Run:
    """What the steps of one conversion share: the recipe, where the models live, the data and the logs."""

    recipe: Recipe
    placement: Placement
    only: str | None
    run_dir: Path
    tokenizer: Any
    plan: Plan
    splits: Splits
    log: MetricsLog
    evals: EvalLog
    prompt: list[int]
    teacher: nn.Module
    student: WholeStudent | ShardedStudent | None = None
    cache: LogitCache | None = None
    teacher_sample: str = ""
    tokens: dict[str, int] = field(default_factory=dict)

    def evaluate(
        self, name: str, model: Callable[[], nn.Module], mask: Callable[..., torch.Tensor] | None = None
    ) -> None:
        """Held-out perplexity of `model()` (under attention `mask`, if given) recorded as `name` in eval.json
        once (a resumed run reuses it), and printed as soon as it is known."""
        if not self.splits.heldout:
            return
        eval_cfg = self.recipe.eval
        result = self.evals.get(
            name,
            lambda: perplexity(
                model(),
                self.splits.heldout,
                eval_cfg.seq_len,
                eval_cfg.batch_size,
                eval_cfg.max_blocks,
                split=self.placement.sharded,
                mask=mask,
            ),
        )
        teacher = self.evals.results.get("teacher", result)["ppl"]
        self.placement.print(
            f"[eval] held-out perplexity, {REPORT_NAMES.get(name, name)}: {result['ppl']:.3f} "
            f"({result['ppl'] / teacher:.2f}x teacher)"
        )


def convert(recipe: Recipe, only: str | None = None) -> Path:
    """Run the whole pipeline for `recipe`; returns the exported folder.

    `only="attention"` (`linearize distill stage=attention`) stops after stage 1 and returns its final
    folder; `only="logits"` needs stage 1 done (or skipped), runs stage 2 and exports.
    """
    check_request(recipe, only)
    placement = Placement.for_recipe(recipe)
    placement.print(placement.describe())
    run = load(recipe, placement, only)
    build_student(run)
    evaluate_teacher(run)
    for stage in STAGES:
        run_stage(run, stage)
        if only == stage == "attention":
            final = run.run_dir / stage / "final"
            done = f"stage 1 is in {final}" if recipe.stage_steps(stage) else "stage 1 has nothing to do"
            placement.print(f"[attention] {done}; next: the same command with stage=logits")
            return final
    return finish(run)


def check_request(recipe: Recipe, only: str | None) -> None:
    """Refuse a stage name that does not exist, and stage logits alone before stage attention is done."""
    if only not in (None, *STAGES):
        raise RecipeError(f"stage must be one of {', '.join(STAGES)}, got {only!r}")
    if (
        only == "logits"
        and recipe.stage_steps("attention")
        and not checkpoint.is_complete(recipe.run_dir / "attention" / "final")
    ):
        raise RecipeError(
            f"stage logits needs stage attention done in {recipe.run_dir}: run `linearize distill "
            "stage=attention` with the same recipe first (or set stages.attention.steps=0)"
        )


def load(recipe: Recipe, placement: Placement, only: str | None) -> Run:
    """Load the teacher and the data, refuse a run that would not fit, and claim the run folder. Everything
    that can be wrong with the input is checked before the run folder is written to."""
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    check_run_dir(recipe)
    note = host.slow_bf16_note(placement.device.type, recipe.teacher.dtype, recipe.train.precision)
    if note:
        placement.print(note)
    check_context(recipe, read_config(recipe.teacher.path))
    teacher, tokenizer = placement.load_teacher(load_teacher, recipe.teacher.path, recipe.teacher.dtype)
    plan = plan_for(recipe.student, teacher.config)
    # The memory estimate of every stage about to run, refused here when one would not fit the device.
    todo = [s for s in STAGES if recipe.stage_steps(s) and only in (None, s)]
    todo = [s for s in todo if not checkpoint.is_complete(recipe.run_dir / s / "final")]
    preflight(recipe, teacher.config, todo, placement.accelerator)
    # teacher:<tokens> text is written by this (one-process) teacher before anything reads it
    writer = teacher if placement.num_processes == 1 else None
    data = teacher_text.resolve(
        recipe.data, recipe.teacher.path, recipe.teacher.dtype, writer, tokenizer, placement.print
    )
    splits = build_splits(data, tokenizer)
    placement.print(
        f"data: {'a stream of' if splits.streaming else splits.train.shape[0]} training blocks of "
        f"{splits.train.shape[1]} tokens, {len(splits.heldout)} held-out documents"
    )
    check_epochs(recipe, splits, todo, placement)
    run_dir = claim_run_dir(recipe, placement.is_main)
    return Run(
        recipe=recipe,
        placement=placement,
        only=only,
        run_dir=run_dir,
        tokenizer=tokenizer,
        plan=plan,
        splits=splits,
        log=MetricsLog(run_dir / "metrics.jsonl", enabled=placement.is_main),
        evals=EvalLog(run_dir / "eval.json", enabled=placement.is_main),
        prompt=sample_prompt(splits),
        teacher=teacher,
    )


def check_context(recipe: Recipe, config: Any) -> None:
    """Refuse training blocks longer than the teacher's context: its positions beyond were never trained,
    so the teacher signal there is not the teacher's."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and recipe.data.seq_len > limit:
        raise RecipeError(
            f"data.seq_len={recipe.data.seq_len} exceeds the teacher's context (max_position_embeddings={limit} "
            f"in {recipe.teacher.path}); set data.seq_len={limit} or less"
        )


def check_epochs(recipe: Recipe, splits: Splits, stages: list[str], placement: Placement) -> None:
    """Say how many times each stage about to run reads the training text, and refuse one that would read it
    more than `data.max_epochs` times (a stream is read once, in order: nothing to count)."""
    if splits.streaming:
        return
    have = splits.train.numel()
    for stage in stages:
        tokens = recipe.stage_tokens(stage, placement.num_processes)
        epochs = tokens / have
        placement.print(f"[{stage}] {tokens:,} tokens = {epochs:.2f} passes over {have:,} training tokens")
        if epochs > recipe.data.max_epochs:
            need = -(-tokens // int(recipe.data.max_epochs * 1000)) * 1000
            raise RecipeError(
                f"stage {stage} would read the training text {epochs:.1f} times ({tokens:,} tokens over "
                f"{have:,}), more than data.max_epochs={recipe.data.max_epochs:g}: that measures memorisation, "
                f"not conversion. Give it more text (data.train=[teacher:{need:,}] has the teacher write "
                "its own, or more files), fewer steps, or raise data.max_epochs"
            )


def build_student(run: Run) -> None:
    """The student: the teacher's modules with the planned mixers swapped in, sharing the teacher's
    weights, frozen (each stage says what trains; FSDP2 upcasts only that)."""
    torch.manual_seed(run.recipe.seed)  # the new parameters' init
    run.student = run.placement.student(swap(run.teacher, run.plan).requires_grad_(False))


def evaluate_teacher(run: Run) -> None:
    """The teacher's held-out perplexity, greedy sample and (stages.logits.cache_k) top-k logit cache, then
    the teacher placed for the stages."""
    recipe, placement = run.recipe, run.placement
    cfg = recipe.stages.logits
    logits_done = checkpoint.is_complete(run.run_dir / "logits" / "final")
    teacher = placement.evaluated_teacher(run.teacher)
    run.evaluate("teacher", lambda: teacher)
    # the zero-training baseline as `linearize eval` scores it, with the student's own window if it has one
    window = recipe.student.softmax_window or EvalSettings.window
    run.evaluate(
        "sliding_window",
        lambda: teacher,
        mask=functools.partial(sliding_window_mask, window=window, sinks=EvalSettings.sinks),
    )
    run.teacher_sample = greedy_sample(teacher, run.tokenizer, run.prompt, synced=placement.sharded)
    if cfg.cache_k and cfg.steps and run.only != "attention" and not logits_done:
        run.cache = teacher_logit_cache(teacher, run.splits.train, recipe, run.run_dir, placement)
    run.teacher = placement.stage_teacher(teacher, cfg.batch_size)
    run.evaluate("student_untrained", lambda: run.student.sharded())


def run_stage(run: Run, stage: str) -> None:
    """Train one stage (or load its final weights when a previous run finished it), then evaluate it; after
    stage attention, an `auto:N` layer plan picks its softmax layers."""
    recipe, placement = run.recipe, run.placement
    steps = recipe.stage_steps(stage)
    final = run.run_dir / stage / "final"
    if steps < getattr(recipe.stages, stage).steps:
        placement.print(
            f"[{stage}] skipped: student.mixer=softmax keeps every layer's attention, so there is nothing "
            "to align (the fine-tuned-teacher control trains in stage logits only)"
        )
    run.tokens[stage] = recipe.stage_tokens(stage, placement.num_processes)
    if checkpoint.is_complete(final):
        placement.print(f"[{stage}] already done: loading {final}")
        plain = run.student.plain()
        if placement.is_main or not placement.sharded:  # sharded: rank 0's weights reach the others
            load_weights(plain, final)
    elif steps > 0:
        train(run, stage)
    run.evaluate(f"student_after_{stage}", lambda: run.student.sharded())
    if stage == "attention" and run.plan.auto_softmax:
        apply_auto_plan(run)
        run.evaluate("student_after_layer_plan", lambda: run.student.sharded())


def train(run: Run, stage: str) -> None:
    """Stage `stage` on the student: build what trains and its loss, run the loop, keep the trained student
    and save it in `<run>/<stage>/final`."""
    recipe, placement, student = run.recipe, run.placement, run.student
    cfg = getattr(recipe.stages, stage)
    plain = student.plain()
    if stage == "attention":
        model, loss_fn = attention_stage(plain, LiveTeacher(run.teacher))
    else:
        if cfg.trainable != "lora" and run.cache is None:  # the teacher's weights are about to train
            run.teacher = placement.frozen_teacher(run.teacher)
        torch.manual_seed(recipe.seed + 1)  # LoRA init, identical on a resumed run
        model, loss_fn = logits_stage(
            plain, cfg, CachedTeacher(run.cache) if run.cache else LiveTeacher(run.teacher)
        )
    student.replace(model)
    source = (
        StreamedBlocks(recipe.data, run.tokenizer, cfg.batch_size, placement.rank, placement.num_processes)
        if run.splits.streaming
        else None
    )
    result = train_stage(
        name=stage,
        cfg=cfg,
        recipe=recipe,
        model=student.sharded(),
        loss_fn=loss_fn,
        blocks=None if run.splits.streaming else run.splits.train,
        source=source,
        stage_dir=run.run_dir / stage,
        log=run.log,
        placement=placement,
    )
    student.replace(trained_student(student.plain()))  # sharded: gathered into rank 0's CPU memory
    student.plain().requires_grad_(False)
    save_weights(student.plain(), run.run_dir / stage / "final", recipe, placement.is_main, placement.barrier)
    placement.print(
        f"[{stage}] done: {result.steps} steps, {result.tokens:,} tokens, {result.seconds:.1f}s, last loss "
        f"{result.last_loss:.4g}; {result.tokens_per_second:,.0f} tokens/s, peak memory "
        f"{result.peak_memory / 2**30:.2f} GiB per device ({placement.memory_kind()}, the largest process)"
    )


def finish(run: Run) -> Path:
    """Export the student, print the report, sample the exported model as a user loads it, run the eval
    tasks; returns the exported folder."""
    recipe, placement = run.recipe, run.placement
    run.teacher = None  # (sharded: its shards go before the exported model is loaded)
    trained = run.student.plain()  # sharded: gathered (every process takes part) into rank 0's CPU memory
    out = run.run_dir / "final"
    if placement.is_main:
        out = export(
            trained,
            run.tokenizer,
            run.plan,
            recipe,
            out,
            run.evals.results,
            run.tokens,
            hardware(placement.num_processes, placement.device),
        )
    trained = run.student = None  # sharded: rank 0's whole CPU copy goes before the exported one loads
    placement.barrier()
    print_report(run.evals.results, placement.print)
    if placement.sharded or placement.is_main:
        exported = placement.load_exported(out, getattr(torch, recipe.teacher.dtype))
        sample = greedy_sample(exported, run.tokenizer, run.prompt, synced=placement.sharded)
        placement.print(f"teacher (greedy): {run.teacher_sample!r}")
        placement.print(
            f"student (greedy, exported model{', sharded' if placement.sharded else ''}): {sample!r}"
        )
        del exported
    if placement.is_main and recipe.eval.tasks:
        run_eval_tasks(recipe, out, placement.device, placement.print)
    placement.print(f"exported to {out}")
    return out


def teacher_logit_cache(
    teacher: nn.Module, blocks: torch.Tensor, recipe: Recipe, run_dir: Path, placement: Placement
) -> LogitCache:
    """Write (or finish, after a kill) the teacher's top-k logit cache over the training blocks, every
    process its share of the shards with its own whole teacher, or (FSDP2) with the teacher sharded over
    the processes, in step; every process then reads all of it."""
    cfg = recipe.stages.logits
    folder = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "logit_cache"
    began = time.perf_counter()
    cache = write_logit_cache(
        teacher,
        blocks,
        folder,
        k=cfg.cache_k,
        batch_size=cfg.batch_size,
        teacher_name=recipe.teacher.path,
        rank=placement.rank,
        world_size=placement.num_processes,
        barrier=placement.barrier,
        max_over_processes=placement.lock_step(),
    )
    size = sum(p.stat().st_size for p in folder.iterdir())
    placement.print(
        f"[logits] teacher top-{cfg.cache_k} logit cache: {folder}, {size / 2**20:.1f} MiB for "
        f"{blocks.numel():,} tokens ({size / blocks.numel():.0f} B/token), {time.perf_counter() - began:.1f}s "
        f"on {placement.num_processes} process(es)"
    )
    return cache


RANKING_BLOCKS = 16  # training blocks the layer ranking of an auto:N plan averages over


def apply_auto_plan(run: Run) -> None:
    """`student.layers=auto:N`: rank the converted layers of the student by their alignment loss to the
    teacher after stage 1 (or reuse the ranking a previous run of this recipe wrote), keep the top N as
    softmax, record it in the plan."""
    student, plan = run.student, run.plan
    path = run.run_dir / "layer_ranking.json"
    if path.is_file():
        ranking = json.loads(path.read_text())
    else:
        plain = student.plain()
        student.replace(Aligner(plain, aligned_layers(plain)))
        blocks = run.splits.train[:RANKING_BLOCKS]
        ranking = rank_layers(
            student.sharded(), LiveTeacher(run.teacher), blocks, run.recipe.stages.attention.batch_size
        )
        student.replace(trained_student(student.plain()))
        if run.placement.is_main:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(ranking, indent=1))
            tmp.replace(path)
    keep = sorted(r["layer"] for r in ranking[: plan.auto_softmax])
    keep_softmax(student.plain().model.layers, keep)
    plan.softmax_layers, plan.layer_ranking = keep, ranking
    run.placement.print(
        f"[layers] {plan.layers}: keeping softmax in layers {keep}; alignment loss per layer, highest "
        f"first: " + ", ".join(f"{r['layer']}={r['loss']:.4g}" for r in ranking)
    )


def run_eval_tasks(recipe: Recipe, out: Path, device: torch.device, log: Callable[[str], None]) -> None:
    """The recipe's eval tasks on the exported student and the original teacher; report in <run>/report."""
    settings = EvalSettings.for_recipe(recipe, device)
    results = evaluate(out, recipe.eval.tasks, out=recipe.run_dir / "report", settings=settings, log=log)
    log(f"evaluation report: {results['info']['report']}/report.md")


def sample_prompt(splits: Splits, n_tokens: int = 8) -> list[int]:
    """The first tokens of the first held-out (else training) document: a prompt in the data's style."""
    return splits.heldout[0][:n_tokens] if splits.heldout else splits.train[0, :n_tokens].tolist()


@torch.no_grad()
def greedy_sample(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[int],
    new_tokens: int = 32,
    synced: bool = False,
) -> str:
    """`synced=True` (a model sharded over the processes, every process calling): every process runs forwards
    until the last one has finished (transformers' synced_gpus)."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        synced_gpus=synced,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def print_report(results: dict, out: Callable[[str], None] = print) -> None:
    """The held-out perplexities of the run, each next to the teacher's."""
    if "teacher" not in results:
        return
    base = results["teacher"]["ppl"]
    width = max(len(REPORT_NAMES.get(n, n)) for n in results) + 2
    out(f"{'held-out perplexity':<{width}}{'ppl':>10}{'x teacher':>12}")
    for name, r in results.items():
        out(f"{REPORT_NAMES.get(name, name):<{width}}{r['ppl']:>10.3f}{r['ppl'] / base:>12.2f}")
