"""QA of shards / media / conversation on odd but valid input that the other data tests do not cover."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from lm_mini.cli import main
from lm_mini.data.media import decode_image
from lm_mini.data.shard_builder import build_shards
from lm_mini.data.shard_reader import iter_raw_samples, shard_paths
from lm_mini.data.errors import SampleError, SkipCounter


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------- high bit depth images
def test_16_bit_greyscale_png_keeps_its_grey_levels():
    """A 16-bit PNG (mode I;16) must be scaled to 8 bits, not clipped to white."""
    ramp = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    rgb = np.asarray(decode_image(png(Image.fromarray(ramp)))).astype(int)
    assert rgb.shape == (32, 64, 3)
    np.testing.assert_allclose(rgb[..., 0], ramp / 257, atol=1)
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_32_bit_float_tiff_in_unit_range_is_scaled_to_8_bits():
    ramp = np.linspace(0, 1, 64 * 32).reshape(32, 64).astype(np.float32)
    rgb = np.asarray(decode_image(png(Image.fromarray(ramp), "TIFF"))).astype(int)
    np.testing.assert_allclose(rgb[..., 1], ramp * 255, atol=1)


def test_zero_length_image_says_so_without_object_addresses():
    with pytest.raises(SampleError) as e:
        decode_image(b"", "s1")
    assert e.value.reason == "corrupt_image" and "zero-length" in str(e.value) and " at 0x" not in str(e.value)


# --------------------------------------------------------------------------- build + inspect of odd records
TOKENIZER = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "data_shards" / "demo" / "tokenizer")


def turns(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


@pytest.fixture
def odd_set(tmp_path):
    media = tmp_path / "media"
    (media / "ü dir" / "deep").mkdir(parents=True)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(media / "ü dir" / "deep" / "pic 1.png")
    absolute = tmp_path / "elsewhere.webp"
    Image.new("RGB", (8, 8), (0, 200, 0)).save(absolute)
    records = [
        {"id": "uni-😀", "image": "ü dir/deep/pic 1.png", "conversations": turns("<image>\nQué es? 日本語", "Ünïcödé ✓")},
        {"id": "abs", "image": str(absolute), "conversations": turns("What is this <image>", "Green.")},
        {"id": "sys", "image": ["ü dir/deep/pic 1.png"],
         "conversations": [{"from": "system", "value": "Be brief."}] + turns("q1 <image>", "a1", "q2", "a2")},
    ]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return src, media


def test_odd_valid_records_round_trip_and_inspect_decodes_unicode(odd_set, tmp_path, capsys):
    src, media = odd_set
    report = build_shards([src], media, tmp_path / "out")
    assert report.num_samples == 3 and not report.skipped
    samples = list(iter_raw_samples(shard_paths(tmp_path / "out"), SkipCounter()))
    assert [s.record["id"] for s in samples] == ["uni-😀", "abs", "sys"]
    assert [s.media_ext for s in samples] == ["png", "webp", "png"]
    capsys.readouterr()
    assert main(["shards", "inspect", str(tmp_path / "out"), "--tokenizer", TOKENIZER]) == 0
    out = capsys.readouterr().out
    assert "Qué es? 日本語" in out and "Ünïcödé ✓" in out  # text runs decoded whole, not token by token
    assert "\ufffd" not in out
    assert "'<s>Be brief. USER: <media>\\nq1 ASSISTANT:'" in out  # record's system turn, <image> moved first


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_utf8_bom_at_the_start_of_the_input_file_is_ignored(tmp_path, layout):
    """Files saved by Windows tools often start with a BOM; the first record must not be lost to it."""
    records = [{"id": f"t{i}", "conversations": turns("Say hi.", "Hi.")} for i in range(3)]
    text = json.dumps(records, indent=1) if layout == "json" else "\n".join(json.dumps(r) for r in records)
    src = tmp_path / f"data.{layout}"
    src.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    report = build_shards([src], tmp_path, tmp_path / "out")
    assert report.num_samples == 3 and not report.skipped


# --------------------------------------------------------------------------- CLI errors: one line, exit 1
def test_inspect_cli_errors_are_one_line_not_tracebacks(odd_set, tmp_path, capsys):
    src, media = odd_set
    build_shards([src], media, tmp_path / "out")
    cases = [
        ([str(tmp_path / "nowhere")], "nowhere"),
        ([str(media)], "index.json"),
        ([str(tmp_path / "out"), "--tokenizer", str(media)], "tokenizer"),
        ([str(tmp_path / "out"), "--tokenizer", TOKENIZER, "--template", "nope"], "nope"),
    ]
    for args, said in cases:
        capsys.readouterr()
        assert main(["shards", "inspect", *args]) == 1, args
        out = capsys.readouterr()
        text = out.out + out.err
        assert said in text and "Traceback" not in text


def test_build_cli_refuses_a_missing_media_root_and_bad_shard_size(odd_set, tmp_path, capsys):
    src, media = odd_set
    assert main(["shards", "build", "--json", str(src), "--media-root", str(tmp_path / "typo"),
                 "--out", str(tmp_path / "o1")]) == 1
    assert "typo" in capsys.readouterr().out and not (tmp_path / "o1").exists()
    assert main(["shards", "build", "--json", str(src), "--media-root", str(media),
                 "--out", str(tmp_path / "o2"), "--shard-size", "0"]) == 1
    assert "shard_size" in capsys.readouterr().out


def test_unreadable_media_paths_are_skipped_not_a_crashed_build(tmp_path):
    """A file name too long for the OS or with a NUL byte must be one skipped record, not end the build."""
    records = [
        {"id": "long", "image": "a" * 300 + ".jpg", "conversations": turns("<image>", "x")},
        {"id": "nul", "image": "a\x00b.jpg", "conversations": turns("<image>", "x")},
        {"id": "dir", "video": ".", "conversations": turns("<video>", "x")},
        {"id": "ok", "conversations": turns("q", "x")},
    ]
    src = tmp_path / "d.json"
    src.write_text(json.dumps(records))
    report = build_shards([src], tmp_path, tmp_path / "out")
    assert report.num_samples == 1 and report.skipped == {"missing_media": 3}
    assert sorted(r["id"] for r in report.skipped_records) == ["dir", "long", "nul"]


def test_record_with_an_unpaired_surrogate_is_skipped_not_a_failed_build(tmp_path):
    src = tmp_path / "s.json"
    src.write_text('[{"id": "sur", "conversations": [{"from": "human", "value": "bad \\ud83d"}, {"from": "gpt", "value": "x"}]},'
                   ' {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}]},'
                   ' {"id": "id \\udc00", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}]}]')
    report = build_shards([src], tmp_path, tmp_path / "out")
    assert report.num_samples == 1 and report.skipped == {"malformed_record": 2}
    assert "udc00" in (tmp_path / "out" / "skipped.json").read_text()  # written escaped, not a crash
    assert "surrogate" in report.skipped_records[0]["message"]


def test_img2dataset_caption_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    import webdataset as wds

    jpg = png(Image.new("RGB", (8, 8)), "JPEG")
    with wds.TarWriter(str(tmp_path / "i2d.tar")) as w:
        w.write({"__key__": "000000001", "jpg": jpg, "txt": "\xff\xfe latin-1".encode("latin-1")})
        w.write({"__key__": "000000002", "webp": png(Image.new("RGB", (8, 8)), "WEBP"), "txt": "日本語 caption".encode(),
                 "json": json.dumps({"key": 2, "status": "success"}).encode()})
    counter = SkipCounter()
    samples = list(iter_raw_samples([str(tmp_path / "i2d.tar")], counter))
    assert [(s.record["id"], s.media_ext) for s in samples] == [("2", "webp")]
    assert samples[0].record["conversations"][1]["value"] == "日本語 caption"
    assert counter.as_dict() == {"malformed_record": 1}


def test_tokenizer_without_pad_unk_or_eos_is_refused_clearly(tmp_path):
    """Batches are padded with the pad id; a tokenizer that has none to offer must fail at load, naming itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lm_mini.data.tokenizer import load_tokenizer

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.train_from_iterator(["hello world"] * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bare).save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match=r"bare.*no pad.*unk.*eos"):
        load_tokenizer(tmp_path / "bare")


def test_resume_refuses_another_media_root(odd_set, tmp_path, monkeypatch):
    """Finishing a build with other media would mix two data sets in one shard set."""
    from lm_mini.data import shard_builder
    from lm_mini.data.shard_format import ShardBuildError

    src, media = odd_set
    monkeypatch.setattr(shard_builder, "_write_shard", lambda task: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_shards([src], media, tmp_path / "out", shard_size=1)
    monkeypatch.undo()
    other = tmp_path / "other_media"
    other.mkdir()
    with pytest.raises(ShardBuildError, match="media root"):
        build_shards([src], other, tmp_path / "out", shard_size=1, resume=True)
    assert build_shards([src], media, tmp_path / "out", shard_size=1, resume=True).num_samples == 3


def test_out_path_that_is_a_file_is_refused_cleanly(odd_set, tmp_path, capsys):
    src, media = odd_set
    (tmp_path / "taken").write_text("not a directory")
    assert main(["shards", "build", "--json", str(src), "--media-root", str(media), "--out", str(tmp_path / "taken")]) == 1
    assert "taken" in capsys.readouterr().out
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_other_image_formats_are_stored_as_png_with_their_content(tmp_path):
    """gif / bmp / 16-bit tiff are not shard image types: stored as PNG, colours and grey levels kept."""
    media = tmp_path / "m"
    media.mkdir()
    Image.new("RGB", (6, 4), (10, 200, 30)).save(media / "a.gif")
    Image.new("RGB", (6, 4), (200, 10, 30)).save(media / "b.BMP")
    Image.fromarray(np.full((4, 6), 40000, np.uint16)).save(media / "c.tif")
    records = [{"id": n, "image": f, "conversations": turns("<image>\nq", "a")}
               for n, f in [("gif", "a.gif"), ("bmp", "b.BMP"), ("tif", "c.tif")]]
    (tmp_path / "d.json").write_text(json.dumps(records))
    build_shards([tmp_path / "d.json"], media, tmp_path / "out")
    samples = list(iter_raw_samples(shard_paths(tmp_path / "out"), SkipCounter()))
    assert [s.media_ext for s in samples] == ["png"] * 3
    pixels = [np.asarray(decode_image(s.media_bytes))[0, 0].tolist() for s in samples]
    assert pixels[1] == [200, 10, 30] and pixels[2] == [156, 156, 156]  # 40000 / 257
    assert abs(pixels[0][1] - 200) <= 8  # GIF's palette may shift a colour slightly


# --------------------------------------------------------------------------- video timing
def vfr_webm(pts_ms, nominal_rate=30):
    """A WebM whose frames sit at the given times (ms) while its header claims ``nominal_rate`` fps."""
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as c:
        s = c.add_stream("libvpx", rate=nominal_rate)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for i, p in enumerate(pts_ms):
            f = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 8 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = int(p), Fraction(1, 1000)
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return buf.getvalue()


def test_variable_frame_rate_video_is_sampled_by_its_real_duration():
    """30 frames spread over ~9 s (header says 30 fps): ~1 fps sampling must give ~9 frames, not 1 (official
    int(total // header fps)): int(duration) = 8 as the packets say the last frame lasts 33 ms (8.733 s)."""
    from lm_mini.data.media import decode_video

    frames = decode_video(vfr_webm(range(0, 9000, 300)), fps=1.0, max_frames=64)
    assert len(frames) == 8
    levels = [int(np.asarray(f).mean()) for f in frames]
    assert levels == sorted(levels)  # in time order
