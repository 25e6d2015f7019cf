"""Training callbacks on stub trainers: what the throughput logger counts, and a batch of skipped samples."""
from types import SimpleNamespace

import torch

from lm_mini.training.callbacks import ThroughputLogger, batch_counts


def _batch(ids, frames):
    n = len(ids)
    return {"sample_ids": ids, "frames_per_sample": torch.tensor(frames), "input_ids": torch.zeros(n, 5, dtype=torch.long),
            "attention_mask": torch.ones(n, 5, dtype=torch.long)}


def test_batch_counts_leave_out_padding_samples_and_media_placeholders():
    # two real samples (an image, a 3-frame video) and one padding sample; 4 visual tokens per frame
    assert batch_counts(_batch(["a", "b", None], [1, 3, 0]), 4) == (2, 15 - 2, 16)


def test_a_batch_of_skipped_samples_only_does_not_stop_training():
    logged = []
    module = SimpleNamespace(model=SimpleNamespace(compressor=SimpleNamespace(num_tokens=1)),
                             log=lambda name, value, **kw: logged.append(name))
    trainer = SimpleNamespace(world_size=1)
    callback = ThroughputLogger(window=2)
    callback.on_train_start(trainer, module)
    # batch size 1: the first sample was skipped (the loader sends a padding sample in its place)
    for ids in ([None], ["a"], [None], ["b"], ["c"]):
        callback.on_train_batch_end(trainer, module, None, _batch(ids, [0 if i is None else 1 for i in ids]), 0)
    assert "perf/samples_per_sec" in logged and logged.count("perf/visual_tokens_per_sample") == 3
