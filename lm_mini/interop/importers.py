"""``lm-mini import llava-mini|llava|llava-hf DIR``: released checkpoints -> an lm_mini model directory.

Three release layouts are read (local directories: ``config.json``, safetensors sharded with
``model.safetensors.index.json`` or in one file, tokenizer files):

- ``llava-mini``: the official LLaVA-Mini code (``LlavaMiniLlamaForCausalLM``). The config is a Llama
  config plus ``compressor_size``, ``prefusion_layer_num``, ``resolution_ratio``, ``mm_*`` fields; the
  vision tower's weights may be absent, then they come from a local CLIP directory (``--vision-tower``).
  The imported config trains as the release did (text-only samples fused with a blank image, 8 frames a
  training video, R²+1 views a frame at R > 1, token id 0 left out of pre-fusion, input embeddings not
  trained) and prompts it as official inference did (template ``llava_llama_3_1`` for a Llama-3 tokenizer).
- ``llava``: the original LLaVA-1.5 code (haotian-liu/LLaVA ``LlavaLlamaForCausalLM``, e.g.
  ``liuhaotian/llava-v1.5-7b``): a Llama under ``model.*`` / ``lm_head.*``, the projector under
  ``model.mm_projector.*``, the CLIP tower under ``model.vision_tower.vision_tower.*`` when it was saved
  (its released checkpoints leave it out and name a hub CLIP in ``mm_vision_tower``: ``--vision-tower DIR``).
- ``llava-hf``: LLaVA-1.5 as ``transformers.LlavaForConditionalGeneration`` (file names of transformers
  4 and 5 alike).

Both LLaVA-1.5 layouts become an ``identity`` compressor with pre-fusion off: exactly LLaVA-1.5.

Tensor names are translated by one table per layout (:class:`KeyMap`, data) and one function
(:func:`rename`). Every tensor is accounted for: a key no rule matches, a tensor the model lacks or
does not have, and a wrong shape are all listed by name in one :class:`WeightsMismatch`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from lm_mini.interop.pretrained import (PathLike, check_weights, floating_dtype, model_summary, read_safetensors,
                                        save_pretrained, tied_aliases)
from lm_mini.models.build import build_model

# Buffers some checkpoints carry that the model recomputes from its config (old transformers saved them).
DERIVED = (".rotary_emb.inv_freq", ".embeddings.position_ids")


@dataclass(frozen=True)
class KeyMap:
    """How a release layout names lm_mini's tensors: ordered ``(source prefix, lm_mini prefix)`` rules.

    The first rule whose source prefix starts a key renames it. A target of ``None`` drops the tensor on
    purpose (a full CLIP's text tower); keys ending in one of ``derived`` are recomputed buffers, also
    dropped. A key that no rule matches is unexpected.
    """

    name: str
    rules: Tuple[Tuple[str, Optional[str]], ...]
    derived: Tuple[str, ...] = DERIVED

    def source_name(self, key: str) -> str:
        """The name a checkpoint of this layout gives lm_mini's ``key`` (first matching rule)."""
        for src, dst in self.rules:
            if dst is not None and key.startswith(dst):
                return src + key[len(dst):]
        return key


LLAVA_MINI = KeyMap("llava-mini", (
    ("model.vision_tower.vision_tower.vision_model.", "encoder.model."),
    ("model.mm_projector.", "projector."),
    ("model.compressor.", "compressor."),
    ("model.prefusion_layers.", "prefusion.layers."),
    ("model.", "llm.model."),  # the Llama itself: layers, embed_tokens, norm
    ("lm_head.", "llm.lm_head."),
))

# The original LLaVA-1.5 code (haotian-liu/LLaVA): LlavaLlamaForCausalLM = LlavaLlamaModel (a LlamaModel with
# .vision_tower: CLIPVisionTower wrapping a CLIPVisionModel as .vision_tower, and .mm_projector) + lm_head.
LLAVA_15 = KeyMap("llava", (
    ("model.vision_tower.vision_tower.vision_model.", "encoder.model."),
    ("model.mm_projector.", "projector."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
))

LLAVA_HF = KeyMap("llava-hf", (
    ("vision_tower.vision_model.", "encoder.model."),  # files written by transformers 4 (the hub's llava-1.5-*-hf)
    ("vision_tower.", "encoder.model."),  # files written by transformers 5
    ("model.vision_tower.", "encoder.model."),  # transformers 5 module names
    ("multi_modal_projector.linear_1.", "projector.0."),
    ("multi_modal_projector.linear_2.", "projector.2."),
    ("model.multi_modal_projector.linear_1.", "projector.0."),
    ("model.multi_modal_projector.linear_2.", "projector.2."),
    ("language_model.model.", "llm.model."),
    ("language_model.lm_head.", "llm.lm_head."),
    ("model.language_model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
))

# A separate vision tower directory: a CLIPVisionModel, or a full CLIPModel whose text half is not used.
CLIP_VISION = KeyMap("clip", (
    ("vision_model.", "encoder.model."),
    ("text_model.", None), ("text_projection.", None), ("visual_projection.", None), ("logit_scale", None),
    ("", "encoder.model."),  # CLIPVisionModel written by transformers 5 (no vision_model. prefix)
))


@dataclass
class Renamed:
    state: Dict[str, torch.Tensor]  # lm_mini name -> tensor
    origin: Dict[str, str]  # lm_mini name -> name in the checkpoint
    unmatched: List[str]  # checkpoint names no rule matches
    dropped: List[str]  # derived buffers and deliberately unused tensors


def rename(state: Mapping[str, torch.Tensor], keymap: KeyMap, where: str = "") -> Renamed:
    """Apply a :class:`KeyMap`; two checkpoint tensors landing on one lm_mini name is an error."""
    out = Renamed({}, {}, [], [])
    for key, tensor in state.items():
        if key.endswith(keymap.derived):
            out.dropped.append(key)
            continue
        rule = next(((s, d) for s, d in keymap.rules if key.startswith(s)), None)
        if rule is None:
            out.unmatched.append(f"{where}{key}")
        elif rule[1] is None:
            out.dropped.append(key)
        else:
            new = rule[1] + key[len(rule[0]):]
            if new in out.state:
                raise ValueError(f"{where}{key} and {out.origin[new]} are both {keymap.name} names of {new}")
            out.state[new], out.origin[new] = tensor, f"{where}{key}"
    return out


# --------------------------------------------------------------------------- configs
# Keys of a Hugging Face config.to_dict() that describe a saved file, not the architecture.
_NOISE = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "id2label", "label2id",
          "problem_type", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
          "is_encoder_decoder"}
# Official LLaVA-Mini vision towers by hub name -> CLIPVisionConfig fields (used when no local directory is given).
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                              num_hidden_layers=24, num_attention_heads=16, hidden_act="quick_gelu",
                                              layer_norm_eps=1e-5, projection_dim=768),
}
_VISION_FAMILIES = {"clip_vision_model": "hf_clip", "siglip_vision_model": "hf_siglip"}
# model_type of LLaVA-Mini configs (the code's versions and forks differ); all wrap a Llama
LLAVA_MINI_MODEL_TYPES = ("llava_mini", "llava_mini_llama", "llava_llama", "llama")


def read_config_json(src: Path) -> Dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a checkpoint directory)")
    return json.loads(path.read_text())


def hf_config_dict(config: Any, keep_model_type: bool) -> Dict[str, Any]:
    """A transformers config as the plain kwargs lm_mini's YAML stores (``model.llm.config`` / ``encoder.config``)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _NOISE}
    if not keep_model_type:
        d.pop("model_type", None)
    return d


def _vision_config(tower_dir: Optional[Path], name: Optional[str]):
    """The CLIP vision config: from a local directory, else from the table of known towers."""
    from transformers import CLIPVisionConfig

    if tower_dir is not None:
        return CLIPVisionConfig.from_pretrained(str(tower_dir))
    if name in KNOWN_VISION_TOWERS:
        return CLIPVisionConfig(**KNOWN_VISION_TOWERS[name])
    raise ValueError(f"vision tower '{name}' is neither a local directory nor one of {', '.join(KNOWN_VISION_TOWERS)}; "
                     "pass --vision-tower DIR (a local CLIP checkpoint)")


def _template(tokenizer_dir: Path, explicit: Optional[str], fallback: str, llama3: str = "llama3") -> str:
    """``--template``, else ``llama3`` (the layout's Llama-3 template) for a Llama-3 tokenizer (it has
    ``<|eot_id|>``), else ``fallback``."""
    from lm_mini.registry import TEMPLATES

    if explicit:
        if explicit not in TEMPLATES:
            raise ValueError(f"unknown template '{explicit}'; known: {', '.join(TEMPLATES.names())}")
        return explicit
    texts = [(tokenizer_dir / n).read_text(errors="ignore") for n in ("tokenizer_config.json", "tokenizer.json")
             if (tokenizer_dir / n).is_file()]
    return llama3 if any("<|eot_id|>" in t for t in texts) else fallback


def _refuse(src: Path, field: str, value: Any, why: str) -> None:
    raise ValueError(f"{src}/config.json: {field} = {value!r} is not supported ({why})")


def llava_mini_config(src: Path, raw: Dict[str, Any], vision: Any, template: str) -> DictConfig:
    """The lm_mini config of an official LLaVA-Mini checkpoint's ``config.json``."""
    from lm_mini.config import load_config

    aspect = _check_llava_fields(src, raw, vision, ("patch",))  # the compressor reads patch tokens only
    if raw.get("model_type", "llava_mini") not in LLAVA_MINI_MODEL_TYPES:
        _refuse(src, "model_type", raw.get("model_type"), "LLaVA-Mini's pre-fusion layers are Llama layers")
    model = {
        "encoder": {"name": "hf_clip", "config": hf_config_dict(vision, keep_model_type=False), "path": None,
                    "select_layer": raw.get("mm_vision_select_layer", -2), "select_feature": "patch"},
        "projector": {"name": raw.get("mm_projector_type", "linear")},
        "compressor": {"name": "query_attention", "grid": raw["compressor_size"]},
        # official training (llavamini/train/train.py): text-only samples get a blank image, frames R²+1 views;
        # official encode_images_mini leaves token id 0 out of pre-fusion and detaches every text embedding
        "prefusion": {"depth": raw.get("prefusion_layer_num", 4), "init": "random", "text_only_blank_image": True,
                      "skip_token_id_0": True},
        "llm": {"name": "hf_causal_lm", "config": _llama_fields(raw), "path": None, "train_input_embeddings": False},
        "resolution_ratio": raw.get("resolution_ratio", 1),
        "video_hires": True,
    }
    # official training samples 8 frames a video (load_video_org(num_frm=8)); inference 1 fps (data.video_fps)
    data = {"template": template, "aspect_mode": aspect, "train_video_frames": 8}
    if raw.get("tokenizer_model_max_length"):
        data["max_length"] = raw["tokenizer_model_max_length"]
    return OmegaConf.merge(load_config(), {"experiment": "imported", "model": model, "data": data})


def _check_llava_fields(src: Path, raw: Dict[str, Any], vision: Any, select_features: Tuple[str, ...]) -> str:
    """The ``mm_*`` fields LLaVA-1.5 and LLaVA-Mini configs share, refused unless lm_mini computes what they say.
    Returns ``data.aspect_mode``: ``pad`` for ``pad``, else ``square`` (official ``process_images`` gives every
    other ``image_aspect_ratio`` the CLIP processor's shortest-edge resize and centre crop)."""
    if raw.get("mm_use_im_start_end"):
        _refuse(src, "mm_use_im_start_end", True, "no <im_start>/<im_end> tokens around the image here")
    if "unpad" in str(raw.get("mm_patch_merge_type", "flat")):
        _refuse(src, "mm_patch_merge_type", raw["mm_patch_merge_type"], "only 'flat'")
    if raw.get("mm_projector_type", "linear") not in ("mlp2x_gelu", "linear"):
        _refuse(src, "mm_projector_type", raw["mm_projector_type"], "mlp2x_gelu or linear")
    if raw.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ValueError(f"{src}/config.json: mm_hidden_size {raw['mm_hidden_size']} but the vision tower is "
                         f"{vision.hidden_size} wide; is --vision-tower the right model?")
    aspect = raw.get("image_aspect_ratio") or "square"
    if aspect not in ("pad", "square", "resize"):
        _refuse(src, "image_aspect_ratio", aspect, "pad or square")
    select = raw.get("mm_vision_select_feature", "patch")
    if select not in select_features:
        _refuse(src, "mm_vision_select_feature", select, " or ".join(select_features))
    return "pad" if aspect == "pad" else "square"


def _llama_fields(raw: Dict[str, Any]) -> Dict[str, Any]:
    """The Llama config inside a LLaVA(-Mini) ``config.json`` (its ``mm_*`` and other extra fields dropped)."""
    from transformers import LlamaConfig

    llm_fields = {k: v for k, v in raw.items() if not k.startswith("mm_") and k != "model_type"}
    llm = hf_config_dict(LlamaConfig(**llm_fields), keep_model_type=True)
    return {k: v for k, v in llm.items() if k in LlamaConfig().to_dict()}


def llava_15_config(src: Path, raw: Dict[str, Any], vision: Any, template: str) -> DictConfig:
    """The lm_mini config of an original LLaVA-1.5 checkpoint's ``config.json`` (``LlavaLlamaForCausalLM``):
    all patch tokens (identity compressor), no pre-fusion, ``cls_patch`` kept when the checkpoint selects it."""
    from lm_mini.config import load_config

    if raw.get("model_type", "llava") not in ("llava", "llava_llama", "llama"):
        _refuse(src, "model_type", raw.get("model_type"), "LLaVA-1.5's LlavaLlamaForCausalLM wraps a Llama")
    aspect = _check_llava_fields(src, raw, vision, ("patch", "cls_patch"))
    model = {
        "encoder": {"name": "hf_clip", "config": hf_config_dict(vision, keep_model_type=False), "path": None,
                    "select_layer": raw.get("mm_vision_select_layer", -2),
                    "select_feature": raw.get("mm_vision_select_feature", "patch")},
        "projector": {"name": raw.get("mm_projector_type", "linear")},
        "compressor": {"name": "identity", "grid": vision.image_size // vision.patch_size},
        "prefusion": {"depth": 0},
        "llm": {"name": "hf_causal_lm", "config": _llama_fields(raw), "path": None},
        "resolution_ratio": 1,
    }
    data = {"template": template, "aspect_mode": aspect}
    if raw.get("tokenizer_model_max_length"):
        data["max_length"] = raw["tokenizer_model_max_length"]
    return OmegaConf.merge(load_config(), {"experiment": "imported", "model": model, "data": data})


def llava_hf_config(src: Path, template: str) -> DictConfig:
    """The lm_mini config of a ``LlavaForConditionalGeneration`` checkpoint: identity compressor, no pre-fusion."""
    from transformers import LlavaConfig

    from lm_mini.config import load_config

    raw = read_config_json(src)
    if raw.get("model_type") != "llava":
        _refuse(src, "model_type", raw.get("model_type"), "llava-hf reads LlavaForConditionalGeneration checkpoints")
    hf = LlavaConfig.from_pretrained(str(src))
    if not isinstance(hf.vision_feature_layer, int):
        _refuse(src, "vision_feature_layer", hf.vision_feature_layer, "one layer")
    if hf.vision_feature_select_strategy != "default":
        _refuse(src, "vision_feature_select_strategy", hf.vision_feature_select_strategy, "'default' (patch tokens)")
    if hf.projector_hidden_act != "gelu" or not getattr(hf, "multimodal_projector_bias", True):
        _refuse(src, "projector_hidden_act", hf.projector_hidden_act, "LLaVA-1.5's Linear-GELU-Linear with biases")
    family = _VISION_FAMILIES.get(hf.vision_config.model_type)
    if family is None:
        _refuse(src, "vision_config.model_type", hf.vision_config.model_type, ", ".join(_VISION_FAMILIES))
    grid = hf.vision_config.image_size // hf.vision_config.patch_size
    model = {
        "encoder": {"name": family, "config": hf_config_dict(hf.vision_config, keep_model_type=False), "path": None,
                    "select_layer": hf.vision_feature_layer, "select_feature": "patch"},
        "projector": {"name": "mlp2x_gelu"},
        "compressor": {"name": "identity", "grid": grid},
        "prefusion": {"depth": 0},
        "llm": {"name": "hf_causal_lm", "config": hf_config_dict(hf.text_config, keep_model_type=True), "path": None},
        "resolution_ratio": 1,
    }
    return OmegaConf.merge(load_config(), {"experiment": "imported", "model": model,
                                           "data": {"template": template, "aspect_mode": "pad"}})


# --------------------------------------------------------------------------- import
def _card(keymap: KeyMap, src: Path, cfg: DictConfig, renamed: Renamed) -> str:
    summary = "\n".join(f"- {k}: {v}" for k, v in model_summary(cfg).items())
    dropped = "".join(f"- `{k}`\n" for k in sorted(renamed.dropped)) or "- none\n"
    return (f"---\nlibrary_name: lm_mini\ntags: [llava-mini, multimodal]\n---\n# {src.name} (imported)\n\n"
            f"Imported with `lm-mini import {keymap.name} {src}`: {len(renamed.state)} tensors, lm_mini names.\n\n{summary}\n\n"
            f"Not imported (buffers the model recomputes, unused towers):\n{dropped}\n"
            f"Use: `lm-mini generate DIR --image FILE --prompt TEXT`, or `lm_mini.interop.load_pretrained(DIR)`.\n\n"
            f"## Config\n\n```yaml\n{OmegaConf.to_yaml(cfg)}```\n")


def _finish(keymap: KeyMap, src: Path, out: Path, cfg: DictConfig, renamed: Renamed, max_shard_size: Any) -> Path:
    """Check every tensor against the model the config builds (on meta: no memory), then write ``out``."""
    dtype = floating_dtype(renamed.state)
    if dtype in ("float32", "bfloat16", "float16"):
        cfg.model.dtype = dtype  # build in the checkpoint's precision
    model = build_model(cfg.model, device="meta")
    check_weights(renamed.state, model.state_dict(), str(src), lambda k: renamed.origin.get(k) or keymap.source_name(k),
                  tied_aliases(model), renamed.unmatched)
    return save_pretrained(out, renamed.state, cfg, src, _card(keymap, src, cfg, renamed), max_shard_size)


def _refuse_lm_mini_dir(src: Path, raw: dict) -> None:
    if raw.get("library_name") == "lm_mini":
        raise ValueError(f"{src} is already an lm_mini model directory (written by lm-mini export/import): "
                         "eval, generate, chat, analyze and train.init_from take it as it is")


def import_llava_mini(src: PathLike, out: PathLike, vision_tower: Optional[PathLike] = None,
                      template: Optional[str] = None, max_shard_size: Any = "5GB") -> Path:
    """An official LLaVA-Mini checkpoint directory -> lm_mini model directory ``out``.

    The vision tower's config comes from ``vision_tower`` (a local CLIP directory), else from
    ``mm_vision_tower`` when that is a local directory or a known hub name. Its weights come from the
    checkpoint, or, when the checkpoint has none, from ``vision_tower``.
    """
    src = Path(src)
    raw = read_config_json(src)
    _refuse_lm_mini_dir(src, raw)
    if "compressor_size" not in raw:
        raise ValueError(f"{src}/config.json has no compressor_size: not a LLaVA-Mini checkpoint "
                         "(an original LLaVA-1.5: lm-mini import llava; transformers' LLaVA: llava-hf)")
    tower = _tower_dir(vision_tower, raw.get("mm_vision_tower"))
    # a Llama-3 tokenizer: the release's conv mode llava_llama_3_1 (two BOS in generation prompts, as official eval)
    cfg = llava_mini_config(src, raw, _vision_config(tower, raw.get("mm_vision_tower")),
                            _template(src, template, "vicuna_v1", llama3="llava_llama_3_1"))
    return _finish(LLAVA_MINI, src, Path(out), cfg, _with_tower(rename(read_safetensors(src), LLAVA_MINI), LLAVA_MINI, src, tower),
                   max_shard_size)


def import_llava(src: PathLike, out: PathLike, vision_tower: Optional[PathLike] = None,
                 template: Optional[str] = None, max_shard_size: Any = "5GB") -> Path:
    """An original LLaVA-1.5 checkpoint directory (haotian-liu/LLaVA ``LlavaLlamaForCausalLM``) -> ``out``.

    The CLIP tower as for :func:`import_llava_mini`: its config from ``vision_tower`` or ``mm_vision_tower``
    (a local directory or a known hub name), its weights from the checkpoint (``model.vision_tower.*``) or
    from ``vision_tower``. Released LLaVA-1.5 weights are pickled ``.bin`` files: convert them to
    safetensors first (the message says so).
    """
    src = Path(src)
    raw = read_config_json(src)
    _refuse_lm_mini_dir(src, raw)
    if "compressor_size" in raw:
        raise ValueError(f"{src}/config.json has compressor_size: a LLaVA-Mini checkpoint (lm-mini import llava-mini)")
    if "text_config" in raw or "LlavaForConditionalGeneration" in (raw.get("architectures") or []):
        raise ValueError(f"{src} is transformers' LlavaForConditionalGeneration (lm-mini import llava-hf)")
    if "mm_vision_tower" not in raw and "mm_hidden_size" not in raw:
        raise ValueError(f"{src}/config.json has no mm_vision_tower / mm_hidden_size: not a LLaVA checkpoint")
    tower = _tower_dir(vision_tower, raw.get("mm_vision_tower"))
    cfg = llava_15_config(src, raw, _vision_config(tower, raw.get("mm_vision_tower")), _template(src, template, "vicuna_v1"))
    return _finish(LLAVA_15, src, Path(out), cfg, _with_tower(rename(read_safetensors(src), LLAVA_15), LLAVA_15, src, tower),
                   max_shard_size)


def _tower_dir(vision_tower: Optional[PathLike], name: Optional[str]) -> Optional[Path]:
    """``--vision-tower``, else ``mm_vision_tower`` when it is a local directory."""
    tower = Path(vision_tower) if vision_tower else (Path(name) if name and Path(name).is_dir() else None)
    if tower is not None and not tower.is_dir():
        raise FileNotFoundError(f"--vision-tower {tower}: no such directory")
    return tower


def _with_tower(renamed: Renamed, keymap: KeyMap, src: Path, tower: Optional[Path]) -> Renamed:
    """The checkpoint's tensors plus, when it holds no vision tower, the CLIP weights of ``tower``."""
    if any(k.startswith("encoder.") for k in renamed.state):
        return renamed
    if tower is None:
        raise ValueError(f"{src} holds no vision tower weights ({keymap.rules[0][0]}*); "
                         "pass --vision-tower DIR, a local CLIP checkpoint")
    clip = rename(read_safetensors(tower), CLIP_VISION, where=f"{tower}:")
    return Renamed({**renamed.state, **clip.state}, {**renamed.origin, **clip.origin},
                   renamed.unmatched + clip.unmatched, renamed.dropped + clip.dropped)


def import_llava_hf(src: PathLike, out: PathLike, template: Optional[str] = None, max_shard_size: Any = "5GB") -> Path:
    """A ``LlavaForConditionalGeneration`` checkpoint directory (LLaVA-1.5) -> lm_mini model directory ``out``."""
    src = Path(src)
    raw = read_config_json(src)
    _refuse_lm_mini_dir(src, raw)
    if "mm_vision_tower" in raw and "text_config" not in raw and "compressor_size" not in raw:
        raise ValueError(f"{src}/config.json has mm_vision_tower: the original LLaVA layout (lm-mini import llava)")
    cfg = llava_hf_config(src, _template(src, template, "vicuna_v1"))
    return _finish(LLAVA_HF, src, Path(out), cfg, rename(read_safetensors(src), LLAVA_HF), max_shard_size)
