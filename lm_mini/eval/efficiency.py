"""Efficiency of a model next to its LLaVA-1.5 baseline: FLOPs, visual tokens, KV cache, frames per budget, latency.

Everything except latency is computed on the ``meta`` device: real sizes, no weight memory.

- **FLOPs** come from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add of every
  matmul/conv, full — not causal-halved — attention scores and values, elementwise ops ignored),
  split by part with forward hooks. Attention must be counted: on ``meta`` every Hugging Face
  config is switched to eager attention (SDPA masks call ``.item()``, impossible on meta) and the
  CPU SDPA kernel, which the counter has no formula for, gets one (:func:`flop_counter`).
- **Prefill** is the LLM forward over the whole prompt with logits for the last position only
  (what generation computes); **per generated token** is one decode step with a KV cache of the
  prompt length.
- **KV cache** per token = layers x 2 (K and V) x kv_heads x head_dim x bytes of the dtype.
- **Frames per budget**: budget = weights + frames x KV cache per frame + the peak working memory
  of encoding a chunk of frames (measured on meta by :class:`PeakMemory`).
- The **baseline** is the same encoder and LLM with the ``identity`` compressor and no pre-fusion
  (LLaVA-1.5).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lm_mini.eval.counting import MetaHybridMode, PeakMemory, flop_counter, part_flops, use_eager_attention

PARTS = ("encoder", "compressor", "projector", "prefusion")  # the vision path, run by prepare_inputs
GIB = 2**30


# --------------------------------------------------------------------------- memory facts
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_bytes_per_token(llm_config: Any, dtype: torch.dtype = torch.bfloat16) -> int:
    """layers x 2 (K, V) x kv_heads x head_dim x bytes: the KV cache one LLM token costs."""
    cfg = llm_config.get_text_config() if hasattr(llm_config, "get_text_config") else llm_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers * 2 * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def weight_bytes(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of all parameters and buffers (shared tensors once) when stored in ``dtype``."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            size = torch.empty(0, dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
            total += t.numel() * size
    return total


# --------------------------------------------------------------------------- building
def baseline_config(model_cfg: Any) -> Any:
    """LLaVA-1.5 next to ``model_cfg``: same encoder, projector and LLM; all patches, no pre-fusion, and
    one view of the image (LLaVA-1.5 has no high-resolution crops: a LLaVA-Mini-HD model with
    ``resolution_ratio=2`` is compared with the 576-token LLaVA-1.5, as in the paper)."""
    base = copy.deepcopy(model_cfg)
    base.compressor.name = "identity"
    base.compressor.options = {}
    base.prefusion.depth = 0
    base.resolution_ratio = 1
    return base


def measured_model(model_cfg: Any, device: str = "meta") -> nn.Module:
    """The model to measure: :func:`lm_mini.models.build.build_model` on ``device`` (random weights unless on meta), in
    eval mode; on meta with eager attention, which the FLOP counter can see."""
    from lm_mini.models.build import build_model

    model = build_model(model_cfg, device)
    if device == "meta":
        use_eager_attention(model)
    return model.eval()


def synthetic_batch(model_cfg: Any, text_tokens: int, frames: int = 0, device: str = "cpu", vocab: int = 32000,
                    pixel_device: Optional[str] = None) -> Dict[str, Any]:
    """One sample: ``text_tokens`` prompt tokens with the media slot after the first quarter of them;
    an image (``frames == 0``, with its hi-res views) or a video of ``frames`` frames.

    Returns the batch dict of docs/internals.md with ``input_ids [1, text_tokens + 1]``; the pixels
    go to ``pixel_device`` (default ``device``): ``meta`` for counting under :class:`MetaHybridMode`.
    """
    from lm_mini.models.encoders import image_preprocessing

    size = image_preprocessing(model_cfg.encoder)[0]
    ratio = int(model_cfg.resolution_ratio)
    per_image = 1 + ratio * ratio if ratio > 1 else 1
    views = frames * (per_image if getattr(model_cfg, "video_hires", False) else 1) if frames else per_image
    slot = max(1, text_tokens // 4)  # system prompt before the image, the question after it
    ids = torch.randint(3, vocab, (1, text_tokens + 1), device="cpu")
    ids[0, slot] = IMAGE_TOKEN_INDEX
    return {
        "input_ids": ids.to(device),
        "labels": torch.full_like(ids, IGNORE_INDEX).to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(views, 3, size, size, device=pixel_device or device),
        "frames_per_sample": torch.tensor([max(frames, 1)], device=device),
        "is_video": torch.tensor([frames > 0], device=device),
        "sample_ids": ["efficiency"],
    }


def _unpack(prepared: Tuple) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``prepare_inputs`` output -> (inputs_embeds [B,S,d], attention_mask [B,S], position_ids [B,S]); labels unused."""
    embeds, mask, pos, _labels = prepared
    return embeds, mask, pos


def _vocab(model: nn.Module) -> int:
    return model.llm.get_input_embeddings().num_embeddings


# --------------------------------------------------------------------------- one model
@torch.no_grad()
def _llm_prefill_and_step(llm: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> Tuple[int, int]:
    """FLOPs of the LLM prefill (logits for the last position only) and of one decode step after it."""
    with flop_counter() as counter:
        out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    prefill = counter.get_total_flops()
    step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    with flop_counter() as counter:
        llm(inputs_embeds=embeds[:, -1:], attention_mask=step_mask, position_ids=pos[:, -1:] + 1,
            cache=out.cache, use_cache=True, logits_to_keep=1)
    return prefill, counter.get_total_flops()


def profile(model: nn.Module, model_cfg: Any, text_tokens: int = 64, frames: int = 0,
            dtype: torch.dtype = torch.bfloat16, chunk_frames: int = 16) -> Dict[str, Any]:
    """Efficiency figures of one model built on ``meta`` (see :func:`measured_model`).

    The sample is an image (``frames == 0``) or a video of ``frames`` frames, with ``text_tokens``
    prompt tokens. The frames-per-budget inputs (KV cache per frame, working memory) come from a
    video of ``chunk_frames`` frames, the chunk the vision path encodes at once.
    """
    with torch.no_grad(), MetaHybridMode():
        return _profile(model, model_cfg, text_tokens, frames, dtype, chunk_frames)


def _profile(model: nn.Module, model_cfg: Any, text_tokens: int, frames: int, dtype: torch.dtype, chunk_frames: int) -> Dict[str, Any]:
    vocab = _vocab(model)
    parts = {name: getattr(model, name) for name in PARTS if getattr(model, name, None) is not None}
    flops: Dict[str, int] = {}
    batch = synthetic_batch(model_cfg, text_tokens, frames, vocab=vocab, pixel_device="meta")
    with flop_counter() as counter, part_flops(counter, parts, flops):
        embeds, mask, pos = _unpack(model.prepare_inputs(batch))
    vision_total = counter.get_total_flops()
    flops = {name: flops.get(name, 0) for name in PARTS}
    flops["other"] = vision_total - sum(flops.values())  # work of prepare_inputs outside the parts
    flops["llm_prefill"], per_token = _llm_prefill_and_step(model.llm, embeds, mask, pos)
    visual_tokens = embeds.shape[1] - (batch["input_ids"].shape[1] - 1)  # the media slot became the visual tokens

    kv_token = kv_bytes_per_token(model.llm.config, dtype)
    image = batch if not frames else synthetic_batch(model_cfg, text_tokens, 0, vocab=vocab, pixel_device="meta")
    image_tokens = visual_tokens if not frames else _unpack(model.prepare_inputs(image))[0].shape[1] - text_tokens
    with PeakMemory() as memory:
        chunk = synthetic_batch(model_cfg, text_tokens, chunk_frames, vocab=vocab, pixel_device="meta")
        video_embeds = _unpack(model.prepare_inputs(chunk))[0]
    tokens_per_frame = (video_embeds.shape[1] - text_tokens) / chunk_frames
    return {
        "flops": sum(flops.values()),
        "flops_by_part": flops,
        "flops_per_token": per_token,
        "visual_tokens": visual_tokens,
        "llm_tokens": embeds.shape[1],
        "kv_cache_bytes_per_token": kv_token,
        "kv_cache_bytes_per_image": image_tokens * kv_token,
        "kv_cache_bytes_per_frame": tokens_per_frame * kv_token,
        "kv_cache_bytes_per_sample": embeds.shape[1] * kv_token,
        "weight_bytes": weight_bytes(model, dtype),
        "working_bytes": memory.peak,
        "text_kv_bytes": text_tokens * kv_token,
    }


def max_frames(figures: Mapping[str, Any], budget_bytes: float) -> int:
    """Largest video (frames) whose weights + chunk working memory + KV cache fit ``budget_bytes``."""
    free = budget_bytes - figures["weight_bytes"] - figures["working_bytes"] - figures["text_kv_bytes"]
    return max(0, int(free // figures["kv_cache_bytes_per_frame"]))


# --------------------------------------------------------------------------- model vs baseline
def _side_by_side(model: Any, baseline: Any) -> Dict[str, Any]:
    """``ratio`` is None where the baseline has none of it (LLaVA-1.5 has no compressor FLOPs): JSON has no NaN."""
    return {"model": model, "baseline": baseline, "ratio": model / baseline if baseline else None}


def efficiency_report(model_cfg: Any, text_tokens: int = 64, frames: int = 0, budget_gb: float = 24.0,
                      dtype: str = "bfloat16", chunk_frames: int = 16, cache: Optional[dict] = None) -> Dict[str, Any]:
    """Figures of ``model_cfg`` and of its LLaVA-1.5 baseline, each as ``{model, baseline, ratio}``.

    ``ratio`` is model / baseline (0.23 = 77% fewer). ``budget_gb`` is in GiB (2**30 bytes), the
    unit GPU memory is sold in. ``cache`` (any dict) keeps profiles across calls: a benchmark that
    reports several models sharing one baseline profiles it once.
    """
    from omegaconf import OmegaConf

    cache = {} if cache is None else cache
    figures = {}
    for role, cfg in (("model", model_cfg), ("baseline", baseline_config(model_cfg))):
        cfg = copy.deepcopy(cfg)
        cfg.dtype = dtype  # activations in the working-memory figure take the report's dtype
        key = (OmegaConf.to_yaml(cfg), text_tokens, frames, chunk_frames)
        if key not in cache:
            cache[key] = profile(measured_model(cfg), cfg, text_tokens, frames, _DTYPES[dtype], chunk_frames)
        fig = dict(cache[key])
        fig["max_frames"] = max_frames(fig, budget_gb * GIB)
        figures[role] = fig
    m, b = figures["model"], figures["baseline"]
    report: Dict[str, Any] = {k: _side_by_side(m[k], b[k]) for k in m if k != "flops_by_part"}
    report["flops_by_part"] = {p: _side_by_side(m["flops_by_part"][p], b["flops_by_part"][p]) for p in m["flops_by_part"]}
    report["setup"] = {"text_tokens": text_tokens, "frames": frames, "budget_gb": budget_gb, "dtype": dtype,
                       "chunk_frames": chunk_frames, "sample": f"video of {frames} frames" if frames else "image"}
    return report


# --------------------------------------------------------------------------- latency (real weights, random)
def _timed(fn: Callable[[], Any], device: str) -> Tuple[Any, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock
    return out, time.perf_counter() - start


@torch.no_grad()
def measure_latency(model_cfg: Any, device: str = "cpu", text_tokens: int = 64, frames: int = 0,
                    new_tokens: int = 8, repeats: int = 5, warmup: int = 2) -> Dict[str, float]:
    """Median wall-clock seconds of the prefill (vision path + LLM over the prompt) and of one greedy
    decode step (KV cache on), over ``repeats`` runs after ``warmup`` runs, with random weights."""
    model = measured_model(model_cfg, device)
    llm, embed = model.llm, model.llm.get_input_embeddings()
    batch = synthetic_batch(model_cfg, text_tokens, frames, device=device, vocab=embed.num_embeddings)

    def prefill() -> Tuple[Any, torch.Tensor, torch.Tensor]:
        embeds, mask, pos, _ = model.prepare_inputs(batch)
        return llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1), mask, pos

    def decode(out: Any, mask: torch.Tensor, pos: torch.Tensor) -> None:
        for _ in range(new_tokens):
            token = out.logits[:, -1:].argmax(-1)  # [B, 1]
            mask, pos = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1), pos[:, -1:] + 1
            out = llm(inputs_embeds=embed(token), attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True, logits_to_keep=1)

    prefill_s, token_s = [], []
    for i in range(warmup + repeats):
        started, t_prefill = _timed(prefill, device)
        _, t_decode = _timed(lambda: decode(*started), device)
        if i >= warmup:
            prefill_s.append(t_prefill)
            token_s.append(t_decode / new_tokens)
    return {"prefill_s": statistics.median(prefill_s), "per_token_s": statistics.median(token_s)}


def latency_report(model_cfg: Any, **kwargs: Any) -> Dict[str, Any]:
    """:func:`measure_latency` of the model and its baseline, as ``{figure: {model, baseline, ratio}}``."""
    m, b = measure_latency(model_cfg, **kwargs), measure_latency(baseline_config(model_cfg), **kwargs)
    return {k: _side_by_side(m[k], b[k]) for k in m}


# --------------------------------------------------------------------------- output
_ROWS = (  # (label, report key, part or None, unit); FLOPs and bytes get an SI prefix, seconds are shown in ms
    ("FLOPs per sample", "flops", None, "FLOPs"),
    ("  encoder", "flops_by_part", "encoder", "FLOPs"),
    ("  compressor", "flops_by_part", "compressor", "FLOPs"),
    ("  projector", "flops_by_part", "projector", "FLOPs"),
    ("  pre-fusion", "flops_by_part", "prefusion", "FLOPs"),
    ("  LLM prefill", "flops_by_part", "llm_prefill", "FLOPs"),
    ("FLOPs per generated token", "flops_per_token", None, "FLOPs"),
    ("visual tokens to the LLM", "visual_tokens", None, ""),
    ("KV cache per image", "kv_cache_bytes_per_image", None, "B"),
    ("KV cache per frame", "kv_cache_bytes_per_frame", None, "B"),
    ("KV cache per sample", "kv_cache_bytes_per_sample", None, "B"),
    ("weights", "weight_bytes", None, "B"),
    ("working memory (frame chunk)", "working_bytes", None, "B"),
    ("max frames in budget", "max_frames", None, ""),
    ("prefill latency", "prefill_s", None, "s"),
    ("latency per generated token", "per_token_s", None, "s"),
)


def format_value(value: float, unit: str) -> str:
    """12345678 FLOPs -> '12.3 MFLOPs'; seconds in ms; counts with thousands separators."""
    if unit == "":
        return f"{value:,.0f}"
    if unit == "s":
        return f"{value * 1e3:.3g} ms"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
        if abs(value) >= scale or scale == 1:
            return f"{value / scale:.3g} {prefix}{unit}"
    return str(value)


def format_table(report: Mapping[str, Any], markdown: bool = False) -> str:
    """The report as a text (or Markdown) table: figure | model | LLaVA-1.5 | ratio."""
    rows = [("figure", "model", "LLaVA-1.5 baseline", "ratio")]
    for label, key, part, unit in _ROWS:
        entry = report.get(key)
        entry = entry.get(part) if (entry is not None and part) else entry
        if entry is None:
            continue
        ratio = "-" if entry["ratio"] is None else f"{entry['ratio']:.3g}x"
        rows.append((label, format_value(entry["model"], unit), format_value(entry["baseline"], unit), ratio))
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join([lines[0], "|" + "---|" * 4] + lines[1:])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


_MLFLOW_METRICS = {  # report key -> metric name (``lm-mini compare`` plots accuracy against flops_per_sample)
    "flops": "flops_per_sample", "flops_per_token": "flops_per_token", "visual_tokens": "visual_tokens",
    "kv_cache_bytes_per_image": "kv_cache_bytes_per_image", "max_frames": "max_frames",
    "prefill_s": "prefill_latency_s", "per_token_s": "latency_per_token_s",
}


def mlflow_metrics(report: Mapping[str, Any]) -> Dict[str, float]:
    """``flops_per_sample`` etc. for the model, ``baseline_*`` for LLaVA-1.5 and ``*_ratio``."""
    metrics = {}
    for key, name in _MLFLOW_METRICS.items():
        if key in report:
            metrics[name] = float(report[key]["model"])
            metrics[f"baseline_{name}"] = float(report[key]["baseline"])
            if report[key]["ratio"] is not None:
                metrics[f"{name}_ratio"] = float(report[key]["ratio"])
    return metrics


def log_to_mlflow(report: Mapping[str, Any], run_id: str, tracking_uri: str) -> None:
    from mlflow.entities import Metric

    from lm_mini.tracking_store import mlflow_client

    stamp = int(time.time() * 1000)
    metrics = [Metric(name, value, stamp, 0) for name, value in mlflow_metrics(report).items()]
    mlflow_client(tracking_uri).log_batch(run_id, metrics=metrics)


def log_report(report: Mapping[str, Any], target: str, default_uri: str) -> Tuple[str, str]:
    """Log the report's figures to the MLflow run ``target`` names: a training run's directory (its ``mlflow.json``),
    else a run id in ``default_uri``. Returns ``(run id, tracking URI)``; raises what MLflow raises."""
    from lm_mini.runs import Run

    info = Run.at(target).mlflow_info()
    run_id, uri = (info["run_id"], info["tracking_uri"]) if info else (target, default_uri)
    try:
        log_to_mlflow(report, run_id, uri)
    except Exception as e:  # MlflowException: no such run, server down, ...
        raise RuntimeError(f"cannot log to MLflow run {run_id!r} at {uri}: {str(e).splitlines()[0]}") from e
    return run_id, uri
