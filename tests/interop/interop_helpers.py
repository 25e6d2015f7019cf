"""Shared pieces of the interop tests: tiny model configs and batches (fixtures are in conftest.py).

Everything is built offline, in milliseconds: no hub, no released weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from lm_mini.config import load_config

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 300
# One CLIP / Llama size for every test: the encoder gives a 4 x 4 patch grid of width 32.
CLIP = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=3)


def tiny_config(template: str = "llama3", **model):
    """A full lm_mini config for a micro LLaVA-Mini (query_attention C=2, pre-fusion depth 2)."""
    cfg = load_config()
    return OmegaConf.merge(cfg, {
        "model": {"encoder": {"name": "hf_clip", "config": CLIP}, "compressor": {"name": "query_attention", "grid": 2},
                  "prefusion": {"depth": 2}, "llm": {"config": LLAMA}, **model},
        "data": {"template": template, "max_frames": 4},
    })


def image_batch(seed: int = 0, n_text: int = 5) -> dict:
    """One image sample: BOS, <image>, ``n_text`` text tokens (ids < VOCAB); pixels for a 32 x 32 encoder."""
    from lm_mini.constants import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, *torch.randint(10, VOCAB, (n_text,), generator=g).tolist()]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 32, 32, generator=g),
            "frames_per_sample": torch.tensor([1]), "is_video": torch.tensor([False]), "sample_ids": ["s0"]}
