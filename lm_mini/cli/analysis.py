"""``lm-mini efficiency CONFIG`` (FLOPs, visual tokens, KV cache, frames per budget, latency vs LLaVA-1.5:
``lm_mini.eval.efficiency``) and ``lm-mini analyze attention`` (where the LLM looks, and the layer-drop probe:
``lm_mini.eval.attention``)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lm_mini.cli.common import add_config_args, add_trust_args, at_least, device


def add_commands(sub: Any) -> None:
    p = sub.add_parser("efficiency", help="FLOPs, visual tokens, KV cache, frames per budget (and latency) vs LLaVA-1.5")
    add_config_args(p)
    p.add_argument("--text-tokens", type=at_least(1), default=64, help="prompt text tokens besides the media")
    p.add_argument("--frames", type=at_least(0), default=0, help="video frames per sample (0: one image)")
    p.add_argument("--budget-gb", type=at_least(0, float, inclusive=False), default=24.0, help="memory budget for max frames, GiB")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="dtype of weights and KV cache")
    p.add_argument("--chunk-frames", type=at_least(1), default=16, help="frames encoded at once (working memory)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--mlflow-run", default=None, help="log the figures (flops_per_sample, ...) to this MLflow run id, or the run of a training run directory")
    p.add_argument("--measure-latency", action="store_true", help="also time prefill and decode with random weights")
    p.add_argument("--device", type=device, default="cpu", help="device for --measure-latency (cpu, cuda)")
    p.add_argument("--new-tokens", type=at_least(1), default=8, help="decode steps timed per run")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed runs (median), after 2 warm-up runs")
    p.set_defaults(func=efficiency)

    analyze = sub.add_parser("analyze", help="analyses of trained models").add_subparsers(dest="analyze_command", required=True)
    p = analyze.add_parser("attention", help="per-layer attention to visual tokens and the layer-drop probe")
    p.add_argument("target", help="run directory or name, checkpoint (in a run's checkpoints/), or YAML config (random weights)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--data", required=True, help="shard directory (with index.json) to analyse")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=None, help="default: all, or eval.max_samples worth of batches")
    p.add_argument("--no-layer-drop", action="store_true", help="skip the layer-drop probe (one forward per layer)")
    p.add_argument("--device", type=device, default="cpu", help="where the model runs (cpu, cuda)")
    p.add_argument("--plot", default=None, help="PNG file")
    p.add_argument("--out", default=None, help="numbers as .json (everything) or .csv (one row per layer)")
    add_trust_args(p)
    p.set_defaults(func=attention)



def efficiency(args: argparse.Namespace) -> int:
    """Print (or ``--json``) the model vs LLaVA-1.5 report."""
    from lm_mini.config import load_config, tracking_uri
    from lm_mini.eval.efficiency import efficiency_report, format_table, latency_report, log_report

    cfg = load_config(args.config, args.overrides)
    report = efficiency_report(cfg.model, args.text_tokens, args.frames, args.budget_gb, args.dtype, args.chunk_frames)
    if args.measure_latency:
        report.update(latency_report(cfg.model, device=args.device, text_tokens=args.text_tokens, frames=args.frames,
                                     new_tokens=args.new_tokens, repeats=args.repeats))
        report["setup"]["latency_device"] = args.device
    if args.mlflow_run:
        try:
            log_report(report, args.mlflow_run, tracking_uri(cfg))
        except RuntimeError as e:
            print(f"lm-mini efficiency: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        setup = report["setup"]
        print(f"{args.config}: {setup['sample']}, {setup['text_tokens']} text tokens, {setup['dtype']}, "
              f"budget {setup['budget_gb']:g} GiB")
        print(format_table(report))
    return 0


def attention(args: argparse.Namespace) -> int:
    """Print per-layer figures; ``--out`` / ``--plot`` write them."""
    from lm_mini.config import ConfigError
    from lm_mini.eval.attention import analyze_target, layer_rows, plot_result, write_result

    try:
        result = analyze_target(args.target, args.overrides, args.data, args.batch_size, args.max_batches,
                                with_layer_drop=not args.no_layer_drop, device=args.device)
    except ConfigError:  # a ValueError too, but main reports it, naming the key
        raise
    except (FileNotFoundError, ValueError) as e:
        print(f"lm-mini analyze attention: {e}", file=sys.stderr)
        return 1
    print(f"{'layer':>5} {'system':>8} {'visual':>8} {'instr.':>8} {'H(visual)':>10} {'drop: loglik':>13} {'EM':>6}")
    for row in layer_rows(result):
        ll, em = row["drop_from_here_log_likelihood"], row["drop_from_here_exact_match"]
        print(f"{row['layer']:>5} {row['share_system']:8.3f} {row['share_visual']:8.3f} {row['share_instruction']:8.3f} "
              f"{row['visual_entropy']:10.3f} " + (f"{ll:13.3f} {em:6.3f}" if ll is not None else ""))
    if result.get("layer_drop"):
        full = result["layer_drop"][-1]
        print(f"full model (no drop): log-likelihood {full['log_likelihood']:.3f}, exact match {full['exact_match']:.3f}")
    if args.out:
        write_result(result, args.out)
    if args.plot:
        plot_result(result, args.plot, title=str(args.target))
    return 0
