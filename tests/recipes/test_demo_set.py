"""The synthetic demo set: right counts and kinds, answers that are true of the drawn pixels and
frames (checked by an independent pixel oracle, not by the generator's own scene records),
eval disjoint from train, balanced answers, a correct majority baseline, determinism."""
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
from lm_mini.data.conversation import normalize_turns

SCALE = 0.05  # ~250 records: a fraction of a second


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """(root, {sub-set: records}) of a small generated set."""
    root = tmp_path_factory.mktemp("raw")
    paths = syn.generate_records(root, seed=0, scale=SCALE)
    return root, {name: json.loads(p.read_text()) for name, p in paths.items()}


def qa_pairs(record):
    conv = record["conversations"]
    return [(conv[i]["value"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(VIDEO_PLACEHOLDER + "\n", ""), conv[i + 1]["value"])
            for i in range(0, len(conv), 2)]


# --------------------------------------------------------------------------- pixel oracle
PIXEL_CENTRES = np.mgrid[0:syn.IMAGE_SIZE, 0:syn.IMAGE_SIZE] + 0.5  # (y, x) of every pixel
SLOT_CENTRES = np.array(list(syn.SLOTS.values()))
YY, XX = PIXEL_CENTRES
# Each pixel belongs to the nearest slot centre (the slots' shapes never cross these borders).
SLOT_OF_PIXEL = np.argmin((XX[..., None] - SLOT_CENTRES[:, 0]) ** 2 + (YY[..., None] - SLOT_CENTRES[:, 1]) ** 2, axis=-1)
ATTRIBUTE_WORDS = (set(syn.SHAPES), set(syn.COLORS), set(syn.SLOTS))  # words naming each part of a triple
PALETTE = np.array(list(syn.COLORS.values()), dtype=float)


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
    return max(syn.SHAPES, key=lambda s: (mask & ideal_mask(s, mask)).sum() / (mask | ideal_mask(s, mask)).sum())


def see(image: Image.Image):
    """The shapes in an image as (shape, colour, slot), read from the pixels alone."""
    labels = colour_labels(np.asarray(image.convert("RGB")))
    found = []
    for s, slot in enumerate(syn.SLOTS):
        for c, colour in enumerate(syn.COLORS):
            mask = (labels == c) & (SLOT_OF_PIXEL == s)
            if mask.sum() >= 30:  # a shape has >= ~70 pixels; JPEG fringes have a few
                found.append((shape_of(mask), colour, slot))
    return found


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
    colour = list(syn.COLORS)[Counter(labels[labels >= 0].tolist()).most_common(1)[0][0]]
    return xs.mean(), ys.mean(), colour


# --------------------------------------------------------------------------- records
def test_counts_kinds_and_llava_form(raw):
    root, recs = raw
    expect = {"captions": syn._count("captions", SCALE),
              "instruct": syn._count("instruct_image", SCALE) + syn._count("instruct_text", SCALE),
              "video": syn._count("video", SCALE),
              "eval": syn._count("eval_image", SCALE) + syn._count("eval_video", SCALE)}
    assert {k: len(v) for k, v in recs.items()} == expect
    kinds = {k: Counter(syn._media_kind(r) for r in v) for k, v in recs.items()}
    assert kinds["captions"] == {"image": expect["captions"]}
    assert kinds["instruct"] == {"image": syn._count("instruct_image", SCALE), "text": syn._count("instruct_text", SCALE)}
    assert kinds["video"] == {"video": expect["video"]}
    assert kinds["eval"] == {"image": syn._count("eval_image", SCALE), "video": syn._count("eval_video", SCALE)}
    every = [r for v in recs.values() for r in v]
    assert len({r["id"] for r in every}) == len(every)
    for r in every:
        kind = syn._media_kind(r)
        first = r["conversations"][0]["value"]
        assert first.startswith({"image": IMAGE_PLACEHOLDER + "\n", "video": VIDEO_PLACEHOLDER + "\n"}.get(kind, "")), r
        assert kind == "text" or (root / r[kind]).is_file()
        normalize_turns(r["conversations"], has_media=kind != "text", sample_id=r["id"])  # valid LLaVA record
        if r not in recs["captions"]:
            assert all(len(a.split()) == 1 for _, a in qa_pairs(r)), r  # one-word answers
    multi = [r for r in recs["instruct"] if r["question_type"] == "multi_turn"]
    assert multi and all(len(r["conversations"]) >= 4 for r in multi)
    assert all(len(r["conversations"]) == 2 for r in recs["eval"])


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
        assert len(frames) == syn.VIDEO_FRAMES and frames[0].shape == (syn.IMAGE_SIZE, syn.IMAGE_SIZE, 3)
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
            assert (question, given) in syn.FACTS


def test_eval_is_disjoint_from_train(raw):
    root, recs = raw
    digest = lambda r: hashlib.sha256((root / r[syn._media_kind(r)]).read_bytes()).hexdigest()  # noqa: E731
    train = {digest(r) for k in ("captions", "instruct", "video") for r in recs[k] if syn._media_kind(r) != "text"}
    held = {digest(r) for r in recs["eval"]}
    assert len(held) == len(recs["eval"]) and not train & held
    assert not {r["id"] for r in recs["eval"]} & {r["id"] for k in ("captions", "instruct", "video") for r in recs[k]}


def test_eval_answers_are_balanced(raw):
    _, recs = raw
    by_type = {}
    for r in recs["eval"]:
        by_type.setdefault(r["question_type"], Counter())[r["conversations"][1]["value"]] += 1
    assert set(by_type) == set(syn.IMAGE_QUESTION_TYPES + syn.VIDEO_QUESTION_TYPES)
    for qtype, counts in by_type.items():
        assert set(counts) <= set(syn.ANSWERS[qtype])
        assert max(counts.values()) - min(counts.get(a, 0) for a in syn.ANSWERS[qtype]) <= 1, (qtype, counts)


def test_balanced_plan_at_scale_one():
    import random

    plan = syn.balanced_plan(random.Random(1), syn.IMAGE_QUESTION_TYPES, 400)
    per_type = Counter(q for q, _ in plan)
    assert set(per_type.values()) == {100}
    for qtype in syn.IMAGE_QUESTION_TYPES:
        counts = Counter(a for q, a in plan if q == qtype)
        assert max(counts.values()) - min(counts.values()) <= 1
        # majority baseline of this type is chance level
        assert max(counts.values()) / 100 <= 1 / len(syn.ANSWERS[qtype]) + 0.01


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
    from lm_mini.data.shards import iter_raw_samples, read_index, shard_paths

    manifest = json.loads((built / "manifest.json").read_text())
    assert set(manifest["subsets"]) == {"captions", "instruct", "video", "eval"}
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
    evaluation = [s.record for s in iter_raw_samples(shard_paths(built / "eval"), SkipCounter())]
    assert manifest["majority_baseline"]["eval"] == syn.majority_baseline(evaluation)
    assert "lm-mini shards demo --out data_shards/demo" in (built / "README.md").read_text()


def test_tokenizer_covers_every_template(built):
    from lm_mini.data.conversation import tokenize_conversation
    from lm_mini.data.errors import SkipCounter
    from lm_mini.data.shards import iter_raw_samples, shard_paths
    from lm_mini.data.tokenizer import load_tokenizer

    tok = load_tokenizer(built / "tokenizer")
    unk = tok.convert_tokens_to_ids("<unk>")
    for name in ("captions", "instruct", "video", "eval"):
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
    """The committed data_shards/demo: the scale-1 sizes, intact shards, under 20 MB."""
    from lm_mini.data.shards import read_index

    shipped = Path(__file__).resolve().parents[2] / "data_shards" / "demo"
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert (manifest["seed"], manifest["scale"]) == (0, 1.0)
    assert manifest["subsets"]["instruct"]["records"] == syn.SIZES["instruct_image"] + syn.SIZES["instruct_text"]
    assert manifest["subsets"]["eval"]["records"] == syn.SIZES["eval_image"] + syn.SIZES["eval_video"]
    assert manifest["majority_baseline"]["eval"]["overall"]["accuracy"] < 0.3
    for name, sub in manifest["subsets"].items():
        index = read_index(shipped / sub["path"])
        assert index["num_samples"] == sub["records"] and len(index["shards"]) == syn.SHARDS_PER_SET
        for shard in index["shards"]:
            assert hashlib.sha256((shipped / sub["path"] / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file()) < 20 * 2**20
