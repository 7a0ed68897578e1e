"""Ops: the math of each mixer in reference, chunked-torch and Triton forms; they know nothing of
transformers."""
