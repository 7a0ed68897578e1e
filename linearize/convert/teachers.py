"""Teacher families: one small adapter per `config.model_type`, and teacher loading.

The mixers compute the teacher's softmax attention with the family's own attention class, so an
adapter only has to say what the family has that matters to conversion, and to check that a config
is one we can convert before any weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from linearize.assets import BUNDLED_PREFIX, resolve_bundled
from linearize.distributed import load_empty

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


class TeacherError(ValueError):
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
        if not (local / "config.json").is_file():
            raise TeacherError(
                f"teacher folder {local} has no config.json: is it a Hugging Face model folder?"
            )
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise TeacherError(f"teacher {path!r} is neither an existing folder nor a Hub id like 'org/name'")
    return path


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


def load_teacher(
    path: str, dtype: str = "float32", empty: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a supported teacher; the family is checked before weights are read.

    `empty=True` reads no weights: the model is built from its config with its parameters on the meta device
    (buffers real), as FSDP2's processes other than rank 0 hold it until rank 0 broadcasts their shards."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source = resolve_path(path)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise TeacherError(
            f"cannot read the config of teacher {path!r} ({err.__class__.__name__}); offline, give a local folder "
            f"with teacher.path=<folder>"
        ) from None
    family_of(config)
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
