"""Ops: the math of each mixer in reference, chunked-torch and Triton forms; they know nothing of
transformers.

Each op's public function is bound here, as `fla.ops` does: `from linearize.kernels import linear_attn`
gives the function (it picks the form: Triton/fla on CUDA, chunked torch elsewhere). The folder of the
same name holds the forms; reach them with `from linearize.kernels.linear_attn import chunked` (or
`linear_attn_reference`), not `import linearize.kernels.linear_attn.chunked as m`, whose attribute walk
meets the function. Only torch is imported here: triton and fla load inside the calls that need them.
"""

# Each `from .op import op` imports the folder (binding the module here) and then rebinds the name to
# the function; later imports of the folder's submodules bind only on the folder, so the function stays.
from .gated_delta import gated_delta, gated_delta_step
from .gated_linear_attn import gated_linear_attn, gated_linear_attn_step
from .gated_slot_attn import gated_slot_attn, gated_slot_attn_step
from .linear_attn import linear_attn, linear_attn_step
from .window_linear import WindowLinearState, window_linear, window_linear_step

__all__ = [
    "WindowLinearState",
    "gated_delta",
    "gated_delta_step",
    "gated_linear_attn",
    "gated_linear_attn_step",
    "gated_slot_attn",
    "gated_slot_attn_step",
    "linear_attn",
    "linear_attn_step",
    "window_linear",
    "window_linear_step",
]
