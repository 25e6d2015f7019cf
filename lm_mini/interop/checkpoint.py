"""Reading Lightning checkpoints without running code from them: weights for export, ``train.init_from`` and
evaluation, and the check before Lightning's own read of a resumed checkpoint.

A checkpoint is a single file (single device, DDP) or a folder of per-rank shards plus ``meta.pt`` (FSDP2, torch
distributed checkpoint); where they live in a run is ``lm_mini.runs``'s, how they are written
``lm_mini.training.checkpoint_io``'s. Weights are under ``state_dict["model.<lm_mini name>"]``.

Opening a checkpoint never runs code from it (unless the user trusts checkpoints, ``lm_mini.trust``):
every read is ``torch.load(weights_only=True)``, a sharded folder's ``.metadata`` goes through a
restricted unpickler, and anything else is refused with :class:`UntrustedCheckpoint` naming the type.
Our own checkpoints hold tensors, numbers, strings and containers only, so they always open.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import re
from pathlib import Path
from typing import Any, Collection, Dict, FrozenSet, Iterator, List, Optional, Tuple, Union

import torch

from lm_mini.trust import UntrustedCheckpoint, checkpoints_trusted

# Types our checkpoints need beyond what torch's weights_only unpickler takes by itself (tensors, storages,
# dtypes, OrderedDict, numbers, strings, containers). Measured on single-file, DDP, FSDP2 (meta.pt and
# the shards' byte items) and mid-epoch checkpoints with the streaming loader's state: none. Keep it so:
# what we save stays tensors/numbers/strings/containers (module.py's RNG states, tracking.py's pending
# metrics), rather than this list growing. Registered process-wide because Lightning's own read of an
# FSDP folder's meta.pt (resume) must take them too.
SAFE_GLOBALS: Tuple[Any, ...] = ()
torch.serialization.add_safe_globals(list(SAFE_GLOBALS))

# What the ``.metadata`` of a torch distributed checkpoint (FSDP folder) holds: DCP's own metadata dataclasses,
# torch.Size, dtypes (checked separately) and layouts, and the path the folder was saved under. torch reads
# it with plain pickle.load; we read it with an unpickler that resolves these names and nothing else.
_DCP_METADATA_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset(
    [("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
       ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")])
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _offending(error: Exception) -> str:
    """The type a refused unpickling stopped at, from torch's message (``posix.system``), else its reason."""
    text = str(error)
    found = _GLOBAL_RE.search(text)
    if found:  # torch names builtins without their module ("GLOBAL exec")
        name = found.group(1)
        return f"`{name if '.' in name else 'builtins.' + name}`"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in lines if "WeightsUnpickler error" in line or "Unsupported" in line), lines[-1] if lines else "")
    return f"something the safe reader does not take ({reason.split('WeightsUnpickler error:')[-1].strip()})"


@contextlib.contextmanager
def refusing_unsafe(path: Union[str, Path]) -> Iterator[None]:
    """Turn torch's refusal of a ``weights_only`` load into :class:`UntrustedCheckpoint` naming ``path``."""
    try:
        yield
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpoint(path, _offending(e)) from None


def safe_load(path: Union[str, Path, io.BytesIO], where: Optional[str] = None, mmap: bool = False) -> Any:
    """``torch.load`` on the CPU without running code from the file (plain pickle if checkpoints are trusted)."""
    kwargs: Dict[str, Any] = {"map_location": "cpu", "mmap": mmap} if mmap else {"map_location": "cpu"}
    if checkpoints_trusted():
        return torch.load(path, weights_only=False, **kwargs)
    with refusing_unsafe(where or str(path)):
        return torch.load(path, weights_only=True, **kwargs)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not distributed-checkpoint metadata")


def read_dcp_metadata(file: Path) -> Any:
    """The ``Metadata`` of a sharded checkpoint folder (its ``.metadata`` file), read without running code.

    Its shard file names must be plain names inside the folder: a metadata file pointing elsewhere
    (``../x``, ``/etc/x``) would make the reader open files outside the checkpoint.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    with open(file, "rb") as f:
        if checkpoints_trusted():
            return pickle.load(f)
        try:
            metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise UntrustedCheckpoint(file, _offending(e)) from None
    if not isinstance(metadata, Metadata):
        raise UntrustedCheckpoint(file, f"a {type(metadata).__name__} where distributed-checkpoint Metadata belongs")
    for info in (metadata.storage_data or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if not name or Path(name).name != name or name in (".", ".."):
            raise UntrustedCheckpoint(file, f"a shard file name that leaves the checkpoint folder ({name!r})")
    return metadata


def _sharded_reader(folder: Path) -> Any:
    """DCP's file reader, reading ``.metadata`` with :func:`read_dcp_metadata` (plain pickle.load in torch)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            metadata = read_dcp_metadata(folder / (".metadata" if rank is None else f"__{rank}.metadata"))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return FileSystemReader(folder) if checkpoints_trusted() else _Reader(folder)


def _sharded_planner(folder: Path, keys: Optional[Collection[str]]) -> Any:
    """DCP's planner that rebuilds the saved state dict, loading non-tensor items ``weights_only`` (torch:
    ``torch.load(weights_only=False)``). ``keys``: only these top-level keys / item names (None: all)."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner

    class _Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            obj = safe_load(value, where=f"{folder} (item {fqn})")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return _EmptyStateDictLoadPlanner(keys) if checkpoints_trusted() else _Planner(keys)


def _check_global_metadata(folder: Path) -> None:
    """A folder's ``.metadata`` must be there and safe: DCP swallows an error reading it and falls back to the
    rank-local ``__N.metadata`` files, which Lightning's resume would unpickle as they are."""
    if checkpoints_trusted():
        return
    if not (folder / ".metadata").is_file():
        others = sorted(p.name for p in folder.iterdir() if p.name.endswith(".metadata")) if folder.is_dir() else []
        if not others:
            raise FileNotFoundError(f"{folder}: not a sharded checkpoint folder (no .metadata)")
        raise UntrustedCheckpoint(folder, f"rank-local metadata only ({', '.join(others)}, no .metadata)")
    read_dcp_metadata(folder / ".metadata")


def _read_sharded(folder: Path, keys: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """A folder of DCP shards as one dict of full CPU tensors (only ``keys`` when given), without running code."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _check_global_metadata(folder)
    checkpoint: Dict[str, Any] = {}
    try:
        _load_state_dict(checkpoint, storage_reader=_sharded_reader(folder), planner=_sharded_planner(folder, keys), no_dist=True)
    except CheckpointException as e:  # DCP wraps each rank's error; ours says what to do
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UntrustedCheckpoint)]
        if refused:
            raise refused[0] from None
        raise
    return checkpoint


def _byte_items(folder: Path) -> List[str]:
    """Names of a sharded checkpoint's non-tensor items (pickled; optimizer hyper-parameters and the like)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_dcp_metadata(folder / ".metadata")
    return [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]


def _meta_file(folder: Path) -> Dict[str, Any]:
    """Lightning's extra file of a sharded checkpoint (loops, schedulers, RNG and loader states), if any."""
    return safe_load(folder / "meta.pt") if (folder / "meta.pt").is_file() else {}


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """A checkpoint as one dict (``state_dict``, ``global_step``, ...), whether a file or a sharded folder.

    Sharded folders are gathered into full tensors on the CPU, so this needs the whole model in CPU memory.
    Refuses (:class:`UntrustedCheckpoint`) a checkpoint that holds anything but tensors, numbers, strings
    and containers.
    """
    path = Path(path)
    if path.is_dir():
        checkpoint = _read_sharded(path)
        checkpoint.update(_meta_file(path))
        return checkpoint
    return safe_load(path)


def verify_checkpoint(path: Union[str, Path]) -> None:
    """Raise :class:`UntrustedCheckpoint` unless ``path`` opens without running code (nothing to check when
    checkpoints are trusted). Cheap: a file is memory-mapped, of a folder only the metadata and the small
    non-tensor items are read. For the readers that are not ours: Lightning's resume of an FSDP folder
    unpickles ``.metadata`` and those items as they are."""
    if checkpoints_trusted():
        return
    path = Path(path)
    if path.is_dir():
        _check_global_metadata(path)
        _read_sharded(path, keys=_byte_items(path))
        _meta_file(path)
    else:
        safe_load(path, mmap=True)


def verified(path: Optional[Union[str, Path]]) -> Optional[str]:
    """``trainer.fit(ckpt_path=verified(path), weights_only=not checkpoints_trusted())``: the checkpoint to
    resume, checked by :func:`verify_checkpoint` first (None: a fresh start)."""
    if path is None:
        return None
    verify_checkpoint(path)
    return str(path)


def model_state_dict(checkpoint: Dict[str, Any], prefix: str = "model.") -> Dict[str, torch.Tensor]:
    """The wrapped model's weights from a Lightning checkpoint (keys without the LightningModule prefix)."""
    state = checkpoint["state_dict"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_checkpoint_weights(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(model weights without the "model." prefix, the checkpoint's other small entries)`` of a Lightning checkpoint.

    Only the weights are read: a file is memory-mapped, and of a folder of FSDP shards (torch distributed
    checkpoint) only ``state_dict`` is gathered into full tensors. The optimizer states, twice the size of
    the model under Adam, never reach memory (:func:`load_checkpoint` reads everything). Refuses
    (:class:`UntrustedCheckpoint`) a checkpoint that could run code.
    """
    path = Path(path)
    if path.is_dir():
        checkpoint = _read_sharded(path, keys={"state_dict"})
        extra = _meta_file(path)
    else:
        checkpoint = safe_load(path, mmap=True)
        extra = checkpoint
    info = {k: extra[k] for k in ("global_step", "epoch") if k in extra}
    # contiguous CPU copies: safetensors wants plain storage, not views into a mapped file
    return {k: v.detach().contiguous() for k, v in model_state_dict(checkpoint).items()}, info
