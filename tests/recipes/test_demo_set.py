"""The synthetic demo set: right counts and kinds, answers that are true of the drawn pixels and
frames (checked by an independent pixel oracle, not by the generator's own scene records),
eval disjoint from train, balanced answers, a correct majority baseline, determinism; the multi-object
scenes' binding questions name a shape that is the only one of its kind; the pretrained encoder shipped
with the set loads as the model's vision tower and its features hold what its pretraining says."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from lm_mini.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from lm_mini.recipes import demo as syn
from lm_mini.recipes import demo_world as world
from lm_mini.data.conversation import normalize_turns

SCALE = 0.05  # ~250 records: a fraction of a second


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """(root, {sub-set: records}) of a small generated set."""
    root = tmp_path_factory.mktemp("raw")
    paths = syn.generate_records(root, seed=0, scale=SCALE)
    return root, {name: json.loads(p.read_text()) for name, p in paths.items()}


def qa_pairs(record):
    conv = [t for t in record["conversations"] if t["from"] != "system"]
    return [(conv[i]["value"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(VIDEO_PLACEHOLDER + "\n", ""), conv[i + 1]["value"])
            for i in range(0, len(conv), 2)]


# --------------------------------------------------------------------------- pixel oracle
PIXEL_CENTRES = np.mgrid[0:world.IMAGE_SIZE, 0:world.IMAGE_SIZE] + 0.5  # (y, x) of every pixel
SLOT_CENTRES = np.array(list(world.SLOTS.values()))
YY, XX = PIXEL_CENTRES
# Each pixel belongs to the nearest slot centre (the slots' shapes never cross these borders).
SLOT_OF_PIXEL = np.argmin((XX[..., None] - SLOT_CENTRES[:, 0]) ** 2 + (YY[..., None] - SLOT_CENTRES[:, 1]) ** 2, axis=-1)
ATTRIBUTE_WORDS = (set(world.SHAPES), set(world.COLORS), set(world.SLOTS))  # words naming each part of a triple
PALETTE = np.array(list(world.COLORS.values()), dtype=float)


def colour_labels(pixels: np.ndarray) -> np.ndarray:
    """Palette index per pixel, -1 for background (read from the corner).

    An edge pixel is a blend of one colour with the background, so each pixel goes to the colour
    whose background-to-colour segment passes nearest to it (a half-yellow edge pixel is nearer
    to pure green than to pure yellow, but lies on yellow's segment); under half coverage it is
    background."""
    p = pixels.astype(float)[..., None, :]
    bg = p[0, 0]
    span = PALETTE - bg  # [colours, 3]
    alpha = np.clip(((p - bg) * span).sum(-1) / (span * span).sum(-1), 0, 1)  # coverage per colour
    residual = ((p - bg - alpha[..., None] * span) ** 2).sum(-1)
    best = np.argmin(residual, axis=-1)
    covered = np.take_along_axis(alpha, best[..., None], -1)[..., 0] >= 0.5
    return np.where(covered, best, -1)


IDEAL_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0}  # area of each shape of half-size r, over r^2


def ideal_mask(shape: str, mask: np.ndarray) -> np.ndarray:
    """The ideal ``shape`` with the mask's area and centroid (apex-up triangle: centroid 2/3 down)."""
    cx, cy = XX[mask].mean(), YY[mask].mean()
    r = np.sqrt(mask.sum() / IDEAL_AREA[shape])
    if shape == "circle":
        return (XX - cx) ** 2 + (YY - cy) ** 2 <= r * r
    if shape == "square":
        return (abs(XX - cx) <= r) & (abs(YY - cy) <= r)
    top = cy - 4 * r / 3
    return (YY >= top) & (YY <= top + 2 * r) & (abs(XX - cx) <= (YY - top) / 2)


def shape_of(mask: np.ndarray) -> str:
    """The shape whose ideal outline overlaps the mask best (intersection over union)."""
    return max(world.SHAPES, key=lambda s: (mask & ideal_mask(s, mask)).sum() / (mask | ideal_mask(s, mask)).sum())


def _shapes_in(image: Image.Image, regions, region_of_pixel, min_pixels: int):
    """(shape, colour, region) of each shape in ``image``: the pixels of one colour within one region."""
    labels = colour_labels(np.asarray(image.convert("RGB")))
    found = []
    for k, region in enumerate(regions):
        for c, colour in enumerate(world.COLORS):
            mask = (labels == c) & (region_of_pixel == k)
            if mask.sum() >= min_pixels:
                found.append((shape_of(mask), colour, region))
    return found


def see(image: Image.Image):
    """The shapes in an image as (shape, colour, slot), read from the pixels alone."""
    return _shapes_in(image, world.SLOTS, SLOT_OF_PIXEL, 30)  # a shape has >= ~70 pixels; JPEG fringes have a few


CELL_CENTRES = np.array(list(world.CELLS.values()))
CELL_OF_PIXEL = np.argmin((XX[..., None] - CELL_CENTRES[:, 0]) ** 2 + (YY[..., None] - CELL_CENTRES[:, 1]) ** 2, axis=-1)


def see_cells(image: Image.Image):
    """The shapes of a multi-object scene as (shape, colour, cell), read from the pixels alone."""
    return _shapes_in(image, world.CELLS, CELL_OF_PIXEL, 20)  # a scene's shape has >= ~45 pixels


def answer_scene(question: str, things) -> str:
    """A scene question, answered from (shape, colour, cell) triples: the one shape the question's shape or colour
    word names (it must be the only one of its kind), and the other attribute."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    shape, colour = words & set(world.SHAPES), words & set(world.COLORS)
    picked = [t for t in things if (not shape or t[0] in shape) and (not colour or t[1] in colour)]
    assert len(shape | colour) == 1 and len(picked) == 1, (question, things)  # named by one unique attribute
    return picked[0][1 if question.startswith("What color") else 0]


def answer(question: str, things) -> str:
    """Answer a demo question from (shape, colour, slot) triples: the words of the question that
    name a colour, shape or slot select the shape it asks about."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    if question.startswith("How many"):
        return str(len(things))
    asked = {"What color": 1, "Which shape": 0, "What shape": 0, "Where": 2}
    attr = next(i for prefix, i in asked.items() if question.startswith(prefix))
    named = [words & vocab for vocab in ATTRIBUTE_WORDS]
    picked = [t for t in things if all(not named[i] or t[i] in named[i] for i in range(3) if i != attr)]
    assert len(picked) == 1, (question, things)
    return picked[0][attr]


def frames_of(path: Path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def blob(frame: np.ndarray):
    """Centre and colour of the one shape in a video frame."""
    labels = colour_labels(frame)
    ys, xs = np.nonzero(labels >= 0)
    colour = list(world.COLORS)[Counter(labels[labels >= 0].tolist()).most_common(1)[0][0]]
    return xs.mean(), ys.mean(), colour


# --------------------------------------------------------------------------- records
def test_counts_kinds_and_llava_form(raw):
    root, recs = raw
    expect = {"captions": syn._count("captions", SCALE),
              "instruct": syn._count("instruct_image", SCALE) + syn._count("instruct_text", SCALE),
              "video": syn._count("video", SCALE),
              "eval": syn._count("eval_image", SCALE) + syn._count("eval_video", SCALE),
              "scenes": syn._count("scenes", SCALE), "scenes_eval": syn._count("scenes_eval", SCALE)}
    assert {k: len(v) for k, v in recs.items()} == expect
    kinds = {k: Counter(syn._media_kind(r) for r in v) for k, v in recs.items()}
    assert kinds["captions"] == {"image": expect["captions"]}
    assert kinds["instruct"] == {"image": syn._count("instruct_image", SCALE), "text": syn._count("instruct_text", SCALE)}
    assert kinds["video"] == {"video": expect["video"]}
    assert kinds["eval"] == {"image": syn._count("eval_image", SCALE), "video": syn._count("eval_video", SCALE)}
    every = [r for v in recs.values() for r in v]
    assert len({r["id"] for r in every}) == len(every)
    assert kinds["scenes"] == {"image": expect["scenes"]} and kinds["scenes_eval"] == {"image": expect["scenes_eval"]}
    for r in every:
        kind = syn._media_kind(r)
        first = [t for t in r["conversations"] if t["from"] != "system"][0]["value"]
        assert first.startswith({"image": IMAGE_PLACEHOLDER + "\n", "video": VIDEO_PLACEHOLDER + "\n"}.get(kind, "")), r
        assert kind == "text" or (root / r[kind]).is_file()
        normalize_turns(r["conversations"], has_media=kind != "text", sample_id=r["id"])  # valid LLaVA record
        if r not in recs["captions"]:
            assert all(len(a.split()) == 1 for _, a in qa_pairs(r)), r  # one-word answers
    multi = [r for r in recs["instruct"] if r["question_type"] == "multi_turn"]
    assert multi and all(len(r["conversations"]) >= 4 for r in multi)
    assert all(len(r["conversations"]) == 2 for r in recs["eval"])
    # scenes: a short system turn, then questions; held-out scenes ask one each
    for r in recs["scenes"] + recs["scenes_eval"]:
        assert r["conversations"][0] == {"from": "system", "value": syn.SCENE_SYSTEM}
    assert all(len(qa_pairs(r)) == 1 and r["question_type"] in world.SCENE_QUESTION_TYPES for r in recs["scenes_eval"])
    assert sum(len(qa_pairs(r)) for r in recs["scenes"]) > 1.7 * len(recs["scenes"])  # mostly one of each type


def test_image_answers_are_true_of_the_pixels(raw):
    root, recs = raw
    checked = Counter()
    for r in recs["instruct"] + recs["eval"]:
        if "image" not in r:
            continue
        things = see(Image.open(root / r["image"]))
        for question, given in qa_pairs(r):
            assert answer(question, things) == given, (r["id"], question, things)
            checked[r["question_type"]] += 1
    assert set(checked) == {"color", "shape", "count", "position", "multi_turn"}


def test_scene_answers_are_true_of_the_pixels(raw):
    root, recs = raw
    checked = Counter()
    for r in recs["scenes"] + recs["scenes_eval"]:
        things = see_cells(Image.open(root / r["image"]))
        assert world.SCENE_OBJECTS[0] <= len(things) <= world.SCENE_OBJECTS[1], (r["id"], things)
        for question, given in qa_pairs(r):
            assert answer_scene(question, things) == given, (r["id"], question, things)
            checked[question.split(" the ")[0]] += 1
    assert set(checked) == {"What color is", "What shape is"}


def test_captions_are_true_of_the_pixels(raw):
    root, recs = raw
    for r in recs["captions"]:
        said = set(re.findall(r"a (\w+) (\w+) (?:on|at) the (\w+)", r["conversations"][1]["value"]))
        assert said == {(colour, shape, slot) for shape, colour, slot in see(Image.open(root / r["image"]))}, r


def test_video_answers_are_true_of_the_frames(raw):
    root, recs = raw
    seen = Counter()
    for r in recs["video"] + recs["eval"]:
        if "video" not in r:
            continue
        frames = frames_of(root / r["video"])
        assert len(frames) == world.VIDEO_FRAMES and frames[0].shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
        (x0, y0, c0), (x1, y1, c1) = blob(frames[0]), blob(frames[-1])
        (question, given), = qa_pairs(r)
        if r["question_type"] == "direction":
            dx, dy = x1 - x0, y1 - y0
            moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert max(abs(dx), abs(dy)) > 25 and moved == given, (r["id"], dx, dy)
        else:
            assert c0 != c1 and given == (c0 if question.endswith("first?") else c1), (r["id"], c0, c1)
        seen[r["question_type"]] += 1
    assert set(seen) == {"direction", "order"}


def test_text_only_answers(raw):
    _, recs = raw
    texts = [r for r in recs["instruct"] if syn._media_kind(r) == "text"]
    for r in texts:
        (question, given), = qa_pairs(r)
        m = re.fullmatch(r"What is (\d) (plus|minus) (\d)\?", question)
        if m:
            a, b = int(m[1]), int(m[3])
            assert int(given) == (a + b if m[2] == "plus" else a - b)
        else:
            assert (question, given) in world.FACTS


def test_eval_is_disjoint_from_train(raw):
    root, recs = raw
    digest = lambda r: hashlib.sha256((root / r[syn._media_kind(r)]).read_bytes()).hexdigest()  # noqa: E731
    train = {digest(r) for k in ("captions", "instruct", "video") for r in recs[k] if syn._media_kind(r) != "text"}
    held = {digest(r) for r in recs["eval"]}
    assert len(held) == len(recs["eval"]) and not train & held
    assert not {r["id"] for r in recs["eval"]} & {r["id"] for k in ("captions", "instruct", "video") for r in recs[k]}
    scenes, held_scenes = {digest(r) for r in recs["scenes"]}, {digest(r) for r in recs["scenes_eval"]}
    assert len(held_scenes) == len(recs["scenes_eval"]) and not scenes & held_scenes


@pytest.mark.parametrize("subset, qtypes", [("eval", world.IMAGE_QUESTION_TYPES + world.VIDEO_QUESTION_TYPES),
                                             ("scenes_eval", world.SCENE_QUESTION_TYPES)])
def test_eval_answers_are_balanced(raw, subset, qtypes):
    _, recs = raw
    by_type = {}
    for r in recs[subset]:
        by_type.setdefault(r["question_type"], Counter())[qa_pairs(r)[0][1]] += 1
    assert set(by_type) == set(qtypes)
    for qtype, counts in by_type.items():
        assert set(counts) <= set(world.ANSWERS[qtype])
        assert max(counts.values()) - min(counts.get(a, 0) for a in world.ANSWERS[qtype]) <= 1, (qtype, counts)


def test_balanced_plan_at_scale_one():
    import random

    plan = world.balanced_plan(random.Random(1), world.IMAGE_QUESTION_TYPES, 400)
    per_type = Counter(q for q, _ in plan)
    assert set(per_type.values()) == {100}
    for qtype in world.IMAGE_QUESTION_TYPES:
        counts = Counter(a for q, a in plan if q == qtype)
        assert max(counts.values()) - min(counts.values()) <= 1
        # majority baseline of this type is chance level
        assert max(counts.values()) / 100 <= 1 / len(world.ANSWERS[qtype]) + 0.01


def test_majority_baseline_hand_worked():
    def rec(qtype, *answers):
        conv = []
        for a in answers:
            conv += [{"from": "human", "value": "q"}, {"from": "gpt", "value": a}]
        return {"conversations": conv, "question_type": qtype}

    records = [rec("color", "red"), rec("color", "blue"), rec("color", "red"), rec("color", "green"),
               rec("count", "2"), rec("count", "1"),  # tie: alphabetically first answer wins
               rec("multi", "left", "left")]  # every answer of a multi-turn record counts
    base = syn.majority_baseline(records)
    assert base["color"] == {"answer": "red", "accuracy": 0.5, "n": 4}
    assert base["count"] == {"answer": "1", "accuracy": 0.5, "n": 2}
    assert base["multi"] == {"answer": "left", "accuracy": 1.0, "n": 2}
    assert base["overall"] == {"accuracy": pytest.approx(5 / 8), "n": 8}


# --------------------------------------------------------------------------- the built set
BUILD_SCALE = 0.02  # a handful of records per sub-set


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A demo set built through the command line."""
    from lm_mini.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["shards", "demo", "--out", str(out), "--scale", str(BUILD_SCALE)]) == 0
    return out


def tree(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic(built, tmp_path):
    again = tmp_path / "again"
    syn.build_demo(again, seed=0, scale=BUILD_SCALE)
    assert tree(again) == tree(built)
    assert not (tmp_path / ".again.partial").exists()
    # another seed draws other data
    a, b = tmp_path / "s0", tmp_path / "s1"
    assert json.loads(syn.generate_records(a, 0, BUILD_SCALE)["eval"].read_text()) != \
        json.loads(syn.generate_records(b, 1, BUILD_SCALE)["eval"].read_text())


def test_built_shards_match_manifest_and_records(built):
    from lm_mini.data.errors import SkipCounter
    from lm_mini.data.shard_reader import iter_raw_samples, read_index, shard_paths

    manifest = json.loads((built / "manifest.json").read_text())
    assert set(manifest["subsets"]) == {"captions", "instruct", "video", "eval", "scenes", "scenes_eval"}
    for name, sub in manifest["subsets"].items():
        index = read_index(built / sub["path"])
        assert index["num_samples"] == sub["records"] and index["skipped"] == {}
        assert {k: v for k, v in index["media"].items() if v} == sub["media"]
        assert 1 < len(index["shards"]) <= syn.SHARDS_PER_SET  # several shards: ranks x workers can split them
        counter = SkipCounter()
        samples = list(iter_raw_samples(shard_paths(built / sub["path"]), counter))
        assert not counter and len(samples) == sub["records"]
        assert syn.question_types(s.record for s in samples) == sub["question_types"]
        for s in samples:
            assert s.media_kind == {"image": "image", "video": "video", "text": None}[syn._media_kind(s.record)]
    for name in ("eval", "scenes_eval"):
        evaluation = [s.record for s in iter_raw_samples(shard_paths(built / name), SkipCounter())]
        assert manifest["majority_baseline"][name] == syn.majority_baseline(evaluation)
    assert "lm-mini shards demo --out data_shards/demo" in (built / "README.md").read_text()


def test_tokenizer_covers_every_template(built):
    from lm_mini.data.conversation import tokenize_conversation
    from lm_mini.data.errors import SkipCounter
    from lm_mini.data.shard_reader import iter_raw_samples, shard_paths
    from lm_mini.data.tokenizer import load_tokenizer

    tok = load_tokenizer(built / "tokenizer")
    unk = tok.convert_tokens_to_ids("<unk>")
    for name in ("captions", "instruct", "video", "eval", "scenes", "scenes_eval"):
        for s in iter_raw_samples(shard_paths(built / name), SkipCounter()):
            conv, has_media = s.record["conversations"], s.media_kind is not None
            for template in ("vicuna_v1", "llama3") + (("plain",) if len(conv) == 2 else ()):
                t = tokenize_conversation(conv, tok, template, max_length=512, has_media=has_media)
                assert not t.unaligned and not t.truncated and unk not in t.input_ids
                assert any(label >= 0 for label in t.labels)


def test_refuses_a_non_empty_out(built):
    before = tree(built)
    with pytest.raises(FileExistsError, match="not empty"):
        syn.build_demo(built, seed=1, scale=BUILD_SCALE)
    assert tree(built) == before


def test_shipped_demo_set_is_complete_and_small():
    """The committed data_shards/demo: the scale-1 sizes, intact shards, under 30 MB on disk (git stores them
    compressed: ~8 MB, the tar padding and the repeated JPEG headers compress away)."""
    from lm_mini.data.shard_reader import read_index

    shipped = Path(__file__).resolve().parents[2] / "data_shards" / "demo"
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert (manifest["seed"], manifest["scale"]) == (0, 1.0)
    assert manifest["subsets"]["instruct"]["records"] == syn.SIZES["instruct_image"] + syn.SIZES["instruct_text"]
    assert manifest["subsets"]["eval"]["records"] == syn.SIZES["eval_image"] + syn.SIZES["eval_video"]
    assert manifest["majority_baseline"]["eval"]["overall"]["accuracy"] < 0.3
    assert manifest["subsets"]["scenes_eval"]["records"] == syn.SIZES["scenes_eval"]
    assert (shipped / "encoder" / "model.safetensors").is_file() and manifest["encoder"]["path"] == "encoder"
    for name, sub in manifest["subsets"].items():
        index = read_index(shipped / sub["path"])
        assert index["num_samples"] == sub["records"] and len(index["shards"]) == syn.SHARDS_PER_SET
        for shard in index["shards"]:
            assert hashlib.sha256((shipped / sub["path"] / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file()) < 30 * 2**20


def test_built_encoder_is_the_model_tower_and_holds_what_its_pretraining_says(built):
    """The encoder folder loads as ``model.encoder.path`` of the ablation config; the model reads the layer the
    pretraining heads were trained on; the heads score on the held-out draw what pretraining.json records."""
    import random

    import torch
    from transformers import CLIPVisionModel

    from lm_mini.config import load_config
    from lm_mini.models.encoders import build_encoder
    from lm_mini.recipes import demo_encoder as de

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "experiments" / "ablation.yaml", [f"model.encoder.path={built / 'encoder'}"])
    tower = build_encoder(cfg.model.encoder).eval()
    assert (tower.hidden_size, tower.grid, tower.image_size) == (64, 8, 64)
    assert cfg.model.encoder.select_layer == de.SELECT_LAYER and not cfg.train.parts.encoder.train  # frozen, that layer
    plain = CLIPVisionModel.from_pretrained(built / "encoder").eval()
    data = de.draw_images(random.Random(5), 16, 8)
    pixels = torch.from_numpy(data["pixels"])
    from lm_mini.models.encoders import normalize_pixels

    with torch.no_grad():
        ours = tower(normalize_pixels(pixels, tower.image_mean, tower.image_std))
        torch.testing.assert_close(ours, de.patch_features(plain, pixels))
    report = json.loads((built / "encoder" / "pretraining.json").read_text())
    settings = de.PretrainSettings().scaled(BUILD_SCALE)
    held_out = de.draw_images(random.Random("lm_mini-demo/0/encoder-held-out"), settings.held_out, 8)
    again = de.probe_accuracy(plain, de.load_probe(built / "encoder"), held_out)
    assert {k: round(v, 4) for k, v in again.items()} == report["held_out"]


def test_patch_targets_follow_the_drawn_shapes():
    from lm_mini.recipes import demo_encoder as de

    big = world.Thing("square", "red", 20.0, 20.0, 8.0)  # covers the pixels 12..28: patches 1..3 of rows 1..3
    colors, shapes, regions, centres = de.patch_targets([big], 8)
    grid = colors.reshape(8, 8)
    assert (grid[1:4, 1:4] > 0).all() and grid.sum() == 9 * de.COLOR_CLASSES.index("red")
    assert set(shapes[colors > 0]) == {de.SHAPE_CLASSES.index("square")}
    assert set(regions[colors > 0]) == {de.REGION_CLASSES.index("top-left")}
    assert np.allclose(centres[colors > 0], [20 / 64, 20 / 64]) and (centres[colors == 0] == 0).all()
    # a patch a shape covers under 20% of belongs to no shape
    small = world.Thing("circle", "blue", 8.0, 8.0, 1.0)
    assert de.patch_targets([small], 8)[0].sum() == 0


def test_shipped_encoder_features_hold_colour_shape_and_place():
    """The committed encoder, on images it never saw: the pretraining heads read each covered patch's colour, shape
    and 3x3 region from the features the model is given."""
    import random

    from transformers import CLIPVisionModel

    from lm_mini.recipes import demo_encoder as de

    shipped = Path(__file__).resolve().parents[2] / "data_shards" / "demo" / "encoder"
    encoder = CLIPVisionModel.from_pretrained(shipped).eval()
    accuracy = de.probe_accuracy(encoder, de.load_probe(shipped), de.draw_images(random.Random("test"), 300, 8))
    recorded = json.loads((shipped / "pretraining.json").read_text())["held_out"]
    for key in ("color_accuracy", "shape_accuracy", "region_accuracy", "empty_accuracy"):
        assert accuracy[key] > recorded[key] - 0.03, (key, accuracy[key], recorded[key])  # 300 fresh images vs the record
    assert accuracy["color_accuracy"] > 0.95 and accuracy["region_accuracy"] > 0.9
