"""LLM builders (``LLMS``): return a transformers causal LM (a ``PreTrainedModel`` with ``generate``).

Called with the fields of ``LLMConfig`` as keywords:
``LLMS.create(name, config=..., path=..., attn_implementation=...)``. ``attn_implementation`` is one of
``lm_mini.models.attention.BACKENDS``; ``LlavaMini.from_config`` checks it can run here first. The LLM's
decoder layers (FSDP's units) are the class its family names in ``_no_split_modules`` (:func:`decoder_layers`).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from lm_mini.models.attention import register_backends
from lm_mini.models.encoders import building_on_meta, check_local_path, hf_block_stack, plain
from lm_mini.registry import LLMS


@LLMS.register("hf_causal_lm")
def hf_causal_lm(config: Optional[Mapping[str, Any]] = None, path: Optional[str] = None, attn_implementation: str = "sdpa"):
    """Any transformers causal LM, randomly initialised from ``config`` (needs ``model_type``) or loaded from ``path``.

    Under ``torch.device("meta")`` a ``path`` contributes only its config: nothing is read or allocated.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    register_backends()  # xformers must be in transformers' registry before a model is made with it
    try:
        if path:
            path = check_local_path(path, "model.llm.path")
            if not building_on_meta():
                return _checked(AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation), attn_implementation)
            hf_config = AutoConfig.from_pretrained(path)
        else:
            kwargs = plain(config)
            if "model_type" not in kwargs:
                raise ValueError("model.llm.config needs 'model_type' (e.g. llama, qwen2, mistral) when no model.llm.path is given")
            hf_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        return _checked(AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation), attn_implementation)
    except (ValueError, ImportError) as e:
        if "attention implementation" in str(e) or "attn_implementation" in str(e) or "Flash Attention" in str(e):
            raise ValueError(f"model.llm.attn_implementation={attn_implementation} is not supported by this LLM family; "
                             f"set model.llm.attn_implementation=eager (or another it supports). {e}") from e
        raise


def _checked(model: Any, attn_implementation: str) -> Any:
    """A family whose attention layers do not call transformers' attention registry would ignore a
    registered backend (xformers) without a word: refuse it instead."""
    if attn_implementation not in ("sdpa", "eager", "flash_attention_2") and not type(model).is_backend_compatible():
        raise ValueError(f"model.llm.attn_implementation={attn_implementation}: {type(model).__name__} does not call "
                         "transformers' attention registry, so that backend would be ignored; set "
                         "model.llm.attn_implementation=sdpa (or eager)")
    return model


def decoder_layers(llm: Any) -> Any:
    """The causal LM's stack of decoder layers (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...): the layer class
    its family names in ``_no_split_modules``. None for a model that names none."""
    return hf_block_stack(llm)
