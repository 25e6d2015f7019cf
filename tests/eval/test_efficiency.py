"""Efficiency machinery: FLOP counts against hand counts, KV-cache bytes, working memory, part split."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lm_mini.eval.counting import MetaHybridMode, PeakMemory, flop_counter, part_flops, use_eager_attention
from lm_mini.eval.efficiency import kv_bytes_per_token


def llama_hand_flops(cfg: LlamaConfig, tokens: int, logits_for: int) -> int:
    """2 x mul-adds of every linear (q, k, v, o, gate, up, down; lm_head for ``logits_for`` positions)
    + QK^T and AV over all ``tokens`` x ``tokens`` pairs (full, not causal-halved), from the config alone."""
    d, heads, layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    head_dim = d // heads
    kv = cfg.num_key_value_heads * head_dim
    linear = d * (d + 2 * kv + d) + 3 * d * cfg.intermediate_size  # weights per layer
    attention = 2 * heads * head_dim * tokens  # scores + values, per query
    return layers * (2 * tokens * linear + 2 * tokens * attention) + 2 * logits_for * d * cfg.vocab_size


def tiny_llama_config(**kw) -> LlamaConfig:
    args = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300)
    return LlamaConfig(**{**args, **kw})


@pytest.mark.parametrize("device,attn", [("cpu", "sdpa"), ("cpu", "eager"), ("meta", "eager")])
def test_tiny_llama_flops_equal_hand_count_with_attention(device, attn):
    cfg = tiny_llama_config()
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = attn
    L = 200
    ids = torch.ones(1, L, dtype=torch.long, device=device)
    with torch.no_grad(), flop_counter() as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    hand = llama_hand_flops(cfg, L, logits_for=L)
    assert counter.get_total_flops() == pytest.approx(hand, rel=0.01)
    # the attention term is big enough here that dropping it would fail the 1% check
    no_attention = llama_hand_flops(cfg, L, logits_for=L) - cfg.num_hidden_layers * 4 * L * L * cfg.hidden_size
    assert abs(no_attention - hand) / hand > 0.05


def test_sdpa_on_cpu_counts_the_same_as_eager():
    q = torch.randn(2, 4, 30, 16)
    with flop_counter() as sdpa:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert sdpa.get_total_flops() == 2 * (2 * 2 * 4 * 30 * 30 * 16)


def test_use_eager_attention_reaches_nested_configs_and_makes_meta_work():
    cfg = tiny_llama_config()
    with torch.device("meta"):
        model = nn.ModuleDict({"llm": LlamaForCausalLM(cfg)})
    assert model["llm"].config._attn_implementation == "sdpa"
    use_eager_attention(model)
    assert model["llm"].config._attn_implementation == "eager"


def test_kv_bytes_per_token_matches_a_real_cache():
    cfg = tiny_llama_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    use_eager_attention(model)
    ids = torch.ones(1, 37, dtype=torch.long, device="meta")
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers)
    assert cached == 37 * kv_bytes_per_token(cfg, torch.bfloat16)
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 3 * 2 * 2 * 16 * 2  # layers x K,V x kv_heads x head_dim x bytes


def test_peak_memory_counts_live_tensors_only_once_per_storage():
    x = torch.empty(1000, device="meta")  # made outside: not counted
    with PeakMemory() as mem:
        a = x * 2  # 4000 bytes live
        view = a.view(10, 100)  # same storage
        b = a + 1  # 8000 live: the peak
        del a, view, b
        c = x[:10] * 3  # 40 bytes after everything else was freed
    assert mem.peak == 8000
    assert mem.live == 40
    del c
    weight = torch.empty(100, 100, device="meta")
    with PeakMemory() as mem:
        y = torch.nn.functional.linear(x[:100][None], weight)  # weight.t() inside is a view: no new memory
    assert mem.peak == y.nbytes == 400


def test_part_flops_attributes_each_part_and_accumulates_repeated_calls():
    enc, proj = nn.Linear(8, 16), nn.Linear(16, 4)
    x = torch.randn(3, 8)
    got = {}
    with flop_counter() as counter, part_flops(counter, {"encoder": enc, "projector": proj}, got):
        h = enc(x)
        proj(h), proj(h)
        h @ h.T  # outside every part
    assert got == {"encoder": 2 * 3 * 8 * 16, "projector": 2 * (2 * 3 * 16 * 4)}
    assert counter.get_total_flops() == sum(got.values()) + 2 * 3 * 16 * 3


# --------------------------------------------------------------------------- the package's models
from lm_mini.config import load_config  # noqa: E402
from lm_mini.eval.efficiency import (  # noqa: E402
    baseline_config, efficiency_report, max_frames, measured_model, profile, synthetic_batch,
)


def test_meta_hybrid_mode_keeps_bookkeeping_real_and_big_tensors_on_meta():
    big = torch.empty(1000, 1000, device="meta")
    with MetaHybridMode(small=100):
        ids = torch.tensor([3, -200, 5])
        assert int((ids == -200).nonzero()[0]) == 1  # data-dependent ops answer from real values
        small = torch.zeros(4, device="meta")  # small factory output: made real
        picked = big[torch.tensor([True] * 10 + [False] * 990)]  # boolean index into meta
        copied = torch.tensor([1.0] * 1000) + 1  # real data stays real, whatever its size
        large = torch.arange(200)[:, None] >= torch.arange(200)  # a mask blown up from small vectors: meta
    assert small.device.type == "cpu" and picked.shape == (10, 1000) and picked.device.type == "meta"
    assert large.device.type == "meta" and large.shape == (200, 200) and copied.device.type == "cpu"


def test_meta_profile_counts_the_same_flops_as_a_real_forward_of_the_tiny_preset():
    cfg = load_config("experiments/models/tiny.yaml").model
    fig = profile(measured_model(cfg), cfg, text_tokens=20)
    real = measured_model(cfg, device="cpu")  # random weights, eager so attention is a plain matmul
    real.llm.config._attn_implementation = "eager"
    batch = synthetic_batch(cfg, 20, vocab=cfg.llm.config.vocab_size)
    with torch.no_grad(), flop_counter() as counter:
        embeds, mask, pos, _ = real.prepare_inputs(batch)
        real.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1)
    by_part = fig["flops_by_part"]
    assert fig["flops"] == counter.get_total_flops()
    assert by_part["prefusion"] > 0 and by_part["compressor"] > 0 and by_part["other"] == 0
    assert fig["visual_tokens"] == 1 and fig["llm_tokens"] == 21


def test_max_frames_fills_the_budget_with_frame_caches():
    fig = {"weight_bytes": 10 * GIB_, "working_bytes": GIB_, "text_kv_bytes": 0, "kv_cache_bytes_per_frame": GIB_ / 4}
    assert max_frames(fig, 24 * GIB_) == 52
    assert max_frames(fig, 5 * GIB_) == 0


GIB_ = 2**30


def clip_hand_flops(image=336, patch=14, d=1024, mlp=4096, layers=24) -> int:
    n = (image // patch) ** 2
    tokens = n + 1  # CLS
    conv = 2 * n * 3 * patch * patch * d
    per_layer = 2 * tokens * (4 * d * d + 2 * d * mlp) + 4 * tokens * tokens * d
    return conv + layers * per_layer


@pytest.fixture(scope="module")
def vicuna_report():
    """LLaVA-Mini (C=1, depth 4) on Vicuna-7B vs LLaVA-1.5-7B at real size on meta (~20 s on 2 cores)."""
    cfg = load_config("experiments/models/llava_mini_vicuna7b.yaml").model
    return efficiency_report(cfg, text_tokens=64)


def test_baseline_llava15_flops_equal_the_hand_count(vicuna_report):
    vicuna = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    projector = 2 * 576 * (1024 * 4096 + 4096 * 4096)
    hand = clip_hand_flops() + projector + llama_hand_flops(vicuna, 640, logits_for=1)
    assert vicuna_report["llm_tokens"]["baseline"] == 640
    assert vicuna_report["flops"]["baseline"] == pytest.approx(hand, rel=0.02)
    assert vicuna_report["flops_by_part"]["encoder"]["baseline"] == pytest.approx(clip_hand_flops(), rel=0.02)


def test_llava_mini_cuts_flops_by_70_percent_and_kv_cache_576x(vicuna_report):
    r = vicuna_report
    assert r["flops"]["ratio"] <= 0.30
    assert r["visual_tokens"]["model"] == 1 and r["visual_tokens"]["baseline"] == 576
    assert r["kv_cache_bytes_per_image"]["baseline"] == 576 * r["kv_cache_bytes_per_image"]["model"]
    assert r["kv_cache_bytes_per_image"]["model"] == 32 * 2 * 4096 * 2  # one token of Vicuna-7B in bf16
    assert r["flops_per_token"]["ratio"] < 1  # the decode step attends to a 65-token instead of a 640-token cache
    # 24 GiB minus ~15.5 GiB of bf16 weights holds >10,000 one-token frames but only dozens of 576-token frames
    assert r["max_frames"]["model"] > 10_000 and 10 < r["max_frames"]["baseline"] < 40


def test_baseline_config_is_llava15():
    cfg = load_config("experiments/models/llava_mini_vicuna7b.yaml").model
    base = baseline_config(cfg)
    assert (base.compressor.name, base.prefusion.depth, base.resolution_ratio) == ("identity", 0, 1)
    assert (cfg.compressor.name, cfg.prefusion.depth) == ("query_attention", 4)  # the input is untouched
    cfg.resolution_ratio = 2  # LLaVA-Mini-HD is compared with LLaVA-1.5 as released: one 336 view
    assert baseline_config(cfg).resolution_ratio == 1


def test_cli_json_has_model_baseline_ratio_and_logs_to_a_training_runs_mlflow_run(tmp_path, capsys, monkeypatch):
    import json

    import mlflow

    from lm_mini.cli import main
    from lm_mini.eval.efficiency import log_to_mlflow

    # A file store: the same client API as the project's sqlite default, without ~10 s of schema migrations.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("eff")
    run_id = client.create_run(experiment).info.run_id
    run_dir = tmp_path / "runs" / "eff" / "r1"  # a training run's directory: mlflow.json names its run
    run_dir.mkdir(parents=True)
    (run_dir / "mlflow.json").write_text(json.dumps({"tracking_uri": uri, "run_id": run_id, "experiment": "eff"}))
    assert main(["efficiency", "experiments/models/tiny.yaml", "model.prefusion.depth=1", "--text-tokens", "12",
                 "--frames", "4", "--chunk-frames", "2", "--json", "--mlflow-run", str(run_dir)]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert report["flops_by_part"]["compressor"]["ratio"] is None  # LLaVA-1.5 has no compressor
    for key in ("flops", "visual_tokens", "kv_cache_bytes_per_image", "max_frames"):
        assert set(report[key]) == {"model", "baseline", "ratio"}
    assert report["visual_tokens"] == {"model": 4, "baseline": 4 * 64, "ratio": 1 / 64}  # 4 frames x C² vs 4 x 8x8 patches
    assert report["flops"]["ratio"] == report["flops"]["model"] / report["flops"]["baseline"]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["flops_per_sample"] == report["flops"]["model"]
    assert metrics["baseline_max_frames"] == report["max_frames"]["baseline"]
    other = client.create_run(experiment).info.run_id  # --mlflow-run RUN_ID logs the same way
    log_to_mlflow(report, other, uri)
    assert client.get_run(other).data.metrics == metrics


def test_latency_is_measured_for_model_and_baseline_on_cpu():
    from lm_mini.eval.efficiency import format_table, latency_report

    cfg = load_config("experiments/models/tiny.yaml").model
    report = latency_report(cfg, text_tokens=8, new_tokens=2, repeats=2, warmup=1)
    for key in ("prefill_s", "per_token_s"):
        assert 0 < report[key]["model"] < 5 and 0 < report[key]["baseline"] < 5
    assert "prefill latency" in format_table(report) and "ms" in format_table(report)
