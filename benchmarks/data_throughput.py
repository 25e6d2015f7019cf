"""Data loading throughput: our streaming shard loader vs a LLaVA-style loose-file loader vs the ceiling.

    .venv/bin/python benchmarks/data_throughput.py [--n 2000] [--workers 2] [--batch-size 16] [--cache cold]

Everything runs on the same ``--n`` generated JPEGs (``--source-size`` px, resized to the encoder's
``--image-size``; a third of the records multi-turn), side by side in one run; each loader is timed
over full passes, ``--rounds`` times in alternating order, and its best pass is kept (other processes
share the machine). With ``--cache cold`` (default) the image files and shards are evicted from the
page cache before every pass, as in training on a dataset larger than RAM; ``--cache warm`` leaves
them cached. A per-sample cost breakdown of the pipeline's stages (one process) follows the table.
Next to samples/s (wall clock), samples per CPU-second (this process + its workers) show the cost per
sample independently of other load on the machine.

- ``streaming``: ours — WebDataset shards built by ``build_shards``, read by the planned
  ``StreamingLoader`` (decode + resize + tokenize + collate in ``--workers`` worker processes). Its
  batches carry uint8 views, which the model normalises on its device; here the consuming process
  normalises every batch, on the CPU, so that every row ends with the same normalised float views.
- ``llava-style``: official LLaVA-1.5's loader re-created (``LlavaLazyDataset``): a JSON list, a
  map-style ``Dataset`` that opens each loose image file by path, transformers' ``CLIPImageProcessor``
  for the pixels, ``preprocess_v1``'s tokenization and masking, its padding collator, a plain
  ``DataLoader`` with the same workers. It delivers the same token ids and labels as ours (checked
  before timing). The target (>= 1.5x) is set on this row.
- ``loose files, our pixels``: the same loose-file layout with *all* of our per-sample pipeline
  (pixels, tokenization, collate): the ratio to it isolates the data layout alone. On a local disk a
  file open is cheap even cold; on a cluster's network file system each open is a metadata round
  trip, which this machine cannot show.
- ``ceiling``: bare decode + resize (+ normalise) in a loop, one process, bytes already in memory.
"""
from __future__ import annotations

import argparse
import copy
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
from lm_mini.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX  # noqa: E402
from lm_mini.data.conversation import VICUNA_V1, tokenize_conversation  # noqa: E402
from lm_mini.data.media import decode_image  # noqa: E402
from lm_mini.data.samples import Collator  # noqa: E402
from lm_mini.data.shard_builder import build_shards  # noqa: E402
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
        turns = [{"from": "human", "value": "<image>\nWhat colours does this picture show?"},
                 {"from": "gpt", "value": f"Picture {i} shows smooth colour fields."}]
        if i % 3 == 0:  # multi-turn records, as in LLaVA's instruction mix
            turns += [{"from": "human", "value": "Is there any grain?"}, {"from": "gpt", "value": "Yes, a little."}]
        records.append({"id": str(i), "image": f"images/{i:06d}.jpg", "conversations": turns})
    (root / "llava.json").write_text(json.dumps(records))
    build_shards([root / "llava.json"], root, root / "shards", shard_size=250, workers=2)
    train_tokenizer([t["value"] for r in records[:200] for t in r["conversations"]],
                    root / "tok", vocab_size=400)
    return {"records": records}


class LooseFileDataset(Dataset):
    """A JSON list; each item opens its image file by path, then runs *our* pixels, tokenization and collate."""

    def __init__(self, root: Path, processor):
        self.root, self.records, self.processor = root, json.loads((root / "llava.json").read_text()), processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec, p = self.records[i], self.processor
        tok = tokenize_conversation(rec["conversations"], p.tokenizer, p.template, p.max_length, has_media=True)
        with open(self.root / rec["image"], "rb") as f:
            pixels = p.images.image(decode_image(f.read()))  # uint8, normalised by the consumer as ours
        return {"input_ids": tok.input_ids, "labels": tok.labels, "pixel_values": pixels, "frames": 1,
                "is_video": False, "sample_id": rec["id"], "flags": []}


class LlavaLazyDataset(Dataset):
    """The per-item work of official LLaVA-1.5's ``LazySupervisedDataset`` (``--version v1``), re-created.

    Per item: the record's conversations deep-copied and the ``<image>`` tag moved to the start of its
    turn; the image opened by path, ``convert("RGB")``, then ``CLIPImageProcessor.preprocess`` (float
    pixels, normalised in the worker); the vicuna_v1 prompt tokenized as ``tokenizer_image_token`` does
    (each text chunk around ``<image>`` in its own tokenizer call); labels masked as ``preprocess_v1``
    does, by re-tokenizing every round and its instruction to measure their lengths.
    """

    SEP, SEP2, ROLES = " ", "</s>", {"human": "USER", "gpt": "ASSISTANT"}

    def __init__(self, root: Path, tokenizer, image_processor, system: str):
        self.root, self.records = root, json.loads((root / "llava.json").read_text())
        self.tokenizer, self.image_processor, self.system = tokenizer, image_processor, system

    def __len__(self) -> int:
        return len(self.records)

    def _tokens(self, text: str) -> list:
        """``tokenizer_image_token``: chunks tokenized one call each, joined by the image id, one BOS.

        Llama's tokenizer starts every call with BOS, which ``preprocess_v1``'s length arithmetic counts
        on; the benchmark's BPE tokenizer adds none, so it is prepended here.
        """
        bos = [self.tokenizer.bos_token_id]
        chunks = [bos + self.tokenizer(chunk).input_ids for chunk in text.split(IMAGE_PLACEHOLDER)]
        ids = list(bos)
        for k, chunk in enumerate(chunks):
            ids += ([IMAGE_TOKEN_INDEX] if k else []) + chunk[1:]
        return ids

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        image = Image.open(self.root / rec["image"]).convert("RGB")
        pixels = self.image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
        turns = copy.deepcopy(rec["conversations"])
        for turn in turns:
            if IMAGE_PLACEHOLDER in turn["value"]:
                turn["value"] = (IMAGE_PLACEHOLDER + "\n" + turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()).strip()
        prompt = self.system + self.SEP
        for k, turn in enumerate(turns):
            prompt += f"{self.ROLES[turn['from']]}: {turn['value']}" + (self.SEP, self.SEP2)[k % 2]
        input_ids = torch.tensor(self._tokens(prompt), dtype=torch.long)
        labels, cur = input_ids.clone(), 1
        labels[:cur] = IGNORE_INDEX
        sep = self.SEP + self.ROLES["gpt"] + ": "
        for round_text in prompt.split(self.SEP2):
            parts = round_text.split(sep)
            if not round_text or len(parts) != 2:
                break
            round_len, instruction_len = len(self._tokens(round_text)), len(self._tokens(parts[0] + sep)) - 2
            labels[cur: cur + instruction_len] = IGNORE_INDEX
            cur += round_len
        labels[cur:] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels, "image": pixels}


class LlavaCollator:
    """Official ``DataCollatorForSupervisedDataset``: ``pad_sequence`` of ids and labels, stacked images."""

    def __init__(self, pad_id: int, max_length: int):
        self.pad_id, self.max_length = pad_id, max_length

    def __call__(self, items: list) -> dict:
        pad = torch.nn.utils.rnn.pad_sequence
        input_ids = pad([x["input_ids"] for x in items], batch_first=True, padding_value=self.pad_id)[:, :self.max_length]
        labels = pad([x["labels"] for x in items], batch_first=True, padding_value=IGNORE_INDEX)[:, :self.max_length]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(self.pad_id),
                "images": torch.stack([x["image"] for x in items])}


def check_same_tokens(llava: LlavaLazyDataset, processor, n: int = 20) -> None:
    """The LLaVA row's ids and labels equal ours, so the rows differ in cost, not in what they deliver."""
    for i in range(min(n, len(llava))):
        item = llava[i]
        tok = tokenize_conversation(llava.records[i]["conversations"], processor.tokenizer, processor.template,
                                    processor.max_length, has_media=True)
        assert item["input_ids"].tolist() == tok.input_ids and item["labels"].tolist() == tok.labels, f"sample {i}"


def evict(paths: list) -> None:
    """Drop ``paths`` from the page cache, so the next pass reads them from disk as training on a dataset
    larger than RAM does (the 558K + 665K LLaVA images are hundreds of GB). Linux only."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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
        ids = batch.get("sample_ids")
        n += len(batch["input_ids"]) if ids is None else sum(i is not None for i in ids)  # ours pads with None
    return n


def ceiling(data: list, images) -> int:
    for raw in data:
        images.normalize(images.image(decode_image(raw)))
    return len(data)


def breakdown(root: Path, processor, n: int) -> dict:
    """CPU milliseconds per sample of each stage, timed separately over the first ``n`` samples."""
    from lm_mini.data.shard_reader import read_shard, shard_paths

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
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold",
                    help="cold: image files and shards are evicted from the page cache before every pass")
    args = ap.parse_args()
    if args.cache == "cold" and not hasattr(os, "posix_fadvise"):
        ap.error("--cache cold needs os.posix_fadvise (Linux); use --cache warm")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_data(root, args.n, args.source_size)
        print(f"made {args.n} JPEGs of {args.source_size}px, loose + {len(list((root / 'shards').glob('*.tar')))} shards, "
              f"in {time.perf_counter() - t0:.1f} s")
        cfg = load_config(overrides=["model.encoder.name=hf_clip", f"model.encoder.config.image_size={args.image_size}",
                                     "model.encoder.config.patch_size=14"])
        cfg.data.tokenizer, cfg.data.train = str(root / "tok"), [ShardSetConfig(str(root / "shards"))]
        cfg.data.batch_size, cfg.data.num_workers, cfg.data.template = args.batch_size, args.workers, "vicuna_v1"
        processor = build_processor(cfg)
        collate = Collator(processor.pad_id)
        in_memory = [(root / r["image"]).read_bytes() for r in json.loads((root / "llava.json").read_text())]

        def loose(dataset, collate_fn):
            return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                              collate_fn=collate_fn)

        hf = CLIPImageProcessor(size={"shortest_edge": args.image_size},
                                crop_size={"height": args.image_size, "width": args.image_size})
        llava = LlavaLazyDataset(root, processor.tokenizer, hf, VICUNA_V1.system)
        check_same_tokens(llava, processor)
        runs = {
            OURS: lambda: count_samples(build_loader(cfg, train=True, processor=processor), processor.images),
            LLAVA: lambda: count_samples(loose(llava, LlavaCollator(processor.pad_id, processor.max_length))),
            LAYOUT: lambda: count_samples(loose(LooseFileDataset(root, processor), collate), processor.images),
            CEILING: lambda: ceiling(in_memory, processor.images),
        }

        files = [str(f) for f in (root / "images").iterdir()] + [str(f) for f in (root / "shards").glob("*.tar")]
        best, per_cpu = {}, {}
        for r in range(args.rounds):
            for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
                if args.cache == "cold":
                    evict(files)
                t, c = time.perf_counter(), cpu_seconds()
                n = runs[name]()
                rate, cpu_rate = n / (time.perf_counter() - t), n / (cpu_seconds() - c)
                assert n == args.n, f"{name} delivered {n} of {args.n} samples"
                best[name] = max(best.get(name, 0.0), rate)
                per_cpu[name] = max(per_cpu.get(name, 0.0), cpu_rate)
        costs = breakdown(root, processor, min(args.n, 300))

    ours = best[OURS]
    print(f"\n{args.n} images {args.source_size}px -> {args.image_size}px, batch {args.batch_size}, "
          f"workers {args.workers} (ceiling: 1 process), {os.cpu_count()} CPUs, {args.cache} page cache")
    print(f"{'loader':48s} {'samples/s':>10s} {'ours / it':>10s} {'per CPU-s':>10s} {'ours / it':>10s}")
    for name, rate in best.items():
        print(f"{name:48s} {rate:10.1f} {ours / rate:10.2f} {per_cpu[name]:10.1f} {per_cpu[OURS] / per_cpu[name]:10.2f}")
    print(f"\nours vs llava-style: {ours / best[LLAVA]:.2f}x (target >= 1.5x); ours vs ceiling: {ours / best[CEILING]:.0%} "
          f"(target >= 70%); data layout alone: {ours / best[LAYOUT]:.2f}x")
    print("\nper-sample CPU cost by stage, one process (ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))


if __name__ == "__main__":
    main()
