"""Vision encoders: pixels [B, 3, H, W] -> patch features [B, N, D] from one hidden layer.

Registry entries (``ENCODERS``) are called with the fields of ``EncoderConfig`` as keywords:
``ENCODERS.create(name, config=..., path=..., select_layer=..., select_feature=...)``, plus
``attn_implementation=`` (``model.attn_implementation``) for the entries that take it: the Hugging
Face towers use it as is (their attention calls transformers' registry); timm switches its blocks
between SDPA (``sdpa`` and the CUDA backends, whose kernels torch's SDPA picks itself) and ``eager``.

- ``hf_clip``: ``transformers.CLIPVisionModel`` (LLaVA / LLaVA-Mini: CLIP ViT-L/14-336, layer -2, CLS dropped).
- ``hf_siglip``: ``transformers.SiglipVisionModel`` (no CLS token).
- ``timm``: any timm ViT-like model with ``forward_intermediates``; prefix tokens dropped.

``select_layer`` follows the Hugging Face ``hidden_states`` convention for every family:
index 0 is the patch embedding, index k the output of block k, -1 the last block, -2 the one
before (LLaVA's choice).
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lm_mini.registry import ENCODERS

log = logging.getLogger(__name__)

# transformers.utils.constants, copied so that the data pipeline needs no transformers import
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP


def plain(mapping: Any) -> Dict[str, Any]:
    """A YAML mapping (OmegaConf node or dict, possibly nested) as a plain dict for transformers/timm."""
    if mapping is None:
        return {}
    if isinstance(mapping, DictConfig):
        return OmegaConf.to_container(mapping, resolve=True)
    return dict(mapping)


def check_local_path(path: Optional[str], key: str) -> Optional[str]:
    """Refuse a ``path`` that is written as a local path (absolute, ``./``, ``../``, ``~``) but does not exist.

    Anything else (``org/name``) may still be a Hugging Face hub id served from the local cache.
    """
    if not path:
        return path
    p = Path(path).expanduser()
    looks_local = p.is_absolute() or str(path).startswith((".", "~"))
    if looks_local and not p.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist (expected a local weights directory or file)")
    return str(p) if looks_local else path


def building_on_meta() -> bool:
    """True inside ``with torch.device("meta")``: build from configs, never read weights."""
    return torch.empty(0).device.type == "meta"


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB ``[..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel, on ``pixels``' device.

    The data loader hands pixels over as uint8 (4x less memory and worker-to-trainer traffic than
    float32, which matters for long videos); the model normalises them where it runs.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return pixels.float().mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)


def views_per_image(resolution_ratio: int) -> int:
    """How many encoder views one image becomes: the global view, plus R*R crops at ``resolution_ratio`` R > 1
    (official LLaVA-Mini's high resolution). The loader makes them, the model reads them in groups of this size."""
    return 1 + resolution_ratio * resolution_ratio if resolution_ratio > 1 else 1


def hf_block_stack(model: nn.Module) -> Optional[nn.Module]:
    """A transformers model's stack of repeated layers: the container whose children are all of a class the model
    names in ``_no_split_modules`` (what accelerate's device maps and FSDP's auto-wrap policy go by). Children
    wrapped for activation checkpointing count as what they wrap. None when the model names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0 and all(
                type(getattr(c, "_checkpoint_wrapped_module", c)).__name__ in names for c in module):
            return module
    return None


class VisionEncoder(nn.Module):
    """Base class: ``forward(pixels [B,3,H,W]) -> [B, N, D]`` plus the facts the rest of the model needs.

    Attributes: ``hidden_size`` (D), ``grid`` (patches per side, N = grid**2 for ``patch``),
    ``image_size`` (H = W), ``image_mean`` / ``image_std`` (per-channel normalisation), ``blocks`` (the
    transformer blocks, in order: FSDP's units and what activation checkpointing recomputes; None: the encoder
    is sharded and recomputed as one piece).
    """

    @property
    def blocks(self) -> Optional[nn.Module]:
        return None

    hidden_size: int
    grid: int
    image_size: int
    image_mean: Tuple[float, float, float]
    image_std: Tuple[float, float, float]
    num_prefix_tokens: int = 0  # tokens before the patch grid in the output (CLS kept by ``cls_patch``)


# --------------------------------------------------------------------------- Hugging Face
_HF_FAMILIES = {
    # name: (config class, model class, default mean, default std)
    "hf_clip": ("CLIPVisionConfig", "CLIPVisionModel", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "hf_siglip": ("SiglipVisionConfig", "SiglipVisionModel", HALF, HALF),
}


def _hf_vision_config(family: str, config: Mapping[str, Any], path: Optional[str]):
    import transformers

    config_cls = getattr(transformers, _HF_FAMILIES[family][0])
    # from_pretrained on a full CLIP/SigLIP checkpoint picks out its vision_config
    return config_cls.from_pretrained(path) if path else config_cls(**dict(config))


def _normalisation(family: str, path: Optional[str]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Mean/std from a local ``preprocessor_config.json`` when there is one, else the family's defaults."""
    mean, std = _HF_FAMILIES[family][2:]
    pre = Path(path) / "preprocessor_config.json" if path else None
    if pre is not None and pre.is_file():
        data = json.loads(pre.read_text())
        mean, std = tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
    return tuple(mean), tuple(std)


class HFVisionEncoder(VisionEncoder):
    """A transformers vision tower; features = ``hidden_states[select_layer]`` minus CLS for ``patch``."""

    def __init__(self, family: str, config: Mapping[str, Any], path: Optional[str], select_layer: int, select_feature: str,
                 attn_implementation: str = "sdpa"):
        super().__init__()
        import transformers

        from lm_mini.models.attention import register_backends

        register_backends()

        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"encoder select_feature must be 'patch' or 'cls_patch', got '{select_feature}'")
        model_cls = getattr(transformers, _HF_FAMILIES[family][1])
        path = check_local_path(path, "model.encoder.path")
        vcfg = _hf_vision_config(family, config, path)
        if path and not building_on_meta():
            self.model = model_cls.from_pretrained(path, attn_implementation=attn_implementation)
        else:
            vcfg._attn_implementation = attn_implementation
            self.model = model_cls(vcfg)
        n_layers = vcfg.num_hidden_layers  # hidden_states has n_layers + 1 entries (0: patch embedding)
        if not -(n_layers + 1) <= select_layer <= n_layers:
            raise ValueError(f"{family} encoder: model.encoder.select_layer {select_layer} is out of range for this "
                             f"{n_layers}-layer model; expected {-(n_layers + 1)} .. {n_layers} (hidden_states index)")
        self.select_layer = select_layer
        self.num_prefix = 1 if family == "hf_clip" else 0  # CLIP's CLS token; SigLIP has none
        self.drop_prefix = self.num_prefix if select_feature == "patch" else 0
        self.num_prefix_tokens = self.num_prefix - self.drop_prefix
        self.hidden_size = vcfg.hidden_size
        self.image_size = vcfg.image_size
        self.grid = vcfg.image_size // vcfg.patch_size
        self.image_mean, self.image_std = _normalisation(family, path)

    @property
    def blocks(self) -> Optional[nn.Module]:
        return hf_block_stack(self.model)  # CLIPEncoderLayer, SiglipEncoderLayer, ...

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> [B, N, D] (N = grid**2 for ``patch``)."""
        out = self.model(pixel_values=pixels.to(self.model.dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, self.drop_prefix :]


@ENCODERS.register("hf_clip")
def hf_clip(config: Mapping[str, Any] = (), path: Optional[str] = None, select_layer: int = -2, select_feature: str = "patch",
            attn_implementation: str = "sdpa"):
    return HFVisionEncoder("hf_clip", config or {}, path, select_layer, select_feature, attn_implementation)


@ENCODERS.register("hf_siglip")
def hf_siglip(config: Mapping[str, Any] = (), path: Optional[str] = None, select_layer: int = -2, select_feature: str = "patch",
              attn_implementation: str = "sdpa"):
    return HFVisionEncoder("hf_siglip", config or {}, path, select_layer, select_feature, attn_implementation)


# --------------------------------------------------------------------------- timm
def _split_timm_kwargs(config: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    kwargs = dict(config)
    if "model_name" not in kwargs:
        raise ValueError("timm encoder: model.encoder.config needs 'model_name' (e.g. vit_large_patch14_clip_336)")
    return kwargs.pop("model_name"), kwargs


@ENCODERS.register("timm")
class TimmVisionEncoder(VisionEncoder):
    """A timm ViT (anything with ``forward_intermediates``), randomly initialised or from ``path``."""

    def __init__(self, config: Mapping[str, Any] = (), path: Optional[str] = None, select_layer: int = -2, select_feature: str = "patch",
                 attn_implementation: str = "sdpa"):
        super().__init__()
        import timm

        name, kwargs = _split_timm_kwargs(config or {})
        kwargs.setdefault("num_classes", 0)
        checkpoint = check_local_path(path, "model.encoder.path") if path and not building_on_meta() else ""
        try:
            self.model = timm.create_model(name, pretrained=False, checkpoint_path=checkpoint, **kwargs)
        except TypeError as e:  # typically HF keys (image_size, hidden_size, ...) left from a parent config
            raise ValueError(f"timm encoder '{name}': model.encoder.config has keys the model does not take ({e}); "
                             "note that YAML defaults and overrides merge into the parent's model.encoder.config, so keys "
                             "of another encoder family stay unless that config is written without them") from e
        if not all(hasattr(self.model, a) for a in ("blocks", "patch_embed", "forward_intermediates")):
            raise ValueError(f"timm encoder: model '{name}' ({type(self.model).__name__}) is not a ViT-like model with "
                             "patch_embed, blocks and forward_intermediates; choose a ViT (e.g. vit_base_patch16_224)")
        gh, gw = (int(x) for x in self.model.patch_embed.grid_size)
        ih, iw = (int(x) for x in self.model.patch_embed.img_size)
        if gh != gw or ih != iw:
            raise ValueError(f"timm encoder: model '{name}' takes {ih}x{iw} images ({gh}x{gw} patches); "
                             "the data pipeline and compressors need a square input: set img_size to one int")
        n_blocks = len(self.model.blocks)
        hf_index = n_blocks + 1 + select_layer if select_layer < 0 else select_layer  # hidden_states index
        if not 1 <= hf_index <= n_blocks:
            raise ValueError(f"timm encoder: select_layer {select_layer} is not a block output of this {n_blocks}-block model")
        self.block_index = hf_index - 1
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"encoder select_feature must be 'patch' or 'cls_patch', got '{select_feature}'")
        self.keep_prefix = select_feature == "cls_patch"
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0)) if self.keep_prefix else 0
        self.hidden_size = self.model.embed_dim
        self.grid = int(self.model.patch_embed.grid_size[0])
        self.image_size = int(self.model.patch_embed.img_size[0])
        cfg = self.model.pretrained_cfg
        self.image_mean, self.image_std = tuple(cfg.get("mean", HALF)), tuple(cfg.get("std", HALF))
        self._set_attention(attn_implementation)

    @property
    def blocks(self) -> Optional[nn.Module]:
        return self.model.blocks  # timm's ViT blocks (checked in __init__)

    def _set_attention(self, attn_implementation: str) -> None:
        """timm blocks choose between ``F.scaled_dot_product_attention`` (``fused_attn``) and plain matmuls."""
        fused = attn_implementation != "eager"
        if attn_implementation not in ("sdpa", "eager"):
            log.info("timm encoder: no %s path in timm; its blocks use torch SDPA (which picks a flash / "
                     "memory-efficient kernel on CUDA itself)", attn_implementation)
        for module in self.model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = fused

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> [B, N, D]: the chosen block's output, prefix tokens dropped for ``patch``."""
        dtype = next(self.model.parameters()).dtype  # float32 pixels into a bf16 tower, like the HF encoders
        out = self.model.forward_intermediates(
            pixels.to(dtype), indices=[self.block_index], output_fmt="NLC", intermediates_only=True,
            return_prefix_tokens=self.keep_prefix, stop_early=True,
        )[0]
        if self.keep_prefix:
            spatial, prefix = out
            return torch.cat([prefix, spatial], dim=1)
        return out


# --------------------------------------------------------------------------- config only
def image_preprocessing(encoder_cfg: Any) -> Tuple[int, Tuple[float, ...], Tuple[float, ...]]:
    """``(image_size, mean, std)`` for an ``EncoderConfig``, read from configs alone (no weights).

    For a user encoder (``package.module:Class``) the class may define a static
    ``image_preprocessing(config, path)``; otherwise the encoder is built once to ask it.
    """
    name, config, path = encoder_cfg.name, plain(encoder_cfg.config), encoder_cfg.path
    if name in _HF_FAMILIES:
        path = check_local_path(path, "model.encoder.path")
        vcfg = _hf_vision_config(name, config, path)
        mean, std = _normalisation(name, path)
        return int(vcfg.image_size), mean, std
    if name == "timm":
        import timm

        model_name, kwargs = _split_timm_kwargs(config)
        pcfg = timm.get_pretrained_cfg(model_name)
        size = kwargs.get("img_size", pcfg.input_size[-1] if pcfg else 224)
        size = size[0] if isinstance(size, Sequence) else size
        mean = tuple(pcfg.mean) if pcfg else HALF
        std = tuple(pcfg.std) if pcfg else HALF
        return int(size), mean, std
    cls = ENCODERS.get(name)
    if hasattr(cls, "image_preprocessing"):
        return cls.image_preprocessing(config, path)
    with torch.device("meta"):
        enc = cls(config=config, path=path, select_layer=encoder_cfg.select_layer, select_feature=encoder_cfg.select_feature)
    return enc.image_size, tuple(enc.image_mean), tuple(enc.image_std)


def build_encoder(encoder_cfg: Any, attn_implementation: Optional[str] = None) -> VisionEncoder:
    """Build the encoder named by an ``EncoderConfig``; ``attn_implementation`` reaches encoders that take
    that keyword (a user's encoder without it is built as before, with a log line)."""
    builder = ENCODERS.get(encoder_cfg.name)
    kwargs: Dict[str, Any] = {}
    if attn_implementation is not None:
        if _takes_keyword(builder, "attn_implementation"):
            kwargs["attn_implementation"] = attn_implementation
        else:
            log.info("encoder %s takes no attn_implementation; model.attn_implementation=%s applies to the LLM and "
                     "pre-fusion only", encoder_cfg.name, attn_implementation)
    return builder(
        config=plain(encoder_cfg.config),
        path=encoder_cfg.path,
        select_layer=encoder_cfg.select_layer,
        select_feature=encoder_cfg.select_feature,
        **kwargs,
    )


def _takes_keyword(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: do not guess
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
