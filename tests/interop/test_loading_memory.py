"""Loading and importing a >= 1 GB bfloat16 checkpoint holds its weights once: peak RSS above the interpreter's
baseline stays under 1.3x the checkpoint's size, and the model keeps the checkpoint's precision.

The checkpoint has real widths (Vicuna-7B's LLM, CLIP ViT-L/14-336) but one layer each, written in the official
LLaVA-Mini layout in bfloat16 with float32 norms (tensors not all one dtype, as some releases are). Each step runs
in its own Python process, which reports its baseline RSS (after imports) and its peak (``ru_maxrss``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WIDE = {
    "clip": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=1,
                 num_attention_heads=16, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
}

WRITE = r"""
import json, sys, torch
from pathlib import Path
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import CLIPVisionConfig
from lm_mini.config import load_config
from lm_mini.interop.importers import LLAVA_MINI
from lm_mini.models.build import build_model

src, wide = Path(sys.argv[1]), json.loads(sys.argv[2])
cfg = OmegaConf.merge(load_config(), {"model": {
    "encoder": {"name": "hf_clip", "config": wide["clip"]}, "compressor": {"name": "query_attention", "grid": 1},
    "prefusion": {"depth": 1}, "llm": {"config": {"model_type": "llama", **wide["llama"]}}}})
state = {}
for name, t in build_model(cfg.model, device="meta").state_dict().items():
    norm = t.dim() == 1 and ("norm" in name or "layernorm" in name)
    state[LLAVA_MINI.source_name(name)] = torch.zeros(t.shape, dtype=torch.float32 if norm else torch.bfloat16)
save_file(state, str(src / "model.safetensors"))
config = {**wide["llama"], "architectures": ["LlavaMiniLlamaForCausalLM"], "model_type": "llava_mini",
          "torch_dtype": "bfloat16", "compressor_size": 1, "prefusion_layer_num": 1, "resolution_ratio": 1,
          "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
          "mm_hidden_size": 1024, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
          "image_aspect_ratio": "square", "mm_use_im_start_end": False}
(src / "config.json").write_text(json.dumps(config))
CLIPVisionConfig(**wide["clip"]).save_pretrained(src.parent / "clip")  # the tower's config: its weights are in src
"""

MEASURE = r"""
import json, resource, sys
import torch
from omegaconf import OmegaConf
from transformers import CLIPVisionConfig, LlamaConfig
from lm_mini.config import load_config
from lm_mini.interop.importers import import_llava_mini
from lm_mini.interop.pretrained import load_pretrained
from lm_mini.models.build import build_model

def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024

step, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
# The interpreter's baseline: the library and the model code it imports on first use (~0.3 GB), loaded by a micro model
build_model(OmegaConf.merge(load_config(), {"model": {"prefusion": {"depth": 1}, "encoder": {"config": dict(
    image_size=28, patch_size=14, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4)},
    "llm": {"config": dict(model_type="llama", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=4, vocab_size=64)}}}).model, device="meta")
base = rss()
report = {}
if step == "import":
    import_llava_mini(src, out, vision_tower=str(sys.argv[4]), max_shard_size="1GB")  # two shards, the first ~1 GB
else:
    model = load_pretrained(out)
    with torch.no_grad():  # read every weight, as a forward pass would (a mapped page counts once it is read)
        for t in model.state_dict().values():
            t.sum()
    report["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
report.update(base=base, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print("REPORT " + json.dumps(report))
"""


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=280, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    return json.loads(lines[-1][len("REPORT "):]) if lines else {}


@pytest.mark.timeout(600)  # ~70 s on 2 busy cores: 1.35 GB written, imported, loaded
def test_import_and_load_of_a_large_bf16_checkpoint_hold_the_weights_once(tmp_path, tokenizer_dir):
    src, out = tmp_path / "release", tmp_path / "imported"
    src.mkdir()
    try:
        _run(WRITE, str(src), json.dumps(WIDE))
        for f in tokenizer_dir.iterdir():
            shutil.copyfile(f, src / f.name)
        size = (src / "model.safetensors").stat().st_size
        assert size >= 1e9

        imported = _run(MEASURE, "import", str(src), str(out), str(tmp_path / "clip"))
        shards = sorted(p.name for p in out.glob("model-*.safetensors"))
        assert len(shards) == 2 and (out / "model.safetensors.index.json").is_file()  # written sharded
        assert "dtype: bfloat16" in (out / "config.yaml").read_text()  # the majority, not float32
        assert imported["peak"] - imported["base"] < 1.3 * size, (imported, size)

        loaded = _run(MEASURE, "load", str(src), str(out))
        assert loaded["dtypes"] == ["torch.bfloat16"]  # the float32 norms follow the checkpoint's precision
        assert loaded["peak"] - loaded["base"] < 1.3 * size, (loaded, size)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # 3 GB: not left for pytest's tmp retention


def test_a_mixed_precision_checkpoint_loads_in_its_majority_dtype(tmp_path, tokenizer_dir):
    """bfloat16 weights with float32 norms: the model is bfloat16 (config.yaml's stale float32 notwithstanding),
    every weight equal to the stored one cast to it; the rule is the dtype holding most elements."""
    import torch
    from interop_helpers import image_batch, tiny_config

    from lm_mini.interop.pretrained import floating_dtype, load_pretrained, save_pretrained
    from lm_mini.models.llava_mini import LlavaMini

    torch.manual_seed(3)
    cfg = tiny_config()
    model = LlavaMini.from_config(cfg.model).eval()
    stored = {k: (v.clone() if "norm" in k else v.to(torch.bfloat16)) for k, v in model.state_dict().items()}
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float32, torch.bfloat16}
    assert floating_dtype(stored) == "bfloat16"
    out = save_pretrained(tmp_path / "mixed", stored, cfg, tokenizer_dir, card="# mixed\n")  # cfg says float32
    loaded = load_pretrained(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, stored[k].to(v.dtype)), k
    reference = LlavaMini.from_config(cfg.model).to(torch.bfloat16).eval()
    reference.load_state_dict(stored)
    with torch.no_grad():
        batch = image_batch(seed=4)
        assert torch.equal(loaded(batch).logits, reference(batch).logits)
    # ties go to the wider dtype; no floating tensor, no dtype
    half = {"a": torch.zeros(4, dtype=torch.float16), "b": torch.zeros(4, dtype=torch.float32)}
    assert floating_dtype(half) == "float32" and floating_dtype({"i": torch.zeros(3, dtype=torch.long)}) is None
