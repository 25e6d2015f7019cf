"""Small media files made in memory for the data tests (images with PIL, videos with PyAV)."""
import io

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
