"""``lm-mini generate`` and ``lm-mini chat``: answer questions about one image or video from the terminal.

    lm-mini generate runs/demo/finetune-1 --image cat.jpg --prompt "What animal is this?"
    lm-mini generate exported/ --video clip.mp4 --prompt "What happens?" --json
    lm-mini chat exported/ --image cat.jpg          # one question per line on stdin; EOF or "exit" ends

The model is any model directory, run directory or checkpoint (see :mod:`lm_mini.interop.export`); the
conversation template, image preprocessing and video frame sampling come from its config. Answers are
greedy and stream to the terminal token by token (``transformers.TextStreamer``); ``--json`` prints one
JSON object per answer instead. Each chat turn re-reads the whole conversation: pre-fusion mixes the
text into the vision tokens, so a new question changes every token the LLM sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO

import torch
from omegaconf import DictConfig
from transformers import TextStreamer

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
EXIT_WORDS = ("exit", "quit")


@dataclass
class Media:
    path: Path
    is_video: bool
    pixels: torch.Tensor  # [V, 3, H, W]: the views of one image, or one view per sampled video frame
    frames: int  # 1 for an image, T for a video


def media_file(path: str, is_video: bool) -> Path:
    """``path`` if it is an existing file of a supported image / video type (checked before any loading)."""
    p = Path(path)
    kind, exts = ("video", VIDEO_EXTS) if is_video else ("image", IMAGE_EXTS)
    if not p.is_file():
        raise FileNotFoundError(f"{kind} file not found: {p}")
    if p.suffix.lower() not in exts:
        raise ValueError(f"{p}: unsupported {kind} type '{p.suffix or '(none)'}'; supported: {' '.join(exts)}")
    return p


def load_media(path: str, is_video: bool, cfg: DictConfig) -> Media:
    """Decode and preprocess one image or video the way the model's training data was."""
    from lm_mini.data.errors import SampleError
    from lm_mini.data.media import ImageProcessor, decode_image, decode_video

    p = media_file(path, is_video)
    processor = ImageProcessor.from_config(cfg)
    try:
        if is_video:  # inference samples by fps, as official inference (1 fps), whatever training used
            frames = decode_video(p.read_bytes(), cfg.data.video_fps, cfg.data.max_frames, str(p))
            pixels, count = processor.video(frames), len(frames)
        else:
            pixels, count = processor.image(decode_image(p.read_bytes(), str(p))), 1
    except SampleError as e:
        raise ValueError(str(e)) from e  # names the file (sample id) and the reason
    return Media(p, is_video, pixels, count)


@dataclass
class Conversation:
    """A multi-turn conversation about one media item; ``ask`` answers and remembers the turn."""

    model: torch.nn.Module
    tokenizer: Any
    template: str
    media: Media
    turns: List[Dict[str, str]] = field(default_factory=list)  # LLaVA record turns so far

    def batch(self, question: str) -> Dict[str, Any]:
        """The one-sample batch of docs/internals.md for the conversation plus ``question``."""
        from lm_mini.data.conversation import build_prompt

        # has_media=True: the template puts the media slot at the front of the first question
        ids = build_prompt(self.turns + [{"from": "human", "value": question}], self.tokenizer, self.template, has_media=True)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": self.media.pixels.to(device), "frames_per_sample": torch.tensor([self.media.frames]),
                "is_video": torch.tensor([self.media.is_video]), "sample_ids": ["prompt"]}

    def stop_ids(self) -> List[int]:
        from lm_mini.registry import TEMPLATES

        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return sorted(set(TEMPLATES.get(self.template).stop_token_ids(self.tokenizer) + eos))

    def ask(self, question: str, max_new_tokens: int = 128, stream: Optional[TextIO] = None) -> Dict[str, Any]:
        """Greedy answer to ``question`` (streamed to ``stream`` as it is generated)."""
        stop = self.stop_ids()
        kwargs: Dict[str, Any] = {"eos_token_id": stop or None}
        if stream is not None:
            kwargs["streamer"] = StreamTo(stream, self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        new = self.model.generate(self.batch(question), max_new_tokens=max_new_tokens, **kwargs)[0].tolist()
        tokens = new[: next((i for i, t in enumerate(new) if t in stop), len(new))]
        answer = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        self.turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return {"answer": answer, "tokens": tokens, "stopped": len(tokens) < len(new)}


class StreamTo(TextStreamer):
    """``transformers.TextStreamer`` writing to any text stream (stdout, or a StringIO in tests)."""

    def __init__(self, stream: TextIO, tokenizer: Any, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        self.stream, self.started = stream, False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:  # answers often start with a space token (" blue"): print them as the JSON has them
            text = text.lstrip()
            self.started = bool(text)
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def open_conversation(source: str, image: Optional[str], video: Optional[str], device: Optional[str] = None,
                      attn_implementation: Optional[str] = None) -> Conversation:
    """Load the model named by ``source`` and the media item (exactly one of ``image`` / ``video``).
    ``attn_implementation``: the attention backend to run with (default: the saved one, or sdpa where that cannot run)."""
    from lm_mini.data.tokenizer import load_tokenizer
    from lm_mini.interop.export import load_model
    from lm_mini.runs import resolve_source

    if (image is None) == (video is None):
        raise ValueError("give exactly one of --image FILE or --video FILE")
    media_file(video or image, video is not None)  # a wrong path fails now, not after minutes of loading
    found = resolve_source(source)  # reads the config only
    media = load_media(video or image, video is not None, found.cfg)
    model, cfg = load_model(found, device or ("cuda" if torch.cuda.is_available() else "cpu"),
                            {"model.attn_implementation": attn_implementation} if attn_implementation else None)
    return Conversation(model, load_tokenizer(cfg.data.tokenizer), cfg.data.template, media)
