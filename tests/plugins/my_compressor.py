"""A user's own compressor, as it would live in a user's package (used by tests/models/test_plugins.py).

It deliberately does not subclass ``lm_mini.models.compressors.Compressor``: a plug-in only has to
keep the contract ``cls(dim=D, grid=C, **options)``, ``forward(tokens [B,N,D], grid_hw) -> [B,C*C,D]``
and ``.num_tokens``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from lm_mini.registry import COMPRESSORS


class GatedPoolCompressor(nn.Module):
    """Average-pool the patch grid to C x C, then a learned per-channel gate and a linear map."""

    def __init__(self, dim: int, grid: int, gate_init: float = 1.0):
        super().__init__()
        self.grid = grid
        self.gate = nn.Parameter(torch.full((dim,), gate_init))
        self.proj = nn.Linear(dim, dim)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, tokens: torch.Tensor, grid_hw) -> torch.Tensor:
        b, n, d = tokens.shape
        h, w = grid_hw
        pooled = F.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(b, d, h, w), self.grid)  # [B, D, C, C]
        return self.proj(pooled.flatten(2).transpose(1, 2) * self.gate)  # [B, C*C, D]


# Route 1: the decorator. Importing this module registers a subclass under a registry name.
@COMPRESSORS.register("test_gated_pool")
class RegisteredGatedPool(GatedPoolCompressor):
    pass
