"""Feature maps phi for linear attention: q.k similarity becomes phi(q).phi(k).

Each map acts per head on [batch, seq, heads, head_dim] and returns [batch, seq, heads, feature_dim],
non-negative, so the normalised linear attention's denominator stays positive.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureMap(nn.Module):
    """Base: `feature_dim(head_dim)` says the output width."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim

    @staticmethod
    def feature_dim(head_dim: int) -> int:
        return head_dim


class Hedgehog(FeatureMap):
    """LoLCATs' Hedgehog: [softmax(xW), softmax(-xW)] concatenated, W per head, identity init.

    Not fla's HedgehogFeatureMap, which takes one softmax over the concatenation [xW, -xW].
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__(num_heads, head_dim)
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))

    @staticmethod
    def feature_dim(head_dim: int) -> int:
        return 2 * head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32: the softmax of a bf16 projection loses the small features that carry the ranking
        proj = torch.einsum("bthd,hde->bthe", x.float(), self.weight.float())
        return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1).to(x.dtype)


class T2R(FeatureMap):
    """T2R (Kasai et al.): ReLU(xW + b), W per head initialised to the identity, b to zero."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__(num_heads, head_dim)
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = torch.einsum("bthd,hde->bthe", x.float(), self.weight.float()) + self.bias.float()
        return torch.relu(proj).to(x.dtype)


class EluPlusOne(FeatureMap):
    """elu(x) + 1 (Katharopoulos et al.): no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.elu(x.float()) + 1).to(x.dtype)


class Relu(FeatureMap):
    """relu(x): no parameters (a query or key with no positive coordinate attends to nothing; the
    denominator's eps keeps that finite)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


FEATURE_MAP_CLASSES: dict[str, type[FeatureMap]] = {
    "hedgehog": Hedgehog,
    "t2r": T2R,
    "elu": EluPlusOne,
    "relu": Relu,
}
