"""Switches that follow the released LLaVA-Mini around the model: text-only samples fused with a blank image in
training (model.prefusion.text_only_blank_image) and high-resolution video frames (model.video_hires)."""
import pytest
import torch
from test_llava_mini import SAMPLE_IDS, SAMPLE_LABELS, image, make_batch, tiny

from lm_mini.constants import IGNORE_INDEX as IGN
from lm_mini.constants import IMAGE_TOKEN_INDEX as IMG

TEXT = [3, 4, 5, 6, 25, 26]  # system + question, then a two-token answer
TEXT_LABELS = [IGN, IGN, IGN, IGN, 25, 26]


def blank_fused_text(model, ids, labels):
    """What official training gives a text-only sample: its non-answer text fused with an all-zero image
    (``torch.zeros(1 or R²+1, 3, H, W)`` in the processor's normalised space, llavamini/train/train.py), through
    the model's own media path with that image given explicitly. Returns the LLM's text embeddings [L, d]."""
    batch = make_batch([(ids, labels, None)])
    views = model.views_per_image
    batch.update(pixel_values=torch.zeros(views, 3, 64, 64), frames_per_sample=torch.tensor([1]))
    text = model.llm.get_input_embeddings()(batch["input_ids"])
    fuse = batch["attention_mask"].bool() & (batch["labels"] == IGN)
    with torch.no_grad():
        media, fused, has = model.encode_media(batch, text, fuse)
    assert media[0] is not None and has.tolist() == [True]
    return torch.where(fuse.unsqueeze(-1), fused, text)[0]


def test_text_only_training_sample_is_fused_with_a_blank_image():
    for ratio in (1, 2):
        model = tiny("model.prefusion.text_only_blank_image=true", f"model.resolution_ratio={ratio}").train()
        with torch.no_grad():
            embeds, _, _, labels = model.prepare_inputs(make_batch([(TEXT, TEXT_LABELS, None)]))
        assert embeds.shape[1] == len(TEXT)  # no media slot, no media tokens
        torch.testing.assert_close(embeds[0], blank_fused_text(model, TEXT, TEXT_LABELS), rtol=0, atol=0)
        raw = model.llm.get_input_embeddings()(torch.tensor(TEXT))
        assert not torch.allclose(embeds[0, :4], raw[:4])  # the question is fused...
        torch.testing.assert_close(embeds[0, 4:], raw[4:], rtol=0, atol=0)  # ...the answer reaches the LLM raw
        assert labels[0].tolist() == TEXT_LABELS


def test_text_only_switch_off_and_inference_leave_text_only_samples_unfused():
    on = tiny("model.prefusion.text_only_blank_image=true")
    off = tiny()
    off.load_state_dict(on.state_dict())
    raw = on.llm.get_input_embeddings()(torch.tensor(TEXT))
    with torch.no_grad():
        # switch off, training; switch on, eval mode (validation loss, evaluation): the text reaches the LLM raw
        for model, training in ((off, True), (on, False)):
            embeds, *_ = model.train(training).prepare_inputs(make_batch([(TEXT, TEXT_LABELS, None)]))
            torch.testing.assert_close(embeds[0], raw, rtol=0, atol=0)
        # generation never fuses a text-only prompt, even on a model left in training mode
        batch = make_batch([(TEXT[:4], None, None)])
        on.train(), off.eval()
        assert torch.equal(on.generate(batch, max_new_tokens=3), off.generate(batch, max_new_tokens=3))


def test_text_only_blank_image_in_a_mixed_batch_and_its_gradient():
    """Image, text-only and padding samples together: each gives what it gives alone; the blank image's tokens
    go nowhere, a padding sample gets no blank image, and the loss reaches pre-fusion through the fused text."""
    model = tiny("model.prefusion.text_only_blank_image=true").train()
    samples = [(SAMPLE_IDS, SAMPLE_LABELS, image(1)), (TEXT, TEXT_LABELS, None), ([9, 10], None, None)]
    batch = make_batch(samples)
    batch["sample_ids"][2] = None  # padding
    seen = []
    model.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        together = model(batch)
        alone = [model(make_batch([s])).logits for s in samples[:2]]
    assert seen[0] == 2  # the image's view and one blank view; none for the padding sample
    for b, logits in enumerate(alone):
        torch.testing.assert_close(together.logits[b, : logits.shape[1]], logits[0], rtol=1e-4, atol=1e-5)
    model(make_batch([(TEXT, TEXT_LABELS, None)])).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prefusion.parameters() if p.requires_grad)


def test_high_resolution_video_frames_have_r2_plus_1_views_each():
    """model.video_hires at R = 2: every frame is 5 views (global first, then 4 crops) and gives what the same
    views give as a high-resolution image; the LLM gets T·C² tokens. Off: one view a frame, as before."""
    R, T = 2, 3
    model = tiny(f"model.resolution_ratio={R}", "model.compressor.grid=2", "model.video_hires=true")
    frames = [image(10 + t, views=1 + R * R) for t in range(T)]  # [5, 3, 64, 64] each
    video = make_batch([(SAMPLE_IDS, SAMPLE_LABELS, torch.cat(frames))])
    video.update(frames_per_sample=torch.tensor([T]), is_video=torch.tensor([True]))
    with torch.no_grad():
        embeds, *_ = model.prepare_inputs(video)
        per_frame = [model.prepare_inputs(make_batch([(SAMPLE_IDS, SAMPLE_LABELS, ("image", f))]))[0] for f in frames]
    slot, c2 = SAMPLE_IDS.index(IMG), 4
    assert embeds.shape[1] == len(SAMPLE_IDS) - 1 + T * c2
    torch.testing.assert_close(embeds[0, slot:slot + T * c2], torch.cat([e[0, slot:slot + c2] for e in per_frame]))
    text = torch.cat([embeds[0, :slot], embeds[0, slot + T * c2:]])
    expected = torch.stack([torch.cat([e[0, :slot], e[0, slot + c2:]]) for e in per_frame]).mean(0)
    torch.testing.assert_close(text, expected, rtol=1e-5, atol=1e-6)

    one_view = tiny(f"model.resolution_ratio={R}", "model.compressor.grid=2")
    with pytest.raises(ValueError, match="needs 3"):  # without video_hires a frame is one view
        one_view.prepare_inputs(video)
    with pytest.raises(ValueError, match="needs 15"):
        model.prepare_inputs({**video, "pixel_values": video["pixel_values"][:T]})


# ------------------------------------------------------------------- official quirks of the release (F5, F6)
BANG = 0  # token id 0: "!" in Llama-3's vocabulary
BANG_IDS = [11, BANG, 12, IMG, 13, BANG, 14, 21, BANG, 22]  # "!" in the system text, the question and the answer
BANG_LABELS = [IGN] * 7 + [21, BANG, 22]


def official_prefusion_text_mask(input_ids, labels):
    """The text tokens official LLaVA-Mini fuses (ictnlp/LLaVA-Mini@47da113, llavamini/model/llavamini_arch.py:343-345:
    ``input_ids = input_ids * (labels == -100).int()``, ``padding_mask = (input_ids <= 0)``), as a keep-mask."""
    return ~((input_ids * (labels == IGN).int()) <= 0)


@pytest.mark.parametrize("ratio", [1, 2])
def test_skip_token_id_0_fuses_what_official_fuses(ratio):
    """model.prefusion.skip_token_id_0 (the release's value): a token whose id is 0 is left out of pre-fusion (as key,
    as query, and in the running position count) and reaches the LLM raw, as official; off, it is fused."""
    on = tiny("model.prefusion.skip_token_id_0=true", f"model.resolution_ratio={ratio}")
    off = tiny(f"model.resolution_ratio={ratio}")
    off.load_state_dict(on.state_dict())
    views = on.views_per_image
    batch = make_batch([(BANG_IDS, BANG_LABELS, ("image", image(3, views)) if views > 1 else image(3))])
    ids, labels = batch["input_ids"], batch["labels"]
    text = on.llm.get_input_embeddings()(ids.clamp(min=0))
    with torch.no_grad():
        embeds, *_ = on.prepare_inputs(batch)
        official_keep = official_prefusion_text_mask(ids, labels)
        _, fused, _ = on.encode_media(batch, text, official_keep)
        expected = torch.where(official_keep.unsqueeze(-1), fused, text)[0]
        slot = BANG_IDS.index(IMG)
        ours = torch.cat([embeds[0, :slot], embeds[0, slot + 1:]])  # C = 1: one media token at the slot
        torch.testing.assert_close(ours, torch.cat([expected[:slot], expected[slot + 1:]]), rtol=0, atol=0)
        raw = on.llm.get_input_embeddings()(torch.tensor([BANG]))[0]
        for k in (1, 5, 8):  # every "!" reaches the LLM raw
            torch.testing.assert_close(embeds[0, k], raw, rtol=0, atol=0)
        without, *_ = off.prepare_inputs(batch)
        assert not torch.allclose(without[0, 1], raw)  # off: the system text's "!" is fused like any token
        torch.testing.assert_close(without[0, 8], raw, rtol=0, atol=0)  # answers are never fused
        # generation (no labels): the prompt's "!" stays out too
        prompt = make_batch([(BANG_IDS[:7], None, ("image", image(3, views)) if views > 1 else image(3))])
        embeds, *_ = on.prepare_inputs(prompt, padding_side="left", blank_text_only=False)
        torch.testing.assert_close(embeds[0, 1], raw, rtol=0, atol=0)


@pytest.mark.parametrize("text_only", [False, True])
def test_train_input_embeddings_off_never_updates_the_embedding_table(text_only):
    """model.llm.train_input_embeddings=false (the release's): every text embedding is detached, as official
    encode_images_mini's all_text_embedding.detach(), so the input table gets no gradient (official: grad None),
    while the output layer, pre-fusion and the rest still learn. On: the answers' rows learn."""
    sample = (TEXT, TEXT_LABELS, None) if text_only else (SAMPLE_IDS, SAMPLE_LABELS, image(1))
    for trains in (False, True):
        model = tiny("model.prefusion.text_only_blank_image=true",
                     f"model.llm.train_input_embeddings={str(trains).lower()}").train()
        model(make_batch([sample])).loss.backward()
        grad = model.llm.get_input_embeddings().weight.grad
        assert model.llm.get_output_embeddings().weight.grad.abs().sum() > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prefusion.parameters())
        if trains:
            answer = [t for t in sample[1] if t != IGN]
            assert grad[answer].abs().sum() > 0
        else:
            assert grad is None
