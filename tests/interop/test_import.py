"""Importing released checkpoints: official LLaVA-Mini layout and transformers' LLaVA-1.5 layout.

The official-layout checkpoints are written here from real modules (transformers' Llama and CLIP, the
official-named compressor, Llama decoder layers, an ``nn.Sequential`` projector) under the names the
LLaVA-Mini release uses; the reference model loads the same modules' state dicts part by part.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from interop_helpers import CLIP, LLAMA, VOCAB, image_batch, tiny_config
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file
from torch import nn

from lm_mini.cli import main
from lm_mini.interop.importers import import_llava_hf, import_llava_mini
from lm_mini.interop.pretrained import WEIGHTS_INDEX, WeightsMismatch, load_pretrained, read_config
from lm_mini.models.llava_mini import LlavaMini


def _jitter(module: nn.Module) -> nn.Module:
    """Make every weight distinct (norms start at 1): a swapped tensor then changes the logits."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The parts of a micro LLaVA-Mini and its checkpoint state under the release's names."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lm_mini.models.compressors import QueryAttentionCompressor

    torch.manual_seed(1)
    llama = _jitter(LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})))
    clip = _jitter(CLIPVisionModel(CLIPVisionConfig(**CLIP)))
    parts = {
        "llm": llama, "clip": clip,
        "compressor": _jitter(QueryAttentionCompressor(dim=32, grid=2)),
        "prefusion": [_jitter(LlamaDecoderLayer(llama.config, layer_idx=i)) for i in range(2)],
        "projector": _jitter(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))),
    }
    state = dict(llama.state_dict())  # model.layers.*, model.embed_tokens, model.norm, lm_head
    state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in clip.state_dict().items()})
    state.update({f"model.compressor.{k}": v for k, v in parts["compressor"].state_dict().items()})
    state.update({f"model.mm_projector.{k}": v for k, v in parts["projector"].state_dict().items()})
    for i, layer in enumerate(parts["prefusion"]):
        state.update({f"model.prefusion_layers.{i}.{k}": v for k, v in layer.state_dict().items()})
    # older transformers saved rotary frequencies; the model recomputes them
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    clip_dir = tmp_path_factory.mktemp("clip")
    clip.save_pretrained(clip_dir)
    # a full CLIP (vision + text towers) with the same vision weights, as openai/clip-* directories are
    full = CLIPModel(CLIPConfig(vision_config=CLIP, projection_dim=16, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
        bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    full.vision_model.load_state_dict(clip.state_dict())
    parts["full_clip"] = tmp_path_factory.mktemp("full_clip")
    full.save_pretrained(parts["full_clip"])
    return parts, {k: v.detach().clone() for k, v in state.items()}, clip_dir


def official_config(vision_tower: str) -> dict:
    fields = {k: v for k, v in LLAMA.items() if k != "model_type"}
    return {**fields, "architectures": ["LlavaMiniLlamaForCausalLM"], "model_type": "llava_mini", "torch_dtype": "float32",
            "compressor_size": 2, "prefusion_layer_num": 2, "resolution_ratio": 1, "mm_vision_tower": vision_tower,
            "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32, "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "tokenizer_model_max_length": 512,
            "mm_use_im_start_end": False, "mm_patch_merge_type": "flat", "use_mm_proj": True}


def write_checkpoint(path: Path, state: dict, config: dict, tokenizer_dir: Path, shard: str = "") -> Path:
    """A release-style directory: config.json, tokenizer files, safetensors (sharded + index when ``shard``)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, path / f.name)
    if shard:
        save_torch_state_dict(state, path, max_shard_size=shard)
    else:
        save_file(state, str(path / "model.safetensors"))
    return path


def reference_model(parts) -> LlavaMini:
    """Direct construction: the lm_mini model built from its own config, loaded part by part."""
    model = LlavaMini.from_config(tiny_config(projector={"name": "mlp2x_gelu"}).model)
    model.encoder.model.load_state_dict(parts["clip"].state_dict())
    model.llm.load_state_dict(parts["llm"].state_dict())
    model.compressor.load_state_dict(parts["compressor"].state_dict())
    model.projector.load_state_dict(parts["projector"].state_dict())
    for mine, theirs in zip(model.prefusion.layers, parts["prefusion"]):
        mine.load_state_dict(theirs.state_dict())
    return model.eval()


@pytest.mark.parametrize("tower", ["in-checkpoint", "clip-vision-dir", "full-clip-dir"])
def test_llava_mini_import_matches_direct_construction(official, tokenizer_dir, tmp_path, tower):
    parts, state, clip_dir = official
    if tower == "in-checkpoint":  # config from --vision-tower, which wins over the hub name in the config
        src = write_checkpoint(tmp_path / "release", state, official_config("openai/clip-vit-large-patch14-336"),
                               tokenizer_dir, shard="40KB")
        out = import_llava_mini(src, tmp_path / "out", vision_tower=clip_dir)
    else:  # no tower weights: config and weights from the local directory the config names
        state = {k: v for k, v in state.items() if ".vision_tower." not in k}
        tower_dir = clip_dir if tower == "clip-vision-dir" else parts["full_clip"]
        src = write_checkpoint(tmp_path / "release", state, official_config(str(tower_dir)), tokenizer_dir, shard="40KB")
        out = import_llava_mini(src, tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in card  # dropped on purpose, and said so
    assert ("text_model.embeddings.token_embedding.weight" in card) == (tower == "full-clip-dir")
    assert len(json.loads((src / WEIGHTS_INDEX).read_text())["weight_map"]) == len(state)
    assert len(list(src.glob("model-*.safetensors"))) > 1

    cfg = read_config(out)
    assert (cfg.model.compressor.grid, cfg.model.prefusion.depth, cfg.model.encoder.select_layer) == (2, 2, -2)
    # a Llama-3 tokenizer: the release's conv mode, prompted as official inference prompts it (two BOS)
    assert (cfg.data.template, cfg.data.aspect_mode, cfg.data.max_length) == ("llava_llama_3_1", "pad", 512)
    # trains as the release did: blank image for text-only samples, 8 frames a video, R²+1 views a frame,
    # token id 0 left out of pre-fusion, the input embedding table never updated
    assert (cfg.model.prefusion.text_only_blank_image, cfg.model.video_hires, cfg.data.train_video_frames) == (True, True, 8)
    assert (cfg.model.prefusion.skip_token_id_0, cfg.model.llm.train_input_embeddings) == (True, False)
    imported, reference = load_pretrained(out), reference_model(parts)
    batch = image_batch()
    with torch.no_grad():
        assert torch.equal(imported(batch).logits, reference(batch).logits)


@pytest.fixture(scope="module")
def hf_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(2)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), image_token_index=VOCAB - 1, image_seq_length=16,
                         text_config=LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}))
    return _jitter(LlavaForConditionalGeneration(config)).eval()


def _v4_names(src: Path) -> None:
    """Rewrite transformers 5 file names as transformers 4 wrote them (the hub's llava-1.5-*-hf)."""
    from lm_mini.interop.pretrained import read_safetensors

    state = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in read_safetensors(src).items()}
    for f in [*src.glob("model*.safetensors"), src / WEIGHTS_INDEX]:
        f.unlink()
    save_torch_state_dict(state, src, max_shard_size="40KB")


@pytest.mark.parametrize("names", ["transformers5-files", "transformers4-files", "module-names"])
def test_llava_hf_import_gives_llava_15_logits(hf_llava, tokenizer_dir, tmp_path, names):
    src = tmp_path / "llava-1.5-hf"
    if names == "module-names":
        write_checkpoint(src, dict(hf_llava.state_dict()), json.loads(hf_llava.config.to_json_string()), tokenizer_dir, shard="40KB")
    else:
        hf_llava.save_pretrained(src, max_shard_size="40KB")
        for f in tokenizer_dir.iterdir():
            shutil.copyfile(f, src / f.name)
        if names == "transformers4-files":
            _v4_names(src)
    assert (src / WEIGHTS_INDEX).is_file()
    out = import_llava_hf(src, tmp_path / "out")
    cfg = read_config(out)
    assert (cfg.model.compressor.name, cfg.model.prefusion.depth, cfg.data.aspect_mode) == ("identity", 0, "pad")

    ours, batch = load_pretrained(out), image_batch()
    # transformers' LLaVA: the image token repeated once per patch (16), then the same text
    text = batch["input_ids"][0, 2:]
    hf_ids = torch.cat([torch.tensor([1]), torch.full((16,), VOCAB - 1), text])[None]
    with torch.no_grad():
        theirs = hf_llava(input_ids=hf_ids, pixel_values=batch["pixel_values"], attention_mask=torch.ones_like(hf_ids)).logits
        mine = ours(batch).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def _mismatch(official, tokenizer_dir, tmp_path, edit) -> WeightsMismatch:
    parts, state, clip_dir = official
    state = dict(state)
    edit(state)
    src = write_checkpoint(tmp_path / "release", state, official_config(str(clip_dir)), tokenizer_dir)
    with pytest.raises(WeightsMismatch) as info:
        import_llava_mini(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for a checkpoint that does not fit
    return info.value


def test_renamed_tensor_is_named(official, tokenizer_dir, tmp_path):
    def edit(s):
        s["model.mm_projecter.0.weight"] = s.pop("model.mm_projector.0.weight")

    e = _mismatch(official, tokenizer_dir, tmp_path, edit)
    assert e.unexpected == ["model.mm_projecter.0.weight"]
    assert e.missing == ["model.mm_projector.0.weight (-> projector.0.weight)"]
    assert "model.mm_projecter.0.weight" in str(e) and "model.mm_projector.0.weight" in str(e)


def test_missing_tensor_is_named(official, tokenizer_dir, tmp_path):
    e = _mismatch(official, tokenizer_dir, tmp_path, lambda s: s.pop("model.prefusion_layers.1.mlp.up_proj.weight"))
    assert e.missing == ["model.prefusion_layers.1.mlp.up_proj.weight (-> prefusion.layers.1.mlp.up_proj.weight)"]
    assert not e.unexpected and not e.mismatched


def test_extra_tensors_are_named(official, tokenizer_dir, tmp_path):
    def edit(s):
        s["model.image_newline"] = torch.zeros(64)  # matched by the Llama rule, but no such tensor
        s["mystery_head.weight"] = torch.zeros(2)  # matched by no rule at all

    e = _mismatch(official, tokenizer_dir, tmp_path, edit)
    assert e.unexpected == ["model.image_newline", "mystery_head.weight"]
    assert not e.missing and not e.mismatched


def test_wrong_shape_is_named(official, tokenizer_dir, tmp_path):
    e = _mismatch(official, tokenizer_dir, tmp_path, lambda s: s.update({"model.compressor.query": torch.zeros(9, 32)}))
    assert e.mismatched == ["model.compressor.query: [9, 32] in the checkpoint, the model has [4, 32]"]


def test_all_problems_in_one_error(official, tokenizer_dir, tmp_path):
    def edit(s):
        s.pop("lm_head.weight")
        s["model.extra"] = torch.zeros(1)
        s["model.norm.weight"] = torch.zeros(3)

    e = _mismatch(official, tokenizer_dir, tmp_path, edit)
    assert (len(e.missing), len(e.unexpected), len(e.mismatched)) == (1, 1, 1)
    for name in ("lm_head.weight", "model.extra", "model.norm.weight"):
        assert name in str(e)


def test_cli_import_and_its_errors(official, tokenizer_dir, tmp_path, capsys):
    parts, state, clip_dir = official
    no_tower = {k: v for k, v in state.items() if ".vision_tower." not in k}
    hub = official_config("openai/clip-vit-large-patch14-336")
    src = write_checkpoint(tmp_path / "release", no_tower, hub, tokenizer_dir)
    # the config names a known hub tower (ViT-L, 1024 wide): it does not fit this checkpoint's projector
    assert main(["import", "llava-mini", str(src), "--out", str(tmp_path / "a")]) == 2
    assert "mm_hidden_size 32 but the vision tower is 1024 wide" in capsys.readouterr().err
    (src / "config.json").write_text(json.dumps({**hub, "mm_hidden_size": 1024}))
    assert main(["import", "llava-mini", str(src), "--out", str(tmp_path / "a")]) == 2
    assert "holds no vision tower weights" in capsys.readouterr().err
    (src / "config.json").write_text(json.dumps(hub))
    assert main(["import", "llava-mini", str(src), "--vision-tower", str(clip_dir), "--out", str(tmp_path / "b")]) == 0
    assert "imported llava-mini" in capsys.readouterr().out
    assert main(["import", "llava-mini", str(src), "--vision-tower", str(clip_dir), "--out", str(tmp_path / "b")]) == 2
    assert "already holds weights" in capsys.readouterr().err
    assert main(["import", "llava-hf", str(src)]) == 2  # a LLaVA-Mini config is not a LlavaForConditionalGeneration
    assert "model_type = 'llava_mini' is not supported" in capsys.readouterr().err
    assert main(["import", "llava-mini", str(src), "--vision-tower", str(clip_dir), "--template", "chatml", "--out", str(tmp_path / "c")]) == 2
    assert "unknown template 'chatml'" in capsys.readouterr().err
    assert main(["import", "llava-mini", str(tmp_path / "nowhere")]) == 2
    assert "no config.json" in capsys.readouterr().err
    for kind in ("llava-mini", "llava-hf"):  # its own output is not a release checkpoint to import
        assert main(["import", kind, str(tmp_path / "b"), "--out", str(tmp_path / "d")]) == 2
        assert "is already an lm_mini model directory" in capsys.readouterr().err


def test_release_config_matches_the_llama31_preset(tmp_path):
    """The LLaVA-Mini release's config.json (Llama-3.1-8B, ViT-L/14-336 by hub name) builds, on meta, the
    same tensors as the shipped preset experiments/models/llava_mini_llama31_8b.yaml."""
    from interop_helpers import ROOT

    from lm_mini.config import load_config
    from lm_mini.interop.importers import _vision_config, llava_mini_config
    from lm_mini.models.build import build_model

    release = {
        "architectures": ["LlavaMiniLlamaForCausalLM"], "model_type": "llava_mini", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "compressor_size": 1, "prefusion_layer_num": 4, "resolution_ratio": 1,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1024,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 2048, "mm_use_im_start_end": False,
    }
    imported = llava_mini_config(tmp_path, release, _vision_config(None, release["mm_vision_tower"]), "llama3")
    preset = load_config(ROOT / "experiments" / "models" / "llava_mini_llama31_8b.yaml")
    ours, theirs = build_model(imported.model, device="meta").state_dict(), build_model(preset.model, device="meta").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    rope = imported.model.llm.config.rope_parameters
    assert (rope["rope_type"], rope["rope_theta"], rope["factor"]) == ("llama3", 500000.0, 8.0)
