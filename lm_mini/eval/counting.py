"""Counting on the ``meta`` device: FLOPs (attention included), per-part attribution, peak working memory,
and :class:`MetaHybridMode`, which lets model code that reads small bookkeeping tensors run on ``meta``.

Used by :mod:`lm_mini.eval.efficiency`; nothing here knows about LLaVA-Mini.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


# --------------------------------------------------------------------------- FLOP counting
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Same formula as the counter's CUDA SDPA kernels (full QK^T and AV matmuls)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU SDPA kernel (otherwise counted as 0 FLOPs)."""
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def use_eager_attention(model: nn.Module) -> None:
    """Switch every Hugging Face config inside ``model`` to eager attention (sub-configs follow).

    Why: on ``meta`` the SDPA path of transformers' mask creation asks tensors for values, and eager
    attention is plain matmuls, which the counter counts on every device.
    """
    from transformers import PretrainedConfig

    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PretrainedConfig):
            cfg._attn_implementation = "eager"


@contextmanager
def part_flops(counter: FlopCounterMode, parts: Mapping[str, nn.Module], into: Dict[str, int]) -> Iterator[None]:
    """While active, add the FLOPs counted inside each ``parts[name]`` call to ``into[name]``.

    A part called several times (the projector runs on both the patches and the compressed tokens)
    accumulates; a part called inside another part counts for the outer one only.
    """
    active: list = []  # (name, counter total at entry)
    handles = []

    def enter(name: str) -> Callable:
        return lambda module, args: active.append((name, counter.get_total_flops()))

    def leave(module, args, output) -> None:
        name, start = active.pop()
        if not active:
            into[name] = into.get(name, 0) + counter.get_total_flops() - start

    for name, module in parts.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- working memory
class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and alive at the same time (works on ``meta``).

    Tensors made outside (weights, inputs) are not counted: the result is the working memory of
    the code run inside. Views share their base's storage and are counted once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: Dict[int, list] = {}  # storage id -> [bytes, live tensors]

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata  # the StorageImpl pointer: the same for every view of one allocation
        if key not in self._refs:
            self._refs[key] = [storage.nbytes(), 0]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key][1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in _tensors(args, kwargs)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in inputs and key not in self._refs:
                continue  # a view of a tensor made outside (``weight.t()`` in a linear): no new memory
            self._track(t)
        return out


# --------------------------------------------------------------------------- meta with real bookkeeping
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
              torch.ops.aten._index_put_impl_.default}


def _to_meta(x: Any) -> Any:
    return x.to("meta") if isinstance(x, torch.Tensor) and x.device.type != "meta" else x


def _tensors(args: tuple, kwargs: dict) -> list:
    """Tensor arguments of an aten op (nested at most one level: ``Tensor[]``, ``Tensor?[]``).
    A plain scan: ``tree_flatten`` on every op made meta counting ~20% slower."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _all_to_meta(values: Any) -> Any:
    """``_to_meta`` over op arguments (a tuple, or the kwargs dict), one level deep."""
    def one(a: Any) -> Any:
        return type(a)(_to_meta(x) for x in a) if isinstance(a, (list, tuple)) else _to_meta(a)

    return {k: one(v) for k, v in values.items()} if isinstance(values, dict) else tuple(one(a) for a in values)


def _bool_index_to_long(indices: list) -> list:
    """A real boolean index -> the long indices it selects (meta cannot index with a boolean mask)."""
    out = []
    for idx in indices:
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool and idx.device.type != "meta":
            out.extend(idx.nonzero(as_tuple=True))
        else:
            out.append(idx)
    return out


class _RealFromData(TorchFunctionMode):
    """``torch.tensor(data, device=meta)`` -> a real CPU tensor: the data would be lost below the dispatcher."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and str(kwargs.get("device", "")).startswith("meta"):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


class MetaHybridMode(TorchDispatchMode):
    """Run a model built on ``meta`` on a batch whose small bookkeeping tensors stay real (CPU).

    Model code reads data from small tensors (``frames_per_sample.tolist()``, the position of the
    ``<image>`` slot, padding masks), which a meta tensor cannot answer. Under this mode:

    - an op whose tensors are all real runs for real, unless it would blow small inputs up into a
      large output (> ``small`` elements and > 4x its inputs: attention masks of long sequences
      broadcast from position vectors), then on meta;
    - an op mixing real and meta tensors runs on meta (boolean indices become long indices first);
    - a factory op asked for meta with a small output (``torch.arange(n, device=meta)``) is made real,
      and so is ``torch.tensor(data, device=meta)``.

    Large tensors (weights, activations) therefore stay on meta and cost no memory or time.
    """

    def __init__(self, small: int = 1 << 16) -> None:
        super().__init__()
        self.small = small

    def __enter__(self):
        self._from_data = _RealFromData()
        self._from_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._from_data.__exit__(*exc)

    def _keep_real(self, out: Any, inputs: list) -> bool:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        numel = sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
        return numel <= self.small or numel <= 4 * sum(t.numel() for t in inputs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors = _tensors(args, kwargs)
        real = [t for t in tensors if t.device.type != "meta"]
        meta_device = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta"
        if len(real) < len(tensors):  # some input is on meta: so is the output
            if not real and "device" not in kwargs:
                return func(*args, **kwargs)  # the common case (weights x activations): nothing to move
            if func in _INDEX_OPS:
                args = (args[0], _bool_index_to_long(args[1]), *args[2:])
            if "device" in kwargs:  # a copy of a meta tensor to a real device stays on meta
                kwargs["device"] = torch.device("meta")
            return func(*_all_to_meta(args), **_all_to_meta(kwargs))
        try:  # the output's size, without computing it
            on_meta = func(*_all_to_meta(args), **{**_all_to_meta(kwargs), **({"device": "meta"} if meta_device else {})})
        except (RuntimeError, NotImplementedError):  # data-dependent ops (item, nonzero): only real tensors can answer
            on_meta = None
        if on_meta is not None and not self._keep_real(on_meta, tensors):
            return on_meta
        if meta_device:
            kwargs["device"] = torch.device("cpu")
        return func(*args, **kwargs)
