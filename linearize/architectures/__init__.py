"""Mixers, feature maps and the Hugging Face classes of converted checkpoints.

The registries (`linearize.registry`) are lazy tables (name -> "module:object"), so choosing or validating
a name does not import torch or transformers. The modules of this folder that a converted checkpoint carries
(configuration_linearize, modeling_linearize, mixers, feature_maps, ops) import only torch,
transformers and each other, because they must run where linearize is not installed.
"""

from __future__ import annotations

import importlib

from linearize.registry import FEATURE_MAPS, LEARNED_FEATURE_MAPS, MIXERS

__all__ = ["FEATURE_MAPS", "LEARNED_FEATURE_MAPS", "MIXERS", "resolve"]


def resolve(table: dict[str, str], name: str, kind: str) -> type:
    """Import the object registered under `name`; an unknown name lists the known ones."""
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    module, obj = table[name].split(":")
    return getattr(importlib.import_module(module), obj)
