"""benchmarks/padding.py: on 665K-shaped lengths, length grouping cuts the padding fraction, and the grouped
loader order (the plan + the library's grouping) still delivers every record once, in equal batches per rank."""
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import padding  # noqa: E402


def test_mix_is_shaped_like_llava_665k():
    stats = padding.mix_stats(20_000)
    assert 0.05 < stats["text_only"] < 0.07  # ShareGPT's 40K of 665K
    assert stats["median_text_only"] > 3 * stats["median_image"]  # long text-only conversations, short QA turns


def test_grouping_cuts_padding_and_keeps_every_record_once():
    text, image = padding.sample_lengths(8_000, seed=1)
    plain = padding.loader_batches(text, image, 0)
    grouped = padding.loader_batches(text, image, 16)
    for batches in (plain, grouped):
        assert Counter(i for b in batches for i in b if i >= 0) == Counter(range(len(text)))
        assert sum(len(b) < 16 for b in batches) <= 8  # only a rank's last batch can be partial (8 ranks)
    assert len(plain) == len(grouped)
    for visual in (576, 1):
        off = padding.padding_figures(plain, text, image, visual)["epoch_fraction"]
        on = padding.padding_figures(grouped, text, image, visual)["epoch_fraction"]
        assert on < 0.5 * off, (visual, off, on)
    # LLaVA's own sampler, for reference: a permutation too
    assert sorted(i for b in padding.llava_batches(text, image) for i in b) == list(range(len(text)))


def test_padding_figures_count_positions():
    text, image = np.array([10, 4, 7]), np.array([True, False, False])
    f = padding.padding_figures([[0, 1], [2, -1]], text, image, visual_tokens=3)
    # LLM lengths [12, 4] and [7, 1 (a padding slot)]: 2 x 12 + 2 x 7 = 38 positions, 24 tokens
    assert f["epoch_fraction"] == (38 - 24) / 38 and f["batches"] == 2
