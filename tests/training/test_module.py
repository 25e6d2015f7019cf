"""The LightningModule's pieces on the real tiny LLaVA-Mini, in process: stages, optimizer groups,
schedule, FSDP unit discovery, activation checkpointing, init_from, resume exactness, the evaluation's
prompt / answer split."""
import math

import pytest
import torch

from training_helpers import TINY, TinyData, collate, BrightnessQA, params_of, tiny_config
from lm_mini.config import load_config
from lm_mini.constants import IMAGE_TOKEN_INDEX
from lm_mini.data import samples
from lm_mini.data.conversation import build_prompt, tokenize_conversation
from lm_mini.data.tokenizer import load_tokenizer
from lm_mini.models.llava_mini import LlavaMini
from lm_mini import runs
from lm_mini.eval.generation import split_prompt_answer
from lm_mini.training.module import apply_stage, cosine_with_warmup, init_weights_from, param_groups
from lm_mini.training.run import train
from lm_mini.training.strategy import apply_activation_checkpointing, model_blocks

ROOT = TINY.parents[2]


def _stage(name, *overrides):
    return load_config(ROOT / "experiments" / "stages" / f"{name}.yaml", [f"model.llm.config.vocab_size=64", *overrides])


def test_stages_freeze_parts_and_give_each_part_its_lr():
    model = LlavaMini.from_config(load_config(TINY).model)
    cfg = _stage("pretrain")
    assert apply_stage(model, cfg.train.parts) == {"encoder": False, "projector": True, "compressor": False, "prefusion": False, "llm": False}
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    assert [(g["name"], g["lr"]) for g in param_groups(model, cfg.train)] == [("projector", 1e-3)]

    cfg = _stage("finetune", "train.parts.llm.lr=2e-5", "train.weight_decay=0.1")
    apply_stage(model, cfg.train.parts)
    groups = {g["name"]: g for g in param_groups(model, cfg.train)}
    assert set(groups) == {f"{p}{s}" for p in ("projector", "compressor", "prefusion", "llm") for s in ("", "_no_decay")}
    assert groups["llm"]["lr"] == 2e-5 and groups["projector"]["lr"] == 1e-4
    assert all(p.ndim < 2 for p in groups["llm_no_decay"]["params"]) and groups["llm_no_decay"]["weight_decay"] == 0.0
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, total_steps=100, warmup_ratio=0.03)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] == pytest.approx(1.0)  # ceil(0.03 * 100) = 3 warmup steps
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[50] == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 97)))
    assert lrs[-1] < 1e-3


def test_fsdp_units_are_encoder_blocks_prefusion_layers_and_llm_layers():
    cfg = load_config(TINY)
    model = LlavaMini.from_config(cfg.model)
    blocks = model_blocks(model)
    expected = cfg.model.encoder.config.num_hidden_layers + cfg.model.prefusion.depth + cfg.model.llm.config.num_hidden_layers
    assert len(blocks) == expected
    assert {type(b).__name__ for b in blocks} == {"CLIPEncoderLayer", "LlamaDecoderLayer"}


def test_activation_checkpointing_keeps_loss_gradients_and_checkpoint_keys():
    cfg = load_config(TINY, ["model.llm.config.vocab_size=64"])
    torch.manual_seed(0)
    plain = LlavaMini.from_config(cfg.model)
    wrapped = LlavaMini.from_config(cfg.model)
    wrapped.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(wrapped) == len(model_blocks(plain))
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints interchangeable
    batch = collate([BrightnessQA(4)[i] for i in range(4)])
    plain(batch).loss.backward()
    wrapped(batch).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_resume_from_a_checkpoint_is_bit_exact_and_init_from_loads_weights(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=6")
    full = train(cfg, datamodule=TinyData(64))
    final = params_of(full.trainer.lightning_module.model)
    names = [p.name for p in runs.list_checkpoints(full.run.checkpoints)]
    assert names == ["step=00000004.ckpt", "step=00000006.ckpt"]  # every 2 steps, the last 2 kept

    resumed = train(cfg, resume=str(full.run.checkpoints / "step=00000004.ckpt"), datamodule=TinyData(64))
    again = params_of(resumed.trainer.lightning_module.model)
    assert all(torch.equal(final[k], again[k]) for k in final)
    first = params_of(LlavaMini.from_config(cfg.model))
    assert not all(torch.equal(first[k], final[k]) for k in first)  # training changed the weights

    fresh = LlavaMini.from_config(cfg.model)
    assert init_weights_from(fresh, str(full.run.checkpoints / "step=00000006.ckpt")) == []
    assert all(torch.equal(fresh.state_dict()[k], final[k]) for k in final)


def _turns(*texts):
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


def test_the_evaluated_answer_is_the_first_one_after_the_media_slot():
    tok = load_tokenizer(ROOT / "data_shards" / "demo" / "tokenizer")
    # <image> in a later turn: cut before the first answer, its prompt had no media slot (the model refuses that)
    later = _turns("Hello", "Hi.", "<image>\nWhat colour is this?", "red", "And now?", "blue")
    first = _turns("<image>\nWhat colour is the square?", "Red.", "Where is it?", "left")
    text = _turns("Name a colour.", "Blue.", "Another?", "Green.")  # no media slot: the first answer, as before
    # (record, has media, its turns up to the evaluated answer, that answer as trained)
    records = [(later, True, 4, " red</s>"), (first, True, 2, " Red.</s>"), (text, False, 2, " Blue.</s>")]
    tokenized = [tokenize_conversation(conv, tok, "vicuna_v1", 256, has_media=media) for conv, media, *_ in records]
    batch = samples.collate([{"input_ids": t.input_ids, "labels": t.labels, "pixel_values": None, "frames": int(media),
                              "is_video": False, "sample_id": str(b), "flags": []}
                             for b, (t, (_, media, *_)) in enumerate(zip(tokenized, records))], pad_id=tok.pad_token_id)
    prompt, golds = split_prompt_answer(batch)
    for b, (conv, media, n, answer) in enumerate(records):
        ids = prompt["input_ids"][b][prompt["attention_mask"][b].bool()].tolist()
        assert ids == build_prompt(conv[:n], tok, "vicuna_v1", has_media=media), b  # ends with that question's "ASSISTANT:"
        assert ids.count(IMAGE_TOKEN_INDEX) == int(media), b
        assert golds[b] == tok(answer, add_special_tokens=False)["input_ids"], b
        assert batch["input_ids"][b, : len(ids) + len(golds[b])].tolist() == ids + golds[b]  # the answer right after the prompt
