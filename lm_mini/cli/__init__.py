"""``lm-mini``: the command line, one module per command group.

    config      config show                        lm_mini.config
    shards      shards build / inspect / demo      lm_mini.data.shard_builder, shard_reader; lm_mini.recipes.demo
    train       train                              lm_mini.training.run
    evaluate    eval, score                        lm_mini.eval.evaluate, benchmark_runner, benchmarks.scoring
    sweeps      sweep, compare                     lm_mini.sweeps.grid, compare
    analysis    efficiency, analyze attention      lm_mini.eval.efficiency, attention
    interop     import, export, generate, chat     lm_mini.interop

A command parses its arguments, calls one library function, which returns a typed result (a dataclass) or
raises, and prints it; the library logs (``logging``) and never prints. A group module imports nothing heavy at
import: torch, Lightning, transformers and MLflow come in with the library function a command calls, so
``lm-mini --help``, ``config show`` and ``sweep --dry-run`` take well under a second (``tests/test_import_cycles.py``).
``python -m lm_mini.cli`` runs the same (torchrun and the sweeps start it so).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights never come from a hub here; fail fast, not after ~50 s

from lm_mini.cli import analysis, config, evaluate, interop, shards, sweeps, train  # noqa: E402
from lm_mini.cli.common import opt_ins  # noqa: E402

COMMAND_GROUPS = (config, shards, train, evaluate, sweeps, analysis, interop)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm-mini", description="Efficient LLaVA-Mini-style multimodal models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`train cfg --resume auto k=v`) are overrides like the ones before it
    overrides = [t for t in extra if "=" in t and not t.startswith("-")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    from lm_mini.config import ConfigError
    from lm_mini.quiet import quiet_libraries
    from lm_mini.trust import UntrustedCheckpoint

    quiet_libraries()

    try:
        with opt_ins(args):
            rc = args.func(args)
    except BrokenPipeError:  # output piped into `head` & co.: not an error
        sys.stderr.close()
        return 0
    except ConfigError as e:
        print(f"lm-mini: config error: {e}", file=sys.stderr)
        return 2
    except UntrustedCheckpoint as e:  # commands that report their own errors say so first; train, e.g., does not
        print(f"lm-mini: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)
