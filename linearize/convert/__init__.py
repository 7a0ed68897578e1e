"""Conversion: teacher families, the attention swap, export, the checkpoint check and publishing."""
