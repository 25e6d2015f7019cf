"""Structured configs: one dataclass tree, loaded from YAML with OmegaConf and validated at load time.

``load_config("experiments/demo.yaml", ["model.compressor.grid=4"])`` merges, in order:
the dataclass defaults, the YAML file (and the files its ``defaults:`` list names, relative
to it), then ``key=value`` overrides. An unknown key or a value of the wrong type is refused
with the key's path and the valid keys (or the expected type).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from lm_mini.constants import ATTENTION_BACKENDS, CUDA_ONLY_ATTENTION


# --------------------------------------------------------------------------- model
@dataclass
class EncoderConfig:
    name: str = "hf_clip"  # registry name: hf_clip | hf_siglip | timm | package.module:Class
    config: Dict[str, Any] = field(default_factory=dict)  # HF vision config kwargs, or timm kwargs (model_name, ...)
    path: Optional[str] = None  # local pretrained directory (HF) / checkpoint file (timm)
    select_layer: int = -2  # hidden state to take (LLaVA: penultimate layer)
    select_feature: str = "patch"  # patch (drop CLS) | cls_patch


@dataclass
class ProjectorConfig:
    name: str = "mlp2x_gelu"  # mlp2x_gelu | linear | package.module:Class


@dataclass
class CompressorConfig:
    name: str = "query_attention"  # query_attention | avg_pool | qformer | identity | package.module:Class | entry point
    grid: int = 1  # C: the compressor emits C*C tokens per image / frame
    options: Dict[str, Any] = field(default_factory=dict)  # extra kwargs for the compressor class


@dataclass
class PreFusionConfig:
    depth: int = 4  # number of decoder layers; 0 switches pre-fusion off
    init: str = "random"  # random (official) | llm_layers (copy the LLM's first `depth` layers)
    detach_text: bool = True  # official: no gradient from pre-fusion into the text embeddings
    # Training (a batch with labels): a text-only sample's text is fused with an all-zero image, as official
    # LLaVA-Mini training does (its data gives such samples a blank image); inference never fuses text-only
    # prompts (official). On in the LLaVA-Mini presets; off: text-only samples reach the LLM unfused.
    text_only_blank_image: bool = False


@dataclass
class LLMConfig:
    name: str = "hf_causal_lm"  # LLM builder registry name
    config: Dict[str, Any] = field(default_factory=dict)  # transformers config kwargs incl. model_type
    path: Optional[str] = None  # local HF directory; overrides `config`
    attn_implementation: Optional[str] = None  # None: model.attn_implementation; else the LLM's (and pre-fusion's) own


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    prefusion: PreFusionConfig = field(default_factory=PreFusionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    resolution_ratio: int = 1  # R: hi-res images are split into R x R crops plus the global view
    video_hires: bool = False  # at R > 1 every video frame gets R x R crops + global view too (official); else one view
    dtype: str = "float32"  # parameter dtype when built: float32 | bfloat16 | float16
    # Attention of the LLM, the pre-fusion layers and the (Hugging Face) vision encoder:
    # sdpa | eager | flash_attention_2 (flash-attn, CUDA) | xformers (CUDA). Checked here against
    # train.accelerator; whether it can run on this machine (installed, a GPU) at model build.
    attn_implementation: str = "sdpa"


# --------------------------------------------------------------------------- data
@dataclass
class ShardSetConfig:
    # directory holding index.json and *.tar (or a glob / brace pattern of .tar files); or the same at an
    # http(s):// or other fsspec URL (s3://bucket/set, gs://...) or a pipe: command, read through its index.json.
    # Credentials come from the store's environment (AWS_*, ~/.netrc, ...): a URL holding one is refused.
    path: str = ""
    weight: float = 1.0  # mixing weight among training shard sets
    template: Optional[str] = None  # overrides data.template for this set (e.g. plain for captions)


@dataclass
class RemoteConfig:
    """How shards at URLs are fetched (lm_mini.data.remote). Changing it never changes which samples a run sees."""

    retries: int = 3  # after a failure (reset, 5xx, cut off), per shard; then its unread samples are shard_unavailable
    backoff_s: float = 1.0  # wait before the first retry, doubled for each next one (at most 60 s, with jitter)
    timeout_s: float = 60.0  # connecting, and waiting for the next bytes of a shard
    cache_dir: Optional[str] = None  # keep whole shards here for later epochs (None: stream every read)
    cache_max_gb: float = 100.0  # size bound of cache_dir: least recently used shards are deleted


@dataclass
class DataConfig:
    tokenizer: str = "data_shards/demo/tokenizer"  # local tokenizer directory (AutoTokenizer)
    template: str = "vicuna_v1"  # plain | vicuna_v1 | llama3
    train: List[ShardSetConfig] = field(default_factory=list)
    val: List[ShardSetConfig] = field(default_factory=list)
    max_length: int = 2048
    batch_size: int = 8
    num_workers: int = 0
    shuffle_buffer: int = 1000
    # Length-grouped batches (LLaVA's group_by_modality_length): each loader worker sorts every window of this many
    # batches by modality and length, then shuffles the batches; less padding, same samples per epoch. 0: off
    group_by_length: int = 0
    # square: the CLIP processor's shortest-edge resize + centre crop (official default) | pad: padded to a square
    # with the mean colour (LLaVA-1.5) | squash: the whole image stretched to S x S (no official counterpart)
    aspect_mode: str = "square"
    video_fps: float = 1.0  # frames a second sampled from a video (official inference: 1), at most max_frames
    max_frames: int = 64
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    # Training videos: this many frames, the middle of as many equal segments (official LLaVA-Mini training: 8,
    # get_seq_frames); None: video_fps / max_frames as for held-out data and generation
    train_video_frames: Optional[int] = None


# --------------------------------------------------------------------------- training
@dataclass
class PartConfig:
    train: bool = True
    lr: Optional[float] = None  # None: train.lr


@dataclass
class PartsConfig:
    encoder: PartConfig = field(default_factory=lambda: PartConfig(train=False))
    projector: PartConfig = field(default_factory=PartConfig)
    compressor: PartConfig = field(default_factory=PartConfig)
    prefusion: PartConfig = field(default_factory=PartConfig)
    llm: PartConfig = field(default_factory=PartConfig)


@dataclass
class TrainConfig:
    stage: str = "finetune"  # pretrain | finetune
    parts: PartsConfig = field(default_factory=PartsConfig)
    init_from: Optional[str] = None  # checkpoint path or run name to start from (finetune after pretrain)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.5
    accumulate_grad_batches: int = 1
    max_epochs: int = 1
    max_steps: int = -1
    precision: str = "32-true"  # bf16-mixed on GPU
    activation_checkpointing: bool = False
    strategy: str = "auto"  # auto | ddp | fsdp
    devices: Any = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    checkpoint_every_n_steps: int = 100
    keep_last_k: int = 2
    log_every_n_steps: int = 1
    val_every_n_steps: Optional[int] = None
    sharded_checkpoint: bool = True  # fsdp: one shard per rank (False: gather one full file on rank 0)
    eval_at_end: bool = True  # greedy-generation exact match on data.val after training (rank 0)
    # Seconds a collective (and the start of a torchrun/srun job) waits for the other ranks: a rank that died or
    # hangs fails the job after this long. Longer than the slowest checkpoint save or end-of-training evaluation.
    dist_timeout_s: float = 600.0


@dataclass
class EvalConfig:
    max_new_tokens: int = 16
    batch_size: int = 8  # samples per generate() call; validation loss during training batches as data.batch_size
    metrics: List[str] = field(default_factory=lambda: ["exact_match"])
    max_samples: Optional[int] = None  # the first N samples of each data.val set
    # Generation (lm-mini eval flags --temperature --top-p --num-beams override): greedy by default, as the paper's eval.
    temperature: float = 0.0  # > 0 samples (LLaVA's eval scripts: do_sample = temperature > 0)
    top_p: Optional[float] = None  # nucleus sampling, with temperature > 0
    num_beams: int = 1


@dataclass
class LoggingConfig:
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    runs_dir: str = "runs"
    tags: Dict[str, str] = field(default_factory=dict)
    connect_timeout_s: float = 10.0  # a tracking server that does not answer /health in this time is an error at start
    flush_timeout_s: float = 30.0  # at the end, wait this long for an unreachable server, then write metrics locally


@dataclass
class Config:
    experiment: str = "default"
    run_name: Optional[str] = None
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------- loading
class ConfigError(ValueError):
    """A config key or value that does not fit the schema; the message names the key."""


def _list_item_schema(node: ListConfig) -> Optional[DictConfig]:
    """The schema of one item of a typed list (``data.train`` -> ``ShardSetConfig``), if it has one."""
    item_type = getattr(node._metadata, "element_type", None)
    try:
        return OmegaConf.structured(item_type) if item_type is not None and hasattr(item_type, "__dataclass_fields__") else None
    except OmegaConfBaseException:
        return None


def _valid_keys(schema: Any, dotted: str) -> List[str]:
    node = schema
    for part in [p for p in dotted.split(".")[:-1] if p]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, ListConfig) and (part.isdigit() or part == "*"):
            node = _list_item_schema(node)
        else:
            return []
    if isinstance(node, DictConfig):
        return sorted(str(k) for k in node.keys())
    return []


def _explain(err: OmegaConfBaseException, schema: DictConfig, source: str, under: Optional[str] = None) -> ConfigError:
    """A ConfigError naming the key. ``under``: the overridden key, when the error's key is relative to it
    (an item of an assigned list reports only its own field)."""
    key = (getattr(err, "full_key", None) or "").replace("[", ".").replace("]", "")
    if under and key and not (key == under or key.startswith(under + ".") or under.startswith(key)):
        node = OmegaConf.select(schema, under)
        key = f"{under}.{'*.' if isinstance(node, ListConfig) else ''}{key}"
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)):
        valid = _valid_keys(schema, key)
        leaf = key.split(".")[-1]
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'. Valid keys here: {', '.join(valid)}.{hint}")
    if isinstance(err, ValidationError):
        return ConfigError(f"{source}: bad value for config key '{key}': {str(err.msg).splitlines()[0]}")
    return ConfigError(f"{source}: {err}")


def _read_yaml(path: Path) -> DictConfig:
    """Read a YAML file, first merging the files listed in its ``defaults:`` (paths relative to it)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    import yaml

    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    defaults = raw.pop("defaults", [])
    if isinstance(defaults, str):  # `defaults: base.yaml` means one file, not its characters
        defaults = [defaults]
    if not isinstance(defaults, (list, ListConfig)) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML file paths (relative to this file)")
    merged = OmegaConf.create()
    for d in defaults:
        included = (path.parent / str(d)).resolve()
        if not included.is_file():
            raise ConfigError(f"config file not found: {included} (listed in the defaults of {path})")
        merged = OmegaConf.merge(merged, _read_yaml(included))
    return OmegaConf.merge(merged, raw)


# Free-form mappings (HF model configs, compressor options, tags) accept any key.
_OPEN_DICTS = ("model.encoder.config", "model.compressor.options", "model.llm.config", "logging.tags")


def schema() -> DictConfig:
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    for key in _OPEN_DICTS:
        OmegaConf.set_struct(OmegaConf.select(cfg, key), False)
    return cfg


# Values with a closed set of choices or a lower bound, checked at load time like the types.
_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.prefusion.init": ("random", "llm_layers"),
    "model.encoder.select_feature": ("patch", "cls_patch"),
    "model.attn_implementation": ATTENTION_BACKENDS,
    "data.aspect_mode": ("square", "squash", "pad"),
    "train.stage": ("pretrain", "finetune"),
    "train.strategy": ("auto", "ddp", "fsdp"),
    "train.precision": ("32-true", "32", "16-mixed", "16-true", "16", "bf16-mixed", "bf16-true", "bf16", "64-true", "64"),  # Lightning's
}
_MINIMUM = {
    "model.prefusion.depth": 0,
    "model.compressor.grid": 1,
    "model.resolution_ratio": 1,
    "data.max_frames": 1,
    "data.train_video_frames": 1,
    "data.batch_size": 1,
    "data.max_length": 1,
    "data.num_workers": 0,
    "data.remote.retries": 0,
    "data.remote.backoff_s": 0.0,
    "data.group_by_length": 0,
    "train.accumulate_grad_batches": 1,
    "train.keep_last_k": 1,  # 0 would keep no checkpoint: nothing to evaluate, export or init_from
    "train.lr": 0.0,  # a negative rate would train backwards (gradient ascent) without a word
    **{f"train.parts.{part}.lr": 0.0 for part in ("encoder", "projector", "compressor", "prefusion", "llm")},
    "train.weight_decay": 0.0,
    "train.warmup_ratio": 0.0,
    "train.max_grad_norm": 0.0,  # 0: no clipping
    "train.num_nodes": 1,
    "train.checkpoint_every_n_steps": 1,
    "train.log_every_n_steps": 1,
    "train.val_every_n_steps": 1,
    "eval.max_new_tokens": 1,
    "eval.batch_size": 1,
    "eval.max_samples": 1,
    "eval.temperature": 0,
    "eval.num_beams": 1,
}
_MAXIMUM = {"train.warmup_ratio": 1.0, "eval.top_p": 1.0}  # fractions
_POSITIVE = ("eval.top_p", "data.video_fps", "train.dist_timeout_s", "data.remote.timeout_s", "data.remote.cache_max_gb")


def validate(cfg: DictConfig, source: str = "config") -> DictConfig:
    """Refuse values outside their choices / below their minimum, naming the key (types are OmegaConf's job)."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{source}: bad value for config key '{key}': {value!r}; expected one of {', '.join(choices)}")
    for key, low in _MINIMUM.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"{source}: bad value for config key '{key}': {value}; expected >= {low}")
    for key, high in _MAXIMUM.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value > high:
            raise ConfigError(f"{source}: bad value for config key '{key}': {value}; expected <= {high}")
    for key in _POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{source}: bad value for config key '{key}': {value}; expected > 0")
    from lm_mini.eval.metrics import METRICS

    for name in OmegaConf.select(cfg, "eval.metrics") or []:
        if name not in METRICS:
            raise ConfigError(f"{source}: bad value for config key 'eval.metrics': unknown metric {name!r}; "
                              f"expected some of {', '.join(sorted(METRICS))}")
    _validate_attention(cfg, source)
    devices = OmegaConf.select(cfg, "train.devices")
    if not (devices == "auto" or (isinstance(devices, int) and (devices >= 1 or devices == -1))
            or (isinstance(devices, str) and devices.replace(",", "").strip().isdigit())
            or (isinstance(devices, ListConfig) and len(devices) > 0)):
        raise ConfigError(f"{source}: bad value for config key 'train.devices': {devices!r}; expected a count >= 1, "
                          "-1 or 'auto' (all), or device ids ([0, 1] or '0,1')")
    for kind in ("train", "val"):
        for i, item in enumerate(OmegaConf.select(cfg, f"data.{kind}") or []):
            if item.weight < 0:
                raise ConfigError(f"{source}: bad value for config key 'data.{kind}.{i}.weight': {item.weight}; expected >= 0")
            _check_no_credentials(str(item.path), f"data.{kind}.{i}.path", source)
    _validate_components(cfg, source)
    return cfg


def _validate_attention(cfg: DictConfig, source: str) -> None:
    """``model.llm.attn_implementation`` (None or a backend); a CUDA-only backend with ``train.accelerator=cpu``.
    Whether the backend is installed and a GPU is there is checked at model build (``lm_mini.models.attention``)."""
    llm_attn = OmegaConf.select(cfg, "model.llm.attn_implementation")
    if llm_attn is not None and llm_attn not in ATTENTION_BACKENDS:
        raise ConfigError(f"{source}: bad value for config key 'model.llm.attn_implementation': {llm_attn!r}; expected "
                          f"null (follow model.attn_implementation) or one of {', '.join(ATTENTION_BACKENDS)}")
    if str(OmegaConf.select(cfg, "train.accelerator")).lower() == "cpu":
        for key in ("model.attn_implementation", "model.llm.attn_implementation"):
            if OmegaConf.select(cfg, key) in CUDA_ONLY_ATTENTION:
                raise ConfigError(f"{source}: bad value for config key '{key}': {OmegaConf.select(cfg, key)} runs on CUDA "
                                  "GPUs only and train.accelerator is cpu; use sdpa (or eager) on CPU")


def _check_no_credentials(path: str, key: str, source: str) -> None:
    """A shard set URL must not carry a credential: config.yaml and the MLflow params would keep it."""
    from lm_mini.data.remote import redact, secrets_in

    found = secrets_in(path)
    if found:
        raise ConfigError(f"{redact(source)}: bad value for config key '{key}': {redact(path)} holds {', '.join(found)}; the "
                          "config is saved with the run and logged to MLflow, so credentials come from the store's "
                          "environment instead (AWS_* variables or profiles for S3, ~/.netrc for HTTP, ...)")


def _validate_components(cfg: DictConfig, source: str) -> None:
    """Component names must resolve in their registries now, not as a traceback after a run was created."""
    from lm_mini import registry

    names = {"model.encoder.name": registry.ENCODERS, "model.projector.name": registry.PROJECTORS,
             "model.compressor.name": registry.COMPRESSORS, "model.llm.name": registry.LLMS,
             "data.template": registry.TEMPLATES}
    for kind in ("train", "val"):
        for i, _ in enumerate(OmegaConf.select(cfg, f"data.{kind}") or []):
            names[f"data.{kind}.{i}.template"] = registry.TEMPLATES
    for key, reg in names.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        try:
            reg.get(value)
        except KeyError as e:
            raise ConfigError(f"{source}: bad value for config key '{key}': {e.args[0]}") from None


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults <- YAML (with its defaults list) <- ``key=value`` overrides, validated against ``Config``."""
    cfg = schema()
    if path is not None:
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        except OmegaConfBaseException as e:
            raise _explain(e, schema(), str(path)) from None
        validate(cfg, str(path))
    return apply_overrides(cfg, overrides)


def _check_list_index(cfg: DictConfig, key: str, source: str) -> None:
    """``data.train.3.weight`` needs ``data.train`` to have an item 3 (an override edits items, never adds one)."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:i])
                raise ConfigError(f"{source}: '{where}' has {len(node)} entries; index {part} is out of range "
                                  f"(set the whole list instead: {where}=[...])")
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
            node = node._value() if not isinstance(node, (DictConfig, ListConfig)) else node
        else:
            return


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``key=value`` overrides (YAML values) applied in order; ``a.b.0.c=...`` edits an item of a list."""
    import copy

    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key = item.partition("=")[0].strip()
        source = f"override '{item}'"
        try:
            value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: cannot parse it: {e}") from None
        _check_list_index(cfg, key, source)
        try:
            # update, not merge of a dotlist: a dotlist turns "train.0" into a mapping key, which cannot merge into a list
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise _explain(e, schema(), source, under=key) from None
        validate(cfg, f"override '{item}'")
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: Any, prefix: str = "") -> Dict[str, Any]:
    """{'model.compressor.grid': 1, ...} for MLflow params and sweep names. A password or signature in a URL
    value (a tracking URI, say; shard set paths refuse them) is shown as ``***``."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    out: Dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):  # an empty mapping contributes no key
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list) and node and any(isinstance(v, (dict, list)) for v in node):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}")
        else:
            out[key] = redact(node) if isinstance(node, str) and "://" in node else node

    from lm_mini.data.remote import redact

    walk(container, prefix)
    return out


def differences(before: Any, after: Any, ignore: Sequence[str] = (), only: Optional[Sequence[str]] = None) -> List[Tuple[str, Any, Any]]:
    """``(key, value before, value after)`` for every flattened key whose value differs between two configs, sorted;
    keys under an ``ignore`` prefix are left out and, with ``only``, keys outside its prefixes too."""
    def under(key: str, prefixes: Sequence[str]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    was, now = flatten(before), flatten(after)
    return [(k, was.get(k), now.get(k)) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)
            and not under(k, ignore) and (only is None or under(k, only))]


def tracking_uri(cfg: Optional[DictConfig] = None) -> str:
    """MLflow store: ``logging.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the cwd.

    MLflow 3 refuses a plain ``./mlruns`` file store, so the default is a local SQLite file (no server needed)."""
    import os

    configured = cfg.logging.tracking_uri if cfg is not None else None
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
