"""LlavaMini end to end on the tiny preset: LLaVA-1.5 parity, the batch contract, gradients, generation, errors."""
from pathlib import Path

import pytest
import torch
from torch import nn
from llava15_reference import llava15_twin

from lm_mini.config import load_config
from lm_mini.constants import IGNORE_INDEX as IGN
from lm_mini.constants import IMAGE_TOKEN_INDEX as IMG
from lm_mini.models.llava_mini import LlavaMini
from lm_mini.models.llm import hf_causal_lm
from lm_mini.models.projector import LinearProjector, MLP2xGELU

TINY = Path(__file__).resolve().parents[2] / "experiments" / "models" / "tiny.yaml"
SIZE = 64  # tiny preset: 64 px images, 8 x 8 patches, CLIP width 64, Llama width 128, vocab 1024


def tiny(*overrides):
    return LlavaMini.from_config(load_config(TINY, list(overrides)).model).eval()


def make_batch(samples, pad_id=0):
    """samples: (input_ids, labels or None, media); media: None (text-only), [3,H,W] (image), [T,3,H,W] (video)
    or ("image", [1+R², 3, H, W]) (a high-resolution image's views)."""
    L = max(len(ids) for ids, _, _ in samples)
    input_ids = torch.full((len(samples), L), pad_id)
    labels = torch.full((len(samples), L), IGN)
    mask = torch.zeros(len(samples), L, dtype=torch.long)
    pixels, frames, is_video = [], [], []
    for b, (ids, labs, media) in enumerate(samples):
        hires = isinstance(media, tuple)
        media = media[1] if hires else media
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(ids)] = torch.tensor(labs if labs is not None else [IGN] * len(ids))
        mask[b, : len(ids)] = 1
        video = media is not None and media.dim() == 4 and not hires
        frames.append(0 if media is None else (media.shape[0] if video else 1))
        is_video.append(video)
        if media is not None:
            pixels.append(media if media.dim() == 4 else media[None])
    return dict(input_ids=input_ids, labels=labels, attention_mask=mask,
                pixel_values=torch.cat(pixels) if pixels else None, frames_per_sample=torch.tensor(frames),
                is_video=torch.tensor(is_video), sample_ids=[f"s{b}" for b in range(len(samples))])


def image(seed=0, views=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(views, 3, SIZE, SIZE, generator=g).squeeze(0)


# prompt [sys, <image>, question], answer (labelled)
PROMPT = [11, 12, IMG, 13, 14, 15]
ANSWER = [21, 22, 23]
SAMPLE_IDS = PROMPT + ANSWER
SAMPLE_LABELS = [IGN] * len(PROMPT) + ANSWER


# --------------------------------------------------------------------------- LLaVA-1.5 parity
def test_identity_without_prefusion_is_exactly_llava_15():
    model = tiny("model.compressor.name=identity", "model.prefusion.depth=0")
    assert model.prefusion is None
    image_token = 1023
    hf = llava15_twin(model, image_token, "default")

    samples = [([5, IMG, 6, 7, 8], None, image(1)), ([9, 10, IMG, 6], None, image(2))]  # right padding in sample 1
    batch = make_batch(samples)
    n = model.encoder.grid**2  # LLaVA-1.5 puts all 64 patch tokens at <image>
    hf_ids = [sum(([image_token] * n if t == IMG else [t] for t in ids), []) for ids, _, _ in samples]
    L = max(map(len, hf_ids))
    hf_input = torch.tensor([ids + [0] * (L - len(ids)) for ids in hf_ids])
    hf_mask = torch.tensor([[1] * len(ids) + [0] * (L - len(ids)) for ids in hf_ids])
    with torch.no_grad():
        ours = model(batch)
        ref = hf(input_ids=hf_input, attention_mask=hf_mask, pixel_values=batch["pixel_values"])
    assert ours.logits.shape == ref.logits.shape
    valid = hf_mask.bool()
    assert (ours.logits[valid] - ref.logits[valid]).abs().max() < 1e-5


# --------------------------------------------------------------------------- what the LLM receives
def test_one_image_becomes_c2_tokens_and_answers_stay_raw():
    model = tiny()  # C = 1, pre-fusion depth 2
    batch = make_batch([(SAMPLE_IDS, SAMPLE_LABELS, image())])
    with torch.no_grad():
        embeds, mask, positions, labels = model.prepare_inputs(batch)
        raw = model.llm.get_input_embeddings()(torch.tensor(SAMPLE_IDS).clamp(min=0))
    slot = PROMPT.index(IMG)
    assert embeds.shape == (1, len(SAMPLE_IDS), 128)  # the <image> slot became C² = 1 token: the KV cache holds 1 per image
    assert torch.equal(positions[0], torch.arange(len(SAMPLE_IDS))) and mask.all()
    assert labels[0, slot] == IGN and labels[0, -3:].tolist() == ANSWER
    text_pos = [i for i in range(len(SAMPLE_IDS)) if i != slot]
    llm_text = embeds[0, text_pos]
    answers = slice(len(PROMPT) - 1, None)
    assert torch.equal(llm_text[answers], raw[len(PROMPT):])  # answer tokens reach the LLM unfused
    assert (llm_text[: len(PROMPT) - 1] - raw[[i for i in range(len(PROMPT)) if i != slot]]).abs().amax(-1).min() > 1e-3


def test_answer_tokens_are_never_read_by_prefusion():
    """Two turns: changing the first answer must not change the fused second question."""
    model = tiny()
    ids = [11, IMG, 12, 13, 31, 32, 14, 15, 33]
    labels = [IGN, IGN, IGN, IGN, 31, 32, IGN, IGN, 33]
    other = ids[:4] + [41, 42] + ids[6:]
    with torch.no_grad():
        a, *_ = model.prepare_inputs(make_batch([(ids, labels, image())]))
        b, *_ = model.prepare_inputs(make_batch([(other, labels, image())]))
    torch.testing.assert_close(a[0, 6:8], b[0, 6:8], rtol=0, atol=0)  # question 2, fused, identical
    assert not torch.equal(a[0, 4:6], b[0, 4:6])


def test_text_only_sample_is_plain_llm():
    model = tiny()
    ids = [3, 4, 5, 6, 7]
    with torch.no_grad():
        out = model(make_batch([(ids, None, None)]))
        ref = model.llm(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(out.logits, ref)


def unit_outputs(model, ids, labels, frame):
    """(media tokens [C², d], LLM text embeddings [L-1, d]) for one image sample."""
    with torch.no_grad():
        embeds, *_ = model.prepare_inputs(make_batch([(ids, labels, frame)]))
    slot = ids.index(IMG)
    c2 = embeds.shape[1] - len(ids) + 1
    return embeds[0, slot : slot + c2], torch.cat([embeds[0, :slot], embeds[0, slot + c2 :]])


def test_video_frames_in_time_order_and_fused_text_averaged():
    model = tiny("model.compressor.grid=2")  # C² = 4 tokens per frame
    frames = torch.stack([image(1), image(2), image(3)])
    with torch.no_grad():
        embeds, *_ = model.prepare_inputs(make_batch([(SAMPLE_IDS, SAMPLE_LABELS, frames)]))
    per_frame = [unit_outputs(model, SAMPLE_IDS, SAMPLE_LABELS, f) for f in frames]
    slot = SAMPLE_IDS.index(IMG)
    assert embeds.shape[1] == len(SAMPLE_IDS) - 1 + 3 * 4  # T·C² tokens at the single slot
    torch.testing.assert_close(embeds[0, slot : slot + 12], torch.cat([m for m, _ in per_frame]))
    text = torch.cat([embeds[0, :slot], embeds[0, slot + 12 :]])
    torch.testing.assert_close(text, torch.stack([t for _, t in per_frame]).mean(0), rtol=1e-5, atol=1e-6)


def test_high_resolution_stitches_crops_and_still_gives_c2_tokens():
    R = 2
    model = tiny(f"model.resolution_ratio={R}", "model.compressor.grid=2")
    views = image(5, views=1 + R * R)  # global view first, then crops row-major
    seen = {}
    model.compressor.register_forward_hook(lambda m, args, kwargs, out: seen.update(tokens=args[0], hw=kwargs["grid_hw"]),
                                           with_kwargs=True)
    with torch.no_grad():
        embeds, *_ = model.prepare_inputs(make_batch([(SAMPLE_IDS, SAMPLE_LABELS, ("image", views))]))
        crops = model.encoder(views[1:]).reshape(R * R, 8, 8, -1)  # [4, g, g, D]
    stitched = torch.cat([torch.cat([crops[0], crops[1]], 1), torch.cat([crops[2], crops[3]], 1)], 0)  # [2g, 2g, D]
    assert seen["hw"] == (16, 16)
    torch.testing.assert_close(seen["tokens"][0], stitched.reshape(256, -1))
    assert embeds.shape[1] == len(SAMPLE_IDS) - 1 + 4  # the LLM still gets C² tokens


def test_mixed_batch_equals_samples_alone():
    """Images, a video, text-only and a padding sample in one right-padded batch."""
    model = tiny()
    samples = [
        (SAMPLE_IDS, SAMPLE_LABELS, image(1)),
        ([7, IMG, 8, 24], [IGN, IGN, IGN, 24], torch.stack([image(2), image(3)])),
        ([3, 4, 5, 25, 26], [IGN, IGN, IGN, 25, 26], None),
        ([9, IMG, 10], None, image(4)),  # a padding sample: all labels IGNORE
    ]
    batch = make_batch(samples)
    batch["sample_ids"][3] = None
    with torch.no_grad():
        together = model(batch)
        for b, sample in enumerate(samples):
            alone = model(make_batch([sample]))
            n = alone.logits.shape[1]
            torch.testing.assert_close(together.logits[b, :n], alone.logits[0], rtol=1e-4, atol=1e-5)


def test_uint8_pixels_are_normalised_with_the_encoders_mean_and_std():
    """The data loader hands over raw uint8 RGB; the model normalises it as a HF processor would have."""
    model = tiny()
    raw = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(model.encoder.image_mean).view(3, 1, 1)
    std = torch.tensor(model.encoder.image_std).view(3, 1, 1)
    as_float = (raw.float() / 255 - mean) / std
    texts = [(SAMPLE_IDS, SAMPLE_LABELS), ([7, IMG, 8, 24], [IGN, IGN, IGN, 24])]  # an image, a 2-frame video

    def batch(pixels):
        return make_batch([(*texts[0], pixels[0]), (*texts[1], pixels[1:])])

    with torch.no_grad():
        from_uint8, from_float = model(batch(raw)), model(batch(as_float))
    torch.testing.assert_close(from_uint8.logits, from_float.logits, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(from_uint8.loss) and abs(from_uint8.loss.item() - from_float.loss.item()) < 1e-5


# --------------------------------------------------------------------------- training signal
@pytest.mark.parametrize("media", ["image", "video", "hires"])
def test_gradients_reach_every_trainable_part_and_not_the_frozen_encoder(media):
    model = tiny(*(["model.resolution_ratio=2"] if media == "hires" else [])).train()
    pixels = {"image": image(1), "video": torch.stack([image(1), image(2)]), "hires": ("image", image(1, views=5))}[media]
    batch = make_batch([(SAMPLE_IDS, SAMPLE_LABELS, pixels)])
    model(batch).loss.backward()
    for part in ["projector", "compressor", "prefusion", "llm"]:
        no_grad = [n for n, p in getattr(model, part).named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert no_grad == [], f"{part}: no gradient for {no_grad}"
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())


def test_unfrozen_encoder_trains_too():
    model = tiny()
    model.encoder.requires_grad_(True)
    model(make_batch([(SAMPLE_IDS, SAMPLE_LABELS, image())])).loss.backward()
    assert model.encoder.model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_all_ignored_labels_give_zero_loss_with_a_graph():
    model = tiny()
    out = model(make_batch([(SAMPLE_IDS, None, image()), ([3, 4], None, None)]))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_is_the_mean_over_answer_tokens():
    model = tiny()
    batch = make_batch([(SAMPLE_IDS, SAMPLE_LABELS, image())])
    out = model(batch)
    logits, targets = out.logits[0, len(SAMPLE_IDS) - 4 : -1], torch.tensor(ANSWER)  # C = 1: same length as input
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(logits, targets))


# --------------------------------------------------------------------------- generation
def greedy_without_cache(model, batch, steps):
    embeds, mask, positions, _ = model.prepare_inputs(batch, padding_side="left")
    embed = model.llm.get_input_embeddings()
    tokens = []
    for _ in range(steps):
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1)
        tokens.append(nxt)
        embeds = torch.cat([embeds, embed(nxt)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    return torch.stack(tokens, 1)


def test_generate_with_cache_matches_a_greedy_loop_without_cache():
    model = tiny("model.compressor.grid=2")
    prompts = [(PROMPT, None, image(1)), ([7, 8, IMG, 9], None, torch.stack([image(2), image(3)])), ([3, 4, 5, 6, 9, 9, 9], None, None)]
    batch = make_batch(prompts)  # different lengths: left padding inside generate
    with torch.no_grad():
        generated = model.generate(batch, max_new_tokens=6, eos_token_id=None)
        expected = greedy_without_cache(model, batch, 6)
        alone = [model.generate(make_batch([p]), max_new_tokens=6, eos_token_id=None) for p in prompts]
    assert generated.shape == (3, 6)
    assert torch.equal(generated, expected)
    assert torch.equal(generated, torch.cat(alone))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("ids, media, message", [
    ([5, 6, 7], image(), r"sample 0 \('s0'\): 0 <image> placeholder\(s\).*with 1 frame\(s\).*expected 1"),
    ([5, IMG, IMG, 7], image(), r"sample 0 \('s0'\): 2 <image> placeholder\(s\)"),
    ([5, IMG, 7], None, r"sample 0 \('s0'\): 1 <image> placeholder\(s\).*text-only.*expected 0"),
])
def test_placeholder_count_must_match_the_media(ids, media, message):
    with pytest.raises(ValueError, match=message):
        tiny()(make_batch([(ids, None, media)]))


def test_views_must_match_frames_and_resolution_ratio():
    batch = make_batch([([5, IMG, 7], None, image())])
    with pytest.raises(ValueError, match="pixel_values holds 1 views .* needs 5"):
        tiny("model.resolution_ratio=2")(batch)


def test_compressor_cannot_emit_more_tokens_than_the_encoder_has():
    with pytest.raises(ValueError, match=r"C\*C = 81 tokens .* 64 patch tokens \(8x8\); set model.compressor.grid <= 8"):
        tiny("model.compressor.grid=9")


def test_projector_must_output_the_llm_width():
    model = tiny()
    with pytest.raises(ValueError, match="maps 64 -> 96, but the LLM's hidden size is 128"):
        LlavaMini(model.encoder, nn.Linear(64, 96), model.compressor, model.llm, model.prefusion)


# --------------------------------------------------------------------------- small parts
def test_projectors_keep_the_official_parameter_names():
    assert list(MLP2xGELU(4, 8).state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # mm_projector.0 / .2
    assert list(LinearProjector(4, 8).state_dict()) == ["weight", "bias"]
    mlp = MLP2xGELU(4, 8)
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(x), mlp[2](nn.functional.gelu(mlp[0](x))))


def test_llm_from_a_local_path_and_on_meta(tmp_path):
    config = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64)
    saved = hf_causal_lm(config)
    saved.save_pretrained(tmp_path)
    loaded = hf_causal_lm(path=str(tmp_path), attn_implementation="eager")
    torch.testing.assert_close(loaded.state_dict(), saved.state_dict())
    assert loaded.config._attn_implementation == "eager"
    with torch.device("meta"):
        ghost = hf_causal_lm(path=str(tmp_path))
    assert all(p.is_meta for p in ghost.parameters())
    with pytest.raises(ValueError, match="model_type"):
        hf_causal_lm({"hidden_size": 32})


@pytest.mark.parametrize("detach", [True, False])
def test_prefusion_detach_text_decides_whether_question_embeddings_learn(detach):
    # The question tokens reach the LLM only through pre-fusion; official LLaVA-Mini detaches that input.
    model = tiny(f"model.prefusion.detach_text={str(detach).lower()}").train()
    model(make_batch([(SAMPLE_IDS, SAMPLE_LABELS, image(1))])).loss.backward()
    grad = model.llm.get_input_embeddings().weight.grad
    question_rows = grad[[11, 12, 13, 14, 15]].abs().sum(dim=1)
    assert grad[ANSWER].abs().sum() > 0  # answers are read raw by the LLM either way
    assert bool((question_rows == 0).all()) is detach
