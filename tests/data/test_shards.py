"""Shards: LLaVA JSON/JSONL -> WebDataset shards -> raw samples; determinism, resume, bad input."""
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from lm_mini.cli import main
from lm_mini.data import shard_builder, shard_reader
from lm_mini.data.conversation import render
from lm_mini.data.errors import SkipCounter
from lm_mini.data.shard_builder import build_shards
from lm_mini.data.shard_format import ShardBuildError
from lm_mini.data.shard_reader import iter_raw_samples, read_index, shard_paths
from media_fixtures import gray_video, image_bytes


class Crash(Exception):
    """Stands for the build being killed part-way."""


def turns(question, answer="yes"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def dataset(tmp_path):
    """Media files, a LLaVA JSON list (image, video, text-only, multi-turn) and a JSONL file."""
    media = tmp_path / "media"
    (media / "coco").mkdir(parents=True)
    (media / "coco" / "red.jpg").write_bytes(image_bytes(Image.new("RGB", (24, 16), (255, 0, 0))))
    (media / "blue.png").write_bytes(image_bytes(Image.new("RGB", (10, 12), (0, 0, 255)), "PNG"))
    (media / "clip.mp4").write_bytes(gray_video(12))
    records = [
        {"id": "img-1", "image": "coco/red.jpg", "conversations": turns("<image>\nWhat colour?", "Red.")},
        {"id": "vid-1", "video": "clip.mp4", "conversations": turns("<video>\nWhat happens?", "It brightens.")},
        {"id": "txt-1", "conversations": turns("Say hi.", "Hi.")},
        {"id": 7, "image": "blue.png", "conversations": turns("<image>\nColour?", "Blue.") + turns("Sure?", "Yes.")},
        {"id": "img-2", "image": "coco/red.jpg", "conversations": turns("Describe it.", "A red box.")},  # no tag
    ]
    lines = [
        {"id": "l-1", "conversations": turns("Two plus two?", "Four.")},
        {"id": "l-2", "image": "blue.png", "conversations": turns("<image>\nShape?", "Rectangle.")},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return {"root": tmp_path, "media": media, "json": [tmp_path / "llava.json", tmp_path / "extra.jsonl"],
            "records": records + lines}


def build(ds, out, **kw):
    return build_shards(ds["json"], ds["media"], ds["root"] / out, **{"shard_size": 3, **kw})


def read_all(path):
    counter = SkipCounter()
    return list(iter_raw_samples(shard_paths(path), counter)), counter


def shard_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("*.tar"))}


# ------------------------------------------------------------------------------------------ builder


def test_round_trip_image_video_text(dataset):
    report = build(dataset, "out")
    out = dataset["root"] / "out"
    assert (report.num_samples, report.num_shards, report.skipped) == (7, 3, {})
    assert report.media == {"image": 4, "video": 1, "text": 2}
    index = read_index(out)
    assert [s["name"] for s in index["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["samples"] for s in index["shards"]] == [3, 3, 1]
    assert index["shards"][0]["media"] == {"image": 1, "video": 1, "text": 1}
    for s in index["shards"]:
        assert s["sha256"] == hashlib.sha256((out / s["name"]).read_bytes()).hexdigest()
    assert [src["sha256"] for src in index["sources"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in dataset["json"]]
    assert index["build"]["shard_size"] == 3 and not (out / ".build").exists()

    samples, counter = read_all(out)
    assert not counter
    assert [s.record["id"] for s in samples] == ["img-1", "vid-1", "txt-1", 7, "img-2", "l-1", "l-2"]
    assert len({s.key for s in samples}) == 7
    for sample, original in zip(samples, dataset["records"]):
        assert sample.record["conversations"] == original["conversations"]
        assert sample.source.endswith(".tar")
        path = original.get("image") or original.get("video")
        if path is None:
            assert (sample.media_kind, sample.media_ext, sample.media_bytes) == (None, None, None)
        else:
            assert sample.media_bytes == (dataset["media"] / path).read_bytes()
    assert [(s.media_kind, s.media_ext) for s in samples[:4]] == [("image", "jpg"), ("video", "mp4"), (None, None), ("image", "png")]
    assert samples[0].record["source"] == "llava.json" and samples[5].record["source"] == "extra.jsonl"


def test_video_chatgpt_records_raw_and_converted_find_their_videos(tmp_path):
    """VideoInstruct100K.json ({video_id, q, a}) and the training JSON Video-ChatGPT converts it to
    ("video": "<id>.pkl", its CLIP features) both train on the videos, in whatever container each is."""
    videos = tmp_path / "activitynet"
    videos.mkdir()
    (videos / "v_abc.mp4").write_bytes(gray_video(6))
    (videos / "v_-x.y.mkv").write_bytes(gray_video(4))  # ActivityNet ids start with "-" at times; a dot in a name
    raw = [{"video_id": "v_abc", "q": "What happens?", "a": "It brightens."},
           {"video_id": "v_-x.y", "q": "How long is it?", "a": "Short."},
           {"video_id": "v_gone", "q": "Is it there?", "a": "No."}]
    converted = [{"id": "v_abc", "video": "v_abc.pkl", "conversations": turns("What is shown?\n<video>", "Grey.")}]
    (tmp_path / "VideoInstruct100K.json").write_text(json.dumps(raw))
    (tmp_path / "video_chatgpt_training.json").write_text(json.dumps(converted))
    report = build_shards([tmp_path / "VideoInstruct100K.json", tmp_path / "video_chatgpt_training.json"], videos, tmp_path / "out")
    assert (report.num_samples, report.media, report.skipped) == (3, {"image": 0, "video": 3, "text": 0}, {"missing_media": 1})
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())["records"]
    assert [(r["id"], r["reason"]) for r in skipped] == [("v_gone", "missing_media")] and "v_gone" in skipped[0]["message"]

    samples, counter = read_all(tmp_path / "out")
    assert not counter
    assert [(s.record["id"], s.media_ext) for s in samples] == [("v_abc", "mp4"), ("v_-x.y", "mkv"), ("v_abc", "mp4")]
    assert samples[0].media_bytes == (videos / "v_abc.mp4").read_bytes()
    assert samples[1].media_bytes == (videos / "v_-x.y.mkv").read_bytes()
    assert samples[0].record["conversations"] == turns("<video>\nWhat happens?", "It brightens.")
    assert samples[0].record["source"] == "VideoInstruct100K.json"
    rendered = render(samples[1].record["conversations"], "vicuna_v1", has_media=True)
    assert "USER: <image>\nHow long is it? ASSISTANT: Short.</s>" in rendered


def test_media_members_are_named_by_content_and_an_empty_id_is_malformed(tmp_path):
    (tmp_path / "really_png.jpg").write_bytes(image_bytes(Image.new("RGB", (5, 5), (1, 2, 3)), "PNG"))
    (tmp_path / "really_jpeg.png").write_bytes(image_bytes(Image.new("RGB", (5, 5), (1, 2, 3))))
    records = [{"id": "a", "image": "really_png.jpg", "conversations": turns("<image>\nQ")},
               {"id": "b", "image": "really_jpeg.png", "conversations": turns("<image>\nQ")},
               {"id": " ", "conversations": turns("Q")}]
    (tmp_path / "in.json").write_text(json.dumps(records))
    report = build_shards([tmp_path / "in.json"], tmp_path, tmp_path / "out")
    assert report.skipped == {"malformed_record": 1}
    assert [(s.record["id"], s.media_ext) for s in read_all(tmp_path / "out")[0]] == [("a", "png"), ("b", "jpg")]


def test_build_is_deterministic_across_runs_and_workers(dataset):
    build(dataset, "a", workers=1)
    build(dataset, "b", workers=2)
    a, b = shard_bytes(dataset["root"] / "a"), shard_bytes(dataset["root"] / "b")
    assert len(a) == 3 and a == b
    assert (dataset["root"] / "a" / "index.json").read_bytes() == (dataset["root"] / "b" / "index.json").read_bytes()
    with tarfile.open(dataset["root"] / "a" / "shard-000000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid) for m in tar.getmembers()} == {(0, 0, 0)}


def test_rerun_is_refused_unless_resume(dataset):
    build(dataset, "out")
    before = shard_bytes(dataset["root"] / "out")
    with pytest.raises(ShardBuildError, match="already holds a finished shard set"):
        build(dataset, "out")
    assert build(dataset, "out", resume=True).shards_written == 0
    with pytest.raises(ShardBuildError, match="other inputs"):
        build(dataset, "out", resume=True, shard_size=2)
    other_root = dataset["root"] / "media-copy"
    shutil.copytree(dataset["media"], other_root)
    with pytest.raises(ShardBuildError, match="media root differs"):  # a finished build is not the answer either
        build_shards(dataset["json"], other_root, dataset["root"] / "out", shard_size=3, resume=True)
    assert shard_bytes(dataset["root"] / "out") == before


def test_resume_of_a_finished_build_given_relative_paths_works_from_another_directory(dataset, monkeypatch):
    monkeypatch.chdir(dataset["root"])
    build_shards(["llava.json", "extra.jsonl"], "media", "out", shard_size=3)  # the index keeps "media" as given
    monkeypatch.chdir(dataset["media"] / "coco")  # elsewhere, the same inputs as absolute paths
    assert build_shards(dataset["json"], dataset["media"], dataset["root"] / "out", shard_size=3, resume=True).shards_written == 0
    shutil.copytree(dataset["media"], dataset["root"] / "elsewhere")
    with pytest.raises(ShardBuildError, match="media root differs"):
        build_shards(dataset["json"], dataset["root"] / "elsewhere", dataset["root"] / "out", shard_size=3, resume=True)
    (dataset["root"] / "stuff").mkdir()
    (dataset["root"] / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(ShardBuildError, match="not empty"):
        build(dataset, "stuff")


@pytest.mark.parametrize("content, message", [
    ('[{"id": 1, "conversations": []', "not valid JSON"),
    (json.dumps({"records": [{"id": 1}]}, indent=2), r"holds one JSON object \(keys 'records'\), not LLaVA records"),
    (json.dumps({"records": [{"id": 1}]}), r"holds one JSON object \(keys 'records'\), not LLaVA records"),
    # pretty-printed and cut short: read as JSON lines, some of which are JSON on their own ("a.png") but no object
    (json.dumps({"data": [{"id": "r", "image": ["a.png"]}]}, indent=2)[:-3], "no line is a JSON object"),
    ("", "no records"),
    ("[]", "no records"),
])
def test_unreadable_input_file_is_refused_before_writing(tmp_path, content, message):
    (tmp_path / "in.json").write_text(content)
    with pytest.raises(ShardBuildError, match=message):
        build_shards([tmp_path / "in.json"], tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_media_root_and_worker_count_are_refused_before_writing(dataset):
    """Every media path missing means the wrong --media-root, not a data set of skipped records."""
    with pytest.raises(ShardBuildError, match=r"none of the first 5 media files exists under the media root .*coco/red.jpg"):
        build_shards(dataset["json"], dataset["root"], dataset["root"] / "out")
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        build(dataset, "out", workers=0)
    assert not (dataset["root"] / "out").exists()


def test_build_workers_exit_when_the_build_is_killed(tmp_path):
    """A SIGKILLed build must not leave its writer processes waiting on the task pipe forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import time\nfrom concurrent.futures import ProcessPoolExecutor\n"
              "from lm_mini.data.shard_builder import _exit_with_parent\n"
              "pool = ProcessPoolExecutor(2, initializer=_exit_with_parent)\n"
              "pool.submit(time.sleep, 60)\n"
              "print(*[p.pid for p in pool._processes.values()], flush=True)\n"
              "time.sleep(60)\n")
    build = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in build.stdout.readline().split()]
    assert len(workers) == 2
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]
                                         for p in workers):
        time.sleep(0.1)
    alive = [p for p in workers if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    assert not alive, f"writer processes {alive} outlived the killed build"


def test_interrupted_build_resumes_to_identical_output(dataset, monkeypatch):
    real_write, calls = shard_builder._write_shard, []

    def crash_on_second_shard(task):
        calls.append(task.index)
        if calls == [0, 1]:
            (Path(task.out_dir) / "shard-000001.tar.tmp").write_bytes(b"half a shard")
            raise Crash
        return real_write(task)

    monkeypatch.setattr(shard_builder, "_write_shard", crash_on_second_shard)
    with pytest.raises(Crash):
        build(dataset, "out")
    out = dataset["root"] / "out"
    assert (out / "shard-000000.tar").is_file() and not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="--resume"):
        read_index(out)
    with pytest.raises(FileNotFoundError, match="unfinished build"):  # not trained on as a directory of tars
        shard_reader.find_shards(out)
    with pytest.raises(ShardBuildError, match="unfinished build"):
        build(dataset, "out")

    calls.clear()
    report = build(dataset, "out", resume=True)
    assert calls == [1, 2] and report.shards_written == 2 and report.num_samples == 7
    build(dataset, "clean")
    assert shard_bytes(out) == shard_bytes(dataset["root"] / "clean")
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar",
                                                      "shard-000002.tar", "skipped.json"]


def test_resume_refuses_changed_sources(dataset, monkeypatch):
    monkeypatch.setattr(shard_builder, "_write_shard", lambda task: (_ for _ in ()).throw(Crash))
    with pytest.raises(Crash):
        build(dataset, "out")
    monkeypatch.undo()
    dataset["json"][0].write_text(json.dumps(dataset["records"][:2]))
    with pytest.raises(ShardBuildError, match="source JSON files differ"):
        build(dataset, "out", resume=True)


def test_every_bad_record_is_skipped_and_counted(dataset):
    media, root = dataset["media"], dataset["root"]
    good_jpeg = (media / "coco" / "red.jpg").read_bytes()
    noisy = image_bytes(Image.effect_noise((64, 64), 40).convert("RGB"))
    (media / "truncated.jpg").write_bytes(noisy[: len(noisy) // 2])
    (media / "garbage.jpg").write_bytes(b"\xff\xd8" + bytes(300))
    (media / "empty.mp4").write_bytes(b"")
    (media / "garbage.mp4").write_bytes(bytes(range(256)) * 4)
    (media / "clip.mov").write_bytes(gray_video(4))
    (media / "ok.jpg").write_bytes(good_jpeg)
    q = turns("<image>\nWhat?")
    records = [
        {"id": "ok-image", "image": "ok.jpg", "conversations": q},
        {"id": "truncated-jpeg", "image": "truncated.jpg", "conversations": q},
        {"id": "garbage-jpeg", "image": "garbage.jpg", "conversations": q},
        {"id": "missing-file", "image": "nowhere/none.jpg", "conversations": q},
        {"id": "empty-video", "video": "empty.mp4", "conversations": turns("<video>\nWhat?")},
        {"id": "garbage-video", "video": "garbage.mp4", "conversations": turns("<video>\nWhat?")},
        {"id": "mov-video", "video": "clip.mov", "conversations": turns("<video>\nWhat?")},  # .mov is stored as mp4
        {"id": "two-tags", "image": "ok.jpg", "conversations": turns("<image>\n<image>\nWhat?")},
        {"id": "tag-without-media", "conversations": q},
        {"id": "no-conversations"},
        {"id": "bad-role", "conversations": [{"from": "robot", "value": "hi"}]},
        {"id": "value-not-text", "conversations": [{"from": "human", "value": 3}]},
        {"conversations": turns("no id")},
        {"id": "two-media", "image": "ok.jpg", "video": "clip.mov", "conversations": q},
        ["not", "a", "record"],
        {"id": "no-answer", "conversations": [{"from": "human", "value": "Hello?"}]},
    ]
    (root / "bad.json").write_text(json.dumps(records))
    (root / "bad.jsonl").write_text('{"id": "fine", "conversations": %s}\n{"id": "broken", \n' % json.dumps(turns("hi")))
    report = build_shards([root / "bad.json", root / "bad.jsonl"], media, root / "out", shard_size=4, workers=2)
    expected = {"corrupt_image": 2, "missing_media": 1, "bad_video": 2, "placeholder_mismatch": 2, "malformed_record": 8}
    assert report.skipped == expected and read_index(root / "out")["skipped"] == expected
    skipped = json.loads((root / "out" / "skipped.json").read_text())
    assert skipped["counts"] == expected
    by_id = {r["id"]: r["reason"] for r in skipped["records"]}
    assert by_id["truncated-jpeg"] == "corrupt_image" and by_id["missing-file"] == "missing_media"
    assert by_id["empty-video"] == "bad_video" and by_id["two-tags"] == "placeholder_mismatch"
    assert by_id["no-answer"] == "malformed_record"
    assert {r["line"] for r in skipped["records"] if r["source"].endswith(".jsonl")} == {2}
    samples, counter = read_all(root / "out")
    assert not counter
    assert [(s.record["id"], s.media_ext) for s in samples] == [("ok-image", "jpg"), ("mov-video", "mp4"), ("fine", None)]


# ------------------------------------------------------------------------------------------ reader


def test_truncated_tar_keeps_the_complete_records_before_the_cut(dataset, tmp_path):
    build(dataset, "out", shard_size=4)  # shard 0: img-1 (jpg, json), vid-1 (json, mp4), txt-1 (json), 7 (json, png)
    out = dataset["root"] / "out"
    first, second = shard_paths(out)
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    assert [m.name.split(".")[1] for m in members] == ["jpg", "json", "json", "mp4", "json", "json", "png"]
    png, last_json, txt_json = members[-1], members[-2], members[-3]
    cuts = {  # cut position -> ids expected from the cut shard
        "inside the last member's data": (png.offset_data + png.size // 2, ["img-1", "vid-1", "txt-1"]),
        "between the last sample's members": (png.offset, ["img-1", "vid-1", "txt-1"]),
        "between samples": (last_json.offset, ["img-1", "vid-1", "txt-1"]),
        "inside a header": (last_json.offset + 100, ["img-1", "vid-1", "txt-1"]),
        "after the last member, before the end marker": (png.offset_data + 512, ["img-1", "vid-1", "txt-1", 7]),
        "inside an earlier sample": (txt_json.offset_data + 3, ["img-1", "vid-1"]),
    }
    data = Path(first).read_bytes()
    for what, (cut, ids) in cuts.items():
        cut_path = tmp_path / "cut.tar"
        cut_path.write_bytes(data[:cut])
        counter = SkipCounter()
        samples = list(iter_raw_samples([str(cut_path), second], counter))
        assert [s.record["id"] for s in samples] == ids + ["img-2", "l-1", "l-2"], what
        assert counter.as_dict() == {"truncated_tar": 1}, what


def write_tar(path, samples):
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def test_reader_skips_and_counts_bad_records(tmp_path):
    jpeg = image_bytes(Image.new("RGB", (4, 4), (0, 255, 0)))
    record = {"id": "ok", "conversations": turns("Hi?")}
    write_tar(tmp_path / "bad.tar", [
        {"__key__": "a", "jpg": jpeg},  # no json
        {"__key__": "b", "json": json.dumps({"id": "b", "image": "x.jpg", "conversations": turns("<image>\nQ")}).encode()},
        {"__key__": "c", "json": b"{not json"},
        {"__key__": "d", "json": json.dumps({"id": "d", "conversations": turns("<image>\nQ")}).encode(), "jpg": jpeg, "png": jpeg},
        {"__key__": "e", "json": json.dumps({"id": "e", "conversations": [{"from": "gpt", "value": "A"}]}).encode()},
        {"__key__": "f", "json": json.dumps(record).encode()},
        {"__key__": "g", "json": json.dumps({"id": "g", "conversations": turns("Q")}).encode(), "jpg": jpeg},  # tag added
    ])
    counter = SkipCounter()
    samples = list(iter_raw_samples([{"url": str(tmp_path / "bad.tar")}], counter))
    assert [s.key for s in samples] == ["f", "g"] and samples[1].media_kind == "image"
    assert counter.as_dict() == {"malformed_record": 4, "missing_media": 1}
    with pytest.raises(FileNotFoundError):  # a missing shard is an error, not a skipped sample
        list(iter_raw_samples([str(tmp_path / "absent.tar")], counter))


def test_img2dataset_caption_shards_read_as_plain_records(tmp_path):
    jpeg = image_bytes(Image.new("RGB", (6, 6), (9, 9, 9)))
    meta = {"key": "000000017", "caption": "a gray square", "status": "success", "width": 6, "height": 6}
    write_tar(tmp_path / "00000.tar", [
        {"__key__": "000000017", "jpg": jpeg, "txt": b"a gray square", "json": json.dumps(meta).encode()},
        {"__key__": "000000018", "jpg": jpeg, "txt": b"  a dark photo \n"},  # no metadata json
        {"__key__": "000000019", "txt": b"caption without image"},
    ])
    counter = SkipCounter()
    samples = list(iter_raw_samples([str(tmp_path / "00000.tar")], counter))
    assert [s.record["id"] for s in samples] == ["000000017", "000000018"]
    assert samples[0].record["conversations"] == [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "a gray square"}]
    assert samples[1].record["conversations"][1]["value"] == "a dark photo"
    assert samples[0].template == "plain" and samples[0].media_bytes == jpeg and "template" not in samples[0].record
    assert render(samples[0].record["conversations"], "plain", has_media=True) == "<image>a gray square\n"
    assert counter.as_dict() == {"missing_media": 1}


def test_a_records_own_template_field_is_data_not_the_template(tmp_path):
    """A "template" key in a user's record (their own metadata) never picks how the sample is rendered."""
    from lm_mini.data.samples import SampleProcessor
    from lm_mini.data.tokenizer import load_tokenizer

    plain = {"id": "t", "conversations": turns("Hi", "Hello")}
    write_tar(tmp_path / "t.tar", [{"__key__": str(i), "json": json.dumps({**plain, **extra}).encode()}
                                   for i, extra in enumerate([{}, {"template": "qa_v2"}, {"template": "llama3"}, {"template": "this:s"}])])
    samples = list(iter_raw_samples([str(tmp_path / "t.tar")], SkipCounter()))
    processor = SampleProcessor(load_tokenizer(Path(__file__).parents[2] / "data_shards" / "demo" / "tokenizer"), "vicuna_v1", 256, None)
    ids = [list(processor(s, s.key)["input_ids"]) for s in samples]
    assert len(samples) == 4 and all(i == ids[0] for i in ids) and all(s.template is None for s in samples)


# ------------------------------------------------------------------------------------------ CLI


def test_a_build_where_every_record_is_skipped_fails_and_training_refuses_it(tmp_path, capsys):
    (tmp_path / "in.json").write_text(json.dumps([{"id": i, "conversations": turns("Hi", "")[:1]} for i in range(3)]))
    assert main(["shards", "build", "--json", str(tmp_path / "in.json"), "--media-root", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no usable record: all 3 were skipped" in capsys.readouterr().out
    root = Path(__file__).parents[2]
    assert main(["train", str(root / "experiments" / "demo.yaml"), f"data.train=[{{path: {tmp_path / 'out'}}}]", "data.val=[]",
                 f"data.tokenizer={root / 'data_shards' / 'demo' / 'tokenizer'}", f"logging.runs_dir={tmp_path / 'runs'}"]) == 2
    assert f"data.train[0].path: {tmp_path / 'out'} holds no samples" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_build_and_inspect(dataset, capsys):
    args = ["shards", "build", "--json", *map(str, dataset["json"]), "--media-root", str(dataset["media"]),
            "--out", str(dataset["root"] / "out"), "--shard-size", "4", "--workers", "2"]
    assert main(args) == 0
    assert "7 samples in 2 shards (image 4, video 1, text 2)" in capsys.readouterr().out
    assert main(args) == 1
    assert "already holds a finished shard set" in capsys.readouterr().out
    assert main(args + ["--resume"]) == 0

    capsys.readouterr()
    assert main(["shards", "inspect", str(dataset["root"] / "out"), "-n", "3"]) == 0
    text = capsys.readouterr().out
    assert "7 samples in 2 shards" in text and "shard-000001.tar: 3 samples" in text
    assert "id=img-1" in text and "image jpg 24x16" in text
    assert "id=vid-1" in text and "video mp4 12 frames 32x32" in text
    assert "id=txt-1" in text and "text-only" in text and "human: 'Say hi.'" in text
    assert "id=7" not in text  # -n 3

    shutil.copy(dataset["root"] / "out" / "shard-000001.tar", dataset["root"] / "one.tar")
    assert main(["shards", "inspect", str(dataset["root"] / "one.tar"), "-n", "1"]) == 0
    assert "id=img-2" in capsys.readouterr().out

    tars = dataset["root"] / "tars"  # a directory of tars without index.json (e.g. img2dataset output)
    tars.mkdir()
    shutil.copy(dataset["root"] / "one.tar", tars / "00000.tar")
    (tars / "00000.parquet").write_bytes(b"PAR1")
    assert main(["shards", "inspect", str(tars), "-n", "5"]) == 0
    text = capsys.readouterr().out
    assert "1 tar files without index.json" in text and "id=img-2" in text and "skipped" not in text
    assert main(["shards", "inspect", str(dataset["media"] / "coco" / "red.jpg")]) == 1
    assert "red.jpg is not a tar file" in capsys.readouterr().out

    cut = dataset["root"] / "cut.tar"
    cut.write_bytes((dataset["root"] / "one.tar").read_bytes()[:700])  # inside the first sample's image
    assert main(["shards", "inspect", str(cut)]) == 0
    text = capsys.readouterr().out
    assert "--- skipped: [truncated_tar]" in text and "cut short after 0 samples" in text
    assert "skipped while reading: {'truncated_tar': 1}" in text

    shutil.copytree(dataset["root"] / "out", dataset["root"] / "out-cut")  # with index.json: every lost sample counts
    second = dataset["root"] / "out-cut" / "shard-000001.tar"
    second.write_bytes(second.read_bytes()[:700])
    assert main(["shards", "inspect", str(dataset["root"] / "out-cut"), "-n", "100"]) == 0
    text = capsys.readouterr().out
    assert "(3 samples lost)" in text and "skipped while reading: {'truncated_tar': 3}" in text


def test_cli_inspect_shows_token_and_label_layout(dataset, capsys):
    from lm_mini.data.conversation import template_corpus
    from lm_mini.data.tokenizer import train_tokenizer

    build(dataset, "out")
    corpus = list(template_corpus([(r["conversations"], "image" in r or "video" in r) for r in dataset["records"]]))
    train_tokenizer(corpus * 4, dataset["root"] / "tok", vocab_size=300)
    capsys.readouterr()
    assert main(["shards", "inspect", str(dataset["root"] / "out"), "-n", "3", "--tokenizer", str(dataset["root"] / "tok")]) == 0
    text = capsys.readouterr().out
    # vicuna_v1 by default: the prompt carries no loss; each answer and its </s> do.
    assert 'ctx  | "<s>A chat between' in text and "USER: <media>\\nWhat colour? ASSISTANT:" in text
    assert "LOSS | ' Red.</s>'" in text and "LOSS | ' Hi.</s>'" in text
    capsys.readouterr()
    assert main(["shards", "inspect", str(dataset["root"] / "out"), "-n", "1", "--tokenizer", str(dataset["root"] / "tok"),
                 "--template", "plain"]) == 0
    assert "ctx  | '<s><media>'" in capsys.readouterr().out
