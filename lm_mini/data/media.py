"""Media decoding and pixel preprocessing: images with PIL, videos with PyAV.

``decode_image`` / ``decode_video`` turn stored bytes into PIL images (or raise ``SampleError``, so a bad
sample is skipped and counted, never a crash). ``ImageProcessor`` turns PIL images into the encoder's
uint8 pixel views: one view per image (plus R*R crops at high resolution), one per video frame (or 1 + R*R),
as official LLaVA-Mini preprocesses them (``llavamini/mm_utils.py``, ``llavamini/train/train.py``).

A little over ~450 lines on purpose: decoding and the pixel views are read side by side with the official loaders.
"""
from __future__ import annotations

import bisect
import io
from typing import Any, List, Optional, Sequence

import av
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from lm_mini.data.errors import SampleError
from lm_mini.models.encoders import normalize_pixels, views_per_image

# ------------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, sample_id: Optional[str] = None) -> Image.Image:
    """Bytes -> RGB PIL image with its EXIF orientation applied.

    The image is fully decoded here (``load``) so a truncated or corrupt file fails now, as
    ``SampleError("corrupt_image")``, rather than later inside a dataloader worker.
    """
    if not data:
        raise SampleError("corrupt_image", "zero-length image", sample_id)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: a copy of every image costs ~0.2 ms
        return _rgb(_to_8_bit(image))
    except UnidentifiedImageError as e:  # its message holds a BytesIO address: not reproducible
        raise SampleError("corrupt_image", f"not an image format PIL can read ({len(data)} bytes)", sample_id) from e
    except Exception as e:  # PIL signals bad data with OSError, SyntaxError, ValueError, EOFError, ...
        raise SampleError("corrupt_image", f"cannot decode image ({type(e).__name__}: {e})", sample_id) from e


def _rgb(image: Image.Image) -> Image.Image:
    """The image in mode RGB; an RGB image itself, not a copy (a copy costs ~0.2 ms per image).

    Transparent pixels are composited onto white, as img2dataset and recent VLM processors do:
    ``convert("RGB")`` alone would keep whatever colour they hide (often black, so a black logo on a
    transparent background would reach the model as a black square).
    """
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if image.mode == "RGB" and not transparent:
        return image
    if transparent:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """Greyscale images of more than 8 bits -> mode L, keeping their grey levels.

    PIL's ``convert("RGB")`` clips these to 0..255 (a 16-bit PNG turns white): 16-bit integer
    modes (``I;16*``, and ``I`` as PNG/TIFF decode 16-bit data) are divided by 257; float images
    (``F``) are taken as 0..1 when they lie in it, else as 0..255.
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if pixels.size and 0.0 <= pixels.min() and pixels.max() <= 1.0 else 1.0
    else:
        sixteen_bit = image.mode.startswith("I;16") or (pixels.size > 0 and pixels.max() > 255)
        scale = 1.0 / 257.0 if sixteen_bit else 1.0
    return Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), mode="L")


def get_seq_frames(total_num_frames: int, desired_num_frames: int) -> List[int]:
    """Official LLaVA-Mini's frame picker (``llavamini/train/train.py`` and every ``llavamini/eval/video/*``
    loader, ictnlp/LLaVA-Mini@47da113): the middle index of each of ``desired`` equal segments of
    ``[0, total - 1]``, segment ends rounded half to even (``np.round``)."""
    seg_size = float(total_num_frames - 1) / desired_num_frames
    return [(int(np.round(seg_size * i)) + int(np.round(seg_size * (i + 1)))) // 2 for i in range(desired_num_frames)]


def sample_frame_indices(num_frames: int, frame_rate: float, fps: float = 1.0, max_frames: int = 64,
                         times: Optional[Sequence[float]] = None, num_segments: Optional[int] = None) -> List[int]:
    """Indices of the frames to keep, as official LLaVA-Mini picks them: :func:`get_seq_frames` of ``n`` frames.

    ``num_segments`` given (official training: 8, ``load_video_org(num_frm=8)``): ``n = min(num_frames,
    num_segments)``. Else (official inference, every ``llavamini/eval/video/*`` loader and ``run_llava_mini.py``):
    ``n = int(num_frames // (frame_rate / fps))``, at 1 fps official's ``int(total // fps)``, at least 1 (official
    fails on a clip under a second) and at most ``max_frames`` (official: none, 1000 in its MVBench/MLVU scripts).

    ``times``: the presentation times (s, ascending) of a *variable*-rate video (:func:`_count_frames` gives
    them only then; constant-rate video is picked by index, like decord). Official picks by index whatever the
    rate; here a variable-rate video is sampled in time instead: ``n = int(duration * fps)`` (at least 1, at most
    ``max_frames``) frames on screen at the middle of ``n`` equal time segments, or for training at the times
    ``get_seq_frames``' picks would have at constant rate (a frame on screen through two segments is kept twice).
    """
    if num_frames <= 0:
        return []
    duration = num_frames / frame_rate
    timed = times is not None and len(times) == num_frames
    if num_segments is not None:
        picks = get_seq_frames(num_frames, min(num_frames, int(num_segments)))
        if not timed:
            return picks
        start = times[0]
        return [max(0, bisect.bisect_right(times, start + p * duration / num_frames + 1e-9) - 1) for p in picks]
    if not timed:
        n = max(1, min(int(num_frames // (frame_rate / fps)), max_frames, num_frames))
        return get_seq_frames(num_frames, n)
    n = max(1, min(int(duration * fps + 1e-9), max_frames, num_frames))
    start = times[0]
    return [max(0, bisect.bisect_right(times, start + (k + 0.5) * duration / n + 1e-9) - 1) for k in range(n)]


def _open_video(data: bytes, sample_id: Optional[str]):
    if not data:
        raise SampleError("bad_video", "zero-length video", sample_id)
    try:
        container = av.open(io.BytesIO(data))
    except Exception as e:  # av.error.InvalidDataError and friends
        raise SampleError("bad_video", f"cannot open video ({type(e).__name__}: {e})", sample_id) from e
    if not container.streams.video:
        container.close()
        raise SampleError("bad_video", "no video stream", sample_id)
    return container


def _frame_rate(stream, num_frames: int) -> float:
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        return float(rate)
    if stream.duration and stream.time_base:  # no rate in the header: derive it from the duration
        return num_frames / float(stream.duration * stream.time_base)
    return 1.0


def _declared_frames(container, stream, rate: float) -> int:
    """The frames the header promises: the stream's frame count (MP4), else its duration times the rate,
    else the file's duration when the video is its only stream (Matroska); 0 when it says nothing."""
    if stream.frames:
        return int(stream.frames)
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration and len(container.streams) == 1:  # with audio, the file may outlast the video
        seconds = container.duration / av.time_base
    return round(seconds * rate) if seconds else 0


def _evenly_spaced(stamps: Sequence[int]) -> bool:
    """Timestamps (in time-base ticks, ascending) of a constant-rate video: every gap within one tick (the
    timestamps' rounding: Matroska and WebM store whole milliseconds, so 24 fps gaps are 41 or 42) plus 1%."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return bool(gaps) and min(gaps) > 0 and max(gaps) - min(gaps) <= 1 + 0.01 * min(gaps)


def _count_frames(data: bytes, sample_id: Optional[str]) -> tuple:
    """(number of frames, frame rate, presentation times in s or None), frames counted by demuxing, which is
    cheap (no decoding).

    Constant-rate video (frames evenly spaced within their timestamps' rounding, or without timestamps): the
    header's average rate (what decord's ``get_avg_fps`` reads, official LLaVA-Mini's loaders) and no times, so
    frames are picked by index as official picks them; rounded millisecond timestamps would shift the picks.
    Variable-rate video, or one whose frames do not keep its header's rate: the rate over the span of the frames'
    timestamps (the header's would be wrong) and the times (ascending), so frames are picked evenly in time."""
    container = _open_video(data, sample_id)
    try:
        stream = container.streams.video[0]
        num_frames, stamps, last, last_duration = 0, [], None, 0
        for p in container.demux(stream):
            if not p.size:
                continue
            num_frames += 1
            if p.pts is not None:
                if last is None or p.pts >= last:
                    last, last_duration = p.pts, p.duration or 0
                stamps.append(p.pts)
        rate = _frame_rate(stream, num_frames)
        times = None
        if num_frames > 1 and len(stamps) == num_frames and max(stamps) > min(stamps) and stream.time_base:
            stamps.sort()  # decode order -> presentation order
            base = float(stream.time_base)
            gap = sorted(b - a for a, b in zip(stamps, stamps[1:]))[(num_frames - 1) // 2] * base  # median
            span = (stamps[-1] - stamps[0]) * base + (last_duration * base if last_duration else gap)  # + last frame's
            header = stream.average_rate or stream.guessed_rate
            if not _evenly_spaced(stamps) or (header and abs(gap - 1 / float(header)) > base + 0.01 * gap):
                # variable rate, or a header whose rate the frames do not keep: the timestamps tell the duration
                times = [(t - stamps[0]) * base for t in stamps]
                rate = num_frames / span
            elif not header:
                rate = num_frames / span
        declared = _declared_frames(container, stream, rate)
        if declared and num_frames < declared - max(2, 0.05 * declared):
            # A file cut short (an interrupted copy) still demuxes; its first part would pass for the whole clip.
            raise SampleError("bad_video", f"truncated: {num_frames} of the {declared} frames its header declares", sample_id)
        return num_frames, rate, times
    except SampleError:
        raise
    except Exception as e:
        raise SampleError("bad_video", f"cannot read video ({type(e).__name__}: {e})", sample_id) from e
    finally:
        container.close()


def _decode_frames(data: bytes, wanted: Sequence[int], sample_id: Optional[str]) -> List[Image.Image]:
    """Decode from the start, converting only the frames whose index is in ``wanted`` (sorted)."""
    container = _open_video(data, sample_id)  # reopened rather than seeked: not every container seeks
    frames, targets = [], set(wanted)
    try:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in targets:
                frames.append(frame.to_image())
            if i >= wanted[-1]:
                break
    except Exception as e:
        raise SampleError("bad_video", f"cannot decode video ({type(e).__name__}: {e})", sample_id) from e
    finally:
        container.close()
    return frames


def decode_video(data: bytes, fps: float = 1.0, max_frames: int = 64, sample_id: Optional[str] = None,
                 num_segments: Optional[int] = None) -> List[Image.Image]:
    """Bytes -> the sampled frames as RGB PIL images (see ``sample_frame_indices``; ``num_segments``: a fixed
    number of frames, as official LLaVA-Mini training samples).

    Zero-length, unreadable or frameless videos raise ``SampleError("bad_video")``.
    """
    num_frames, rate, times = _count_frames(data, sample_id)
    wanted = sample_frame_indices(num_frames, rate, fps, max_frames, times, num_segments)
    if not wanted:
        raise SampleError("bad_video", "video has no frames", sample_id)
    distinct = sorted(set(wanted))
    frames = _decode_frames(data, distinct, sample_id)
    # Fewer decoded frames than packets means a damaged stream; a sample with missing frames would
    # be silently wrong, so it is refused instead.
    if len(frames) != len(distinct):
        raise SampleError("bad_video", f"decoded {len(frames)} of {len(distinct)} sampled frames", sample_id)
    by_index = dict(zip(distinct, frames))
    return [by_index[i] for i in wanted]


def probe_video(data: bytes, sample_id: Optional[str] = None) -> dict:
    """Cheap validity check for the shard builder: the video has frames and its first frame decodes.

    Returns ``{"frames": ..., "width": ..., "height": ...}``.
    """
    num_frames = _count_frames(data, sample_id)[0]
    if num_frames == 0:
        raise SampleError("bad_video", "video has no frames", sample_id)
    frames = _decode_frames(data, [0], sample_id)
    if not frames:
        raise SampleError("bad_video", "no decodable frame", sample_id)
    return {"frames": num_frames, "width": frames[0].width, "height": frames[0].height}


# ------------------------------------------------------------------------------------------ pixels

ASPECT_MODES = ("square", "squash", "pad")


def expand_to_square(image: Image.Image, fill: Sequence[int]) -> Image.Image:
    """Pad the short side (centred) with a flat colour, as LLaVA-1.5's ``expand2square``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), tuple(fill))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def _pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, h, w] (a view of one copy of the pixel bytes)."""
    image = _rgb(image)
    w, h = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def _resize(pixels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, h, w], bicubic with antialiasing (PIL's filter, as CLIP's processor); unchanged
    when already that size (PIL and transformers' processors return such an image as it is)."""
    if tuple(pixels.shape[-2:]) == (h, w):
        return pixels
    return TF.resize(pixels, [h, w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def clip_view(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The CLIP image processor's view: shortest edge resized to ``size``, then the centre ``size x size``.

    uint8 [3, H, W] -> [3, size, size]. Sizes and offsets as transformers' ``CLIPImageProcessor``
    (``get_resize_output_image_size(default_to_square=False)``: the long side is
    ``int(size * long / short)``; ``center_crop``: offsets ``(new - size) // 2``), which official
    LLaVA-Mini calls for every aspect mode but ``pad`` (``llavamini/mm_utils.py`` ``process_images``,
    ``llavamini/train/train.py`` ``LazySupervisedDataset.__getitem__``).
    """
    h, w = pixels.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if new_h * new_w * 3 > MAX_RESIZED_BYTES:
        return _clip_view_of_window(pixels, size, new_h, new_w)
    resized = _resize(pixels, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[:, top:top + size, left:left + size]


# A banner of extreme aspect ratio (over ~200:1 at S = 336) would be resized to a strip of this many bytes or more
# before its centre is cut out (100000x10 -> 3.4 GB): such an image is resized around its centre only.
MAX_RESIZED_BYTES = 64 * 2**20


def _clip_view_of_window(pixels: torch.Tensor, size: int, new_h: int, new_w: int) -> torch.Tensor:
    """:func:`clip_view` of an extreme banner: the source window behind the centre crop (plus the bicubic filter's
    reach) resized at the same scale, then cropped. Within a sub-pixel shift of the full resize."""
    h, w = pixels.shape[-2:]
    wide = new_w > new_h
    long, new_long = (w, new_w) if wide else (h, new_h)
    scale = long / new_long  # source pixels per output pixel along the long side
    margin = 2 * max(1.0, scale) + 2  # bicubic reaches 2 output pixels (2 * scale source pixels when shrinking)
    start = max(0, int((new_long - size) // 2 * scale - margin))
    stop = min(long, int(((new_long - size) // 2 + size) * scale + margin) + 1)
    window = pixels[..., start:stop] if wide else pixels[..., start:stop, :]
    out_len = max(size, round((stop - start) / scale))
    resized = _resize(window, size, out_len) if wide else _resize(window, out_len, size)
    offset = round(((new_long - size) // 2) - start / scale)  # the crop's first output pixel, in the window
    offset = min(max(0, offset), out_len - size)
    return resized[..., offset:offset + size] if wide else resized[..., offset:offset + size, :]


def split_blocks(pixels: torch.Tensor, r: int) -> List[torch.Tensor]:
    """Official ``split_image``: ``r x r`` blocks of ``(W // r) x (H // r)`` pixels, row-major (views, no copy).

    As the official code, the last ``W % r`` columns / ``H % r`` rows fall in no block. An image
    narrower than ``r`` pixels keeps blocks of one pixel (the official crop would be empty and fail).
    """
    h, w = pixels.shape[-2:]
    bh, bw = max(1, h // r), max(1, w // r)
    return [pixels[:, min(i * bh, h - bh):min(i * bh, h - bh) + bh, min(j * bw, w - bw):min(j * bw, w - bw) + bw]
            for i in range(r) for j in range(r)]


def nearest_square(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, size, size] by nearest neighbour, as the official video loaders resize every
    frame (``torch.nn.functional.interpolate(frames, size=(336, 336))``, mode ``nearest``)."""
    if tuple(pixels.shape[-2:]) == (size, size):
        return pixels
    return torch.nn.functional.interpolate(pixels[None], size=(size, size), mode="nearest")[0]


class ImageProcessor:
    """PIL images -> uint8 RGB pixel views ``[V, 3, S, S]`` for the vision encoder.

    Views stay uint8 (4x smaller than float32 in the batch and between loader workers and the
    trainer); the model normalises them with the encoder's mean/std on its device. ``normalize``
    gives the float views here, for code that needs them (e.g. a Hugging Face model).

    aspect_mode (the official code's ``image_aspect_ratio``):
        ``square`` (LLaVA-Mini's default): the CLIP processor's view, the shortest edge resized to S and
        the centre S x S kept (:func:`clip_view`); the sides of a non-square image are cut off.
        ``pad`` (LLaVA-1.5): the image padded to a square with the encoder's mean colour, then resized.
        ``squash``: the whole image resized to S x S, stretched (no official counterpart).
    resolution_ratio: R > 1 gives ``1 + R*R`` views per image: the global view, then R*R crops row-major.
        ``square`` / ``pad`` crop as official LLaVA-Mini (``split_image``): the (padded) image split into
        R x R blocks, each processed like an image; ``squash`` tiles the image resized to (S*R)^2.
    video_hires: at R > 1, every video frame gives ``1 + R*R`` views too (official); else one view.
    Video frames: in ``square`` mode each frame is first resized to S x S by nearest neighbour, as every
    official video loader does, then viewed as above (a square frame's global view is itself); ``pad`` and
    ``squash`` treat frames as images.
    Resampling is bicubic with antialiasing, PIL's filter (as CLIP's and LLaVA's processors) computed by
    torchvision on uint8 tensors: ~4x faster than PIL's own resize, within 2 grey levels of it on under
    1% of pixels (tests/data/test_media.py).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], aspect_mode: str = "square",
                 resolution_ratio: int = 1, video_hires: bool = False):
        if aspect_mode not in ASPECT_MODES:
            raise ValueError(f"aspect_mode must be one of {', '.join(ASPECT_MODES)}, got {aspect_mode!r}")
        if resolution_ratio < 1:
            raise ValueError(f"resolution_ratio must be >= 1, got {resolution_ratio}")
        self.image_size = int(image_size)
        self.aspect_mode = aspect_mode
        self.resolution_ratio = int(resolution_ratio)
        self.video_hires = bool(video_hires)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.fill = tuple(int(255 * m) for m in mean)  # truncated, as official LLaVA: int(x * 255)

    @classmethod
    def from_config(cls, cfg: Any) -> "ImageProcessor":
        """The processor a whole ``Config`` implies (the encoder's size and normalisation, ``data.aspect_mode``,
        ``model.resolution_ratio``, ``model.video_hires``)."""
        from lm_mini.models.encoders import image_preprocessing

        size, mean, std = image_preprocessing(cfg.model.encoder)
        return cls(size, mean, std, cfg.data.aspect_mode, cfg.model.resolution_ratio,
                   bool(getattr(cfg.model, "video_hires", False)))

    @property
    def views_per_image(self) -> int:
        return views_per_image(self.resolution_ratio)

    @property
    def views_per_frame(self) -> int:
        return self.views_per_image if self.video_hires else 1

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 views ``[..., 3, S, S]`` -> float32, normalised with the encoder's mean/std."""
        return normalize_pixels(views, self.mean, self.std)

    def _to_tensor(self, image: Image.Image, size: int) -> torch.Tensor:
        """RGB image -> bicubic resize to size x size -> uint8 tensor [3, size, size] (the ``squash`` view)."""
        return _resize(_pixels(image), size, size)  # possibly channels-last strided: the batch's torch.cat copies it

    def _padded(self, image: Image.Image) -> Image.Image:
        """``pad``: the image padded to a square with the mean colour."""
        # A 30000x60 banner would become a 30000x30000 canvas (2.7 GB) before its resize: shrink such an
        # image first, by an integer box filter, to no less than 4x the largest size one of its views needs.
        factor = max(image.size) // (4 * self.image_size * self.resolution_ratio)
        if factor > 1:
            image = _rgb(image).reduce(factor)
        return expand_to_square(_rgb(image), self.fill)

    def _views(self, pixels: torch.Tensor, hires: bool) -> torch.Tensor:
        """uint8 [3, H, W] -> ``[V, 3, S, S]``: the global view, then (``hires`` and R > 1) the R*R crops."""
        s, r = self.image_size, self.resolution_ratio
        if self.aspect_mode == "squash":
            view = _resize(pixels, s, s)
            if r == 1 or not hires:
                return view.unsqueeze(0)
            big = _resize(pixels, s * r, s * r)  # [3, rS, rS] -> [r*r, 3, S, S], rows first
            crops = big.reshape(3, r, s, r, s).permute(1, 3, 0, 2, 4).reshape(r * r, 3, s, s)
            return torch.cat([view.unsqueeze(0), crops])
        pieces = [pixels] + (split_blocks(pixels, r) if hires and r > 1 else [])
        return torch.stack([clip_view(p, s) for p in pieces])  # pad: every piece is square, clip_view = resize

    def image(self, image: Image.Image) -> torch.Tensor:
        """One image -> ``[V, 3, S, S]``: the global view, then (R > 1) the R*R crops row-major."""
        if self.aspect_mode == "pad":
            image = self._padded(image)
        return self._views(_pixels(image), hires=True)

    def video(self, frames: Sequence[Image.Image]) -> torch.Tensor:
        """Video frames -> ``[T * views_per_frame, 3, S, S]``, frame by frame (each frame's global view first)."""
        views = []
        for frame in frames:
            if self.aspect_mode == "pad":
                pixels = _pixels(self._padded(frame))
            elif self.aspect_mode == "square":
                pixels = nearest_square(_pixels(frame), self.image_size)
            else:
                pixels = _pixels(frame)
            views.append(self._views(pixels, hires=self.video_hires))
        return torch.cat(views)


__all__ = ["decode_image", "decode_video", "probe_video", "sample_frame_indices", "get_seq_frames", "expand_to_square",
           "clip_view", "split_blocks", "ASPECT_MODES", "ImageProcessor"]
