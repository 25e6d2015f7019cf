"""``lm-mini train CONFIG [key=value ...] [--resume auto|PATH]``: one stage (``lm_mini.training.run.train``).

Exit status: 0 finished; 2 a user error (no traceback); 1 a crash or a lost rank; 128 + N stopped by signal N
after its checkpoint (143 SIGTERM, 130 Ctrl-C, 138 SIGUSR1), so ``train && eval`` never evaluates an unfinished run.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from lm_mini.cli.common import add_config_args, add_trust_args


def add_commands(sub: Any) -> None:
    p = sub.add_parser("train", help="train a stage")
    add_config_args(p)
    p.add_argument("--resume", default=None, help="auto (newest complete checkpoint of this run) or a checkpoint path")
    add_trust_args(p, imports=False)  # --resume and train.init_from: the config is the user's own
    p.set_defaults(func=train)


def train(args: argparse.Namespace) -> int:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from lm_mini.config import load_config
    from lm_mini.training.distributed import StartFailed
    from lm_mini.training.run import USER_ERRORS, LostRank, train as train_stage

    cfg = load_config(args.config, args.overrides)
    try:
        result = train_stage(cfg, resume=args.resume)
    except USER_ERRORS as e:
        print(f"lm-mini: {e}", file=sys.stderr)
        return 2
    except StartFailed as e:  # another rank's copy of rank 0's error, which rank 0 prints in full
        print(f"lm-mini: rank {rank_zero_only.rank}: {e}", file=sys.stderr)
        return e.exit_code
    except LostRank as e:
        print(f"lm-mini: {e}", file=sys.stderr, flush=True)
        return 1
    if result.preempted:
        signum = result.stopped_by or signal.SIGTERM  # a rank the signal did not reach stopped with the others
        if rank_zero_only.rank == 0:
            print(f"lm-mini: stopped by a signal ({signal.Signals(signum).name}) at step {result.global_step}, before the "
                  f"run's end; continue with --resume auto (checkpoints in {result.run.checkpoints}); exit status "
                  f"{128 + int(signum)}", flush=True)
        return 128 + int(signum)
    if rank_zero_only.rank == 0:
        report(result)
    return 0


def report(result: Any) -> None:
    """What a finished :class:`~lm_mini.training.run.TrainResult` tells the user."""
    from lm_mini.data.errors import describe_skips
    from lm_mini.data.remote import redact
    from lm_mini.tracking_server import how_to_view
    from lm_mini.training.tracking import PENDING_TAG

    print(f"lm-mini: finished at step {result.global_step}; run directory {result.run.dir}")
    if result.skipped is not None:  # the data module's counts, as logged to MLflow (data/skipped/<reason>)
        print(f"lm-mini: training data: {describe_skips(result.skipped)}")
    if result.eval:
        e = result.eval
        print(f"lm-mini: held-out accuracy (exact match, greedy): {e['accuracy']:.3f} on {e['n']} samples; "
              f"majority-answer baseline: {e['majority_baseline']:.3f}")
        if e.get("scores"):
            shown = ", ".join(f"{k.removeprefix('all/')} {v:.3f}" for k, v in e["scores"].items() if k.startswith("all/") and k != "all/n")
            print(f"lm-mini: held-out scores: {shown}")
        if e.get("skipped"):
            print(f"lm-mini: held-out data: {describe_skips(e['skipped'])}")
    print(f"lm-mini: MLflow run {result.mlflow_run_id} in {redact(result.tracking_uri)} "
          f"(view: {how_to_view(result.tracking_uri, result.mlflow_experiment_id, result.mlflow_run_id)})")
    if result.pending_metrics:
        state = f"is tagged {PENDING_TAG}={result.pending_metrics}" if result.mlflow_marked else "shows RUNNING"
        print(f"lm-mini: {result.pending_metrics} steps of metrics did not reach the MLflow store: they are in "
              f"{result.run.pending_file} and the MLflow run {state}; to send them, run the same command again with "
              f"--resume auto train.eval_at_end=false once the store answers")
    elif not result.mlflow_marked:
        print("lm-mini: the MLflow store did not answer at the end: every metric reached it, but the MLflow run shows RUNNING")
