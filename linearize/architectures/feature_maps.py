"""Feature maps phi for linear attention: q.k similarity becomes phi(q).phi(k).

Each map acts per head on [batch, seq, heads, head_dim] and returns [batch, seq, heads, feature_dim],
non-negative, so the normalised linear attention's denominator stays positive.

The maps with a learned projection (hedgehog, t2r) take `width`, the projection's output size per head
(default head_dim): a wider map approximates softmax attention better on small heads, at the cost of a
decode state that grows with it (feature_dim x (head_dim + 1) per head).
"""

from __future__ import annotations

import torch
from torch import nn


def hadamard(d: int) -> torch.Tensor:
    """[d, d]: Sylvester's Hadamard matrix over d / sqrt(d) (orthogonal when d is a power of two; for other d
    the top-left corner of the next one, still full of distinct directions)."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h[:d, :d] / d**0.5


class FeatureMap(nn.Module):
    """Base: `feature_dim(head_dim, width)` says the output width. `learned` maps have a projection whose
    output size is `width` (None: head_dim) and may have a bias; the others take neither."""

    learned = False

    def __init__(self, num_heads: int, head_dim: int, width: int | None = None, bias: bool = False):
        super().__init__()
        if not self.learned and (width is not None or bias):
            raise ValueError(f"{type(self).__name__} has no learned projection: it takes no width or bias")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.width = width or head_dim

    @classmethod
    def feature_dim(cls, head_dim: int, width: int | None = None) -> int:
        return width or head_dim

    def projection_init(self) -> torch.Tensor:
        """[H, D, width]: the identity, then (when width > D) more D-column blocks cycling through two bases
        (the identity and a normalised Hadamard matrix) at temperatures 1, 2, 1/2, 4, 1/4, ...: distinct
        blocks, so their gradients differ, and deterministic, so a meta-device build needs no RNG. Truncated
        when width is not a multiple of D."""
        d, w = self.head_dim, self.width
        bases = [torch.eye(d), hadamard(d)]
        blocks = []
        for i in range(-(-w // d)):
            level = i // 2
            temperature = 2.0 ** ((level + 1) // 2 * (1 if level % 2 else -1))
            blocks.append(bases[i % 2] * temperature)
        return torch.cat(blocks, dim=1)[:, :w].repeat(self.num_heads, 1, 1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """float32 x W (+ b): [B, T, H, width]."""
        proj = torch.einsum("bthd,hde->bthe", x.float(), self.weight.float())
        return proj if self.bias is None else proj + self.bias.float()


class Hedgehog(FeatureMap):
    """LoLCATs' Hedgehog: [softmax(xW + b), softmax(-xW - b)] concatenated, W per head, identity init; the
    bias b (zeros) only when asked (`bias=True`), as in LoLCATs' feature-map MLP.

    Not fla's HedgehogFeatureMap, which takes one softmax over the concatenation [xW, -xW].
    """

    learned = True

    def __init__(self, num_heads: int, head_dim: int, width: int | None = None, bias: bool = False):
        super().__init__(num_heads, head_dim, width, bias)
        self.weight = nn.Parameter(self.projection_init())
        self.bias = nn.Parameter(torch.zeros(num_heads, self.width)) if bias else None

    @classmethod
    def feature_dim(cls, head_dim: int, width: int | None = None) -> int:
        return 2 * (width or head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32: the softmax of a bf16 projection loses the small features that carry the ranking
        proj = self.project(x)
        return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1).to(x.dtype)


class T2R(FeatureMap):
    """T2R (Kasai et al.): ReLU(xW + b), W per head initialised to the identity, b to zero (T2R always has
    its bias)."""

    learned = True

    def __init__(self, num_heads: int, head_dim: int, width: int | None = None, bias: bool = True):
        super().__init__(num_heads, head_dim, width, bias)
        self.weight = nn.Parameter(self.projection_init())
        self.bias = nn.Parameter(torch.zeros(num_heads, self.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.project(x)).to(x.dtype)


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
