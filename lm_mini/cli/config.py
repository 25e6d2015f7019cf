"""``lm-mini config show CONFIG [key=value ...]``: the resolved config, as the run would record it."""
from __future__ import annotations

import argparse
from typing import Any

from lm_mini.cli.common import add_config_args


def add_commands(sub: Any) -> None:
    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("show", help="print the resolved config")
    add_config_args(p)
    p.set_defaults(func=show)


def show(args: argparse.Namespace) -> int:
    from lm_mini.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
