"""Training callbacks: step checkpoints, preemption, throughput and skipped-sample counters."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Any, Dict, Optional

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lm_mini.data.errors import SKIP_REASONS, sum_over_ranks
from lm_mini.data.grouping import padding_fraction
from lm_mini.training.distributed import gather_from_ranks, own_share

log = logging.getLogger(__name__)


class StepCheckpoint(ModelCheckpoint):
    """``step=XXXXXXXX.ckpt`` every ``every_n_steps`` optimizer steps and at the end; keeps the newest ``keep_last_k``.

    Keep-last-K is Lightning's top-k with the step as the monitored value. A new checkpoint is complete
    (atomic rename, see checkpoint.py) before the oldest one is deleted, so a kill at any moment leaves
    at least one complete checkpoint.
    """

    def __init__(self, dirpath: str, every_n_steps: int, keep_last_k: int):
        super().__init__(
            dirpath=dirpath,
            filename="step={step:08d}",
            auto_insert_metric_name=False,
            monitor="step",
            mode="max",
            save_top_k=keep_last_k,
            every_n_train_steps=every_n_steps,
            save_last=False,
            enable_version_counter=False,
        )

    def save_now(self, trainer: L.Trainer) -> None:
        """Checkpoint the current step unless it is already saved (all ranks must call this together)."""
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)


class PreemptionHandler(Callback):
    """SIGTERM / SIGUSR1 / Ctrl-C: checkpoint at the next optimizer-step boundary, stop cleanly, requeue on SLURM.

    Lightning's own handlers are replaced while training runs: its SLURM handler checkpoints from inside
    the signal handler (mid-step, possibly mid gradient accumulation, with collectives under FSDP), and
    its SIGTERM path exits without a checkpoint. Here the handler only records the signal; at the next
    step boundary the ranks agree (one all-reduce), save through ``StepCheckpoint`` and stop, so the
    checkpoint resumes bit-exactly. ``run.py`` requeues the SLURM job afterwards.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C, the same; a second one stops at once

    def __init__(self, checkpoint: StepCheckpoint):
        self.checkpoint = checkpoint
        self.received: Optional[int] = None
        self.preempted = False
        self._previous: Dict[int, Any] = {}
        self._last_step = -1
        self._launcher: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts as usual, without waiting for the step to end
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
        if self.received is None:
            again = " (Ctrl-C again to stop now, without a checkpoint)" if signum == signal.SIGINT else ""
            log.info("received %s; checkpointing at the next optimizer step, then exiting%s", signal.Signals(signum).name, again)
        self.received = signum
        launcher = self._launcher
        # Processes Lightning started get the signal too; a terminal's Ctrl-C already reached them all.
        if launcher is not None and hasattr(launcher, "kill") and signum != signal.SIGINT:
            launcher.kill(signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Registered here, after Lightning installed its handlers at fit start, to take their place.
        self._launcher = trainer.strategy.launcher
        self._last_step = trainer.global_step
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # mid gradient accumulation: not a resumable point
            return
        self._last_step = trainer.global_step
        stop = self.received is not None
        if trainer.world_size > 1:  # every rank must take the same decision (the save is collective)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.checkpoint.save_now(trainer)
            self.preempted = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                log.info("preempted at step %d; checkpoint saved in %s", trainer.global_step, self.checkpoint.dirpath)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array task aware); False when not on SLURM or it failed."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as e:  # no scontrol here (srun into a container, say): the checkpoint is saved all the same
        rank_zero_warn(f"could not requeue SLURM job {job}: scontrol: {e.strerror or e}; resubmit it to continue "
                       "(--resume auto)")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed: {result.stderr.strip()}")
    return result.returncode == 0


class PerRankLoaderState(Callback):
    """Every checkpoint carries each rank's train-loader position; a resumed rank takes its own.

    Lightning saves the loop state, with the loader's ``state_dict``, of the rank that writes the checkpoint:
    rank 0 under DDP, and rank 0's ``meta.pt`` under FSDP. Each rank reads its own part of the data, so the
    other ranks would resume from rank 0's position (refused by the loader: it was planned for rank 0).
    """

    KEY = "lm_mini_loader_state_per_rank"

    @staticmethod
    def _loop_state(checkpoint: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Dict[str, Any]) -> None:
        loop = self._loop_state(checkpoint)
        if loop is not None and "combined_loader" in loop:  # all ranks dump a checkpoint together
            checkpoint[self.KEY] = gather_from_ranks(loop["combined_loader"], trainer.world_size)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Dict[str, Any]) -> None:
        loop = self._loop_state(checkpoint)  # callbacks are restored before the loops read it
        if loop is not None and self.KEY in checkpoint:
            loop["combined_loader"] = own_share(checkpoint[self.KEY], trainer.global_rank, "data-loader positions")


class ThroughputLogger(Callback):
    """Live samples/s, tokens/s (LLM input tokens: text + visual) and visual tokens per sample.

    Built on Lightning's ``Throughput`` (windowed rates); shown in the progress bar and logged. Also
    ``data/padding_fraction``: the share of this rank's LLM input ``[B, longest]`` that is padding, each
    sample's length being its text plus visual tokens (what ``data.group_by_length`` lowers).
    """

    def __init__(self, window: int = 10):
        self.window = window

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._throughput = Throughput(world_size=trainer.world_size, window_size=self.window)
        self._start = time.perf_counter()
        self._batches = self._samples = self._tokens = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        samples, text, visual = batch_counts(batch, _tokens_per_frame(pl_module))
        if samples == 0:  # every sample of the batch was skipped (padding): no throughput to measure
            return
        self._batches += 1
        self._samples += samples
        self._tokens += text + visual
        self._throughput.update(time=time.perf_counter() - self._start, batches=self._batches, samples=self._samples, lengths=self._tokens)
        rates = self._throughput.compute()
        per_device = trainer.world_size == 1
        metrics = {"perf/visual_tokens_per_sample": visual / max(1, samples)}
        if "device/samples_per_sec" in rates:
            metrics["perf/samples_per_sec"] = rates["device/samples_per_sec" if per_device else "samples_per_sec"]
        if "device/items_per_sec" in rates:
            metrics["perf/tokens_per_sec"] = rates["device/items_per_sec" if per_device else "items_per_sec"]
        for name, value in metrics.items():
            pl_module.log(name, float(value), prog_bar=True, on_step=True, on_epoch=False, batch_size=max(1, samples))
        lengths = llm_lengths(batch, _tokens_per_frame(pl_module)).tolist()
        pl_module.log("data/padding_fraction", padding_fraction(lengths), on_step=True, on_epoch=False, batch_size=len(lengths))


def _tokens_per_frame(pl_module: L.LightningModule) -> int:
    """LLM tokens per image / frame: the compressor's C², or for the identity compressor (LLaVA-1.5) the
    encoder's patch grid (plus a kept CLS token)."""
    model = getattr(pl_module, "model", None)
    compressor, encoder = getattr(model, "compressor", None), getattr(model, "encoder", None)
    tokens = getattr(compressor, "num_tokens", None)
    if tokens is None and compressor is not None and hasattr(encoder, "grid"):
        tokens = encoder.grid**2 + int(getattr(encoder, "num_prefix_tokens", 0))
    return int(tokens or 0)


def llm_lengths(batch: Dict[str, Any], tokens_per_frame: int) -> torch.Tensor:
    """[B] LLM sequence length of each sample: its text tokens, the media placeholder replaced by
    ``frames x tokens_per_frame`` visual tokens (padding samples included: the GPU computes them too)."""
    text = batch["attention_mask"].sum(dim=1).long()
    frames = batch.get("frames_per_sample")
    if frames is None:
        return text
    frames = frames.to(text.device).long()
    return text - (frames > 0).long() + frames * tokens_per_frame


def batch_counts(batch: Dict[str, Any], tokens_per_frame: int):
    """(real samples, text tokens, visual tokens) of a batch; padding samples (sample_id None) do not count."""
    ids = batch.get("sample_ids")
    samples = sum(i is not None for i in ids) if ids is not None else int(batch["input_ids"].shape[0])
    frames = batch.get("frames_per_sample")
    n_frames = int(frames.sum()) if frames is not None else 0
    n_media = int((frames > 0).sum()) if frames is not None else 0
    text = int(batch["attention_mask"].sum()) - n_media  # the media placeholder is replaced by the visual tokens
    return samples, text, n_frames * tokens_per_frame


class SkippedSamplesLogger(Callback):
    """``data/skipped/<reason>``: samples the data pipeline skipped (or altered) so far, summed over ranks.

    Every reason is logged (zeros included), so every rank runs the same single all-reduce. The latest
    totals of the nonzero reasons stay in ``totals`` for the end-of-run report (None until a batch ran).
    """

    def __init__(self) -> None:
        self.totals: Optional[Dict[str, int]] = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        datamodule = trainer.datamodule
        counts = datamodule.skip_counts() if datamodule is not None and hasattr(datamodule, "skip_counts") else {}
        totals = skip_counts_over_ranks(trainer, counts, pl_module.device)
        for reason in SKIP_REASONS:
            pl_module.log(f"data/skipped/{reason}", float(totals.get(reason, 0)), on_step=True, on_epoch=False, batch_size=1)
        self.totals = totals


def skip_counts_over_ranks(trainer: L.Trainer, counts: Dict[str, int], device: Any = "cpu") -> Dict[str, int]:
    """This rank's skip counts summed over all ranks (every rank must call it: one all-reduce); nonzero only."""
    return sum_over_ranks(counts, trainer.strategy.reduce if trainer.world_size > 1 else None, device)


class PartsSummary(Callback):
    """One line at the start of fit, in place of Lightning's model summary table (whose FLOPs column reads 0 without
    an example input): the parameters of each part of the model, and which parts train."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if not trainer.is_global_zero or model is None:
            return
        parts = {name: part for name, part in model.named_children()}
        sizes = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        training = [n for n, part in parts.items() if any(p.requires_grad for p in part.parameters())]
        frozen = [n for n in parts if n not in training and sizes[n]]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model %s: %s parameters, %s trainable; training %s%s", type(model).__name__, f"{sum(sizes.values()):,}",
                 f"{trainable:,}", ", ".join(f"{n} ({sizes[n]:,})" for n in training) or "nothing",
                 "; frozen " + ", ".join(f"{n} ({sizes[n]:,})" for n in frozen) if frozen else "")
