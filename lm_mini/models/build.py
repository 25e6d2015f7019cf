"""The one way to build a model from its config (timm's ``create_model``): :func:`build_model`.

``LlavaMini.from_config`` assembles the parts; :func:`build_model` is what every caller uses, for where the
weights go: real and randomly initialised (training, ``model_factory``'s default), on the ``meta`` device (shapes
and FLOPs, no memory: export's pinning, import's key map, efficiency), or with parameters on ``meta`` and buffers
real, ready to be given loaded tensors (``for_loading``: ``lm_mini.interop.pretrained``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Union

import torch


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device (no memory), their buffers where they are
    made (rotary frequencies, position ids: values no checkpoint holds, computed as in a normal build)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: Optional[torch.nn.Parameter]) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_model(model_cfg: Any, device: Union[str, torch.device, None] = None, for_loading: bool = False) -> torch.nn.Module:
    """``LlavaMini.from_config(model_cfg)``, built on ``device`` (``"meta"``: shapes and names only, no memory;
    None: torch's default device), with random initial weights.

    ``for_loading``: every weight is about to be replaced (``interop.pretrained.load_weights`` / ``load_pretrained``),
    so the parameters are made on ``meta`` in ``model.dtype`` (no memory, no random initialisation: transformers'
    ``no_init_weights``), the buffers for real.
    """
    from lm_mini.models.llava_mini import LlavaMini

    if not for_loading:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return LlavaMini.from_config(model_cfg)
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, model_cfg.dtype))
    try:
        with no_init_weights(), parameters_on_meta():
            model = LlavaMini.from_config(model_cfg)
    finally:
        torch.set_default_dtype(previous)
    model.llm.tie_weights()  # no_init_weights also skips tying (tie_word_embeddings models)
    return model
