"""``lm-mini generate`` / ``lm-mini chat`` on an image and a video, and their errors."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from interop_helpers import tiny_config

from lm_mini.cli import main
from lm_mini.constants import IMAGE_TOKEN_INDEX
from lm_mini.interop.generate import open_conversation
from lm_mini.interop.pretrained import save_pretrained
from lm_mini.models.llava_mini import LlavaMini


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    torch.manual_seed(7)
    cfg = tiny_config(template="llama3")
    model = LlavaMini.from_config(cfg.model)
    return save_pretrained(tmp_path_factory.mktemp("m") / "model", model.state_dict(), cfg, tokenizer_dir, card="# test\n")


def _json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return json.loads(out[0])


@pytest.mark.parametrize("kind, frames", [("image", 1), ("video", 3)])
def test_generate_answers_about_an_image_and_a_video(model_dir, media, capsys, kind, frames):
    args = ["generate", str(model_dir), f"--{kind}", str(media[kind]), "--prompt", "What colour is the square?",
            "--max-new-tokens", "6"]
    assert main(args + ["--json"]) == 0
    record = _json(capsys)
    assert (record["kind"], record["frames"], record["template"]) == (kind, frames, "llama3")
    assert 0 < len(record["tokens"]) <= 6 and record["answer"]  # a random tiny model still answers something
    assert main(args) == 0  # streamed to the terminal: the same greedy answer
    assert capsys.readouterr().out.strip() == record["answer"]


def test_prompt_follows_the_checkpoint_template(model_dir, media):
    conv = open_conversation(str(model_dir), str(media["image"]), None, "cpu")
    ids = conv.batch("What colour is the square?")["input_ids"][0].tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    text = conv.tokenizer.decode([i for i in ids if i >= 0])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert text.endswith("What colour is the square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_keeps_the_conversation(model_dir, media, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What colour is the square?\n\nAnd the circle?\nexit\nnever asked\n"))
    assert main(["chat", str(model_dir), "--image", str(media["image"]), "--json", "--max-new-tokens", "4"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [a["question"] for a in answers] == ["What colour is the square?", "And the circle?"]

    conv = open_conversation(str(model_dir), None, str(media["video"]), "cpu")
    first = conv.ask("What colour is the square?", max_new_tokens=4)
    conv.ask("And the circle?", max_new_tokens=4)
    assert [t["from"] for t in conv.turns] == ["human", "gpt", "human", "gpt"] and conv.turns[1]["value"] == first["answer"]
    ids = conv.batch("And the triangle?")["input_ids"][0].tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 1  # one media slot for the whole conversation
    text = conv.tokenizer.decode([i for i in ids if i >= 0])
    assert "What colour is the square?" in text and "And the circle?" in text and text.count("<|start_header_id|>assistant") == 3


def test_chat_ends_on_eof(model_dir, media, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What colour is the square?\n"))
    assert main(["chat", str(model_dir), "--image", str(media["image"]), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("assistant> ")


@pytest.mark.parametrize("case, message", [
    ("no-model", "no such model directory, run directory or checkpoint"),
    ("no-file", "image file not found"),
    ("text-file", "unsupported image type '.txt'"),
    ("video-as-image", "unsupported image type '.mp4'"),
    ("broken-image", "[corrupt_image]"),
    ("image-as-video", "unsupported video type '.png'"),
])
def test_generate_errors_are_clear(model_dir, media, tmp_path, capsys, case, message):
    source, flag, path = str(model_dir), "--image", media["image"]
    if case == "no-model":
        source = str(tmp_path / "missing-model")
    path = {"no-file": tmp_path / "missing.png", "text-file": media["text"], "video-as-image": media["video"],
            "broken-image": media["broken"]}.get(case, path)
    if case == "image-as-video":
        flag = "--video"
    assert main(["generate", source, flag, str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path if case != "no-model" else source) in err


def test_exactly_one_media_item(model_dir, media):
    with pytest.raises(SystemExit):
        main(["generate", str(model_dir), "--image", str(media["image"]), "--video", str(media["video"]), "--prompt", "hi"])
    with pytest.raises(SystemExit):
        main(["generate", str(model_dir), "--prompt", "hi"])


def test_generate_on_the_demo_set(tmp_path, capsys):
    """The shipped demo shards' first eval image and first video, their tokenizer, a model sized to it."""
    from interop_helpers import LLAMA, ROOT

    from lm_mini.data.errors import SkipCounter
    from lm_mini.data.shard_reader import iter_raw_samples
    from lm_mini.data.tokenizer import load_tokenizer

    demo = ROOT / "data_shards" / "demo"
    files = {}
    for part, kind in (("eval", "image"), ("video", "video")):
        raw = next(s for s in iter_raw_samples([demo / part / "shard-000000.tar"], SkipCounter()) if s.media_kind == kind)
        files[kind] = tmp_path / f"{kind}.{raw.media_ext}"
        files[kind].write_bytes(raw.media_bytes)
    vocab = len(load_tokenizer(demo / "tokenizer"))
    cfg = tiny_config(template="vicuna_v1", llm={"config": {**LLAMA, "vocab_size": vocab}})
    model = LlavaMini.from_config(cfg.model)
    out = save_pretrained(tmp_path / "model", model.state_dict(), cfg, demo / "tokenizer", card="# demo\n")
    for kind in ("image", "video"):
        assert main(["generate", str(out), f"--{kind}", str(files[kind]), "--prompt", "What is shown?", "--json",
                     "--max-new-tokens", "4"]) == 0
        record = _json(capsys)
        assert record["kind"] == kind and record["tokens"] and record["template"] == "vicuna_v1"
        assert (record["frames"] == 1) if kind == "image" else (1 < record["frames"] <= cfg.data.max_frames)


# ----------------------------------------------------------------------------- the attention backend at inference
@pytest.fixture(scope="module")
def xformers_model_dir(model_dir, tmp_path_factory):
    """The same model saved as a GPU run with xformers would save it (xformers is not installed here, no CUDA)."""
    import shutil

    out = tmp_path_factory.mktemp("xf") / "model"
    shutil.copytree(model_dir, out)
    text = (out / "config.yaml").read_text()
    assert "  attn_implementation: sdpa\n" in text
    (out / "config.yaml").write_text(text.replace("  attn_implementation: sdpa\n", "  attn_implementation: xformers\n", 1))
    return out


def test_a_model_saved_with_a_backend_that_cannot_run_here_answers_with_sdpa_and_says_so(model_dir, xformers_model_dir, media,
                                                                                       capsys, caplog):
    from lm_mini.models.attention import backend_problem

    assert backend_problem("xformers") is not None  # this machine cannot run it
    args = ["--image", str(media["image"]), "--prompt", "What colour is the square?", "--max-new-tokens", "6", "--json"]
    assert main(["generate", str(model_dir)] + args) == 0
    expected = _json(capsys)["answer"]
    with caplog.at_level("WARNING"):
        assert main(["generate", str(xformers_model_dir)] + args) == 0
    assert _json(capsys)["answer"] == expected
    assert "model.attn_implementation=xformers cannot run here" in caplog.text and "using sdpa" in caplog.text
    # the user's choice: eager computes the same answer; a backend that cannot run is refused, naming the way out
    assert main(["generate", str(xformers_model_dir), "--attn-implementation", "eager"] + args) == 0
    assert _json(capsys)["answer"] == expected
    assert main(["generate", str(xformers_model_dir), "--attn-implementation", "xformers"] + args) == 2
    assert "xformers needs the xformers package" in capsys.readouterr().err


def test_a_saved_model_takes_only_its_attention_backends_as_overrides():
    from lm_mini.config import ConfigError, saved_model_overrides

    assert saved_model_overrides(["eval.max_samples=3", "model.attn_implementation=eager"]) == {"model.attn_implementation": "eager"}
    assert saved_model_overrides(["model.llm.attn_implementation=sdpa"]) == {"model.llm.attn_implementation": "sdpa"}
    with pytest.raises(ConfigError, match=r"model.compressor.grid=2: a saved model is built from the config saved with its "
                                          r"weights; of the model's keys only model.attn_implementation and"):
        saved_model_overrides(["model.attn_implementation=eager", "model.compressor.grid=2"])
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        saved_model_overrides(["model.attn_implementation=nonsense"])
