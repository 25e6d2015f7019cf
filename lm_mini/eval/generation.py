"""Generation for evaluation: the one place that turns a prompt batch into answer strings.

Three callers share it: the held-out evaluation of a training run and ``lm-mini eval --data`` (Lightning's
test loop, :class:`GenerationEval`), and the benchmark runner (``lm_mini.eval.benchmark_runner``, a plain
loop over a benchmark's questions). ``LlavaMini.generate`` does the work (left padding, KV cache, the
compressed vision tokens in the cache); here the options are put in ``transformers`` terms, every
sequence is cut at its first stop token and decoded.

Training imports this module (``LmMiniModule`` is a :class:`GenerationEval`); nothing here imports
``lm_mini.training``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import lightning as L
import torch
from torch import nn


@dataclass(frozen=True)
class GenerationOptions:
    """How answers are generated; the defaults are the paper's evaluation (greedy, one beam).

    ``temperature`` 0 is greedy (as LLaVA's eval scripts: ``do_sample = temperature > 0``); ``top_p`` and
    ``temperature`` only act when sampling."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: Optional[float] = None
    num_beams: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")

    @classmethod
    def from_config(cls, eval_cfg: Any, **overrides: Any) -> "GenerationOptions":
        """From ``cfg.eval`` (keys ``max_new_tokens``, ``temperature``, ``top_p``, ``num_beams``); ``overrides``
        that are not None win (command-line flags)."""
        values = {k: getattr(eval_cfg, k, None) for k in ("max_new_tokens", "temperature", "top_p", "num_beams")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: v for k, v in values.items() if v is not None})

    def generate_kwargs(self) -> Dict[str, Any]:
        """Keywords for ``transformers`` ``generate`` (greedy: no temperature/top_p, which it would warn about)."""
        kwargs: Dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                                  "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        return kwargs

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def stop_token_ids(tokenizer: Any, template: Any) -> List[int]:
    """Ids that end an answer: the template's end-of-turn token and its other stop strings (each when it is one
    token; Llama-3: <|eot_id|>, <|eom_id|>, <|end_of_text|>) and EOS."""
    from lm_mini.registry import TEMPLATES

    template = TEMPLATES.get(template) if isinstance(template, str) else template
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return sorted(set(template.stop_token_ids(tokenizer) + eos))


def first_stop(tokens: Sequence[int], stop: Sequence[int]) -> int:
    """Index of the first stop token in ``tokens`` (``len(tokens)`` when there is none)."""
    return next((i for i, t in enumerate(tokens) if t in stop), len(tokens))


def decode_answers(new_tokens: torch.Tensor, tokenizer: Any, stop: Sequence[int]) -> List[str]:
    """``[B, n]`` generated ids -> B answers: each cut at its first stop token, decoded, stripped."""
    rows = new_tokens.tolist()
    return [tokenizer.decode(row[: first_stop(row, stop)], skip_special_tokens=True).strip() for row in rows]


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@torch.inference_mode()
def generate_answers(model: nn.Module, batch: Mapping[str, Any], tokenizer: Any, stop: Sequence[int],
                     options: GenerationOptions = GenerationOptions(), synced_gpus: bool = False) -> List[str]:
    """Answers to a prompt batch (``input_ids``/``attention_mask`` [B, L] ending at the assistant prefix, media
    as in docs/internals.md). ``synced_gpus``: ranks that finish early keep stepping (needed when layers are
    sharded over ranks, and for DDP ranks that must make the same number of collective calls)."""
    kwargs = options.generate_kwargs()
    kwargs["eos_token_id"] = list(stop) or None
    if synced_gpus:
        kwargs["synced_gpus"] = True
    fsdp = _is_fsdp(model)
    if fsdp:  # generate() enters through the LLM, not the FSDP root: gather the root's own shards first
        model.unshard()
    try:
        new = model.generate(dict(batch), **kwargs)
    finally:
        if fsdp:
            model.reshard()
    return decode_answers(new, tokenizer, stop)


def split_prompt_answer(batch: Dict[str, Any]) -> tuple:
    """An evaluation batch -> (prompt-only batch, gold answer token ids per sample).

    The gold answer of a sample is its first supervised span (answer + end-of-turn token) that starts
    after its media slot (``IMAGE_TOKEN_INDEX``; no slot: its first span), the prompt everything before
    that span: the earlier turns, the media slot and the question. Cut at the first span instead, a record
    whose ``<image>`` sits in a later human turn would lose its slot (its pixels would have nowhere to go).
    When the evaluated answer is the record's last turn, the prompt is exactly what ``build_prompt``
    renders, because the conversation tokenizer checks that every prefix tokenizes the same alone and in
    the whole text; but for ``llava_llama_3_1``, whose generation prompts also carry the tokenizer's own BOS
    (official inference), these training-cut prompts have one BOS, as the model was trained. A record with no
    answer turn gets an empty gold (no reference: left out of scores).
    """
    from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    lengths, golds = [], []
    for b in range(ids.shape[0]):
        slot = ((ids[b] == IMAGE_TOKEN_INDEX) & mask[b].bool()).nonzero().flatten().tolist()
        supervised = (labels[b] != IGNORE_INDEX).nonzero().flatten().tolist()
        supervised = [i for i in supervised if not slot or i > slot[0]]
        start = supervised[0] if supervised else int(mask[b].sum())
        end = start
        while end < labels.shape[1] and labels[b, end] != IGNORE_INDEX:
            end += 1
        lengths.append(max(1, start))
        golds.append(ids[b, start:end].tolist())
    width = max(lengths)
    prompt = dict(batch)
    prompt["input_ids"] = ids[:, :width].clone()
    prompt["attention_mask"] = torch.zeros_like(mask[:, :width])
    for b, n in enumerate(lengths):
        prompt["attention_mask"][b, :n] = 1
    prompt.pop("labels")
    return prompt, golds


class GenerationEval:
    """Lightning ``test_step`` that generates an answer per sample of a shard loader and scores exact match.

    Mixed into a ``LightningModule`` whose ``self.model`` is a ``LlavaMini`` (``LmMiniModule``, or
    :class:`GenerationModule` around a loaded model). Call :meth:`start_generation_eval` before
    ``trainer.test``; afterwards ``eval_examples`` holds ``{id, prediction, gold}`` per evaluated sample of
    this rank and :meth:`gathered_examples` those of all ranks. Samples whose record has no
    answer (empty gold) are generated and kept in ``eval_examples`` but left out of the exact match."""

    model: Optional[nn.Module]

    def start_generation_eval(self, tokenizer: Any, stop_ids: List[int], options: GenerationOptions,
                              max_samples: Optional[int] = None) -> None:
        """``max_samples``: a bound on the samples of this whole test loop (an equal share per rank), for a
        loader that does not bound them itself (ours bounds each shard set: ``eval.max_samples``)."""
        from lm_mini.eval.metrics import ExactMatch

        self.exact_match = ExactMatch().to(self.device)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self._generation: Optional[Dict[str, Any]] = {
            "tokenizer": tokenizer, "stop": sorted(set(stop_ids + eos)), "options": options, "max_samples": max_samples, "seen": 0}
        self.eval_examples: List[Dict[str, Any]] = []

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        g = getattr(self, "_generation", None)
        if g is None:
            raise RuntimeError("call start_generation_eval(...) before trainer.test")
        budget = None if g["max_samples"] is None else -(-g["max_samples"] // self.trainer.world_size) - g["seen"]
        if budget is not None and budget <= 0:  # every rank stops at the same batch
            return
        prompt, golds = split_prompt_answer(batch)
        tok = g["tokenizer"]
        preds = self._generate(prompt, g)
        keep = [i for i, sid in enumerate(batch["sample_ids"]) if sid is not None][:budget]  # no padding samples
        preds = [preds[i] for i in keep]
        golds = [tok.decode(golds[i], skip_special_tokens=True).strip() for i in keep]
        g["seen"] += len(batch["sample_ids"])
        answered = [j for j, a in enumerate(golds) if a]
        self.exact_match.update([preds[j] for j in answered], [golds[j] for j in answered])
        self.log("eval/exact_match", self.exact_match, on_step=False, on_epoch=True, batch_size=max(1, len(answered)))
        self.eval_examples.extend({"id": batch["sample_ids"][i], "prediction": p, "gold": a} for i, p, a in zip(keep, preds, golds))

    def _generate(self, prompt: Dict[str, Any], g: Dict[str, Any]) -> List[str]:
        # ranks finish at different lengths; sharded layers (and DDP's collectives) need all of them
        return generate_answers(self.model, prompt, g["tokenizer"], g["stop"], g["options"],
                                synced_gpus=self.trainer.world_size > 1)

    def gathered_examples(self) -> List[Dict[str, Any]]:
        """``{id, prediction, gold}`` of every evaluated sample on every rank (padding excluded), rank by rank;
        every rank must call it (a collective)."""
        if self.trainer.world_size == 1:
            return list(self.eval_examples)
        out: List[List[Dict[str, Any]]] = [None] * self.trainer.world_size  # type: ignore[list-item]
        torch.distributed.all_gather_object(out, self.eval_examples)
        return [e for part in out for e in part]


class GenerationModule(GenerationEval, L.LightningModule):
    """A loaded model (``lm_mini.interop.export.load_model``) as a LightningModule for the test loop."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Dict[str, Any]) -> Any:
        return self.model(batch)
