"""Attention analysis: shares per token type, detection of image-focused attention, layer-drop."""
import json
import math

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lm_mini.config import load_config
from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lm_mini.eval.attention import LLMInputs, analyze, answer_scores, attention_stats, layer_drop, llm_inputs
from lm_mini.eval.efficiency import baseline_config, measured_model


def image_batch(vocab: int, size: int = 64, prefix: int = 3, question: int = 5, answer: int = 3):
    """[BOS, system..., <image>, question..., answer...] with the answer labelled."""
    ids = torch.randint(3, vocab, (1, prefix + 1 + question + answer))
    ids[0, prefix] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -answer:] = ids[0, -answer:]
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, size, size), "frames_per_sample": torch.tensor([1]),
            "is_video": torch.tensor([False]), "sample_ids": ["a"]}


@pytest.fixture(scope="module")
def tiny_models():
    cfg = load_config("experiments/models/tiny.yaml").model
    return {"llava_mini": measured_model(cfg, "cpu"), "llava15": measured_model(baseline_config(cfg), "cpu")}


@pytest.mark.parametrize("name,n_visual", [("llava_mini", 1), ("llava15", 64)])
def test_shares_sum_to_one_per_layer_for_every_model(tiny_models, name, n_visual):
    model = tiny_models[name]
    batches = [image_batch(1024), image_batch(1024, question=2)]
    result = analyze(model, batches)
    assert len(result["layers"]) == model.llm.config.num_hidden_layers
    for layer in result["layers"]:
        assert layer["samples"] == 2
        assert sum(layer["mass"].values()) == pytest.approx(1, abs=1e-5)
        assert sum(layer["share"].values()) == pytest.approx(1, abs=1e-5)
        assert 0 <= layer["visual_entropy"] <= math.log(n_visual) + 1e-5
    assert [row["k"] for row in result["layer_drop"]] == list(range(model.llm.config.num_hidden_layers + 1))


def test_token_types_locate_the_visual_tokens(tiny_models):
    inputs = llm_inputs(tiny_models["llava15"], image_batch(1024, prefix=3, question=5, answer=3))
    assert inputs.visual[0].nonzero().flatten().tolist() == list(range(3, 3 + 64))
    assert inputs.system[0, :3].all() and inputs.system.sum() == 3
    assert inputs.instruction.sum() == 5 and inputs.answer.sum() == 3


def forced_llm(force: bool) -> LlamaForCausalLM:
    """Tiny Llama; with ``force`` every query attends to the tokens whose embedding has a large dim 0
    (the image): q is a constant (bias) on the slowest rotary dim, k reads dim 0 there, and zeroed
    o_proj/down_proj keep the residual stream (and so the forcing) the same in every layer."""
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50, attention_bias=True)
    llm = LlamaForCausalLM(cfg).eval()
    if force:
        hd = 16
        with torch.no_grad():
            for layer in llm.model.layers:
                att = layer.self_attn
                att.q_proj.weight.zero_(), att.q_proj.bias.zero_(), att.k_proj.weight.zero_(), att.k_proj.bias.zero_()
                for h in range(2):
                    att.q_proj.bias[h * hd + hd - 1] = 1.0
                    att.k_proj.weight[h * hd + hd - 1, 0] = 100.0
                att.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return llm


def synthetic_inputs(S: int = 20, visual=range(4, 12)) -> LLMInputs:
    embeds = torch.randn(1, S, 32)
    embeds[..., 0] = 0
    vis = torch.zeros(1, S, dtype=torch.bool)
    vis[0, list(visual)] = True
    embeds[vis] = 0
    embeds[..., 0][vis] = 10.0  # the image: a large component on dim 0
    system = torch.zeros_like(vis)
    system[0, : min(visual)] = True
    answer = torch.zeros_like(vis)
    answer[0, -3:] = True
    labels = torch.where(answer, torch.randint(0, 50, (1, S)), torch.full((1, S), IGNORE_INDEX))
    return LLMInputs(embeds, torch.ones(1, S, dtype=torch.long), torch.arange(S)[None], labels,
                     system, vis, ~system & ~vis & ~answer, answer)


def test_attention_forced_onto_the_image_is_detected():
    inputs = synthetic_inputs()
    forced = attention_stats(forced_llm(True), inputs)
    plain = attention_stats(forced_llm(False), inputs)
    for layer in forced:
        assert layer["mass"]["visual"] > 0.99 and layer["share"]["visual"] > 0.99
        assert layer["visual_entropy"] == pytest.approx(math.log(8), abs=1e-3)  # equal keys: uniform over the image
    for layer in plain:
        assert layer["share"]["visual"] < 0.9


def test_layer_drop_at_zero_equals_removing_the_image(tiny_models):
    model = tiny_models["llava15"]
    inputs = llm_inputs(model, image_batch(1024))
    rows = layer_drop(model.llm, inputs)
    keep = ~inputs.visual[0]
    with torch.no_grad():  # the image cut out of the input; the other tokens keep their positions
        removed = model.llm(inputs_embeds=inputs.embeds[:, keep], attention_mask=inputs.mask[:, keep],
                            position_ids=inputs.position_ids[:, keep]).logits
        full = model.llm(inputs_embeds=inputs.embeds, attention_mask=inputs.mask, position_ids=inputs.position_ids).logits
    without_image = answer_scores(removed, inputs.labels[:, keep])
    with_image = answer_scores(full, inputs.labels)
    assert rows[0]["log_likelihood"] == pytest.approx(float(without_image["log_likelihood"][0]), abs=1e-5)
    assert rows[-1]["log_likelihood"] == pytest.approx(float(with_image["log_likelihood"][0]), abs=1e-5)
    assert abs(rows[0]["log_likelihood"] - rows[-1]["log_likelihood"]) > 1e-4  # the image did matter
    assert model.llm.config._attn_implementation == "sdpa"  # restored after the analysis


def test_cli_analyses_a_run_checkpoint_on_shards_and_writes_csv_and_png(tmp_path, capsys, monkeypatch):
    import csv

    from lm_mini.cli import main
    from lm_mini.config import to_yaml
    from lm_mini.eval.attention import load_model
    from lm_mini.runs import checkpoint_name

    cfg = load_config("experiments/demo.yaml", ["model.prefusion.depth=1"])
    cfg.data.tokenizer = str(Path(cfg.data.tokenizer).resolve())  # the test loads it from another directory
    trained = measured_model(cfg.model, "cpu")  # stands in for a trained model: its weights must come back
    run = tmp_path / "runs" / "demo" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    ckpt = run / "checkpoints" / checkpoint_name(7)
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, ckpt)

    monkeypatch.chdir(tmp_path)  # a run's name resolves under ./runs
    loaded, _ = load_model("r1", [])
    monkeypatch.undo()
    mine = loaded.state_dict()  # built afresh (other random weights), then loaded from the checkpoint
    assert all(torch.equal(mine[k], v) for k, v in trained.state_dict().items())
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0  # a model directory loads too
    from_dir = load_model(str(tmp_path / "exported"), ["data.batch_size=5"])
    assert all(torch.equal(from_dir[0].state_dict()[k], v) for k, v in trained.state_dict().items())
    assert from_dir[1].data.batch_size == 5
    assert main(["analyze", "attention", str(tmp_path / "nowhere"), "--data", "data_shards/demo/eval"]) == 1
    assert "nowhere: no such model directory, run directory or checkpoint" in capsys.readouterr().err

    out, png = tmp_path / "att.csv", tmp_path / "att.png"
    assert main(["analyze", "attention", str(ckpt), "--data", "data_shards/demo/eval", "--max-batches", "1",
                 "--batch-size", "2", "--out", str(out), "--plot", str(png)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [int(r["layer"]) for r in rows] == list(range(cfg.model.llm.config.num_hidden_layers))
    for r in rows:
        assert sum(float(r[f"share_{t}"]) for t in ("system", "visual", "instruction")) == pytest.approx(1, abs=1e-5)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "full model (no drop)" in capsys.readouterr().out
    # eval.max_samples bounds it too (in whole batches), as it does the generation eval
    assert main(["analyze", "attention", str(ckpt), "eval.max_samples=3", "--data", "data_shards/demo/eval",
                 "--batch-size", "2", "--no-layer-drop", "--out", str(tmp_path / "att.json")]) == 0
    assert json.loads((tmp_path / "att.json").read_text())["layers"][0]["samples"] == 4
