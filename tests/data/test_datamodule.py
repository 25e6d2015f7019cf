"""Streaming data module: partition, resume in a new process, mixing, bad samples, batch contract."""
import io
import shutil
import json
import subprocess
import tarfile
import sys
import textwrap
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lm_mini.config import ShardSetConfig, load_config
from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lm_mini.data.datamodule import build_datamodule
from lm_mini.data.errors import SkipCounter
from lm_mini.data.shard_builder import build_shards
from lm_mini.data.shard_reader import iter_raw_samples, shard_paths
from lm_mini.data.streaming import ShardSet
from lm_mini.data.tokenizer import train_tokenizer

IMAGE_SIZE = 16  # encoder input side for these tests (tiny CLIP config)


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
            container.mux(stream.encode(av.VideoFrame.from_image(Image.new("RGB", (32, 32), (40 * t, 100, 100)))))
        container.mux(stream.encode())
    return buf.getvalue()


def _qa(question: str, answer: str, placeholder: str = "<image>"):
    return [{"from": "human", "value": (placeholder + "\n" if placeholder else "") + question},
            {"from": "gpt", "value": answer}]


def image_qa(i):
    return {"conversations": _qa(f"What colour is shape {i}?", f"Colour {i}."), "image": _jpeg(i)}


def caption(i):
    return {"conversations": _qa("", f"a square number {i}"), "image": _jpeg(i)}


def text_only(i):
    return {"conversations": _qa(f"Say {i}.", f"{i}.", placeholder="")}


def video_qa(i):
    return {"conversations": _qa("What moves?", "A square.", placeholder="<video>"), "video": _mp4()}


def write_set(root: Path, name: str, records, shard_size: int) -> str:
    """LLaVA JSON + media files -> a shard set built by ``build_shards`` (records given as media bytes;
    ``image: None`` names a file that does not exist, so the builder skips that record)."""
    src = root / f"{name}-src"
    src.mkdir()
    items = []
    for i, r in enumerate(records):
        item = {"id": f"{name}-{i}", "conversations": r["conversations"]}
        for kind, ext in (("image", "jpg"), ("video", "mp4")):
            if kind in r:
                item[kind] = f"{i}.{ext}"
                if r[kind] is not None:
                    (src / item[kind]).write_bytes(r[kind])
        items.append(item)
    (src / "data.json").write_text(json.dumps(items))
    build_shards([src / "data.json"], src, root / name, shard_size=shard_size)
    return str(root / name)


def set_ids(path: str):
    """Sample ids of a set as an independent reader (shards.iter_raw_samples) sees them."""
    return [f"{Path(path).name}/{s.key}" for s in iter_raw_samples(shard_paths(path), SkipCounter())]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    texts = ["USER: What colour is shape 12? ASSISTANT: Colour 12.</s>", "a square number 3\n", "Say 4."] * 10
    train_tokenizer(texts, root / "tok", vocab_size=300)
    # Records 3-5 and 10-19 name missing images: shards of 7, 0 and 10 samples.
    images = [dict(image_qa(i), image=None) if i in (3, 4, 5) or 10 <= i < 20 else image_qa(i) for i in range(30)]
    return {
        "tok": str(root / "tok"),
        "img": write_set(root, "img", images, shard_size=10),
        "cap": write_set(root, "cap", [caption(i) for i in range(8)], shard_size=4),
        "text": write_set(root, "text", [text_only(i) for i in range(3)], shard_size=5),
    }


def test_fixture_has_uneven_shards(corpus):
    assert ShardSet.from_config(ShardSetConfig(corpus["img"])).counts == (7, 0, 10)


def test_shard_set_from_a_tar_pattern_without_index(corpus):
    """img2dataset output has no index.json: the samples are counted from the tar headers."""
    by_index = ShardSet.from_config(ShardSetConfig(corpus["img"]))
    by_glob = ShardSet.from_config(ShardSetConfig(corpus["img"] + "/shard-*.tar"))
    by_brace = ShardSet.from_config(ShardSetConfig(corpus["img"] + "/shard-{000000..000002}.tar"))
    assert by_glob.urls == by_brace.urls == by_index.urls and by_glob.counts == by_brace.counts == by_index.counts
    assert by_glob.name == by_index.name == "img"


def _img2dataset_dir(root: Path, n_tars: int = 2, per_tar: int = 4) -> Path:
    """img2dataset output: ``{00000..}.tar`` (jpg + txt + json) beside its ``.parquet`` and ``_stats.json``."""
    import webdataset as wds

    out = root / "i2d"
    out.mkdir()
    for t in range(n_tars):
        with wds.TarWriter(str(out / f"{t:05d}.tar")) as w:
            for k in range(per_tar):
                key = f"{t:05d}{k:04d}"
                w.write({"__key__": key, "jpg": _jpeg(k), "txt": f"a square number {k}".encode(),
                         "json": json.dumps({"key": key, "status": "success"}).encode()})
        (out / f"{t:05d}.parquet").write_bytes(b"PAR1 not a tar")
        (out / f"{t:05d}_stats.json").write_text("{}")
    return out


def test_img2dataset_directory_and_glob_pass_over_its_other_files(tmp_path):
    out = _img2dataset_dir(tmp_path)
    by_dir = ShardSet.from_config(ShardSetConfig(str(out)))
    by_star = ShardSet.from_config(ShardSetConfig(str(out / "*")))
    assert by_dir.urls == by_star.urls == (str(out / "00000.tar"), str(out / "00001.tar"))
    assert by_dir.counts == by_star.counts == (4, 4) and by_dir.name == by_star.name == "i2d"
    with pytest.raises(FileNotFoundError, match=r"no tar files .* it matches 4 other files"):
        ShardSet.from_config(ShardSetConfig(str(out / "*.*[tn]")))  # the .parquet and _stats.json files
    with pytest.raises(ValueError, match="00000.parquet is not a tar file"):
        ShardSet.from_config(ShardSetConfig(str(out / "00000.parquet")))


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_img2dataset_tar_trains_and_counts_each_lost_sample(corpus, tmp_path, workers):
    """No index.json: a tar cut inside a member is counted up to the cut, and reading it skips the lost
    samples as truncated_tar (an interrupted copy must not stop training)."""
    out = _img2dataset_dir(tmp_path)
    tar = out / "00001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: data.index(b"a square number 2")])  # inside sample 2's txt member
    assert ShardSet.from_config(ShardSetConfig(str(out))).counts == (4, 3)
    dm = build_datamodule(make_cfg(dict(corpus, i2d=str(out)), [("i2d", 1.0, "plain")], **{"data.num_workers": workers}))
    real = [i for i in ids_of(dm.train_dataloader()) if i is not None]
    assert sorted(real) == sorted([f"i2d/00000{k:04d}" for k in range(4)] + ["i2d/000010000", "i2d/000010001"])
    assert dm.skip_counts() == {"truncated_tar": 1}


def test_a_sample_cut_short_is_truncated_tar_not_malformed(corpus, tmp_path):
    """Cut inside sample 5's json, after its complete image: the loader reports every lost sample (5..9) as
    truncated_tar (the image alone is not a "record without json")."""
    cut = write_set(tmp_path, "cut", [image_qa(i) for i in range(10)], shard_size=10)
    tar = Path(cut) / "shard-000000.tar"
    data = tar.read_bytes()
    header = data.index(b"000000005.json")  # its member header (after the jpg); the data follows 512 bytes later
    tar.write_bytes(data[: header + 512 + 20])
    dm = build_datamodule(make_cfg(dict(corpus, cut=cut), [("cut", 1.0, None)]))
    real = [i for i in ids_of(dm.train_dataloader()) if i is not None]
    assert sorted(real) == [f"cut/{k:09d}" for k in range(5)]
    assert dm.skip_counts() == {"truncated_tar": 5}


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


def set_of(sample_id):
    return sample_id.split("/")[0]


# ----------------------------------------------------------------------------- partition
GROUPING = pytest.mark.parametrize("group", [0, 2], ids=["plain", "grouped"])  # data.group_by_length: windows of 2 batches


@GROUPING
@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_for_world_sizes(corpus, workers, group):
    expected = Counter(i for n in ("img", "cap", "text") for i in set_ids(corpus[n]))
    assert len(expected) == 17 + 8 + 3
    for world in (1, 2, 4):
        ledger, lengths = Counter(), set()
        for rank in range(world):
            cfg = make_cfg(corpus, MIX, **{"data.num_workers": workers, "data.group_by_length": group})
            dm = build_datamodule(cfg, rank=rank, world_size=world)
            loader = dm.train_dataloader()
            batches = list(loader)
            assert len(batches) == len(loader)  # every rank delivers exactly its announced length
            lengths.add(len(batches))
            ledger.update(i for i in ids_of(batches) if i is not None)
        assert ledger == expected, f"world {world}"
        assert len(lengths) == 1, f"ranks disagree on the number of batches: {lengths}"


def test_epochs_reshuffle_deterministically(corpus):
    def two_epochs(seed):
        loader = build_datamodule(make_cfg(corpus, MIX, seed=seed)).train_dataloader()
        return [ids_of(loader) for _ in range(2)]

    e0, e1 = two_epochs(3)
    assert e0 != e1 and sorted(e0) == sorted(e1)  # a new order, the same samples
    assert two_epochs(3) == [e0, e1]  # same seed: same orders
    assert two_epochs(4)[0] != e0


# ----------------------------------------------------------------------------- resume
# Runs in a fresh interpreter; imports the loader alone (no Lightning) to keep the test quick.
RESUME_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from omegaconf import OmegaConf
    from lm_mini.data.streaming import build_loader
    for cfg_path, state_path, out_path, want in json.loads(sys.argv[1]):
        loader = build_loader(OmegaConf.load(cfg_path), train=True)
        loader.load_state_dict(torch.load(state_path, weights_only=False))
        ids = []
        while len(ids) < want:  # the rest of the interrupted epoch, then the next epoch
            ids += [b["sample_ids"] for b in loader]
        json.dump({"ids": ids, "skips": loader.skips.as_dict()}, open(out_path, "w"))
""")


@GROUPING
def test_resume_in_new_process_continues_the_same_sequence(corpus, tmp_path, group):
    jobs, expected = [], {}
    # k = 10: saved after the epoch's last batch (a spent epoch); grouped, k = 3 stops inside a window of 2 batches
    for workers, k in ((0, 4), (0, 3), (2, 4), (2, 10)):
        cfg = make_cfg(corpus, MIX, **{"data.num_workers": workers, "data.group_by_length": group})
        full = build_datamodule(cfg).train_dataloader()
        expected[workers, k] = [b["sample_ids"] for b in full] + [b["sample_ids"] for b in full]

        loader = build_datamodule(cfg).train_dataloader()
        it = iter(loader)
        assert [next(it)["sample_ids"] for _ in range(k)] == expected[workers, k][:k]
        cfg_path, state_path = tmp_path / f"cfg{workers}-{k}.yaml", tmp_path / f"state{workers}-{k}.pt"
        OmegaConf.save(cfg, cfg_path)
        torch.save(loader.state_dict(), state_path)
        jobs.append((str(cfg_path), str(state_path), str(tmp_path / f"out{workers}-{k}.json"), 20 - k))
    if group:  # grouping changes the order, not the samples
        plain = [b["sample_ids"] for b in build_datamodule(make_cfg(corpus, MIX, **{"data.num_workers": 2})).train_dataloader()]
        grouped = expected[2, 4][:10]
        assert plain != grouped and Counter(i for b in plain for i in b) == Counter(i for b in grouped for i in b)
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(jobs)], check=True, timeout=300)
    for (workers, k), (_, _, out, _) in zip(expected, jobs):
        rest = json.load(open(out))["ids"]
        assert expected[workers, k][:k] + rest == expected[workers, k], f"workers={workers}, k={k}"


def test_resume_refuses_a_different_layout(corpus):
    loader = build_datamodule(make_cfg(corpus, MIX)).train_dataloader()
    next(iter(loader))
    state = loader.state_dict()
    other = build_datamodule(make_cfg(corpus, MIX, **{"data.batch_size": 2})).train_dataloader()
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        next(iter(other))
    grouped = build_datamodule(make_cfg(corpus, MIX, **{"data.group_by_length": 2})).train_dataloader()
    grouped.load_state_dict(state)
    with pytest.raises(ValueError, match="length grouping"):
        next(iter(grouped))


class Recorder(L.LightningModule):
    """Stand-in model: one parameter, records the sample ids of every training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["sample_ids"])
        return (self.w * batch["attention_mask"].sum()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Preempt(L.Callback):
    """Saves a checkpoint inside the training loop after ``step`` steps (as a SIGTERM handler or a
    step-interval ModelCheckpoint does), then stops the run."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, **kw)


# 10: at the first epoch's last batch; grouped (windows of 2 batches), 13 stops inside a window
@pytest.mark.parametrize("workers,step,group", [(0, 13, 0), (2, 13, 0), (2, 10, 0), (0, 13, 2), (2, 13, 2)])
def test_lightning_fit_interrupted_and_resumed_sees_the_same_ledger(corpus, tmp_path, workers, step, group):
    cfg = make_cfg(corpus, MIX, **{"data.num_workers": workers, "data.group_by_length": group})
    whole = Recorder()
    _trainer().fit(whole, datamodule=build_datamodule(cfg))
    assert len(whole.seen) == 20  # 2 epochs x 10 batches

    first, second, ckpt = Recorder(), Recorder(), tmp_path / "mid.ckpt"
    _trainer(callbacks=[Preempt(step, ckpt)]).fit(first, datamodule=build_datamodule(cfg))
    _trainer().fit(second, datamodule=build_datamodule(cfg), ckpt_path=ckpt)
    assert len(first.seen) == step
    assert first.seen + second.seen == whole.seen


# ----------------------------------------------------------------------------- mixing
def test_mixing_weights_give_expected_counts(corpus):
    cfg = make_cfg(corpus, [("img", 2.0, None), ("cap", 0.5, "plain"), ("text", 1.0, None)])
    ids = [i for i in ids_of(build_datamodule(cfg).train_dataloader()) if i is not None]
    assert Counter(map(set_of, ids)) == {"img": 2 * 17, "cap": 4, "text": 3}
    assert Counter(i for i in ids if set_of(i) == "img") == Counter(set_ids(corpus["img"]) * 2)  # each twice
    assert len({i for i in ids if set_of(i) == "cap"}) == 4  # half the captions, each once
    # Interleaved, not one set after another: the first third of the epoch holds every set.
    assert {set_of(i) for i in ids[: len(ids) // 3]} == {"img", "cap", "text"}


def test_set_template_overrides_data_template(corpus):
    cfg = make_cfg(corpus, [("cap", 1.0, "plain")], **{"data.template": "vicuna_v1"})
    dm = build_datamodule(cfg)
    batch = next(iter(dm.train_dataloader()))
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert first[1] == IMAGE_TOKEN_INDEX  # plain: <s><image>caption\n, no system prompt, no USER:
    assert dm.processor.tokenizer.decode(first[2:]).startswith("a square number")


# ----------------------------------------------------------------------------- bad samples
def corrupt_jpegs(set_dir: str, every: int) -> None:
    """Truncate the JPEG of every ``every``-th sample (by key) inside the built shards."""
    for path in sorted(Path(set_dir).glob("*.tar")):
        with tarfile.open(path) as src:
            members = [(m, src.extractfile(m).read()) for m in src]
        with tarfile.open(path, "w") as dst:
            for m, data in members:
                if m.name.endswith(".jpg") and int(m.name.split(".")[0]) % every == 0:
                    data = data[:40]
                    m.size = len(data)
                dst.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_images_become_counted_padding(corpus, tmp_path, workers):
    bad = write_set(tmp_path, "bad", [image_qa(i) for i in range(12)], shard_size=6)
    corrupt_jpegs(bad, every=3)
    dm = build_datamodule(make_cfg(dict(corpus, bad=bad), [("bad", 1.0, None)], **{"data.num_workers": workers}))
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # lengths unchanged: padding stands in
    ids = ids_of(batches)
    assert sorted(i for i in ids if i is not None) == [f"bad/{i:09d}" for i in range(12) if i % 3]
    assert ids.count(None) == 4
    for b in batches:
        pad = torch.tensor([i is None for i in b["sample_ids"]])
        assert (b["labels"][pad] == IGNORE_INDEX).all() and (b["frames_per_sample"][pad] == 0).all()
    assert dm.skip_counts() == {"corrupt_image": 4}


def test_truncated_shard_pads_the_rest_and_never_repeats(corpus, tmp_path):
    cut = write_set(tmp_path, "cut", [image_qa(i) for i in range(10)], shard_size=10)
    tar = Path(cut) / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    dm = build_datamodule(make_cfg(dict(corpus, cut=cut), [("cut", 1.0, None)], **{"data.num_workers": 2}))
    ids = ids_of(dm.train_dataloader())
    real = [i for i in ids if i is not None]
    assert len(ids) == 10 and len(real) == len(set(real)) and 0 < len(real) < 10
    assert set(dm.skip_counts()) == {"truncated_tar"}
    assert sum(dm.skip_counts().values()) == 10 - len(real)


# ----------------------------------------------------------------------------- batch contract
def test_batches_follow_the_contract_for_image_video_text_and_hires(corpus, tmp_path):
    mixed = write_set(tmp_path, "mixed", [video_qa(0), image_qa(1), text_only(2)], shard_size=3)
    cfg = make_cfg(dict(corpus, mixed=mixed), [("mixed", 1.0, None)],
                   **{"model.resolution_ratio": 2, "data.max_frames": 8, "data.video_fps": 2.0})
    dm = build_datamodule(cfg)
    batch = next(iter(dm.train_dataloader()))
    order = [int(i[-1]) for i in batch["sample_ids"]]  # key = record index: 0 video, 1 image, 2 text
    frames = dict(zip(order, batch["frames_per_sample"].tolist()))
    assert frames[1] == 1 and frames[2] == 0 and frames[0] >= 2
    assert batch["is_video"].tolist() == [o == 0 for o in order]
    views = frames[0] + 5  # video: one view per frame; hi-res image (R=2): global + 2x2 crops
    assert batch["pixel_values"].shape == (views, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["pixel_values"].dtype == torch.uint8  # raw RGB: the model normalises it
    B, L_ = batch["input_ids"].shape
    assert B == 3 and batch["labels"].shape == batch["attention_mask"].shape == (B, L_)
    for k in ("input_ids", "labels", "attention_mask", "frames_per_sample"):
        assert batch[k].dtype == torch.long, k
    pad_id = dm.processor.pad_id
    for row, (n, o) in enumerate(zip(batch["attention_mask"].sum(1).tolist(), order)):
        assert (batch["attention_mask"][row, :n] == 1).all()
        assert (batch["input_ids"][row, n:] == pad_id).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, :n] == IMAGE_TOKEN_INDEX).sum() == (0 if o == 2 else 1)
        assert (batch["labels"][row] != IGNORE_INDEX).any()  # every real sample trains its answer
    assert "skipped" not in batch  # the loader takes its tally out


def test_sets_whose_folders_share_a_name_get_distinct_sample_ids(corpus, tmp_path):
    from lm_mini.data.streaming import shard_set_names

    for parent in ("coco", "gqa"):
        shutil.copytree(corpus["img"], tmp_path / parent / "val")
    paths = [tmp_path / "coco" / "val", tmp_path / "gqa" / "val", corpus["img"], corpus["img"] + "/shard-*.tar"]
    assert shard_set_names(paths) == ["coco/val", "gqa/val", Path(corpus["img"]).name, Path(corpus["img"]).name + "#2"]
    assert shard_set_names([corpus["img"]]) == [Path(corpus["img"]).name]  # a name is only as long as it must be
    cfg = make_cfg(corpus, MIX)
    cfg.data.val = [ShardSetConfig(str(tmp_path / "coco" / "val")), ShardSetConfig(str(tmp_path / "gqa" / "val"))]
    ids = ids_of(build_datamodule(cfg).val_dataloader())
    assert len(ids) == len(set(ids)) == 2 * len(set_ids(corpus["img"]))
    assert {i.rsplit("/", 1)[0] for i in ids} == {"coco/val", "gqa/val"}


def test_val_loader_every_sample_once_in_order(corpus):
    cfg = make_cfg(corpus, MIX, val=["img", "text"], **{"data.batch_size": 4})
    loader = build_datamodule(cfg).val_dataloader()
    assert ids_of(loader) == set_ids(corpus["img"]) + set_ids(corpus["text"])
    assert len(loader) == 5  # 20 samples, no padding
