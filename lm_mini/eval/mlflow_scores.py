"""Evaluation scores into the MLflow run a model came from, under names MLflow accepts.

MLflow takes metric names of letters, digits, ``_ - . /`` and spaces (colons too, except on Windows), at
most 250 characters, that do not change under ``posixpath.normpath``. Shard set names
(``val#2``, ``gqa/val``), several sets joined, benchmark labels and question types are user data, so every
name goes through :func:`metric_name` (``eval/A+B/vqa_accuracy`` was refused and lost a whole evaluation).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

_NOT_ALLOWED = re.compile(r"[^\w.\- ]")  # within one segment; "/" separates segments
MAX_NAME = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH


def metric_name(*parts: Any) -> str:
    """``parts`` joined with "/" into a valid MLflow metric name: characters MLflow refuses become "_",
    empty segments are dropped, "." / ".." segments become "_" (they would normalise to another name)."""
    segments = []
    for part in parts:
        for seg in str(part).split("/"):
            seg = _NOT_ALLOWED.sub("_", seg).strip()
            if seg in (".", ".."):
                seg = "_"
            if seg:
                segments.append(seg)
    name = "/".join(segments) or "_"
    if len(name) > MAX_NAME:
        raise ValueError(f"metric name longer than {MAX_NAME} characters: {name[:60]}...")
    return name


def log_scores(info: Mapping[str, Any], scores: Mapping[str, float], artifacts: Iterable[Path] = (),
               artifact_path: str = "eval") -> Optional[str]:
    """Log ``scores`` (already full metric names) to the MLflow run of ``info`` (a source's ``run_id`` and
    ``tracking_uri``, at its ``global_step``), plus ``artifacts``; returns the run id, None when the source
    has no MLflow run. Names are checked before anything is logged, so a bad one logs nothing."""
    run_id, uri = info.get("run_id"), info.get("tracking_uri")
    if not run_id or not uri:
        return None
    from mlflow.entities import Metric

    from lm_mini.tracking_store import mlflow_client

    bad = [k for k in scores if metric_name(k) != k]
    if bad:
        raise ValueError(f"not valid MLflow metric names: {', '.join(bad[:5])} (build them with metric_name)")
    import time

    client = mlflow_client(uri)  # the source's store: never made anew here
    step, now = int(info.get("global_step", 0) or 0), int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in scores.items()]
    for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics a call
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    return run_id
