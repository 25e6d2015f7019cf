"""``lm-mini shards build | inspect | demo``: LLaVA JSON + media -> shard sets, a look inside one, the demo set."""
from __future__ import annotations

import argparse
import glob
import logging
from pathlib import Path
from typing import Any, List


def add_commands(sub: Any) -> None:
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
    p.set_defaults(func=build)
    p = shards.add_parser("inspect", help="print counts and a few decoded samples")
    p.add_argument("path", help="shard directory (with index.json), .tar file or pattern; or a URL (s3://, https://) or pipe: command")
    p.add_argument("-n", "--num-samples", type=int, default=3)
    p.add_argument("--tokenizer", default=None, help="also show token/label layout with this tokenizer")
    p.add_argument("--template", default=None)
    p.set_defaults(func=inspect)
    p = shards.add_parser("demo", help="generate the synthetic demo data set (shapes, videos, captions)")
    p.add_argument("--out", default="data_shards/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of samples")
    p.set_defaults(func=demo)


# --------------------------------------------------------------------------- build
def build(args: argparse.Namespace) -> int:
    from lm_mini.data.remote import is_remote, join
    from lm_mini.data.shard_builder import build_shards
    from lm_mini.data.shard_format import SKIPPED_FILE, ShardBuildError

    data_log = logging.getLogger("lm_mini.data")
    level = data_log.level
    data_log.setLevel(logging.INFO)  # one progress line per shard (and upload); not the libraries' info
    try:
        report = build_shards(args.json, args.media_root, args.out, shard_size=args.shard_size,
                              workers=args.workers, resume=args.resume, staging=args.staging)
    except (ShardBuildError, ValueError) as e:
        print(f"lm-mini shards build: {e}")
        return 1
    finally:
        data_log.setLevel(level)
    print(report.summary())
    if report.skipped:
        listed = join(report.out_dir, SKIPPED_FILE) if is_remote(args.out) else Path(args.out) / SKIPPED_FILE
        print(f"skipped records are listed in {listed}")
    if report.num_samples == 0:  # every record skipped: the input's layout or the media root is almost surely wrong
        print(f"lm-mini shards build: no usable record: all {sum(report.skipped.values())} were skipped; see the reasons above")
        return 1
    return 0


# --------------------------------------------------------------------------- inspect
def inspect(args: argparse.Namespace) -> int:
    try:
        return _inspect(args)
    except (OSError, ValueError, KeyError) as e:  # OSError: also a remote set that cannot be read (RemoteError)
        print(f"lm-mini shards inspect: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
        return 1


def _inspect(args: argparse.Namespace) -> int:
    from lm_mini.data.errors import SampleError, SkipCounter
    from lm_mini.data.remote import is_remote, local_path, redact
    from lm_mini.data.shard_format import INDEX_FILE
    from lm_mini.data.shard_reader import list_shards, names_shards, read_index, read_shard

    path = args.path if is_remote(args.path) else Path(local_path(args.path))
    if not is_remote(path) and not path.exists() and not glob.has_magic(str(path)) and "{" not in str(path):
        raise FileNotFoundError(f"{path} does not exist (expected a shard directory with index.json, a directory "
                                "of tars, a .tar file or a pattern of them)")
    if args.template:
        from lm_mini.registry import TEMPLATES

        TEMPLATES.get(args.template)  # an unknown name fails now, listing the known templates
    shards = list_shards(path)
    counts = None if any(s.samples is None for s in shards) else [s.samples for s in shards]
    if counts is not None and names_shards(path):
        print(f"{redact(str(path))}: {sum(counts)} samples in {len(shards)} shards (counts from their {INDEX_FILE})")
    elif counts is not None:  # from index.json
        index = read_index(path)
        print(f"{redact(str(path))}: {index['num_samples']} samples in {len(index['shards'])} shards; media "
              + ", ".join(f"{k} {v}" for k, v in index["media"].items())
              + f"; skipped at build: {index['skipped'] or 'none'}")
        for s in index["shards"]:
            print(f"  {s['name']}: {s['samples']} samples ({', '.join(f'{k} {v}' for k, v in s['media'].items())})")
    else:
        print(f"{path}: {len(shards)} tar files without {INDEX_FILE} (read as they are, e.g. img2dataset output)")
    tokenizer = None
    if args.tokenizer:
        from lm_mini.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    counter, shown = SkipCounter(), 0
    # (position in its shard, samples index.json gives the shard or None, item)
    items = ((k, None if counts is None else counts[i], item)
             for i, shard in enumerate(shards) for k, item in enumerate(read_shard(shard)))
    for position, expected, item in items:
        if shown == args.num_samples:
            break
        if isinstance(item, SampleError):
            lost = 1
            if item.reason == "truncated_tar" and expected is not None:
                lost = max(1, expected - position)  # every sample from here on, as the training loader counts them
            counter.add(item.reason, lost)
            print(f"--- skipped: {item}" + (f" ({lost} samples lost)" if lost > 1 else ""))
            continue
        shown += 1
        s = item
        print(f"--- {s.key} id={s.record['id']} source={s.record.get('source')} | {_describe_media(s)}")
        for turn in s.record["conversations"]:
            print(f"  {turn['from']}: {turn['value']!r}")
        if tokenizer is not None:
            try:
                print("\n".join(_token_layout(s, tokenizer, args.template or s.template or "vicuna_v1")))
            except SampleError as e:
                print(f"  cannot tokenize: {e}")
    if counter:
        print(f"skipped while reading: {counter.as_dict()}")
    return 0


def _describe_media(s: Any) -> str:
    from lm_mini.data.errors import SampleError
    from lm_mini.data.media import decode_image, probe_video

    sid = s.record.get("id")
    try:
        if s.media_kind == "image":
            w, h = decode_image(s.media_bytes, sid).size
            return f"image {s.media_ext} {w}x{h}"
        if s.media_kind == "video":
            info = probe_video(s.media_bytes, sid)
            return f"video {s.media_ext} {info['frames']} frames {info['width']}x{info['height']}"
    except SampleError as e:
        return f"{s.media_kind} {s.media_ext} UNREADABLE {e}"
    return "text-only"


def _token_layout(s: Any, tokenizer: Any, template: str) -> List[str]:
    """Tokens in runs of the same role: ``ctx`` (no loss) or ``LOSS`` (trained); the media slot shown as <media>."""
    from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from lm_mini.data.conversation import tokenize_conversation

    t = tokenize_conversation(s.record["conversations"], tokenizer, template, max_length=1 << 30,
                              has_media=s.media_kind is not None, sample_id=str(s.record.get("id")))
    lines, run, trained = [f"  tokens {len(t.input_ids)}, trained {sum(l != IGNORE_INDEX for l in t.labels)}"
                           + (" (UNALIGNED: all masked)" if t.unaligned else "")], [], None

    def flush() -> None:
        if run:  # decode each stretch of text whole: a character may span several byte-level tokens
            pieces, chunk = [], []
            for i in run + [IMAGE_TOKEN_INDEX]:
                if i == IMAGE_TOKEN_INDEX:
                    pieces.append(tokenizer.decode(chunk) if chunk else "")
                    chunk = []
                else:
                    chunk.append(i)
            text = "<media>".join(pieces)
            lines.append(f"  {'LOSS' if trained else 'ctx '} | {text!r}")

    for i, label in zip(t.input_ids, t.labels):
        if (label != IGNORE_INDEX) != trained:
            flush()
            run, trained = [], label != IGNORE_INDEX
        run.append(i)
    flush()
    return lines


# --------------------------------------------------------------------------- demo
def demo(args: argparse.Namespace) -> int:
    """Regenerate the demo set (``lm_mini.recipes.demo.build_demo``) and say what its manifest holds."""
    import time

    from lm_mini.recipes.demo import build_demo

    start = time.perf_counter()
    manifest = build_demo(Path(args.out), seed=args.seed, scale=args.scale)
    for name, s in manifest["subsets"].items():
        print(f"{name:9s} {s['records']:6d} records  {s['question_types']}")
    base = manifest["majority_baseline"]["eval"]["overall"]["accuracy"]
    scenes = manifest["majority_baseline"]["scenes_eval"]["overall"]["accuracy"]
    print(f"majority baseline: eval {base:.3f}, scenes_eval {scenes:.3f}; tokenizer {manifest['tokenizer']['vocab_size']} tokens")
    held = manifest["encoder"]["held_out"]
    print(f"encoder (per patch, held-out images): colour {held['color_accuracy']:.3f}, shape {held['shape_accuracy']:.3f}, "
          f"empty {held['empty_accuracy']:.3f}, centre error {held['centre_error_px']:.1f} px")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0
