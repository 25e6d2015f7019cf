"""Efficiency of LLaVA-1.5-7B, LLaVA-Mini (Vicuna-7B, C=1, depth 4) and the LLaVA-Mini release (Llama-3.1-8B),
each next to its LLaVA-1.5 baseline and to the paper's figures.

    python benchmarks/efficiency.py [--markdown] [--json FILE] [--latency-device cuda]

Everything is counted on the ``meta`` device (no weights; a few minutes on 2 CPU cores): one image
with 64 text tokens, and videos of 64 and 1,024 frames. ``--latency-device`` also times prefill and
decode with random weights on that device (a GPU: the 7B/8B models do not fit a laptop).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lm_mini.config import load_config  # noqa: E402
from lm_mini.eval.efficiency import efficiency_report, format_table, format_value, latency_report  # noqa: E402

PRESETS = ("llava15_vicuna7b", "llava_mini_vicuna7b", "llava_mini_llama31_8b")
SAMPLES = ((0, "image"), (64, "64-frame video"), (1024, "1,024-frame video"))
TEXT_TOKENS = 64

# The paper's efficiency claims (abstract, Fig. 1 and the release's model card), LLaVA-Mini vs LLaVA-1.5-7B.
PAPER = {
    "flops_reduction": 0.77,  # "77% FLOPs reduction"
    "kv_mb_per_image": {"baseline": 360.0, "model": 0.6},  # "360 MB/image -> 0.6 MB/image" of VRAM
    "max_frames_24gb": 10_000,  # "over 10,000 frames of video on ... 24GB"
    "latency_ms": {"baseline": 100.0, "model": 40.0},  # "from 100 milliseconds to 40 milliseconds"
}


def summary_rows(reports):
    """One row per (preset, sample): the figures the paper quotes."""
    rows = [("model", "sample", "visual tokens", "FLOPs", "FLOPs vs LLaVA-1.5", "FLOPs / new token",
             "KV cache / image", "KV cache / sample", "max frames (24 GiB)")]
    for (preset, sample), r in reports.items():
        rows.append((
            preset, sample, f"{r['visual_tokens']['model']:,}",
            format_value(r["flops"]["model"], "FLOPs"),
            "(is the baseline)" if r["flops"]["ratio"] == 1 else f"{1 - r['flops']['ratio']:.1%} fewer",
            format_value(r["flops_per_token"]["model"], "FLOPs"),
            format_value(r["kv_cache_bytes_per_image"]["model"], "B"), format_value(r["kv_cache_bytes_per_sample"]["model"], "B"),
            f"{r['max_frames']['model']:,}",
        ))
    return rows


def render(rows, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join([lines[0], "|" + "---|" * len(rows[0])] + lines[1:])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def paper_rows(reports):
    """Measured vs the paper's figure for each claim, with the relative difference."""
    mini = reports[("llava_mini_vicuna7b", "image")]
    release = reports[("llava_mini_llama31_8b", "image")]
    rows = [("claim (LLaVA-Mini vs LLaVA-1.5-7B)", "paper", "measured: Vicuna-7B C=1 d=4", "measured: Llama-3.1-8B release")]

    def reduction(r, without_encoder=False):
        enc = r["flops_by_part"]["encoder"] if without_encoder else {"model": 0, "baseline": 0}
        return f"{1 - (r['flops']['model'] - enc['model']) / (r['flops']['baseline'] - enc['baseline']):.1%}"

    rows.append(("FLOPs reduction, image + 64 text tokens", f"{PAPER['flops_reduction']:.0%}", reduction(mini), reduction(release)))
    rows.append(("  the same without the vision encoder", "", reduction(mini, True), reduction(release, True)))
    base = {k: r["flops"]["baseline"] - r["flops_by_part"]["encoder"]["baseline"] for k, r in (("mini", mini), ("release", release))}
    model = {k: r["flops"]["model"] - r["flops_by_part"]["encoder"]["model"] for k, r in (("mini", mini), ("release", release))}
    rows.append(("  FLOPs without the encoder: LLaVA-1.5 / LLaVA-Mini", "", f"{base['mini'] / 1e12:.2f} T / {model['mini'] / 1e12:.2f} T",
                 f"{base['release'] / 1e12:.2f} T / {model['release'] / 1e12:.2f} T"))
    for role, label in (("baseline", "KV cache per image, LLaVA-1.5"), ("model", "KV cache per image, LLaVA-Mini")):
        rows.append((label, f"{PAPER['kv_mb_per_image'][role]:g} MB", f"{mini['kv_cache_bytes_per_image'][role] / 1e6:.3g} MB",
                     f"{release['kv_cache_bytes_per_image'][role] / 1e6:.3g} MB"))
    rows.append(("frames on a 24 GB GPU, LLaVA-Mini", f"> {PAPER['max_frames_24gb']:,}", f"{mini['max_frames']['model']:,}",
                 f"{release['max_frames']['model']:,}"))
    rows.append(("frames on a 24 GB GPU, LLaVA-1.5", "-", f"{mini['max_frames']['baseline']:,}", f"{release['max_frames']['baseline']:,}"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="Markdown tables (for benchmarks/RESULTS.md)")
    parser.add_argument("--json", default=None, help="also write every report to this file")
    parser.add_argument("--latency-device", default=None, help="time prefill/decode with random weights here (cuda)")
    args = parser.parse_args(argv)

    started, cache, reports = time.time(), {}, {}
    for preset in PRESETS:
        cfg = load_config(REPO / "experiments" / "models" / f"{preset}.yaml").model
        for frames, sample in SAMPLES:
            reports[(preset, sample)] = efficiency_report(cfg, TEXT_TOKENS, frames, cache=cache)
        if args.latency_device:
            reports[(preset, "image")].update(latency_report(cfg, device=args.latency_device, text_tokens=TEXT_TOKENS))
    elapsed = time.time() - started

    print(f"# Efficiency on meta: {platform.processor() or platform.machine()}, counted in {elapsed:.0f} s; "
          f"bf16, {TEXT_TOKENS} text tokens, budget 24 GiB, frames encoded in chunks of 16\n")
    print(render(paper_rows(reports), args.markdown) + "\n")
    print(render(summary_rows(reports), args.markdown) + "\n")
    for preset in PRESETS[1:]:
        print(f"## {preset} vs its LLaVA-1.5 baseline, one image + {TEXT_TOKENS} text tokens\n")
        print(format_table(reports[(preset, "image")], markdown=args.markdown) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{p} | {s}": r for (p, s), r in reports.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
