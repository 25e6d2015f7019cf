"""``lm-mini`` command line. Each subcommand is parsed here and handed to ``module:function(args)``;
modules are imported only when their command runs, so ``lm-mini --help`` stays fast."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import Any, Callable, Iterator, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights never come from a hub here; fail fast, not after ~50 s


def _handler(target: str) -> Callable[[argparse.Namespace], Optional[int]]:
    def run(args: argparse.Namespace) -> Optional[int]:
        module_name, _, func = target.partition(":")
        return getattr(importlib.import_module(module_name), func)(args)

    return run


def _at_least(low: float, kind: type = int, inclusive: bool = True) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` number ``>= low`` (``> low`` when not ``inclusive``)."""
    def parse(text: str) -> Any:
        value = kind(text)
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text}: expected {'>=' if inclusive else '>'} {low}")
        return value
    return parse


def _device(text: str) -> str:
    """An argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text}: not a device ({e})") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _device_or_auto(text: str) -> str:
    """An argparse type: ``auto`` or a device this machine has (see :func:`_device`)."""
    return text if text == "auto" else _device(text)


def _config_show(args: argparse.Namespace) -> int:
    from lm_mini.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _add_trust_args(p: argparse.ArgumentParser, imports: bool = True) -> None:
    """The opt-ins of a command that opens checkpoints (and model/run directories): see lm_mini/trust.py."""
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read checkpoints that hold more than tensors, numbers and strings: RUNS ARBITRARY CODE "
                        "FROM THE FILE (only for files from a source you trust)")
    if imports:
        p.add_argument("--allow-import", action="append", default=[], metavar="MODULE:CLASS",
                       help="let a model or run directory's config import this component (package.module:Class, "
                            "or a module, or '*'): importing runs that package's code (repeatable)")


@contextlib.contextmanager
def _opt_ins(args: argparse.Namespace) -> Iterator[None]:
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


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (e.g. experiments/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.compressor.grid=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm-mini", description="Efficient LLaVA-Mini-style multimodal models.")
    sub = parser.add_subparsers(dest="command", required=True)

    # config
    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("show", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=_config_show)

    # shards
    shards = sub.add_parser("shards", help="build and inspect WebDataset shards").add_subparsers(dest="shards_command", required=True)
    p = shards.add_parser("build", help="LLaVA JSON/JSONL + media -> WebDataset shards with index.json")
    p.add_argument("--json", nargs="+", required=True, help="LLaVA JSON or JSONL files (or Video-ChatGPT q/a records)")
    p.add_argument("--media-root", default=".", help="directory the records' image/video paths are relative to")
    p.add_argument("--out", required=True, help="output directory, or an fsspec URL such as s3://bucket/set (built in "
                   "--staging, then uploaded with index.json last); refused if it holds a different finished build")
    p.add_argument("--staging", default=None, help="with a URL --out: local folder to build in before the upload "
                   "(default: a temporary one); keep it to --resume an interrupted build or upload")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    p.add_argument("--resume", action="store_true", help="finish an interrupted build in --out")
    p.set_defaults(func=_handler("lm_mini.data.shards:cli_build"))
    p = shards.add_parser("inspect", help="print counts and a few decoded samples")
    p.add_argument("path", help="shard directory (with index.json), .tar file or pattern; or a URL (s3://, https://) or pipe: command")
    p.add_argument("-n", "--num-samples", type=int, default=3)
    p.add_argument("--tokenizer", default=None, help="also show token/label layout with this tokenizer")
    p.add_argument("--template", default=None)
    p.set_defaults(func=_handler("lm_mini.data.shards:cli_inspect"))
    p = shards.add_parser("demo", help="generate the synthetic demo data set (shapes, videos, captions)")
    p.add_argument("--out", default="data_shards/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of samples")
    p.set_defaults(func=_handler("lm_mini.recipes.demo:cli_demo"))

    # train
    p = sub.add_parser("train", help="train a stage")
    _add_config_args(p)
    p.add_argument("--resume", default=None, help="auto (newest complete checkpoint of this run) or a checkpoint path")
    _add_trust_args(p, imports=False)  # --resume and train.init_from: the config is the user's own
    p.set_defaults(func=_handler("lm_mini.training.run:cli_train"))

    # eval
    p = sub.add_parser("eval", help="evaluate a model: LLaVA benchmark files with the official scorers (--benchmark, "
                       "--suite), or shard sets (--data)",
                       description="lm-mini eval SOURCE --benchmark NAME --questions FILE --image-folder DIR [...]: LLaVA's "
                       "answers file, scored as the official script scores it; lm-mini eval SOURCE --suite FILE: a list of "
                       "benchmarks; lm-mini eval SOURCE --data SHARDS: shard sets, scored with --metric.")
    p.add_argument("source", nargs="?", default=None, help="run directory, checkpoint (*.ckpt) or model directory")
    p.add_argument("--data", nargs="+", default=None, help="shard directories (with index.json) to evaluate on")
    p.add_argument("--metric", nargs="*", default=None,
                   help="with --data: exact_match, vqa_accuracy, multiple_choice, pope, or their lenient variants "
                   "multiple_choice_lenient, pope_lenient (default: the config's eval.metrics)")
    p.add_argument("--out", default=None, help="with --data: predictions JSONL (default: <run>/eval/<data>.jsonl)")
    p.add_argument("--device", type=_device_or_auto, default="auto", help="auto (a GPU when there is one), cpu, cuda[:N]")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the scores to the source's MLflow run")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.max_samples=100")
    b = p.add_argument_group("benchmark files (LLaVA's question and answers files, official scorers)")
    b.add_argument("--benchmark", default=None, help="a registered benchmark: vqav2, gqa, textvqa, pope, scienceqa, mme, ...")
    b.add_argument("--questions", default=None, help="the benchmark's question file (e.g. llava_textvqa_val_v051_ocr.jsonl)")
    b.add_argument("--image-folder", default=None, help="folder the questions' image/video paths are relative to")
    b.add_argument("--annotations", default=None, help="the official annotations the scorer reads (where the benchmark needs them)")
    b.add_argument("--answers-file", default=None, help="LLaVA answers JSONL (default: <run or model dir>/eval/<benchmark>.jsonl); "
                   "an existing one is continued, not regenerated")
    b.add_argument("--label", default=None, help="name for MLflow keys eval/<label>/... and default files (default: the benchmark)")
    b.add_argument("--num-chunks", type=_at_least(1), default=1, help="split the questions into N chunks (LLaVA's get_chunk)")
    b.add_argument("--chunk-idx", type=_at_least(0), default=0, help="the chunk this job answers (into <answers dir>/<stem>/N_K.jsonl)")
    b.add_argument("--merge", action="store_true", help="concatenate the N chunk files into --answers-file, then score")
    b.add_argument("--devices", default=None, help="split the benchmark over these local devices itself (cuda:0,cuda:1, "
                   "or all): one process per device, then merge and score")
    b.add_argument("--suite", default=None, help="YAML of benchmarks and their paths (experiments/benchmarks/*.yaml)")
    b.add_argument("--only", nargs="+", default=None, help="with --suite: only these benchmarks (names or labels)")
    b.add_argument("--answers-dir", default=None, help="with --suite: where the answers files go (default: <run>/eval)")
    b.add_argument("--model-id", default=None, help="model_id of the answers lines (default: the run or model directory name)")
    b.add_argument("--batch-size", type=_at_least(1), default=1, help="questions per generate() call (LLaVA's scripts: 1)")
    b.add_argument("--num-workers", type=_at_least(0), default=0, help="processes decoding media")
    b.add_argument("--progress-every", type=_at_least(1), default=100, help="print progress every N answers")
    b.add_argument("--judge", default=None, help="GPT-judged benchmarks: the judge command (see lm-mini score --help)")
    g = p.add_argument_group("generation (default: the config's eval.*; greedy, as the paper's eval)")
    g.add_argument("--temperature", type=_at_least(0, float), default=None, help="0: greedy; > 0 samples")
    g.add_argument("--top-p", type=_at_least(0, float, inclusive=False), default=None, help="nucleus sampling (temperature > 0)")
    g.add_argument("--num-beams", type=_at_least(1), default=None)
    g.add_argument("--max-new-tokens", type=_at_least(1), default=None, help="default: the benchmark's official value")
    _add_trust_args(p)
    p.set_defaults(func=_handler("lm_mini.eval.evaluate:cli_eval"))

    # score
    p = sub.add_parser("score", help="score a benchmark's answers file as the official scorer does (no model)",
                       description="lm-mini score --benchmark NAME --answers FILE: the official score of LLaVA's answers "
                       "file, and the submission / judge input file the benchmark's server or judge takes.")
    p.add_argument("--benchmark", required=True, help="vqav2, gqa, vizwiz, textvqa, scienceqa, pope, mme, mmbench, "
                   "seed_bench, mvbench, mlvu, egoschema, llava_bench, mmvet, msvd_qa, msrvtt_qa, activitynet_qa, ...")
    p.add_argument("--answers", required=True, help="LLaVA answers JSONL (question_id, prompt, text, ...)")
    p.add_argument("--questions", default=None, help="the benchmark's question file (needed by pope, vizwiz, mmbench, video)")
    p.add_argument("--annotations", default=None, help="the official reference answers (see the benchmark's docs)")
    p.add_argument("--out-dir", default=None, help="where the submission / judge input goes (default: <answers>_upload/)")
    p.add_argument("--judge", default=None, help="GPT-judged benchmarks: a command run on the judge input file that "
                   "prints a JSON object of scores as its last line")
    p.add_argument("--json", action="store_true", help='print {"benchmark", "n", "scores", ...} as JSON')
    p.set_defaults(func=_handler("lm_mini.eval.benchmarks.scoring:cli_score"))

    # sweeps
    p = sub.add_parser("sweep", help="run a grid sweep (locally or as a SLURM array)")
    p.add_argument("sweep", help="sweep YAML (base config + grid)")
    p.add_argument("--dry-run", action="store_true", help="print the runs (and write the sbatch script) without running")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--max-parallel", type=int, default=1, help="runs at a time (local) / array throttle (slurm)")
    p.add_argument("--submit", action="store_true", help="slurm: submit the written script with sbatch")
    p.add_argument("--slurm-script", default=None, help="where to write the sbatch script")
    p.set_defaults(func=_handler("lm_mini.sweeps.grid:cli_sweep"))

    p = sub.add_parser("compare", help="compare MLflow runs: tables and plots")
    p.add_argument("--experiment", required=True)
    p.add_argument("--sweep", default=None, help="only runs of this sweep id")
    p.add_argument("--metric", nargs="*", default=None, help="metrics to show (default: all)")
    p.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    p.add_argument("--plot", default=None, help="write plots to this PNG")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else the store the experiment's "
                   "runs name in runs/<experiment>/*/mlflow.json, else ./mlflow.db (also searched in parent directories)")
    p.add_argument("--runs-dir", default=None, help="where the runs live (their logging.runs_dir), to find their MLflow store")
    p.add_argument("--group-by", nargs="+", default=None, metavar="KEY",
                   help="config keys that make a grid point; runs with equal values are aggregated (mean, std, CI, n). "
                        "Default: the sweep's keys except the seed")
    p.add_argument("--alpha", type=_at_least(0.0, float, inclusive=False), default=0.05,
                   help="confidence intervals at 1 - alpha, significance at alpha (default 0.05)")
    p.add_argument("--baseline", type=float, default=None,
                   help="plot: the majority-answer line (default: the runs' eval/majority_baseline)")
    p.add_argument("--upper-bound", nargs="+", default=None, metavar="KEY=VALUE",
                   help="plot: the grid point drawn as the upper bound (default: identity compressor at depth 0)")
    p.add_argument("--table", choices=["paper", "paper_video", "benchmarks"], default=None,
                   help="benchmark scores (eval/<benchmark>/...), one column per benchmark: paper = the paper's Table 1 "
                   "(image benchmarks), paper_video = its video benchmarks, benchmarks = every benchmark scored")
    p.set_defaults(func=_handler("lm_mini.sweeps.compare:cli_compare"))

    # efficiency
    p = sub.add_parser("efficiency", help="FLOPs, visual tokens, KV cache, frames per budget (and latency) vs LLaVA-1.5")
    _add_config_args(p)
    p.add_argument("--text-tokens", type=_at_least(1), default=64, help="prompt text tokens besides the media")
    p.add_argument("--frames", type=_at_least(0), default=0, help="video frames per sample (0: one image)")
    p.add_argument("--budget-gb", type=_at_least(0, float, inclusive=False), default=24.0, help="memory budget for max frames, GiB")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="dtype of weights and KV cache")
    p.add_argument("--chunk-frames", type=_at_least(1), default=16, help="frames encoded at once (working memory)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--mlflow-run", default=None, help="log the figures (flops_per_sample, ...) to this MLflow run id, or the run of a training run directory")
    p.add_argument("--measure-latency", action="store_true", help="also time prefill and decode with random weights")
    p.add_argument("--device", type=_device, default="cpu", help="device for --measure-latency (cpu, cuda)")
    p.add_argument("--new-tokens", type=_at_least(1), default=8, help="decode steps timed per run")
    p.add_argument("--repeats", type=_at_least(1), default=5, help="timed runs (median), after 2 warm-up runs")
    p.set_defaults(func=_handler("lm_mini.eval.efficiency:cli_efficiency"))

    # analyze
    analyze = sub.add_parser("analyze", help="analyses of trained models").add_subparsers(dest="analyze_command", required=True)
    p = analyze.add_parser("attention", help="per-layer attention to visual tokens and the layer-drop probe")
    p.add_argument("target", help="run directory or name, checkpoint (in a run's checkpoints/), or YAML config (random weights)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--data", required=True, help="shard directory (with index.json) to analyse")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=None, help="default: all, or eval.max_samples worth of batches")
    p.add_argument("--no-layer-drop", action="store_true", help="skip the layer-drop probe (one forward per layer)")
    p.add_argument("--device", type=_device, default="cpu", help="where the model runs (cpu, cuda)")
    p.add_argument("--plot", default=None, help="PNG file")
    p.add_argument("--out", default=None, help="numbers as .json (everything) or .csv (one row per layer)")
    _add_trust_args(p)
    p.set_defaults(func=_handler("lm_mini.eval.attention:cli_attention"))

    _add_interop_commands(sub)
    return parser


def _add_interop_commands(sub: Any) -> None:
    """import / export / generate / chat (lm_mini.interop)."""
    p = sub.add_parser("import", help="released checkpoint (LLaVA-Mini, LLaVA-1.5 original or transformers layout) -> model directory")
    p.add_argument("layout", choices=["llava-mini", "llava", "llava-hf"],
                   help="llava-mini: official LLaVA-Mini; llava: original LLaVA-1.5 (LlavaLlamaForCausalLM); "
                        "llava-hf: LlavaForConditionalGeneration")
    p.add_argument("dir", help="local checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--out", default=None, help="output model directory (default: DIR-lm_mini)")
    p.add_argument("--vision-tower", default=None, help="llava-mini, llava: local CLIP directory (config, and weights if DIR has none)")
    p.add_argument("--template", default=None, help="conversation template (default: llama3 for a Llama-3 tokenizer, else vicuna_v1)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    p.set_defaults(func=_handler("lm_mini.interop.importers:cli_import"))

    p = sub.add_parser("export", help="run or checkpoint -> Hugging Face style model directory")
    p.add_argument("source", help="run directory (newest checkpoint), checkpoint (*.ckpt file or FSDP folder) or model directory")
    p.add_argument("--out", required=True, help="output directory (must not hold weights already)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    _add_trust_args(p)
    p.set_defaults(func=_handler("lm_mini.interop.export:cli_export"))

    for name, about in (("generate", "answer one question about an image or a video"),
                        ("chat", "multi-turn conversation about an image or a video (questions on stdin)")):
        p = sub.add_parser(name, help=about)
        p.add_argument("source", help="model directory, run directory or checkpoint")
        media = p.add_mutually_exclusive_group(required=True)
        media.add_argument("--image", default=None, help="image file (jpg, png, webp, ...)")
        media.add_argument("--video", default=None, help="video file (mp4, webm, mkv, avi, mov)")
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the question")
        p.add_argument("--json", action="store_true", help="print a JSON object per answer instead of streaming text")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--device", type=_device, default=None, help="default: cuda if available, else cpu")
        _add_trust_args(p)
        p.set_defaults(func=_handler(f"lm_mini.interop.generate:cli_{name}"))


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
    from lm_mini.trust import UntrustedCheckpoint

    try:
        with _opt_ins(args):
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


if __name__ == "__main__":
    sys.exit(main())
