"""Where mixers get their ops.

With linearize installed this is `linearize.kernels` (its dispatch picks Triton/fla on CUDA, chunked
torch elsewhere). A converted checkpoint loaded with `trust_remote_code=True` where linearize is not
installed falls back to the chunked torch and step forms that the export copies beside this file (they
import only torch).
"""

try:
    from linearize.kernels import (
        WindowLinearState,
        gated_delta,
        gated_delta_step,
        gated_linear_attn,
        gated_linear_attn_step,
        gated_slot_attn,
        gated_slot_attn_step,
        linear_attn,
        window_linear,
        window_linear_step,
    )
except ImportError:
    from .gated_delta_chunked import gated_delta_chunked as _delta_chunked
    from .gated_delta_step import gated_delta_step
    from .gated_linear_attn_chunked import gated_linear_attn_chunked as _gla_chunked
    from .gated_linear_attn_step import gated_linear_attn_step
    from .gated_slot_attn_chunked import gated_slot_attn_chunked as _gsa_chunked
    from .gated_slot_attn_step import gated_slot_attn_step
    from .linear_attn_chunked import linear_attn_chunked as _chunked
    from .window_linear_chunked import WindowLinearState
    from .window_linear_chunked import window_linear_chunked as _window_chunked
    from .window_linear_step import window_linear_step as _window_step

    def linear_attn(q, k, v, *, impl="auto", **kwargs):
        """Chunked torch linear attention (see linearize/kernels/linear_attn/README.md)."""
        return _chunked(q, k, v, **kwargs)

    def window_linear(q, k, v, fq, fk, *, impl="auto", **kwargs):
        """Chunked torch sliding-window + linear attention (see linearize/kernels/window_linear/README.md)."""
        return _window_chunked(q, k, v, fq, fk, **kwargs)

    def window_linear_step(q, k, v, fq, fk, state, **kwargs):
        """One decode step from a WindowLinearState (never None here: the mixer steps only from a cache)."""
        return _window_step(q, k, v, fq, fk, state, **kwargs)

    def gated_linear_attn(q, k, v, g, *, impl="auto", **kwargs):
        """Chunked torch GLA (see linearize/kernels/gated_linear_attn/README.md)."""
        return _gla_chunked(q, k, v, g, **kwargs)

    def gated_slot_attn(q, k, v, s, g=None, *, impl="auto", **kwargs):
        """Chunked torch GSA (see linearize/kernels/gated_slot_attn/README.md)."""
        return _gsa_chunked(q, k, v, s, g, **kwargs)

    def gated_delta(q, k, v, g, beta, *, impl="auto", **kwargs):
        """Chunked torch gated delta rule (see linearize/kernels/gated_delta/README.md)."""
        return _delta_chunked(q, k, v, g, beta, **kwargs)


__all__ = [
    "WindowLinearState",
    "gated_delta",
    "gated_delta_step",
    "gated_linear_attn",
    "gated_linear_attn_step",
    "gated_slot_attn",
    "gated_slot_attn_step",
    "linear_attn",
    "window_linear",
    "window_linear_step",
]
