"""``lm-mini export (RUN|CHECKPOINT) --out DIR``, and loading any trained model by path.

Three kinds of path name a model (``lm_mini.runs.resolve_source``): a **model directory** (what import and export
write), a **run directory** (its newest complete checkpoint) or a **checkpoint** (a Lightning file, or a folder
of FSDP shards whose model weights are gathered into full tensors on the way).

Nothing found this way runs code unless the user allows it (``lm_mini.trust``): checkpoints are read
``weights_only`` (``lm_mini.interop.checkpoint``), and a run's or model directory's config may not name
``package.module:Class`` components.

Export pins the config first: parts built from a local path (``model.llm.path``, ``model.encoder.path``)
get that path's config written out and the path removed, since every weight now lives in the export.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf

from lm_mini.interop.pretrained import (PathLike, check_weights, floating_dtype, load_weights, model_summary, read_safetensors,
                                        save_pretrained, tied_aliases)
from lm_mini.models.build import build_model
from lm_mini.runs import Source, resolve_source

log = logging.getLogger(__name__)


def source_weights(source: Source) -> Dict[str, torch.Tensor]:
    """The model's tensors under lm_mini's names (sharded checkpoints gathered into full tensors)."""
    if source.kind == "model_dir":
        return read_safetensors(source.path)
    from lm_mini.interop.checkpoint import read_checkpoint_weights

    state, info = read_checkpoint_weights(source.checkpoint)
    source.info.update(info)
    return state


def pin_config(cfg: DictConfig) -> Tuple[DictConfig, torch.nn.Module]:
    """``cfg`` with local-path parts replaced by their configs, and the model it builds on meta."""
    from lm_mini.interop.importers import hf_config_dict

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    model = build_model(cfg.model, device="meta")
    m = cfg.model
    if m.llm.path:
        m.llm.config, m.llm.path = hf_config_dict(model.llm.config, keep_model_type=True), None
    if m.encoder.path:
        hf = getattr(getattr(model.encoder, "model", None), "config", None)
        if m.encoder.name in ("hf_clip", "hf_siglip") and hf is not None:
            m.encoder.config = hf_config_dict(hf, keep_model_type=False)
        m.encoder.path = None
    return cfg, model


def load_model(path: Union[PathLike, Source], device: Any = None,
               backends: Optional[Mapping[str, str]] = None) -> Tuple[torch.nn.Module, DictConfig]:
    """``(model in eval mode, config)`` for a model directory, run directory or checkpoint (or its :class:`Source`).

    The config's ``data.tokenizer`` is resolved to the directory found (see :func:`tokenizer_dir`). The attention
    backends are the saved ones, or ``backends`` (``{"model.attn_implementation": "eager"}``), or ``sdpa`` where a
    saved one cannot run here (logged): see :func:`~lm_mini.models.attention.choose_inference_backends`.
    """
    from lm_mini.models.attention import choose_inference_backends

    source = path if isinstance(path, Source) else resolve_source(path)
    cfg, _ = pin_config(source.cfg)
    for note in choose_inference_backends(cfg.model, backends, None if device is None else str(device)):
        log.warning("%s: %s", source.path, note)
    cfg.data.tokenizer = str(tokenizer_dir(cfg, source))
    model = load_weights(build_model(cfg.model, for_loading=True), source_weights(source), str(source.checkpoint or source.path))
    model = model.to(device) if device is not None else model
    return model.eval(), cfg


def tokenizer_dir(cfg: DictConfig, source: Source) -> Path:
    """The tokenizer directory of a source: ``data.tokenizer`` as given, else relative to the run directory."""
    tok = Path(cfg.data.tokenizer)
    candidates = [tok] + ([source.run_dir / tok] if source.run_dir is not None and not tok.is_absolute() else [])
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{source.path}: tokenizer directory data.tokenizer={cfg.data.tokenizer} not found "
                            f"(run the command from the directory training ran in)")


def user_code(cfg: DictConfig) -> Dict[str, str]:
    """The components a config names that lm_mini does not ship (``package.module:Class``, entry points, names
    registered by the user's code): config key -> name. Loading such a model imports that code."""
    from lm_mini import registry

    named = {"model.encoder.name": registry.ENCODERS, "model.projector.name": registry.PROJECTORS,
             "model.compressor.name": registry.COMPRESSORS, "model.llm.name": registry.LLMS}
    return {key: str(OmegaConf.select(cfg, key)) for key, reg in named.items() if OmegaConf.select(cfg, key) not in reg.builtin}


def _code_section(cfg: DictConfig, out: PathLike) -> str:
    code = user_code(cfg)
    if not code:
        return ""
    names = ", ".join(f"`{k}: {v}`" for k, v in code.items())
    allow = " ".join(f"--allow-import {v}" for v in code.values())
    return (f"## Code this model needs\n\nIts config names components that are not part of lm_mini: {names}. Loading it "
            f"imports that code: make the module importable (install its package, or set PYTHONPATH to its folder) and "
            f"allow the import, e.g. `lm-mini generate {out} {allow} --image photo.jpg --prompt '...'` (or "
            f"LM_MINI_ALLOW_IMPORTS).\n\n")


def model_card(out: PathLike, cfg: DictConfig, source: Source) -> str:
    info = source.info
    origin = f"Exported with `lm-mini export {source.path}`"
    if source.checkpoint is not None:
        origin += f" from checkpoint `{source.checkpoint.name}`" + (f" (step {info['global_step']})" if "global_step" in info else "")
    mlflow = (f"- MLflow run: `{info['run_id']}` (experiment `{info.get('experiment', cfg.experiment)}`, "
              f"tracking URI `{info.get('tracking_uri', '')}`)\n") if info.get("run_id") else "- MLflow run: unknown\n"
    summary = "".join(f"- {k}: {v}\n" for k, v in model_summary(cfg).items())
    return (f"---\nlibrary_name: lm_mini\ntags: [llava-mini, multimodal, lm_mini]\n---\n# {Path(out).name}\n\n{origin}.\n\n"
            f"{mlflow}{summary}\n## Use\n\n```bash\nlm-mini generate {out} --image photo.jpg --prompt 'What is shown?'\n```\n\n"
            f"```python\nfrom lm_mini.interop import load_pretrained\nmodel = load_pretrained('{out}')\n```\n\n"
            f"{_code_section(cfg, out)}## Training config\n\n```yaml\n{OmegaConf.to_yaml(source.cfg, resolve=True)}```\n")


def export(path: PathLike, out: PathLike, max_shard_size: Any = "5GB") -> Path:
    """Write the model named by ``path`` as a model directory ``out`` (every tensor checked first)."""
    source = resolve_source(path)
    cfg, model = pin_config(source.cfg)
    state = source_weights(source)
    check_weights(state, model.state_dict(), str(source.checkpoint or source.path), aliases=tied_aliases(model))
    dtype = floating_dtype(state)
    if dtype in ("float32", "bfloat16", "float16"):
        cfg.model.dtype = dtype  # load_pretrained rebuilds in the precision the weights are stored in
    tok = tokenizer_dir(cfg, source)
    return save_pretrained(out, state, cfg, tok, model_card(out, cfg, source), max_shard_size)
