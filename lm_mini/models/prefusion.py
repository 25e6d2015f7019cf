"""Modality pre-fusion (LLaVA-Mini): a few decoder layers that let text absorb the image before the LLM.

Input sequence per image / frame: ``[ visual (Nv) | compressed (C²) | text (L) ]`` under a causal
mask, so every text token sees all visual tokens and the text before it; the compressed tokens
see the image only. Text tokens outside ``text_mask`` (answers, padding, the ``<image>`` slot)
are masked out as keys and returned unchanged. As in the official code, there is no final norm
and positions count valid tokens only (``cumsum(valid) - 1``).
"""
from __future__ import annotations

import inspect
from typing import Tuple

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


def _check_llama_style(llm: nn.Module, decoder: nn.Module) -> None:
    """Pre-fusion reuses the LLM's decoder-layer class: it needs ``decoder.layers`` and one shared
    ``decoder.rotary_emb(x, position_ids)`` whose output every layer takes as ``position_embeddings``
    (Llama, Qwen2/3, Mistral, Gemma, Phi, ...). Refuse other families with what to do instead."""
    family = type(llm).__name__
    layers, rotary = getattr(decoder, "layers", None), getattr(decoder, "rotary_emb", None)
    problem = None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        problem = "its decoder has no `layers` list of decoder layers"
    elif rotary is None:
        problem = "its decoder has no shared rotary embedding (`rotary_emb`)"
    else:
        rot = inspect.signature(rotary.forward).parameters
        extra = [n for n, p in list(rot.items())[2:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        lay = inspect.signature(layers[0].forward).parameters
        takes_pe = "position_embeddings" in lay or any(p.kind == p.VAR_KEYWORD for p in lay.values())
        if extra:
            problem = f"its rotary embedding needs per-layer arguments ({', '.join(extra)})"
        elif not takes_pe:
            problem = "its decoder layers do not take `position_embeddings`"
    if problem:
        raise ValueError(f"pre-fusion cannot be built from {family} ({getattr(llm.config, 'model_type', '?')}): {problem}. "
                         "Pre-fusion supports Llama-style decoders (llama, qwen2, qwen3, mistral, gemma, phi, ...); "
                         "use another LLM family or set model.prefusion.depth=0")


class PreFusion(nn.Module):
    """``depth`` decoder layers of the LLM's own class (separate weights) plus their rotary embedding.

    Build with :meth:`from_llm`; ``layers`` is a plain ``nn.ModuleList`` of decoder layers so FSDP
    and activation checkpointing wrap it like the LLM's own layers.
    """

    def __init__(self, config, layer_cls: type, rotary_cls: type, depth: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"PreFusion needs depth >= 1 (depth 0 means no pre-fusion module), got {depth}")
        # The LLM's config object itself, not a copy: the layers' attention backend (config._attn_implementation,
        # model.attn_implementation) and the masks built for it follow the LLM's, also when it is switched later.
        self.config = config
        self.layers = nn.ModuleList(layer_cls(config, layer_idx=i) for i in range(depth))
        self.rotary_emb = rotary_cls(config=config)

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers: FSDP's units and what activation checkpointing recomputes, like the LLM's own."""
        return self.layers

    @classmethod
    def from_llm(cls, llm: nn.Module, depth: int, init: str = "random") -> "PreFusion":
        """Layers shaped like ``llm``'s decoder layers.

        ``init="random"``: the LLM's own weight init (official default);
        ``init="llm_layers"``: copies of the LLM's first ``depth`` layers.
        """
        decoder = llm.get_decoder()
        _check_llama_style(llm, decoder)
        module = cls(llm.config, type(decoder.layers[0]), type(decoder.rotary_emb), depth)
        if init == "random":
            module.layers.apply(llm._init_weights)
        elif init == "llm_layers":
            if depth > len(decoder.layers):
                raise ValueError(f"prefusion init llm_layers: depth {depth} > the LLM's {len(decoder.layers)} layers")
            for mine, theirs in zip(module.layers, decoder.layers):
                mine.load_state_dict(theirs.state_dict())
        else:
            raise ValueError(f"unknown prefusion init '{init}': expected 'random' or 'llm_layers'")
        return module

    def layer_kinds(self) -> list:
        """Per layer: "full_attention" or "sliding_attention", as the LLM's layer of the same index
        (``config.layer_types``: Qwen2, Gemma 2; else every layer slides when ``config.sliding_window``: Mistral, Phi-3)."""
        types = getattr(self.config, "layer_types", None)
        if types:
            return [types[i] if i < len(types) else "full_attention" for i in range(len(self.layers))]
        sliding = getattr(self.config, "sliding_window", None)
        return ["sliding_attention" if sliding else "full_attention"] * len(self.layers)

    def forward(
        self, visual: torch.Tensor, compressed: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """visual [B, Nv, d], compressed [B, C², d], text [B, L, d], text_mask [B, L] (True = fuse this token)
        -> (fused compressed [B, C², d], text [B, L, d] fused where ``text_mask``, else the input unchanged)."""
        n_vis, n_comp = visual.shape[1], compressed.shape[1]
        x = torch.cat([visual, compressed, text.to(visual.dtype)], dim=1)  # [B, S, d]
        text_mask = text_mask.bool()
        valid = torch.cat([text_mask.new_ones(x.shape[0], n_vis + n_comp), text_mask], dim=1)  # [B, S]
        position_ids = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)  # masked slots: any value, never seen
        mask_kwargs = dict(config=self.config, inputs_embeds=x, attention_mask=valid, cache=None, position_ids=position_ids)
        kinds = self.layer_kinds()
        masks = {"full_attention": create_causal_mask(**mask_kwargs) if "full_attention" in kinds else None}
        if "sliding_attention" in kinds:  # the LLM's sliding-window layers keep their window here too
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        position_embeddings = self.rotary_emb(x, position_ids)
        for layer, kind in zip(self.layers, kinds):
            x = layer(x, attention_mask=masks[kind], position_ids=position_ids, position_embeddings=position_embeddings)
            x = x[0] if isinstance(x, tuple) else x  # some families still return (hidden_states, ...)
        fused_text = torch.where(text_mask.unsqueeze(-1), x[:, n_vis + n_comp :], text.to(x.dtype))
        return x[:, n_vis : n_vis + n_comp], fused_text
