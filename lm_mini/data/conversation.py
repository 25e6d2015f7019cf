"""Conversation templates and label masking, following the official LLaVA / LLaVA-Mini formats.

A LLaVA record's ``conversations`` is a list of ``{"from": ..., "value": ...}`` turns. A
:class:`Template` renders it to the exact prompt string the official code builds, as a list of
segments, each marked *trained* (an assistant answer plus its end-of-turn token) or not:

    vicuna_v1   <s>SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>
    llama3      <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nSYSTEM<|eot_id|>
                <|start_header_id|>user<|end_header_id|>\\n\\n<image>\\nQ<|eot_id|>
                <|start_header_id|>assistant<|end_header_id|>\\n\\nA<|eot_id|>
    plain       <s><image>CAPTION\\n                      (caption pretraining, LLaVA stage 1)

The media placeholder becomes the single id ``IMAGE_TOKEN_INDEX`` (each text chunk around it is
tokenized on its own, like official ``tokenizer_image_token``). Labels come from tokenizing segment
by segment and checking the result against the tokens of the whole text (see ``_align``), so the
masking is exact for any tokenizer (byte-level BPE, SentencePiece with its dummy prefix, ...) instead
of relying on per-tokenizer length corrections as the official ``preprocess_*`` do. Where a segment
boundary falls inside a token the sample is kept with every label masked and flagged
``unaligned`` (the official code prints "tokenization mismatch" and does the same).

BOS: the tokenizer is always called with ``add_special_tokens=False``; a template that wants a
BOS id (``vicuna_v1``, ``plain``: the Llama tokenizer's ``<s>``) prepends ``tokenizer.bos_token_id``
itself, and ``llama3`` writes ``<|begin_of_text|>`` in its text. So a tokenizer that adds BOS on
its own cannot double it, except where the release was evaluated so: ``llava_llama_3_1`` (the LLaVA-Mini
release's conv mode, llama3 otherwise) gives generation prompts the tokenizer's own BOS too, as official
inference does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from lm_mini.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, VIDEO_PLACEHOLDER
from lm_mini.data.errors import SampleError
from lm_mini.registry import TEMPLATES

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
# Role names found in LLaVA-style data ("from" field), mapped to ours.
ROLE_ALIASES = {
    "human": USER, "user": USER,
    "gpt": ASSISTANT, "assistant": ASSISTANT, "model": ASSISTANT,
    "system": SYSTEM,
}
PLACEHOLDERS = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)


@dataclass(frozen=True)
class Template:
    """How one conversation format renders. ``{system}`` / ``{message}`` are filled in.

    The rendered text is ``prefix + system_format + (user_format + assistant_prefix + answer_format)*``;
    ``answer_format`` is the trained part, so it carries the end-of-turn string.
    """

    name: str
    system: str  # default system prompt (a record's own system turn replaces it)
    system_format: str  # rendered only when the system prompt is non-empty
    user_format: str
    assistant_prefix: str  # what the model sees before it answers; build_prompt ends here
    answer_format: str
    end_of_turn: str  # the string that ends an answer (generation stops at it)
    prefix: str = ""  # literal text at the very start (llama3: <|begin_of_text|>)
    add_bos: bool = False  # prepend tokenizer.bos_token_id (Llama / Vicuna tokenizers add <s>)
    strip_messages: bool = False  # strip whitespace around each message (official llama3 does)
    caption_only: bool = False  # plain: the human turn is reduced to the media placeholder
    stop_strings: Tuple[str, ...] = ()  # besides end_of_turn, strings that end a generated answer
    # Generation prompts (build_prompt) also get the BOS the tokenizer adds by itself, as official inference's
    # tokenizer_image_token calls the tokenizer with its special tokens: before the template's own
    # <|begin_of_text|> that is a second one (official training strips it: preprocess_llama_3_1)
    generation_tokenizer_bos: bool = False

    def stop_token_ids(self, tokenizer: Any) -> List[int]:
        """Token ids that end a generated answer: the end-of-turn string and ``stop_strings``, each that is a single
        token of ``tokenizer`` (for generation)."""
        out: List[int] = []
        for text in (self.end_of_turn, *self.stop_strings):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and ids[0] not in out:
                out.append(ids[0])
        return out


# LLaVA-1.5 (official conv_vicuna_v1, SeparatorStyle.TWO, sep=" ", sep2="</s>"; the "v1" version
# the LLaVA-1.5 finetune script trains with). The "ASSISTANT:" / " answer" split puts the space
# in the answer: SentencePiece and byte-level BPE both attach a space to the following word.
VICUNA_V1 = TEMPLATES.register("vicuna_v1")(Template(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    system_format="{system} ",
    user_format="USER: {message} ",
    assistant_prefix="ASSISTANT:",
    answer_format=" {message}</s>",
    end_of_turn="</s>",
    add_bos=True,
))

# LLaVA-Mini release (Llama-3.1-8B, conv mode llava_llama_3_1): the Llama-3 chat layout.
LLAMA3 = TEMPLATES.register("llama3")(Template(
    name="llama3",
    system="You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.",
    system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user_format="<|start_header_id|>user<|end_header_id|>\n\n{message}<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    answer_format="{message}<|eot_id|>",
    end_of_turn="<|eot_id|>",
    prefix="<|begin_of_text|>",
    strip_messages=True,
    stop_strings=("<|eom_id|>", "<|end_of_text|>"),  # Llama-3.1's other ends (the release: eos 128009, 128008, 128001)
))

# The LLaVA-Mini release's conv mode, official conv_llava_llama_3_1 (what `lm-mini import llava-mini` sets for a
# Llama-3 tokenizer): llama3's text in training and inference, and at inference the prompt ids official eval
# (run_llava_mini.py, model_vqa_loader.py, eval/video/*.py: tokenizer_image_token) fed the release's benchmarks:
# the tokenizer's own <|begin_of_text|> before the template's, two BOS. Official training removes the duplicate
# (train.py preprocess_llama_3_1), so the release was trained on one and evaluated on two.
LLAVA_LLAMA_3_1 = TEMPLATES.register("llava_llama_3_1")(replace(LLAMA3, name="llava_llama_3_1", generation_tokenizer_bos=True))

# Caption pretraining (official conv_llava_plain + preprocess_plain): <s><image>caption\n.
PLAIN = TEMPLATES.register("plain")(Template(
    name="plain",
    system="",
    system_format="",
    user_format="{message}",
    assistant_prefix="",
    answer_format="{message}\n",
    end_of_turn="\n",
    add_bos=True,
    caption_only=True,
))


@dataclass
class TokenizedSample:
    input_ids: List[int]  # IMAGE_TOKEN_INDEX at the media slot
    labels: List[int]  # IGNORE_INDEX except assistant answers + end-of-turn token
    truncated: bool = False  # cut at max_length (caller counts "too_long")
    unaligned: bool = False  # answer spans not on token boundaries: every label masked ("unaligned_mask")


# --------------------------------------------------------------------------- record checks
def _resolve(template: Union[str, Template]) -> Template:
    return template if isinstance(template, Template) else TEMPLATES.get(template)


def normalize_turns(conversations: Any, has_media: bool, sample_id: Optional[str] = None) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """Validate a LLaVA ``conversations`` list -> (system prompt or None, [(role, text)]).

    Follows official LLaVA: a leading assistant turn is dropped; the media placeholder is moved
    to the start of its turn as ``<image>\\n`` (inserted into the first human turn when the record
    has media but no placeholder). Roles must then alternate user/assistant starting with user.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise SampleError("malformed_record", "'conversations' must be a non-empty list", sample_id)
    system: Optional[str] = None
    turns: List[Tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise SampleError("malformed_record", f"turn {i} is not {{'from': str, 'value': str}}: {turn!r:.80}", sample_id)
        role = ROLE_ALIASES.get(turn["from"].lower())
        if role is None:
            raise SampleError("malformed_record", f"turn {i} has unknown role {turn['from']!r}", sample_id)
        if role == SYSTEM:
            if i != 0:
                raise SampleError("malformed_record", f"system turn at position {i}; only the first turn may be one", sample_id)
            system = turn["value"]
            placed = sum(system.count(tag) for tag in PLACEHOLDERS)
            if placed:  # the system text is rendered as is: its placeholder would become a second media slot
                raise SampleError("placeholder_mismatch", f"system turn has {placed} media placeholder(s); the media "
                                  "slot belongs in a human turn", sample_id)
            continue
        turns.append((role, turn["value"]))
    if turns and turns[0][0] == ASSISTANT:
        turns = turns[1:]  # official LLaVA: "Skip the first one if it is not from human"
    if not turns:
        raise SampleError("malformed_record", "no human turn", sample_id)
    for j, (role, _) in enumerate(turns):
        if role != (USER if j % 2 == 0 else ASSISTANT):
            raise SampleError("malformed_record", f"roles do not alternate human/gpt at turn {j}", sample_id)
    return system, _place_media(turns, has_media, sample_id)


def _place_media(turns: List[Tuple[str, str]], has_media: bool, sample_id: Optional[str]) -> List[Tuple[str, str]]:
    found = [(j, tag) for j, (_, text) in enumerate(turns) for tag in PLACEHOLDERS for _ in range(text.count(tag))]
    if not has_media:
        if found:
            raise SampleError("placeholder_mismatch", f"text-only sample has {len(found)} media placeholder(s)", sample_id)
        return turns
    if len(found) > 1:
        raise SampleError("placeholder_mismatch", f"{len(found)} media placeholders for one media item", sample_id)
    j = found[0][0] if found else 0
    if turns[j][0] != USER:
        raise SampleError("placeholder_mismatch", f"media placeholder in an assistant turn ({j})", sample_id)
    text = turns[j][1]
    for tag in PLACEHOLDERS:
        text = text.replace(tag, "")
    out = list(turns)
    # Official preprocess_multimodal: "<image>\n" + rest.strip(); video uses the same single slot.
    out[j] = (USER, (IMAGE_PLACEHOLDER + "\n" + text.strip()).strip())
    return out


# --------------------------------------------------------------------------- rendering
Segment = Tuple[str, bool]  # (text, trained)


def render_segments(conversations: Any, template: Union[str, Template], has_media: bool,
                    generation: bool = False, sample_id: Optional[str] = None) -> List[Segment]:
    """The rendered prompt as (text, trained) segments; their concatenation is the prompt string.

    ``generation=True``: a trailing assistant turn (the reference answer) is dropped and the text
    ends with the assistant prefix, ready for the model to answer.
    """
    tpl = _resolve(template)
    system, turns = normalize_turns(conversations, has_media, sample_id)
    if generation and turns[-1][0] == ASSISTANT:
        turns = turns[:-1]
    if tpl.caption_only and len(turns) != (1 if generation else 2):
        raise SampleError("malformed_record", f"template 'plain' needs one human and one gpt turn, got {len(turns)} turns", sample_id)

    def clean(text: str) -> str:
        return text.strip() if tpl.strip_messages else text

    system = tpl.system if system is None else system
    head = tpl.prefix + (tpl.system_format.format(system=clean(system)) if system else "")
    segments: List[Segment] = []
    prompt = head
    for role, text in turns:
        if role == USER:
            if tpl.caption_only:  # official preprocess_plain keeps only the image of the human turn
                text = IMAGE_PLACEHOLDER if has_media else ""
            prompt += tpl.user_format.format(message=clean(text)) + tpl.assistant_prefix
        else:
            segments += [(prompt, False), (tpl.answer_format.format(message=clean(text)), True)]
            prompt = ""
    if generation or prompt:
        segments.append((prompt, False))
    return [s for s in segments if s[0]]


def render(conversations: Any, template: Union[str, Template], has_media: bool, generation: bool = False) -> str:
    """The full prompt string (what official ``conv.get_prompt()`` returns, BOS id not included)."""
    return "".join(text for text, _ in render_segments(conversations, template, has_media, generation))


# --------------------------------------------------------------------------- tokenization
def _encode(texts: Sequence[str], tokenizer: Any) -> List[List[int]]:
    """Tokenize texts without special tokens; each media placeholder becomes IMAGE_TOKEN_INDEX.

    Like official ``tokenizer_image_token``, the chunks around the placeholder are tokenized on
    their own. All chunks of all texts go through the tokenizer in one batched call.
    """
    pieces = [t.split(IMAGE_PLACEHOLDER) for t in texts]
    flat = [chunk for chunks in pieces for chunk in chunks]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for chunks in pieces:
        seq: List[int] = []
        for c in range(len(chunks)):
            if c:
                seq.append(IMAGE_TOKEN_INDEX)
            seq.extend(ids[k])
            k += 1
        out.append(seq)
    return out


def _bos(template: Template, tokenizer: Any, generation: bool = False) -> List[int]:
    """The BOS id to prepend: the template's (``add_bos``), or at ``generation`` with ``generation_tokenizer_bos``
    the one the tokenizer adds by itself (official ``tokenizer_image_token``); never two from here."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    if template.add_bos or (generation and template.generation_tokenizer_bos and _adds_bos(tokenizer)):
        return [bos]
    return []


def _adds_bos(tokenizer: Any) -> bool:
    """Whether calling ``tokenizer`` with its special tokens puts its BOS first (Llama-3's post-processor does;
    lm_mini's demo tokenizer does not)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id


def _align(segments: List[Segment], tokenizer: Any) -> Tuple[List[int], Optional[List[int]]]:
    """Tokens of the whole text, and the token index where each segment ends (None: unaligned).

    Fast path: the segments tokenized one by one concatenate to the whole text's tokens (true for
    byte-level BPE whose pre-tokenizer splits at the boundaries). Otherwise (e.g. SentencePiece's
    dummy prefix at the start of every call) tokenize the text up to each segment end and require
    those tokens to be a prefix of the whole text's tokens: then that end is a token boundary.
    """
    texts = [text for text, _ in segments]
    *parts, full = _encode(texts + ["".join(texts)], tokenizer)
    if [t for p in parts for t in p] == full:
        return full, list(accumulate(len(p) for p in parts))
    prefixes = _encode(["".join(texts[: k + 1]) for k in range(len(texts) - 1)], tokenizer) + [full]
    if any(full[: len(p)] != p for p in prefixes):
        return full, None
    return full, [len(p) for p in prefixes]


def tokenize_conversation(conversations: Any, tokenizer: Any, template: Union[str, Template], max_length: int,
                          has_media: bool, sample_id: Optional[str] = None) -> TokenizedSample:
    """Token ids and labels of a training record (every assistant answer + end-of-turn is trained).

    Raises ``SampleError`` for records that cannot be used (``malformed_record``,
    ``placeholder_mismatch``, ``media_past_max_length`` when truncation would cut the media slot); flags the
    samples that are kept but altered (``unaligned``, ``truncated``).
    """
    tpl = _resolve(template)
    segments = render_segments(conversations, tpl, has_media, sample_id=sample_id)
    full, ends = _align(segments, tokenizer)
    bos = _bos(tpl, tokenizer)
    input_ids = bos + full
    labels = [IGNORE_INDEX] * len(input_ids)
    if ends is not None:
        start = 0
        for (_, trained), end in zip(segments, ends):
            if trained:
                labels[len(bos) + start: len(bos) + end] = full[start:end]
            start = end
    unaligned = ends is None
    truncated = len(input_ids) > max_length
    if truncated:
        if IMAGE_TOKEN_INDEX in input_ids[max_length:]:
            # Cutting the media slot would leave pixels with nowhere to go: not a usable sample.
            raise SampleError("media_past_max_length", f"media slot at token {input_ids.index(IMAGE_TOKEN_INDEX)} is beyond "
                              f"max_length {max_length}", sample_id)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedSample(input_ids, labels, truncated, unaligned)


def build_prompt(conversations: Any, tokenizer: Any, template: Union[str, Template], has_media: bool,
                 sample_id: Optional[str] = None) -> List[int]:
    """Token ids of the conversation so far, ending with the assistant prefix (for generation).

    A trailing assistant turn (e.g. an evaluation record's reference answer) is left out. With the template's
    ``generation_tokenizer_bos`` (``llava_llama_3_1``) the ids start as official inference's do (two BOS with a
    Llama-3 tokenizer); training ids (:func:`tokenize_conversation`) never have the tokenizer's own BOS.
    """
    tpl = _resolve(template)
    text = "".join(t for t, _ in render_segments(conversations, tpl, has_media, generation=True, sample_id=sample_id))
    return _bos(tpl, tokenizer, generation=True) + _encode([text], tokenizer)[0]


def template_corpus(records: Iterable[Tuple[Any, bool]], templates: Sequence[str] = ("plain", "vicuna_v1", "llama3")) -> Iterator[str]:
    """Texts for training a tokenizer: each (conversations, has_media) rendered through each
    template, split at the media placeholder (which never reaches the tokenizer). Records a
    template cannot render (e.g. multi-turn under ``plain``) are left out for that template."""
    for conversations, has_media in records:
        for name in templates:
            try:
                text = render(conversations, name, has_media)
            except SampleError:
                continue
            yield from (chunk for chunk in text.split(IMAGE_PLACEHOLDER) if chunk)
