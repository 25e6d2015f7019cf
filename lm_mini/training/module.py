"""The LightningModule: one LLaVA-Mini, trained by stage.

A stage is nothing but ``train.parts``: which parts train and at which learning rate.

    pretrain   projector only (encoder, compressor, pre-fusion, LLM frozen)   LLaVA-1.5 stage 1
    finetune   projector, compressor, pre-fusion, LLM (encoder frozen)        LLaVA-Mini stage 2

``experiments/stages/*.yaml`` set those keys; any part can be switched or given its own lr by an
override (``train.parts.llm.lr=2e-5``). The model is built in ``configure_model`` so that Lightning
builds it on the right device, and so that under FSDP2 it is sharded before the optimizer exists.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from lm_mini.eval.generation import GenerationEval
from lm_mini.models.build import build_model
from lm_mini.training import strategy as strategies
from lm_mini.training.distributed import gather_from_ranks, own_share

log = logging.getLogger(__name__)

PARTS = ("encoder", "projector", "compressor", "prefusion", "llm")


def apply_stage(model: nn.Module, parts_cfg: DictConfig) -> Dict[str, bool]:
    """Freeze / unfreeze each part as ``train.parts.<part>.train`` says; returns {part: trains}."""
    trains = {}
    for name in PARTS:
        part = getattr(model, name, None)
        if part is None:
            continue
        flag = bool(parts_cfg[name].train)
        part.requires_grad_(flag)
        trains[name] = flag
    return trains


def param_groups(model: nn.Module, train_cfg: DictConfig) -> List[Dict[str, Any]]:
    """One AdamW group per trainable part (named after it, for the lr monitor), with the part's lr.

    With weight decay on, biases and norm weights (1-D tensors) go to a second, undecayed group, as in
    the Hugging Face Trainer that the published recipes use.
    """
    groups = []
    for name in PARTS:
        part = getattr(model, name, None)
        params = [p for p in part.parameters() if p.requires_grad] if part is not None else []
        if not params:
            continue
        lr = train_cfg.parts[name].lr if train_cfg.parts[name].lr is not None else train_cfg.lr
        if train_cfg.weight_decay > 0:
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": train_cfg.weight_decay})
            if no_decay:
                groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
        else:
            groups.append({"name": name, "params": params, "lr": lr, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no part is trainable: set train.parts.<part>.train=true for at least one part")
    return groups


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``ceil(warmup_ratio * total)`` steps, then cosine to 0 (the LLaVA recipes' schedule)."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class InitReport:
    """What ``train.init_from`` loaded: from where, and which of the model's tensors it did and did not fill."""

    source: str  # the checkpoint file / sharded folder / model directory read
    kind: str  # "checkpoint" or "model directory"
    step: Optional[int]  # the checkpoint's global step (None for a model directory)
    loaded: Dict[str, int]  # part -> tensors loaded
    total: Dict[str, int]  # part -> tensors the model has
    missing: List[str]  # the model's tensors the source has no weights for (kept freshly initialised)

    def lines(self, requested: Optional[str] = None) -> List[str]:
        """The report as printed at the start of training."""
        asked = f"train.init_from={requested}: " if requested else "init_from: "
        step = f", step {self.step}" if self.step is not None else ""
        n_loaded, n_total = sum(self.loaded.values()), sum(self.total.values())
        out = [f"{asked}loaded {n_loaded} of the model's {n_total} weight tensors from {self.kind} {self.source}{step}"]
        whole = [p for p in self.total if self.loaded.get(p, 0) == self.total[p]]
        partly = [f"{p} ({self.loaded[p]} of {self.total[p]})" for p in self.total if 0 < self.loaded.get(p, 0) < self.total[p]]
        if whole or partly:
            out.append("  loaded: " + ", ".join([f"{p} (all {self.total[p]})" for p in whole] + partly))
        if self.missing:
            none = [f"{p} ({self.total[p]})" for p in self.total if not self.loaded.get(p)]
            example = ", ".join(self.missing[:3]) + (" ..." if len(self.missing) > 3 else "")
            out.append(f"  not in it, kept freshly initialised: {', '.join(none) if none else 'parts of the above'} "
                       f"({len(self.missing)} tensors, e.g. {example})")
        return out


def _part(key: str) -> str:
    return key.split(".", 1)[0]


def load_initial_weights(model: nn.Module, path: str) -> InitReport:
    """Load a previous stage's weights (checkpoint file, sharded folder, or model directory) into ``model``.

    Parts absent from the source keep their fresh initialisation (e.g. a pretrain run with a different pre-fusion
    depth); mismatched shapes, and weights that do not belong to this model, are errors."""
    from lm_mini.interop.checkpoint import read_checkpoint_weights
    from lm_mini.interop.pretrained import read_safetensors
    from lm_mini.runs import is_model_dir

    # a model directory (lm-mini import of a release, or lm-mini export) starts a fine-tune too
    if is_model_dir(path):
        state, info, kind = read_safetensors(path), {}, "model directory"
    else:
        state, info = read_checkpoint_weights(path)  # no optimizer states
        kind = "checkpoint"
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: {len(result.unexpected_keys)} weights do not belong to this model, e.g. {result.unexpected_keys[:3]}")
    total: Dict[str, int] = {}
    for key in model.state_dict():
        total[_part(key)] = total.get(_part(key), 0) + 1
    missing = set(result.missing_keys)
    loaded: Dict[str, int] = {}
    for key in model.state_dict():
        if key not in missing:
            loaded[_part(key)] = loaded.get(_part(key), 0) + 1
    step = info.get("global_step")
    return InitReport(str(path), kind, int(step) if step is not None else None, loaded, total, list(result.missing_keys))


def init_weights_from(model: nn.Module, path: str) -> List[str]:
    """:func:`load_initial_weights`; returns the names of the model's tensors that were missing from ``path``."""
    return load_initial_weights(model, path).missing


def _rng_state() -> Dict[str, Any]:
    # Tensors, ints and strings only, so checkpoints stay loadable with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LmMiniModule(GenerationEval, L.LightningModule):
    """Trains ``LlavaMini`` (``self.model``) as ``cfg.train`` says; its test loop is the generation eval
    (:class:`lm_mini.eval.generation.GenerationEval`).

    ``model_factory(cfg.model) -> nn.Module`` builds the network (default ``lm_mini.models.build.build_model``).
    """

    def __init__(self, cfg: DictConfig, model_factory: Optional[Callable[[DictConfig], nn.Module]] = None, init_from: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        self.model_factory = model_factory or build_model
        self.init_from = init_from  # resolved path of train.init_from (run.py resolves run names)
        self.init_report: Optional[InitReport] = None  # what init_from loaded (set in configure_model)
        self.model: Optional[nn.Module] = None
        self._pending_rng: Optional[Dict[str, Any]] = None
        self._generation: Optional[Dict[str, Any]] = None  # set by start_generation_eval

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this again (e.g. validate after fit)
            return
        model = self.model_factory(self.cfg.model)
        if self.init_from:
            self.init_report = load_initial_weights(model, self.init_from)
            if self.global_rank == 0:  # every rank loads; one says so
                for line in self.init_report.lines(self.cfg.train.init_from):
                    log.info("%s", line)
        apply_stage(model, self.cfg.train.parts)
        if self.cfg.train.activation_checkpointing:
            strategies.apply_activation_checkpointing(model)
        if isinstance(self._trainer.strategy if self._trainer else None, strategies.ModelParallelStrategy):
            strategies.shard_model(model, self.device_mesh["data_parallel"], str(self.cfg.train.precision))
        self.model = model

    def forward(self, batch: Dict[str, Any]) -> Any:
        return self.model(batch)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.model(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.model(batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> Dict[str, Any]:
        train = self.cfg.train
        optimizer = torch.optim.AdamW(param_groups(self.model, train), lr=train.lr, betas=(0.9, 0.999), eps=1e-8)
        scheduler = cosine_with_warmup(optimizer, self._total_steps(), train.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        """Optimizer steps of the whole run, for the schedule.

        Not ``trainer.estimated_stepping_batches``: called here it makes Lightning build the train loader
        before a resumed checkpoint is restored, and that loader then never gets its saved position
        back (the resumed run would restart the epoch). A separate loader from the data module only
        tells the length.
        """
        t = self.trainer
        per_epoch = math.ceil(len(t.datamodule.train_dataloader()) / t.accumulate_grad_batches)
        total = per_epoch * t.max_epochs if t.max_epochs and t.max_epochs > 0 else None
        if t.max_steps and t.max_steps > 0:
            total = min(total, t.max_steps) if total else t.max_steps
        return max(1, int(total or 1))

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Lightning saves model, optimizer, scheduler, loops and data-loader state, but not the RNGs: every
        # rank's (one rank writes the checkpoint; the ranks' generators need not stay in step).
        checkpoint["rng_states"] = gather_from_ranks(_rng_state(), self.trainer.world_size)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Applied in on_train_start: restoring now would be undone by the draws Lightning makes while
        # it rebuilds the data-loader iterator, which the uninterrupted run made at epoch start instead.
        saved = checkpoint.get("rng_states")
        self._pending_rng = own_share(saved, self.trainer.global_rank, "random generators") if saved is not None else None

    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
