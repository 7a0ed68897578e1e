"""linearize: convert softmax-attention LLMs into linear-attention and hybrid models by distillation.

`import linearize` registers the converted-checkpoint classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(<converted folder>)` works. It imports no Triton and loads no model.
"""

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .architectures.configuration_linearize import CONFIG_CLASSES
    from .architectures.modeling_linearize import MODEL_CLASSES

    for family, config_cls in CONFIG_CLASSES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, MODEL_CLASSES[family], exist_ok=True)


_register_auto_classes()
