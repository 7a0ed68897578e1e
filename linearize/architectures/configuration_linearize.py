"""Configs of converted checkpoints: the teacher family's config plus a `linearize` section.

One subclass per supported teacher family, so every field the family's modules read is there.
`linearize` holds the plan (`linearize.convert.swap.plan_for`): the mixer and its settings, the resolved
`softmax_layers`, and for an `auto:N` plan the layer ranking that chose them.
`layer_types` marks converted layers "linear_attention", which gives them recurrent-state cache layers;
`number_of_conv_states` says how many recurrent states each of them holds (`mixer_state_count`).
"""

from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config


class LinearizeLlamaConfig(LlamaConfig):
    model_type = "linearize_llama"


class LinearizeQwen2Config(Qwen2Config):
    model_type = "linearize_qwen2"


class LinearizeQwen3Config(Qwen3Config):
    model_type = "linearize_qwen3"


class LinearizeMistralConfig(MistralConfig):
    model_type = "linearize_mistral"


CONFIG_CLASSES = {
    "llama": LinearizeLlamaConfig,
    "qwen2": LinearizeQwen2Config,
    "qwen3": LinearizeQwen3Config,
    "mistral": LinearizeMistralConfig,
}


def softmax_layer_type(config: PretrainedConfig) -> str:
    """Cache/mask type of a kept softmax layer in this family."""
    return (
        "sliding_attention"
        if getattr(config, "sliding_window", None) and config.model_type.endswith("mistral")
        else "full_attention"
    )


def linearized_layer_types(config: PretrainedConfig, spec: dict) -> list[str]:
    kept = set(spec.get("softmax_layers", []))
    original = getattr(config, "layer_types", None)
    types = []
    for i in range(config.num_hidden_layers):
        if i in kept:
            types.append(original[i] if original else softmax_layer_type(config))
        else:
            types.append("linear_attention")
    return types


WINDOW_STATES = 5  # WindowLinearState: linear_state, k/fk/v_window, seen


def mixer_state_count(spec: dict) -> int:
    """Recurrent states a converted layer of this plan keeps in its cache entry (the fields of its decode
    state); must agree with the mixer classes' `num_states` (a test checks it)."""
    mixer = spec["mixer"]
    if mixer == "window_linear":
        return WINDOW_STATES
    if mixer == "gated":
        return 1 + (WINDOW_STATES if spec.get("gated_window") else 0)
    if mixer == "gated_slot":
        return 2  # Hk, Hv
    return 1


def linearized_cache_fields(config: PretrainedConfig, spec: dict) -> dict:
    """Extra config fields the converted layers' cache needs: transformers' DynamicCache(config=...) gives
    every "linear_attention" layer `config.number_of_conv_states` recurrent states."""
    kept = set(spec.get("softmax_layers", []))
    converted = [i for i in range(config.num_hidden_layers) if i not in kept]
    states = mixer_state_count(spec) if converted else 1
    return {"number_of_conv_states": states} if states > 1 else {}
