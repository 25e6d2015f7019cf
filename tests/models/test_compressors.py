"""Compressors against plainly written references of their math."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm_mini.models.compressors import (
    AvgPoolCompressor,
    IdentityCompressor,
    QFormerCompressor,
    QueryAttentionCompressor,
    sincos_2d,
)
from lm_mini.registry import COMPRESSORS

DIM = 32  # 8 heads of width 4; divisible by 4 for the 2D sin-cos table


# --------------------------------------------------------------------------- references
def ref_sincos_table(dim: int, grid: int) -> np.ndarray:
    """Entry by entry, for the patch at row i, column j (index i * grid + j):
    dims [0, dim/2) encode the column j, dims [dim/2, dim) the row i (what MAE's meshgrid does);
    each half is [sin(p * w_0..w_{K-1}), cos(p * w_0..w_{K-1})] with w_k = 10000 ** (-k / K), K = dim / 4."""
    quarter = dim // 4
    table = np.zeros((grid * grid, dim), dtype=np.float64)
    for i in range(grid):
        for j in range(grid):
            for k in range(quarter):
                freq = 1.0 / 10000 ** (k / quarter)
                row = i * grid + j
                table[row, k] = math.sin(j * freq)
                table[row, quarter + k] = math.cos(j * freq)
                table[row, 2 * quarter + k] = math.sin(i * freq)
                table[row, 3 * quarter + k] = math.cos(i * freq)
    return table


def ref_query_attention(m: QueryAttentionCompressor, x: torch.Tensor, hw, num_heads: int = 8) -> torch.Tensor:
    """The compressor's math written out: LayerNorms, sin-cos terms on q and k only, per-head softmax."""
    b, n, d = x.shape
    c = m.grid
    table = torch.tensor(ref_sincos_table(d, c), dtype=torch.float32)  # [C*C, D]
    key_pos = F.interpolate(table.T.reshape(1, d, c, c), size=hw, mode="bicubic", align_corners=False)
    key_pos = key_pos.reshape(d, n).T  # [N, D], row-major patches

    def layer_norm(t, ln):
        mu = t.mean(-1, keepdim=True)
        var = t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    q_in = layer_norm(m.query, m.ln_q) + table  # [C*C, D]
    kv = layer_norm(x, m.ln_kv)  # [B, N, D]
    k_in = kv + key_pos
    w_q, w_k, w_v = m.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = m.attn.in_proj_bias.chunk(3)
    q = q_in @ w_q.T + b_q  # [C*C, D]
    k = k_in @ w_k.T + b_k  # [B, N, D]
    v = kv @ w_v.T + b_v  # values: no positional term
    hd = d // num_heads
    out = torch.zeros(b, c * c, d)
    for bi in range(b):
        for h in range(num_heads):
            s = slice(h * hd, (h + 1) * hd)
            scores = q[:, s] @ k[bi, :, s].T / math.sqrt(hd)  # [C*C, N]
            out[bi, :, s] = torch.softmax(scores, dim=-1) @ v[bi, :, s]
    return out @ m.attn.out_proj.weight.T + m.attn.out_proj.bias


def randomize_norms(m):
    # LayerNorms start at weight 1 / bias 0; random values make the test see whether they are used.
    with torch.no_grad():
        for ln in (m.ln_q, m.ln_kv):
            ln.weight.normal_(1.0, 0.3)
            ln.bias.normal_(0.0, 0.3)
        m.attn.in_proj_bias.normal_(0.0, 0.1)
        m.attn.out_proj.bias.normal_(0.0, 0.1)


# --------------------------------------------------------------------------- query attention
@pytest.mark.parametrize("grid", [1, 2, 4, 8])
@pytest.mark.parametrize("hw", [(12, 12), (9, 12), (8, 8)])
def test_query_attention_matches_reference(grid, hw):
    m = QueryAttentionCompressor(dim=DIM, grid=grid).eval()
    randomize_norms(m)
    x = torch.randn(2, hw[0] * hw[1], DIM)
    out = m(x, grid_hw=hw)
    assert out.shape == (2, grid * grid, DIM)
    torch.testing.assert_close(out, ref_query_attention(m, x, hw), atol=2e-5, rtol=1e-4)


def test_sincos_table_halves_encode_column_then_row():
    c = 4
    table = sincos_2d(DIM, c).reshape(c, c, DIM)  # [row, col, D]
    first, second = table[..., : DIM // 2], table[..., DIM // 2 :]
    # first half depends on the column only, second half on the row only (MAE / official layout)
    assert torch.equal(first, first[0:1].expand(c, -1, -1))
    assert torch.equal(second, second[:, 0:1].expand(-1, c, -1))
    assert not torch.equal(first[:, 0], first[:, 1]) and not torch.equal(second[0], second[1])
    # dim 0 of each half is sin(position), dim D/4 of each half is cos(position)
    pos = torch.arange(c, dtype=torch.float32)
    torch.testing.assert_close(first[0, :, 0], torch.sin(pos))
    torch.testing.assert_close(second[:, 0, 0], torch.sin(pos))
    torch.testing.assert_close(second[:, 0, DIM // 4], torch.cos(pos))
    np.testing.assert_allclose(sincos_2d(DIM, 3).numpy(), ref_sincos_table(DIM, 3), atol=1e-6)


def test_query_init_and_pos_embed_is_a_saved_buffer():
    m = QueryAttentionCompressor(dim=256, grid=8)
    assert m.query.shape == (64, 256)
    assert abs(m.query.std().item() - 0.02) < 0.002 and abs(m.query.mean().item()) < 0.002
    assert "pos_embed" in m.state_dict()
    assert "pos_embed" not in dict(m.named_parameters())  # never handed to an optimizer
    assert m.num_tokens == 64


@pytest.mark.parametrize("name", ["query_attention", "qformer"])
def test_builds_on_meta_device(name):
    # real-size presets are checked on `meta`: no tensor of the compressor may land in memory
    with torch.device("meta"):
        m = COMPRESSORS.create(name, dim=1024, grid=2)
    assert {t.device.type for t in [*m.parameters(), *m.buffers()]} == {"meta"}


def official_state_dict(dim: int, grid: int) -> dict:
    """A state dict keyed like the official LLaVA-Mini ``model.compressor.*`` weights."""
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {
        "query": r(grid * grid, dim),
        "pos_embed": torch.from_numpy(ref_sincos_table(dim, grid)).float(),
        "ln_q.weight": r(dim),
        "ln_q.bias": r(dim),
        "ln_kv.weight": r(dim),
        "ln_kv.bias": r(dim),
        "attn.in_proj_weight": r(3 * dim, dim) * 0.1,
        "attn.in_proj_bias": r(3 * dim),
        "attn.out_proj.weight": r(dim, dim) * 0.1,
        "attn.out_proj.bias": r(dim),
    }


def test_official_key_names_load_strictly():
    sd = official_state_dict(DIM, 2)
    m = QueryAttentionCompressor(dim=DIM, grid=2)
    result = m.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in sd.items():
        assert torch.equal(m.state_dict()[key], value), key
    x = torch.randn(1, 36, DIM)
    torch.testing.assert_close(m(x, (6, 6)), ref_query_attention(m, x, (6, 6)), atol=2e-5, rtol=1e-4)
    # the official checkpoint carries pos_embed, and so must ours (strict in both directions)
    with pytest.raises(RuntimeError, match="pos_embed"):
        QueryAttentionCompressor(dim=DIM, grid=2).load_state_dict({k: v for k, v in sd.items() if k != "pos_embed"})


def test_values_carry_no_positional_term():
    # With one key token, softmax weight is 1: output = out_proj(W_v ln_kv(x) + b_v) whatever the positions.
    m = QueryAttentionCompressor(dim=DIM, grid=1).eval()
    randomize_norms(m)
    x = torch.randn(3, 1, DIM)
    kv = m.ln_kv(x)
    w_v, b_v = m.attn.in_proj_weight.chunk(3)[2], m.attn.in_proj_bias.chunk(3)[2]
    expected = (kv @ w_v.T + b_v) @ m.attn.out_proj.weight.T + m.attn.out_proj.bias
    torch.testing.assert_close(m(x, (1, 1)), expected)


# --------------------------------------------------------------------------- avg pool
@pytest.mark.parametrize("hw,grid", [((6, 6), 2), ((6, 6), 3), ((5, 7), 2), ((4, 6), 4)])
def test_avg_pool_is_mean_over_each_cell(hw, grid):
    h, w = hw
    x = torch.randn(2, h * w, DIM)
    out = AvgPoolCompressor(dim=DIM, grid=grid)(x, grid_hw=hw)
    patches = x.reshape(2, h, w, DIM)
    for a in range(grid):
        rows = range(a * h // grid, -(-(a + 1) * h // grid))  # floor start, ceil end: cells overlap when h % C
        for b in range(grid):
            cols = range(b * w // grid, -(-(b + 1) * w // grid))
            cell = torch.stack([patches[:, r, col] for r in rows for col in cols], dim=1)  # [2, cell, D]
            torch.testing.assert_close(out[:, a * grid + b], cell.mean(dim=1))


# --------------------------------------------------------------------------- qformer / identity
def test_qformer_shape_and_gradients():
    m = QFormerCompressor(dim=DIM, grid=2, hidden_size=32, num_layers=2, num_heads=4)
    x = torch.randn(2, 36, DIM, requires_grad=True)
    out = m(x, grid_hw=(6, 6))
    assert out.shape == (2, 4, DIM) and m.num_tokens == 4
    out.square().mean().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_identity_passes_all_tokens_and_gradients():
    m = IdentityCompressor(dim=DIM, grid=1)
    x = torch.randn(2, 20, DIM, requires_grad=True)
    out = m(x, grid_hw=(4, 5))
    assert torch.equal(out, x) and m.num_tokens is None
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ["query_attention", "avg_pool", "qformer"])
def test_grid_larger_than_encoder_is_refused(name):
    m = COMPRESSORS.create(name, dim=DIM, grid=8)
    with pytest.raises(ValueError, match=r"64 output tokens is larger than the encoder's 36 tokens"):
        m(torch.randn(1, 36, DIM), grid_hw=(6, 6))


def test_grid_hw_must_match_token_count():
    with pytest.raises(ValueError, match=r"grid_hw=5x6 = 30 patches does not match the 36 input tokens"):
        QueryAttentionCompressor(dim=DIM, grid=2)(torch.randn(1, 36, DIM), grid_hw=(5, 6))


def test_unknown_compressor_lists_known_names():
    with pytest.raises(KeyError) as err:
        COMPRESSORS.get("query_atention")
    for name in ("query_attention", "avg_pool", "qformer", "identity"):
        assert name in str(err.value)
