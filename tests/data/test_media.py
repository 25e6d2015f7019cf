"""Media: image/video decoding (EXIF, corrupt input, frame sampling) and pixel preprocessing."""
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lm_mini.data.errors import SampleError
from lm_mini.data.media import ImageProcessor, decode_image, decode_video, expand_to_square, probe_video, sample_frame_indices
from pathlib import Path

from media_fixtures import GRAY_STEP, frame_index, gray_video, image_bytes, indexed_frame, indexed_video

MEAN, STD = (0.25, 0.5, 0.75), (0.5, 0.25, 0.5)
RED, BLUE = (255, 0, 0), (0, 0, 255)


def flat(rgb, h, w):
    """A uint8 [3, h, w] view of one colour."""
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, h, w)


def two_halves(w=40, h=20, left=RED, right=BLUE):
    image = Image.new("RGB", (w, h), right)
    image.paste(left, (0, 0, w // 2, h))
    return image


# ------------------------------------------------------------------------------------------ images


def test_decode_image_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed after a 90° clockwise turn
    data = image_bytes(two_halves(), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (20, 40)  # portrait once turned
    pixels = np.asarray(image).astype(int)
    # Clockwise: the stored left half (red) ends up on top.
    assert np.abs(pixels[5, 10] - RED).max() < 20 and np.abs(pixels[35, 10] - BLUE).max() < 20


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_decode_image_converts_to_rgb(mode):
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    image = decode_image(image_bytes(Image.new("RGB", (8, 6), RED).convert(mode), fmt))
    assert image.mode == "RGB" and image.size == (8, 6)


def _logo(mode: str) -> Image.Image:
    """A black 4x4 square in the middle of a fully transparent 8x8 image (whose hidden colour is black too)."""
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (2, 2, 6, 6))
    if mode == "RGBA":
        return rgba
    if mode == "LA":
        return rgba.convert("LA")
    palette = Image.new("P", (8, 8), 0)  # index 0 transparent (tRNS), index 1 opaque black
    palette.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)
    palette.paste(1, (2, 2, 6, 6))
    palette.info["transparency"] = 0
    return palette


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_onto_white(mode):
    """``convert("RGB")`` alone would show the black logo on its hidden black background: all black."""
    pixels = np.asarray(decode_image(image_bytes(_logo(mode), "PNG")))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[7, 7].tolist() == [255, 255, 255]
    assert pixels[4, 4].tolist() == [0, 0, 0]
    half = Image.new("RGBA", (2, 2), (0, 0, 255, 128))  # half-transparent blue blends with the white
    assert np.asarray(decode_image(image_bytes(half, "PNG")))[0, 0].tolist() == [127, 127, 255]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_images_raise_sample_error(damage):
    good = image_bytes(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    data = {"truncated": good[: len(good) // 2], "garbage": b"\xff\xd8\xff" + bytes(range(256)) * 4, "empty": b""}[damage]
    with pytest.raises(SampleError) as err:
        decode_image(data, sample_id="s1")
    assert err.value.reason == "corrupt_image" and err.value.sample_id == "s1"


def test_squash_stretches_square_crops_the_centre_and_pad_fills_with_the_mean_colour():
    image = Image.new("RGB", (40, 20), RED)
    squash = ImageProcessor(16, MEAN, STD, aspect_mode="squash").image(image)
    assert squash.shape == (1, 3, 16, 16)
    assert squash.dtype == torch.uint8 and torch.equal(squash[0], flat(RED, 16, 16))

    # square (official): shortest edge to 16 (32x16), the centre 16x16 kept: the middle of a red | blue
    # image, red left of the centre line and blue right of it, the outer quarters cut off
    square = ImageProcessor(16, MEAN, STD, aspect_mode="square").image(two_halves(40, 20))[0]
    assert torch.equal(square[:, :, :6], flat(RED, 16, 6)) and torch.equal(square[:, :, -6:], flat(BLUE, 16, 6))
    stretched = ImageProcessor(16, MEAN, STD, aspect_mode="squash").image(two_halves(40, 20))[0]
    assert torch.equal(stretched[:, :, :6], flat(RED, 16, 6)) and not torch.equal(square, stretched)

    proc = ImageProcessor(16, MEAN, STD, aspect_mode="pad")
    pad = proc.image(image)[0]
    mean_pixel = [int(255 * m) for m in MEAN]
    # 40x20 padded to 40x40: the image covers the middle half of the rows, mean colour above and below
    # (rows next to the edge are left out: the bicubic kernel blends across it).
    assert torch.equal(pad[:, :2], flat(mean_pixel, 2, 16)) and torch.equal(pad[:, -2:], flat(mean_pixel, 2, 16))
    assert torch.equal(pad[:, 6:10], flat(RED, 4, 16))
    assert proc.normalize(pad)[:, :2].abs().max() < 0.01  # the padding is (almost) zero after normalisation
    with pytest.raises(ValueError, match="aspect_mode must be one of square, squash, pad"):
        ImageProcessor(16, MEAN, STD, aspect_mode="crop")


def test_normalize_uses_the_encoders_mean_and_std():
    views = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = ImageProcessor(4, MEAN, STD).normalize(views)
    expected = (torch.tensor([0, 51, 255]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand(2, 3, 4, 4), atol=1e-6)


def test_resize_is_bicubic():
    image = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("RGB")
    views = ImageProcessor(8, MEAN, STD).image(image)
    expected = torch.from_numpy(np.array(image.resize((8, 8), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    assert torch.equal(views[0], expected)
    assert len(torch.unique(views[0, 0])) > 2  # interpolated, not nearest-neighbour's two levels


@pytest.mark.parametrize("mode", ["square", "squash", "pad"])
def test_high_resolution_views_are_global_then_crops_row_major(mode):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR quadrants
    image = Image.new("RGB", (32, 32))
    for k, colour in enumerate(colours):
        x, y = 16 * (k % 2), 16 * (k // 2)
        image.paste(colour, (x, y, x + 16, y + 16))
    proc = ImageProcessor(8, MEAN, STD, aspect_mode=mode, resolution_ratio=2)
    views = proc.image(image)
    assert proc.views_per_image == 5 and views.shape == (5, 3, 8, 8)
    assert torch.equal(views[0], ImageProcessor(8, MEAN, STD, aspect_mode=mode).image(image)[0])  # global view first
    for k, colour in enumerate(colours):  # each crop's interior is its quadrant's flat colour
        assert torch.equal(views[1 + k][:, 2:6, 2:6], flat(colour, 4, 4)), k
    assert ImageProcessor(8, MEAN, STD, aspect_mode=mode, resolution_ratio=1).image(image).shape == (1, 3, 8, 8)


def test_squash_keeps_its_output():
    """``squash`` is the former ``square``: the whole image resized to S x S, crops tiling it resized to (S*R)^2
    (torchvision's antialiased bicubic on uint8)."""
    from torchvision.transforms.v2 import functional as TF

    image = photo_like(70, 40, seed=3)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    bicubic = dict(interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    views = ImageProcessor(16, MEAN, STD, aspect_mode="squash", resolution_ratio=2).image(image)
    assert torch.equal(views[0], TF.resize(pixels, [16, 16], **bicubic))
    big = TF.resize(pixels, [32, 32], **bicubic)
    for k in range(4):
        i, j = divmod(k, 2)
        assert torch.equal(views[1 + k], big[:, 16 * i:16 * i + 16, 16 * j:16 * j + 16])


# ------------------------------------------------------------------------------------------ videos


@pytest.fixture(scope="module")
def video_30_frames():
    return gray_video(30, rate=10)  # 3 seconds at 10 fps


@pytest.mark.parametrize("fps, max_frames, expected", [
    (1.0, 64, [5, 14, 24]),  # official inference: int(30 // 10) = 3 frames, get_seq_frames(30, 3)
    (2.0, 64, [2, 7, 12, 16, 21, 26]),  # 30 // 5 = 6 frames
    (10.0, 2, [7, 21]),  # 30 wanted, capped at 2: get_seq_frames(30, 2)
])
def test_video_keeps_middle_frames_of_equal_segments(video_30_frames, fps, max_frames, expected):
    assert expected == official_get_seq_frames(30, len(expected))
    frames = decode_video(video_30_frames, fps=fps, max_frames=max_frames)
    assert [frame_index(f) for f in frames] == expected
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)


def test_sample_frame_indices_caps_long_videos():
    idx = sample_frame_indices(num_frames=3000, frame_rate=30.0, fps=1.0, max_frames=64)  # 100 s
    assert idx == official_get_seq_frames(3000, 64)
    assert sample_frame_indices(num_frames=6, frame_rate=30.0, fps=1.0) == [2]  # 0.2 s: one frame (official: none, fails)
    assert sample_frame_indices(num_frames=0, frame_rate=30.0) == []


def test_variable_rate_video_is_sampled_evenly_in_time(tmp_path):
    # 10 frames in the first second, then one a second up to 10 s (each on screen until the next)
    times = [i / 10 for i in range(10)] + [float(k) for k in range(1, 11)]
    picks = sample_frame_indices(num_frames=20, frame_rate=20 / 11, fps=1.0, max_frames=64, times=times)
    assert picks == [5] + list(range(10, 20))  # one frame per second of video, not half from the first second
    assert sample_frame_indices(20, 20 / 11, 1.0, 64) == official_get_seq_frames(20, 11)  # by index

    # end to end: a Matroska file with those timestamps; frame i is gray i * GRAY_STEP
    with av.open(str(tmp_path / "vfr.mkv"), "w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"qscale": "2"}
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * GRAY_STEP, np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    picked = [frame_index(f) for f in decode_video((tmp_path / "vfr.mkv").read_bytes(), fps=1.0)]
    # 10 or 11 segments, as the container states the last frame's duration; one frame from the first second
    assert len(picked) in (10, 11) and picked == [5] + list(range(10, 9 + len(picked)))


def official_get_seq_frames(total_num_frames, desired_num_frames):
    """``get_seq_frames`` of official LLaVA-Mini (ictnlp/LLaVA-Mini@47da113, llavamini/train/train.py, used by
    ``load_video_org(num_frm=8)``; the same function in every llavamini/eval/video/*.py loader), verbatim."""
    seg_size = float(total_num_frames - 1) / desired_num_frames
    seq = []
    for i in range(desired_num_frames):
        start = int(np.round(seg_size * i))
        end = int(np.round(seg_size * (i + 1)))
        seq.append((start + end) // 2)
    return seq


@pytest.mark.parametrize("total", [1, 5, 8, 9, 17, 30, 31, 100, 241, 1000, 1001, 7201])
def test_training_frames_are_official_get_seq_frames(total):
    """Official training keeps min(total, 8) frames (``load_video_org``): ``get_seq_frames(total, min(total, 8))``."""
    expected = official_get_seq_frames(total, min(total, 8))
    assert sample_frame_indices(total, 25.0, num_segments=8) == expected
    constant_rate = [i / 25.0 for i in range(total)]  # the frames' own timestamps give the same picks
    assert sample_frame_indices(total, 25.0, times=constant_rate, num_segments=8) == expected
    assert len(expected) == min(total, 8)


def test_decoded_training_video_keeps_the_official_frames(video_30_frames):
    frames = decode_video(video_30_frames, fps=1.0, max_frames=64, num_segments=8)
    assert [frame_index(f) for f in frames] == official_get_seq_frames(30, 8)
    # min(5, 8) = 5 frames, as official: get_seq_frames(5, 5) = [0, 1, 2, 2, 3] (its segments overlap on short clips)
    assert [frame_index(f) for f in decode_video(gray_video(5), num_segments=8)] == official_get_seq_frames(5, 5)


# Official frames (ictnlp/LLaVA-Mini@47da113, decord): training load_video_org(num_frm=8) = get_seq_frames(total,
# min(total, 8)); inference (run_llava_mini.py, eval/video/*.py load_video) = get_seq_frames(total, int(total // fps))
# with decord's get_avg_fps (the header's average rate). Matroska and WebM store whole-millisecond timestamps:
# 12 fps frame 8 is stamped 0.667 s, after the 0.66667 s a timestamp bisection looked for.
@pytest.mark.parametrize("total, rate, container, codec", [
    (45, 12, "webm", "libvpx-vp9"), (64, 24, "matroska", "mpeg4"), (45, 12, "matroska", "mpeg4"),
    (97, Fraction(30000, 1001), "matroska", "mpeg4"), (100, Fraction(30000, 1001), "mp4", "mpeg4"),
    (37, Fraction(15, 2), "mp4", "mpeg4"), (130, 60, "mp4", "mpeg4"),
])
def test_constant_rate_video_frames_are_officials_in_any_container(total, rate, container, codec):
    video = indexed_video(total, rate, container, codec)
    training = [indexed_frame(f) for f in decode_video(video, num_segments=8)]
    assert training == official_get_seq_frames(total, min(total, 8))
    inference = [indexed_frame(f) for f in decode_video(video, fps=1.0, max_frames=10**6)]
    assert inference == official_get_seq_frames(total, min(total, int(total // float(rate))))


def test_sample_processor_samples_training_videos_by_segments_and_held_out_ones_by_fps(video_30_frames):
    from lm_mini.data.samples import SampleProcessor
    from lm_mini.data.shard_reader import RawSample
    from lm_mini.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(__file__).resolve().parents[2] / "data_shards" / "demo" / "tokenizer")
    record = {"id": "v", "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                           {"from": "gpt", "value": "A fade."}]}
    raw = RawSample("v", record, "video", "mp4", video_30_frames, "shard-0.tar")
    images = ImageProcessor(16, MEAN, STD, resolution_ratio=2, video_hires=True)
    train = SampleProcessor(tokenizer, "vicuna_v1", 256, images, video_fps=1.0, max_frames=64, video_frames=8)
    sample = train(raw, "set/v")
    assert sample["frames"] == 8 and sample["pixel_values"].shape == (8 * 5, 3, 16, 16)  # R²+1 views a frame
    held_out = train.for_inference()
    assert held_out(raw, "set/v")["frames"] == 3 and train.video_frames == 8  # 1 fps of a 3 s clip


def test_square_video_frames_are_squashed_by_nearest_neighbour_then_split():
    """Official video loaders resize every frame to S x S with ``F.interpolate`` (nearest), then ``split_image``
    at R > 1 and the CLIP processor on each piece (the global view is the squashed frame itself)."""
    frame = photo_like(48, 32, seed=7)
    pixels = torch.from_numpy(np.asarray(frame).copy()).permute(2, 0, 1)
    squashed = torch.nn.functional.interpolate(pixels[None].float(), size=(16, 16))[0].to(torch.uint8)  # official
    one = ImageProcessor(16, MEAN, STD).video([frame, frame])
    assert one.shape == (2, 3, 16, 16) and torch.equal(one[0], squashed) and torch.equal(one[1], squashed)
    hires = ImageProcessor(16, MEAN, STD, resolution_ratio=2, video_hires=True)
    views = hires.video([frame, frame])
    assert hires.views_per_frame == 5 and views.shape == (10, 3, 16, 16)
    assert torch.equal(views[0], squashed) and torch.equal(views[5:], views[:5])
    block = Image.fromarray(squashed.permute(1, 2, 0).numpy()).crop((8, 0, 16, 8))  # top-right block, 8x8
    expected = torch.from_numpy(np.asarray(block.resize((16, 16), Image.Resampling.BICUBIC)).copy()).permute(2, 0, 1)
    assert (views[2].int() - expected.int()).abs().max() <= 3
    assert ImageProcessor(16, MEAN, STD, resolution_ratio=2).video([frame]).shape == (1, 3, 16, 16)  # video_hires off


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_bad_videos_raise_sample_error(video_30_frames, damage):
    data = {"empty": b"", "garbage": bytes(range(256)) * 8, "truncated": video_30_frames[:300]}[damage]
    for fn in (decode_video, probe_video):
        with pytest.raises(SampleError) as err:
            fn(data, sample_id="v1")
        assert err.value.reason == "bad_video" and err.value.sample_id == "v1"


def _encoded(path, container_format: str, frames: int = 50, **options) -> bytes:
    with av.open(str(path), "w", format=container_format, options=options) as container:  # a file: faststart rewrites it
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        noise = np.random.default_rng(0)
        for _ in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(noise.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")))
        container.mux(stream.encode())
    return path.read_bytes()


@pytest.mark.parametrize("container_format,options", [("mp4", {"movflags": "faststart"}), ("matroska", {})])
def test_a_video_cut_short_is_refused_not_taken_for_a_shorter_clip(tmp_path, container_format, options):
    whole = _encoded(tmp_path / "v", container_format, **options)  # the header (first) says 50 frames, 5 s
    assert probe_video(whole)["frames"] == 50 and len(decode_video(whole, fps=1.0)) == 5
    for fn in (decode_video, probe_video):
        with pytest.raises(SampleError, match=r"truncated: \d+ of the 50 frames its header declares") as err:
            fn(whole[: int(len(whole) * 0.6)], sample_id="v1")
        assert err.value.reason == "bad_video"


def test_probe_and_video_views(video_30_frames):
    assert probe_video(video_30_frames) == {"frames": 30, "width": 32, "height": 32}
    frames = decode_video(video_30_frames, fps=1.0)
    pixels = ImageProcessor(16, MEAN, STD, aspect_mode="pad").video(frames)
    assert pixels.shape == (3, 3, 16, 16)
    assert abs(int(pixels[1, 0, 8, 8]) - 14 * 8) < 4  # the middle kept frame is frame 14 (get_seq_frames(30, 3))


def test_pad_mode_shrinks_a_huge_image_before_padding_it():
    """A 30000x60 banner is padded after an integer shrink (not to a 2.7 GB canvas); the views of a
    shrunk image match those of padding at full size."""
    processor = ImageProcessor(16, MEAN, STD, aspect_mode="pad", resolution_ratio=2)
    banner = processor.image(Image.new("RGB", (30000, 60), RED))  # shrunk by 30000 // (4 * 32) = 234
    assert banner.shape == (5, 3, 16, 16) and banner[0, :, 0, 0].tolist() == list(processor.fill)  # a thin line on the fill
    ramp = np.tile(np.linspace(0, 255, 2000, dtype=np.uint8)[None, :, None], (500, 1, 3))
    image = Image.fromarray(np.ascontiguousarray(ramp))  # shrunk by 2000 // 128 = 15
    reference = processor._to_tensor(expand_to_square(image, processor.fill), 16)  # padded at full size
    assert (processor.image(image)[0].int() - reference.int()).abs().float().mean() < 1.0


def test_square_view_of_an_extreme_banner_resizes_only_its_centre(monkeypatch):
    """A 100000x10 banner's shortest-edge resize would be a 3.4 GB strip at S = 336; only the window behind the centre
    crop is resized (the same scale, within a sub-pixel shift of the full resize)."""
    from lm_mini.data import media

    sizes, resize = [], media._resize
    monkeypatch.setattr(media, "_resize", lambda px, h, w: sizes.append(3 * h * w) or resize(px, h, w))
    views = ImageProcessor(336, MEAN, STD).image(photo_like(100000, 10, seed=4))
    assert views.shape == (1, 3, 336, 336) and 0 < max(sizes) < 2e6  # not 3.4 GB
    monkeypatch.undo()
    for source in [(2000, 20), (20, 2000)]:
        pixels = torch.from_numpy(np.asarray(photo_like(*source, seed=5)).copy()).permute(2, 0, 1)
        exact = media.clip_view(pixels, 64)
        monkeypatch.setattr(media, "MAX_RESIZED_BYTES", 1)  # every view through the window
        windowed = media.clip_view(pixels, 64)
        monkeypatch.undo()
        assert (exact.float() - windowed.float()).abs().mean() < 1.0


def test_pad_colour_is_the_official_truncated_mean():
    # Official LLaVA expand2square fill: tuple(int(x * 255) for x in image_mean) -> (122, 116, 104) for CLIP.
    clip_mean = (0.48145466, 0.4578275, 0.40821073)
    assert ImageProcessor(16, clip_mean, (0.26862954, 0.26130258, 0.27577711), aspect_mode="pad").fill == (122, 116, 104)


def photo_like(w, h, seed):
    """A smooth random colour field with grain: the spectrum of a photo, unlike flat test patterns."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    grain = rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray((np.asarray(field, dtype=np.int16) + grain).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("source, size, aspect", [((336, 336), 224, "square"), ((64, 64), 224, "square"),
                                                   ((640, 480), 336, "pad"), ((300, 500), 336, "pad")])
def test_pixels_match_llavas_clip_image_processor(source, size, aspect):
    """Parity with LLaVA's own preprocessing: ``expand2square`` (pad) then transformers' CLIPImageProcessor
    (PIL bicubic to the shortest edge, centre crop, rescale, normalise). Our resize is torchvision's
    antialiased bicubic on uint8, a port of PIL's filter: rounding may differ by a grey level or two."""
    from transformers import CLIPImageProcessor

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    image = photo_like(*source, seed=source[0])
    proc = ImageProcessor(size, mean, std, aspect_mode=aspect)
    ours = proc.normalize(proc.image(image)[0])
    reference = image if aspect == "square" else expand_to_square(image, tuple(int(255 * m) for m in mean))
    hf = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=mean, image_std=std)
    theirs = hf.preprocess(reference, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, size, size)
    levels = ((ours - theirs) * torch.tensor(std).view(3, 1, 1) * 255).abs()  # difference in 0..255 grey levels
    assert levels.max() < 2.01 and (levels > 0.01).float().mean() < 0.01
    assert (levels > 1.01).float().mean() < 1e-3


def official_split_image(image, n=2):
    """``LazySupervisedDataset.split_image`` of official LLaVA-Mini (ictnlp/LLaVA-Mini@47da113,
    llavamini/train/train.py; the same function in llavamini/eval/run_llava_mini.py), verbatim but for style:
    n x n blocks row-major, then the whole image."""
    if n == 1:
        return [image]
    width, height = image.size
    block_width, block_height = width // n, height // n
    blocks = [image.crop((j * block_width, i * block_height, (j + 1) * block_width, (i + 1) * block_height))
              for i in range(n) for j in range(n)]
    return blocks + [image]


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("source, size, ratio, aspect", [
    ((70, 40), 32, 1, "square"), ((40, 70), 32, 1, "square"), ((333, 201), 48, 1, "square"), ((201, 333), 40, 1, "square"),
    ((97, 500), 40, 2, "square"), ((500, 300), 56, 2, "square"), ((641, 479), 48, 3, "square"),
    ((300, 500), 48, 2, "pad"), ((70, 41), 32, 2, "pad"),
])
def test_views_match_official_clip_preprocessing(backend, source, size, ratio, aspect):
    """Official LLaVA-Mini's pixels (train.py ``__getitem__``, run_llava_mini.py): ``expand2square`` for ``pad``,
    ``split_image``, then transformers' CLIP image processor on every piece (shortest edge to S, centre crop).
    ``pil``: the PIL-backed processor (what the official code ran, transformers 4.44); ``torchvision``: today's
    ``CLIPImageProcessor``. Theirs lists the crops then the whole image; ours the global view first."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    image = photo_like(*source, seed=sum(source))
    cls = CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil
    hf = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=mean, image_std=std)
    reference = image if aspect == "square" else expand_to_square(image, tuple(int(255 * m) for m in mean))
    pieces = official_split_image(reference, ratio)
    theirs = torch.stack([hf.preprocess(p, return_tensors="pt")["pixel_values"][0] for p in pieces])
    theirs = torch.cat([theirs[-1:], theirs[:-1]])  # whole image first, as our views
    proc = ImageProcessor(size, mean, std, aspect_mode=aspect, resolution_ratio=ratio)
    ours = proc.normalize(proc.image(image))
    assert ours.shape == theirs.shape == (1 + ratio * ratio if ratio > 1 else 1, 3, size, size)
    levels = ((ours - theirs) * torch.tensor(std).view(3, 1, 1) * 255).abs()  # difference in 0..255 grey levels
    # torchvision: the same resize on the same uint8 pixels (identical today); PIL's own bicubic rounds its two
    # passes apart from torchvision's port: a rare pixel lands 3 levels off
    assert levels.max() < (2.01 if backend == "torchvision" else 3.01)
    assert (levels > 1.01).float().mean() < 1e-3
    if aspect == "square" and source[0] != source[1]:  # the former stretch is far off on a non-square image
        squashed = ImageProcessor(size, mean, std, aspect_mode="squash", resolution_ratio=ratio)
        assert ((proc.normalize(squashed.image(image)) - theirs) * 0.27 * 255).abs().max() > 10
