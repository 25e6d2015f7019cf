"""Jobs whose ranks all start at once (torchrun, srun): one process group from the start; rank 0 decides.

Under Lightning's own launcher one process runs ``lm-mini train``, sets the run up, and starts the other
ranks inside ``trainer.fit``. torchrun and srun start every rank at the same moment instead, each running
the whole command: uncoordinated, every rank would create the MLflow tables of a fresh store at once
(``table runs already exists``), pick its own run name and write the run directory. So for such launches
the ranks join the process group first (:func:`join_process_group`, bounded by ``train.dist_timeout_s``),
rank 0 alone prepares the run and the others receive its decisions, or its error, by broadcast
(:func:`from_rank_zero`). Lightning later finds the process group initialised and uses it.

A rank that dies or hangs makes the others' next collective fail, at the latest after
``train.dist_timeout_s``. Every rank stamps the process group's store every few seconds
(:class:`Heartbeat`), so the ranks left can say which rank went silent (:func:`lost_rank_message`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from lm_mini.config import differences

log = logging.getLogger(__name__)
T = TypeVar("T")
_HEARTBEAT_KEY = "lm_mini/alive/{rank}"


@dataclass(frozen=True)
class Launch:
    """How this process was started: ``launcher`` is ``torchrun``, ``srun``, or ``lightning`` (Lightning's own
    launcher, or a single process); ``rank`` is the global rank (Lightning's launcher: 0 in the process that
    runs the command, the device index in the processes it starts)."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int

    @property
    def started_together(self) -> bool:
        """Every rank runs ``lm-mini train`` from its first line (torchrun, srun)."""
        return self.launcher in ("torchrun", "srun") and self.world_size > 1

    @property
    def started_by_lightning(self) -> bool:
        """A process Lightning's launcher started for another device, after rank 0 set the run up."""
        return self.launcher == "lightning" and self.rank > 0


def _cluster_environment() -> Any:
    """The environment Lightning itself will pick (SLURM before torchrun, as its connector checks them)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if SLURMEnvironment.detect():
        return SLURMEnvironment(auto_requeue=False)
    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    return None


def detect_launch() -> Launch:
    env = _cluster_environment()
    if env is not None:
        name = "srun" if type(env).__name__ == "SLURMEnvironment" else "torchrun"
        return Launch(name, env.global_rank(), env.world_size(), env.local_rank())
    # Lightning's launcher sets LOCAL_RANK / NODE_RANK in the processes it starts.
    local, node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("NODE_RANK", 0))
    return Launch("lightning", local if node == 0 else max(1, local), int(os.environ.get("WORLD_SIZE", 1)), local)


class LaunchError(RuntimeError):
    """The ranks of a job could not start together (a rank missing, an unsupported launch)."""


def check_launch(launch: Launch, train_cfg: Any) -> None:
    """Refuse, on every rank and before anything is created, a launch that cannot run ``train_cfg``:

    - several nodes need a launcher that starts every rank (torchrun, srun): Lightning's own launcher would run
      the set-up on the first process of every node at once, each choosing its own run;
    - under torchrun/srun, the processes started must be ``train.devices`` x ``train.num_nodes`` (Lightning finds
      out only once the run exists, with a traceback per rank);
    - ``train.accelerator=gpu|cuda`` needs a CUDA GPU here."""
    num_nodes, devices, accelerator = train_cfg.num_nodes, train_cfg.devices, train_cfg.accelerator
    if num_nodes > 1 and launch.launcher == "lightning":
        raise LaunchError(f"train.num_nodes={num_nodes} needs every node's processes started by torchrun or srun "
                          "(README, Training: `torchrun --nnodes=... -m lm_mini.cli train ...` or tools/slurm/train.sbatch)")
    per_node = devices if isinstance(devices, int) and devices > 0 else (
        len(devices) if isinstance(devices, Sequence) and not isinstance(devices, str) else
        len(devices.split(",")) if isinstance(devices, str) and devices.replace(",", "").strip().isdigit() else None)
    if launch.launcher in ("torchrun", "srun") and per_node is not None and per_node * num_nodes != launch.world_size:
        raise LaunchError(f"rank {launch.rank}: {launch.launcher} started {launch.world_size} processes, but train.devices x "
                          f"train.num_nodes = {per_node} x {num_nodes} = {per_node * num_nodes}; set them to the processes "
                          "per node and the nodes the launcher starts")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise LaunchError(f"train.accelerator={accelerator}, but this machine has no CUDA GPU that torch can use "
                          "(train.accelerator=cpu, or auto: a GPU when there is one)")


def check_same_config(launch: Launch, flat_config: Dict[str, Any]) -> None:
    """Every rank of a torchrun/srun job runs its own command line: refuse, on every rank, a job whose ranks were
    given different configurations (another batch size on one node trained silently, config.yaml recording rank
    0's; another length made the ranks blame each other for dying). ``flat_config``: ``config.flatten(cfg)``."""
    if not launch.started_together:
        return
    configs = gather_from_ranks(flat_config, launch.world_size)
    for rank, other in enumerate(configs):
        differ = differences(configs[0], other)
        if differ:
            shown = "; ".join(f"{k}: {mine!r} on rank 0, {theirs!r} on rank {rank}" for k, mine, theirs in differ[:5])
            raise LaunchError(f"rank {launch.rank}: the ranks of this {launch.launcher} job were given different "
                              f"configurations ({shown}{' ...' if len(differ) > 5 else ''}); every rank must run the "
                              "same command and config files")


def uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def join_process_group(launch: Launch, accelerator: str, timeout_s: float) -> None:
    """Initialise the process group Lightning would (same address, port, backend), with ``timeout_s`` for every
    collective. A rank that does not join in time fails the others' start with a message naming the launch."""
    if dist.is_initialized():
        return
    env = _cluster_environment()
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    backend = "nccl" if uses_cuda(accelerator) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    try:
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=timedelta(seconds=timeout_s))
    except dist.DistError as e:
        raise LaunchError(f"rank {launch.rank}: not all {launch.world_size} ranks of this {launch.launcher} job joined "
                          f"{env.main_address}:{env.main_port} within train.dist_timeout_s={timeout_s:g} s ({e}); "
                          "a rank failed to start or runs another command line") from None
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = launch.rank  # rank_zero_only guessed from the environment; now it is known


class StartFailed(RuntimeError):
    """Rank 0 could not set the run up; the other ranks stop with its reason. ``exit_code`` is rank 0's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def from_rank_zero(launch: Launch, decide: Callable[[], T], exit_code: Callable[[BaseException], int]) -> T:
    """Rank 0 runs ``decide()``; every rank returns its result. If it raises, rank 0 re-raises it and the
    others raise :class:`StartFailed` with its message (nobody waits for a decision that never comes)."""
    if not launch.started_together:
        return decide()
    box: List[Any] = [None]
    if launch.rank == 0:
        try:
            result = decide()
        except BaseException as e:
            box[0] = ("error", f"{type(e).__name__}: {e}", exit_code(e))
            dist.broadcast_object_list(box, src=0)
            raise
        box[0] = ("ok", result)
        dist.broadcast_object_list(box, src=0)
        return result
    try:
        dist.broadcast_object_list(box, src=0)
    except (dist.DistError, RuntimeError) as e:  # rank 0 died, or its set-up outlasted the timeout
        raise LaunchError(f"rank {launch.rank}: rank 0 did not finish setting the run up (checks, the MLflow store and "
                          f"run, the run directory) within train.dist_timeout_s, or died doing it ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from e
    if box[0][0] == "error":
        raise StartFailed(f"rank 0 could not start the run ({box[0][1]})", box[0][2])
    return box[0][1]


def gather_from_ranks(obj: T, world_size: int) -> List[T]:
    """Every rank's ``obj``, in rank order, on every rank (all ranks must call it together)."""
    if world_size == 1 or not dist.is_initialized():
        return [obj]
    out: List[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def own_share(per_rank: Any, rank: int, what: str) -> Any:
    """This rank's entry of a per-rank list saved by :func:`gather_from_ranks`."""
    if not isinstance(per_rank, list):  # a checkpoint of an older version: one rank's state for all
        return per_rank
    if rank >= len(per_rank):
        raise ValueError(f"the checkpoint holds the {what} of {len(per_rank)} ranks; this is rank {rank}: "
                         "resume with the same number of processes")
    return per_rank[rank]


class Heartbeat:
    """A daemon thread that stamps ``lm_mini/alive/<rank>`` in the process group's store every ``interval_s``."""

    def __init__(self, launch: Launch, interval_s: float = 2.0):
        self.launch = launch
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def _store() -> Any:
        from torch.distributed.distributed_c10d import _get_default_store  # the rendezvous store every rank reaches

        return _get_default_store()

    def start(self) -> "Heartbeat":
        store = self._store()
        key = _HEARTBEAT_KEY.format(rank=self.launch.rank)

        def beat() -> None:
            while not self._stop.is_set():
                try:
                    store.set(key, repr(time.time()))
                except Exception:  # the store's host is gone: nothing to stamp any more
                    return
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=beat, name="lm-mini-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def stamps(self) -> Optional[Dict[int, str]]:
        """Every rank's latest stamp; None when the store cannot be reached."""
        try:
            store = self._store()
            store.set_timeout(timedelta(seconds=max(2.0, self.interval_s)))
            return {r: store.get(_HEARTBEAT_KEY.format(rank=r)).decode() for r in range(self.launch.world_size)}
        except Exception:
            return None

    def silent_ranks(self) -> Optional[List[int]]:
        """The other ranks whose stamp does not move over a few intervals (None: the store is unreachable)."""
        before = self.stamps()
        if before is None:
            return None
        time.sleep(2.5 * self.interval_s)
        after = self.stamps()
        if after is None:
            return None
        return [r for r in before if r != self.launch.rank and before[r] == after[r]]


def _looks_like_lost_peer(error: BaseException) -> bool:
    """Without heartbeats (Lightning's own launcher): an error that gloo, NCCL or the store raise when a peer is gone."""
    if isinstance(error, (dist.DistError, LaunchError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "connection closed by peer", "connection reset by peer", "timeout", "timed out", "broken pipe", "pair closure"))


def lost_rank_message(launch: Launch, heartbeat: Optional[Heartbeat], error: BaseException, timeout_s: float) -> Optional[str]:
    """What the ranks left print when training failed because another rank died or hangs (which rank went silent,
    and how to continue); None when the failure is this rank's own (every other rank still stamps its heartbeat)."""
    if isinstance(error, KeyboardInterrupt):
        return None
    if heartbeat is not None:
        silent = heartbeat.silent_ranks()
        if silent == []:
            return None
    else:
        if not _looks_like_lost_peer(error):
            return None
        silent = []
    if silent is None:
        who = "rank 0 (it hosts the job's rendezvous store) is gone" if launch.rank != 0 else "another rank is gone"
    elif silent:
        who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} died or stopped responding"
    else:
        who = "another rank died or stopped responding"
    first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return (f"rank {launch.rank} of {launch.world_size}: a collective operation failed: {who} "
            f"(train.dist_timeout_s={timeout_s:g}; {type(error).__name__}: {first_line}). "
            "The job stops; continue it from its last checkpoint with --resume auto")
