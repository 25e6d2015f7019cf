"""Data loading throughput: our streaming shard loader vs a LLaVA-style loose-file loader vs the ceiling.

    .venv/bin/python benchmarks/data_throughput.py [--n 2000] [--workers 2] [--batch-size 16]

Everything runs on the same ``--n`` generated JPEGs (``--source-size`` px, resized to the encoder's
``--image-size``), side by side in one run; each loader is timed over full passes, ``--rounds``
times in alternating order, and its best pass is kept (other processes share the machine). A
per-sample cost breakdown of the pipeline's stages (one process) follows the table. Next to
samples/s (wall clock), samples per CPU-second (this process + its workers) show the cost per
sample independently of other load on the machine.

- ``streaming``: ours — WebDataset shards built by ``build_shards``, read by the planned
  ``StreamingLoader`` (decode + resize + tokenize + collate in ``--workers`` worker processes). Its
  batches carry uint8 views, which the model normalises on its device; here the consuming process
  normalises every batch, on the CPU, so that every row ends with the same normalised float views.
- ``llava-style``: the official LLaVA loader's pattern — a JSON list, a map-style ``Dataset`` that opens
  each loose image file by path (``Image.open(...).convert("RGB")``), transformers'
  ``CLIPImageProcessor`` for the pixels (as LLaVA's ``LazySupervisedDataset``), a plain ``DataLoader``
  with the same workers. It shares our tokenizer and collate, so the ratio measures data layout and
  pixel pipeline. The target (>= 1.5x) is set on this row.
- ``loose files, our pixels``: the same loose-file loader with *our* pixel pipeline (decode, resize,
  uint8 hand-over, normalised by the consumer): the ratio to it isolates the data layout alone (on a
  local, page-cached disk opening a file is cheap; on a cluster's network file system each open is a
  metadata round trip, which this machine cannot show).
- ``ceiling``: bare decode + resize (+ normalise) in a loop, one process, bytes already in memory.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from transformers import CLIPImageProcessor  # noqa: E402

from lm_mini.config import ShardSetConfig, load_config  # noqa: E402
from lm_mini.data.conversation import tokenize_conversation  # noqa: E402
from lm_mini.data.media import decode_image  # noqa: E402
from lm_mini.data.samples import Collator  # noqa: E402
from lm_mini.data.shards import build_shards  # noqa: E402
from lm_mini.data.streaming import build_loader, build_processor  # noqa: E402
from lm_mini.data.tokenizer import train_tokenizer  # noqa: E402


OURS, LLAVA = "streaming shards (ours)", "llava-style: loose files + CLIPImageProcessor"
LAYOUT, CEILING = "loose files, our pixels (layout only)", "ceiling: decode+resize loop"


def make_data(root: Path, n: int, size: int) -> dict:
    """``n`` JPEGs (smooth random colour fields with grain, like photos compress) + LLaVA JSON + shards."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i:06d}.jpg", quality=90)
        records.append({"id": str(i), "image": f"images/{i:06d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colours does this picture show?"},
            {"from": "gpt", "value": f"Picture {i} shows smooth colour fields."}]})
    (root / "llava.json").write_text(json.dumps(records))
    build_shards([root / "llava.json"], root, root / "shards", shard_size=250, workers=2)
    train_tokenizer([r["conversations"][0]["value"] + r["conversations"][1]["value"] for r in records[:200]],
                    root / "tok", vocab_size=400)
    return {"records": records}


class LooseFileDataset(Dataset):
    """LLaVA's ``LazySupervisedDataset`` pattern: a JSON list; each item opens its image file by path."""

    def __init__(self, root: Path, processor, hf_processor=None):
        self.root, self.records = root, json.loads((root / "llava.json").read_text())
        self.processor, self.hf = processor, hf_processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec, p = self.records[i], self.processor
        tok = tokenize_conversation(rec["conversations"], p.tokenizer, p.template, p.max_length, has_media=True)
        if self.hf is not None:  # as LLaVA: PIL open + convert, then the HF image processor
            image = Image.open(self.root / rec["image"]).convert("RGB")
            pixels = self.hf.preprocess(image, return_tensors="pt")["pixel_values"]
        else:
            with open(self.root / rec["image"], "rb") as f:
                pixels = p.images.image(decode_image(f.read()))  # uint8, normalised by the consumer as ours
        return {"input_ids": tok.input_ids, "labels": tok.labels, "pixel_values": pixels, "frames": 1,
                "is_video": False, "sample_id": rec["id"], "flags": []}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, joined after a pass).

    Samples per CPU-second do not depend on what else runs on the machine; samples/s do.
    """
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def count_samples(loader, images=None) -> int:
    """Samples delivered by ``loader``; with ``images`` (an ``ImageProcessor``) each batch's uint8 views are
    normalised to float here, as the model does on its device."""
    n = 0
    for batch in loader:
        if images is not None:
            images.normalize(batch["pixel_values"])
        n += sum(i is not None for i in batch["sample_ids"])
    return n


def ceiling(data: list, images) -> int:
    for raw in data:
        images.normalize(images.image(decode_image(raw)))
    return len(data)


def breakdown(root: Path, processor, n: int) -> dict:
    """CPU milliseconds per sample of each stage, timed separately over the first ``n`` samples."""
    from lm_mini.data.shards import shard_paths
    from lm_mini.data.streaming import read_shard

    records = json.loads((root / "llava.json").read_text())[:n]
    p = processor
    t = time.process_time()
    raws = list(itertools.islice((r for url in shard_paths(root / "shards") for r in read_shard(url)), n))
    stages = {"shard read": time.process_time() - t}
    t = time.process_time()
    for r in records:
        with open(root / r["image"], "rb") as f:
            f.read()
    stages["loose file read"] = time.process_time() - t
    t = time.process_time()
    images = [decode_image(r.media_bytes) for r in raws]
    stages["decode"] = time.process_time() - t
    t = time.process_time()
    views = [p.images.image(im) for im in images]
    stages["resize (uint8)"] = time.process_time() - t
    t = time.process_time()
    for r in raws:
        tokenize_conversation(r.record["conversations"], p.tokenizer, p.template, p.max_length, has_media=True)
    stages["tokenize"] = time.process_time() - t
    t = time.process_time()
    collate = Collator(p.pad_id)
    batches = [collate([{"input_ids": [1] * 40, "labels": [1] * 40, "pixel_values": v, "frames": 1, "is_video": False,
                         "sample_id": "x", "flags": []} for v in views[i:i + 16]]) for i in range(0, n, 16)]
    stages["collate"] = time.process_time() - t
    t = time.process_time()
    for batch in batches:
        p.images.normalize(batch["pixel_values"])
    stages["normalise (batch, consumer)"] = time.process_time() - t
    return {k: 1000 * v / n for k, v in stages.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--source-size", type=int, default=336)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_data(root, args.n, args.source_size)
        print(f"made {args.n} JPEGs of {args.source_size}px, loose + {args.n // 250} shards, in {time.perf_counter() - t0:.1f} s")
        cfg = load_config(overrides=["model.encoder.name=hf_clip", f"model.encoder.config.image_size={args.image_size}",
                                     "model.encoder.config.patch_size=14"])
        cfg.data.tokenizer, cfg.data.train = str(root / "tok"), [ShardSetConfig(str(root / "shards"))]
        cfg.data.batch_size, cfg.data.num_workers, cfg.data.template = args.batch_size, args.workers, "vicuna_v1"
        processor = build_processor(cfg)
        collate = Collator(processor.pad_id)
        in_memory = [(root / r["image"]).read_bytes() for r in json.loads((root / "llava.json").read_text())]

        def loose(hf=None):
            return DataLoader(LooseFileDataset(root, processor, hf), batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers, collate_fn=collate)

        hf = CLIPImageProcessor(size={"shortest_edge": args.image_size},
                                crop_size={"height": args.image_size, "width": args.image_size})
        runs = {
            OURS: lambda: count_samples(build_loader(cfg, train=True, processor=processor), processor.images),
            LLAVA: lambda: count_samples(loose(hf)),
            LAYOUT: lambda: count_samples(loose(), processor.images),
            CEILING: lambda: ceiling(in_memory, processor.images),
        }

        best, per_cpu = {}, {}
        for r in range(args.rounds):
            for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
                t, c = time.perf_counter(), cpu_seconds()
                n = runs[name]()
                rate, cpu_rate = n / (time.perf_counter() - t), n / (cpu_seconds() - c)
                assert n == args.n, f"{name} delivered {n} of {args.n} samples"
                best[name] = max(best.get(name, 0.0), rate)
                per_cpu[name] = max(per_cpu.get(name, 0.0), cpu_rate)
        costs = breakdown(root, processor, min(args.n, 300))

    ours = best[OURS]
    print(f"\n{args.n} images {args.source_size}px -> {args.image_size}px, batch {args.batch_size}, "
          f"workers {args.workers} (ceiling: 1 process), {os.cpu_count()} CPUs")
    print(f"{'loader':48s} {'samples/s':>10s} {'ours / it':>10s} {'per CPU-s':>10s} {'ours / it':>10s}")
    for name, rate in best.items():
        print(f"{name:48s} {rate:10.1f} {ours / rate:10.2f} {per_cpu[name]:10.1f} {per_cpu[OURS] / per_cpu[name]:10.2f}")
    print(f"\nours vs llava-style: {ours / best[LLAVA]:.2f}x (target >= 1.5x); ours vs ceiling: {ours / best[CEILING]:.0%} "
          f"(target >= 70%); data layout alone: {ours / best[LAYOUT]:.2f}x")
    print("\nper-sample CPU cost by stage, one process (ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))


if __name__ == "__main__":
    main()
