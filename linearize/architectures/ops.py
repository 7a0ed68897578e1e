"""Where mixers get their ops.

With linearize installed this is `linearize.kernels` (its dispatch picks Triton/fla on CUDA, chunked
torch elsewhere). A converted checkpoint loaded with `trust_remote_code=True` where linearize is not
installed falls back to the chunked torch form that the export copies beside this file.
"""

try:
    from linearize.kernels.linear_attn import linear_attn
except ImportError:
    from .linear_attn_chunked import linear_attn_chunked as _chunked

    def linear_attn(q, k, v, *, impl="auto", **kwargs):
        """Chunked torch linear attention (see linearize/kernels/linear_attn/README.md)."""
        return _chunked(q, k, v, **kwargs)
