#!/usr/bin/env python
"""Convert LLaVA's data sets to WebDataset shards (same as ``lm-mini shards build``).

Examples (paths as in the LLaVA repository's data layout)::

    # stage 1: 558K captions
    python tools/convert_llava.py --json blip_laion_cc_sbu_558k.json --media-root LLaVA-Pretrain/images \
        --out shards/pretrain558k --workers 16
    # stage 2: 665K instruction mix (image, multi-turn and text-only records)
    python tools/convert_llava.py --json llava_v1_5_mix665k.json --media-root playground/data \
        --out shards/mix665k --workers 16
    # video instructions (records with "video": "path/to/clip.mp4")
    python tools/convert_llava.py --json video_instruct.json --media-root videos --out shards/video --workers 16

An interrupted conversion is finished with ``--resume``; a finished output directory is never overwritten.
Skipped records are listed by reason in ``<out>/skipped.json``.
"""
import sys

from lm_mini.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "build", *sys.argv[1:]]))
