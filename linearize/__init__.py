"""linearize: convert softmax-attention LLMs into linear-attention and hybrid models by distillation.

`import linearize` registers the converted-checkpoint classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(<converted folder>)` works. It imports no modeling code and no
Triton, and loads no model.
"""

__version__ = "0.1.0"

from .architectures.auto import register_auto_classes  # noqa: E402

register_auto_classes()
