"""What several commands share: argument types, the config / override arguments, the opt-ins of commands that
open other people's checkpoints and directories. Imports nothing heavy (``--help`` stays fast)."""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Callable, Iterator


def at_least(low: float, kind: type = int, inclusive: bool = True) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` number ``>= low`` (``> low`` when not ``inclusive``)."""
    def parse(text: str) -> Any:
        value = kind(text)
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text}: expected {'>=' if inclusive else '>'} {low}")
        return value
    return parse


def device(text: str) -> str:
    """An argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import torch

    try:
        found = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text}: not a device ({e})") from None
    if found.type == "cuda" and not (torch.cuda.is_available() and (found.index or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def device_or_auto(text: str) -> str:
    """An argparse type: ``auto`` or a device this machine has (see :func:`device`)."""
    return text if text == "auto" else device(text)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (e.g. experiments/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.compressor.grid=4")


def add_trust_args(p: argparse.ArgumentParser, imports: bool = True) -> None:
    """The opt-ins of a command that opens checkpoints (and model/run directories): see lm_mini/trust.py."""
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read checkpoints that hold more than tensors, numbers and strings: RUNS ARBITRARY CODE "
                        "FROM THE FILE (only for files from a source you trust)")
    if imports:
        p.add_argument("--allow-import", action="append", default=[], metavar="MODULE:CLASS",
                       help="let a model or run directory's config import this component (package.module:Class, "
                            "or a module, or '*'): importing runs that package's code (repeatable)")


@contextlib.contextmanager
def opt_ins(args: argparse.Namespace) -> Iterator[None]:
    """The command's opt-ins as environment variables for its duration (processes it starts inherit them)."""
    from lm_mini.trust import ALLOW_IMPORTS_ENV, TRUST_CHECKPOINTS_ENV

    saved = {k: os.environ.get(k) for k in (TRUST_CHECKPOINTS_ENV, ALLOW_IMPORTS_ENV)}
    if getattr(args, "trust_checkpoint", False):
        os.environ[TRUST_CHECKPOINTS_ENV] = "1"
    if getattr(args, "allow_import", None):
        os.environ[ALLOW_IMPORTS_ENV] = ",".join(filter(None, [saved[ALLOW_IMPORTS_ENV], *args.allow_import]))
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.update({key: value})


def error(command: str, e: BaseException) -> str:
    """``lm-mini <command>: <message>`` of a user error (a KeyError's message without its quotes)."""
    return f"lm-mini {command}: {e.args[0] if isinstance(e, KeyError) and e.args else e}"
