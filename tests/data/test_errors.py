"""Skip reasons and how their counts are reported."""
import pytest

from lm_mini.data.errors import ALTERED, SKIP_REASONS, SampleError, SkipCounter, describe_skips


def test_skips_are_described_apart_from_samples_that_were_kept_but_altered():
    assert set(ALTERED) < set(SKIP_REASONS)
    counts = SkipCounter({"too_long": 3, "bad_video": 1, "corrupt_image": 2, "media_past_max_length": 1})
    assert describe_skips(counts) == ("skipped corrupt_image 2, bad_video 1, media_past_max_length 1; "
                                      "kept but altered: too_long 3")
    assert describe_skips({"too_long": 1}) == "kept but altered: too_long 1"
    assert describe_skips({}) == describe_skips({"bad_video": 0}) == "no samples skipped"


def test_an_unknown_reason_is_refused():
    with pytest.raises(ValueError, match="unknown skip reason 'oops'"):
        SampleError("oops", "message")
