"""The model directory: what ``lm-mini import`` and ``lm-mini export`` write and ``load_pretrained`` reads.

A model directory is laid out like a Hugging Face checkpoint::

    config.yaml                      the lm_mini config (model, data.template, ...), loadable by ``load_config``
    config.json                      the same model config as JSON, plus a short summary (for the hub's viewers)
    model.safetensors                weights under lm_mini's own names (``encoder.model.*``, ``llm.lm_head.weight``, ...)
      or model-0000k-of-0000n.safetensors + model.safetensors.index.json   (sharded above ``max_shard_size``)
    tokenizer.json, tokenizer_config.json, ...
    README.md                        model card

Weights are written with ``huggingface_hub.save_torch_state_dict`` (tied tensors stored once: straight from
the tensors' memory, no serialised copy) and read with ``safetensors.torch.load_file``, which maps the file
instead of reading it. Every load checks the tensors against the model built from the config: missing,
unexpected and wrongly shaped tensors are all named in one error.

Memory: a model is loaded by building its parameters on the ``meta`` device (no memory, no initialisation),
then assigning the mapped tensors shard by shard (``load_state_dict(assign=True)``): the weights live once, in
the mapped file pages, and a 16 GB release needs about 16 GB, not twice that. The model takes the precision
most of the checkpoint's weights are stored in (:func:`floating_dtype`); only tensors stored otherwise (a
release's float32 norms next to bfloat16 weights) are converted, and so copied.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from omegaconf import DictConfig, OmegaConf

from lm_mini.models.build import build_model
from lm_mini.runs import CONFIG_FILE, WEIGHTS, WEIGHTS_INDEX
from lm_mini.runs import model_dir_config as read_config

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
CONFIG_YAML, CONFIG_JSON, CARD = CONFIG_FILE, "config.json", "README.md"
# Files a tokenizer directory may hold (SentencePiece, byte-level BPE, tokenizers JSON, chat template).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


# --------------------------------------------------------------------------- reading safetensors
def weight_files(path: PathLike) -> List[Path]:
    """The safetensors files of a checkpoint: a file, a directory with an index, or one with a single file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such checkpoint file or directory: {path}")
    index = path / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {path}: {', '.join(absent)}")
        return files
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    pickles = sorted(p.name for p in path.glob("*.bin"))
    hint = f" (it has {', '.join(pickles)}: convert pickled weights to safetensors first)" if pickles else ""
    what = f"{len(found)} .safetensors files and no {WEIGHTS_INDEX}" if found else "no .safetensors weights"
    raise FileNotFoundError(f"{path}: {what}{hint}")


def read_safetensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a checkpoint (see :func:`weight_files`) as one CPU state dict."""
    from safetensors.torch import load_file

    state: Dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        shard = load_file(str(f))
        twice = sorted(set(shard) & set(state))
        if twice:
            raise ValueError(f"{f.name}: tensors also stored in another shard: {', '.join(twice[:10])}")
        state.update(shard)
    return state


# safetensors' header names of dtypes (the format's spec)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def tensor_shapes(path: PathLike) -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as an empty meta tensor of its shape and dtype: file headers only, no data read."""
    from safetensors import safe_open

    shapes: Dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                if key in shapes:
                    raise ValueError(f"{f.name}: tensor {key} is also stored in another shard")
                header = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(header.get_dtype(), torch.uint8)  # an exotic dtype: not a float
                shapes[key] = torch.empty(header.get_shape(), dtype=dtype, device="meta")
    return shapes


# --------------------------------------------------------------------------- checking
class WeightsMismatch(ValueError):
    """A set of tensors that does not fit a model; ``missing``, ``unexpected`` and ``mismatched`` name them."""

    def __init__(self, where: str, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"{where}: the weights do not fit the model"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if names:
                lines.append(f"  {title} ({len(names)}):")
                lines.extend(f"    {n}" for n in names)
        super().__init__("\n".join(lines))


def tied_aliases(model: torch.nn.Module) -> Dict[str, List[str]]:
    """Names sharing one parameter in ``model`` (tied embeddings): key -> the other names. Works on meta."""
    groups: Dict[int, List[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():  # tied names hold the same Parameter object
        groups.setdefault(id(t), []).append(name)
    return {n: [m for m in g if m != n] for g in groups.values() if len(g) > 1 for n in g}


def check_weights(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str,
                  source_name: Callable[[str], str] = str, aliases: Optional[Mapping[str, Iterable[str]]] = None,
                  unmatched: Sequence[str] = ()) -> None:
    """Raise :class:`WeightsMismatch` unless ``state`` has exactly the keys and shapes of ``expected``.

    ``source_name(key)`` says how a key is called in the file the user gave (for the message);
    a key missing from ``state`` is fine when one of its ``aliases`` (a tied tensor) is present;
    ``unmatched`` are checkpoint names that could not even be translated (listed as unexpected).
    """
    aliases = aliases or {}
    missing = [f"{source_name(k)}" + (f" (-> {k})" if source_name(k) != k else "") for k in expected
               if k not in state and not any(a in state for a in aliases.get(k, ()))]
    unexpected = list(unmatched) + [source_name(k) for k in state if k not in expected]
    mismatched = [f"{source_name(k)}: {list(state[k].shape)} in the checkpoint, the model has {list(expected[k].shape)}"
                  for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise WeightsMismatch(where, sorted(missing), sorted(unexpected), sorted(mismatched))


# --------------------------------------------------------------------------- loading into a built model
def assign_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                   aliases: Optional[Mapping[str, Iterable[str]]] = None) -> None:
    """Make ``state``'s tensors the model's own (``load_state_dict(assign=True)``: no copy, a mapped file stays
    mapped). A floating tensor stored in another precision than its parameter is converted (copied) to it.
    ``aliases`` (:func:`tied_aliases`, taken before the first assignment unties them): a tied tensor stored
    under one name is given to its other names too (:func:`finish_loading` ties them again)."""
    expected = model.state_dict(keep_vars=True)
    state = dict(state)
    for key in list(state):
        for alias in (aliases or {}).get(key, ()):
            state.setdefault(alias, state[key])
    for key, tensor in state.items():
        want = expected.get(key)
        if want is not None and tensor.is_floating_point() and want.is_floating_point() and tensor.dtype != want.dtype:
            state[key] = tensor.to(want.dtype)
    model.load_state_dict(state, strict=False, assign=True)  # strictness is the caller's check_weights


def finish_loading(model: torch.nn.Module, where: str) -> torch.nn.Module:
    """Re-tie tied embeddings (assigning replaced one side) and make sure no parameter was left on ``meta``."""
    model.llm.tie_weights()
    left = sorted({name for name, t in [*model.named_parameters(remove_duplicate=False),
                                        *model.named_buffers(remove_duplicate=False)] if t.is_meta})
    if left:
        raise WeightsMismatch(where, left, [], [])
    return model


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str,
                 source_name: Callable[[str], str] = str) -> torch.nn.Module:
    """Check ``state`` against ``model`` (names and shapes, every tensor) and make its tensors the model's."""
    aliases = tied_aliases(model)
    check_weights(state, model.state_dict(), where, source_name, aliases)
    assign_weights(model, state, aliases)
    return finish_loading(model, where)


def floating_dtype(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The floating dtype most of a state dict's weight elements are stored in ('bfloat16', ...); None when it has
    no floating tensor. Meta tensors (:func:`tensor_shapes`) count too.

    The rule a checkpoint's precision is kept by: a model is built and loaded in this dtype; the few tensors stored
    otherwise (float32 norms in a bfloat16 release) are converted to it, never the other way round (a mixed
    checkpoint used to load entirely as float32, twice its size). A tie in element count goes to the wider dtype.
    """
    counts: Counter = Counter()
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    if not counts:
        return None
    dtype = max(counts, key=lambda d: (counts[d], torch.finfo(d).bits))
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- the model directory
def copy_tokenizer(src: PathLike, out: PathLike) -> List[str]:
    """Copy a tokenizer directory's files into ``out``; refuse a directory without any."""
    src = Path(src)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        raise FileNotFoundError(f"no tokenizer in {src}: expected some of {', '.join(TOKENIZER_FILES)}")
    for n in names:
        shutil.copyfile(src / n, Path(out) / n)
    return names


def model_summary(cfg: DictConfig) -> Dict[str, object]:
    """A few LLaVA-Mini style fields describing the architecture (for config.json and the model card)."""
    m = cfg.model
    return {
        "vision_encoder": m.encoder.name, "mm_vision_select_layer": m.encoder.select_layer,
        "mm_projector_type": m.projector.name, "compressor": m.compressor.name, "compressor_size": m.compressor.grid,
        "prefusion_layer_num": m.prefusion.depth, "resolution_ratio": m.resolution_ratio,
        "llm_model_type": m.llm.config.get("model_type"), "template": cfg.data.template, "torch_dtype": m.dtype,
    }


def save_pretrained(out: PathLike, state: Mapping[str, torch.Tensor], cfg: DictConfig, tokenizer: PathLike,
                    card: str, max_shard_size: Union[int, str] = "5GB") -> Path:
    """Write a model directory. ``cfg`` must build the model without external paths (weights are all in ``state``).

    ``data.tokenizer`` is set to ``"."``: the tokenizer travels with the weights.
    """
    from huggingface_hub import save_torch_state_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.glob("*.safetensors")] + ([WEIGHTS_INDEX] if (out / WEIGHTS_INDEX).exists() else [])
    if stale:
        raise FileExistsError(f"{out} already holds weights ({', '.join(sorted(stale))}); choose an empty --out directory")
    cfg = OmegaConf.merge(cfg, {"data": {"tokenizer": "."}})
    copy_tokenizer(tokenizer, out)
    save_torch_state_dict(dict(state), out, max_shard_size=max_shard_size)
    umask = os.umask(0)
    os.umask(umask)
    for weights in out.glob("*.safetensors"):  # written 0600 by safetensors: a shared model directory's weights
        weights.chmod(0o666 & ~umask)  # must be as readable as its other files
    (out / CONFIG_YAML).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # no "model_type": transformers would take it for one of its own (AutoTokenizer reads this file and warns)
    summary = {"architectures": ["LlavaMini"], "library_name": "lm_mini", **model_summary(cfg),
               "lm_mini": OmegaConf.to_container(cfg.model, resolve=True)}
    (out / CONFIG_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    (out / CARD).write_text(card)
    return out


def load_pretrained(path: PathLike, device: Union[str, torch.device, None] = None) -> torch.nn.Module:
    """The ``LlavaMini`` stored in a model directory, in eval mode (every tensor checked on the way).

    Built with its parameters on ``meta``, then given the shards' memory-mapped tensors one shard at a time: the
    weights are held once (see the module docstring). Its dtype is the one most weights are stored in
    (:func:`floating_dtype`), whatever ``model.dtype`` the directory's config.yaml names.
    """
    from safetensors.torch import load_file

    cfg = read_config(path)
    shapes = tensor_shapes(path)
    stored = floating_dtype(shapes)
    if stored in ("float32", "bfloat16", "float16") and stored != cfg.model.dtype:
        log.info("%s: weights stored in %s, config.yaml says model.dtype=%s: loading in %s", path, stored, cfg.model.dtype, stored)
        cfg.model.dtype = stored
    model = build_model(cfg.model, for_loading=True)
    aliases = tied_aliases(model)
    check_weights(shapes, model.state_dict(), str(path), aliases=aliases)
    for f in weight_files(path):
        assign_weights(model, load_file(str(f)), aliases)  # mapped, not read: the file's pages become the weights
    finish_loading(model, str(path))
    return model.to(device).eval() if device is not None else model.eval()
