"""``lm-mini import | export | generate | chat``: released checkpoints in, model directories out, questions about
an image or a video (``lm_mini.interop``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from lm_mini.cli.common import add_trust_args, device
from lm_mini.constants import ATTENTION_BACKENDS


def add_commands(sub: Any) -> None:
    p = sub.add_parser("import", help="released checkpoint (LLaVA-Mini, LLaVA-1.5 original or transformers layout) -> model directory")
    p.add_argument("layout", choices=["llava-mini", "llava", "llava-hf"],
                   help="llava-mini: official LLaVA-Mini; llava: original LLaVA-1.5 (LlavaLlamaForCausalLM); "
                        "llava-hf: LlavaForConditionalGeneration")
    p.add_argument("dir", help="local checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--out", default=None, help="output model directory (default: DIR-lm_mini)")
    p.add_argument("--vision-tower", default=None, help="llava-mini, llava: local CLIP directory (config, and weights if DIR has none)")
    p.add_argument("--template", default=None, help="conversation template (default for a Llama-3 tokenizer: llava_llama_3_1, "
                   "the release's conv mode, for llava-mini, else llama3; otherwise vicuna_v1)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    p.set_defaults(func=import_checkpoint)

    p = sub.add_parser("export", help="run or checkpoint -> Hugging Face style model directory")
    p.add_argument("source", help="run directory (newest checkpoint), checkpoint (*.ckpt file or FSDP folder) or model directory")
    p.add_argument("--out", required=True, help="output directory (must not hold weights already)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    add_trust_args(p)
    p.set_defaults(func=export)

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
        p.add_argument("--device", type=device, default=None, help="default: cuda if available, else cpu")
        p.add_argument("--attn-implementation", default=None, choices=ATTENTION_BACKENDS,
                       help="attention backend for every part (default: the one the model was saved with; sdpa where "
                            "that cannot run here); every backend computes the same attention")
        add_trust_args(p)
        p.set_defaults(func=generate if name == "generate" else chat)




def import_checkpoint(args: argparse.Namespace) -> int:
    from lm_mini.interop.importers import import_llava, import_llava_hf, import_llava_mini

    src = Path(args.dir)
    out = Path(args.out) if args.out else src.with_name(src.name + "-lm_mini")
    try:
        if args.layout == "llava-mini":
            path = import_llava_mini(src, out, args.vision_tower, args.template, args.max_shard_size)
        elif args.layout == "llava":
            path = import_llava(src, out, args.vision_tower, args.template, args.max_shard_size)
        else:
            path = import_llava_hf(src, out, args.template, args.max_shard_size)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # WeightsMismatch is a ValueError
        print(f"lm-mini import: {e}", file=sys.stderr)
        return 2
    print(f"lm-mini: imported {args.layout} checkpoint {src} -> {path}\n"
          f"  try: lm-mini generate {path} --image FILE --prompt 'Describe the image.'")
    return 0


def export(args: argparse.Namespace) -> int:
    from lm_mini.interop.export import export as export_model

    try:
        out = export_model(args.source, args.out, args.max_shard_size)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"lm-mini export: {e}", file=sys.stderr)
        return 2
    print(f"lm-mini: exported {args.source} -> {out}")
    return 0


def _record(conv: Any, question: str, result: Dict[str, Any]) -> str:
    return json.dumps({"question": question, "answer": result["answer"], "tokens": result["tokens"],
                       "stopped": result["stopped"], "media": str(conv.media.path),
                       "kind": "video" if conv.media.is_video else "image", "frames": conv.media.frames,
                       "template": conv.template})


def _open_or_report(args: argparse.Namespace, command: str) -> Optional[Any]:
    from lm_mini.interop.generate import open_conversation

    try:
        return open_conversation(args.source, args.image, args.video, args.device, args.attn_implementation)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"lm-mini {command}: {e}", file=sys.stderr)
        return None


def generate(args: argparse.Namespace) -> int:
    conv = _open_or_report(args, "generate")
    if conv is None:
        return 2
    result = conv.ask(args.prompt, args.max_new_tokens, stream=None if args.json else sys.stdout)
    if args.json:
        print(_record(conv, args.prompt, result))
    return 0


def chat(args: argparse.Namespace) -> int:
    """One question per line of stdin; an empty line is skipped; EOF, ``exit`` or ``quit`` ends."""
    from lm_mini.interop.generate import EXIT_WORDS

    conv = _open_or_report(args, "chat")
    if conv is None:
        return 2
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lm-mini chat about {conv.media.path} ('exit' or Ctrl-D ends)", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        question = line.strip()
        if not line or question.lower() in EXIT_WORDS:
            return 0
        if not question:
            continue
        if args.json:
            print(_record(conv, question, conv.ask(question, args.max_new_tokens)), flush=True)
        else:
            print("assistant> ", end="", flush=True)
            conv.ask(question, args.max_new_tokens, stream=sys.stdout)
