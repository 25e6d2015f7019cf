"""Interop with the published world: import released checkpoints, export and load model directories, chat.

- :mod:`~lm_mini.interop.pretrained`: the model directory (Hugging Face style: safetensors + index,
  ``config.yaml``/``config.json``, tokenizer, model card); ``load_pretrained(DIR)``.
- :mod:`~lm_mini.interop.importers`: ``lm-mini import llava-mini|llava-hf DIR`` (official LLaVA-Mini,
  transformers' LLaVA-1.5) through one key table per layout.
- :mod:`~lm_mini.interop.export`: ``lm-mini export RUN|CHECKPOINT --out DIR`` (FSDP shards consolidated).
- :mod:`~lm_mini.interop.generate`: ``lm-mini generate`` / ``lm-mini chat`` about an image or a video.

Names are imported lazily so that ``import lm_mini.interop`` does not pull in transformers.
"""
__all__ = ["load_pretrained", "save_pretrained", "read_config", "WeightsMismatch", "import_llava_mini",
           "import_llava_hf", "export", "load_model"]

_HOMES = {
    "load_pretrained": "pretrained", "save_pretrained": "pretrained", "read_config": "pretrained",
    "WeightsMismatch": "pretrained", "import_llava_mini": "importers", "import_llava_hf": "importers",
    "export": "export", "load_model": "export",
}


def __getattr__(name):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"lm_mini.interop.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'lm_mini.interop' has no attribute '{name}'")
