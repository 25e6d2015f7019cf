"""Pre-fusion: the LLM's own decoder layers over [visual | compressed | text], causal, padding-aware."""
import pytest
import torch

from lm_mini.models.llm import hf_causal_lm
from lm_mini.models.prefusion import PreFusion

ARCHS = ["llama", "qwen2", "mistral"]
D, NV, C2, L = 32, 6, 2, 5


def tiny_llm(model_type, layers=3):
    return hf_causal_lm(dict(model_type=model_type, hidden_size=D, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=128))


def inputs(batch=2):
    return torch.randn(batch, NV, D), torch.randn(batch, C2, D), torch.randn(batch, L, D), torch.ones(batch, L, dtype=torch.bool)


@pytest.fixture(params=ARCHS)
def fusion(request):
    return PreFusion.from_llm(tiny_llm(request.param), depth=2).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_llm_layers_init_equals_the_llms_first_layers(arch):
    """With nothing masked, pre-fusion initialised from the LLM = the LLM's hidden state after `depth` layers."""
    llm = tiny_llm(arch).eval()
    fusion = PreFusion.from_llm(llm, depth=2, init="llm_layers").eval()
    assert all(type(mine) is type(theirs) for mine, theirs in zip(fusion.layers, llm.model.layers))
    visual, compressed, text, mask = inputs()
    with torch.no_grad():
        comp_out, text_out = fusion(visual, compressed, text, mask)
        hidden = llm.model(inputs_embeds=torch.cat([visual, compressed, text], 1), output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(comp_out, hidden[:, NV : NV + C2])  # no final norm, as in the official code
    torch.testing.assert_close(text_out, hidden[:, NV + C2 :])
    # separate weights: training pre-fusion does not touch the LLM
    fusion.layers[0].mlp.up_proj.weight.data.add_(1.0)
    assert not torch.equal(fusion.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)


def test_random_init_is_not_a_copy():
    llm = tiny_llm("llama")
    fusion = PreFusion.from_llm(llm, depth=2, init="random")
    assert not torch.equal(fusion.layers[0].self_attn.q_proj.weight, llm.model.layers[0].self_attn.q_proj.weight)
    assert fusion.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(llm.config.initializer_range, rel=0.2)
    with pytest.raises(ValueError, match="llm_layers: depth 4"):
        PreFusion.from_llm(llm, depth=4, init="llm_layers")
    with pytest.raises(ValueError, match="unknown prefusion init"):
        PreFusion.from_llm(llm, depth=1, init="copy")


def test_causal_over_text(fusion):
    visual, compressed, text, mask = inputs()
    comp_a, text_a = fusion(visual, compressed, text, mask)
    later = text.clone()
    later[:, 3] = torch.randn(2, D)  # change token 3
    comp_b, text_b = fusion(visual, compressed, later, mask)
    torch.testing.assert_close(text_a[:, :3], text_b[:, :3], rtol=0, atol=1e-6)  # earlier fused text unchanged
    torch.testing.assert_close(comp_a, comp_b, rtol=0, atol=1e-6)  # compressed tokens come before all text
    assert (text_a[:, 3:] - text_b[:, 3:]).abs().amax(-1).min() > 1e-3  # token 3 and everything after it moved


def test_depends_on_the_image(fusion):
    visual, compressed, text, mask = inputs()
    comp_a, text_a = fusion(visual, compressed, text, mask)
    comp_b, text_b = fusion(torch.randn_like(visual), compressed, text, mask)
    assert (text_a - text_b).abs().amax(-1).min() > 1e-3  # every text token sees the image
    assert (comp_a - comp_b).abs().amax() > 1e-3
    _, text_c = fusion(visual, compressed * 0, text, mask)
    assert (text_a - text_c).abs().amax(-1).min() > 1e-3  # ... and the compressed tokens


def test_masked_tokens_are_unfused_and_invisible(fusion):
    visual, compressed, text, mask = inputs()
    mask[:, 1] = False  # e.g. an answer token in the middle
    mask[1, 3:] = False  # padding / answer at the end of sample 1
    comp_a, text_a = fusion(visual, compressed, text, mask)
    assert torch.equal(text_a[~mask], text[~mask])  # returned exactly as given
    assert (text_a[mask] - text[mask]).abs().amax(-1).min() > 1e-3  # the others are fused
    changed = torch.where(mask.unsqueeze(-1), text, torch.randn_like(text))
    comp_b, text_b = fusion(visual, compressed, changed, mask)
    torch.testing.assert_close(text_a[mask], text_b[mask], rtol=0, atol=1e-6)  # nobody saw the masked tokens
    torch.testing.assert_close(comp_a, comp_b, rtol=0, atol=1e-6)


def test_positions_count_valid_tokens_only(fusion):
    """[a, x(masked), b] fuses a and b exactly as the gap-free [a, b] does: x takes no position."""
    visual, compressed, text, _ = inputs(batch=1)
    gappy_mask = torch.tensor([[True, False, True, True, True]])
    _, gappy = fusion(visual, compressed, text, gappy_mask)
    dense_text = text[:, [0, 2, 3, 4]]
    _, dense = fusion(visual, compressed, dense_text, torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(gappy[:, [0, 2, 3, 4]], dense, rtol=1e-5, atol=1e-5)


def test_batch_rows_are_independent(fusion):
    visual, compressed, text, mask = inputs()
    mask[1, 2:] = False
    comp, fused = fusion(visual, compressed, text, mask)
    for b in range(2):
        comp_b, fused_b = fusion(visual[b : b + 1], compressed[b : b + 1], text[b : b + 1], mask[b : b + 1])
        torch.testing.assert_close(comp[b : b + 1], comp_b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused[b : b + 1], fused_b, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_layer_and_the_inputs():
    fusion = PreFusion.from_llm(tiny_llm("llama"), depth=2)
    visual, compressed, text, mask = inputs()
    visual.requires_grad_(True)
    comp, fused = fusion(visual, compressed, text, mask)
    (comp.sum() + fused.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())
    assert visual.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="depth >= 1"):
        PreFusion.from_llm(tiny_llm("llama"), depth=0)
