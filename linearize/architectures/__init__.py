"""Mixers, feature maps and the Hugging Face classes of converted checkpoints.

The registries below are lazy tables (name -> "module:object"), so choosing or validating a name does
not import torch or transformers. The modules of this folder that a converted checkpoint carries
(configuration_linearize, modeling_linearize, mixers, feature_maps, ops) import only torch,
transformers and each other, because they must run where linearize is not installed.
"""

from __future__ import annotations

import importlib

MIXERS: dict[str, str] = {
    "linear": "linearize.architectures.mixers:LinearMixer",
    "softmax": "linearize.architectures.mixers:SoftmaxMixer",
    "window_linear": "linearize.architectures.mixers:WindowLinearMixer",
    "gated": "linearize.architectures.mixers:GatedMixer",
    "gated_slot": "linearize.architectures.mixers:GatedSlotMixer",
    "gated_delta": "linearize.architectures.mixers:GatedDeltaMixer",
}
FEATURE_MAPS: dict[str, str] = {
    "hedgehog": "linearize.architectures.feature_maps:Hedgehog",
    "t2r": "linearize.architectures.feature_maps:T2R",
    "elu": "linearize.architectures.feature_maps:EluPlusOne",
    "relu": "linearize.architectures.feature_maps:Relu",
}
LEARNED_FEATURE_MAPS = ("hedgehog", "t2r")
"""Feature maps with a learned projection (the ones `student.feature_dim` / `feature_bias` apply to)."""


def resolve(table: dict[str, str], name: str, kind: str) -> type:
    """Import the object registered under `name`; an unknown name lists the known ones."""
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    module, obj = table[name].split(":")
    return getattr(importlib.import_module(module), obj)
