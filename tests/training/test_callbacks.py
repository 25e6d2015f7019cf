"""Training callbacks on stub trainers: what the throughput logger counts (padding fraction too), and a batch of skipped samples."""
from types import SimpleNamespace

import pytest
import torch

from lm_mini.training.callbacks import ThroughputLogger, _tokens_per_frame, batch_counts, llm_lengths


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


def test_padding_fraction_is_logged_over_the_llm_sequences():
    logged = {}
    module = SimpleNamespace(model=SimpleNamespace(compressor=SimpleNamespace(num_tokens=4)),
                             log=lambda name, value, **kw: logged.__setitem__(name, value))
    trainer = SimpleNamespace(world_size=1)
    callback = ThroughputLogger(window=2)
    callback.on_train_start(trainer, module)
    batch = _batch(["a", "b", None], [1, 0, 0])
    batch["attention_mask"][1, 3:] = 0  # a text-only sample of 3 tokens
    batch["attention_mask"][2, 1:] = 0  # a padding sample: one token
    # LLM lengths: 5 - 1 placeholder + 4 visual = 8, 3, 1 -> 12 of 3 x 8 positions
    assert llm_lengths(batch, 4).tolist() == [8, 3, 1]
    callback.on_train_batch_end(trainer, module, None, batch, 0)
    assert logged["data/padding_fraction"] == pytest.approx(1 - 12 / 24)


def test_identity_compressor_counts_the_encoder_patches_as_visual_tokens():
    model = SimpleNamespace(compressor=SimpleNamespace(num_tokens=None), encoder=SimpleNamespace(grid=24, num_prefix_tokens=0))
    assert _tokens_per_frame(SimpleNamespace(model=model)) == 576


def test_requeue_without_scontrol_warns_and_returns_false(monkeypatch, tmp_path):
    """srun into a container without SLURM's tools: the preemption checkpoint stands, the job is not requeued."""
    from lm_mini.training.callbacks import requeue_slurm_job

    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol anywhere
    with pytest.warns(UserWarning, match="could not requeue SLURM job 123: scontrol"):
        assert requeue_slurm_job() is False
