"""Attention backends: what ``model.attn_implementation`` may name, whether it can run here, and xformers.

Every attention layer of the model (LLM, pre-fusion, Hugging Face vision encoders) calls the function
that transformers' attention registry (``AttentionInterface``) holds under the config's
``_attn_implementation``; the masks come from the mask registry (``AttentionMaskInterface``) under
the same name. So a backend is one name for both registries:

- ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``; any device. On CUDA
  torch picks its own flash / memory-efficient / cuDNN kernel.
- ``eager``: plain matmuls and softmax; any device (reference numerics, attention maps).
- ``flash_attention_2``: the ``flash-attn`` package (transformers' own integration); CUDA, fp16/bf16.
- ``xformers``: ``xformers.ops.memory_efficient_attention``, registered here
  (:func:`register_backends`); CUDA. Masks are transformers' boolean SDPA masks: ``None`` when a
  plain causal (or no) mask suffices — then xformers gets ``LowerTriangularMask`` — else a 4D
  ``[B, 1, Sq, Sk]`` mask (causal + padding, sliding window, ...) turned into an additive bias.

:func:`check_backend` refuses, at model build, a backend that cannot run in this process (not
installed, no CUDA), with what to install or choose instead.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Any, List, Mapping, Optional, Tuple

import torch

from lm_mini.constants import ATTENTION_BACKENDS as BACKENDS
from lm_mini.constants import CUDA_ONLY_ATTENTION as CUDA_ONLY

_PACKAGE = {"flash_attention_2": ("flash_attn", "install it on a CUDA machine: pip install flash-attn --no-build-isolation"),
            "xformers": ("xformers", "install the gpu extra on a CUDA machine: pip install -e '.[gpu]' (an xformers built "
                                     "for this torch)")}


class AttentionBackendError(ValueError):
    """A ``model.attn_implementation`` that cannot run here; the message names the key and the way out."""


# --------------------------------------------------------------------------- can it run here?
def backend_problem(name: str, accelerator: Optional[str] = None) -> Optional[str]:
    """Why backend ``name`` cannot run in this process (None: it can).

    ``accelerator``: the trainer's (``train.accelerator``); ``cpu`` rules out the CUDA-only backends
    even on a machine with a GPU.
    """
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}"
    if name not in CUDA_ONLY:
        return None
    package, install = _PACKAGE[name]
    if importlib.util.find_spec(package) is None:
        return f"{name} needs the {package} package, which is not installed; {install}"
    if accelerator is not None and str(accelerator).lower() == "cpu":
        return f"{name} runs on CUDA GPUs only, and train.accelerator is cpu"
    if not torch.cuda.is_available():
        return f"{name} runs on CUDA GPUs only, and this machine has none (torch.cuda.is_available() is False)"
    if name == "xformers":
        return _xformers_kernel_problem()
    return None


@functools.lru_cache(maxsize=1)
def _xformers_kernel_problem() -> Optional[str]:
    """xformers installs beside any torch but its kernels load only for the torch it was built for:
    run one tiny attention on the GPU now rather than fail at the first training step."""
    try:
        ops = _xformers_ops()
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        ops.memory_efficient_attention(q, q, q)
    except Exception as e:  # ImportError, NotImplementedError (no kernel for this build / GPU), ...
        first_line = str(e).splitlines()[0] if str(e) else ""
        return (f"xformers is installed but its kernels do not run here ({type(e).__name__}: {first_line}); "
                f"it must be built for torch {torch.__version__}: {_PACKAGE['xformers'][1]}")
    return None


def check_backend(name: str, key: str = "model.attn_implementation", accelerator: Optional[str] = None) -> None:
    """Raise :class:`AttentionBackendError` naming ``key`` when ``name`` cannot run here."""
    problem = backend_problem(name, accelerator)
    if problem:
        runnable = ", ".join(available_backends(accelerator))
        raise AttentionBackendError(f"{key}={name}: {problem}. Or choose a backend that runs here: {runnable} "
                                    f"({key}=sdpa is the default)")


def available_backends(accelerator: Optional[str] = None) -> Tuple[str, ...]:
    """The backends that can run in this process, in ``BACKENDS`` order."""
    return tuple(b for b in BACKENDS if backend_problem(b, accelerator) is None)


def check_model_backends(model_cfg: Any, accelerator: Optional[str] = None) -> None:
    """:func:`check_backend` for every backend a ``ModelConfig`` names (before a training run is created)."""
    encoder_attn, llm_attn = resolve_backends(model_cfg)
    check_backend(encoder_attn, "model.attn_implementation", accelerator)
    own = getattr(getattr(model_cfg, "llm", None), "attn_implementation", None)
    check_backend(llm_attn, "model.llm.attn_implementation" if own else "model.attn_implementation", accelerator)


def choose_inference_backends(model_cfg: Any, requested: Optional[Mapping[str, str]] = None,
                              device: Optional[str] = None) -> List[str]:
    """Set, in place, the attention backends a *saved* model runs with in this process; returns what was changed.

    Every backend computes the same attention (sdpa / eager / xformers parity: tests/models/test_attention_backends.py),
    so the backend a model was trained with is a run-time choice: a model trained with xformers or flash-attention
    on a GPU cluster must still answer on a laptop. ``requested`` (``{"model.attn_implementation": name}`` and/or
    ``{"model.llm.attn_implementation": name}``): the user's choice, checked (an error if it cannot run here);
    ``model.attn_implementation`` alone sets every part, the LLM included. Otherwise a saved backend that cannot
    run here (``device``: ``cpu`` rules out the CUDA-only ones) is replaced with ``sdpa``, and the returned
    message says so.
    """
    requested = dict(requested or {})
    accelerator = "cpu" if device is not None and str(device).startswith("cpu") else None
    llm = getattr(model_cfg, "llm", None)
    saved = resolve_backends(model_cfg)
    if requested:
        for key, name in requested.items():
            check_backend(name, key, accelerator)
        if "model.attn_implementation" in requested:
            model_cfg.attn_implementation = requested["model.attn_implementation"]
            if llm is not None:
                llm.attn_implementation = None
        if "model.llm.attn_implementation" in requested and llm is not None:
            llm.attn_implementation = requested["model.llm.attn_implementation"]
        chosen = resolve_backends(model_cfg)
        return [] if chosen == saved else [f"attention backends (encoder, LLM) {saved} -> {chosen}, as asked"]
    notes = []
    for key, owner in (("model.attn_implementation", model_cfg), ("model.llm.attn_implementation", llm)):
        name = getattr(owner, "attn_implementation", None) if owner is not None else None
        problem = backend_problem(name, accelerator) if name else None
        if problem is not None:
            owner.attn_implementation = "sdpa"
            notes.append(f"{key}={name} cannot run here ({problem}); using sdpa, which computes the same attention "
                         f"(choose another with {key}=...)")
    return notes


def backend_for_build(name: str, key: str = "model.attn_implementation") -> str:
    """The backend to build a part with: ``name`` after :func:`check_backend`, and registered.

    Under ``torch.device("meta")`` (counting FLOPs and memory of configs for other machines) nothing
    runs attention, and the counters switch to eager anyway: a backend that cannot run here is built
    as ``eager`` instead of refused.
    """
    register_backends()
    if torch.empty(0).device.type == "meta":
        return name if backend_problem(name) is None else "eager"
    check_backend(name, key)
    return name


def resolve_backends(model_cfg: Any) -> Tuple[str, str]:
    """``(for the encoder, for the LLM and pre-fusion)`` from a ``ModelConfig``:
    ``model.attn_implementation``, which ``model.llm.attn_implementation`` overrides for the LLM when set."""
    model_level = getattr(model_cfg, "attn_implementation", None) or "sdpa"
    llm_level = getattr(getattr(model_cfg, "llm", None), "attn_implementation", None) or model_level
    return model_level, llm_level


# --------------------------------------------------------------------------- registration
def register_backends() -> None:
    """Register ``xformers`` in transformers' attention and mask registries (idempotent, no import of xformers).

    Masks: the SDPA mask builder (boolean, True = attend; ``None`` where ``is_causal`` suffices).
    Registering it matters: for a name missing from the mask registry transformers builds no mask
    at all, which would silently drop the padding and causal masks.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if AttentionInterface._global_mapping.get("xformers") is None:
        AttentionInterface.register("xformers", xformers_attention_forward)
    if AttentionMaskInterface._global_mapping.get("xformers") is None:
        AttentionMaskInterface.register("xformers", sdpa_mask)


# --------------------------------------------------------------------------- xformers
def _xformers_ops() -> Any:
    """``xformers.ops`` (a seam: tests substitute a pure-torch stand-in of the same API)."""
    import xformers.ops

    return xformers.ops


def _check_device(query: torch.Tensor) -> None:
    """A model built for xformers and then moved to the CPU: say so, not xformers' 'No operator found'."""
    if query.device.type != "cuda":
        raise RuntimeError(f"xformers attention runs on CUDA tensors only, got {query.device.type} tensors: "
                           "set model.attn_implementation=sdpa to run on this device")


def xformers_bias(mask: torch.Tensor, dtype: torch.dtype, batch: int, heads: int) -> torch.Tensor:
    """A transformers 4D mask ``[B|1, 1|H, Sq, Sk]`` (bool, True = attend; or additive float) ->
    xformers' additive ``attn_bias [batch, heads, Sq, Sk]`` in ``dtype``.

    Rows with no key to attend (left padding's first query rows) attend every key instead: their
    output is padding nobody reads, and a row of -inf only would make the kernel return NaN.
    The bias is a slice of a buffer whose rows are padded to a multiple of 8 elements: xformers'
    kernels need every stride but the last aligned to 16 bytes; broadcast dims have stride 0.
    """
    _, _, Sq, Sk = mask.shape
    if mask.dtype == torch.bool:
        allowed = mask | ~mask.any(dim=-1, keepdim=True)
        values = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~allowed, float("-inf"))
    else:
        values = mask.to(dtype)
    padded = -(-Sk // 8) * 8
    bias = torch.empty(*mask.shape[:-1], padded, dtype=dtype, device=mask.device)[..., :Sk]
    bias.copy_(values)
    return bias.expand(batch, heads, Sq, Sk)


def xformers_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature on top of ``xformers.ops.memory_efficient_attention``.

    query [B, H, Sq, D], key / value [B, Hkv, Sk, D] (Hkv divides H: grouped-query attention),
    attention_mask None or [B, 1|H, Sq, Sk] -> (output [B, Sq, H, D], None). Causality follows
    transformers' SDPA integration: with no mask, a layer that is causal (``module.is_causal``,
    overridden by ``is_causal``) and more than one query gets the causal mask anchored top-left
    (keys past the queries are dropped, as SDPA does for a prefill into a static cache).
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("xformers attention does not support softcap (Gemma 2); set model.attn_implementation=eager")
    if kwargs.get("position_bias") is not None:
        raise ValueError("xformers attention does not take a position bias (T5-style); set model.attn_implementation=sdpa")
    _check_device(query)
    ops = _xformers_ops()
    B, H, Sq, D = query.shape
    Hkv = key.shape[1]
    if H % Hkv:
        raise ValueError(f"xformers attention: {H} query heads are not a multiple of {Hkv} key/value heads")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(Sq > 1 and attention_mask is None and causal)
    # [B, S, H, D]: xformers' layout; a transpose view (the kernels need only the last stride to be 1)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if Hkv != H:  # grouped-query attention: repeat the key/value heads, as transformers' SDPA path does with a mask
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    bias: Any = None
    if attention_mask is not None:
        bias = xformers_bias(attention_mask[..., : k.shape[1]], q.dtype, B, H)
    elif causal:
        if k.shape[1] > Sq:  # only the first Sq keys can be attended by a top-left causal mask
            k, v = k[:, :Sq], v[:, :Sq]
        bias = ops.LowerTriangularMask()
    out = ops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout, scale=scaling)
    return out.contiguous(), None
