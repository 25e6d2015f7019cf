"""Real-size presets build on the meta device with the published parameter counts, allocating nothing."""
import os
from pathlib import Path

import pytest
import torch

from lm_mini.config import load_config
from lm_mini.models.llava_mini import LlavaMini

PRESETS = Path(__file__).resolve().parents[2] / "experiments" / "models"


def resident_bytes():
    """Current (not peak) resident memory of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def count(module):
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def build_on_meta(name):
    cfg = load_config(PRESETS / f"{name}.yaml")
    with torch.device("meta"):
        return cfg, LlavaMini.from_config(cfg.model)


@pytest.mark.parametrize(
    "name, llm_params, prefusion_params, c2",
    [
        ("llava15_vicuna7b", 6.74e9, 0, None),  # identity: all 576 tokens
        ("llava_mini_vicuna7b", 6.74e9, 0.81e9, 1),
        ("llava_mini_llama31_8b", 8.03e9, 0.87e9, 1),  # 4 Llama-3 layers: GQA makes them a bit larger (MLP 14336)
    ],
)
def test_real_size_presets_on_meta(name, llm_params, prefusion_params, c2):
    rss_before = resident_bytes()
    cfg, model = build_on_meta(name)
    rss_after = resident_bytes()

    assert count(model.encoder) == pytest.approx(0.3035e9, rel=0.01)  # CLIP ViT-L/14-336 vision tower
    assert count(model.llm) == pytest.approx(llm_params, rel=0.005)
    assert count(model.prefusion) == pytest.approx(prefusion_params, rel=0.01)
    assert (model.prefusion is None) == (prefusion_params == 0)
    assert count(model.projector) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu 1024 -> 4096
    assert model.encoder.grid == 24 and model.encoder.image_size == 336
    assert model.compressor.num_tokens == c2
    # nothing materialised: every tensor lives on meta, and peak memory grew by far less than one layer
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert rss_after - rss_before < 300 * 2**20  # a 7B model in bf16 would be 13 GB


def test_llama31_preset_keeps_llama3_rope_and_gqa():
    _, model = build_on_meta("llava_mini_llama31_8b")
    config = model.llm.config
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    assert config.num_key_value_heads == 8 and config.vocab_size == 128256
    attn = model.prefusion.layers[0].self_attn  # pre-fusion layers are the LLM's own class and shape
    assert type(model.prefusion.layers[0]) is type(model.llm.model.layers[0])
    assert attn.k_proj.weight.shape == (1024, 4096)


def test_tiny_preset_validates_and_trains_a_step():
    cfg = load_config(PRESETS / "tiny.yaml")
    model = LlavaMini.from_config(cfg.model)
    assert (model.encoder.grid, model.encoder.hidden_size, model.llm.config.hidden_size) == (8, 64, 128)
    assert model.llm.config.vocab_size == 1024 and len(model.prefusion.layers) == 2
    ids = torch.tensor([[5, -200, 6, 7, 8, 9]])
    batch = dict(input_ids=ids, labels=torch.tensor([[-100, -100, -100, -100, 8, 9]]), attention_mask=torch.ones_like(ids),
                 pixel_values=torch.randn(1, 3, 64, 64), frames_per_sample=torch.tensor([1]), is_video=torch.tensor([False]))
    out = model(batch)
    assert out.logits.shape == (1, 6, 1024)  # C = 1: the <image> slot becomes exactly one token
    out.loss.backward()
    assert model.compressor.query.grad is not None
