"""Compressors: turn an encoder's N patch tokens into C*C tokens per image / frame.

Every compressor is built as ``cls(dim=D, grid=C, **options)`` and called as
``forward(tokens [B, N, D], grid_hw=(h, w)) -> [B, C*C, D]`` where ``h * w == N`` is the
patch grid the tokens come from (row-major: token ``i * w + j`` is row i, column j).
They run on encoder features, before the projector (as in the official LLaVA-Mini).

Built-in: ``query_attention`` (the paper's), ``avg_pool``, ``qformer`` (BLIP-2), ``identity``
(LLaVA-1.5: all N tokens). A user's own class plugs in through ``COMPRESSORS`` (see
``lm_mini.registry``); it need not subclass :class:`Compressor`, only keep the signature.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lm_mini.registry import COMPRESSORS


class Compressor(nn.Module):
    """Base class: holds ``dim`` and ``grid`` and checks the input against them."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        if grid < 1:
            raise ValueError(f"compressor grid C must be >= 1, got {grid}")
        self.dim = dim
        self.grid = grid

    @property
    def num_tokens(self) -> Optional[int]:
        """Tokens emitted per image / frame (C*C); ``None`` means "as many as come in"."""
        return self.grid * self.grid

    def check_num_input_tokens(self, n: int) -> None:
        """Refuse an encoder that yields fewer tokens than we would emit (callable at build time)."""
        if self.num_tokens is not None and self.num_tokens > n:
            raise ValueError(
                f"{type(self).__name__}: C*C = {self.grid}*{self.grid} = {self.num_tokens} output tokens is larger "
                f"than the encoder's {n} tokens per image; choose a grid C <= {int(n ** 0.5)}"
            )

    def check_input(self, tokens: torch.Tensor, grid_hw: Tuple[int, int]) -> Tuple[int, int]:
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}: expected tokens [B, N, {self.dim}], got {list(tokens.shape)}")
        h, w = (int(x) for x in grid_hw)
        if h * w != tokens.shape[1]:
            raise ValueError(
                f"{type(self).__name__}: grid_hw={h}x{w} = {h * w} patches does not match the {tokens.shape[1]} input tokens"
            )
        self.check_num_input_tokens(tokens.shape[1])
        return h, w

    def forward(self, tokens: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------- sin-cos table
def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim]: sin of pos * 10000^(-k/(dim/2)) then cos of the same (MAE)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
    angles = np.outer(pos.reshape(-1).astype(np.float32), omega)  # [M, dim/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos table [grid*grid, dim], rows of the table in row-major patch order.

    Same numbers as the official ``get_2d_sincos_pos_embed`` (MAE). Note what MAE's
    ``np.meshgrid(grid_w, grid_h)`` really does: the *first* half of the dims encodes the
    column (w) index and the *second* half the row (h) index, whatever its comment says.
    We reproduce that so released weights see the table they were trained with.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos table needs dim divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")  # each [grid, grid]
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return torch.tensor(table, dtype=torch.float32)  # unlike from_numpy, honours a `with torch.device(...)` build


def resize_pos_embed(table: torch.Tensor, grid: int, hw: Tuple[int, int]) -> torch.Tensor:
    """[grid*grid, D] table -> [h*w, D], bicubic on the 2D layout (official ``get_abs_pos``, any h, w)."""
    h, w = hw
    if (h, w) == (grid, grid):
        return table
    img = table.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # [1, D, C, C]
    img = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(h * w, -1).to(table.dtype)


# --------------------------------------------------------------------------- compressors
@COMPRESSORS.register("query_attention")
class QueryAttentionCompressor(Compressor):
    """LLaVA-Mini's query-based compressor (official ``Resampler``): one cross-attention.

    queries  = ln_q(query) + pos_embed                        [C*C, D]  (shared over the batch)
    keys     = ln_kv(tokens) + resize(pos_embed, h x w)       [B, N, D]
    values   = ln_kv(tokens)                                  [B, N, D]  (no positional term)
    output   = MultiheadAttention(queries, keys, values)      [B, C*C, D]

    Parameter names follow the official code so released compressor weights load with
    ``strict=True``: ``query``, ``pos_embed``, ``ln_q``, ``ln_kv``, ``attn``. The official
    stores ``pos_embed`` as a frozen ``nn.Parameter`` (so it is in the state dict); we keep it
    as a persistent buffer: same key, but never handed to an optimizer or counted as trainable.
    """

    def __init__(self, dim: int, grid: int, num_heads: int = 8):
        super().__init__(dim, grid)
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.empty(grid * grid, dim).normal_(mean=0.0, std=0.02))
        self.register_buffer("pos_embed", sincos_2d(dim, grid), persistent=True)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, tokens: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
        h, w = self.check_input(tokens, grid_hw)
        kv = self.ln_kv(tokens)  # [B, N, D]
        key_pos = resize_pos_embed(self.pos_embed, self.grid, (h, w)).to(kv.dtype)  # [N, D]
        q = (self.ln_q(self.query) + self.pos_embed.to(kv.dtype)).expand(tokens.shape[0], -1, -1)  # [B, C*C, D]
        out, _ = self.attn(q, kv + key_pos, kv, need_weights=False)
        return out


@COMPRESSORS.register("avg_pool")
class AvgPoolCompressor(Compressor):
    """Adaptive average pooling of the h x w patch grid down to C x C (no parameters)."""

    def forward(self, tokens: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
        h, w = self.check_input(tokens, grid_hw)
        img = tokens.transpose(1, 2).reshape(tokens.shape[0], self.dim, h, w)  # [B, D, h, w]
        pooled = F.adaptive_avg_pool2d(img, self.grid)  # [B, D, C, C]
        return pooled.flatten(2).transpose(1, 2)  # [B, C*C, D]


@COMPRESSORS.register("qformer")
class QFormerCompressor(Compressor):
    """BLIP-2 Q-Former: C*C learned queries cross-attend to the patch tokens.

    tokens [B, N, D] -> Q-Former (width ``hidden_size``) -> [B, C*C, hidden_size] -> Linear -> [B, C*C, D]
    """

    def __init__(
        self,
        dim: int,
        grid: int,
        hidden_size: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: Optional[int] = None,
        cross_attention_frequency: int = 2,  # BLIP-2: every 2nd layer cross-attends to the image
        dropout: float = 0.1,  # BLIP-2's default
    ):
        super().__init__(dim, grid)
        from transformers import Blip2QFormerConfig, Blip2QFormerModel  # heavy import, only when used

        config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            encoder_hidden_size=dim,
            cross_attention_frequency=cross_attention_frequency,
        )
        self.qformer = Blip2QFormerModel(config)
        self.query_tokens = nn.Parameter(torch.empty(1, grid * grid, hidden_size).normal_(std=config.initializer_range))
        self.out_proj = nn.Linear(hidden_size, dim)

    def forward(self, tokens: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
        self.check_input(tokens, grid_hw)
        queries = self.query_tokens.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state  # [B, C*C, H]
        return self.out_proj(out)


@COMPRESSORS.register("identity")
class IdentityCompressor(Compressor):
    """All N tokens, unchanged (LLaVA-1.5). ``grid`` is ignored; ``num_tokens`` is None."""

    @property
    def num_tokens(self) -> Optional[int]:
        return None

    def forward(self, tokens: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
        self.check_input(tokens, grid_hw)
        return tokens
