"""Registration with transformers' Auto classes that loads no modeling code until it is used.

Importing a family's modeling module pulls in torch._dynamo and, where installed, Triton; `import
linearize` must stay light. So AutoModelForCausalLM maps each converted config class to a deferred
entry that imports `modeling_linearize` on first use and then registers the real class in its place.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_linearize import CONFIG_CLASSES


def _real_class(family: str) -> type:
    from .modeling_linearize import MODEL_CLASSES

    model_cls = MODEL_CLASSES[family]
    AutoModelForCausalLM.register(model_cls.config_class, model_cls, exist_ok=True)
    return model_cls


def _deferred(family: str, config_cls: type) -> type:
    """A stand-in with the two entry points the Auto factory calls."""

    def from_pretrained(cls, *args, **kwargs):
        return _real_class(family).from_pretrained(*args, **kwargs)

    def _from_config(cls, config, **kwargs):
        return _real_class(family)._from_config(config, **kwargs)

    name = f"Linearize{config_cls.__name__.removeprefix('Linearize').removesuffix('Config')}ForCausalLM"
    return type(
        name,
        (),
        {
            "config_class": config_cls,
            "from_pretrained": classmethod(from_pretrained),
            "_from_config": classmethod(_from_config),
            "__doc__": f"Deferred {name}: imports linearize.architectures.modeling_linearize on first use.",
        },
    )


def register_auto_classes() -> None:
    for family, config_cls in CONFIG_CLASSES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, _deferred(family, config_cls), exist_ok=True)
