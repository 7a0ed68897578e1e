"""Export: a converted model as a folder that loads with `AutoModelForCausalLM`.

The folder holds sharded safetensors (5GB shards), the converted config with `auto_map`, the
tokenizer, the resolved recipe, a model card, and the modeling code with its torch fallback kernel,
so `trust_remote_code=True` works where linearize is not installed. It is written atomically.
"""

from __future__ import annotations

import copy
import shutil
from importlib import resources
from pathlib import Path

import torch

import linearize
from linearize.architectures.configuration_linearize import (
    CONFIG_CLASSES,
    linearized_cache_fields,
    linearized_layer_types,
)
from linearize.architectures.modeling_linearize import MODEL_CLASSES
from linearize.config import Recipe
from linearize.distill import checkpoint

# Files of linearize/architectures a checkpoint carries, and where kernels' torch forms go in it.
BUNDLE = ("configuration_linearize.py", "modeling_linearize.py", "mixers.py", "feature_maps.py", "ops.py")
KERNEL_COPIES = {
    f"{op}/{form}.py": f"{op}_{form}.py"
    for op in ("linear_attn", "window_linear", "gated_linear_attn", "gated_slot_attn", "gated_delta")
    for form in ("chunked", "step")
}
MAX_SHARD_SIZE = "5GB"  # transformers' default (50GB) is the Hub's hard per-file limit


def converted_config(teacher_config, plan: dict):
    """The teacher's config as the matching Linearize*Config, with the plan and layer types."""
    family = plan["teacher_model_type"]
    config_cls = CONFIG_CLASSES[family]
    fields = teacher_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    fields["layer_types"] = linearized_layer_types(teacher_config, plan)
    fields.update(linearized_cache_fields(teacher_config, plan))
    fields["use_cache"] = True  # the in-memory student ran without a cache (see convert.swap)
    config = config_cls(**fields, linearize=dict(plan))
    model_cls = MODEL_CLASSES[family]
    config.architectures = [model_cls.__name__]
    config.auto_map = {
        "AutoConfig": f"configuration_linearize.{config_cls.__name__}",
        "AutoModelForCausalLM": f"modeling_linearize.{model_cls.__name__}",
    }
    return config


def write_code(folder: Path) -> None:
    arch = resources.files("linearize") / "architectures"
    for name in BUNDLE:
        shutil.copyfile(str(arch / name), folder / name)
    kernels = resources.files("linearize") / "kernels"
    for src, dst in KERNEL_COPIES.items():
        shutil.copyfile(str(kernels / src), folder / dst)


def model_card(recipe: Recipe, plan: dict, evals: dict, tokens: dict) -> str:
    """README.md of the export: teacher, recipe, token budget and the teacher-vs-student numbers."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=recipe.teacher.path
        if "/" in recipe.teacher.path and not recipe.teacher.path.startswith(("/", "."))
        else None,
        library_name="transformers",
        tags=["linearize", "linear-attention", f"mixer-{plan['mixer']}", plan["teacher_model_type"]],
    )
    rows = "\n".join(f"| {name} | {v['ppl']:.3f} | {v['tokens']} |" for name, v in evals.items())
    ranking = ""
    if plan.get("layer_ranking"):
        kind = {r["layer"]: plan["mixer"] for r in plan["layer_ranking"]}
        kind.update(dict.fromkeys(plan["softmax_layers"], "softmax"))
        lines = "\n".join(
            f"| {r['layer']} | {r['loss']:.4g} | {kind[r['layer']]} |" for r in plan["layer_ranking"]
        )
        ranking = f"""
## Layer plan `{plan["layers"]}`

Stage-1 alignment loss of each layer after stage 1 (highest first); the top {plan["auto_softmax"]} keep softmax.

| layer | loss | kept as |
|---|---|---|
{lines}
"""
    budget = ", ".join(f"{stage}: {n:,} tokens" for stage, n in tokens.items())
    text = f"""---
{data.to_yaml()}
---

# {recipe.name}

Converted from `{recipe.teacher.path}` by linearize {linearize.__version__}:
mixer `{plan["mixer"]}`, feature map `{plan["feature_map"]}`, softmax kept in layers {plan["softmax_layers"] or "none"}.

Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (or after `import linearize`).

## Distillation
{budget}
{ranking}
## Held-out perplexity (teacher and student, same tokens)

| model | perplexity | tokens |
|---|---|---|
{rows}

## Recipe

```yaml
{recipe.to_yaml()}```
"""
    return str(ModelCard(text))


def export(
    student: torch.nn.Module,
    tokenizer,
    plan: dict,
    recipe: Recipe,
    out: Path,
    evals: dict | None = None,
    tokens: dict | None = None,
) -> Path:
    """Write the converted model to `out` atomically and return `out`."""
    from huggingface_hub import save_torch_state_dict

    config = converted_config(student.config, plan)
    evals, tokens = evals or {}, tokens or {}

    def write(tmp: Path) -> None:
        config.save_pretrained(tmp)
        if student.generation_config is not None:
            generation = copy.deepcopy(student.generation_config)
            generation.use_cache = True
            generation.save_pretrained(tmp)
        save_torch_state_dict(
            student.state_dict(),
            tmp,
            max_shard_size=MAX_SHARD_SIZE,
            metadata={
                "format": "pt",
                "linearize_version": linearize.__version__,
                "recipe_hash": recipe.hash(),
            },
        )
        for shard in tmp.glob("*.safetensors"):  # written through a private temp file: make them readable
            shard.chmod(0o644)
        tokenizer.save_pretrained(tmp)
        write_code(tmp)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(model_card(recipe, plan, evals, tokens))

    checkpoint.write_atomic(out, write, info={"recipe_hash": recipe.hash()})
    return out
