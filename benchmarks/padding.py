"""Padding with and without length-grouped batches (``data.group_by_length``) on lengths shaped like LLaVA-1.5's
665K instruction mix, through the streaming loader's own plan and grouping code.

    python benchmarks/padding.py [--samples 665000] [--markdown] [--json FILE]

**Lengths.** The mix's records are not shipped here, so their token lengths (Vicuna tokenizer, vicuna_v1 template:
a 35-token system prompt, 8 template tokens per turn, 1 ``<image>`` slot) are drawn from a model of each source,
with the source sizes of LLaVA-1.5's Table 7 and its way of merging the QA pairs of one image into one
multi-turn conversation (``MIX`` below: turns, question and answer tokens per source; long answers log-normal,
ShareGPT cut at 2,048 tokens). Text-only samples are ShareGPT's 40K (6%); every other one has one image.

**Loader.** One shard set of the mix in random record order (shards of 1,000), 8 ranks x 4 workers, batch 16
per device (LLaVA-1.5's 128), shuffle buffer 1,000: the sample order of every worker comes from
``EpochPlan`` (the plan the loader follows) and, grouped, from ``lm_mini.data.grouping.group_by_length`` with
the key the loader uses. The LLM sequence of a sample is its text with the image slot replaced by the visual
tokens: 576 (LLaVA-1.5) or 1 (LLaVA-Mini, C = 1).

**Padding fraction** = padded positions / all positions of the ``[16, longest]`` batches, over the epoch (the
share of the LLM's compute spent on padding), and the mean of the per-step fraction that training logs.

For reference, LLaVA-1.5's own ``group_by_modality_length`` sampler (``get_modality_length_grouped_indices`` of
haotian-liu/LLaVA llava/train/llava_trainer.py, commit 05f156c, re-implemented with numpy's RNG): mega-batches of
8 x 16 samples of one modality sorted by length and dealt to the 8 ranks by ``split_to_even_chunks``, which
balances the ranks' token totals, so each device's batch spans its mega-batch's range (LLaVA sorts by word
count; the token count is used here).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lm_mini.data.grouping import group_by_length, length_key, padding_fraction  # noqa: E402
from lm_mini.data.plan import PAD, EpochPlan, set_specs  # noqa: E402

SYSTEM, PER_TURN, MAX_LENGTH = 35, 8, 2048  # vicuna_v1: system prompt, "USER: ... ASSISTANT: ...</s>" tokens a turn


@dataclass(frozen=True)
class Source:
    """One source of the mix: ``count`` conversations of ``turns`` (low, high, uniform) question/answer turns.
    A question is ``q`` tokens; an answer ``a`` tokens, or log-normal with median ``a`` and spread ``a_sigma``."""

    name: str
    count: int
    image: bool
    turns: Tuple[int, int]
    q: int
    a: int
    a_sigma: float = 0.0
    q_sigma: float = 0.0


# LLaVA-1.5 Table 7 sizes; QA sources merge an image's questions into one conversation (VQAv2 ~5 a picture,
# GQA ~13, OCR-VQA ~5, VG ~10 region captions), each question with "Answer the question using a single word or phrase."
MIX = (
    Source("llava_conversation", 58_000, True, (2, 8), 15, 60, 0.5),
    Source("llava_detail", 23_000, True, (1, 1), 12, 130, 0.3),
    Source("llava_complex_reasoning", 77_000, True, (1, 1), 25, 150, 0.4),
    Source("sharegpt", 40_000, False, (1, 6), 60, 200, 0.8, 1.0),
    Source("vqav2", 83_000, True, (2, 8), 22, 2),
    Source("gqa", 72_000, True, (5, 20), 25, 2),
    Source("okvqa", 9_000, True, (1, 2), 24, 2),
    Source("ocrvqa", 80_000, True, (3, 7), 22, 5),
    Source("aokvqa", 66_000, True, (1, 3), 45, 1),
    Source("textcaps", 22_000, True, (1, 1), 15, 20, 0.3),
    Source("refcoco", 48_000, True, (3, 7), 28, 12),
    Source("vg", 86_000, True, (5, 15), 26, 9),
)


def sample_lengths(total: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``total`` records in random order, the mix's proportions: (text tokens incl. the image slot, has image)."""
    rng = np.random.default_rng(seed)
    scale = total / sum(s.count for s in MIX)
    lengths, images = [], []
    for s in MIX:
        n = max(1, round(s.count * scale))
        turns = rng.integers(s.turns[0], s.turns[1] + 1, n)
        tokens = np.full(n, SYSTEM + (1 if s.image else 0))
        for t in range(turns.max()):
            on = turns > t
            q = s.q * np.exp(s.q_sigma * rng.standard_normal(n)) if s.q_sigma else np.full(n, s.q)
            a = s.a * np.exp(s.a_sigma * rng.standard_normal(n)) if s.a_sigma else np.full(n, s.a)
            tokens = tokens + on * (PER_TURN + np.maximum(1, q.round()) + np.maximum(1, a.round())).astype(int)
        lengths.append(np.minimum(tokens, MAX_LENGTH))
        images.append(np.full(n, s.image))
    order = rng.permutation(sum(len(x) for x in lengths))
    return np.concatenate(lengths)[order], np.concatenate(images)[order]


def llm_length(text: int, image: bool, visual_tokens: int) -> int:
    return text - 1 + visual_tokens if image else text


def loader_batches(text: np.ndarray, image: np.ndarray, group: int, world: int = 8, workers: int = 4, batch: int = 16,
                   shard: int = 1000, buffer: int = 1000, seed: int = 0) -> List[List[int]]:
    """Every device batch of one epoch as lists of record indices (-1: a padding slot), the way the streaming loader
    forms them: the epoch plan of each (rank, worker), its shuffle buffer, then ``group_by_length`` when ``group``."""
    n = len(text)
    counts = [min(shard, n - s) for s in range(0, n, shard)]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    batches: List[List[int]] = []
    for rank in range(world):
        plan = EpochPlan(set_specs([counts]), seed=seed, epoch=0, rank=rank, world_size=world, num_workers=workers,
                         batch_size=batch, shuffle=True, shuffle_buffer=buffer)
        stream = plan.stream(0)
        for w in range(workers):
            slots = plan.worker_slots(w)
            index = [-1 if s.set_index == PAD else int(starts[stream.locate(s.position)[0]] + stream.locate(s.position)[1])
                     for s in slots]
            emitted = [index[i] for i in plan.emit_order(len(slots), w)]
            if group:
                samples = [{"input_ids": range(int(text[i]) if i >= 0 else 1), "frames": int(image[i]) if i >= 0 else 0,
                            "is_video": False, "index": i} for i in emitted]
                emitted = [s["index"] for s in group_by_length(samples, batch, group, seed=(seed, 0, rank, w))]
            batches += [emitted[b : b + batch] for b in range(0, len(emitted), batch)]
    return batches


def llava_batches(text: np.ndarray, image: np.ndarray, world: int = 8, batch: int = 16, seed: int = 0) -> List[List[int]]:
    """LLaVA-1.5's ``group_by_modality_length`` (llava_trainer.py) and how the Trainer deals its index list to the
    ranks: consecutive per-device batches round-robin, so each mega-batch of ``world x batch`` gives every rank
    one of its ``split_to_even_chunks`` chunks."""
    rng = np.random.default_rng(seed)
    lengths = [int(t) if im else -int(t) for t, im in zip(text, image)]

    def even_chunks(indices: List[int], lens: Sequence[int], k: int) -> List[List[int]]:
        if len(indices) % k:
            return [indices[i::k] for i in range(k)]
        per, chunks, totals = len(indices) // k, [[] for _ in range(k)], [0] * k
        for i in indices:
            c = totals.index(min(totals))
            chunks[c].append(i)
            totals[c] += lens[i]
            if len(chunks[c]) == per:
                totals[c] = float("inf")
        return chunks

    def grouped(lens: Sequence[int]) -> List[int]:
        idx = rng.permutation(len(lens)).tolist()
        mega = world * batch
        out = []
        for m in range(0, len(lens), mega):
            part = sorted(idx[m : m + mega], key=lambda i: lens[i], reverse=True)
            out += [i for chunk in even_chunks(part, lens, world) for i in chunk]
        return out

    mm = [(i, l) for i, l in enumerate(lengths) if l > 0]
    lang = [(i, -l) for i, l in enumerate(lengths) if l < 0]
    mm_order = [mm[i][0] for i in grouped([l for _, l in mm])]
    lang_order = [lang[i][0] for i in grouped([l for _, l in lang])]
    mega = world * batch
    mm_mb = [mm_order[i : i + mega] for i in range(0, len(mm_order), mega)]
    lang_mb = [lang_order[i : i + mega] for i in range(0, len(lang_order), mega)]
    extra = mm_mb[-1] + lang_mb[-1]
    megabatches = mm_mb[:-1] + lang_mb[:-1]
    megabatches = [megabatches[i] for i in rng.permutation(len(megabatches))]
    if len(extra) >= mega:
        megabatches = [extra[:mega]] + megabatches
        extra = extra[mega:]
    if extra:
        megabatches.append(extra)
    flat = [i for m in megabatches for i in m]
    return [flat[b : b + batch] for b in range(0, len(flat), batch)]


def padding_figures(batches: List[List[int]], text: np.ndarray, image: np.ndarray, visual_tokens: int) -> Dict[str, float]:
    """Epoch padding fraction (padded / all positions), the mean per-step fraction, and the mean batch length."""
    positions = padded = 0
    per_step, longest = [], []
    for b in batches:
        lens = [llm_length(int(text[i]), bool(image[i]), visual_tokens) if i >= 0 else 1 for i in b]
        positions += len(lens) * max(lens)
        padded += len(lens) * max(lens) - sum(lens)
        per_step.append(padding_fraction(lens))
        longest.append(max(lens))
    return {"epoch_fraction": padded / positions, "mean_step_fraction": float(np.mean(per_step)),
            "mean_longest": float(np.mean(longest)), "batches": len(batches),
            "positions_vs_unpadded": positions / (positions - padded)}


def run(samples: int = 665_000, groups: Sequence[int] = (0, 4, 16, 64), visual: Sequence[int] = (576, 1),
        llava: bool = True, seed: int = 0) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{visual tokens: {scheme: figures}} for our loader without (``group 0``) and with grouping, and LLaVA's sampler."""
    text, image = sample_lengths(samples, seed)
    schemes = {f"group {k}": loader_batches(text, image, k, seed=seed) for k in groups}
    if llava:
        schemes["LLaVA group_by_modality_length"] = llava_batches(text, image, seed=seed)
    return {str(v): {name: padding_figures(b, text, image, v) for name, b in schemes.items()} for v in visual}


def mix_stats(samples: int, seed: int = 0) -> Dict[str, float]:
    text, image = sample_lengths(samples, seed)
    return {"samples": len(text), "text_only": float(1 - image.mean()), "median_text_tokens": float(np.median(text)),
            "p90_text_tokens": float(np.percentile(text, 90)), "p99_text_tokens": float(np.percentile(text, 99)),
            "median_text_only": float(np.median(text[~image])), "median_image": float(np.median(text[image]))}


def table(report: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    lines = ["| visual tokens | batches | padding (epoch) | mean per step | mean longest | positions / tokens |",
             "|---|---|---|---|---|---|"]
    for v, schemes in report.items():
        for name, f in schemes.items():
            label = {"group 0": "no grouping"}.get(name, name.replace("group ", "group_by_length="))
            lines.append(f"| {v} | {label} | {f['epoch_fraction']:.1%} | {f['mean_step_fraction']:.1%} | "
                         f"{f['mean_longest']:.0f} | {f['positions_vs_unpadded']:.2f}x |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="padding fraction with and without length-grouped batches (665K-shaped lengths)")
    p.add_argument("--samples", type=int, default=665_000)
    p.add_argument("--groups", type=int, nargs="+", default=[0, 4, 16, 64], help="data.group_by_length values (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    started = time.perf_counter()
    stats = mix_stats(args.samples, args.seed)
    report = run(args.samples, args.groups, seed=args.seed)
    print(f"mix: {stats}")
    print(table(report))
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"mix": stats, "report": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
