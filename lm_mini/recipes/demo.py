"""The synthetic demo data set: coloured shapes, moving-shape videos, captions and text-only records.

``lm-mini shards demo --out data_shards/demo`` draws everything from a seed, writes LLaVA-format
JSON + media into a temporary folder, turns each sub-set into WebDataset shards with
:func:`lm_mini.data.shards.build_shards` and trains the demo BPE tokenizer on the corpus rendered
through every conversation template. The result is small enough to ship in the repository and easy
enough that a tiny model (64x64 ViT, one vision token, 128-wide Llama) learns it on CPU in minutes.

Sub-sets (each its own shard set with ``index.json``):

- ``captions``  image + "a red circle on the left and a blue square at the top" (pretraining stage);
- ``instruct``  image QA about colour / shape / count / position (some multi-turn) + text-only records;
- ``video``     8-frame 64x64 mp4 clips: which way a shape moves, which colour appears first/last;
- ``eval``      held-out image QA and video QA from its own random stream, no scene shared with
                training (single-turn, answers balanced).

Answers are balanced by construction (the answer is drawn first, then a scene that has it), so the
majority-answer baseline per question type stays near chance; ``manifest.json`` records it.
Same seed and scale -> byte-identical output (given the same Pillow / PyAV builds).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw

from lm_mini.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from lm_mini.eval.baseline import majority_baseline

# --------------------------------------------------------------------------- the visual world
IMAGE_SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: anti-aliased edges, sub-pixel positions
JPEG_QUALITY = 75
VIDEO_FRAMES = 8
VIDEO_FPS = 2  # 8 frames = 4 s, so a loader sampling at ~1 fps still sees 4 frames spread over the clip

# Far apart in RGB and bright against the dark background: after JPEG / H.264 a shape's interior
# stays nearest its own colour.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 210),
}
SHAPES = ("circle", "square", "triangle")
# Shapes sit in four slots around the centre; with the sizes below their boxes never overlap.
SLOTS: Dict[str, Tuple[float, float]] = {"left": (13, 32), "right": (51, 32), "top": (32, 13), "bottom": (32, 51)}
SLOT_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
MIN_RADIUS, MAX_RADIUS, JITTER = 6.0, 8.0, 1.0  # half-size of a shape and slot jitter, in pixels
DIRECTIONS: Dict[str, Tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNTS = ("1", "2", "3")

# The answer set of every question type: balancing draws from these, the manifest reports against them.
ANSWERS: Dict[str, Sequence[str]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNTS,
    "position": tuple(SLOTS),
    "direction": tuple(DIRECTIONS),
    "order": tuple(COLORS),
}
IMAGE_QUESTION_TYPES = ("color", "shape", "count", "position")
VIDEO_QUESTION_TYPES = ("direction", "order")


@dataclass(frozen=True)
class Thing:
    """One shape on the canvas: centre (cx, cy) and half-size r in output pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float
    slot: Optional[str] = None  # which of SLOTS it sits in (None in videos, where shapes move freely)


def _draw(draw: ImageDraw.ImageDraw, t: Thing, fill) -> None:
    """One shape on a canvas SUPERSAMPLE times the output size."""
    s = SUPERSAMPLE
    x0, y0, x1, y1 = (t.cx - t.r) * s, (t.cy - t.r) * s, (t.cx + t.r) * s, (t.cy + t.r) * s
    if t.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif t.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:  # triangle, apex up: its bottom corners are filled, its top corners are not
        draw.polygon([(t.cx * s, y0), (x0, y1), (x1, y1)], fill=fill)


def render(things: Iterable[Thing], background: int) -> Image.Image:
    """Draw the shapes on a flat grey background, anti-aliased by supersampling."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for t in things:
        _draw(draw, t, COLORS[t.color])
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def coverage(t: Thing) -> Image.Image:
    """The share of each output pixel that shape ``t`` covers, as an 8-bit mask (255 = fully covered)."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    _draw(ImageDraw.Draw(canvas), t, 255)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: with the default 4:2:0 a blue square's corners blur into a circle-like blob.
    # optimize: Huffman tables fitted to the image, ~30% smaller files.
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=True)
    return buf.getvalue()


def mp4_bytes(frames: Sequence[Image.Image], fps: int = VIDEO_FPS) -> bytes:
    """H.264 in MP4, byte-identical for identical frames: one encoder thread, and no macroblock-tree
    rate control (with it, x264 1 thread still gave another encoding of the same frames now and then)."""
    import av  # imported here: only the video sub-set needs it

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = IMAGE_SIZE, IMAGE_SIZE, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "28", "preset": "veryslow", "x264-params": "mbtree=0"}  # tiny files; flat shapes survive it intact
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return buf.getvalue()


# --------------------------------------------------------------------------- scenes
def _background(rng: random.Random) -> int:
    return rng.randint(20, 60)


def _radius(rng: random.Random) -> float:
    return rng.uniform(MIN_RADIUS, MAX_RADIUS)


def random_scene(rng: random.Random, n: int, **target: str) -> List[Thing]:
    """``n`` shapes in distinct slots with distinct (colour, shape) pairs; ``target`` fixes attributes
    (shape/color/slot) of the first one, the one a question will be about."""
    slots = [target["slot"]] if "slot" in target else []
    slots += rng.sample([s for s in SLOTS if s not in slots], n - len(slots))
    things: List[Thing] = []
    for i, slot in enumerate(slots):
        while True:
            shape = target["shape"] if i == 0 and "shape" in target else rng.choice(SHAPES)
            color = target["color"] if i == 0 and "color" in target else rng.choice(tuple(COLORS))
            if all((t.shape, t.color) != (shape, color) for t in things):
                break
        cx, cy = SLOTS[slot]
        things.append(Thing(shape, color, cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER), _radius(rng), slot))
    return things


def scene_key(things: Sequence[Thing]) -> Tuple:
    """Identity of a scene, for keeping eval scenes out of train (positions and sizes are continuous,
    so different keys practically mean different drawings)."""
    return tuple(sorted((t.shape, t.color, t.slot, round(t.cx, 2), round(t.cy, 2), round(t.r, 2)) for t in things))


def caption(things: Sequence[Thing]) -> str:
    """'a red circle on the left and a blue square at the top' (shapes in slot order)."""
    order = list(SLOTS)
    parts = [f"a {t.color} {t.shape} {SLOT_PHRASE[t.slot]}" for t in sorted(things, key=lambda t: order.index(t.slot))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _unique(things: Sequence[Thing], attr: str) -> bool:
    """Does the first shape's ``attr`` single it out?"""
    return sum(getattr(t, attr) == getattr(things[0], attr) for t in things) == 1


def ask(rng: random.Random, qtype: str, things: Sequence[Thing]) -> Tuple[str, str]:
    """(question, answer) of type ``qtype`` about the first shape (or, for count, the whole scene).

    A shape is named by something that singles it out and is not what is asked: its slot (always
    unique), its shape or its colour when unique, or colour + shape (unique by construction)."""
    t, alone = things[0], len(things) == 1
    if qtype == "count":
        return "How many shapes are there?", str(len(things))
    if qtype == "color":
        options = ["What color is the shape?"] if alone else [f"What color is the shape {SLOT_PHRASE[t.slot]}?"]
        if not alone and _unique(things, "shape"):
            options.append(f"What color is the {t.shape}?")
        return rng.choice(options), t.color
    if qtype == "shape":
        options = ["What shape is in the image?"] if alone else [f"Which shape is {SLOT_PHRASE[t.slot]}?"]
        if not alone and _unique(things, "color"):
            options.append(f"Which shape is {t.color}?")
        return rng.choice(options), t.shape
    if qtype == "position":
        options = ["Where is the shape?"] if alone else [f"Where is the {t.color} {t.shape}?"]
        if not alone and _unique(things, "shape"):
            options.append(f"Where is the {t.shape}?")
        if not alone and _unique(things, "color"):
            options.append(f"Where is the {t.color} shape?")
        return rng.choice(options), t.slot
    raise ValueError(f"unknown image question type {qtype!r}")


def balanced_plan(rng: random.Random, qtypes: Sequence[str], n: int) -> List[Tuple[str, str]]:
    """``n`` (question type, answer) pairs: types in equal shares, each type's answers in equal
    shares (round robin from a random offset), then shuffled."""
    plan = []
    for k, qtype in enumerate(qtypes):
        answers, offset = ANSWERS[qtype], rng.randrange(len(ANSWERS[qtype]))
        share = n // len(qtypes) + (k < n % len(qtypes))
        plan += [(qtype, answers[(offset + i) % len(answers)]) for i in range(share)]
    rng.shuffle(plan)
    return plan


def scene_for(rng: random.Random, qtype: str, answer: str) -> List[Thing]:
    """A scene in which the question of ``qtype`` about its first shape has ``answer``."""
    if qtype == "count":
        return random_scene(rng, int(answer))
    key = {"color": "color", "shape": "shape", "position": "slot"}[qtype]
    return random_scene(rng, rng.randint(1, 3), **{key: answer})


# --------------------------------------------------------------------------- videos
def moving_clip(rng: random.Random, direction: str) -> List[Image.Image]:
    """One shape crossing the frame in ``direction``."""
    dx, dy = DIRECTIONS[direction]
    shape, color, r, bg = rng.choice(SHAPES), rng.choice(tuple(COLORS)), _radius(rng), _background(rng)
    start, end, across = rng.uniform(12, 16), rng.uniform(48, 52), rng.uniform(16, 48)
    frames = []
    for i in range(VIDEO_FRAMES):
        along = start + (end - start) * i / (VIDEO_FRAMES - 1)
        if dx + dy < 0:  # left / up: run the same path backwards
            along = IMAGE_SIZE - along
        cx, cy = (along, across) if dx else (across, along)
        frames.append(render([Thing(shape, color, cx, cy, r)], bg))
    return frames


def order_clip(rng: random.Random, first: str, last: str) -> List[Image.Image]:
    """A shape of colour ``first`` for the first half of the clip, then another of colour ``last``."""
    bg, frames = _background(rng), []
    halves = [Thing(rng.choice(SHAPES), c, rng.uniform(16, 48), rng.uniform(16, 48), _radius(rng)) for c in (first, last)]
    for i in range(VIDEO_FRAMES):
        frames.append(render([halves[0] if i < VIDEO_FRAMES // 2 else halves[1]], bg))
    return frames


def video_qa(rng: random.Random, qtype: str, answer: str) -> Tuple[List[Image.Image], str]:
    if qtype == "direction":
        return moving_clip(rng, answer), "Which way does the shape move?"
    other = rng.choice([c for c in COLORS if c != answer])
    if rng.random() < 0.5:
        return order_clip(rng, answer, other), "Which color appears first?"
    return order_clip(rng, other, answer), "Which color appears last?"


# --------------------------------------------------------------------------- scenes (the C x pre-fusion ablation)
# Four to six shapes on a 3x3 grid of cells. Every question names one shape by an attribute no other shape in the
# scene has (its shape, or its colour) and asks for the other: the answer binds two attributes of one object, which
# averaging the scene into one token loses, and which a question token that reads the patch tokens (pre-fusion, or
# the LLM over all patch tokens) can look up. ("Where is the red shape?" -> its cell was tried too: with pre-fusion
# at depth 1 one token stayed near chance on it while LLaVA-1.5 learned it; benchmarks/RESULTS.md.)
SCENE_GRID = 3
CELL = IMAGE_SIZE / SCENE_GRID
CELLS: Dict[str, Tuple[float, float]] = {  # name -> centre, row-major
    name: ((i % SCENE_GRID + 0.5) * CELL, (i // SCENE_GRID + 0.5) * CELL)
    for i, name in enumerate(("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right"))
}
SCENE_OBJECTS = (4, 6)  # shapes per scene, inclusive
SCENE_RADIUS, SCENE_JITTER = (6.0, 7.5), 1.5  # r + jitter < CELL / 2: shapes never leave their cell
SCENE_QUESTION_TYPES = ("scene_color", "scene_shape")
ANSWERS.update({"scene_color": tuple(COLORS), "scene_shape": SHAPES})
_KEY = {"scene_color": "shape", "scene_shape": "color"}  # the attribute that names the asked-about shape (unique)
_ASKED = {"scene_color": "color", "scene_shape": "shape"}


def _scene_thing(rng: random.Random, shape: str, color: str, cell: str) -> Thing:
    cx, cy = CELLS[cell]
    return Thing(shape, color, cx + rng.uniform(-SCENE_JITTER, SCENE_JITTER), cy + rng.uniform(-SCENE_JITTER, SCENE_JITTER),
                 rng.uniform(*SCENE_RADIUS), cell)


def grid_scene(rng: random.Random, n: int, key: Optional[str] = None, **target: str) -> List[Thing]:
    """``n`` shapes in distinct cells; ``target`` fixes attributes (shape / color / slot) of the first one, and
    ``key`` (``shape`` or ``color``) makes that attribute of the first one unique in the scene."""
    cells = [target["slot"]] if "slot" in target else []
    cells += rng.sample([c for c in CELLS if c not in cells], n - len(cells))
    first = _scene_thing(rng, target.get("shape") or rng.choice(SHAPES), target.get("color") or rng.choice(tuple(COLORS)), cells[0])
    things = [first]
    for cell in cells[1:]:
        shapes = [s for s in SHAPES if not (key == "shape" and s == first.shape)]
        colors = [c for c in COLORS if not (key == "color" and c == first.color)]
        things.append(_scene_thing(rng, rng.choice(shapes), rng.choice(colors), cell))
    return things


def _unique_in(things: Sequence[Thing], t: Thing, attr: str) -> bool:
    return sum(getattr(o, attr) == getattr(t, attr) for o in things) == 1


def ask_scene(qtype: str, things: Sequence[Thing], t: Thing) -> Optional[Tuple[str, str]]:
    """(question, answer) of ``qtype`` about shape ``t`` of the scene, which the question names by its shape
    (``scene_color``) or its colour (``scene_shape``); None when another shape shares that attribute."""
    if not _unique_in(things, t, _KEY[qtype]):
        return None
    if qtype == "scene_color":
        return f"What color is the {t.shape}?", t.color
    return f"What shape is the {t.color} one?", t.shape


def binding_scene(rng: random.Random, qtype: str, answer: str) -> List[Thing]:
    """A scene whose first shape has ``answer`` as the attribute ``qtype`` asks and is the only one with the
    attribute that names it."""
    return grid_scene(rng, rng.randint(*SCENE_OBJECTS), key=_KEY[qtype], **{_ASKED[qtype]: answer})


# --------------------------------------------------------------------------- text-only
FACTS = (
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color is a ripe banana?", "yellow"),
    ("What color is a ripe strawberry?", "red"),
    ("What color are grapes?", "purple"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("How many corners does a circle have?", "0"),
)


def text_qa(rng: random.Random) -> Tuple[str, str]:
    """Small-number arithmetic most of the time, otherwise a colour/shape fact."""
    if rng.random() < 0.25:
        return rng.choice(FACTS)
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", str(a - b)


# --------------------------------------------------------------------------- records
def turns(pairs: Sequence[Tuple[str, str]], placeholder: Optional[str]) -> List[Dict[str, str]]:
    """LLaVA conversation; the media placeholder opens the first human turn."""
    conv = []
    for i, (question, answer) in enumerate(pairs):
        value = f"{placeholder}\n{question}" if i == 0 and placeholder else question
        conv += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return conv


class Writer:
    """Collects one sub-set's records and writes their media under ``root`` (images/, videos/)."""

    def __init__(self, root: Path, name: str, avoid: Optional[set] = None):
        self.root, self.name, self.records = root, name, []
        self.scenes: set = set()  # keys of the scenes drawn here
        self.avoid = avoid if avoid is not None else set()  # keys of scenes another split already drew
        for sub in ("images", "videos"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def add(self, conversations: List[Dict[str, str]], media: Optional[bytes] = None, kind: str = "image", **extra) -> None:
        rid = f"{self.name}-{len(self.records):05d}"
        record = {"id": rid}
        if media is not None:
            rel = f"images/{rid}.jpg" if kind == "image" else f"videos/{rid}.mp4"
            (self.root / rel).write_bytes(media)
            record[kind] = rel
        record["conversations"] = conversations
        record.update(extra)
        self.records.append(record)

    def new_scene(self, draw: Callable[[], List[Thing]]) -> List[Thing]:
        """Call ``draw`` until it gives a scene not in ``avoid`` (eval stays disjoint from train)."""
        things = draw()
        while scene_key(things) in self.avoid:
            things = draw()
        self.scenes.add(scene_key(things))
        return things

    def save(self) -> Path:
        path = self.root / f"{self.name}.json"
        path.write_text(json.dumps(self.records, indent=1) + "\n")
        return path


# Sample counts at scale 1.0 (records, not QA pairs: multi-turn records hold 2-3 questions).
SIZES = {
    "captions": 1000,
    "instruct_image": 3200,
    "instruct_text": 200,
    "video": 400,
    "eval_image": 400,
    "eval_video": 100,
    # 1500 training scenes were too few: one token with pre-fusion learned them by heart (training loss 0.002,
    # held-out 0.63 after 3000 steps) where 4000 taught it the rule (0.98 on colour and shape questions)
    "scenes": 4000,
    "scenes_eval": 400,
}
SCENE_EXTRA_QUESTIONS = 1  # a training scene is asked one question of each type (when its shapes allow)
# Scene records carry their own short system prompt (it replaces the template's ~30-token one): the ablation's runs
# spend their steps on the image and the questions.
SCENE_SYSTEM = "Answer in one word."
MULTI_TURN_FRACTION = 0.2
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?", "Write a short caption for the image.")


def write_captions(w: Writer, rng: random.Random, n: int) -> None:
    for _ in range(n):
        things = w.new_scene(lambda: random_scene(rng, rng.randint(1, 3)))
        w.add(turns([(rng.choice(CAPTION_PROMPTS), caption(things))], IMAGE_PLACEHOLDER), jpeg_bytes(render(things, _background(rng))))


def write_image_qa(w: Writer, rng: random.Random, n: int, multi_turn: float) -> None:
    """Balanced single-turn questions, plus a ``multi_turn`` share of 2-3-question records about a
    random scene."""
    n_multi = round(n * multi_turn)
    for qtype, answer in balanced_plan(rng, IMAGE_QUESTION_TYPES, n - n_multi):
        things = w.new_scene(lambda: scene_for(rng, qtype, answer))
        question, got = ask(rng, qtype, things)
        assert got == answer, (qtype, answer, got)  # scene_for put the answer on the asked-about shape
        w.add(turns([(question, answer)], IMAGE_PLACEHOLDER), jpeg_bytes(render(things, _background(rng))), question_type=qtype)
    for _ in range(n_multi):
        things = w.new_scene(lambda: random_scene(rng, rng.randint(1, 3)))
        pairs = [ask(rng, q, things) for q in rng.sample(IMAGE_QUESTION_TYPES, rng.randint(2, 3))]
        w.add(turns(pairs, IMAGE_PLACEHOLDER), jpeg_bytes(render(things, _background(rng))), question_type="multi_turn")


def write_scene_qa(w: Writer, rng: random.Random, n: int, extra: int) -> None:
    """Balanced binding questions about multi-object scenes (the first question of each record); training records
    (``extra`` > 0) ask up to ``extra`` more, of the other types, about any shape that can be named uniquely."""
    for qtype, answer in balanced_plan(rng, SCENE_QUESTION_TYPES, n):
        things = w.new_scene(lambda: binding_scene(rng, qtype, answer))
        pairs = [ask_scene(qtype, things, things[0])]
        assert pairs[0] is not None and pairs[0][1] == answer, (qtype, answer, pairs)  # binding_scene made it so
        for other in rng.sample([q for q in SCENE_QUESTION_TYPES if q != qtype], extra):
            options = [qa for qa in (ask_scene(other, things, t) for t in things) if qa is not None]
            if options:
                pairs.append(rng.choice(options))
        w.add([{"from": "system", "value": SCENE_SYSTEM}] + turns(pairs, IMAGE_PLACEHOLDER), jpeg_bytes(render(things, _background(rng))),
              question_type=qtype if len(pairs) == 1 else "scene_multi_turn")


def write_video_qa(w: Writer, rng: random.Random, n: int) -> None:
    for qtype, answer in balanced_plan(rng, VIDEO_QUESTION_TYPES, n):
        frames, question = video_qa(rng, qtype, answer)
        w.add(turns([(question, answer)], VIDEO_PLACEHOLDER), mp4_bytes(frames), kind="video", question_type=qtype)


def write_text(w: Writer, rng: random.Random, n: int) -> None:
    for _ in range(n):
        w.add(turns([text_qa(rng)], None), question_type="text")


# --------------------------------------------------------------------------- the whole set
SHARDS_PER_SET = 8  # enough shards to split over 4 ranks x 2 loader workers
SUBSETS = {  # sub-set -> (what it is for, template it trains with)
    "captions": ("image captions for the pretraining stage", "plain"),
    "instruct": ("image QA (colour, shape, count, position; 20% multi-turn) + text-only QA", None),
    "video": ("8-frame videos: which way a shape moves, which colour appears first/last", None),
    "eval": ("held-out image QA and video QA (other seed, single-turn, balanced answers)", None),
    "scenes": ("4-6 shapes on a 3x3 grid: the colour / shape of the shape a unique attribute names (2 questions a scene)", None),
    "scenes_eval": ("held-out scenes, one balanced question each (the ablation's evaluation)", None),
}


def _count(name: str, scale: float) -> int:
    return max(4, round(SIZES[name] * scale))  # at least a few, so every question type shows up


def _rng(seed: int, stream: str) -> random.Random:
    """One independent stream per sub-set: changing one sub-set's size leaves the others unchanged,
    and the eval split never shares a stream with training."""
    return random.Random(f"lm_mini-demo/{seed}/{stream}")


def generate_records(root: Path, seed: int = 0, scale: float = 1.0) -> Dict[str, Path]:
    """Write every sub-set as a LLaVA JSON file (+ media under ``root``); returns sub-set -> JSON path."""
    rng = {name: _rng(seed, name) for name in ("captions", "instruct", "video", "eval", "scenes", "scenes_eval")}
    captions = Writer(root, "captions")
    write_captions(captions, rng["captions"], _count("captions", scale))
    instruct = Writer(root, "instruct")
    write_image_qa(instruct, rng["instruct"], _count("instruct_image", scale), MULTI_TURN_FRACTION)
    write_text(instruct, rng["instruct"], _count("instruct_text", scale))
    rng["instruct"].shuffle(instruct.records)  # text-only records spread over all shards
    video = Writer(root, "video")
    write_video_qa(video, rng["video"], _count("video", scale))
    evaluation = Writer(root, "eval", avoid=captions.scenes | instruct.scenes)
    write_image_qa(evaluation, rng["eval"], _count("eval_image", scale), multi_turn=0.0)
    write_video_qa(evaluation, rng["eval"], _count("eval_video", scale))
    scenes = Writer(root, "scenes")
    write_scene_qa(scenes, rng["scenes"], _count("scenes", scale), SCENE_EXTRA_QUESTIONS)
    scenes_eval = Writer(root, "scenes_eval", avoid=scenes.scenes)
    write_scene_qa(scenes_eval, rng["scenes_eval"], _count("scenes_eval", scale), extra=0)
    return {w.name: w.save() for w in (captions, instruct, video, evaluation, scenes, scenes_eval)}


def question_types(records: Iterable[dict]) -> Dict[str, int]:
    return dict(sorted(Counter(r.get("question_type", "caption") for r in records).items()))


# --------------------------------------------------------------------------- shards, tokenizer, manifest
VOCAB_SIZE = 1024
TEMPLATE_NAMES = ("plain", "vicuna_v1", "llama3")


def _media_kind(record: dict) -> str:
    return "video" if "video" in record else "image" if "image" in record else "text"


@contextlib.contextmanager
def _working_dir(path: Union[str, Path]) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def build_demo(out: Path, seed: int = 0, scale: float = 1.0) -> dict:
    """Generate the demo set into ``out`` (which must be absent or empty) and return its manifest.

    Everything is built in a sibling staging folder and renamed into place at the end, so an
    interrupted run never leaves a half-written ``out``."""
    from lm_mini.data.conversation import template_corpus
    from lm_mini.data.shards import build_shards
    from lm_mini.data.tokenizer import train_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; remove it first (the demo set is regenerated whole)")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    staging = staging.resolve()
    with tempfile.TemporaryDirectory(prefix="lm_mini_demo_") as tmp, _working_dir(tmp):
        # Relative paths: index.json records its sources and media root, and a random temporary
        # folder name there would make two builds differ.
        json_files = generate_records(Path("."), seed, scale)
        records = {name: json.loads(path.read_text()) for name, path in json_files.items()}
        for name, path in json_files.items():
            shard_size = math.ceil(len(records[name]) / SHARDS_PER_SET)
            build_shards([path.name], ".", staging / name, shard_size=shard_size, workers=1)
    every = [r for recs in records.values() for r in recs]
    tokenizer = train_tokenizer(
        template_corpus(((r["conversations"], _media_kind(r) != "text") for r in every), TEMPLATE_NAMES),
        staging / "tokenizer", vocab_size=VOCAB_SIZE,
    )
    from lm_mini.recipes.demo_encoder import pretrain_encoder

    encoder = pretrain_encoder(staging / "encoder", seed=seed, scale=scale)
    manifest = make_manifest(records, seed, scale, len(tokenizer))
    manifest["encoder"] = {"path": "encoder", **json.loads((staging / "encoder" / "pretraining.json").read_text())}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (staging / "README.md").write_text(readme(manifest))
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return manifest


def make_manifest(records: Dict[str, List[dict]], seed: int, scale: float, vocab_size: int) -> dict:
    subsets = {}
    for name, recs in records.items():
        purpose, template = SUBSETS[name]
        subsets[name] = {
            "path": name,
            "purpose": purpose,
            "template": template,
            "records": len(recs),
            "qa_pairs": sum(len(r["conversations"]) // 2 for r in recs),
            "media": dict(sorted(Counter(_media_kind(r) for r in recs).items())),
            "question_types": question_types(recs),
        }
    return {
        "name": "lm_mini synthetic demo",
        "generator": "lm_mini.recipes.demo",
        "command": f"lm-mini shards demo --out DIR --seed {seed} --scale {scale}",
        "seed": seed,
        "scale": scale,
        "image_size": IMAGE_SIZE,
        "video": {"frames": VIDEO_FRAMES, "fps": VIDEO_FPS, "codec": "h264"},
        "answers": {k: list(v) for k, v in ANSWERS.items()},
        "subsets": subsets,
        "tokenizer": {"path": "tokenizer", "vocab_size": vocab_size, "templates": list(TEMPLATE_NAMES)},
        "majority_baseline": {name: majority_baseline(records[name]) for name in ("eval", "scenes_eval")},
    }


def _baseline_rows(base: Dict[str, dict]) -> str:
    return "\n".join(f"| {q} | {b['n']} | {b.get('answer', '(per type)')} | {b['accuracy']:.3f} |" for q, b in base.items())


def readme(m: dict) -> str:
    rows = "\n".join(
        f"| `{name}/` | {s['records']} | {s['qa_pairs']} | {', '.join(f'{k} {v}' for k, v in s['media'].items())} | {s['purpose']} |"
        for name, s in m["subsets"].items()
    )
    enc = m["encoder"]
    held = enc["held_out"]
    return f"""# Synthetic demo data

Generated by `lm_mini.recipes.demo` (do not edit by hand):

    {m['command'].replace('DIR', 'data_shards/demo')}

Same seed and scale give byte-identical files (with the same Pillow / PyAV builds; the encoder's weights with the
same torch build on the same kind of CPU), so `lm-mini shards demo --out /tmp/demo && diff -r /tmp/demo
data_shards/demo` checks this copy. The generator draws every sample from a seed, writes LLaVA-format JSON + media
into a temporary folder and turns each sub-set into WebDataset shards (`lm_mini.data.shards.build_shards`, one
`index.json` each), then pretrains the vision encoder.

## Contents

| sub-set | records | QA pairs | media | what |
|---|---|---|---|---|
{rows}
| `tokenizer/` | | | | byte-level BPE, {m['tokenizer']['vocab_size']} tokens, trained on every record rendered through {', '.join(m['tokenizer']['templates'])} |
| `encoder/` | | | | the pretrained vision encoder (Hugging Face `CLIPVisionModel`, safetensors): `model.encoder.path` |

`manifest.json` has the same figures in machine-readable form.

- **Images** ({m['image_size']}x{m['image_size']} JPEG): 1-3 shapes ({', '.join(m['answers']['shape'])}) in
  {', '.join(m['answers']['color'])}, each in one of four slots ({', '.join(m['answers']['position'])}), on a dark
  grey background. Questions ask a shape's colour, shape or position, or how many shapes there are;
  a shape is named by something that singles it out ("the shape on the left", "the circle", "the
  red shape"). Answers are one word.
- **Captions**: "a red circle on the left and a blue square at the top" (shapes in slot order).
- **Videos** ({m['video']['frames']} frames at {m['video']['fps']} fps, H.264 MP4): one shape crossing the frame
  ("Which way does the shape move?" -> left/right/up/down), or a shape of one colour replaced by
  one of another colour halfway ("Which color appears first?" / "... last?"). The human turn
  carries `<video>`.
- **Text-only**: one-digit arithmetic ("What is 7 minus 3?") and a few colour/shape facts.
- **Eval**: its own random stream (no scene shared with training), single-turn, every answer of
  every question type in equal shares. Records carry `question_type` for per-type scores.
- **Scenes** (the C x pre-fusion ablation, `experiments/sweeps/ablation.yaml`): {SCENE_OBJECTS[0]}-{SCENE_OBJECTS[1]} shapes
  on a 3x3 grid of cells, larger than the others' (radius {SCENE_RADIUS[0]:g}-{SCENE_RADIUS[1]:g} px). Every question names one shape
  by the one attribute no other shape in the scene shares and asks for the other: "What color is the triangle?",
  "What shape is the red one?". The answer binds two attributes of one object, which a single averaged token of
  the scene loses. Training records ask one question of each type when the scene allows; `scenes_eval` (its own
  stream, no scene shared) asks one, answers balanced. The records carry a short system prompt of their own
  ("{SCENE_SYSTEM}").
- **Encoder**: the tiny preset's vision tower (a `CLIPVisionModel`: 64x64 images, 8x8 patches, 64 wide, 2 layers)
  pretrained here on {enc['images']} drawn pictures of all three kinds, {enc['steps']} steps of {enc['batch_size']}:
  {enc['objective']}. On {enc['held_out']['covered_patches']} covered patches of held-out pictures the heads read
  colour {held['color_accuracy']:.3f}, shape {held['shape_accuracy']:.3f} and region {held['region_accuracy']:.3f}
  right, empty patches {held['empty_accuracy']:.3f}, the centre within {held['centre_error_px']:.1f} px on average.
  The models read its last layer (`model.encoder.select_layer: -1`) and keep it frozen, as LLaVA keeps its CLIP.
  `probe.safetensors` holds the heads, `pretraining.json` the settings and these figures.

## Majority-answer baseline

Always answering the most frequent answer of the question type, `eval`:

| question type | n | answer | accuracy |
|---|---|---|---|
{_baseline_rows(m["majority_baseline"]["eval"])}

`scenes_eval`:

| question type | n | answer | accuracy |
|---|---|---|---|
{_baseline_rows(m["majority_baseline"]["scenes_eval"])}

A model that learned the data scores well above this.
"""


def cli_demo(args: argparse.Namespace) -> int:
    import time

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
