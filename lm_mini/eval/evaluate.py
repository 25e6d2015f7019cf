"""Evaluation on shard sets: ``lm-mini eval (RUN|CHECKPOINT|MODEL_DIR) --data SHARDS [...]`` and the held-out
evaluation at the end of training (``lm_mini.training.run`` calls :func:`evaluate` and :func:`score_other_metrics`).

Generation runs in Lightning's test loop (:class:`lm_mini.eval.generation.GenerationEval`: batched, KV cache);
the predictions are then scored with the requested ``torchmetrics`` metrics against the gold answer of each
sample, or against the record's own fields where the benchmark has them:

- ``answers``: a list of annotator answers (VQAv2: 10) -> ``vqa_accuracy`` / ``exact_match`` use all;
- ``options``: option texts of a multiple-choice question -> ``multiple_choice`` (LLaVA's ScienceQA rule) or
  ``multiple_choice_lenient`` reads the letter;
- ``question_type``: scores are also broken down per type.

A sample with no reference (no answer turn and no ``answers``) is left out of every score and reported
(count and ids); ``eval.max_samples`` takes the first N samples of *each* shard set. Predictions go to a JSONL
file, scores to stdout (JSON with ``--json``) and to the MLflow run the checkpoint came from: one set as
``eval/<set>/<metric>``, several sets each as ``eval/<set>/<metric>`` and pooled as ``eval/all/<metric>``.

LLaVA benchmark files (question files, official scorers, answers files) are the benchmark runner's
(``lm-mini eval SOURCE --benchmark NAME``, :mod:`lm_mini.eval.benchmark_runner`); the command is ``lm_mini/cli/evaluate.py``.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from lm_mini.eval.metrics import build_metric

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s", re.MULTILINE)


def _options(record: Mapping[str, Any]) -> Any:
    """Option texts of a multiple-choice record, else the number of lettered options in its question."""
    if isinstance(record.get("options"), list):
        return record["options"]
    question = " ".join(t.get("value", "") for t in record.get("conversations", []) if t.get("from") in ("human", "user"))
    letters = _OPTION_LINE.findall(question)
    return len(letters) if letters else 4


def has_reference(prediction: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
    """A sample can be scored when its record has an answer turn (``gold``) or annotator ``answers``."""
    answers = record.get("answers")
    return bool(str(prediction.get("gold", "")).strip()) or (isinstance(answers, list) and any(str(a).strip() for a in answers))


def unanswered(predictions: Sequence[Mapping[str, Any]], records: Mapping[str, Mapping[str, Any]]) -> List[Any]:
    """Ids of the predictions whose sample has no reference answer (left out of every score)."""
    return [p["id"] for p in predictions if not has_reference(p, records.get(p["id"], {}))]


def set_name(sample_id: str) -> str:
    """The shard set of a data-module sample id ``<set name>/<key>``."""
    return sample_id.rpartition("/")[0]


def score(predictions: Sequence[Mapping[str, Any]], records: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> Dict[str, Any]:
    """Scores of ``predictions`` ({id, prediction, gold}) under each metric name: overall (``all/``), per question
    type (``type/<t>/``), and per shard set (``set/<name>/``) when they come from several (ids are
    ``<set name>/<key>``); ``<group>/n`` counts the scored samples. Samples without a reference are not scored
    (see :func:`unanswered`): a missing answer is not an empty answer."""
    excluded = set(unanswered(predictions, records))
    scored = [p for p in predictions if p["id"] not in excluded]
    groups: Dict[str, List[Mapping[str, Any]]] = defaultdict(list)
    several_sets = len({set_name(p["id"]) for p in predictions}) > 1
    for p in scored:
        groups["all"].append(p)
        qtype = records.get(p["id"], {}).get("question_type")
        if qtype is not None:
            groups[f"type/{qtype}"].append(p)
        if several_sets:
            groups[f"set/{set_name(p['id'])}"].append(p)
    if several_sets:  # a set whose every sample lacks a reference still shows up, with n 0
        for p in predictions:
            groups.setdefault(f"set/{set_name(p['id'])}", [])
    groups.setdefault("all", [])
    out: Dict[str, Any] = {}
    for group, preds in groups.items():
        out[f"{group}/n"] = len(preds)
        if not preds:
            continue
        for name in metrics:
            # the predictions are all here (every rank's, gathered): a rank that scores them alone must not wait
            # for the others in a process-group sync (torchmetrics syncs at compute by default)
            metric = build_metric(name, sync_on_compute=False)
            texts = [p["prediction"] for p in preds]
            recs = [records.get(p["id"], {}) for p in preds]
            golds = [p["gold"] for p in preds]
            kind = getattr(metric, "target_kind", "answers")  # what the metric scores against (lm_mini.eval.metrics)
            if kind == "answers":
                metric.update(texts, [r.get("answers") or [g] for r, g in zip(recs, golds)])
            elif kind == "choice":
                metric.update(texts, golds, [_options(r) for r in recs])
            else:  # yes/no (pope): on the yes/no questions only (a mixed set still scores its other metrics)
                yes_no = [i for i, g in enumerate(golds) if g.strip().lower() in ("yes", "no")]
                if not yes_no:
                    continue
                metric.update([texts[i] for i in yes_no], [golds[i] for i in yes_no])
            value = metric.compute()
            if isinstance(value, dict):  # pope -> pope_accuracy, pope_f1, ...
                out.update({f"{group}/{name}_{k}": float(v) for k, v in value.items()})
            else:
                out[f"{group}/{name}"] = float(value)
    return out


def records_by_id(shard_dirs: Sequence[str], remote: Any = None) -> Dict[str, Dict[str, Any]]:
    """The records of the evaluated shard sets under the data module's sample ids. ``shard_dirs``: local paths or
    remote shard sets (URLs, ``pipe:``), read with ``remote`` (``data.remote``'s :class:`RemoteOptions`)."""
    from lm_mini.data.errors import SkipCounter
    from lm_mini.data.shard_reader import find_shards, iter_raw_samples
    from lm_mini.data.streaming import shard_set_names

    out = {}
    for path, name in zip(shard_dirs, shard_set_names(shard_dirs)):
        for s in iter_raw_samples(find_shards(path, remote)[0], SkipCounter(), remote):
            out[f"{name}/{s.key}"] = s.record
    return out


def check_shard_sets(data: Sequence[str], remote: Any) -> None:
    """Every ``--data`` set is readable now, before any weights are loaded: a local shard directory, tar or pattern,
    or a remote set (``http(s)://``, ``s3://`` and other fsspec URLs, ``pipe:``) whose ``index.json`` answers with
    the environment's credentials, as ``lm-mini train`` checks its sets. Errors name the set (URLs redacted)."""
    from lm_mini.data.remote import redact
    from lm_mini.data.shard_reader import find_shards

    for d in data:
        try:
            counts = find_shards(d, remote)[1]
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"--data {redact(str(d))}: {e}") from e
        if counts is not None and sum(counts) == 0:
            raise FileNotFoundError(f"--data {redact(str(d))}: the set holds no samples (its index.json says 0)")


# --------------------------------------------------------------------------- the held-out evaluation (test loop)
def evaluate(trainer: Any, module: Any, datamodule: Any, cfg: Any, records: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """Generation on ``data.val`` (Lightning's test loop, every rank its share; ``module`` is a
    :class:`~lm_mini.eval.generation.GenerationEval`); exact match against the gold answers of the samples
    that have one, next to the majority-answer baseline of the same samples. ``eval.max_samples``: the first
    N of each set. ``records``: ``data.val``'s records by sample id (:func:`records_by_id`).

    Returns ``accuracy`` (exact match), ``n`` (samples scored), ``per_set`` ({set: samples scored}),
    ``excluded`` ({n, ids}: samples without a reference), ``skipped``, ``majority_baseline``, ``predictions``."""
    from lm_mini.data.datamodule import LmMiniDataModule
    from lm_mini.data.errors import sum_over_ranks
    from lm_mini.eval.generation import GenerationOptions, stop_token_ids

    tokenizer = datamodule.processor.tokenizer
    template = cfg.data.val[0].template or cfg.data.template
    options = GenerationOptions.from_config(cfg.eval)
    ours = isinstance(datamodule, LmMiniDataModule)
    # our loader takes the first eval.max_samples of each set; a caller's own data module batches as it likes,
    # so the test loop stops after eval.max_samples samples in all
    module.start_generation_eval(tokenizer, stop_token_ids(tokenizer, template), options, None if ours else cfg.eval.max_samples)
    loader = (datamodule.val_dataloader(batch_size=cfg.eval.batch_size, max_samples_per_set=cfg.eval.max_samples) if ours
              else datamodule.val_dataloader())
    trainer.test(module, dataloaders=loader, verbose=False)
    skips = getattr(loader, "skips", None)  # ours counts what it skipped; the evaluated samples are the rest
    skipped = sum_over_ranks(dict(skips or {}), trainer.strategy.reduce if trainer.world_size > 1 else None, module.device)
    examples = module.gathered_examples()  # every rank's predictions: the scores and eval.json cover them all
    gathered = [(e["id"], e["gold"]) for e in examples]
    evaluated = {sid: gold for sid, gold in gathered if has_reference({"gold": gold}, records.get(sid, {}))}
    excluded = [sid for sid, gold in gathered if sid not in evaluated]
    top, hits = Counter(g for g in evaluated.values() if g).most_common(1)[0] if any(evaluated.values()) else ("", 0)
    exact = trainer.callback_metrics.get("eval/exact_match")
    result = {"accuracy": float(exact) if exact is not None else float("nan"), "n": len(evaluated),
              "per_set": dict(Counter(set_name(str(sid)) for sid in evaluated)),
              "excluded": {"n": len(excluded), "ids": excluded},
              "majority_baseline": hits / max(1, len(evaluated)), "majority_answer": top,
              "skipped": skipped, "predictions": examples}
    per_type = majority_per_question_type(records, set(evaluated))
    if per_type is not None:  # records that say their question type: the stronger, per-type majority guess
        result["majority_baseline"] = max(result["majority_baseline"], per_type)
    return result


def score_other_metrics(result: Dict[str, Any], cfg: Any, logger: Any, step: int, records: Mapping[str, Mapping[str, Any]]) -> None:
    """``eval.metrics`` besides exact match (logged by the test loop) on the predictions, into ``result["scores"]``
    and MLflow as ``eval/<metric>`` and ``eval/type/<question type>/<metric>`` (names made valid for MLflow)."""
    from lm_mini.eval.mlflow_scores import metric_name

    others = [m for m in cfg.eval.metrics if m != "exact_match"]
    if not others or not result["predictions"]:
        return
    scores = score(result["predictions"], records, others)
    result["scores"] = scores
    logger.log_metrics({metric_name("eval", k.removeprefix("all/")): v for k, v in scores.items() if not k.endswith("/n")}, step=step)


def majority_per_question_type(records: Mapping[str, Mapping[str, Any]], sample_ids: set) -> Optional[float]:
    """Accuracy, on the evaluated samples, of always giving the most frequent answer of each
    ``question_type`` (None when the records do not say their type)."""
    from lm_mini.eval.baseline import majority_baseline

    evaluated = [r for sid, r in records.items() if sid in sample_ids]
    if not evaluated or not all("question_type" in r for r in evaluated):
        return None
    return float(majority_baseline(evaluated)["overall"]["accuracy"])


# --------------------------------------------------------------------------- lm-mini eval --data
def mlflow_scores(scores: Mapping[str, float], set_names: Sequence[str]) -> Dict[str, float]:
    """:func:`score`'s keys as MLflow metric names: one set -> ``eval/<set>/<metric>``; several sets -> each set
    as ``eval/<set>/<metric>`` and the pooled scores as ``eval/all/<metric>``; per type ``.../type/<t>/<metric>``."""
    from lm_mini.eval.mlflow_scores import metric_name

    out = {}
    for key, value in scores.items():
        if key.endswith("/n"):
            continue
        if key.startswith("set/"):
            out[metric_name("eval", key.removeprefix("set/"))] = value
        elif len(set_names) == 1:
            out[metric_name("eval", set_names[0], key.removeprefix("all/"))] = value
        else:
            out[metric_name("eval", key)] = value
    return out


@dataclass
class ShardEvaluation:
    """What :func:`evaluate_source` scored and where it put things (``lm-mini eval --data ... --json`` prints it)."""

    scores: Dict[str, Any]  # :func:`score`'s keys
    majority_baseline: float
    predictions_file: str
    mlflow_run_id: Optional[str]
    n: int  # samples scored
    per_set: Dict[str, int]  # shard set -> samples scored
    excluded: Dict[str, Any]  # {n, ids}: samples without a reference answer
    skipped: Dict[str, int]  # samples the loader skipped, per reason

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def evaluate_source(source_path: str, data: Sequence[str], metrics: Optional[Sequence[str]] = None, out: Optional[str] = None,
                    overrides: Sequence[str] = (), device: str = "auto", log_mlflow: bool = True) -> ShardEvaluation:
    """Evaluate a model directory / run / checkpoint on shard sets; returns scores and where things went.
    ``metrics``: default ``eval.metrics`` of the model's config (after ``overrides``)."""
    import lightning as L
    from omegaconf import OmegaConf

    from lm_mini.config import ShardSetConfig, apply_overrides, saved_model_overrides, schema
    from lm_mini.data.datamodule import build_datamodule
    from lm_mini.data.streaming import shard_set_names
    from lm_mini.eval.generation import GenerationModule
    from lm_mini.eval.mlflow_scores import log_scores
    from lm_mini.interop.export import load_model
    from lm_mini.runs import resolve_source

    from lm_mini.quiet import quiet_libraries

    quiet_libraries()
    from lm_mini.data.remote import RemoteOptions, is_remote

    for d in data:  # a mistyped local path fails first, before any config is read
        if not is_remote(d) and not Path(d).exists() and not any(c in str(d) for c in "*?[{"):
            raise FileNotFoundError(f"--data {d}: no such shard directory")
    source = resolve_source(source_path)  # the config only: the sets are checked before the weights are read
    remote = RemoteOptions.from_config(getattr(apply_overrides(OmegaConf.merge(schema(), source.cfg), overrides).data,
                                               "remote", None))
    check_shard_sets(data, remote)
    model, cfg = load_model(source, backends=saved_model_overrides(overrides))
    cfg = OmegaConf.merge(schema(), cfg)  # validated again, with every default filled in
    cfg.data.val = [ShardSetConfig(path=str(d)) for d in data]
    cfg = apply_overrides(cfg, overrides)
    metrics = list(metrics or cfg.eval.metrics)
    for name in metrics:
        build_metric(name)  # an unknown name fails now, not after every answer was generated
    from lm_mini.eval.mlflow_scores import metric_name

    names = shard_set_names(list(data))
    datamodule = build_datamodule(cfg)
    trainer = L.Trainer(accelerator="cpu" if device == "cpu" else "auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    records = records_by_id(data, remote)
    result = evaluate(trainer, GenerationModule(model), datamodule, cfg, records)
    file_name = metric_name("+".join(name if is_remote(d) else Path(d).name for d, name in zip(data, names))).replace("/", "_")
    out_path = Path(out) if out else (source.run_dir or source.path) / "eval" / f"{file_name}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:  # first: the generated answers are kept whatever the scoring says
        for p in result["predictions"]:
            rec = records.get(p["id"], {})
            extra = {k: rec[k] for k in ("id", "question_type") if k in rec}  # the record's own id, of its JSON type
            f.write(json.dumps({**p, **({"record_id": extra.pop("id")} if "id" in extra else {}), **extra}) + "\n")
    scores = score(result["predictions"], records, metrics)
    per_set = {name: int(scores.get(f"set/{name}/n", scores["all/n"] if len(names) == 1 else 0)) for name in names}
    run_id = log_scores(source.info, mlflow_scores(scores, names), [out_path]) if log_mlflow else None
    return ShardEvaluation(scores, result["majority_baseline"], str(out_path), run_id, scores["all/n"], per_set,
                           result["excluded"], result["skipped"])
