"""Where the LLM looks at the image: the LLaVA-Mini paper's attention analysis and a layer-drop probe.

For every LLM layer (attention averaged over heads, queries = the instruction tokens after the media):

- ``mass``: the attention the instruction gives to each token type (``system`` before the media,
  ``visual``, ``instruction``); the three sum to 1.
- ``share``: the same normalised per token type, as in the paper: the mean attention one token of a
  type receives, ``(mass_t / n_t) / sum_t' (mass_t' / n_t')`` (sums to 1), so 576 visual tokens
  are not favoured just for being many.
- ``visual_entropy``: entropy (nats) of the attention over the visual tokens, renormalised to a
  distribution; ``log(n_visual)`` is uniform attention.

**Layer-drop**: the visual tokens are hidden from every other token from layer ``k`` on (their
keys are masked), for each ``k`` from 0 (image never read) to the number of layers (full model),
and the answers are scored teacher-forced: mean log-likelihood per answer token and exact match
(every answer token is the argmax). ``k = 0`` equals removing the visual tokens from the input
with the other tokens' positions kept. (In LLaVA-Mini the fused text still carries the image.)

The analysis takes any model with ``prepare_inputs(batch)`` and an ``llm`` (every model of the
package, LLaVA-1.5 included) and an iterable of batches.
"""
from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn

from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

TYPES = ("system", "visual", "instruction")


@dataclass
class LLMInputs:
    """What the LLM reads for a batch, with every position's role. All [B, S]; types are bool masks."""

    embeds: torch.Tensor  # [B, S, d]
    mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    system: torch.Tensor  # valid text before the media
    visual: torch.Tensor  # the media tokens
    instruction: torch.Tensor  # valid non-answer text after the media: the queries of the analysis
    answer: torch.Tensor  # labelled tokens


def llm_inputs(model: nn.Module, batch: Dict[str, Any]) -> LLMInputs:
    """Run ``model.prepare_inputs`` (right padding) and locate each token type.

    The media of sample b replaced its ``<image>`` slot in ``input_ids`` by
    ``n_visual = llm_length - (text_length - 1)`` tokens starting at the slot.
    """
    embeds, mask, pos, labels = model.prepare_inputs(batch)
    B, S = mask.shape
    if labels is None:
        labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long, device=mask.device)
    visual = torch.zeros(B, S, dtype=torch.bool, device=mask.device)
    before = torch.zeros_like(visual)
    for b in range(B):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        slots = (ids == IMAGE_TOKEN_INDEX).nonzero()
        if len(slots):
            slot = int(slots[0])
            n_visual = int(mask[b].sum()) - (len(ids) - 1)
            visual[b, slot : slot + n_visual] = True
            before[b, :slot] = True
    valid, answer = mask.bool(), labels != IGNORE_INDEX
    after = valid & ~visual & ~before
    return LLMInputs(embeds, mask, pos, labels, before & valid, visual, after & ~answer, answer & valid)


@contextmanager
def eager_attention(llm: nn.Module) -> Iterator[None]:
    """Eager attention for a while: it returns attention weights and takes our 4D masks as they are."""
    config = llm.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


# --------------------------------------------------------------------------- attention statistics
def _layer_stats(attn: torch.Tensor, inputs: LLMInputs, keep: torch.Tensor) -> Dict[str, Any]:
    """Statistics of one layer's attention weights [B, H, S, S], summed over the kept samples."""
    types = torch.stack([getattr(inputs, t) for t in TYPES], dim=1)[keep].float()  # [B', 3, S]
    queries = inputs.instruction[keep].float()  # [B', S]
    n_queries, n_types = queries.sum(1), types.sum(2)  # [B'], [B', 3]
    a = attn[keep].float().mean(1)  # [B', S, S], averaged over heads
    to_type = torch.einsum("bqk,btk->bqt", a, types)  # [B', S, 3]: attention each query gives each type
    mass = (to_type * queries[..., None]).sum(1) / n_queries[:, None]  # [B', 3]
    per_token = mass / n_types.clamp(min=1)
    share = per_token / per_token.sum(1, keepdim=True)
    p = a * inputs.visual[keep][:, None, :].float()  # attention on visual keys only, renormalised
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)  # [B', S]
    entropy = (entropy * queries).sum(1) / n_queries
    return {
        "samples": int(keep.sum()),
        "mass": dict(zip(TYPES, mass.sum(0).tolist())),
        "share": dict(zip(TYPES, share.sum(0).tolist())),
        "visual_entropy": float(entropy.sum()),
        "visual_entropy_uniform": float(n_types[:, 1].log().sum()),
    }


@torch.no_grad()
def attention_stats(llm: nn.Module, inputs: LLMInputs) -> List[Dict[str, Any]]:
    """Per layer, summed over the samples with media and instruction tokens (divide by ``samples``):
    ``mass``/``share`` per type and ``visual_entropy``, each already averaged within a sample.

    Each layer's weights are reduced as soon as its attention returns them (eager attention returns
    ``(output, weights)``), so at most one layer's [B, H, S, S] is alive, and no logits are computed.
    """
    keep = inputs.visual.any(1) & inputs.instruction.any(1)  # samples the analysis can speak about
    layers: List[Dict[str, Any]] = []

    def record(module, args, output) -> None:
        if not isinstance(output, tuple) or output[1] is None:
            raise RuntimeError(f"{type(module).__name__} returned no attention weights; expected eager attention")
        layers.append(_layer_stats(output[1], inputs, keep))

    decoder = llm.get_decoder()
    handles = [layer.self_attn.register_forward_hook(record) for layer in decoder.layers]
    try:
        with eager_attention(llm):
            decoder(inputs_embeds=inputs.embeds, attention_mask=inputs.mask, position_ids=inputs.position_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return layers


# --------------------------------------------------------------------------- layer-drop
def _hide_visual(mask: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """4D layer mask [B, 1, S, S] with visual keys hidden from every non-visual query.

    Visual queries keep their keys, so no row is left empty (an all-masked row would give NaN).
    """
    block = (~visual)[:, None, :, None] & visual[:, None, None, :]  # [B, 1, S, S]
    if mask.dtype == torch.bool:  # True = may attend
        return mask & ~block
    return mask.masked_fill(block, torch.finfo(mask.dtype).min)  # additive float mask


@contextmanager
def drop_visual_from(llm: nn.Module, k: int, visual: torch.Tensor) -> Iterator[None]:
    """While active, decoder layers ``k, k+1, ...`` of ``llm`` see no visual keys."""
    def hide(module, args, kwargs):
        if kwargs.get("attention_mask") is None:
            raise RuntimeError("layer-drop needs an explicit 4D attention mask (eager attention)")
        return args, {**kwargs, "attention_mask": _hide_visual(kwargs["attention_mask"], visual)}

    layers = llm.get_decoder().layers
    handles = [layer.register_forward_pre_hook(hide, with_kwargs=True) for layer in layers[k:]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def answer_scores(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Teacher-forced scores per sample: ``log_likelihood`` (mean log p of the answer tokens) and
    ``exact_match`` (1 when every answer token is the argmax). logits [B, S, V], labels [B, S]."""
    logp = logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    scored = target != IGNORE_INDEX
    token_logp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * scored
    hit = (logp.argmax(-1) == target) | ~scored
    n = scored.sum(1)
    return {"log_likelihood": token_logp.sum(1) / n.clamp(min=1), "exact_match": hit.all(1).float(), "scored": n > 0}


@torch.no_grad()
def layer_drop(llm: nn.Module, inputs: LLMInputs, ks: Optional[Iterable[int]] = None) -> List[Dict[str, Any]]:
    """Answer scores with the visual tokens dropped from layer k on, for each k (default 0..layers),
    summed over the samples with media and answers (divide by ``samples``)."""
    n_layers = len(llm.get_decoder().layers)
    keep = inputs.visual.any(1) & inputs.answer.any(1)
    rows = []
    with eager_attention(llm):
        for k in ks if ks is not None else range(n_layers + 1):
            with drop_visual_from(llm, k, inputs.visual):
                logits = llm(inputs_embeds=inputs.embeds, attention_mask=inputs.mask,
                             position_ids=inputs.position_ids, use_cache=False).logits
            scores = answer_scores(logits, inputs.labels)
            rows.append({"k": k, "samples": int(keep.sum()),
                         **{m: float(scores[m][keep].sum()) for m in ("log_likelihood", "exact_match")}})
    return rows


# --------------------------------------------------------------------------- over a data set
def _accumulate(total: List[Dict[str, Any]], part: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    if not total:
        return part
    for t, p in zip(total, part):
        for key, value in p.items():
            if isinstance(value, dict):
                t[key] = {n: t[key][n] + v for n, v in value.items()}
            elif key != "k":
                t[key] += value
    return total


def _mean(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for row in rows:
        n = max(row["samples"], 1)
        out.append({key: ({t: v / n for t, v in value.items()} if isinstance(value, dict)
                          else value / n if key not in ("k", "samples") else value) for key, value in row.items()})
    return out


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def analyze(model: nn.Module, batches: Iterable[Dict[str, Any]], with_layer_drop: bool = True,
            max_batches: Optional[int] = None) -> Dict[str, Any]:
    """``{"layers": [per-layer means], "layer_drop": [per-k means]}`` over ``batches`` (eval mode),
    each batch moved to the model's device."""
    model.eval()
    device = next(model.parameters()).device
    layers: List[Dict[str, Any]] = []
    drops: List[Dict[str, Any]] = []
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = _to_device(batch, device)
        with torch.no_grad():
            inputs = llm_inputs(model, batch)
        layers = _accumulate(layers, attention_stats(model.llm, inputs))
        if with_layer_drop:
            drops = _accumulate(drops, layer_drop(model.llm, inputs))
    result = {"layers": [{"layer": i, **row} for i, row in enumerate(_mean(layers))]}
    if with_layer_drop:
        result["layer_drop"] = _mean(drops)
    return result


# --------------------------------------------------------------------------- output
def layer_rows(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One flat row per layer (``mass_visual``, ``share_visual``, ..., ``drop_log_likelihood`` of k = layer)."""
    drops = {row["k"]: row for row in result.get("layer_drop", [])}
    rows = []
    for layer in result["layers"]:
        row = {"layer": layer["layer"], "samples": layer["samples"]}
        for kind in ("mass", "share"):
            row.update({f"{kind}_{t}": layer[kind][t] for t in TYPES})
        row["visual_entropy"], row["visual_entropy_uniform"] = layer["visual_entropy"], layer["visual_entropy_uniform"]
        drop = drops.get(layer["layer"], {})
        row.update({f"drop_from_here_{m}": drop.get(m) for m in ("log_likelihood", "exact_match")})
        rows.append(row)
    return rows


def write_result(result: Dict[str, Any], path: str) -> None:
    """JSON (the whole result) or CSV (one row per layer, see :func:`layer_rows`), by extension."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".csv":
        rows = layer_rows(result)
        with target.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        target.write_text(json.dumps(result, indent=2))


def plot_result(result: Dict[str, Any], path: str, title: str = "") -> None:
    """PNG: attention share per token type, visual entropy, and layer-drop scores against the layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [row["layer"] for row in result["layers"]]
    panels = 3 if result.get("layer_drop") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    for t in TYPES:
        axes[0].plot(layers, [row["share"][t] for row in result["layers"]], marker=".", label=t)
    axes[0].set(xlabel="LLM layer", ylabel="attention per token, normalised", title="instruction attends to")
    axes[0].legend()
    axes[1].plot(layers, [row["visual_entropy"] for row in result["layers"]], marker=".", label="measured")
    axes[1].plot(layers, [row["visual_entropy_uniform"] for row in result["layers"]], "--", label="uniform")
    axes[1].set(xlabel="LLM layer", ylabel="nats", title="entropy over visual tokens")
    axes[1].legend()
    if panels == 3:
        drops = result["layer_drop"]
        ks = [row["k"] for row in drops]
        axes[2].plot(ks, [row["log_likelihood"] for row in drops], marker=".", color="C0")
        axes[2].set(xlabel="visual tokens dropped from layer k", ylabel="answer log-likelihood per token", title="layer-drop")
        twin = axes[2].twinx()
        twin.plot(ks, [row["exact_match"] for row in drops], marker="x", color="C3")
        twin.set_ylabel("exact match", color="C3")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
def load_model(target: str, overrides: List[str]) -> tuple:
    """(model, cfg) from a model directory (``lm-mini export`` / ``import``), a run directory or name
    (``<logging.runs_dir>/*/<name>``), a checkpoint, or a YAML config (random weights, or the weights its model paths name)."""
    from omegaconf import OmegaConf

    from lm_mini.config import apply_overrides, load_config, saved_model_overrides, schema
    from lm_mini.eval.efficiency import measured_model
    from lm_mini.interop.export import load_model as load_source
    from lm_mini.runs import runs_named

    path = Path(target)
    if path.suffix in (".yaml", ".yml"):
        cfg = load_config(path, overrides)
        return measured_model(cfg.model, "cpu"), cfg
    if not path.exists():  # a run name: <logging.runs_dir>/<experiment>/<name> (runs_dir: default, or an override)
        named = runs_named(target, load_config(None, overrides).logging.runs_dir)
        path = named[0] if len(named) == 1 else path
    model, cfg = load_source(path, backends=saved_model_overrides(overrides))
    return model, apply_overrides(OmegaConf.merge(schema(), cfg), overrides)


def analyze_target(target: str, overrides: List[str], data: str, batch_size: int = 4, max_batches: Optional[int] = None,
                   with_layer_drop: bool = True, device: str = "cpu") -> Dict[str, Any]:
    """:func:`analyze` of the model ``target`` names (see :func:`load_model`) on the shard set ``data``; ``max_batches``
    None: all, or ``eval.max_samples`` worth of whole batches."""
    from lm_mini.config import ShardSetConfig
    from lm_mini.data.datamodule import build_datamodule

    model, cfg = load_model(target, overrides)
    model.to(device)
    cfg.data.val = [ShardSetConfig(path=data)]
    cfg.data.batch_size = batch_size
    loader = build_datamodule(cfg, rank=0, world_size=1).val_dataloader()
    if max_batches is None and cfg.eval.max_samples:  # eval.max_samples=N: the first N samples, in whole batches
        max_batches = -(-cfg.eval.max_samples // batch_size)
    return analyze(model, loader, with_layer_drop=with_layer_drop, max_batches=max_batches)
