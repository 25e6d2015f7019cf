"""Media: image/video decoding (EXIF, corrupt input, frame sampling) and pixel preprocessing."""
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lm_mini.data.errors import SampleError
from lm_mini.data.media import ImageProcessor, decode_image, decode_video, expand_to_square, probe_video, sample_frame_indices
from media_fixtures import GRAY_STEP, frame_index, gray_video, image_bytes

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


def test_square_stretches_and_pad_fills_with_the_mean_colour():
    image = Image.new("RGB", (40, 20), RED)
    square = ImageProcessor(16, MEAN, STD, aspect_mode="square").image(image)
    assert square.shape == (1, 3, 16, 16)
    assert square.dtype == torch.uint8 and torch.equal(square[0], flat(RED, 16, 16))

    proc = ImageProcessor(16, MEAN, STD, aspect_mode="pad")
    pad = proc.image(image)[0]
    mean_pixel = [int(255 * m) for m in MEAN]
    # 40x20 padded to 40x40: the image covers the middle half of the rows, mean colour above and below
    # (rows next to the edge are left out: the bicubic kernel blends across it).
    assert torch.equal(pad[:, :2], flat(mean_pixel, 2, 16)) and torch.equal(pad[:, -2:], flat(mean_pixel, 2, 16))
    assert torch.equal(pad[:, 6:10], flat(RED, 4, 16))
    assert proc.normalize(pad)[:, :2].abs().max() < 0.01  # the padding is (almost) zero after normalisation


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


def test_high_resolution_views_are_global_then_crops_row_major():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR quadrants
    image = Image.new("RGB", (32, 32))
    for k, colour in enumerate(colours):
        x, y = 16 * (k % 2), 16 * (k // 2)
        image.paste(colour, (x, y, x + 16, y + 16))
    proc = ImageProcessor(8, MEAN, STD, resolution_ratio=2)
    views = proc.image(image)
    assert proc.views_per_image == 5 and views.shape == (5, 3, 8, 8)
    assert torch.equal(views[0], ImageProcessor(8, MEAN, STD).image(image)[0])  # global view first
    for k, colour in enumerate(colours):  # each crop's interior is its quadrant's flat colour
        assert torch.equal(views[1 + k][:, 2:6, 2:6], flat(colour, 4, 4)), k
    big = ImageProcessor(16, MEAN, STD).image(image)[0]  # crops tile the image resized to (S*R)^2
    assert torch.equal(views[2], big[:, :8, 8:]) and torch.equal(views[3], big[:, 8:, :8])
    assert ImageProcessor(8, MEAN, STD, resolution_ratio=1).image(image).shape == (1, 3, 8, 8)


# ------------------------------------------------------------------------------------------ videos


@pytest.fixture(scope="module")
def video_30_frames():
    return gray_video(30, rate=10)  # 3 seconds at 10 fps


@pytest.mark.parametrize("fps, max_frames, expected", [
    (1.0, 64, [5, 15, 25]),  # 3 segments of 10 frames: their middles
    (2.0, 64, [2, 7, 12, 17, 22, 27]),  # 6 segments of 5
    (10.0, 2, [7, 22]),  # 30 segments wanted, capped: 2 equal segments of 15
])
def test_video_keeps_middle_frames_of_equal_segments(video_30_frames, fps, max_frames, expected):
    frames = decode_video(video_30_frames, fps=fps, max_frames=max_frames)
    assert [frame_index(f) for f in frames] == expected
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)


def test_sample_frame_indices_caps_long_videos():
    idx = sample_frame_indices(num_frames=3000, frame_rate=30.0, fps=1.0, max_frames=64)  # 100 s
    assert len(idx) == 64 and idx[0] == int(0.5 * 3000 / 64) and idx[-1] == int(63.5 * 3000 / 64)
    assert sample_frame_indices(num_frames=6, frame_rate=30.0, fps=1.0) == [3]  # 0.2 s: still one frame
    assert sample_frame_indices(num_frames=0, frame_rate=30.0) == []


def test_variable_rate_video_is_sampled_evenly_in_time(tmp_path):
    # 10 frames in the first second, then one a second up to 10 s (each on screen until the next)
    times = [i / 10 for i in range(10)] + [float(k) for k in range(1, 11)]
    picks = sample_frame_indices(num_frames=20, frame_rate=20 / 11, fps=1.0, max_frames=64, times=times)
    assert picks == [5] + list(range(10, 20))  # one frame per second of video, not half from the first second
    assert sample_frame_indices(20, 20 / 11, 1.0, 64) == [int((k + 0.5) * 20 / 11) for k in range(11)]  # by index
    assert sample_frame_indices(30, 10.0, 1.0, 64, times=[i / 10 for i in range(30)]) == [5, 15, 25]  # constant rate: same

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
    assert abs(int(pixels[1, 0, 8, 8]) - 15 * 8) < 4  # the middle kept frame is frame 15


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
