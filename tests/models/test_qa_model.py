"""QA of LlavaMini on configurations and batches the other model tests do not cover."""
from pathlib import Path

import pytest
import torch

from lm_mini.config import ConfigError, load_config
from lm_mini.constants import IGNORE_INDEX as IGN
from lm_mini.constants import IMAGE_TOKEN_INDEX as IMG
from lm_mini.models.llava_mini import LlavaMini

TINY = Path(__file__).resolve().parents[2] / "experiments" / "models" / "tiny.yaml"


def build(*overrides, encoder=None, llm=None):
    cfg = load_config(TINY, list(overrides))
    if encoder is not None:  # replace (not merge into) the tiny preset's CLIP config
        cfg.model.encoder.config = encoder
    if llm is not None:
        cfg.model.llm.config = llm
    return LlavaMini.from_config(cfg.model).eval()


def text_batch(*seqs):
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGN))
    return dict(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=None,
                frames_per_sample=torch.zeros(len(seqs), dtype=torch.long),
                is_video=torch.zeros(len(seqs), dtype=torch.bool), sample_ids=[f"t{b}" for b in range(len(seqs))])


# --------------------------------------------------------------------------- dtypes
def test_bf16_text_only_batch_stays_bf16_in_forward_and_generate():
    """A batch without any media (text-only data mix) must not promote the LLM input to float32."""
    model = build("model.dtype=bfloat16")
    batch = text_batch([4, 5, 6, 7], [8, 9])
    with torch.no_grad():
        embeds, *_ = model.prepare_inputs(batch)
        out = model(batch)
    assert embeds.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    assert model.generate(text_batch([4, 5, 6]), max_new_tokens=2).shape == (1, 2)


TIMM_TINY = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2}


def test_timm_encoder_in_bf16_takes_float32_pixels():
    """The model hands its encoder float32 pixels (normalised from the loader's uint8); a bf16 timm tower must cast them like the HF towers do."""
    model = build("model.encoder.name=timm", "model.dtype=bfloat16", encoder=TIMM_TINY)
    ids = [5, IMG, 6, 7]
    batch = text_batch(ids)
    batch.update(pixel_values=torch.randn(1, 3, 32, 32), frames_per_sample=torch.tensor([1]))
    with torch.no_grad():
        out = model(batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


# --------------------------------------------------------------------------- build-time refusals
@pytest.mark.parametrize("layer", [3, -4])  # the tiny CLIP has 2 blocks: hidden_states indices -3 .. 2
def test_hf_encoder_select_layer_out_of_range_is_refused_at_build(layer):
    with pytest.raises(ValueError, match=rf"select_layer {layer}.*2-layer"):
        build(f"model.encoder.select_layer={layer}")


def test_hf_encoder_select_layer_extremes_work():
    for layer in (0, -3, 2):  # patch embedding, the same counted from the end, last block
        model = build(f"model.encoder.select_layer={layer}")
        assert model.encoder(torch.randn(1, 3, 64, 64)).shape == (1, 64, 64)


def test_cls_patch_with_a_patch_grid_compressor_is_refused_at_build_not_first_batch():
    with pytest.raises(ValueError, match="select_feature"):
        build("model.encoder.select_feature=cls_patch")
    with pytest.raises(ValueError, match="select_feature"):  # hi-res stitching has no place for the crops' CLS
        build("model.encoder.select_feature=cls_patch", "model.compressor.name=identity", "model.resolution_ratio=2")


def test_identity_with_cls_patch_is_exactly_llava_15_full_features():
    """LLaVA-1.5 with mm_vision_select_feature=cls_patch: CLS + all patches reach the LLM (HF strategy 'full')."""
    from llava15_reference import llava15_twin

    model = build("model.compressor.name=identity", "model.prefusion.depth=0", "model.encoder.select_feature=cls_patch")
    image_token = 1023
    hf = llava15_twin(model, image_token, "full")
    ids = [5, IMG, 6, 7]
    batch = text_batch(ids)
    batch.update(pixel_values=torch.randn(1, 3, 64, 64), frames_per_sample=torch.tensor([1]))
    hf_ids = torch.tensor([[5] + [image_token] * 65 + [6, 7]])
    with torch.no_grad():
        ours = model(batch).logits
        ref = hf(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=batch["pixel_values"]).logits
    assert ours.shape == ref.shape == (1, 68, 1024)
    assert (ours - ref).abs().max() < 1e-5
    prefused = build("model.compressor.name=identity", "model.encoder.select_feature=cls_patch")  # with pre-fusion too
    with torch.no_grad():
        assert prefused(batch).logits.shape == (1, 68, 1024)


def test_cls_patch_is_harmless_for_an_encoder_without_cls():
    sig = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4}
    model = build("model.encoder.name=hf_siglip", "model.encoder.select_feature=cls_patch", encoder=sig)
    batch = text_batch([5, IMG, 6])
    batch.update(pixel_values=torch.randn(1, 3, 32, 32), frames_per_sample=torch.tensor([1]))
    with torch.no_grad():
        assert model(batch).logits.shape == (1, 3, 1024)


def test_timm_model_that_is_not_a_vit_is_refused_clearly():
    with pytest.raises(ValueError, match="resnet18.*ViT"):
        build("model.encoder.name=timm", encoder={"model_name": "resnet18"})


def test_timm_non_square_input_is_refused_clearly():
    with pytest.raises(ValueError, match="square"):
        build("model.encoder.name=timm", encoder=dict(TIMM_TINY, img_size=[32, 64]))


# --------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override, key, expected", [
    ("model.dtype=float8", "model.dtype", "bfloat16"),
    ("model.prefusion.depth=-1", "model.prefusion.depth", ">= 0"),
    ("model.prefusion.init=copy", "model.prefusion.init", "llm_layers"),
    ("model.compressor.grid=0", "model.compressor.grid", ">= 1"),
    ("model.resolution_ratio=0", "model.resolution_ratio", ">= 1"),
    ("model.encoder.select_feature=cls", "model.encoder.select_feature", "cls_patch"),
    ("data.aspect_mode=crop", "data.aspect_mode", "pad"),
    ("data.video_fps=0", "data.video_fps", "> 0"),
    ("data.batch_size=0", "data.batch_size", ">= 1"),
    ("data.max_length=0", "data.max_length", ">= 1"),
    ("train.parts.llm.lr=-0.5", "train.parts.llm.lr", ">= 0.0"),  # would train the LLM backwards
    ("train.lr=-1", "train.lr", ">= 0.0"),
    ("train.warmup_ratio=2", "train.warmup_ratio", "<= 1.0"),
    ("train.weight_decay=-0.1", "train.weight_decay", ">= 0.0"),
    ("train.devices=0", "train.devices", "a count >= 1"),
    ("train.checkpoint_every_n_steps=0", "train.checkpoint_every_n_steps", ">= 1"),
    ("eval.batch_size=0", "eval.batch_size", ">= 1"),
    ("eval.metrics=[exact_match,accuracy]", "eval.metrics", "unknown metric 'accuracy'"),
])
def test_bad_config_values_are_refused_at_load_with_the_key(override, key, expected):
    with pytest.raises(ConfigError, match=rf"'{key}'.*{expected}"):
        load_config(TINY, [override])


@pytest.mark.parametrize("devices", ["1", "2", "-1", "auto", "[0, 1]", "'0,1'"])
def test_device_choices_lightning_takes_are_accepted(devices):
    load_config(TINY, [f"train.devices={devices}"])


def test_bad_value_in_yaml_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"defaults: [{TINY}]\nmodel:\n  prefusion: {{depth: -2}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.prefusion\.depth"):
        load_config(bad)


# --------------------------------------------------------------------------- LLM families
SMALL_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 512}


@pytest.mark.parametrize("family", ["qwen3", "gemma"])  # beyond Llama / Qwen2 / Mistral (tested elsewhere)
def test_other_llama_style_families_train_and_generate_with_prefusion(family):
    llm = dict(SMALL_LLM, model_type=family, **({"head_dim": 16} if family == "gemma" else {}))
    model = build("model.prefusion.init=llm_layers", llm=llm).train()
    batch = text_batch([5, IMG, 6, 7, 8], [9, 10])
    batch.update(pixel_values=torch.randn(1, 3, 64, 64), frames_per_sample=torch.tensor([1, 0]))
    model(batch).loss.backward()
    assert all(p.grad is not None for p in model.prefusion.parameters() if p.requires_grad)
    assert model.eval().generate(text_batch([5, 6]), max_new_tokens=2).shape == (1, 2)


@pytest.mark.parametrize("llm, why", [
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1024}, "GPT2"),
    (dict(SMALL_LLM, model_type="gemma3_text", head_dim=16), "Gemma3"),
])
def test_prefusion_on_an_unsupported_llm_family_says_so_and_depth_0_works(llm, why):
    with pytest.raises(ValueError, match=rf"{why}.*model\.prefusion\.depth=0"):
        build(llm=llm)
    model = build("model.prefusion.depth=0", llm=llm)
    batch = text_batch([5, IMG, 6])
    batch.update(pixel_values=torch.randn(1, 3, 64, 64), frames_per_sample=torch.tensor([1]))
    with torch.no_grad():
        assert torch.isfinite(model(batch).loss)


# --------------------------------------------------------------------------- part options
@pytest.mark.parametrize("options, said", [("{num_heads: 3}", "divisible"), ("{bogus: 3}", "bogus")])
def test_bad_compressor_options_name_the_config_key(options, said):
    with pytest.raises(ValueError, match=rf"model\.compressor.*query_attention.*{said}"):
        build(f"model.compressor.options={options}")


def test_llm_config_the_family_cannot_build_names_the_config_key():
    # phi3's default pad_token_id (32000) lies outside a 1024-token vocabulary
    with pytest.raises(ValueError, match=r"model\.llm.*phi3.*Padding_idx"):
        build(llm=dict(SMALL_LLM, model_type="phi3"))


@pytest.mark.parametrize("key", ["model.llm.path", "model.encoder.path"])
def test_missing_local_weights_directory_names_the_key(tmp_path, key):
    with pytest.raises(FileNotFoundError, match=rf"{key}.*nope"):
        build(f"{key}={tmp_path / 'nope'}")


def test_missing_timm_checkpoint_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.encoder\.path.*nope\.pth"):
        build("model.encoder.name=timm", f"model.encoder.path={tmp_path / 'nope.pth'}", encoder=TIMM_TINY)


# --------------------------------------------------------------------------- overrides into lists
DEMO = TINY.parents[1] / "demo.yaml"


def test_override_of_a_list_element_field_sets_it():
    """Sweeping a mixing weight (data.train.0.weight) must work like any other key."""
    cfg = load_config(DEMO, ["data.train.0.weight=2", "data.train.1.template=plain"])
    assert cfg.data.train[0].weight == 2.0 and cfg.data.train[1].template == "plain"
    assert len(cfg.data.train) == len(load_config(DEMO).data.train)  # nothing else changed


@pytest.mark.parametrize("override, said", [
    ("data.train.0.wieght=2", r"'data\.train\.0\.wieght'.*Valid keys here: path, template, weight.*'weight'"),
    ("data.train.9.weight=2", r"data\.train. has 3 entries; index 9"),
    ("data.train=[{path: x, wieght: 2}]", r"wieght.*Valid keys here: path, template, weight"),
    ("model=3", r"'model'.*ModelConfig"),
])
def test_bad_list_and_section_overrides_are_config_errors_naming_the_key(override, said):
    with pytest.raises(ConfigError, match=said):
        load_config(DEMO, [override])


# --------------------------------------------------------------------------- YAML files
def test_yaml_syntax_error_is_a_config_error_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  compressor: {name: avg_pool\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*YAML.*line"):
        load_config(bad)


def test_defaults_as_one_string_and_a_missing_default_name_the_including_file(tmp_path):
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\nmodel: {compressor: {grid: 2}}\n")
    (tmp_path / "base.yaml").write_text("model: {prefusion: {depth: 1}}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.model.compressor.grid, cfg.model.prefusion.depth) == (2, 1)
    (tmp_path / "orphan.yaml").write_text("defaults: [nowhere.yaml]\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml.*defaults of .*orphan\.yaml"):
        load_config(tmp_path / "orphan.yaml")


def test_timm_kwargs_it_does_not_take_name_the_config_key():
    """Switching the tiny preset to timm by override keeps CLIP's keys (mappings merge): say which and why."""
    cfg = load_config(TINY, ["model.encoder.name=timm", "model.encoder.config.model_name=vit_tiny_patch16_224"])
    with pytest.raises(ValueError, match=r"model\.encoder\.config.*image_size.*merge"):
        LlavaMini.from_config(cfg.model)


def test_llm_without_sdpa_support_points_at_attn_implementation():
    llm = dict(SMALL_LLM, model_type="gemma2", head_dim=16)
    with pytest.raises(ValueError, match=r"model\.llm\.attn_implementation=eager"):
        build(llm=llm)
    assert build("model.llm.attn_implementation=eager", llm=llm).llm.config._attn_implementation == "eager"


def test_from_config_checks_values_of_a_config_built_in_code():
    """A ModelConfig made in Python skips load_config's checks; from_config must still refuse bad values."""
    from dataclasses import replace

    from lm_mini.config import ModelConfig, PreFusionConfig

    base = load_config(TINY).model
    good = ModelConfig(encoder=base.encoder, llm=base.llm, prefusion=PreFusionConfig(depth=1))
    assert LlavaMini.from_config(good).prefusion is not None
    with pytest.raises(ValueError, match=r"model\.dtype.*float8"):
        LlavaMini.from_config(replace(good, dtype="float8"))
    with pytest.raises(ValueError, match=r"model\.prefusion\.depth.*-1"):
        LlavaMini.from_config(replace(good, prefusion=PreFusionConfig(depth=-1)))


# --------------------------------------------------------------------------- sliding-window LLMs
@pytest.mark.parametrize("family, extra", [
    ("mistral", {"sliding_window": 3}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),  # layer 0 full, layer 1 sliding
    ("gemma2", {"sliding_window": 3, "head_dim": 16}),  # alternating sliding / full
])
def test_prefusion_copied_from_a_sliding_window_llm_attends_like_it(family, extra):
    """llm_layers init must reproduce the LLM's first layers, sliding windows included."""
    from lm_mini.models.llm import hf_causal_lm
    from lm_mini.models.prefusion import PreFusion

    # 3 layers: hidden_states[2] is then a plain layer output (the last one has the final norm applied)
    llm = hf_causal_lm(dict(SMALL_LLM, model_type=family, num_hidden_layers=3, **extra), attn_implementation="eager").eval()
    fusion = PreFusion.from_llm(llm, depth=2, init="llm_layers").eval()
    visual, compressed, text = torch.randn(1, 6, 64), torch.randn(1, 2, 64), torch.randn(1, 5, 64)
    with torch.no_grad():
        comp_out, text_out = fusion(visual, compressed, text, torch.ones(1, 5, dtype=torch.bool))
        seq = torch.cat([visual, compressed, text], 1)  # (Gemma scales in its embedding table, not here)
        hidden = llm.model(inputs_embeds=seq, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(text_out, hidden[:, 8:], rtol=1e-4, atol=1e-4)
