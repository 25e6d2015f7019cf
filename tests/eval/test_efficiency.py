"""Efficiency machinery: FLOP counts against hand counts, KV-cache bytes, working memory, part split."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lm_mini.eval.efficiency import PeakMemory, flop_counter, kv_bytes_per_token, part_flops, use_eager_attention


def llama_hand_flops(cfg: LlamaConfig, tokens: int, logits_for: int, context: int = None) -> int:
    """2 x mul-adds of every linear (q, k, v, o, gate, up, down, lm_head) + QK^T and AV for ``tokens``
    queries over ``context`` keys (full, not causal-halved), from the config alone."""
    context = context or tokens
    d, heads, layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    head_dim = d // heads
    kv = cfg.num_key_value_heads * head_dim
    linear = d * (d + 2 * kv + d) + 3 * d * cfg.intermediate_size  # weights per layer
    attention = 2 * heads * head_dim * context  # scores + values, per query
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
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers)
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
