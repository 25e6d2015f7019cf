"""``lm-mini import llava``: the original LLaVA-1.5 layout (haotian-liu/LLaVA ``LlavaLlamaForCausalLM``).

The checkpoint is written here from real modules under the names the original code gives them
(llava/model/language_model/llava_llama.py, llava_arch.py, multimodal_encoder/clip_encoder.py): the Llama as
``model.*`` + ``lm_head.*``, ``model.mm_projector.{0,2}.*`` (``nn.Sequential`` of ``build_vision_projector``),
the CLIP tower as ``model.vision_tower.vision_tower.vision_model.*`` (``CLIPVisionTower.vision_tower`` is a
``CLIPVisionModel``) when saved, else a separate CLIP directory as its released checkpoints need.
"""
from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import CLIP, LLAMA, image_batch, tiny_config
from test_import import _jitter, write_checkpoint
from torch import nn

from lm_mini.cli import main
from lm_mini.interop.importers import import_llava, import_llava_hf, import_llava_mini
from lm_mini.interop.pretrained import WeightsMismatch, load_pretrained, read_config
from lm_mini.models.llava_mini import LlavaMini


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    llama = _jitter(LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})))
    clip = _jitter(CLIPVisionModel(CLIPVisionConfig(**CLIP)))
    projector = _jitter(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64)))
    state = dict(llama.state_dict())
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    state["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # saved by old transformers; recomputed
    tower = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in clip.state_dict().items()}
    clip_dir = tmp_path_factory.mktemp("clip")
    clip.save_pretrained(clip_dir)
    parts = {"llm": llama, "clip": clip, "projector": projector}
    return parts, {k: v.detach().clone() for k, v in state.items()}, {k: v.detach().clone() for k, v in tower.items()}, clip_dir


def llava15_config(vision_tower: str, select_feature: str = "patch") -> dict:
    """config.json of liuhaotian/llava-v1.5-7b's kind (its fields, tiny sizes)."""
    return {**{k: v for k, v in LLAMA.items() if k != "model_type"}, "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava", "torch_dtype": "float32", "mm_vision_tower": vision_tower, "mm_hidden_size": 32,
            "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": select_feature,
            "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
            "mm_patch_merge_type": "flat", "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
            "use_mm_proj": True, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right"}


def direct(parts, select_feature: str) -> LlavaMini:
    """LLaVA-1.5 built from lm_mini's own config (identity compressor, no pre-fusion), loaded part by part."""
    cfg = tiny_config("vicuna_v1", compressor={"name": "identity", "grid": 4}, prefusion={"depth": 0},
                      projector={"name": "mlp2x_gelu"}, encoder={"name": "hf_clip", "config": CLIP,
                                                                 "select_feature": select_feature})
    model = LlavaMini.from_config(cfg.model)
    model.encoder.model.load_state_dict(parts["clip"].state_dict())
    model.llm.load_state_dict(parts["llm"].state_dict())
    model.projector.load_state_dict(parts["projector"].state_dict())
    return model.eval()


@pytest.mark.parametrize("tower, select", [("in-checkpoint", "patch"), ("clip-dir", "patch"), ("clip-dir", "cls_patch")])
def test_llava15_import_matches_direct_construction(llava15, tokenizer_dir, tmp_path, tower, select):
    parts, state, tower_state, clip_dir = llava15
    if tower == "in-checkpoint":  # the tower's config from --vision-tower, its weights from the checkpoint
        src = write_checkpoint(tmp_path / "llava-v1.5", {**state, **tower_state},
                               llava15_config("openai/clip-vit-large-patch14-336", select), tokenizer_dir, shard="60KB")
        out = import_llava(src, tmp_path / "out", vision_tower=clip_dir)
    else:  # as released: no tower weights, mm_vision_tower names a (here: local) CLIP
        src = write_checkpoint(tmp_path / "llava-v1.5", state, llava15_config(str(clip_dir), select), tokenizer_dir)
        out = import_llava(src, tmp_path / "out")
    cfg = read_config(out)
    assert (cfg.model.compressor.name, cfg.model.prefusion.depth, cfg.model.encoder.select_feature) == ("identity", 0, select)
    assert (cfg.data.aspect_mode, cfg.data.max_length, cfg.model.dtype) == ("pad", 2048, "float32")
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" in (out / "README.md").read_text()  # dropped, and said so
    batch = image_batch(seed=6)
    with torch.no_grad():
        assert torch.equal(load_pretrained(out)(batch).logits, direct(parts, select)(batch).logits)


def _mismatch(llava15, tokenizer_dir, tmp_path, edit) -> WeightsMismatch:
    parts, state, tower_state, clip_dir = llava15
    state = {**state, **tower_state}
    edit(state)
    src = write_checkpoint(tmp_path / "llava-v1.5", state, llava15_config(str(clip_dir)), tokenizer_dir)
    with pytest.raises(WeightsMismatch) as info:
        import_llava(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return info.value


def test_renamed_missing_and_extra_tensors_are_named(llava15, tokenizer_dir, tmp_path):
    def renamed(s):
        s["model.mm_projecter.2.bias"] = s.pop("model.mm_projector.2.bias")

    e = _mismatch(llava15, tokenizer_dir, tmp_path / "a", renamed)
    assert e.unexpected == ["model.mm_projecter.2.bias"] and e.missing == ["model.mm_projector.2.bias (-> projector.2.bias)"]

    e = _mismatch(llava15, tokenizer_dir, tmp_path / "b", lambda s: s.pop("model.vision_tower.vision_tower.vision_model.post_layernorm.weight"))
    assert e.missing == ["model.vision_tower.vision_tower.vision_model.post_layernorm.weight (-> encoder.model.post_layernorm.weight)"]

    def extra(s):
        s["model.image_newline"] = torch.zeros(64)  # LLaVA-1.6's, matched by the Llama rule, not in LLaVA-1.5
        s["model.compressor.query"] = torch.zeros(1, 32)  # a LLaVA-Mini tensor
        s["vision_resampler.weight"] = torch.zeros(2)  # matched by no rule

    e = _mismatch(llava15, tokenizer_dir, tmp_path / "c", extra)
    assert e.unexpected == ["model.compressor.query", "model.image_newline", "vision_resampler.weight"]
    assert not e.missing and not e.mismatched

    e = _mismatch(llava15, tokenizer_dir, tmp_path / "d", lambda s: s.update({"lm_head.weight": torch.zeros(7, 64)}))
    assert e.mismatched == ["lm_head.weight: [7, 64] in the checkpoint, the model has [300, 64]"]


def test_layouts_are_told_apart_and_cli(llava15, tokenizer_dir, tmp_path, capsys):
    parts, state, tower_state, clip_dir = llava15
    hub = llava15_config("openai/clip-vit-large-patch14-336")
    src = write_checkpoint(tmp_path / "llava-v1.5", state, {**hub, "mm_hidden_size": 1024}, tokenizer_dir)
    with pytest.raises(ValueError, match="holds no vision tower weights"):  # released LLaVA-1.5: no tower inside
        import_llava(src, tmp_path / "x")
    with pytest.raises(ValueError, match="import llava\\)"):
        import_llava_hf(src, tmp_path / "x")
    with pytest.raises(ValueError, match="import llava, transformers' LLaVA: llava-hf|not a LLaVA-Mini checkpoint"):
        import_llava_mini(src, tmp_path / "x", vision_tower=clip_dir)
    (src / "config.json").write_text(json.dumps({**hub, "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres"}))
    with pytest.raises(ValueError, match="mm_patch_merge_type = 'spatial_unpad' is not supported"):  # LLaVA-1.6
        import_llava(src, tmp_path / "x", vision_tower=clip_dir)
    (src / "config.json").write_text(json.dumps(hub))
    assert main(["import", "llava", str(src), "--vision-tower", str(clip_dir), "--out", str(tmp_path / "ok")]) == 0
    assert "imported llava checkpoint" in capsys.readouterr().out
    assert main(["import", "llava", str(src), "--out", str(tmp_path / "no")]) == 2
    assert "mm_hidden_size 32 but the vision tower is 1024 wide" in capsys.readouterr().err
