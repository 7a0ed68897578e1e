"""`linearize convert`: teacher → swap → stage attention → stage logits → evaluate → export.

Every stage ends in a complete `final/` folder; a rerun of the same command skips finished stages,
resumes an interrupted one from its newest complete checkpoint, and reuses evaluations already made.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from linearize.architectures.mixers import keep_softmax, mode
from linearize.config import Recipe, RecipeError, load_recipe
from linearize.convert.export import export, hardware
from linearize.convert.sharded import ShardedStudent, WholeStudent, load_empty
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import load_teacher
from linearize.distill import checkpoint
from linearize.distill.data import StreamedBlocks, build_splits
from linearize.distill.logit_cache import LogitCache, write_logit_cache
from linearize.distill.loop import (
    MetricsLog,
    make_accelerator,
    max_over_processes,
    shard_fsdp2,
    train_stage,
)
from linearize.distill.memory import preflight
from linearize.distill.stages import attention_stage, logits_stage, rank_layers
from linearize.evals.perplexity import perplexity

STAGES = ("attention", "logits")


class EvalLog:
    """eval.json of a run: named results, computed once (a resumed run reuses them)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.results: dict = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, name: str, compute):
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


def check_run_dir(recipe: Recipe) -> Path:
    """Refuse a run folder that holds a run of another recipe (nothing is written here)."""
    run_dir = recipe.run_dir
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


def save_weights(model: torch.nn.Module, folder: Path, recipe: Recipe, is_main: bool, barrier) -> None:
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


def convert(recipe: Recipe, only: str | None = None) -> Path:
    """Run the whole pipeline for `recipe`; returns the exported folder.

    `only="attention"` (`linearize distill stage=attention`) stops after stage 1 and returns its final
    folder; `only="logits"` needs stage 1 done (or skipped), runs stage 2 and exports.
    """
    from accelerate.utils import set_seed

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

    accelerator = make_accelerator(recipe)
    if accelerator.state.deepspeed_plugin is not None:
        # accelerate's ZeRO-3 plugin turns on transformers' zero.Init: every model built or loaded from here
        # on (the teacher, the meta-device student of the memory estimate, the exported model) would come up
        # partitioned. linearize swaps mixers into a whole teacher and lets prepare() partition the student.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    is_main = accelerator.is_main_process
    sharded = accelerator.is_fsdp2  # the model whole on no device: see linearize.convert.sharded
    accelerator.print(
        f"processes={accelerator.num_processes} backend={accelerator.state.backend or 'none'} "
        f"device={accelerator.device} distributed={accelerator.distributed_type.value}"
    )
    set_seed(recipe.seed)
    check_run_dir(recipe)
    # Everything that can be wrong with the input is checked before the run folder is written to.
    teacher, tokenizer = load_teacher(
        recipe.teacher.path, recipe.teacher.dtype, empty=sharded and not is_main
    )
    if sharded:
        accelerator.print(
            f"[fsdp2] rank 0 holds the whole model in CPU memory; the other {accelerator.num_processes - 1} "
            "process(es) build it empty and receive their shards from rank 0"
        )
    plan = plan_for(recipe.student, teacher.config)
    # The memory estimate of every stage about to run, refused here when one would not fit the device.
    todo = [s for s in STAGES if recipe.stage_steps(s) and only in (None, s)]
    todo = [s for s in todo if not checkpoint.is_complete(recipe.run_dir / s / "final")]
    preflight(recipe, teacher.config, todo, accelerator)
    splits = build_splits(recipe.data, tokenizer)
    run_dir = claim_run_dir(recipe, is_main)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main)
    evals = EvalLog(run_dir / "eval.json", enabled=is_main)
    accelerator.print(
        f"data: {'a stream of' if splits.streaming else splits.train.shape[0]} training blocks of "
        f"{splits.train.shape[1]} tokens, {len(splits.heldout)} held-out documents"
    )

    def ppl(model):
        return perplexity(
            model,
            splits.heldout,
            recipe.eval.seq_len,
            recipe.eval.batch_size,
            recipe.eval.max_blocks,
            split=sharded,
        )

    prompt = sample_prompt(splits, tokenizer)
    logits_cfg = recipe.stages.logits
    logits_done = checkpoint.is_complete(run_dir / "logits" / "final")
    wants_cache = bool(logits_cfg.cache_k and logits_cfg.steps and only != "attention" and not logits_done)
    # trainable=attention|all moves the teacher's own weights: its logits come from an untouched copy
    needs_copy = logits_cfg.trainable != "lora" and not logits_cfg.cache_k and only != "attention"
    frozen = copy.deepcopy(teacher) if needs_copy and not logits_done else None
    if not sharded:
        # the teacher whole on every device: evaluated, sampled and cached before it becomes the student
        teacher = teacher.to(accelerator.device)
        if splits.heldout:
            evals.get("teacher", lambda: ppl(teacher))
        teacher_sample = greedy_sample(teacher, tokenizer, prompt)
        cache = (
            teacher_logit_cache(teacher, splits.train, recipe, run_dir, accelerator) if wants_cache else None
        )
    torch.manual_seed(recipe.seed)  # new parameters' init
    # in place: from here on the teacher is "the student in teacher mode"
    student = (
        ShardedStudent(swap(teacher, plan), accelerator) if sharded else WholeStudent(swap(teacher, plan))
    )
    teacher = None  # the student now (a reference kept here would keep FSDP2's shards after a gather)
    if sharded:  # the teacher is the sharded student in teacher mode (its softmax attention, same weights)
        student.plain().requires_grad_(False)  # nothing trains yet: FSDP2 upcasts only trainable weights
        model = student.sharded()
        with mode(model, "teacher"):
            if splits.heldout:
                evals.get("teacher", lambda: ppl(model))
            teacher_sample = greedy_sample(model, tokenizer, prompt, synced=True)
            cache = (
                teacher_logit_cache(model, splits.train, recipe, run_dir, accelerator)
                if wants_cache
                else None
            )
    if frozen is not None:  # prepared now: under ZeRO-3 or FSDP2 it is sharded from here on
        frozen = prepare_frozen_teacher(accelerator, frozen, logits_cfg.batch_size)
    if splits.heldout:
        evals.get("student_untrained", lambda: ppl(student.sharded()))
    tokens: dict[str, int] = {}
    for stage in STAGES:
        cfg = getattr(recipe.stages, stage)
        steps = recipe.stage_steps(stage)
        stage_dir = run_dir / stage
        final = stage_dir / "final"
        if steps < cfg.steps:
            accelerator.print(
                f"[{stage}] skipped: student.mixer=softmax keeps every layer's attention, so there is nothing "
                "to align (the fine-tuned-teacher control trains in stage logits only)"
            )
        tokens[stage] = recipe.stage_tokens(stage, accelerator.num_processes)
        if checkpoint.is_complete(final):
            accelerator.print(f"[{stage}] already done: loading {final}")
            plain = student.plain()
            if is_main or not sharded:  # sharded: rank 0's weights reach the others when next sharded
                load_weights(plain, final)
        elif steps > 0:
            plain = student.plain()
            if stage == "attention":
                loss_fn = attention_stage(plain)
            else:
                torch.manual_seed(recipe.seed + 1)  # LoRA init, identical on a resumed run
                model, loss_fn = logits_stage(plain, cfg, frozen, cache)
                student.replace(model)
            result = train_stage(
                name=stage,
                cfg=cfg,
                recipe=recipe,
                model=student.sharded(),
                loss_fn=loss_fn,
                blocks=None if splits.streaming else splits.train,
                source=StreamedBlocks(
                    recipe.data,
                    tokenizer,
                    cfg.batch_size,
                    accelerator.process_index,
                    accelerator.num_processes,
                )
                if splits.streaming
                else None,
                stage_dir=stage_dir,
                log=log,
                accelerator=accelerator,
            )
            plain = student.plain()  # sharded: gathered into rank 0's CPU memory
            if plain is not student_model(plain):  # LoRA: fold the adapters into the weights
                student.replace(plain.merge_and_unload())
            student.plain().requires_grad_(False)
            save_weights(student.plain(), final, recipe, is_main, accelerator.wait_for_everyone)
            accelerator.print(
                f"[{stage}] done: {result.steps} steps, {result.tokens:,} tokens, "
                f"{result.seconds:.1f}s, last loss {result.last_loss:.4g}; {result.tokens_per_second:,.0f} tokens/s, "
                f"peak memory {result.peak_memory / 2**30:.2f} GiB per device "
                f"({'CUDA allocated' if accelerator.device.type == 'cuda' else 'process RSS'}, the largest process)"
            )
        if splits.heldout:
            evals.get(f"student_after_{stage}", lambda: ppl(student.sharded()))
        if stage == "attention" and plan.get("auto_softmax"):
            apply_auto_plan(student, plan, splits.train, recipe, run_dir, is_main, accelerator.print)
            if splits.heldout:
                evals.get("student_after_layer_plan", lambda: ppl(student.sharded()))
        if only == stage == "attention":
            done = f"stage 1 is in {final}" if steps else "stage 1 has nothing to do"
            accelerator.print(f"[attention] {done}; next: the same command with stage=logits")
            return final

    trained = student.plain()  # sharded: whole in rank 0's CPU memory
    out = (
        export(
            trained,
            tokenizer,
            plan,
            recipe,
            run_dir / "final",
            evals.results,
            tokens,
            hardware(accelerator.num_processes, accelerator.device),
        )
        if is_main
        else run_dir / "final"
    )
    trained = student = None  # sharded: rank 0's whole CPU copy goes before the exported one loads
    accelerator.wait_for_everyone()
    print_report(evals.results, accelerator.print)
    if sharded or is_main:
        exported = load_exported(out, accelerator, sharded, getattr(torch, recipe.teacher.dtype))
        sample = greedy_sample(exported, tokenizer, prompt, synced=sharded)
        accelerator.print(f"teacher (greedy): {teacher_sample!r}")
        accelerator.print(f"student (greedy, exported model{', sharded' if sharded else ''}): {sample!r}")
        del exported
    if is_main and recipe.eval.tasks:
        run_eval_tasks(recipe, out, accelerator.device, accelerator.print)
    accelerator.print(f"exported to {out}")
    return out


def load_exported(out: Path, accelerator, sharded: bool, dtype: torch.dtype) -> torch.nn.Module:
    """The exported model as a user loads it (`AutoModelForCausalLM`, in the teacher's dtype), to sample
    from: whole on this device, or (FSDP2) read by rank 0, built empty elsewhere and sharded over the
    processes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not sharded:
        return AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(accelerator.device)
    if accelerator.is_main_process:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    else:
        model = load_empty(AutoConfig.from_pretrained(out), dtype)
    return ShardedStudent(model.requires_grad_(False), accelerator).sharded()


def student_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT (LoRA) model, else `model`."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None and hasattr(model, "peft_config") else model


def prepare_frozen_teacher(accelerator, teacher: torch.nn.Module, batch_size: int) -> torch.nn.Module:
    """The untouched teacher copy of stage logits with trainable=attention|all, frozen and placed as the
    student will be: under DeepSpeed see `deepspeed_frozen_teacher`; under FSDP2 sharded with the
    student's FSDP plugin (as trl's `prepare_fsdp` does); under DDP or one process, whole on this device."""
    teacher.requires_grad_(False).eval()  # before sharding: FSDP2 upcasts only trainable parameters
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        return deepspeed_frozen_teacher(
            teacher.to(accelerator.device), plugin.deepspeed_config, batch_size, accelerator.num_processes
        )
    if accelerator.is_fsdp2:  # rank 0's weights broadcast: the other processes may hold it empty
        return shard_fsdp2(accelerator, teacher).eval()
    return teacher.to(accelerator.device)


def deepspeed_frozen_teacher(teacher, student_config: dict, batch_size: int, processes: int):
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


def teacher_logit_cache(teacher, blocks, recipe: Recipe, run_dir: Path, accelerator) -> LogitCache:
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
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
        max_over_processes=(lambda n: max_over_processes(n, accelerator.device))
        if accelerator.is_fsdp2
        else None,
    )
    size = sum(p.stat().st_size for p in folder.iterdir())
    accelerator.print(
        f"[logits] teacher top-{cfg.cache_k} logit cache: {folder}, {size / 2**20:.1f} MiB for "
        f"{blocks.numel():,} tokens ({size / blocks.numel():.0f} B/token), {time.perf_counter() - began:.1f}s "
        f"on {accelerator.num_processes} process(es)"
    )
    return cache


RANKING_BLOCKS = 16  # training blocks the layer ranking of an auto:N plan averages over


def apply_auto_plan(
    student, plan: dict, train_blocks, recipe: Recipe, run_dir: Path, is_main: bool, log
) -> None:
    """`student.layers=auto:N`: rank the converted layers of `student` (a `WholeStudent` or `ShardedStudent`)
    by their alignment loss after stage 1 (or reuse the ranking a previous run of this recipe wrote), keep the
    top N as softmax, record it in the plan."""
    path = run_dir / "layer_ranking.json"
    if path.is_file():
        ranking = json.loads(path.read_text())
    else:
        ranking = rank_layers(
            student.sharded(), train_blocks[:RANKING_BLOCKS], recipe.stages.attention.batch_size
        )
        if is_main:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(ranking, indent=1))
            tmp.replace(path)
    keep = sorted(r["layer"] for r in ranking[: plan["auto_softmax"]])
    keep_softmax(student.plain().model.layers, keep)
    plan["softmax_layers"], plan["layer_ranking"] = keep, ranking
    log(
        f"[layers] {plan['layers']}: keeping softmax in layers {keep}; alignment loss per layer, highest "
        f"first: " + ", ".join(f"{r['layer']}={r['loss']:.4g}" for r in ranking)
    )


def run_eval_tasks(recipe: Recipe, out: Path, device, log) -> None:
    """The recipe's eval tasks on the exported student and the original teacher; report in <run>/report."""
    from linearize.evals.harness import EvalSettings, evaluate

    settings = EvalSettings.for_recipe(recipe, device)
    results = evaluate(out, recipe.eval.tasks, out=recipe.run_dir / "report", settings=settings, log=log)
    log(f"evaluation report: {results['info']['report']}/report.md")


def sample_prompt(splits, tokenizer, n_tokens: int = 8) -> list[int]:
    """The first tokens of the first held-out (else training) document: a prompt in the data's style."""
    return splits.heldout[0][:n_tokens] if splits.heldout else splits.train[0, :n_tokens].tolist()


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: list[int], new_tokens: int = 32, synced: bool = False) -> str:
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


def print_report(results: dict, out=print) -> None:
    if "teacher" not in results:
        return
    base = results["teacher"]["ppl"]
    out(f"{'held-out perplexity':<28}{'ppl':>10}{'x teacher':>12}")
    for name, r in results.items():
        out(f"{name:<28}{r['ppl']:>10.3f}{r['ppl'] / base:>12.2f}")
