"""Fixtures of the interop tests: a tiny tokenizer and media files (an image, a video, non-media)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from interop_helpers import VOCAB  # noqa: E402  (this folder: helpers shared by the test files)
from media_fixtures import gray_video  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from lm_mini.data.conversation import template_corpus
    from lm_mini.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    records = [([{"from": "human", "value": f"<image>\nWhat colour is the {s}?"}, {"from": "gpt", "value": f"The {s} is red."}], True)
               for s in ("square", "circle", "triangle")]
    train_tokenizer(template_corpus(records), out, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Dict[str, Path]:
    """A PNG, an MP4 of 3 s at 2 fps (3 frames at 1 fps), and files that are not media."""
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "red.png")
    (d / "clip.mp4").write_bytes(gray_video(6, rate=2, size=32))
    (d / "notes.txt").write_text("not an image")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return {"image": d / "red.png", "video": d / "clip.mp4", "text": d / "notes.txt", "broken": d / "broken.jpg"}


