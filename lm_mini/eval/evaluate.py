"""``lm-mini eval (RUN|CHECKPOINT|MODEL_DIR) --data SHARDS [...]``: greedy generation on shards, scored.

Generation runs in Lightning's test loop (``training.run.evaluate``: batched, KV cache); the
predictions are then scored with the requested ``torchmetrics`` metrics against the gold answer of
each sample, or against the record's own fields where the benchmark has them:

- ``answers``: a list of annotator answers (VQAv2: 10) -> ``vqa_accuracy`` / ``exact_match`` use all;
- ``options``: option texts of a multiple-choice question -> ``multiple_choice`` extracts the letter;
- ``question_type``: scores are also broken down per type.

Predictions go to a JSONL file, scores to stdout (and JSON with ``--json``) and to the MLflow run the
checkpoint came from (``eval/<data>/<metric>``).
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from lm_mini.data.errors import describe_skips
from lm_mini.eval.metrics import POPEMetrics, build_metric

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s", re.MULTILINE)


def _options(record: Mapping[str, Any]) -> Any:
    """Option texts of a multiple-choice record, else the number of lettered options in its question."""
    if isinstance(record.get("options"), list):
        return record["options"]
    question = " ".join(t.get("value", "") for t in record.get("conversations", []) if t.get("from") in ("human", "user"))
    letters = _OPTION_LINE.findall(question)
    return len(letters) if letters else 4


def score(predictions: Sequence[Mapping[str, Any]], records: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> Dict[str, Any]:
    """Scores of ``predictions`` ({id, prediction, gold}) under each metric name: overall, per question type,
    and per shard set (``set/<name>/...``) when they come from several (ids are ``<set name>/<key>``)."""
    groups: Dict[str, List[Mapping[str, Any]]] = defaultdict(list)
    several_sets = len({p["id"].rpartition("/")[0] for p in predictions}) > 1
    for p in predictions:
        groups["all"].append(p)
        qtype = records.get(p["id"], {}).get("question_type")
        if qtype is not None:
            groups[f"type/{qtype}"].append(p)
        if several_sets:
            groups[f"set/{p['id'].rpartition('/')[0]}"].append(p)
    out: Dict[str, Any] = {}
    for group, preds in groups.items():
        for name in metrics:
            metric = build_metric(name)
            texts = [p["prediction"] for p in preds]
            recs = [records.get(p["id"], {}) for p in preds]
            golds = [p["gold"] for p in preds]
            if name in ("vqa_accuracy", "exact_match"):
                metric.update(texts, [r.get("answers") or [g] for r, g in zip(recs, golds)])
            elif name == "multiple_choice":
                metric.update(texts, golds, [_options(r) for r in recs])
            else:  # pope: on the yes/no questions only (a mixed set still scores its other metrics)
                yes_no = [i for i, g in enumerate(golds) if g.strip().lower() in ("yes", "no")]
                if not yes_no:
                    continue
                metric.update([texts[i] for i in yes_no], [golds[i] for i in yes_no])
            value = metric.compute()
            if isinstance(metric, POPEMetrics):
                out.update({f"{group}/pope_{k}": float(v) for k, v in value.items()})
            else:
                out[f"{group}/{name}"] = float(value)
        out[f"{group}/n"] = len(preds)
    return out


def records_by_id(shard_dirs: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """The records of the evaluated shard sets under the data module's sample ids."""
    from lm_mini.data.errors import SkipCounter
    from lm_mini.data.shards import find_shards, iter_raw_samples
    from lm_mini.data.streaming import shard_set_names

    out = {}
    for path, name in zip(shard_dirs, shard_set_names(shard_dirs)):
        for s in iter_raw_samples(find_shards(path)[0], SkipCounter()):
            out[f"{name}/{s.key}"] = s.record
    return out


def _log_to_mlflow(info: Mapping[str, Any], scores: Mapping[str, Any], prefix: str, artifact: Path) -> Optional[str]:
    """Log scores to the checkpoint's MLflow run (if it has one); returns the run id."""
    run_id, uri = info.get("run_id"), info.get("tracking_uri")
    if not run_id or not uri:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    step = int(info.get("global_step", 0) or 0)
    for key, value in scores.items():
        if not key.endswith("/n"):
            client.log_metric(run_id, f"eval/{prefix}/{key.removeprefix('all/')}", float(value), step=step)
    client.log_artifact(run_id, str(artifact), artifact_path="eval")
    return run_id


def evaluate_source(source_path: str, data: Sequence[str], metrics: Optional[Sequence[str]] = None, out: Optional[str] = None,
                    overrides: Sequence[str] = (), device: str = "auto", log_mlflow: bool = True) -> Dict[str, Any]:
    """Evaluate a model directory / run / checkpoint on shard sets; returns scores and where things went.
    ``metrics``: default ``eval.metrics`` of the model's config (after ``overrides``)."""
    import lightning as L

    from omegaconf import OmegaConf

    from lm_mini.config import ShardSetConfig, apply_overrides, schema
    from lm_mini.data.datamodule import build_datamodule
    from lm_mini.interop.export import load_model, resolve_source
    from lm_mini.training.module import LmMiniModule
    from lm_mini.training.run import evaluate

    for d in data:
        if not Path(d).exists():
            raise FileNotFoundError(f"--data {d}: no such shard directory")
    source = resolve_source(source_path)
    model, cfg = load_model(source)
    cfg = OmegaConf.merge(schema(), cfg)  # validated again, with every default filled in
    cfg.data.val = [ShardSetConfig(path=str(d)) for d in data]
    cfg = apply_overrides(cfg, overrides)
    metrics = list(metrics or cfg.eval.metrics)
    for name in metrics:
        build_metric(name)  # an unknown name fails now, not after every answer was generated
    datamodule = build_datamodule(cfg)
    module = LmMiniModule(cfg, model_factory=lambda _: model)
    trainer = L.Trainer(accelerator="cpu" if device == "cpu" else "auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    records = records_by_id(data)
    result = evaluate(trainer, module, datamodule, cfg, records)
    name = "+".join(Path(d).name for d in data)
    out_path = Path(out) if out else (source.run_dir or source.path) / "eval" / f"{name}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:  # first: the generated answers are kept whatever the scoring says
        for p in result["predictions"]:
            rec = records.get(p["id"], {})
            f.write(json.dumps({**p, **({"question_type": rec["question_type"]} if "question_type" in rec else {})}) + "\n")
    scores = score(result["predictions"], records, metrics)
    run_id = _log_to_mlflow(source.info, scores, name, out_path) if log_mlflow else None
    return {"scores": scores, "majority_baseline": result["majority_baseline"], "predictions_file": str(out_path),
            "mlflow_run_id": run_id, "n": result["n"], "skipped": result["skipped"]}


def cli_eval(args: Any) -> int:
    # `--data A B key=value` / `--metric m key=value`: argparse hands the overrides to the option; take them back.
    data = [d for d in args.data if "=" not in d or Path(d).exists()]
    metrics = [m for m in args.metric or [] if "=" not in m] or None  # None: eval.metrics
    overrides = list(args.overrides) + [d for d in args.data if d not in data] + [m for m in args.metric or [] if "=" in m]
    try:
        result = evaluate_source(args.source, data, metrics, args.out, overrides, args.device, not args.no_mlflow)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"lm-mini eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s = result["scores"]
    print(f"evaluated {result['n']} samples; majority-answer baseline {result['majority_baseline']:.3f}")
    if result["skipped"]:
        print(f"data: {describe_skips(result['skipped'])}")
    width = max(len(k) for k in s)
    for key in sorted(s, key=lambda k: (k != "all/n" and not k.startswith("all/"), k)):
        value = s[key]
        print(f"  {key.ljust(width)}  {value if key.endswith('/n') else f'{value:.4f}'}")
    print(f"predictions: {result['predictions_file']}")
    if result["mlflow_run_id"]:
        print(f"scores logged to MLflow run {result['mlflow_run_id']}")
    return 0
