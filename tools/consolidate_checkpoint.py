#!/usr/bin/env python
"""Gather a sharded (FSDP2) checkpoint folder into one file that ``torch.load`` reads anywhere.

    python tools/consolidate_checkpoint.py runs/<exp>/<run>/checkpoints/step=00001000.ckpt [--out FILE]

The output is a Lightning checkpoint: ``state_dict`` (full tensors), ``optimizer_0`` (full optimizer
state keyed by parameter name), and the loop / scheduler / RNG / data-loader metadata. It is written
atomically next to the input as ``<name>.consolidated`` unless ``--out`` says otherwise. Its
``state_dict`` loads into an unsharded model (``train.init_from`` accepts either form).
Needs the whole model in CPU memory. A folder holding anything but tensors, numbers, strings and containers
is refused, as everywhere in lm_mini, unless ``--trust-checkpoint`` (``lm_mini/trust.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_mini.cli.common import add_trust_args, opt_ins  # noqa: E402


def consolidate(folder: Path, out: Path) -> Path:
    from lm_mini.interop.checkpoint import load_checkpoint
    from lm_mini.training.checkpoint_io import AtomicCheckpointIO

    if not folder.is_dir() or not (folder / "meta.pt").is_file():
        raise FileNotFoundError(f"{folder} is not a sharded checkpoint folder (no meta.pt)")
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or pass another --out")
    AtomicCheckpointIO().save_checkpoint(load_checkpoint(folder), out)
    return out


def main(argv=None) -> int:
    """Exit 0, or 2 with one line naming the problem (a refused checkpoint: what it holds and the opt-in)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="sharded checkpoint folder (step=XXXXXXXX.ckpt)")
    parser.add_argument("--out", type=Path, default=None, help="output file (default: <checkpoint>.consolidated)")
    add_trust_args(parser, imports=False)
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint.with_name(args.checkpoint.name + ".consolidated")
    try:
        with opt_ins(args):
            written = consolidate(args.checkpoint, out)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # UntrustedCheckpoint is a ValueError
        print(f"consolidate_checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
