"""Small media files made in memory for the data tests (images with PIL, videos with PyAV)."""
import io
from typing import Any

import av
import numpy as np
from PIL import Image

GRAY_STEP = 8  # frame i of gray_video is filled with gray level i * GRAY_STEP


def image_bytes(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gray_video(num_frames: int, rate: int = 10, size: int = 32) -> bytes:
    """An MP4 whose frame i is flat gray ``i * GRAY_STEP``: a decoded frame tells its own index."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: flat gray survives within a couple of levels
        for i in range(num_frames):
            pixels = np.full((size, size, 3), i * GRAY_STEP, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def frame_index(frame: Image.Image) -> int:
    """Which frame of ``gray_video`` this decoded frame is."""
    return int(round(float(np.asarray(frame).mean()) / GRAY_STEP))


def indexed_video(num_frames: int, rate: Any = 10, container: str = "mp4", codec: str = "mpeg4", size: int = 64) -> bytes:
    """A video of up to 256 frames whose frame i tells its index (:func:`indexed_frame`): 8 vertical stripes, the
    k-th white when bit k of i is set, else black (survives any codec). ``container`` ``matroska`` / ``webm``
    store whole-millisecond timestamps."""
    buf = io.BytesIO()
    width = size // 8
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {"deadline": "realtime", "cpu-used": "8"}
        for i in range(num_frames):
            pixels = np.zeros((size, size, 3), np.uint8)
            for k in range(8):
                pixels[:, k * width:(k + 1) * width] = 255 * ((i >> k) & 1)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def indexed_frame(frame: Image.Image) -> int:
    """Which frame of ``indexed_video`` this decoded frame is."""
    pixels = np.asarray(frame.convert("L"), dtype=np.float64)
    width = pixels.shape[1] // 8
    return sum(1 << k for k in range(8) if pixels[:, k * width + 2:(k + 1) * width - 2].mean() > 128)
