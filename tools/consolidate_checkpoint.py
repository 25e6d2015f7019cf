#!/usr/bin/env python
"""Gather a sharded (FSDP2) checkpoint folder into one file that ``torch.load`` reads anywhere.

    python tools/consolidate_checkpoint.py runs/<exp>/<run>/checkpoints/step=00001000.ckpt [--out FILE]

The output is a Lightning checkpoint: ``state_dict`` (full tensors), ``optimizer_0`` (full optimizer
state keyed by parameter name), and the loop / scheduler / RNG / data-loader metadata. It is written
atomically next to the input as ``<name>.consolidated`` unless ``--out`` says otherwise. Its
``state_dict`` loads into an unsharded model (``train.init_from`` accepts either form).
Needs the whole model in CPU memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_mini.interop.checkpoint import load_checkpoint  # noqa: E402
from lm_mini.training.checkpoint_io import AtomicCheckpointIO  # noqa: E402


def consolidate(folder: Path, out: Path) -> Path:
    if not folder.is_dir() or not (folder / "meta.pt").is_file():
        raise SystemExit(f"{folder} is not a sharded checkpoint folder (no meta.pt)")
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or pass another --out")
    AtomicCheckpointIO().save_checkpoint(load_checkpoint(folder), out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="sharded checkpoint folder (step=XXXXXXXX.ckpt)")
    parser.add_argument("--out", type=Path, default=None, help="output file (default: <checkpoint>.consolidated)")
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint.with_name(args.checkpoint.name + ".consolidated")
    print(f"wrote {consolidate(args.checkpoint, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
