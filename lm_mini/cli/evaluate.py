"""``lm-mini eval SOURCE --data SHARDS | --benchmark NAME | --suite FILE`` and ``lm-mini score``.

``--data``: shard sets, scored with ``eval.metrics`` (``lm_mini.eval.evaluate.evaluate_source``); ``--benchmark`` /
``--suite`` / ``--merge``: LLaVA benchmark files, answered and scored as the official scripts do
(``lm_mini.eval.benchmark_runner``); ``score``: an answers file through the official scorer
(``lm_mini.eval.benchmarks.scoring``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Sequence

from lm_mini.cli.common import add_trust_args, at_least, device_or_auto, error


def add_commands(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a model: LLaVA benchmark files with the official scorers (--benchmark, "
                       "--suite), or shard sets (--data)",
                       description="lm-mini eval SOURCE --benchmark NAME --questions FILE --image-folder DIR [...]: LLaVA's "
                       "answers file, scored as the official script scores it; lm-mini eval SOURCE --suite FILE: a list of "
                       "benchmarks; lm-mini eval SOURCE --data SHARDS: shard sets, scored with --metric.")
    p.add_argument("source", nargs="?", default=None, help="run directory, checkpoint (*.ckpt) or model directory")
    p.add_argument("--data", nargs="+", default=None, help="shard sets to evaluate on: directories (with index.json), "
                   "tars or patterns, or remote sets as lm-mini train reads them (http(s)://, s3:// and other fsspec "
                   "URLs, pipe: commands)")
    p.add_argument("--metric", nargs="*", default=None,
                   help="with --data: exact_match, vqa_accuracy, multiple_choice, pope, or their lenient variants "
                   "multiple_choice_lenient, pope_lenient (default: the config's eval.metrics)")
    p.add_argument("--out", default=None, help="with --data: predictions JSONL (default: <run>/eval/<data>.jsonl)")
    p.add_argument("--device", type=device_or_auto, default="auto", help="auto (a GPU when there is one), cpu, cuda[:N]")
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
    b.add_argument("--num-chunks", type=at_least(1), default=1, help="split the questions into N chunks (LLaVA's get_chunk)")
    b.add_argument("--chunk-idx", type=at_least(0), default=0, help="the chunk this job answers (into <answers dir>/<stem>/N_K.jsonl)")
    b.add_argument("--merge", action="store_true", help="concatenate the N chunk files into --answers-file, then score")
    b.add_argument("--devices", default=None, help="split the benchmark over these local devices itself (cuda:0,cuda:1, "
                   "or all): one process per device, then merge and score")
    b.add_argument("--suite", default=None, help="YAML of benchmarks and their paths (experiments/benchmarks/*.yaml)")
    b.add_argument("--only", nargs="+", default=None, help="with --suite: only these benchmarks (names or labels)")
    b.add_argument("--answers-dir", default=None, help="with --suite: where the answers files go (default: <run>/eval)")
    b.add_argument("--submission-questions", default=None, help="the question file the submission lists when not "
                   "--questions (VQAv2 test-dev: llava_vqav2_mscoco_test2015.jsonl, found beside the test-dev file by default)")
    b.add_argument("--model-id", default=None, help="model_id of the answers lines (default: the run or model directory name)")
    b.add_argument("--batch-size", type=at_least(1), default=1, help="questions per generate() call (LLaVA's scripts: 1)")
    b.add_argument("--num-workers", type=at_least(0), default=0, help="processes decoding media")
    b.add_argument("--progress-every", type=at_least(1), default=100, help="print progress every N answers")
    b.add_argument("--judge", default=None, help="GPT-judged benchmarks: the judge command (see lm-mini score --help)")
    g = p.add_argument_group("generation (default: the config's eval.*; greedy, as the paper's eval)")
    g.add_argument("--temperature", type=at_least(0, float), default=None, help="0: greedy; > 0 samples")
    g.add_argument("--top-p", type=at_least(0, float, inclusive=False), default=None, help="nucleus sampling (temperature > 0)")
    g.add_argument("--num-beams", type=at_least(1), default=None)
    g.add_argument("--max-new-tokens", type=at_least(1), default=None, help="default: the benchmark's official value")
    g.add_argument("--seed", type=at_least(0), default=0, help="with --temperature > 0: sampling is seeded from this and "
                   "each question's position (recorded in the answers' metadata)")
    add_trust_args(p)
    p.set_defaults(func=evaluate)

    p = sub.add_parser("score", help="score a benchmark's answers file as the official scorer does (no model)",
                       description="lm-mini score --benchmark NAME --answers FILE: the official score of LLaVA's answers "
                       "file, and the submission / judge input file the benchmark's server or judge takes.")
    p.add_argument("--benchmark", required=True, help="vqav2, gqa, vizwiz, textvqa, scienceqa, pope, mme, mmbench, "
                   "seed_bench, mvbench, mlvu, egoschema, llava_bench, mmvet, msvd_qa, msrvtt_qa, activitynet_qa, ...")
    p.add_argument("--answers", required=True, help="LLaVA answers JSONL (question_id, prompt, text, ...)")
    p.add_argument("--questions", default=None, help="the benchmark's question file (needed by pope, vizwiz, mmbench, video)")
    p.add_argument("--annotations", default=None, help="the official reference answers (see the benchmark's docs)")
    p.add_argument("--out-dir", default=None, help="where the submission / judge input goes (default: <answers>_upload/)")
    p.add_argument("--submission-questions", default=None, help="the question file the submission lists when not "
                   "--questions (VQAv2: llava_vqav2_mscoco_test2015.jsonl, found beside a test-dev --questions by default)")
    p.add_argument("--judge", default=None, help="GPT-judged benchmarks: a command run on the judge input file that "
                   "prints a JSON object of scores as its last line")
    p.add_argument("--json", action="store_true", help='print {"benchmark", "n", "scores", ...} as JSON')
    p.set_defaults(func=score)


# --------------------------------------------------------------------------- lm-mini eval
def evaluate(args: argparse.Namespace) -> int:
    """Shard sets (``--data``), or LLaVA benchmark files (``--benchmark`` / ``--suite`` / ``--merge``)."""
    if args.benchmark or args.suite or args.merge:
        return benchmark(args)
    if not args.data:
        print("lm-mini eval: give --data SHARDS..., or --benchmark NAME --questions FILE, or --suite FILE", file=sys.stderr)
        return 2
    if not args.source:
        print("lm-mini eval: give the model (run directory, checkpoint or model directory) to evaluate", file=sys.stderr)
        return 2
    from lm_mini.eval.evaluate import evaluate_source

    # `--data A B key=value` / `--metric m key=value`: argparse hands the overrides to the option; take them back
    # (a shard set URL or pipe: command may hold "=": it is data).
    from lm_mini.data.remote import is_remote

    data = [d for d in args.data if "=" not in d or Path(d).exists() or is_remote(d)]
    metrics = [m for m in args.metric or [] if "=" not in m] or None  # None: eval.metrics
    overrides = list(args.overrides) + [d for d in args.data if d not in data] + [m for m in args.metric or [] if "=" in m]
    for flag in ("temperature", "top_p", "num_beams", "max_new_tokens"):  # the generation flags are eval.* keys here
        if getattr(args, flag, None) is not None:
            overrides.append(f"eval.{flag}={getattr(args, flag)}")
    from lm_mini.tracking_store import TrackingUnavailable

    try:
        result = evaluate_source(args.source, data, metrics, args.out, overrides, args.device, not args.no_mlflow)
    except (FileNotFoundError, ValueError, KeyError, TrackingUnavailable) as e:
        print(f"lm-mini eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    _print_shard_result(result)
    return 0


def _print_shard_result(result: Any) -> None:
    from lm_mini.data.errors import describe_skips

    s = result.scores
    sets = ", ".join(f"{name}: {n}" for name, n in result.per_set.items())
    print(f"evaluated {result.n} samples ({sets}); majority-answer baseline {result.majority_baseline:.3f}")
    excluded = result.excluded
    if excluded["n"]:
        shown = ", ".join(map(str, excluded["ids"][:10])) + (" ..." if excluded["n"] > 10 else "")
        print(f"not scored: {excluded['n']} samples without a reference answer ({shown})")
    if result.skipped:
        print(f"data: {describe_skips(result.skipped)}")
    width = max(len(k) for k in s)
    for key in sorted(s, key=lambda k: (not k.startswith("all/"), k)):
        value = s[key]
        print(f"  {key.ljust(width)}  {value if key.endswith('/n') else f'{value:.4f}'}")
    print(f"predictions: {result.predictions_file}")
    if result.mlflow_run_id:
        print(f"scores logged to MLflow run {result.mlflow_run_id}")


# --------------------------------------------------------------------------- lm-mini eval --benchmark / --suite / --merge
def benchmark(args: argparse.Namespace) -> int:
    """Exit 0, 2 on a user error (one line), 130 on Ctrl-C (one line: what is kept, and that a re-run continues)."""
    from lm_mini.eval.benchmark_runner import Interrupted
    from lm_mini.tracking_store import TrackingUnavailable

    try:
        return _benchmark(args)
    except (FileNotFoundError, ValueError, KeyError, TrackingUnavailable) as e:
        print(error("eval", e), file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"\nlm-mini eval: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nlm-mini eval: interrupted (no answer was being written); run the same command again to continue",
              file=sys.stderr)
        return 130


def _benchmark(args: argparse.Namespace) -> int:
    from lm_mini.eval.benchmark_runner import (BenchmarkRun, LoadedModel, default_answers_file, load_for_benchmarks,
                                               prepare, prepare_suite, run_benchmark, run_suite)
    from lm_mini.eval.suites import BenchmarkSpec, load_suite
    from lm_mini.eval.benchmarks.base import BENCHMARKS

    if args.data:
        raise ValueError("--data (shard sets) and --benchmark/--suite (benchmark files) are separate evaluations")
    from lm_mini.config import INFERENCE_MODEL_KEYS, saved_model_overrides

    ignored = [o for o in args.overrides if o.partition("=")[0].strip() not in INFERENCE_MODEL_KEYS]
    if ignored:  # the generation settings are flags here (--temperature, --max-new-tokens, ...), as in LLaVA's scripts
        raise ValueError(f"{' '.join(ignored)}: a benchmark run takes only {' / '.join(INFERENCE_MODEL_KEYS)} as key=value "
                         "(its generation settings are flags: --temperature, --top-p, --num-beams, --max-new-tokens)")
    backends = saved_model_overrides(args.overrides)
    if args.suite and (args.benchmark or args.merge):
        raise ValueError("--suite runs its own benchmarks: no --benchmark / --merge with it")
    if args.num_chunks < 1 or not 0 <= args.chunk_idx < args.num_chunks:
        raise ValueError(f"--chunk-idx must be in [0, --num-chunks - 1] (got {args.chunk_idx} of {args.num_chunks})")
    if args.benchmark:
        BENCHMARKS.get(args.benchmark)  # unknown: KeyError listing the known ones
        if not args.questions:
            raise ValueError(f"--benchmark {args.benchmark}: give its question file (--questions FILE)")
    if args.merge and args.num_chunks < 2:
        raise ValueError("--merge concatenates the chunks of --num-chunks N (N >= 2) into --answers-file")
    if args.merge and not args.answers_file and not args.source:
        raise ValueError("--merge: give --answers-file (the merged file; its chunks lie in <dir>/<stem>/N_K.jsonl)")
    if not args.merge and not args.source:
        raise ValueError("give the model to evaluate (run directory, checkpoint or model directory)")
    # the files are checked and the questions read before a model is loaded (minutes for a large one)
    if args.suite:
        prepared = prepare_suite(load_suite(args.suite), args.only or ())
    else:
        spec = BenchmarkSpec(args.benchmark, args.questions, args.image_folder, args.annotations, args.label,
                             submission_questions=args.submission_questions)
        prepared = [prepare(spec, scoring=not args.merge and args.num_chunks == 1)]
    from lm_mini.eval.mlflow_scores import metric_name  # noqa: F401  (fail fast on a broken install)

    devices = [d.strip() for d in (args.devices or "").split(",") if d.strip()]
    if devices == ["all"]:  # every local GPU
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if not devices:
            raise ValueError("--devices all: this machine has no CUDA device")
    if devices and (args.suite or args.merge or args.num_chunks > 1):
        raise ValueError("--devices splits one benchmark over local devices itself: no --suite, --merge or --num-chunks with it")
    loaded = None
    if args.source and (args.merge or devices):  # no generation here: the source names the MLflow run; no weights
        from lm_mini.runs import resolve_source

        found = resolve_source(args.source)
        loaded = LoadedModel(None, found.cfg, None, None, args.model_id or "", dict(found.info), found.run_dir, Path(found.path))
        if devices:
            answers_file = Path(args.answers_file) if args.answers_file else default_answers_file(loaded, spec.key)
            run_chunks_on_devices(args, devices, answers_file)
            args.answers_file, args.num_chunks, args.merge = str(answers_file), len(devices), True
    elif args.source:
        device = None if args.device == "auto" else args.device
        loaded = load_for_benchmarks(args.source, device, args.model_id, backends)

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, args.progress_every) < args.batch_size:
            print(f"  {done}/{total} answered", file=sys.stderr, flush=True)

    common = dict(num_chunks=args.num_chunks, chunk_idx=args.chunk_idx, batch_size=args.batch_size, num_workers=args.num_workers,
                  log_mlflow=not args.no_mlflow, judge=args.judge, progress=None if args.json else progress, seed=args.seed)
    runs: List[BenchmarkRun] = []
    if args.suite:
        options_for = (lambda spec: _options(args, loaded, BENCHMARKS.get(spec.name).max_new_tokens, spec))
        for run in run_suite(loaded, prepared, (), args.answers_dir, options_for, **common):
            runs.append(run)
            if not args.json:
                _print_run(run)
    else:
        options = None if args.merge else _options(args, loaded, BENCHMARKS.get(spec.name).max_new_tokens, spec)
        run = run_benchmark(loaded, prepared[0], args.answers_file, options, merge=args.merge, **common)
        runs.append(run)
        if not args.json:
            _print_run(run)
    if args.json:
        out = [r.to_json() for r in runs]
        print(json.dumps(out if args.suite else out[0], indent=2))
    return 0


def _options(args: argparse.Namespace, loaded: Any, benchmark_default: int, spec: Any) -> Any:
    from lm_mini.eval.generation import GenerationOptions

    return GenerationOptions.from_config(
        loaded.cfg.eval, max_new_tokens=args.max_new_tokens or spec.max_new_tokens or benchmark_default,
        temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams)


def _print_run(run: Any) -> None:
    from lm_mini.eval.benchmark_runner import upload_dir
    from lm_mini.eval.benchmarks.scoring import format_result

    label = run.spec.key
    if run.merged:
        print(f"{label}: merged {run.merged[0]} chunks ({run.merged[1]} answers) into {run.answers_file}")
    else:
        what = f"{run.generated} generated now" if run.generated else "nothing generated (answers file complete)"
        print(f"{label}: {run.n_questions} questions, {what}; answers: {run.answers_file}")
    if run.chunk:
        print(f"{label}: chunk {run.chunk[1]} of {run.chunk[0]}; --merge concatenates the chunks, then scores them")
    elif run.result is None:
        print(f"{label}: GPT-judged: judge input in {upload_dir(run.answers_file)}; score with --judge CMD "
              f"(here or in lm-mini score)")
    else:
        print(format_result(run.result))
    if run.mlflow_run_id:
        print(f"{label}: scores logged to MLflow run {run.mlflow_run_id}")


def run_chunks_on_devices(args: argparse.Namespace, devices: Sequence[str], answers_file: Path) -> None:
    """``--devices cuda:0,cuda:1``: one ``lm-mini eval`` process per device, each answering its chunk (as LLaVA's
    scripts start one job per GPU), waited for; the caller then merges and scores. A failed chunk is an error
    naming it (its finished answers stay: a re-run continues it)."""
    import subprocess

    from lm_mini.eval.answers_files import chunk_file
    from lm_mini.eval.benchmark_runner import Interrupted

    flags = {"--image-folder": args.image_folder, "--label": args.label, "--model-id": args.model_id,
             "--batch-size": args.batch_size, "--num-workers": args.num_workers, "--temperature": args.temperature,
             "--top-p": args.top_p, "--num-beams": args.num_beams, "--max-new-tokens": args.max_new_tokens,
             "--seed": args.seed}
    base = [sys.executable, "-m", "lm_mini.cli", "eval", str(args.source), "--benchmark", args.benchmark, "--questions",
            args.questions, "--answers-file", str(answers_file), "--num-chunks", str(len(devices)), "--no-mlflow"]
    base += [x for k, v in flags.items() if v is not None for x in (k, str(v))]
    if args.trust_checkpoint:
        base.append("--trust-checkpoint")
    base += list(args.overrides)  # the attention backends, checked by the caller
    procs = [subprocess.Popen(base + ["--chunk-idx", str(k), "--device", dev, "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k, dev in enumerate(devices)]
    failed = []
    try:
        outputs = [proc.communicate() for proc in procs]
    except KeyboardInterrupt:  # the chunk processes got the same Ctrl-C: each keeps its finished answers
        for proc in procs:
            proc.wait()
        parts = [chunk_file(answers_file, len(devices), k) for k in range(len(devices))]
        raise Interrupted(parts[0].parent, sum(p.read_bytes().count(b"\n") for p in parts if p.is_file())) from None
    for k, ((out, err), proc, dev) in enumerate(zip(outputs, procs, devices)):
        if proc.returncode != 0:
            failed.append(f"chunk {k} on {dev} (exit {proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else out[-300:]}")
    if failed:
        raise ValueError("--devices: " + "; ".join(failed))


# --------------------------------------------------------------------------- lm-mini score
def score(args: argparse.Namespace) -> int:
    """Print the official scores of ``--answers`` (JSON with ``--json``)."""
    from lm_mini.eval.benchmarks.scoring import format_result, score_answers

    answers = Path(args.answers)
    out_dir = Path(args.out_dir) if args.out_dir else answers.with_name(answers.stem + "_upload")
    try:
        result = score_answers(args.benchmark, answers, args.questions, args.annotations, out_dir, args.judge,
                               args.submission_questions)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(error("score", e), file=sys.stderr)
        return 2
    print(json.dumps(result.to_json()) if args.json else format_result(result))
    return 0
