"""Model classes of converted checkpoints, one pair per teacher family.

Each body class is the family's own model with the conversion plan applied in `__init__` (the same
`apply_plan` that converted it) and a forward that works for any mix of layers: the stock forward asks
the cache for a sequence length, which only attention layers can answer, so an all-linear model
cannot use it. Linear layers get the 2D padding mask (as `padding_mask`) so padded tokens never enter
their state; softmax layers get the family's usual 4D mask.
"""

from __future__ import annotations

import torch
from transformers import (
    DynamicCache,
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
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
        **kwargs,
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


class LinearizeLlamaModel(LinearizedBody, LlamaModel):
    config_class = LinearizeLlamaConfig


class LinearizeLlamaForCausalLM(LlamaForCausalLM):
    config_class = LinearizeLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LinearizeLlamaModel(config)
        self.post_init()


class LinearizeQwen2Model(LinearizedBody, Qwen2Model):
    config_class = LinearizeQwen2Config


class LinearizeQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = LinearizeQwen2Config

    def __init__(self, config):
        super().__init__(config)
        self.model = LinearizeQwen2Model(config)
        self.post_init()


class LinearizeQwen3Model(LinearizedBody, Qwen3Model):
    config_class = LinearizeQwen3Config


class LinearizeQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = LinearizeQwen3Config

    def __init__(self, config):
        super().__init__(config)
        self.model = LinearizeQwen3Model(config)
        self.post_init()


class LinearizeMistralModel(LinearizedBody, MistralModel):
    config_class = LinearizeMistralConfig


class LinearizeMistralForCausalLM(MistralForCausalLM):
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
