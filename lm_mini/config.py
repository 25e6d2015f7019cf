"""Structured configs: one dataclass tree, loaded from YAML with OmegaConf and validated at load time.

``load_config("experiments/demo.yaml", ["model.compressor.grid=4"])`` merges, in order: the dataclass defaults,
the YAML file (and the files its ``defaults:`` list names, see :func:`find_config`), then ``key=value``
overrides. An unknown key or a value of the wrong type is refused with the key's path and the valid keys (or the
expected type). A value's other rules sit next to its field (``checked(default, one_of(...), at_least(...))``):
:func:`check_fields` applies them to a loaded config, or to a section made in code (``LlavaMini.from_config`` checks
its ``ModelConfig``), with the key's path in the message. Rules that tie two fields together are
:func:`check_cross_fields`'. Checking imports no model code (registry names are known by name), so
``lm-mini config show`` stays light.

Over ~450 lines on purpose: the schema and the loader that enforces it are read together.
"""
from __future__ import annotations

import difflib
import functools
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, GrammarParseError, InterpolationResolutionError,
                              OmegaConfBaseException, ValidationError)

from lm_mini import registry
from lm_mini.constants import ATTENTION_BACKENDS, CUDA_ONLY_ATTENTION


class ConfigError(ValueError):
    """A config key or value that does not fit the schema; the message names the key."""


# --------------------------------------------------------------------------- rules of one field
# A rule takes the field's value and returns what is wrong with it (the message after "bad value for config key
# 'k': "), or None. None values (unset optional fields) pass every rule but one_of's.
Rule = Callable[[Any], Optional[str]]


def one_of(*choices: Any) -> Rule:
    return lambda v: None if v in choices else f"{v!r}; expected one of {', '.join(map(str, choices))}"


def at_least(low: float) -> Rule:
    return lambda v: None if v is None or v >= low else f"{v}; expected >= {low}"


def at_most(high: float) -> Rule:
    return lambda v: None if v is None or v <= high else f"{v}; expected <= {high}"


def positive(v: Any) -> Optional[str]:
    return None if v is None or v > 0 else f"{v}; expected > 0"


def registered(reg: Any) -> Rule:
    """A name the registry resolves (built-in, registered, ``package.module:Class``, entry point)."""
    def rule(v: Any) -> Optional[str]:
        try:
            v is None or reg.check(v)
        except KeyError as e:
            return e.args[0]
        return None
    return rule


def checked(default: Any = MISSING, *rules: Rule, factory: Any = MISSING) -> Any:
    """A dataclass field with its rules: ``dtype: str = checked("float32", one_of("float32", "bfloat16"))``."""
    return field(default=default, default_factory=factory, metadata={"rules": rules})


_ABSENT = object()


_type_hints = functools.lru_cache(maxsize=None)(typing.get_type_hints)


def check_fields(node: Any, schema: type, prefix: str = "", source: str = "config") -> None:
    """Apply every field rule of ``schema`` (a config dataclass) to ``node`` (a DictConfig or an instance) and its
    nested sections and list items, depth first; raise :class:`ConfigError` naming the key (``prefix`` + field)."""
    hints = _type_hints(schema)
    for f in fields(schema):
        key, value = f"{prefix}{f.name}", getattr(node, f.name, _ABSENT)
        if value is _ABSENT:  # a partial config made in code: what it lacks, the builder defaults
            continue
        for rule in f.metadata.get("rules", ()):
            problem = rule(value)
            if problem:
                from lm_mini.data.remote import redact  # light; a source may be an override holding a URL

                raise ConfigError(f"{redact(source)}: bad value for config key '{key}': {problem}")
        kind = hints[f.name]
        item = typing.get_args(kind)[0] if typing.get_origin(kind) in (list, List) and typing.get_args(kind) else None
        if is_dataclass(kind) and value is not None:
            check_fields(value, kind, f"{key}.", source)
        elif item is not None and is_dataclass(item):
            for i, entry in enumerate(value or []):
                check_fields(entry, item, f"{key}.{i}.", source)


def _devices(v: Any) -> Optional[str]:
    ok = (v == "auto" or (isinstance(v, int) and (v >= 1 or v == -1)) or (isinstance(v, str) and v.replace(",", "").strip().isdigit())
          or (isinstance(v, (list, ListConfig)) and len(v) > 0))
    return None if ok else f"{v!r}; expected a count >= 1, -1 or 'auto' (all), or device ids ([0, 1] or '0,1')"


def _llm_attention(v: Any) -> Optional[str]:
    return None if v is None or v in ATTENTION_BACKENDS else (
        f"{v!r}; expected null (follow model.attn_implementation) or one of {', '.join(ATTENTION_BACKENDS)}")


def _metrics(names: Any) -> Optional[str]:
    unknown = [n for n in names or [] if registered(registry.METRICS)(n)]
    return None if not unknown else (f"unknown metric {unknown[0]!r}; expected some of "
                                     f"{', '.join(sorted(registry.METRICS.names()))}")


def _no_credentials(path: Any) -> Optional[str]:
    """A shard set URL must not carry a credential: config.yaml and the MLflow params would keep it."""
    from lm_mini.data.remote import redact, secrets_in

    found = secrets_in(str(path))
    return None if not found else (
        f"{redact(str(path))} holds {', '.join(found)}; the config is saved with the run and logged to MLflow, so "
        "credentials come from the store's environment instead (AWS_* variables or profiles for S3, ~/.netrc for HTTP, ...)")


def _no_tracking_credentials(uri: Any) -> Optional[str]:
    """A tracking URI must not carry a password either: MLflow reads it from its own environment variables."""
    from lm_mini.data.remote import redact, secrets_in

    found = secrets_in(str(uri)) if uri else []
    return None if not found else (
        f"{redact(str(uri))} holds {', '.join(found)}; the config is saved with the run and logged to MLflow, so give "
        "MLflow the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")


PRECISIONS = ("32-true", "32", "16-mixed", "16-true", "16", "bf16-mixed", "bf16-true", "bf16", "64-true", "64")  # Lightning's


# --------------------------------------------------------------------------- model
@dataclass
class EncoderConfig:
    name: str = checked("hf_clip", registered(registry.ENCODERS))  # hf_clip | hf_siglip | timm | package.module:Class
    config: Dict[str, Any] = field(default_factory=dict)  # HF vision config kwargs, or timm kwargs (model_name, ...)
    path: Optional[str] = None  # local pretrained directory (HF) / checkpoint file (timm)
    select_layer: int = -2  # hidden state to take (LLaVA: penultimate layer)
    select_feature: str = checked("patch", one_of("patch", "cls_patch"))  # patch (drop CLS) | cls_patch


@dataclass
class ProjectorConfig:
    name: str = checked("mlp2x_gelu", registered(registry.PROJECTORS))  # mlp2x_gelu | linear | package.module:Class


@dataclass
class CompressorConfig:
    # query_attention | avg_pool | qformer | identity | package.module:Class | entry point
    name: str = checked("query_attention", registered(registry.COMPRESSORS))
    grid: int = checked(1, at_least(1))  # C: the compressor emits C*C tokens per image / frame
    options: Dict[str, Any] = field(default_factory=dict)  # extra kwargs for the compressor class


@dataclass
class PreFusionConfig:
    depth: int = checked(4, at_least(0))  # number of decoder layers; 0 switches pre-fusion off
    init: str = checked("random", one_of("random", "llm_layers"))  # random (official) | llm_layers (copy the LLM's first `depth`)
    detach_text: bool = True  # no gradient from pre-fusion into the text embeddings (official: none at all, see llm.train_input_embeddings)
    # Training (a batch with labels): a text-only sample's text is fused with an all-zero image, as official
    # LLaVA-Mini training does (its data gives such samples a blank image); inference never fuses text-only
    # prompts (official). On in the LLaVA-Mini presets; off: text-only samples reach the LLM unfused.
    text_only_blank_image: bool = False
    # Official quirk (encode_images_mini: ``padding_mask = input_ids <= 0`` after zeroing the answers' ids): a token
    # whose id is 0 is left out of pre-fusion, as a key and as a query, and reaches the LLM raw: Llama-3's "!"
    # (Vicuna's <unk>). The release was trained and evaluated so: on in `lm-mini import llava-mini` and the
    # LLaVA-Mini presets; off for our own models, where "!" is text like any other.
    skip_token_id_0: bool = False


@dataclass
class LLMConfig:
    name: str = checked("hf_causal_lm", registered(registry.LLMS))  # LLM builder registry name
    config: Dict[str, Any] = field(default_factory=dict)  # transformers config kwargs incl. model_type
    path: Optional[str] = None  # local HF directory; overrides `config`
    # None: model.attn_implementation; else the LLM's (and pre-fusion's) own
    attn_implementation: Optional[str] = checked(None, _llm_attention)
    # False: every text embedding the LLM and pre-fusion read is detached, so training never updates the input
    # embedding table (a tied output layer still trains it): official LLaVA-Mini (encode_images_mini's
    # all_text_embedding = embed_tokens(ids).detach()), set by `lm-mini import llava-mini` and the LLaVA-Mini
    # presets. True: tokens the LLM reads raw (answers) train their rows; needed to train an LLM from scratch.
    train_input_embeddings: bool = True


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    prefusion: PreFusionConfig = field(default_factory=PreFusionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    resolution_ratio: int = checked(1, at_least(1))  # R: hi-res images are split into R x R crops plus the global view
    video_hires: bool = False  # at R > 1 every video frame gets R x R crops + global view too (official); else one view
    dtype: str = checked("float32", one_of("float32", "bfloat16", "float16"))  # parameter dtype when built
    # Attention of the LLM, the pre-fusion layers and the (Hugging Face) vision encoder:
    # sdpa | eager | flash_attention_2 (flash-attn, CUDA) | xformers (CUDA). Checked against train.accelerator
    # (check_cross_fields); whether it can run on this machine (installed, a GPU) at model build.
    attn_implementation: str = checked("sdpa", one_of(*ATTENTION_BACKENDS))


# --------------------------------------------------------------------------- data
@dataclass
class ShardSetConfig:
    # directory holding index.json and *.tar (or a glob / brace pattern of .tar files); or the same at an
    # http(s):// or other fsspec URL (s3://bucket/set, gs://...) or a pipe: command, read through its index.json.
    # Credentials come from the store's environment (AWS_*, ~/.netrc, ...): a URL holding one is refused.
    path: str = checked("", _no_credentials)
    weight: float = checked(1.0, at_least(0))  # mixing weight among training shard sets
    template: Optional[str] = checked(None, registered(registry.TEMPLATES))  # overrides data.template for this set


@dataclass
class RemoteConfig:
    """How shards at URLs are fetched (lm_mini.data.remote). Changing it never changes which samples a run sees."""

    retries: int = checked(3, at_least(0))  # after a failure (reset, 5xx, cut off), per shard; then shard_unavailable
    backoff_s: float = checked(1.0, at_least(0.0))  # wait before the first retry, doubled for each next one (<= 60 s, jitter)
    timeout_s: float = checked(60.0, positive)  # connecting, and waiting for the next bytes of a shard
    cache_dir: Optional[str] = None  # keep whole shards here for later epochs (None: stream every read)
    cache_max_gb: float = checked(100.0, positive)  # size bound of cache_dir: least recently used shards are deleted


@dataclass
class DataConfig:
    tokenizer: str = "data_shards/demo/tokenizer"  # local tokenizer directory (AutoTokenizer)
    template: str = checked("vicuna_v1", registered(registry.TEMPLATES))  # plain | vicuna_v1 | llama3 | llava_llama_3_1
    train: List[ShardSetConfig] = field(default_factory=list)
    val: List[ShardSetConfig] = field(default_factory=list)
    max_length: int = checked(2048, at_least(1))
    batch_size: int = checked(8, at_least(1))
    num_workers: int = checked(0, at_least(0))
    shuffle_buffer: int = 1000
    # Length-grouped batches (LLaVA's group_by_modality_length): each loader worker sorts every window of this many
    # batches by modality and length, then shuffles the batches; less padding, same samples per epoch. 0: off
    group_by_length: int = checked(0, at_least(0))
    # square: the CLIP processor's shortest-edge resize + centre crop (official default) | pad: padded to a square
    # with the mean colour (LLaVA-1.5) | squash: the whole image stretched to S x S (no official counterpart)
    aspect_mode: str = checked("square", one_of("square", "squash", "pad"))
    video_fps: float = checked(1.0, positive)  # frames a second sampled from a video (official inference: 1), <= max_frames
    max_frames: int = checked(64, at_least(1))
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    # Training videos: this many frames, the middle of as many equal segments (official LLaVA-Mini training: 8,
    # get_seq_frames); None: video_fps / max_frames as for held-out data and generation
    train_video_frames: Optional[int] = checked(None, at_least(1))


# --------------------------------------------------------------------------- training
@dataclass
class PartConfig:
    train: bool = True
    lr: Optional[float] = checked(None, at_least(0.0))  # None: train.lr


@dataclass
class PartsConfig:
    encoder: PartConfig = field(default_factory=lambda: PartConfig(train=False))
    projector: PartConfig = field(default_factory=PartConfig)
    compressor: PartConfig = field(default_factory=PartConfig)
    prefusion: PartConfig = field(default_factory=PartConfig)
    llm: PartConfig = field(default_factory=PartConfig)


@dataclass
class TrainConfig:
    stage: str = checked("finetune", one_of("pretrain", "finetune"))
    parts: PartsConfig = field(default_factory=PartsConfig)
    init_from: Optional[str] = None  # checkpoint, run directory or name, or model directory to start from
    lr: float = checked(1e-4, at_least(0.0))  # a negative rate would train backwards (gradient ascent) without a word
    weight_decay: float = checked(0.0, at_least(0.0))
    warmup_ratio: float = checked(0.03, at_least(0.0), at_most(1.0))
    max_grad_norm: float = checked(0.5, at_least(0.0))  # 0: no clipping
    accumulate_grad_batches: int = checked(1, at_least(1))
    max_epochs: int = 1
    max_steps: int = -1
    precision: str = checked("32-true", one_of(*PRECISIONS))  # bf16-mixed on GPU
    activation_checkpointing: bool = False
    strategy: str = checked("auto", one_of("auto", "ddp", "fsdp"))
    devices: Any = checked(1, _devices)
    num_nodes: int = checked(1, at_least(1))
    accelerator: str = "auto"
    checkpoint_every_n_steps: int = checked(100, at_least(1))
    keep_last_k: int = checked(2, at_least(1))  # 0 would keep no checkpoint: nothing to evaluate, export or init_from
    log_every_n_steps: int = checked(1, at_least(1))
    val_every_n_steps: Optional[int] = checked(None, at_least(1))
    sharded_checkpoint: bool = True  # fsdp: one shard per rank (False: gather one full file on rank 0)
    eval_at_end: bool = True  # greedy-generation exact match on data.val after training (rank 0)
    # Seconds a collective (and the start of a torchrun/srun job) waits for the other ranks: a rank that died or
    # hangs fails the job after this long. Longer than the slowest checkpoint save or end-of-training evaluation.
    dist_timeout_s: float = checked(600.0, positive)


@dataclass
class EvalConfig:
    max_new_tokens: int = checked(16, at_least(1))
    batch_size: int = checked(8, at_least(1))  # samples per generate() call; validation loss batches as data.batch_size
    metrics: List[str] = field(default_factory=lambda: ["exact_match"], metadata={"rules": (_metrics,)})
    max_samples: Optional[int] = checked(None, at_least(1))  # the first N samples of each data.val set
    # Generation (lm-mini eval flags --temperature --top-p --num-beams override): greedy by default, as the paper's eval.
    temperature: float = checked(0.0, at_least(0))  # > 0 samples (LLaVA's eval scripts: do_sample = temperature > 0)
    top_p: Optional[float] = checked(None, positive, at_most(1.0))  # nucleus sampling, with temperature > 0
    num_beams: int = checked(1, at_least(1))


@dataclass
class LoggingConfig:
    tracking_uri: Optional[str] = checked(None, _no_tracking_credentials)  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
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


def check_cross_fields(cfg: Any, source: str) -> None:
    """Rules between fields: a CUDA-only attention backend (``model.attn_implementation``,
    ``model.llm.attn_implementation``) with ``train.accelerator=cpu``."""
    if str(OmegaConf.select(cfg, "train.accelerator")).lower() == "cpu":
        for key in ("model.attn_implementation", "model.llm.attn_implementation"):
            if OmegaConf.select(cfg, key) in CUDA_ONLY_ATTENTION:
                raise ConfigError(f"{source}: bad value for config key '{key}': {OmegaConf.select(cfg, key)} runs on CUDA "
                                  "GPUs only and train.accelerator is cpu; use sdpa (or eager) on CPU")


def check_interpolations(cfg: DictConfig, source: str) -> None:
    """Resolve every ``${...}`` once: a bad one (unknown key, ``oc.env`` of an unset variable, ``oc.decode`` to the
    wrong type) is a :class:`ConfigError` naming the key, instead of OmegaConf's traceback from wherever the value
    is first read."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as e:
        key = _error_key(e)
        raw: Any = OmegaConf.to_container(cfg, resolve=False)
        for part in key.split(".") if key else []:
            raw = raw[int(part)] if isinstance(raw, list) else raw.get(part) if isinstance(raw, dict) else None
        raise ConfigError(f"{source}: config key '{key}': interpolation {raw}: {_first_line(e)}") from None


def validate(cfg: DictConfig, source: str = "config") -> DictConfig:
    """Refuse values their fields' rules refuse, naming the key (types are OmegaConf's job)."""
    check_interpolations(cfg, source)
    check_fields(cfg, Config, "", source)
    check_cross_fields(cfg, source)
    return cfg


# --------------------------------------------------------------------------- loading
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


def _error_key(err: OmegaConfBaseException) -> str:
    """The dotted key an OmegaConf error is about (``data.train[0].path`` -> ``data.train.0.path``)."""
    return (getattr(err, "full_key", None) or "").replace("[", ".").replace("]", "")


def _first_line(err: OmegaConfBaseException) -> str:
    """OmegaConf's message without the ``full_key: ... object_type=...`` lines it appends."""
    return str(getattr(err, "msg", None) or err).splitlines()[0]


def _explain(err: OmegaConfBaseException, schema: DictConfig, source: str, under: Optional[str] = None) -> ConfigError:
    """A ConfigError naming the key. ``under``: the overridden key, when the error's key is relative to it
    (an item of an assigned list reports only its own field)."""
    key = _error_key(err)
    if under and key and not (key == under or key.startswith(under + ".") or under.startswith(key)):
        node = OmegaConf.select(schema, under)
        key = f"{under}.{'*.' if isinstance(node, ListConfig) else ''}{key}"
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)):
        valid = _valid_keys(schema, key)
        leaf = key.split(".")[-1]
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'. Valid keys here: {', '.join(valid)}.{hint}")
    if isinstance(err, GrammarParseError):  # `${...` that does not parse, found when the YAML is read
        return ConfigError(f"{source}: config key '{key}': not a valid interpolation: {_first_line(err)}")
    if isinstance(err, ValidationError):
        return ConfigError(f"{source}: bad value for config key '{key}': {_first_line(err)}")
    return ConfigError(f"{source}: {_first_line(err)}")


# The presets a user's YAML may build on from anywhere (``defaults: [base.yaml, models/tiny.yaml]``): the
# repository's experiments/ folder beside the package (a source checkout or an editable install).
PRESETS_DIR = Path(__file__).resolve().parents[1] / "experiments"


def find_config(name: str, including: Path) -> Path:
    """A file named in the ``defaults:`` of ``including``: in its folder, else among the package's presets
    (:data:`PRESETS_DIR`); an absolute path as it is. The error says where it looked."""
    places = [Path(name)] if Path(name).is_absolute() else [including.parent / name, PRESETS_DIR / name]
    for candidate in places:
        if candidate.is_file():
            return candidate.resolve()
    looked = " and ".join(str(c.resolve()) for c in places)
    raise ConfigError(f"config file not found: {name} (listed in the defaults of {including}); looked for {looked}")


def _read_yaml(path: Path) -> DictConfig:
    """Read a YAML file, first merging the files listed in its ``defaults:`` (:func:`find_config`)."""
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
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML file paths (relative to this file, or presets)")
    merged = OmegaConf.create()
    for d in defaults:
        merged = OmegaConf.merge(merged, _read_yaml(find_config(str(d), path)))
    return OmegaConf.merge(merged, raw)


# Free-form mappings (HF model configs, compressor options, tags) accept any key.
_OPEN_DICTS = ("model.encoder.config", "model.compressor.options", "model.llm.config", "logging.tags")


def read_saved_config(path: Union[str, Path]) -> DictConfig:
    """A config lm_mini wrote (a run's resolved ``config.yaml``), for comparing with another: merged onto the schema
    (types checked) but its component names are not looked up, so reading it imports no ``module:Class`` it names
    (the run may be someone else's); the comparison itself then refuses what differs from the user's config."""
    try:
        return OmegaConf.merge(schema(), OmegaConf.load(Path(path)))
    except OmegaConfBaseException as e:
        raise _explain(e, schema(), str(path)) from None


def schema() -> DictConfig:
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    for key in _OPEN_DICTS:
        OmegaConf.set_struct(OmegaConf.select(cfg, key), False)
    return cfg


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
            raise ConfigError(f"{source}: cannot parse it: {_first_line(e)}") from None
        _check_list_index(cfg, key, source)
        try:
            # update, not merge of a dotlist: a dotlist turns "train.0" into a mapping key, which cannot merge into a list
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise _explain(e, schema(), source, under=key) from None
        validate(cfg, f"override '{item}'")
    return cfg


# The model keys a command that loads a saved model (eval, analyze) takes as overrides: the attention kernel is a
# run-time choice (every backend computes the same function); the rest of the model comes from its weights' config.
INFERENCE_MODEL_KEYS = ("model.attn_implementation", "model.llm.attn_implementation")


def saved_model_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """The :data:`INFERENCE_MODEL_KEYS` among ``key=value`` overrides for a saved model, with their values. Any other
    ``model.*`` key is refused (it would be silently ignored: the model is built from the config saved with it)."""
    found, other = {}, []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in INFERENCE_MODEL_KEYS:
            found[key] = OmegaConf.select(apply_overrides(schema(), [item]), key)
        elif key.startswith("model."):
            other.append(item)
    if other:
        raise ConfigError(f"{', '.join(other)}: a saved model is built from the config saved with its weights; of the "
                          f"model's keys only {' and '.join(INFERENCE_MODEL_KEYS)} may be given here (to change the "
                          f"model, train or fine-tune one: lm-mini train ... train.init_from=...)")
    return found


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
