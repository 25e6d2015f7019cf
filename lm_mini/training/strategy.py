"""Distribution strategies: single device, DDP, and FSDP2 (``fully_shard``) through Lightning.

``train.strategy`` picks one:
- ``auto``: Lightning's choice (one device).
- ``ddp``: one full replica per process.
- ``fsdp``: Lightning's ``ModelParallelStrategy`` with pure data parallelism (tensor parallel size 1);
  ``LmMiniModule.configure_model`` calls :func:`shard_model`, which applies FSDP2 to each transformer block
  the model's parts name (encoder blocks, pre-fusion layers, LLM decoder layers: ``LlavaMini.block_stacks``),
  then to the whole model (for the rest).
  Lightning's older ``FSDPStrategy`` (FSDP1) refuses CPU; FSDP2 runs on CPU with gloo, so the same
  code path is tested in CI.

Multi-node jobs need nothing here: Lightning picks the cluster environment (torchrun / SLURM) from
the environment variables. See ``tools/slurm/train.sbatch``.
"""
from __future__ import annotations

import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, List, Optional, Union

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from torch import nn

from lm_mini.runs import tmp_path
from lm_mini.training.checkpoint_io import fsync_dir

log = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (no tensor parallelism), with atomic sharded checkpoints.

    A sharded checkpoint is a folder (one file per rank + ``meta.pt``). It is written under
    ``<name>.tmp`` and renamed by rank 0 once every rank has finished, so a job killed mid-save never
    leaves a folder that looks complete.
    """

    def __init__(self, sharded_checkpoint: bool = True, **kwargs: Any) -> None:
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=sharded_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        # Shard over all ranks of all nodes ("auto" would mean one data-parallel group per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def optimizer_state(self, optimizer: Any) -> dict:
        state = super().optimizer_state(optimizer)
        if self._save_distributed_checkpoint:
            add_missing_parameter_states(state, self.model)
        return state

    def save_checkpoint(self, checkpoint: dict, filepath: Union[str, Path], storage_options: Optional[Any] = None) -> None:
        if not self._save_distributed_checkpoint:  # one full file, written by the (atomic) CheckpointIO
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        tmp = tmp_path(final)
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()  # every rank's shard is on disk
        if self.global_rank == 0:
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(tmp, final)
            fsync_dir(final.parent)
        self.barrier()


def add_missing_parameter_states(state: dict, model: nn.Module) -> None:
    """Give every trainable parameter an entry in a sharded optimizer state dict (``get_optimizer_state_dict``).

    Adam keeps no state for a parameter that has not had a gradient yet (the vision tower's layers after the
    feature layer never get one), but resuming a sharded checkpoint first gives every trainable parameter a state
    and then asks the checkpoint for all of them ("Missing key in checkpoint state_dict"). The missing entries are
    zeros with step 0: exactly what the optimizer would create at the parameter's first gradient, so a resumed
    run stays bit-identical. The live optimizer is not touched.
    """
    from torch.distributed.checkpoint.state_dict import _get_fqns  # the names get_optimizer_state_dict uses

    per_param, groups = state.get("state", {}), state.get("param_groups", [])
    template = next(iter(per_param.values()), None)
    if template is None:
        return
    params = {fqn: p for name, p in model.named_parameters() for fqn in _get_fqns(model, name)}
    for group in groups:
        for fqn in group.get("params", []):
            if fqn not in per_param and fqn in params:
                param = params[fqn]
                # moment estimates are shaped (and sharded) like the parameter; the step count is a scalar
                per_param[fqn] = {k: (torch.zeros_like(v) if v.dim() == 0 else torch.zeros_like(param)) if torch.is_tensor(v)
                                  else type(v)() for k, v in template.items()}


def build_strategy(train_cfg: Any) -> Union[str, Strategy]:
    name = train_cfg.strategy
    if name == "auto":
        return "auto"
    # A rank that dies or hangs fails the others' next collective after this long (not Lightning's 30 minutes).
    timeout = timedelta(seconds=train_cfg.dist_timeout_s)
    if name == "ddp":
        # Some trainable parts sit idle for some batches (the compressor on text-only batches).
        return DDPStrategy(find_unused_parameters=True, timeout=timeout)
    if name == "fsdp":
        return FSDP2Strategy(sharded_checkpoint=train_cfg.sharded_checkpoint, timeout=timeout)
    raise ValueError(f"unknown train.strategy '{name}': expected auto | ddp | fsdp")


def cluster_plugins() -> List[Any]:
    """On SLURM, Lightning's requeue handler is switched off: ``PreemptionHandler`` (callbacks.py)
    checkpoints at the next optimizer-step boundary and requeues, rather than inside the signal handler."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


# --------------------------------------------------------------------------- model surgery
def block_stacks(model: nn.Module) -> List[nn.Module]:
    """The model's stacks of transformer blocks, as its parts name them (``LlavaMini.block_stacks``: encoder blocks,
    pre-fusion layers, LLM decoder layers); none for a model that names none (a custom ``model_factory``'s)."""
    named = getattr(model, "block_stacks", None)
    if named is None:
        log.info("%s names no transformer blocks (no block_stacks()): FSDP shards it as one unit, activation "
                 "checkpointing leaves it as it is", type(model).__name__)
        return []
    return list(named().values())


def model_blocks(model: nn.Module) -> List[nn.Module]:
    """Every transformer block of the encoder, the pre-fusion module and the LLM, in that order."""
    return [block for stack in block_stacks(model) for block in stack]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block in the backward pass (torch's ``checkpoint_wrapper``).

    The wrapper's state-dict hooks hide its extra name level, so checkpoints are interchangeable with
    runs without activation checkpointing. Returns the number of wrapped blocks.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    count = 0
    for stack in block_stacks(model):
        for i in range(len(stack)):
            stack[i] = checkpoint_wrapper(stack[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            count += 1
    return count


def shard_model(model: nn.Module, mesh: Any, precision: str = "32-true") -> int:
    """FSDP2: one unit per transformer block, then the root (embeddings, projector, compressor, heads).

    With bf16 precision the shards are gathered in bf16 and gradients reduced in fp32.
    Returns the number of block units.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"mesh": mesh}
    if precision.startswith("bf16"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = model_blocks(model)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return len(blocks)

