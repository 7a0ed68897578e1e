"""Export: a converted model as a folder that loads with `AutoModelForCausalLM`.

The folder holds sharded safetensors (5GB shards), the converted config with `auto_map`, the
tokenizer, the resolved recipe, a model card, and the modeling code with its torch fallback kernel,
so `trust_remote_code=True` works where linearize is not installed. It is written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

import linearize
from linearize import checkpoint
from linearize.architectures.configuration_linearize import (
    CONFIG_CLASSES,
    linearized_cache_fields,
    linearized_layer_types,
)
from linearize.architectures.modeling_linearize import MODEL_CLASSES
from linearize.assets import package_folder
from linearize.config import Recipe
from linearize.convert.card import model_card
from linearize.convert.checkpoint_check import fingerprint
from linearize.convert.swap import Plan
from linearize.convert.teachers import teacher_card

# Files of linearize/architectures a checkpoint carries, and where kernels' torch forms go in it.
BUNDLE = ("configuration_linearize.py", "modeling_linearize.py", "mixers.py", "feature_maps.py", "ops.py")
KERNEL_COPIES = {
    f"{op}/{form}.py": f"{op}_{form}.py"
    for op in ("linear_attn", "window_linear", "gated_linear_attn", "gated_slot_attn", "gated_delta")
    for form in ("chunked", "step")
}
MAX_SHARD_SIZE = "5GB"  # transformers' default (50GB) is the Hub's hard per-file limit


def converted_config(teacher_config: PretrainedConfig, plan: dict) -> PretrainedConfig:
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
    arch = package_folder("architectures")
    for name in BUNDLE:
        shutil.copyfile(str(arch / name), folder / name)
    kernels = package_folder("kernels")
    for src, dst in KERNEL_COPIES.items():
        shutil.copyfile(str(kernels / src), folder / dst)


def file_digests(folder: Path) -> dict:
    """sha256 and size of every weight file in `folder`, so a later copy can be checked byte for byte."""
    digests = {}
    for path in sorted(folder.glob("*.safetensors")):
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                sha.update(chunk)
        digests[path.name] = {"sha256": sha.hexdigest(), "bytes": path.stat().st_size}
    return digests


def hardware(num_processes: int = 1, device: torch.device | None = None) -> str:
    """'2 x NVIDIA H100 80GB HBM3' or 'CPU x86_64, 2 threads': where a conversion ran."""
    import platform

    if device is not None and device.type == "cuda":
        return f"{num_processes} x {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    return f"{num_processes} x CPU {cpu}, {torch.get_num_threads()} threads"


def sort_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted, in place (padded with spaces to its
    length, so no data moves). safetensors writes the metadata in hash-map order, which differs from run to
    run: sorted, the same weights make the same bytes whatever process wrote them."""
    with path.open("r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canonical) > length:  # cannot happen for a header safetensors wrote compactly; leave it be
            return
        f.seek(8)
        f.write(canonical + b" " * (length - len(canonical)))


def export(
    student: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    plan: Plan,
    recipe: Recipe,
    out: Path,
    evals: dict | None = None,
    tokens: dict | None = None,
    hardware_used: str | None = None,
) -> Path:
    """Write the converted model to `out` atomically and return `out`.

    Besides the model, the folder holds `fingerprint.json` (the in-memory student's logits on a fixed
    prompt and the weight files' digests, which `linearize publish` checks a copy against) and
    `conversion.json` (teacher, its licence, token budget per stage, held-out evals, hardware).
    """
    from huggingface_hub import save_torch_state_dict

    config = converted_config(student.config, plan.spec())
    evals, tokens = evals or {}, tokens or {}
    logits = fingerprint(student, tokenizer)
    conversion = {
        "linearize_version": linearize.__version__,
        "recipe_hash": recipe.hash(),
        "teacher": recipe.teacher.path,
        **teacher_card(recipe.teacher.path),
        "tokens": tokens,
        "evals": evals,
        "hardware": hardware_used or hardware(),
    }

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
            sort_header(shard)
        tokenizer.save_pretrained(tmp)
        write_code(tmp)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(model_card(recipe.to_yaml(), recipe.name, plan.spec(), conversion))
        (tmp / "conversion.json").write_text(json.dumps(conversion, indent=1))
        (tmp / "fingerprint.json").write_text(json.dumps({"logits": logits, "files": file_digests(tmp)}))

    checkpoint.write_atomic(out, write, info={"recipe_hash": recipe.hash()})
    return out
