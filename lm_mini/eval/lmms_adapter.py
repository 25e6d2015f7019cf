"""lmms-eval model adapter: ``lmms-eval --model lm_mini --model_args pretrained=DIR --tasks ...`` evaluates an lm_mini
model (model directory, run directory or checkpoint) on lmms-eval's tasks.

Registration: lm_mini's ``pyproject.toml`` declares the entry point ``lm_mini = lm_mini.eval.lmms_adapter:manifest``
in the group ``lmms_eval.models``, which lmms-eval 0.7.3 reads at start (``ModelRegistryV2.load_entrypoint_manifests``),
so an installed lm_mini needs no ``--include_path`` or ``LMMS_EVAL_PLUGINS``. The adapter is a "simple" model
(``is_simple = True``): lmms-eval hands it the task's text prompt and visuals, and it applies lm_mini's own
conversation template and preprocessing, as ``lm-mini eval --benchmark`` does.

Installing: lmms-eval 0.7.3 pins ``av<16`` and lm_mini pins ``av==18.1.0``; neither side needs the other's PyAV
for this adapter (lm_mini decodes videos itself), so lmms-eval goes in without its dependency pins:
``pip install -c constraints.txt -c constraints-lmms.txt -e ".[lmms]" && pip install --no-deps lmms-eval==0.7.3``
(the ``lmms`` extra holds what lmms-eval's CLI, task loading and evaluator import; ``constraints-lmms.txt`` the
versions tested, filelock<4 among them). lmms_eval is imported only when present: without it this module still
imports (the adapter's methods work on any object with lmms-eval's ``Instance.args``).

- ``generate_until``: one media item per request (an image, or a video file lmms-eval names by path), the
  context as the user turn (``<image>\\n`` first unless the task placed it), ``until`` strings cut the answer,
  ``max_new_tokens`` / ``temperature`` / ``top_p`` / ``num_beams`` from the task's generation kwargs (greedy
  by default).
- ``loglikelihood``: log-probability of the continuation as the assistant's answer to the context (summed over
  its tokens), and whether greedy decoding would produce it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

try:  # present when lmms-eval runs us; the registry checks that the class is an lmms subclass
    from lmms_eval.api.model import lmms as _LMMBase
except ImportError:  # pragma: no cover - exercised where lmms-eval is not installed
    _LMMBase = object

MODEL_ID = "lm_mini"


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: lmms-eval's manifest for ``--model lm_mini``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LmMiniLMM")


class LmMiniLMM(_LMMBase):  # type: ignore[misc, valid-type]
    """``--model_args pretrained=DIR[,device=cuda][,max_new_tokens=N][,template=NAME]``."""

    is_simple = True

    def __init__(self, pretrained: str, device: Optional[str] = None, batch_size: Any = 1, max_new_tokens: int = 128,
                 template: Optional[str] = None, **kwargs: Any):
        if _LMMBase is not object:
            super().__init__()
        else:
            self._rank, self._world_size, self.task_dict = 0, 1, {}
        unknown = {k: v for k, v in kwargs.items() if v is not None}
        if unknown:
            raise ValueError(f"lm_mini: unknown --model_args {', '.join(sorted(unknown))} (known: pretrained, device, "
                             "max_new_tokens, template)")
        if str(batch_size) not in ("1", "auto"):
            raise ValueError(f"lm_mini: batch_size {batch_size}: this adapter answers one request at a time")
        from lm_mini.eval.benchmark_runner import load_for_benchmarks

        self.loaded = load_for_benchmarks(pretrained, device)
        self.template = template or self.loaded.cfg.data.template
        self.default_max_new_tokens = int(max_new_tokens)

    # -- lmms-eval's interface (rank/world_size come from lmms)
    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def device(self) -> Any:
        return next(self.loaded.model.parameters()).device

    # -- one request -> a model batch
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _media(self, visuals: Sequence[Any], where: str) -> Tuple[Any, int, bool]:
        """(pixel views, frames, is_video) of a request's visuals: none, one PIL image, or one video path."""
        from PIL import Image

        from lm_mini.data.media import decode_video

        visuals = [v for v in visuals if v is not None]
        if not visuals:
            return None, 0, False
        if len(visuals) > 1:
            raise ValueError(f"lm_mini: {where} has {len(visuals)} visuals; an lm_mini model takes one image or one video")
        v = visuals[0]
        if isinstance(v, Image.Image):
            return self.loaded.images.image(v.convert("RGB")), 1, False
        if isinstance(v, str):
            cfg = self.loaded.cfg.data
            with open(v, "rb") as f:
                frames = decode_video(f.read(), cfg.video_fps, cfg.max_frames, v)
            return self.loaded.images.video(frames), len(frames), True
        raise ValueError(f"lm_mini: {where}: unsupported visual {type(v).__name__} (a PIL image or a video path)")

    def _batch(self, context: str, visuals: Sequence[Any], where: str, continuation: Optional[str] = None) -> Dict[str, Any]:
        import torch

        from lm_mini.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, VIDEO_PLACEHOLDER
        from lm_mini.data.conversation import build_prompt

        pixels, frames, is_video = self._media(visuals, where)
        has_media = pixels is not None
        text = context
        if has_media and IMAGE_PLACEHOLDER not in text and VIDEO_PLACEHOLDER not in text:
            text = IMAGE_PLACEHOLDER + "\n" + text
        ids = build_prompt([{"from": "human", "value": text}], self.tokenizer, self.template, has_media=has_media, sample_id=where)
        labels = [IGNORE_INDEX] * len(ids)
        if continuation is not None:
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"lm_mini: {where}: empty continuation")
            ids, labels = ids + cont, labels + cont
        device = self.device
        input_ids = torch.tensor([ids], device=device)
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                 "pixel_values": pixels.to(device) if has_media else None, "frames_per_sample": torch.tensor([frames]),
                 "is_video": torch.tensor([is_video]), "sample_ids": [where]}
        if continuation is not None:
            batch["labels"] = torch.tensor([labels], device=device)
        assert ids.count(IMAGE_TOKEN_INDEX) == int(has_media)
        return batch

    # -- the methods lmms-eval calls
    def generate_until(self, requests: Sequence[Any]) -> List[str]:
        from lm_mini.eval.generation import GenerationOptions, generate_answers, stop_token_ids

        stop = stop_token_ids(self.tokenizer, self.template)
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            where = f"{task}/{split}/{doc_id}"
            gen = dict(gen_kwargs or {})
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            options = GenerationOptions(max_new_tokens=int(gen.get("max_new_tokens") or self.default_max_new_tokens),
                                        temperature=float(gen.get("temperature") or 0.0), top_p=gen.get("top_p"),
                                        num_beams=int(gen.get("num_beams") or 1))
            visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
            text = generate_answers(self.model, self._batch(context, visuals or [], where), self.tokenizer, stop, options)[0]
            for s in until:  # lmms-eval's stop strings: the answer ends before the first one
                if s:
                    text = text.split(s)[0]
            out.append(text)
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> List[Tuple[float, bool]]:
        import torch

        from lm_mini.constants import IGNORE_INDEX

        out = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            where = f"{task}/{split}/{doc_id}"
            doc = self._doc(task, split, doc_id) if (doc_to_visual is not None or not isinstance(doc_to_target, str)) else None
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            batch = self._batch(context, visuals or [], where, continuation=continuation)
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            with torch.inference_mode():
                logits = self.model(batch).logits[0].float()  # [S, V]: the media slot expanded; the continuation last
            targets = batch["labels"][0, -n:]
            scores = torch.log_softmax(logits[-n - 1:-1], dim=-1)
            logprob = float(scores.gather(1, targets[:, None]).sum())
            greedy = bool((scores.argmax(-1) == targets).all())
            out.append((logprob, greedy))
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> List[str]:
        raise NotImplementedError("lm_mini: multi-round generation is not supported by this adapter")
