"""Vision encoders: the right hidden layer and tokens, and preprocessing answered from the config alone."""
import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from lm_mini.config import EncoderConfig
from lm_mini.models.encoders import OPENAI_CLIP_MEAN, build_encoder, image_preprocessing
from lm_mini.registry import ENCODERS

VIT = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
TIMM = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4)


def encoder_cfg(name, config, **kw):
    return OmegaConf.structured(EncoderConfig(name=name, config=config, **kw))


@pytest.mark.parametrize("name, model_cls, config_cls, n_prefix", [
    ("hf_clip", CLIPVisionModel, CLIPVisionConfig, 1),
    ("hf_siglip", SiglipVisionModel, SiglipVisionConfig, 0),
])
@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_hf_encoder_takes_the_selected_hidden_state_without_cls(name, model_cls, config_cls, n_prefix, select_layer):
    enc = build_encoder(encoder_cfg(name, VIT, select_layer=select_layer))
    reference = model_cls(config_cls(**VIT))
    reference.load_state_dict(enc.model.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer][:, n_prefix:]
    feats = enc(pixels)
    assert feats.shape == (2, 16, 32) and (enc.grid, enc.hidden_size, enc.image_size) == (4, 32, 32)
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)


def test_clip_cls_patch_keeps_the_cls_token():
    enc = build_encoder(encoder_cfg("hf_clip", VIT, select_feature="cls_patch"))
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)
    with pytest.raises(ValueError, match="select_feature"):
        build_encoder(encoder_cfg("hf_clip", VIT, select_feature="cls"))


@pytest.mark.parametrize("select_layer, blocks_run", [(-2, 2), (-1, 3), (1, 1)])
def test_timm_encoder_matches_running_the_blocks_by_hand(select_layer, blocks_run):
    enc = build_encoder(encoder_cfg("timm", TIMM, select_layer=select_layer))
    vit, pixels = enc.model, torch.randn(2, 3, 32, 32)
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(pixels)))
    for block in vit.blocks[:blocks_run]:
        x = block(x)
    torch.testing.assert_close(enc(pixels), x[:, vit.num_prefix_tokens :])  # CLS dropped, no final norm
    assert (enc.grid, enc.hidden_size, enc.image_size) == (4, 32, 32)


def test_timm_encoder_refuses_a_layer_it_does_not_have():
    with pytest.raises(ValueError, match="select_layer 7"):
        build_encoder(encoder_cfg("timm", TIMM, select_layer=7))


@pytest.mark.parametrize("name, config", [("hf_clip", VIT), ("hf_siglip", VIT), ("timm", TIMM)])
def test_image_preprocessing_agrees_with_the_built_encoder(name, config):
    cfg = encoder_cfg(name, config)
    enc = build_encoder(cfg)
    assert image_preprocessing(cfg) == (enc.image_size, tuple(enc.image_mean), tuple(enc.image_std))


def test_image_preprocessing_reads_a_local_checkpoint_without_weights(tmp_path):
    CLIPVisionConfig(**{**VIT, "image_size": 48}).save_pretrained(tmp_path)  # config only, no weights
    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]}')
    assert image_preprocessing(encoder_cfg("hf_clip", {}, path=str(tmp_path))) == (48, (0.1, 0.2, 0.3), (1, 2, 3))
    assert image_preprocessing(encoder_cfg("hf_clip", VIT))[1] == OPENAI_CLIP_MEAN


def test_clip_encoder_loads_the_vision_tower_of_a_full_clip_checkpoint(tmp_path):
    """The released openai/clip-vit-large-patch14-336 directory is a full CLIPModel (text + vision)."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    saved = CLIPModel(CLIPConfig(vision_config=VIT, text_config=text))
    saved.save_pretrained(tmp_path)
    enc = build_encoder(encoder_cfg("hf_clip", {}, path=str(tmp_path)))
    torch.testing.assert_close(enc.model.state_dict(), saved.vision_model.state_dict())
    assert (enc.grid, enc.hidden_size) == (4, 32)


def test_unknown_encoder_lists_the_known_ones():
    with pytest.raises(KeyError, match="hf_clip, hf_siglip, timm"):
        ENCODERS.get("clip_vit")
