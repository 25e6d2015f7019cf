"""The demo set's visual world: coloured shapes on a 64x64 canvas (anti-aliased), the scenes and questions drawn
from it (image QA with balanced answers, moving-shape videos, the ablation's 3x3 binding scenes), and text-only
facts. :mod:`lm_mini.recipes.demo` turns them into records and shard sets; :mod:`lm_mini.recipes.demo_encoder`
pretrains the demo's vision tower on the same images."""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw


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
def random_background(rng: random.Random) -> int:
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
    shape, color, r, bg = rng.choice(SHAPES), rng.choice(tuple(COLORS)), _radius(rng), random_background(rng)
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
    bg, frames = random_background(rng), []
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
