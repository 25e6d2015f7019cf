"""Streaming data module: partition, resume in a new process, mixing, bad samples, batch contract."""
import io
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lm_mini.config import ShardSetConfig, load_config
from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lm_mini.data.datamodule import build_datamodule
from lm_mini.data.tokenizer import train_tokenizer

IMAGE_SIZE = 16  # encoder input side for these tests (tiny CLIP config)
COUNTS = {"img": (7, 0, 5, 9), "cap": (4, 4), "text": (3,)}


# ----------------------------------------------------------------------------- fixtures
def _jpeg(i: int, size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size + i % 3), (i * 37 % 256, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _mp4(frames: int = 4, fps: int = 2) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            img = Image.new("RGB", (32, 32), (40 * t, 100, 100))
            container.mux(stream.encode(__import__("av").VideoFrame.from_image(img)))
        container.mux(stream.encode())
    return buf.getvalue()


def _qa(question: str, answer: str, media: bool = True):
    return [{"from": "human", "value": ("<image>\n" if media else "") + question}, {"from": "gpt", "value": answer}]


def write_set(root: Path, name: str, shards, make):
    """A shard set: ``shards`` = samples per shard; ``make(key, i)`` -> {json record, media field}."""
    import webdataset as wds

    out = root / name
    out.mkdir(parents=True)
    index, i = [], 0
    for s, count in enumerate(shards):
        fname = f"{name}-{s:06d}.tar"
        with wds.TarWriter(str(out / fname)) as tar:
            for _ in range(count):
                key = f"{name}{i:05d}"
                sample = {"__key__": key, **make(key, i)}
                sample["json"] = json.dumps(sample["json"]).encode()
                tar.write(sample)
                i += 1
        index.append({"name": fname, "count": count})
    (out / "index.json").write_text(json.dumps({"shards": index}))
    return str(out)


def image_qa(key, i):
    return {"json": {"id": key, "conversations": _qa(f"What colour is shape {i}?", f"Colour {i}.")}, "jpg": _jpeg(i)}


def caption(key, i):
    return {"json": {"id": key, "conversations": _qa("", f"a square number {i}")}, "jpg": _jpeg(i)}


def text_only(key, i):
    return {"json": {"id": key, "conversations": _qa(f"Say {i}.", f"{i}.", media=False)}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    texts = ["USER: What colour is shape 12? ASSISTANT: Colour 12.</s>", "a square number 3\n", "Say 4."] * 10
    train_tokenizer(texts, root / "tok", vocab_size=300)
    return {
        "root": root,
        "tok": str(root / "tok"),
        "img": write_set(root, "img", COUNTS["img"], image_qa),
        "cap": write_set(root, "cap", COUNTS["cap"], caption),
        "text": write_set(root, "text", COUNTS["text"], text_only),
    }


def make_cfg(corpus, train, val=(), **data):
    """A full Config for the data module; ``train`` = [(set name, weight, template)]."""
    cfg = load_config(overrides=[
        "model.encoder.name=hf_clip", f"model.encoder.config.image_size={IMAGE_SIZE}", "model.encoder.config.patch_size=8",
        "seed=3",
    ])
    cfg.data.tokenizer = corpus["tok"]
    cfg.data.train = [ShardSetConfig(corpus[n], w, t) for n, w, t in train]
    cfg.data.val = [ShardSetConfig(corpus[n]) for n in val]
    cfg.data.batch_size, cfg.data.shuffle_buffer, cfg.data.max_length = 3, 4, 512
    for k, v in data.items():
        OmegaConf.update(cfg, k, v)
    return cfg


MIX = [("img", 1.0, None), ("cap", 1.0, "plain"), ("text", 1.0, None)]


def ids_of(batches):
    return [i for b in batches for i in b["sample_ids"]]


# ----------------------------------------------------------------------------- partition
@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_for_world_sizes(corpus, workers):
    expected = Counter(f"{n}{i:05d}" for n in COUNTS for i in range(sum(COUNTS[n])))
    for world in (1, 2, 4):
        ledger, lengths = Counter(), set()
        for rank in range(world):
            dm = build_datamodule(make_cfg(corpus, MIX, **{"data.num_workers": workers}), rank=rank, world_size=world)
            loader = dm.train_dataloader()
            batches = list(loader)
            assert len(batches) == len(loader)  # every rank: exactly its announced length
            lengths.add(len(batches))
            ledger.update(i for i in ids_of(batches) if i is not None)
        assert ledger == expected, f"world {world}"
        assert len(lengths) == 1, f"ranks disagree on batch count: {lengths}"


def test_epochs_reshuffle_deterministically(corpus):
    def two_epochs(seed):
        dm = build_datamodule(make_cfg(corpus, MIX, seed=seed))
        loader = dm.train_dataloader()
        return [ids_of(loader) for _ in range(2)]

    e0, e1 = two_epochs(3)
    assert e0 != e1 and sorted(e0) == sorted(e1)  # a new order, the same samples
    assert two_epochs(3) == [e0, e1]  # same seed: same orders
    assert two_epochs(4)[0] != e0


# ----------------------------------------------------------------------------- resume
RESUME_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from omegaconf import OmegaConf
    from lm_mini.data.datamodule import build_datamodule
    for cfg_path, state_path, out_path in json.loads(sys.argv[1]):
        loader = build_datamodule(OmegaConf.load(cfg_path)).train_dataloader()
        loader.load_state_dict(torch.load(state_path, weights_only=False))
        ids = [b["sample_ids"] for b in loader]          # rest of the interrupted epoch
        ids += [b["sample_ids"] for b in loader]         # and the next one
        json.dump({"ids": ids, "skips": loader.skips.as_dict()}, open(out_path, "w"))
""")


def test_resume_in_new_process_continues_the_same_sequence(corpus, tmp_path):
    jobs, expected = [], {}
    for workers in (0, 2):
        cfg = make_cfg(corpus, MIX, **{"data.num_workers": workers})
        full = build_datamodule(cfg).train_dataloader()
        expected[workers] = [b["sample_ids"] for b in full] + [b["sample_ids"] for b in full]

        loader = build_datamodule(cfg).train_dataloader()
        it, k = iter(loader), 4
        head = [next(it)["sample_ids"] for _ in range(k)]
        assert head == expected[workers][:k]
        cfg_path, state_path = tmp_path / f"cfg{workers}.yaml", tmp_path / f"state{workers}.pt"
        OmegaConf.save(cfg, cfg_path)
        torch.save(loader.state_dict(), state_path)
        del it
        jobs.append((str(cfg_path), str(state_path), str(tmp_path / f"out{workers}.json")))
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(jobs)], check=True, timeout=120)
    for workers, (_, _, out) in zip((0, 2), jobs):
        rest = json.load(open(out))["ids"]
        assert expected[workers][:4] + rest == expected[workers], f"workers={workers}"


def test_resume_refuses_a_different_layout(corpus):
    loader = build_datamodule(make_cfg(corpus, MIX)).train_dataloader()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = build_datamodule(make_cfg(corpus, MIX, **{"data.batch_size": 2})).train_dataloader()
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        next(iter(other))


# ----------------------------------------------------------------------------- mixing
def test_mixing_weights_give_expected_counts(corpus):
    cfg = make_cfg(corpus, [("img", 2.0, None), ("cap", 0.5, "plain"), ("text", 1.0, None)])
    ids = [i for i in ids_of(build_datamodule(cfg).train_dataloader()) if i is not None]
    per_set = Counter(i.rstrip("0123456789") for i in ids)
    assert per_set == {"img": 2 * 21, "cap": 4, "text": 3}
    assert set(Counter(i for i in ids if i.startswith("img")).values()) == {2}  # every image sample twice
    assert len(set(i for i in ids if i.startswith("cap"))) == 4  # half the captions, each once
    # Interleaved, not set after set: the first third of the epoch already holds every set.
    assert {i.rstrip("0123456789") for i in ids[: len(ids) // 3]} == {"img", "cap", "text"}


def test_plain_template_for_caption_set(corpus):
    cfg = make_cfg(corpus, [("cap", 1.0, "plain")], **{"data.template": "vicuna_v1"})
    batch = next(iter(build_datamodule(cfg).train_dataloader()))
    tok = build_datamodule(cfg).processor.tokenizer
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert first[1] == IMAGE_TOKEN_INDEX  # plain: <s><image>caption\n, no system prompt
    assert "USER" not in tok.decode([t for t in first if t >= 0])


# ----------------------------------------------------------------------------- bad samples
def test_corrupt_images_become_counted_padding(corpus, tmp_path):
    def sometimes_corrupt(key, i):
        s = image_qa(key, i)
        if i % 3 == 0:
            s["jpg"] = s["jpg"][:40]  # truncated JPEG
        return s

    corpus = dict(corpus, bad=write_set(tmp_path, "bad", (6, 6), sometimes_corrupt))
    for workers in (0, 2):
        dm = build_datamodule(make_cfg(corpus, [("bad", 1.0, None)], **{"data.num_workers": workers}))
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader) == 4  # lengths unchanged: padding stands in
        ids = ids_of(batches)
        assert sorted(i for i in ids if i is not None) == [f"bad{i:05d}" for i in range(12) if i % 3]
        assert ids.count(None) == 4
        for b in batches:
            pad = torch.tensor([i is None for i in b["sample_ids"]])
            assert (b["labels"][pad] == IGNORE_INDEX).all()
            assert (b["frames_per_sample"][pad] == 0).all()
        assert dm.skip_counts() == {"corrupt_image": 4}


# ----------------------------------------------------------------------------- batch contract
def test_batches_follow_the_contract_for_image_video_text_and_hires(corpus, tmp_path):
    def mixed(key, i):
        if i == 0:
            return {"json": {"id": key, "conversations": _qa("What moves?", "A square.")}, "mp4": _mp4()}
        return image_qa(key, i) if i == 1 else text_only(key, i)

    corpus = dict(corpus, mixed=write_set(tmp_path, "mixed", (3,), mixed))
    cfg = make_cfg(corpus, [("mixed", 1.0, None)], **{"model.resolution_ratio": 2, "data.max_frames": 8,
                                                      "data.video_fps": 2.0, "data.shuffle_buffer": 1})
    dm = build_datamodule(cfg)
    batch = next(iter(dm.train_dataloader()))
    order = [int(i[-1]) for i in batch["sample_ids"]]
    frames = dict(zip(order, batch["frames_per_sample"].tolist()))
    assert frames[1] == 1 and frames[2] == 0 and frames[0] >= 2  # image, text-only, video
    assert batch["is_video"].tolist() == [o == 0 for o in order]
    views = sum(frames[o] if o == 0 else 5 * frames[o] for o in order)  # hi-res R=2: 1 + 2*2 views
    assert batch["pixel_values"].shape == (views, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["pixel_values"].dtype == torch.float32
    B, L = batch["input_ids"].shape
    assert B == 3 and batch["labels"].shape == batch["attention_mask"].shape == (B, L)
    for k in ("input_ids", "labels", "attention_mask", "frames_per_sample"):
        assert batch[k].dtype == torch.long, k
    lengths = batch["attention_mask"].sum(1)
    pad_id = dm.processor.pad_id
    for row, n, o in zip(range(B), lengths.tolist(), order):
        assert (batch["input_ids"][row, n:] == pad_id).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, :n] == IMAGE_TOKEN_INDEX).sum() == (0 if o == 2 else 1)
        assert (batch["labels"][row] != IGNORE_INDEX).any()  # every real sample trains its answer
    assert "skipped" not in batch


def test_val_loader_every_sample_once_in_order(corpus):
    cfg = make_cfg(corpus, MIX, val=["img", "text"], **{"data.batch_size": 4})
    loader = build_datamodule(cfg).val_dataloader()
    ids = ids_of(loader)
    assert ids == [f"img{i:05d}" for i in range(21)] + [f"text{i:05d}" for i in range(3)]
    assert len(loader) == 6  # 24 samples, no padding
