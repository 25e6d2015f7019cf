"""Projectors: encoder width -> LLM width, built as ``cls(in_dim, out_dim)``; ``[..., in_dim] -> [..., out_dim]``."""
from __future__ import annotations

from torch import nn

from lm_mini.registry import PROJECTORS


@PROJECTORS.register("mlp2x_gelu")
class MLP2xGELU(nn.Sequential):
    """LLaVA-1.5's projector: Linear(in, out), GELU, Linear(out, out).

    An ``nn.Sequential`` so the parameter names are ``0.*`` and ``2.*``, as in the official
    ``mm_projector.0.weight`` / ``mm_projector.2.weight`` checkpoints.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


@PROJECTORS.register("linear")
class LinearProjector(nn.Linear):
    """LLaVA-1's projector: a single Linear(in, out) (state dict keys ``weight`` / ``bias``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim)
