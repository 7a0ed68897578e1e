"""Teacher families: one small adapter per `config.model_type`, and teacher loading.

The mixers take over the teacher attention's own modules and attributes, so an adapter only has to say
what the family has that matters to conversion, and to check that a config is one we can convert before
any weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from linearize.assets import BUNDLED_PREFIX, resolve_bundled
from linearize.distributed import load_empty
from linearize.errors import LinearizeError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


class TeacherError(LinearizeError, ValueError):
    """A teacher that cannot be converted: the message says why and what is supported."""


@dataclass(frozen=True)
class TeacherFamily:
    model_type: str
    qkv_bias: bool
    """q/k/v projections carry biases (Qwen2)."""
    qk_norm: bool
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    sliding_window: bool
    """Softmax attention may be restricted to a window (Mistral, Qwen2/3 when enabled)."""

    def check(self, config: PretrainedConfig) -> None:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if heads % kv_heads:
            raise TeacherError(
                f"{self.model_type}: {heads} attention heads are not a multiple of {kv_heads} KV heads"
            )
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if rope_type not in SUPPORTED_ROPE:
            raise TeacherError(
                f"{self.model_type}: rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE)}"
            )


# RoPE variants only change cos/sin, which the mixers take from the model's rotary module as they are.
SUPPORTED_ROPE = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")

FAMILIES: dict[str, TeacherFamily] = {
    "llama": TeacherFamily(model_type="llama", qkv_bias=False, qk_norm=False, sliding_window=False),
    "qwen2": TeacherFamily(model_type="qwen2", qkv_bias=True, qk_norm=False, sliding_window=True),
    "qwen3": TeacherFamily(model_type="qwen3", qkv_bias=False, qk_norm=True, sliding_window=True),
    "mistral": TeacherFamily(model_type="mistral", qkv_bias=False, qk_norm=False, sliding_window=True),
}


def family_of(config: PretrainedConfig) -> TeacherFamily:
    """The adapter for `config.model_type`; any other family is an error listing the supported ones."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise TeacherError(
            f"teacher family {config.model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    family.check(config)
    return family


def resolve_path(path: str) -> str:
    """`bundled:NAME` → the packaged folder; a local path is checked; anything else is a Hub id."""
    if path.startswith(BUNDLED_PREFIX):
        return resolve_bundled(path)
    local = Path(path).expanduser()
    if local.exists():
        check_folder(local)
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise TeacherError(f"teacher {path!r} is neither an existing folder nor a Hub id like 'org/name'")
    return path


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_folder(folder: Path) -> None:
    """A local teacher folder holds a readable config.json."""
    import json

    if not folder.is_dir():
        raise TeacherError(f"teacher.path {folder} is a file; give the model's folder")
    config = folder / "config.json"
    if not config.is_file():
        raise TeacherError(f"teacher folder {folder} has no config.json: is it a Hugging Face model folder?")
    try:
        json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise TeacherError(
            f"{config} is not valid JSON ({err}): the file is truncated or damaged; copy it again from the "
            "model's source"
        ) from None


def check_weights(folder: Path) -> None:
    """A local teacher folder holds weights transformers can load."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise TeacherError(
            f"teacher folder {folder} has a config.json but no weights ({', '.join(WEIGHT_FILES)}): copy the "
            "weight files in, or point teacher.path at the complete folder"
        )


def teacher_card(path: str) -> dict:
    """The teacher's Hub id and licence, as far as they can be known offline: {"teacher_hub_id", "teacher_license"}.

    A Hub id is its own name; its card is read from the local Hub cache when there. A local folder's
    licence comes from the `license:` of its README.md front matter (Hub downloads keep it).
    """
    from huggingface_hub import ModelCard

    source = resolve_path(path)
    hub_id = None if Path(source).exists() else source
    card_path = Path(source) / "README.md"
    if hub_id:
        from huggingface_hub import hf_hub_download

        try:
            card_path = Path(hf_hub_download(hub_id, "README.md", local_files_only=True))
        except Exception:  # not in the local cache: the licence stays unknown, publish asks for it
            card_path = None
    license_ = None
    if card_path is not None and card_path.is_file():
        license_ = ModelCard.load(card_path).data.get("license")
    return {"teacher_hub_id": hub_id, "teacher_license": license_}


def read_config(path: str) -> PretrainedConfig:
    """The teacher's config, checked to be a family we convert (no weights read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_path(path))
    except OSError as err:
        raise TeacherError(
            f"cannot read the config of teacher {path!r} ({err.__class__.__name__}); offline, give a local folder "
            f"with teacher.path=<folder>"
        ) from None
    family_of(config)
    return config


def load_teacher(
    path: str, dtype: str = "float32", empty: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a supported teacher; the family is checked before weights are read.

    `empty=True` reads no weights: the model is built from its config with its parameters on the meta device
    (buffers real), as FSDP2's processes other than rank 0 hold it until rank 0 broadcasts their shards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source = resolve_path(path)
    config = read_config(path)
    if not empty and Path(source).is_dir():
        check_weights(Path(source))
    if empty:
        model = load_empty(config, getattr(torch, dtype))
        try:  # what from_pretrained would read: greedy decoding must stop where rank 0's does
            model.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            pass
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer
