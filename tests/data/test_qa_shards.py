"""QA of shards / media / conversation on odd but valid input that the other data tests do not cover."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from lm_mini.cli import main
from lm_mini.data.media import decode_image
from lm_mini.data.shards import build_shards, iter_raw_samples, shard_paths
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
