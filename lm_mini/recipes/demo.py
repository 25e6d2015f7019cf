"""The synthetic demo data set: coloured shapes, moving-shape videos, captions and text-only records.

``lm-mini shards demo --out data_shards/demo`` draws everything from a seed, writes LLaVA-format
JSON + media into a temporary folder, turns each sub-set into WebDataset shards with
:func:`lm_mini.data.shard_builder.build_shards` and trains the demo BPE tokenizer on the corpus rendered
through every conversation template. The result is small enough to ship in the repository and easy
enough that a tiny model (64x64 ViT, one vision token, 128-wide Llama) learns it on CPU in minutes.

Sub-sets (each its own shard set with ``index.json``):

- ``captions``  image + "a red circle on the left and a blue square at the top" (pretraining stage);
- ``instruct``  image QA about colour / shape / count / position (some multi-turn) + text-only records;
- ``video``     8-frame 64x64 mp4 clips: which way a shape moves, which colour appears first/last;
- ``eval``      held-out image QA and video QA from its own random stream, no scene shared with
                training (single-turn, answers balanced).

The shapes, scenes, clips and questions themselves are :mod:`lm_mini.recipes.demo_world`'s; this module turns
them into records, shard sets, the tokenizer, the pretrained encoder (:mod:`lm_mini.recipes.demo_encoder`) and
the manifest. Answers are balanced by construction (the answer is drawn first, then a scene that has it), so the
majority-answer baseline per question type stays near chance; ``manifest.json`` records it.
Same seed and scale -> byte-identical output (given the same Pillow / PyAV builds).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from lm_mini.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from lm_mini.eval.baseline import majority_baseline
from lm_mini.recipes.demo_world import (ANSWERS, IMAGE_QUESTION_TYPES, IMAGE_SIZE, SCENE_OBJECTS, SCENE_QUESTION_TYPES,
                                        SCENE_RADIUS, VIDEO_FPS, VIDEO_FRAMES, VIDEO_QUESTION_TYPES, Thing, ask, ask_scene,
                                        balanced_plan, binding_scene, caption, jpeg_bytes, mp4_bytes, random_background,
                                        random_scene, render, scene_for, scene_key, text_qa, video_qa)


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
        w.add(turns([(rng.choice(CAPTION_PROMPTS), caption(things))], IMAGE_PLACEHOLDER), jpeg_bytes(render(things, random_background(rng))))


def write_image_qa(w: Writer, rng: random.Random, n: int, multi_turn: float) -> None:
    """Balanced single-turn questions, plus a ``multi_turn`` share of 2-3-question records about a
    random scene."""
    n_multi = round(n * multi_turn)
    for qtype, answer in balanced_plan(rng, IMAGE_QUESTION_TYPES, n - n_multi):
        things = w.new_scene(lambda: scene_for(rng, qtype, answer))
        question, got = ask(rng, qtype, things)
        assert got == answer, (qtype, answer, got)  # scene_for put the answer on the asked-about shape
        w.add(turns([(question, answer)], IMAGE_PLACEHOLDER), jpeg_bytes(render(things, random_background(rng))), question_type=qtype)
    for _ in range(n_multi):
        things = w.new_scene(lambda: random_scene(rng, rng.randint(1, 3)))
        pairs = [ask(rng, q, things) for q in rng.sample(IMAGE_QUESTION_TYPES, rng.randint(2, 3))]
        w.add(turns(pairs, IMAGE_PLACEHOLDER), jpeg_bytes(render(things, random_background(rng))), question_type="multi_turn")


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
        w.add([{"from": "system", "value": SCENE_SYSTEM}] + turns(pairs, IMAGE_PLACEHOLDER), jpeg_bytes(render(things, random_background(rng))),
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
    from lm_mini.data.shard_builder import build_shards
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

    pretrain_encoder(staging / "encoder", seed=seed, scale=scale)
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
into a temporary folder and turns each sub-set into WebDataset shards (`lm_mini.data.shard_builder.build_shards`, one
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
