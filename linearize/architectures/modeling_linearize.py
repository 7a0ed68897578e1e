"""Model classes of converted checkpoints, one pair per teacher family.

Each body class is the family's own model with the conversion plan applied in `__init__` (the same
`apply_plan` that converted it) and a forward that works for any mix of layers: the stock forward asks
the cache for a sequence length, which only attention layers can answer, so an all-linear model
cannot use it. Linear layers get the 2D padding mask (as `padding_mask`) so padded tokens never enter
their state; softmax layers get the family's usual 4D mask.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    MistralModel,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen3ForCausalLM,
    Qwen3Model,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from .configuration_linearize import (
    LinearizeLlamaConfig,
    LinearizeMistralConfig,
    LinearizeQwen2Config,
    LinearizeQwen3Config,
)
from .mixers import apply_plan

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable

    from transformers import PreTrainedModel
    from transformers.cache_utils import Cache

_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


class LinearizedBody:
    """Mixin for a family's base model class: plan applied at init, a forward for any layer mix."""

    def __init__(self, config):
        super().__init__(config)
        apply_plan(self.layers, config.linearize)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        layer_types = self.config.layer_types
        seq = inputs_embeds.shape[1]
        has_attention = any(t != "linear_attention" for t in layer_types)
        if position_ids is None:
            past = 0
            if cache is not None:
                past = cache.get_seq_length() if has_attention else getattr(cache, "linearize_seen_tokens", 0)
            position_ids = torch.arange(past, past + seq, device=inputs_embeds.device).unsqueeze(0)
        masks: dict[str, torch.Tensor | None] = {"linear_attention": None}
        for kind in set(layer_types) - {"linear_attention"}:
            masks[kind] = _MASKS[kind](
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
        padding_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer, kind in zip(self.layers[: self.config.num_hidden_layers], layer_types):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=masks[kind],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                padding_mask=padding_mask,
                **kwargs,
            )
        if cache is not None and not has_attention:
            cache.linearize_seen_tokens = getattr(cache, "linearize_seen_tokens", 0) + seq
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None
        )


def read_weights(
    name_or_path: str | os.PathLike[str],
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors checkpoint in a local folder or a Hub repo (from the local cache
    when offline)."""
    from safetensors.torch import load_file

    folder = Path(name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["*.safetensors", "*.safetensors.index.json"]
        folder = Path(
            snapshot_download(
                name_or_path, revision=revision, allow_patterns=patterns, token=token, cache_dir=cache_dir
            )
        )
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    files = files or [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise OSError(f"{name_or_path} holds no safetensors weights")
    state = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def base_probe(state: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, list[float]]:
    """float64 sum and abs-sum of some base tensors: enough to tell the base model the deltas need from
    another one with the same names and shapes."""
    return {n: [state[n].double().sum().item(), state[n].double().abs().sum().item()] for n in names}


class LoadsDeltas:
    """Loading for deltas-only checkpoints (`linearize publish mode=deltas`).

    Such a checkpoint holds only the parameters conversion added or changed; `config.linearize_base`
    names the base model (Hub id and revision) and records a probe of its weights. `from_pretrained`
    reads the base model's weights (its Hub cache or `base_model_path=<folder>`), checks the probe, lays
    the deltas over them and builds the model from the merged state; a missing weight is an error.
    """

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *model_args: Any,
        base_model_path: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel | tuple[PreTrainedModel, dict[str, Any]]:
        hub = {k: kwargs[k] for k in ("token", "cache_dir", "revision") if kwargs.get(k) is not None}
        config = kwargs.get("config")
        if config is None or isinstance(config, (str, Path)):
            config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path, **hub)
        base = getattr(config, "linearize_base", None)
        if not base:
            if base_model_path is not None:
                raise ValueError("base_model_path is only for deltas-only checkpoints; this one is complete")
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        kwargs["config"] = config
        source = base_model_path or base["name"]
        try:
            base_hub = {**hub, "revision": None if base_model_path else base.get("revision")}
            state = read_weights(source, **base_hub)
        except Exception as err:
            raise OSError(
                f"this deltas-only checkpoint needs its base model {base['name']!r} and could not read it from "
                f"{source!r} ({type(err).__name__}: {err}); pass base_model_path=<local folder of the base model>"
            ) from err
        missing = sorted(set(base["probe"]) - set(state))
        found = {} if missing else base_probe(state, base["probe"])
        if missing or not all(
            math.isclose(a, b, rel_tol=1e-9) for n in found for a, b in zip(found[n], base["probe"][n])
        ):
            raise ValueError(
                f"the weights at {source!r} are not the base model {base['name']!r} these deltas were made "
                f"from ({'missing ' + ', '.join(missing) if missing else 'probed tensors differ'}); pass "
                f"base_model_path=<folder of {base['name']}>"
            )
        state.update(read_weights(pretrained_model_name_or_path, **hub))
        want_info = kwargs.pop("output_loading_info", False)
        for key in hub:  # they located files above; with a state dict transformers reads no file
            kwargs.pop(key, None)
        model, info = super().from_pretrained(
            None, *model_args, state_dict=state, output_loading_info=True, **kwargs
        )
        if info["missing_keys"]:
            raise ValueError(
                f"base model {source!r} plus the deltas lack weights: {sorted(info['missing_keys'])[:8]}"
            )
        try:
            model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        except OSError:  # the folder has no generation_config.json: keep the one derived from the config
            pass
        return (model, info) if want_info else model


class LinearizeLlamaModel(LinearizedBody, LlamaModel):
    config_class = LinearizeLlamaConfig


class LinearizeLlamaForCausalLM(LoadsDeltas, LlamaForCausalLM):
    config_class = LinearizeLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LinearizeLlamaModel(config)
        self.post_init()


class LinearizeQwen2Model(LinearizedBody, Qwen2Model):
    config_class = LinearizeQwen2Config


class LinearizeQwen2ForCausalLM(LoadsDeltas, Qwen2ForCausalLM):
    config_class = LinearizeQwen2Config

    def __init__(self, config):
        super().__init__(config)
        self.model = LinearizeQwen2Model(config)
        self.post_init()


class LinearizeQwen3Model(LinearizedBody, Qwen3Model):
    config_class = LinearizeQwen3Config


class LinearizeQwen3ForCausalLM(LoadsDeltas, Qwen3ForCausalLM):
    config_class = LinearizeQwen3Config

    def __init__(self, config):
        super().__init__(config)
        self.model = LinearizeQwen3Model(config)
        self.post_init()


class LinearizeMistralModel(LinearizedBody, MistralModel):
    config_class = LinearizeMistralConfig


class LinearizeMistralForCausalLM(LoadsDeltas, MistralForCausalLM):
    config_class = LinearizeMistralConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LinearizeMistralModel(config)
        self.post_init()


MODEL_CLASSES = {
    "llama": LinearizeLlamaForCausalLM,
    "qwen2": LinearizeQwen2ForCausalLM,
    "qwen3": LinearizeQwen3ForCausalLM,
    "mistral": LinearizeMistralForCausalLM,
}
