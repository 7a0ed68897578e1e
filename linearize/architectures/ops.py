"""Where mixers get their ops.

With linearize installed this is `linearize.kernels` (its dispatch picks Triton/fla on CUDA, chunked
torch elsewhere). A converted checkpoint loaded with `trust_remote_code=True` where linearize is not
installed falls back to the chunked torch forms that the export copies beside this file (they import
only torch).
"""

try:
    from linearize.kernels.linear_attn import linear_attn
    from linearize.kernels.window_linear import WindowLinearState, window_linear, window_linear_step
except ImportError:
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


__all__ = ["WindowLinearState", "linear_attn", "window_linear", "window_linear_step"]
