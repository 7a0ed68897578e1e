"""`linearize <command> key=value ...`: the one place that parses arguments and dispatches."""

from __future__ import annotations

import sys

USAGE = """usage: linearize [-v] <command> [recipe=NAME|path.yaml] [key=value ...]

  -v, --verbose  print the memory estimate's parts (weights, gradients, optimizer, activations, ...)

commands:
  convert     run the whole pipeline (stages attention and logits, evaluation, export)
  distill     run one stage: linearize distill recipe=... stage=attention|logits [accelerate_config=NAME|path]
              (stage=logits also exports and evaluates); under `accelerate launch -m linearize distill ...`
              the same command runs on many processes and nodes
  generate    have the teacher write the recipe's teacher:<tokens> text ahead (convert does it too, on one
              process): linearize generate recipe=... [data.train=[teacher:1M]] [data.sampling.temperature=0.8]
  accelerate-config NAME
              print the path of a shipped accelerate config (ddp, fsdp2, zero2, zero3, multinode-fsdp2)
  recipes     list the shipped recipes
  options     every recipe key with the value it runs with, its choices and meaning:
              linearize options [recipe=NAME] [key=value ...]
  eval        evaluate a converted model next to its teacher: one report (markdown, PNG plots, JSON)
              linearize eval model=<folder> [teacher=<path|hub id>] [tasks=ppl,recall,cloze,speed,controls,
              lm_eval:<task>] [out=<folder>] [<setting>=<value> ...]
  publish     check an exported checkpoint (loads without linearize, reproduces its logits) and upload it
              linearize publish <folder> repo=org/name [mode=full|deltas] [private=true] [revision=main]
              [dry_run=true] [base_model=org/teacher] [license=<id>] [report=<folder>]

examples:
  linearize convert                                  # bundled tiny teacher, offline
  linearize convert recipe=tiny stages.attention.steps=50 student.settings.feature_map=t2r
  linearize eval model=out/tiny/final tasks=ppl,recall,cloze,speed,controls,lm_eval:linearize_cloze
  linearize publish out/tiny/final repo=me/tiny-linear dry_run=true
"""


def parse_pairs(args: list[str]) -> dict[str, str]:
    """argv `key=value` words as strings; each command types them with `linearize.config.parse_pairs_into`."""
    pairs = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: expected key=value, got {arg!r}; `linearize help` lists the commands")
        if key in pairs:
            raise SystemExit(f"error: {key} is given twice; give it once")
        pairs[key] = value
    return pairs


def cmd_recipes(_: dict[str, str]) -> None:
    import yaml

    from linearize.config import shipped_recipes

    for name, path in sorted(shipped_recipes().items()):
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{name:<32}{description}")


def cmd_options(pairs: dict[str, str]) -> None:
    """Every recipe key with the value the chosen recipe (and overrides) runs with, its choices and meaning."""
    import textwrap

    from linearize.config import load_recipe, options

    recipe = load_recipe(pairs.pop("recipe", None), pairs)
    rows = options(recipe)
    shown = [(key, repr(value) if isinstance(value, str) else str(value)) for key, value, _, _ in rows]
    key_width = max(len(k) for k, _ in shown) + 2
    value_width = min(max(len(v) for _, v in shown), 28) + 2
    print(f"recipe {recipe.name}: the value of every key it runs with (change one with key=value)\n")
    for (key, value), (_, _, choices, doc) in zip(shown, rows):
        line = f"{key:<{key_width}}{value:<{value_width}}"
        if choices:
            line += f"choices: {', '.join(choices)}"
        print(line.rstrip())
        for part in textwrap.wrap(doc, 110 - key_width):
            print(" " * key_width + part)


def cmd_convert(pairs: dict[str, str]) -> None:
    from linearize.config import load_recipe
    from linearize.pipeline import convert

    recipe_name = pairs.pop("recipe", None)
    convert(load_recipe(recipe_name, pairs))


def cmd_distill(pairs: dict[str, str]) -> None:
    import os
    import subprocess

    from linearize.config import RecipeError, accelerate_config_path, load_recipe
    from linearize.pipeline import STAGES, convert

    stage = pairs.pop("stage", None)
    if stage not in STAGES:
        raise RecipeError(f"distill needs stage=attention or stage=logits, got {stage!r}")
    launch = pairs.pop("accelerate_config", None)
    recipe = load_recipe(pairs.get("recipe"), {k: v for k, v in pairs.items() if k != "recipe"})
    launch = launch or recipe.launch.accelerate_config  # the recipe's own, unless the command names one
    if launch and "LOCAL_RANK" not in os.environ:  # not launched yet: hand over to accelerate launch
        path = accelerate_config_path(launch)
        args = [f"{k}={v}" for k, v in pairs.items()]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
        command += ["-m", "linearize", "distill", f"stage={stage}", *args]
        print("launching: " + " ".join(command), flush=True)
        raise SystemExit(subprocess.run(command).returncode)
    convert(recipe, only=stage)


def cmd_generate(pairs: dict[str, str]) -> None:
    from linearize import teacher_text
    from linearize.config import load_recipe
    from linearize.convert.teachers import load_teacher

    recipe = load_recipe(pairs.pop("recipe", None), pairs)
    if not teacher_text.needs_teacher_text(recipe.data):
        raise SystemExit("error: the recipe's data.train and data.heldout name no teacher:<tokens> text")
    teacher, tokenizer = load_teacher(recipe.teacher.path, recipe.teacher.dtype)  # as convert loads it
    data = teacher_text.resolve(recipe.data, recipe.teacher.path, recipe.teacher.dtype, teacher, tokenizer)
    for split, files in (("train", data.train), ("heldout", data.heldout)):
        if files:
            print(f"{split}: {', '.join(files)}")


def cmd_accelerate_config(pairs: dict[str, str]) -> None:
    from linearize.config import accelerate_config_path

    print(accelerate_config_path(pairs["name"]))


def cmd_eval(pairs: dict[str, str]) -> None:
    from linearize.evals import EvalError
    from linearize.evals.harness import EvalSettings, evaluate

    if "model" not in pairs:
        raise EvalError("eval needs model=<folder of a converted checkpoint>")
    model = pairs.pop("model")
    teacher = pairs.pop("teacher", None)
    out = pairs.pop("out", None)
    tasks = [t for t in pairs.pop("tasks", "ppl,recall,cloze,speed,controls").split(",") if t]
    results = evaluate(model, tasks, out=out, teacher=teacher, settings=EvalSettings.from_pairs(pairs))
    print(f"report written to {results['info']['report']}/report.md")


def cmd_publish(pairs: dict[str, str]) -> None:
    from linearize.convert.publish import PublishError, PublishSettings, publish

    folder = pairs.pop("folder", None) or pairs.pop("model", None)
    if not folder:
        raise PublishError("publish needs the exported folder: linearize publish <folder> repo=org/name")
    publish(folder, PublishSettings.from_pairs(pairs))


COMMANDS = {
    "convert": cmd_convert,
    "recipes": cmd_recipes,
    "options": cmd_options,
    "eval": cmd_eval,
    "publish": cmd_publish,
    "distill": cmd_distill,
    "accelerate-config": cmd_accelerate_config,
    "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-v" in argv or "--verbose" in argv:  # the memory estimate's parts (read by linearize.distill.memory)
        import os

        os.environ["LINEARIZE_VERBOSE"] = "1"
        argv = [a for a in argv if a not in ("-v", "--verbose")]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, *rest = argv
    if command not in COMMANDS:
        raise SystemExit(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    from linearize.host import keep_freed_memory

    keep_freed_memory()  # before any tensor: freed activations are reused instead of page-faulted afresh
    from linearize.errors import Interrupted, LinearizeError

    if command == "publish" and rest and "=" not in rest[0]:  # linearize publish <folder> key=value ...
        rest = [f"folder={rest[0]}", *rest[1:]]
    if command == "accelerate-config":
        rest = [f"name={rest[0] if rest else ''}"]
    try:
        COMMANDS[command](parse_pairs(rest))
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which says its step itself)
        err = Interrupted(
            f"interrupted (Ctrl-C) during linearize {command}; rerun the same command to resume: finished "
            "stages and complete checkpoints are kept"
        )
        fail(err)
    except LinearizeError as err:
        fail(err)
    except BrokenPipeError:  # `linearize options | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def fail(err: Exception) -> None:
    """Exit with the error's one-line message (no traceback) and its exit status (1, or 130 for Ctrl-C)."""
    status = getattr(err, "exit_status", 1)
    if status == 1:  # SystemExit with a message prints it to stderr and exits with status 1
        raise SystemExit(f"error: {err}") from None
    print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(status) from None
