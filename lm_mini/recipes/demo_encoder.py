"""The demo's pretrained vision encoder: a tiny CLIP vision tower trained once on the demo's synthetic images.

LLaVA-Mini (like LLaVA-1.5) starts from a pretrained CLIP and keeps it frozen; its compressor and pre-fusion then
learn to pick out of good patch features what a question needs. Trained from scratch together with the rest, a tiny
encoder learns slowest where it matters most (the model that reads all patch tokens must first make them mean
something), so the demo ships one that was pretrained here, on images drawn by :mod:`lm_mini.recipes.demo_world`:
single shapes in four slots, 4-6 shapes on a 3x3 grid and freely placed shapes, through the same JPEG round trip
as the shards. The objective is per patch (the 8x8 grid of 8-pixel patches): from the last layer's feature of a
patch, linear heads predict the colour and the shape of the object that covers most of it (or "none" under 20%
coverage), which ninth of the picture (3x3 regions) that object's centre lies in, and the centre itself. Features
are thus local and linearly readable, which is what a frozen LLaVA tower gives the model above it.

Written next to the shards as a Hugging Face ``CLIPVisionModel`` directory (``config.json``,
``model.safetensors``, ``preprocessor_config.json``) that ``model.encoder.path`` loads, plus the heads
(``probe.safetensors``) and ``pretraining.json`` (settings and held-out per-patch accuracy). Training runs on one
CPU thread from a fixed seed, so the weights are byte-identical with the same torch build on the same kind of CPU.
"""
from __future__ import annotations

import io
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from lm_mini.models.encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize_pixels
from lm_mini.recipes import demo_world as world

# The tiny preset's tower (experiments/models/tiny.yaml): 64x64 images, 8x8 patches of 8 pixels, 64 wide.
ENCODER_CONFIG = {"image_size": 64, "patch_size": 8, "hidden_size": 64, "intermediate_size": 256,
                  "num_hidden_layers": 2, "num_attention_heads": 4}
# The LLaVA models read the last layer (model.encoder.select_layer: -1): the one the heads were trained on.
SELECT_LAYER = -1
COVERED = 0.2  # a patch belongs to the object covering the largest share of it, when that share is at least this
COLOR_CLASSES = ("none", *world.COLORS)
SHAPE_CLASSES = ("none", *world.SHAPES)
REGION_CLASSES = ("none", *world.CELLS)  # the 3x3 regions, row-major (the scenes' cells)


@dataclass(frozen=True)
class PretrainSettings:
    images: int = 16000  # distinct training images (drawn once)
    steps: int = 4000  # at 1500 (and with smaller scene shapes) the heads read the shape of 62% of covered patches
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    held_out: int = 1000  # fresh images for the reported accuracy

    def scaled(self, scale: float) -> "PretrainSettings":
        """Fewer images and steps for tests (``lm-mini shards demo --scale``)."""
        if scale >= 1.0:
            return self
        return PretrainSettings(images=max(64, round(self.images * scale)), steps=max(4, round(self.steps * scale)),
                                batch_size=self.batch_size, lr=self.lr, warmup=min(self.warmup, max(1, round(self.steps * scale) // 4)),
                                held_out=max(64, round(self.held_out * scale)))


# --------------------------------------------------------------------------- images and per-patch targets
def free_scene(rng: random.Random, n: int) -> List[world.Thing]:
    """``n`` shapes anywhere on the canvas (as in the demo's videos), not overlapping."""
    things: List[world.Thing] = []
    while len(things) < n:
        r = rng.uniform(world.MIN_RADIUS, world.MAX_RADIUS)
        cx, cy = rng.uniform(r + 1, world.IMAGE_SIZE - r - 1), rng.uniform(r + 1, world.IMAGE_SIZE - r - 1)
        if all(math.hypot(cx - t.cx, cy - t.cy) > (r + t.r) * math.sqrt(2) + 1 for t in things):
            things.append(world.Thing(rng.choice(world.SHAPES), rng.choice(tuple(world.COLORS)), cx, cy, r))
    return things


def pretraining_scene(rng: random.Random) -> List[world.Thing]:
    """One of the demo's three kinds of picture, in equal shares."""
    kind = rng.randrange(3)
    if kind == 0:
        return world.random_scene(rng, rng.randint(1, 3))
    if kind == 1:
        return world.grid_scene(rng, rng.randint(*world.SCENE_OBJECTS))
    return free_scene(rng, rng.randint(1, 3))


def region(t: world.Thing) -> int:
    """Index in :data:`REGION_CLASSES` of the 3x3 region holding the shape's centre."""
    col, row = (min(world.SCENE_GRID - 1, int(c // world.CELL)) for c in (t.cx, t.cy))
    return 1 + row * world.SCENE_GRID + col


def patch_targets(things: Sequence[world.Thing], patch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per patch (row-major): colour, shape and region class (0 = none) of the covering object, and its centre over
    the image size ([P], [P], [P], [P, 2])."""
    g = world.IMAGE_SIZE // patch
    if not things:
        return (np.zeros(g * g, np.int64), np.zeros(g * g, np.int64), np.zeros(g * g, np.int64),
                np.zeros((g * g, 2), np.float32))
    cover = np.stack([np.asarray(world.coverage(t), np.float32) / 255.0 for t in things])  # [K, H, W]
    per_patch = cover.reshape(len(things), g, patch, g, patch).mean(axis=(2, 4)).reshape(len(things), g * g)  # [K, P]
    best, share = per_patch.argmax(0), per_patch.max(0)
    covered = share >= COVERED
    colors = np.array([COLOR_CLASSES.index(t.color) for t in things])[best] * covered
    shapes = np.array([SHAPE_CLASSES.index(t.shape) for t in things])[best] * covered
    regions = np.array([region(t) for t in things])[best] * covered
    centres = np.array([(t.cx, t.cy) for t in things], np.float32)[best] / world.IMAGE_SIZE
    return colors.astype(np.int64), shapes.astype(np.int64), regions.astype(np.int64), centres * covered[:, None]


def draw_images(rng: random.Random, n: int, patch: int) -> Dict[str, np.ndarray]:
    """``n`` pictures through the shards' JPEG round trip (uint8 [n, 3, H, W]) with their per-patch targets."""
    pixels, colors, shapes, regions, centres = [], [], [], [], []
    for _ in range(n):
        things = pretraining_scene(rng)
        jpeg = world.jpeg_bytes(world.render(things, world.random_background(rng)))
        pixels.append(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).transpose(2, 0, 1))
        c, s, r, xy = patch_targets(things, patch)
        colors.append(c)
        shapes.append(s)
        regions.append(r)
        centres.append(xy)
    return {"pixels": np.stack(pixels), "color": np.stack(colors), "shape": np.stack(shapes), "region": np.stack(regions),
            "centre": np.stack(centres)}


# --------------------------------------------------------------------------- the model
def build_encoder() -> nn.Module:
    """A randomly initialised ``CLIPVisionModel`` of :data:`ENCODER_CONFIG` (SDPA attention)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**ENCODER_CONFIG)
    config._attn_implementation = "sdpa"
    return CLIPVisionModel(config)


class Probe(nn.Module):
    """The pretraining heads on patch features [B, P, D] -> logits of the covering object's colour [B, P, 6], shape
    [B, P, 4] and region [B, P, 10], and its centre [B, P, 2] (x, y over the image size)."""

    SIZES = (len(COLOR_CLASSES), len(SHAPE_CLASSES), len(REGION_CLASSES), 2)

    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, sum(self.SIZES))

    def forward(self, feats: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.head(feats).split(self.SIZES, dim=-1))


def patch_features(encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B, 3, H, W] -> the patch features the LLaVA models read ([B, P, D], CLS dropped)."""
    out = encoder(pixel_values=normalize_pixels(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), output_hidden_states=True)
    return out.hidden_states[SELECT_LAYER][:, 1:]


def probe_accuracy(encoder: nn.Module, probe: Probe, data: Dict[str, np.ndarray], batch_size: int = 250) -> Dict[str, float]:
    """Per-patch accuracy of the heads: colour, shape and region on covered patches, 'none' on the others, and the
    mean error of the centre (in pixels) on covered patches."""
    hits = {"color": 0, "shape": 0, "region": 0, "empty": 0}
    n_cov = n_empty = 0
    err = 0.0
    with torch.no_grad():
        for i in range(0, len(data["pixels"]), batch_size):
            feats = patch_features(encoder, torch.from_numpy(data["pixels"][i:i + batch_size]))
            color, shape, where, centre = probe(feats)
            gold_c = torch.from_numpy(data["color"][i:i + batch_size])
            gold_s = torch.from_numpy(data["shape"][i:i + batch_size])
            gold_r = torch.from_numpy(data["region"][i:i + batch_size])
            gold_xy = torch.from_numpy(data["centre"][i:i + batch_size])
            cov = gold_c > 0
            hits["color"] += int((color.argmax(-1) == gold_c)[cov].sum())
            hits["shape"] += int((shape.argmax(-1) == gold_s)[cov].sum())
            hits["region"] += int((where.argmax(-1) == gold_r)[cov].sum())
            hits["empty"] += int((color.argmax(-1) == 0)[~cov].sum())
            err += float((centre - gold_xy)[cov].norm(dim=-1).sum()) * world.IMAGE_SIZE
            n_cov += int(cov.sum())
            n_empty += int((~cov).sum())
    return {"color_accuracy": hits["color"] / max(1, n_cov), "shape_accuracy": hits["shape"] / max(1, n_cov),
            "region_accuracy": hits["region"] / max(1, n_cov), "empty_accuracy": hits["empty"] / max(1, n_empty), "centre_error_px": err / max(1, n_cov),
            "covered_patches": n_cov, "empty_patches": n_empty}


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the same floating-point sums, in the same order, on every run."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain_encoder(out: Path, seed: int = 0, scale: float = 1.0) -> dict:
    """Pretrain the demo encoder and write it into ``out`` (a new folder); returns what ``pretraining.json`` holds."""
    from safetensors.torch import save_file

    settings = PretrainSettings().scaled(scale)
    start = time.perf_counter()
    patch = ENCODER_CONFIG["patch_size"]
    train = draw_images(random.Random(f"lm_mini-demo/{seed}/encoder"), settings.images, patch)
    held_out = draw_images(random.Random(f"lm_mini-demo/{seed}/encoder-held-out"), settings.held_out, patch)
    with _one_thread():
        torch.manual_seed(seed)
        encoder = build_encoder()
        probe = Probe(encoder.config.hidden_size)
        params = list(encoder.parameters()) + list(probe.parameters())
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / settings.warmup)
                                                     * 0.5 * (1 + math.cos(math.pi * min(1.0, step / settings.steps))))
        order = torch.Generator().manual_seed(seed)
        encoder.train()
        for step in range(settings.steps):
            idx = torch.randint(len(train["pixels"]), (settings.batch_size,), generator=order).numpy()
            color, shape, where, centre = probe(patch_features(encoder, torch.from_numpy(train["pixels"][idx])))
            gold = {k: torch.from_numpy(train[k][idx]) for k in ("color", "shape", "region", "centre")}
            cov = (gold["color"] > 0).unsqueeze(-1).float()
            ce = torch.nn.functional.cross_entropy
            loss = (ce(color.flatten(0, 1), gold["color"].flatten()) + ce(shape.flatten(0, 1), gold["shape"].flatten())
                    + ce(where.flatten(0, 1), gold["region"].flatten())
                    + 10.0 * ((centre - gold["centre"]) ** 2 * cov).sum() / cov.sum().clamp(min=1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        encoder.eval()
        probe.eval()
        accuracy = probe_accuracy(encoder, probe, held_out)
    out.mkdir(parents=True)
    encoder.save_pretrained(out, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in probe.head.state_dict().items()}, str(out / "probe.safetensors"))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": world.IMAGE_SIZE},
        "crop_size": {"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}, indent=2) + "\n")
    report = {"objective": "per patch: colour, shape, 3x3 region and centre of the covering object (linear heads on the last layer)",
              "select_layer": SELECT_LAYER, "covered_threshold": COVERED, "seed": seed, **asdict(settings),
              "held_out": {k: round(v, 4) if isinstance(v, float) else v for k, v in accuracy.items()}}
    (out / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    report["seconds"] = time.perf_counter() - start  # not in the file: it would differ from build to build
    return report


def load_probe(encoder_dir: Path) -> Probe:
    """The heads written next to a pretrained demo encoder (to check what its features hold)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(encoder_dir) / "probe.safetensors"))
    probe = Probe(state["weight"].shape[1])
    probe.head.load_state_dict(state)
    return probe.eval()
