"""model.attn_implementation: eager = sdpa on CPU, xformers / flash_attention_2 dispatch through transformers'
registry (checked with stand-ins: no CUDA here), refusals at config load and model build, GPU checks."""
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask

from lm_mini.config import ConfigError, load_config
from lm_mini.constants import IGNORE_INDEX as IGN
from lm_mini.constants import IMAGE_TOKEN_INDEX as IMG
from lm_mini.models import attention
from lm_mini.models.encoders import build_encoder
from lm_mini.models.llava_mini import LlavaMini
from lm_mini.models.llm import hf_causal_lm

TINY = Path(__file__).resolve().parents[2] / "experiments" / "models" / "tiny.yaml"
SIZE = 64  # tiny preset: 64 px images
# Llama with grouped-query attention (4 query heads per key/value head) and an odd head count per group
GQA = ["model.llm.config.num_attention_heads=8", "model.llm.config.num_key_value_heads=2"]


def tiny_cfg(*overrides):
    return load_config(TINY, list(overrides)).model


def build(*overrides, like=None):
    """The tiny model; ``like``: another model whose weights it takes (same shapes, any backend)."""
    model = LlavaMini.from_config(tiny_cfg(*overrides)).eval()
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def batch():
    """An image sample, a text-only one and a shorter image one (right padding): every mask case of a step."""
    g = torch.Generator().manual_seed(0)
    rows = [([11, 12, IMG, 13, 14, 15, 21, 22, 23], [IGN] * 6 + [21, 22, 23], True),
            ([31, 32, 33, 34, 35], [IGN] * 3 + [34, 35], False),
            ([41, IMG, 42, 43], [IGN] * 3 + [43], True)]
    L = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), IGN)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (i, lab, _) in enumerate(rows):
        ids[b, : len(i)], labels[b, : len(i)], mask[b, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    frames = torch.tensor([int(has) for _, _, has in rows])
    return dict(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=torch.randn(2, 3, SIZE, SIZE, generator=g),
                frames_per_sample=frames, is_video=torch.zeros(len(rows), dtype=torch.bool), sample_ids=["a", "b", "c"])


def attention_modules(model):
    """Every attention layer of the encoder, the pre-fusion layers and the LLM, by part."""
    def of(part):
        return {m for n, m in part.named_modules() if n.endswith("self_attn")}
    return {"encoder": of(model.encoder), "prefusion": of(model.prefusion), "llm": of(model.llm)}


def valid_logits(out, prepared_mask):
    return out.logits[prepared_mask.bool()]


# --------------------------------------------------------------------------- CPU backends agree
@pytest.mark.parametrize("overrides", [[], GQA], ids=["mha", "gqa"])
def test_eager_and_sdpa_give_the_same_logits_and_generations(overrides):
    sdpa = build(*overrides)
    eager = build("model.attn_implementation=eager", *overrides, like=sdpa)
    for model, name in ((sdpa, "sdpa"), (eager, "eager")):  # every part runs the chosen backend
        assert model.encoder.model.config._attn_implementation == name
        assert model.llm.config._attn_implementation == name
        assert model.prefusion.config is model.llm.config
    b = batch()
    with torch.no_grad():
        assert torch.allclose(sdpa.encoder(b["pixel_values"]), eager.encoder(b["pixel_values"]), atol=1e-5, rtol=0)
        mask = sdpa.prepare_inputs(b)[1]
        got, want = valid_logits(eager(b), mask), valid_logits(sdpa(b), mask)
    assert (got - want).abs().max() < 1e-5
    # left padding (generation): the first rows of the shorter samples attend nothing but padding
    prompt = {**b, "labels": None}
    assert torch.equal(eager.generate(prompt, max_new_tokens=4), sdpa.generate(prompt, max_new_tokens=4))


def test_llm_override_gives_the_llm_and_prefusion_their_own_backend():
    model = build("model.llm.attn_implementation=eager")
    assert model.llm.config._attn_implementation == "eager"
    assert model.prefusion.config._attn_implementation == "eager"
    assert model.encoder.model.config._attn_implementation == "sdpa"


def test_timm_encoder_switches_between_fused_and_plain_attention():
    cfg = tiny_cfg("model.encoder.name=timm").encoder
    cfg.config = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "depth": 2}
    fused, plain = build_encoder(cfg, "sdpa").eval(), build_encoder(cfg, "eager").eval()
    plain.load_state_dict(fused.state_dict())
    flags = lambda enc: {m.fused_attn for m in enc.modules() if hasattr(m, "fused_attn")}  # noqa: E731
    assert flags(fused) == {True} and flags(plain) == {False}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fused(x), plain(x), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- dispatch through the registry
@pytest.fixture
def runs_here(monkeypatch):
    """Pretend every backend can run on this machine (installed, a GPU): the build-time check passes."""
    monkeypatch.setattr(attention, "backend_problem", lambda name, accelerator=None: None)


def test_xformers_dispatches_every_part_through_the_registered_function(runs_here, monkeypatch):
    calls = []

    def stand_in(module, *args, **kwargs):  # registered under the name, as register_backends does
        calls.append(module)
        return sdpa_attention_forward(module, *args, **kwargs)  # it gets the masks built for "xformers"

    reference = build()
    monkeypatch.setitem(AttentionInterface._global_mapping, "xformers", stand_in)
    model = build("model.attn_implementation=xformers", like=reference)
    assert model.llm.config._attn_implementation == "xformers"
    assert model.encoder.model.config._attn_implementation == "xformers"
    b = batch()
    with torch.no_grad():
        got, want = model(b), reference(b)
    mask = model.prepare_inputs(b)[1]
    assert torch.equal(valid_logits(got, mask), valid_logits(want, mask))
    called = set(calls)
    for part, modules in attention_modules(model).items():
        assert modules and modules <= called, f"{part}: attention layers that did not dispatch to the registered function"


def test_flash_attention_2_dispatches_through_the_registered_function(runs_here, monkeypatch):
    """transformers' own flash path (masks from flash_attention_mask: None or the 2D padding mask),
    with a stand-in that computes what flash-attn would (causal aligned bottom-right) with SDPA."""
    import transformers.modeling_utils as mu

    calls = []

    def stand_in(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        calls.append(module)
        assert attention_mask is None or attention_mask.dim() == 2  # flash gets padding masks, never 4D ones
        Sq, Sk = query.shape[2], key.shape[2]
        causal = module.is_causal if is_causal is None else is_causal
        allowed = torch.ones(query.shape[0], 1, Sq, Sk, dtype=torch.bool)
        if causal:
            allowed &= torch.ones(Sq, Sk, dtype=torch.bool).tril(diagonal=Sk - Sq)
        if attention_mask is not None:
            allowed &= attention_mask.bool()[:, None, None, :]
        allowed |= ~allowed.any(-1, keepdim=True)
        return sdpa_attention_forward(module, query, key, value, allowed, dropout=dropout, scaling=scaling)

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", stand_in)
    monkeypatch.setattr(mu.PreTrainedModel, "_flash_attn_can_dispatch", lambda self, *a, **k: True)  # flash-attn absent
    monkeypatch.setattr(mu, "lazy_import_flash_attention", lambda *a, **k: None)
    reference = build()
    model = build("model.attn_implementation=flash_attention_2", like=reference)
    assert model.llm.config._attn_implementation == model.encoder.model.config._attn_implementation == "flash_attention_2"
    b = batch()
    with torch.no_grad():
        mask = model.prepare_inputs(b)[1]
        assert (valid_logits(model(b), mask) - valid_logits(reference(b), mask)).abs().max() < 1e-5
    assert set().union(*attention_modules(model).values()) <= set(calls)
    prompt = {**b, "labels": None}
    assert torch.equal(model.generate(prompt, max_new_tokens=4), reference.generate(prompt, max_new_tokens=4))


# --------------------------------------------------------------------------- xformers_attention_forward itself
class FakeXformers:
    """Pure-torch ``xformers.ops``: the same call, the input checks xformers makes (BMHK layout, last stride 1,
    a bias of exactly [B, H, Mq, Mk] with 16-byte-aligned strides), and the reference maths."""

    class LowerTriangularMask:
        pass

    calls = 0

    @classmethod
    def memory_efficient_attention(cls, q, k, v, attn_bias=None, p=0.0, scale=None):
        cls.calls += 1
        B, Mq, H, K = q.shape
        Mk = k.shape[1]
        assert k.shape == (B, Mk, H, K) and v.shape == (B, Mk, H, v.shape[-1]), "no broadcasting in xformers"
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (scale if scale is not None else K**-0.5)
        if isinstance(attn_bias, cls.LowerTriangularMask):
            scores = scores.masked_fill(~torch.ones(Mq, Mk, dtype=torch.bool).tril(), float("-inf"))
        elif attn_bias is not None:
            assert attn_bias.shape == (B, H, Mq, Mk) and attn_bias.dtype == q.dtype
            align = 128 // torch.finfo(attn_bias.dtype).bits
            assert all(attn_bias.stride(d) % align == 0 for d in range(3)) and attn_bias.stride(-1) == 1, attn_bias.stride()
            scores = scores + attn_bias.float()
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float())
        assert not out.isnan().any()
        return out.to(q.dtype)


@pytest.fixture
def fake_xformers(runs_here, monkeypatch):
    FakeXformers.calls = 0
    monkeypatch.setattr(attention, "_xformers_ops", lambda: FakeXformers)
    monkeypatch.setattr(attention, "_check_device", lambda query: None)
    return FakeXformers


def reference_attention(q, k, v, allowed, scale):
    """q [B,H,Sq,D], k/v [B,Hkv,Sk,D], allowed [B,1,Sq,Sk] bool -> [B,Sq,H,D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_function_masks_like_sdpa(fake_xformers, heads, kv_heads, dtype):
    B, S, D = 3, 13, 16  # 13 keys: the bias rows need padding to the 16-byte alignment
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, heads, S, D, generator=g).to(dtype)
    k, v = (torch.randn(B, kv_heads, S, D, generator=g).to(dtype) for _ in range(2))
    layer = SimpleNamespace(is_causal=True)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    scale = 0.3
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    # no mask: causal (LowerTriangularMask); a non-causal layer (vision encoder): full attention
    out, _ = attention.xformers_attention_forward(layer, q, k, v, None, scaling=scale)
    assert torch.allclose(out.float(), reference_attention(q, k, v, causal, scale).float(), atol=tol)
    out, _ = attention.xformers_attention_forward(SimpleNamespace(is_causal=False), q, k, v, None, scaling=scale)
    assert torch.allclose(out.float(), reference_attention(q, k, v, None, scale).float(), atol=tol)

    # right and left padding as transformers builds the mask for this backend (boolean SDPA masks)
    for pad in ("right", "left"):
        valid = torch.ones(B, S, dtype=torch.bool)
        lengths = [S, 9, 4]
        for b, n in enumerate(lengths):
            valid[b] = torch.arange(S) < n if pad == "right" else torch.arange(S) >= S - n
        cfg = SimpleNamespace(_attn_implementation="xformers", is_causal=True)
        attention.register_backends()
        mask = create_causal_mask(config=cfg, inputs_embeds=q.new_zeros(B, S, 1), attention_mask=valid, cache=None)
        assert mask is not None and mask.dtype == torch.bool and mask.shape == (B, 1, S, S)
        out, _ = attention.xformers_attention_forward(layer, q, k, v, mask, scaling=scale)
        allowed = causal & valid[:, None, None, :]
        ref = reference_attention(q, k, v, allowed | ~allowed.any(-1, keepdim=True), scale)
        rows = mask.any(-1)[:, 0]  # query rows with something to attend (all but left padding's first ones)
        assert torch.allclose(out.float()[rows], ref.float()[rows], atol=tol)
        assert not out.isnan().any()

    # one decode step against a cache: no mask, attend every cached key
    out, _ = attention.xformers_attention_forward(layer, q[:, :, -1:], k, v, None, scaling=scale)
    assert torch.allclose(out.float(), reference_attention(q[:, :, -1:], k, v, None, scale).float(), atol=tol)


def test_registering_xformers_also_registers_its_masks():
    """For a name missing from the mask registry transformers builds no mask at all (padding silently ignored)."""
    attention.register_backends()
    cfg = SimpleNamespace(_attn_implementation="xformers", is_causal=True)
    valid = torch.tensor([[True, True, False]])
    mask = create_causal_mask(config=cfg, inputs_embeds=torch.zeros(1, 3, 4), attention_mask=valid, cache=None)
    assert mask is not None and mask[0, 0, 2].tolist() == [True, True, False]


def test_xformers_model_matches_sdpa_and_calls_xformers_in_every_layer(fake_xformers):
    reference = build(*GQA)
    model = build("model.attn_implementation=xformers", *GQA, like=reference)
    b = batch()
    with torch.no_grad():
        mask = model.prepare_inputs(b)[1]
        FakeXformers.calls = 0
        got = model(b)
    layers = {part: len(mods) for part, mods in attention_modules(model).items()}
    # encoder: once per layer for the 2 images; pre-fusion: once per layer for the 2 image units; LLM: once per layer
    assert FakeXformers.calls == sum(layers.values())
    assert (valid_logits(got, mask) - valid_logits(reference(b), mask)).abs().max() < 1e-5
    prompt = {**b, "labels": None}
    assert torch.equal(model.generate(prompt, max_new_tokens=4), reference.generate(prompt, max_new_tokens=4))


def test_xformers_refuses_cpu_tensors_with_what_to_set():
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="model.attn_implementation=sdpa"):
        attention.xformers_attention_forward(SimpleNamespace(is_causal=True), q, q, q, None)


# --------------------------------------------------------------------------- refusals
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("backend", ["xformers", "flash_attention_2"])
def test_cuda_backends_are_refused_at_build_without_cuda(backend, monkeypatch):
    real_find_spec = importlib.util.find_spec
    # installed or not, a machine without CUDA refuses it, naming the key and what runs here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("xformers", "flash_attn") else real_find_spec(name, *a))
    with pytest.raises(attention.AttentionBackendError, match=rf"model\.attn_implementation={backend}: .*CUDA GPUs only.*sdpa, eager"):
        build(f"model.attn_implementation={backend}")


@pytest.mark.parametrize("backend,package", [("xformers", "xformers"), ("flash_attention_2", "flash_attn")])
def test_a_backend_that_is_not_installed_names_what_to_install(backend, package, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a))
    with pytest.raises(attention.AttentionBackendError, match=rf"{package} package, which is not installed; .*pip install"):
        build(f"model.attn_implementation={backend}")
    with pytest.raises(attention.AttentionBackendError, match=rf"model\.llm\.attn_implementation={backend}"):
        build(f"model.llm.attn_implementation={backend}")


def test_config_refuses_unknown_backends_and_cuda_backends_on_a_cpu_trainer():
    with pytest.raises(ConfigError, match="model.attn_implementation.*expected one of sdpa, eager, flash_attention_2, xformers"):
        load_config(TINY, ["model.attn_implementation=flash"])
    with pytest.raises(ConfigError, match="model.llm.attn_implementation.*'flex'"):
        load_config(TINY, ["model.llm.attn_implementation=flex"])
    with pytest.raises(ConfigError, match="xformers runs on CUDA GPUs only and train.accelerator is cpu"):
        load_config(TINY, ["train.accelerator=cpu", "model.attn_implementation=xformers"])
    assert load_config(TINY, ["model.attn_implementation=eager"]).model.attn_implementation == "eager"


def test_meta_builds_count_any_backend(monkeypatch):
    """Counting FLOPs of an xformers / flash config on a laptop: built on meta, it needs no GPU."""
    with torch.device("meta"):
        model = LlavaMini.from_config(tiny_cfg("model.attn_implementation=flash_attention_2"))
    assert model.llm.config._attn_implementation in ("flash_attention_2", "eager")
    assert next(model.llm.parameters()).device.type == "meta"


def test_llm_family_outside_the_registry_cannot_take_a_registered_backend(runs_here, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_supports_attention_backend", False)
    with pytest.raises(ValueError, match="does not call transformers' attention registry"):
        hf_causal_lm(dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, vocab_size=64), attn_implementation="xformers")


# --------------------------------------------------------------------------- on a GPU (gpu_check.sh runs these)
def _cuda_model(backend, like=None, dtype="bfloat16"):
    with torch.device("cuda"):
        model = build(f"model.attn_implementation={backend}", f"model.dtype={dtype}", *GQA)
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "xformers", "flash_attention_2"])
def test_gpu_backends_agree_with_sdpa_in_bf16(backend):
    problem = attention.backend_problem(backend)
    if problem:
        pytest.skip(problem)
    reference = _cuda_model("sdpa")
    model = _cuda_model(backend, like=reference)
    b = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch().items()}
    with torch.no_grad():
        mask = model.prepare_inputs(b)[1]
        got, want = valid_logits(model(b), mask).float(), valid_logits(reference(b), mask).float()
    assert not got.isnan().any()
    # bf16: compare with the spread of the logits, not 1e-5
    assert (got - want).abs().max() < 0.05 * want.abs().max(), f"{backend}: max diff {(got - want).abs().max():.4f}"


@pytest.mark.gpu
def test_gpu_xformers_function_matches_sdpa_with_padding_and_gqa():
    problem = attention.backend_problem("xformers")
    if problem:
        pytest.skip(problem)
    B, H, Hkv, S, D = 3, 8, 2, 77, 64
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda")
    valid[1, 50:] = False  # right padding
    valid[2, :30] = False  # left padding
    attention.register_backends()
    cfg = SimpleNamespace(_attn_implementation="xformers", is_causal=True)
    mask = create_causal_mask(config=cfg, inputs_embeds=q.new_zeros(B, S, 1), attention_mask=valid, cache=None)
    out, _ = attention.xformers_attention_forward(SimpleNamespace(is_causal=True), q, k, v, mask, scaling=D**-0.5)
    ref = reference_attention(q, k, v, mask | ~mask.any(-1, keepdim=True), D**-0.5)
    rows = mask.any(-1)[:, 0]
    assert torch.allclose(out[rows].float(), ref[rows].float(), atol=2e-2)
    out, _ = attention.xformers_attention_forward(SimpleNamespace(is_causal=True), q, k, v, None, scaling=D**-0.5)
    causal = torch.ones(S, S, dtype=torch.bool, device="cuda").tril()
    assert torch.allclose(out.float(), reference_attention(q, k, v, causal, D**-0.5).float(), atol=2e-2)
    assert math.isfinite(out.float().sum().item())


def test_train_refuses_a_backend_this_machine_cannot_run_before_the_run_exists(tmp_path, monkeypatch):
    from lm_mini.training.run import check_resumable, train

    repo = TINY.parents[2]
    monkeypatch.chdir(repo)  # the demo config's data paths are relative to the repository
    cfg = load_config(repo / "experiments" / "demo.yaml", [f"logging.runs_dir={tmp_path / 'runs'}", "train.accelerator=auto",
                                                            f"logging.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                                            "model.attn_implementation=flash_attention_2"])
    if attention.backend_problem("flash_attention_2") is None:
        pytest.skip("flash_attention_2 runs on this machine")
    with pytest.raises(attention.AttentionBackendError, match="model.attn_implementation=flash_attention_2"):
        train(cfg)
    assert not (tmp_path / "runs").exists()
    # lm-mini train says so in one line, as for any other input it refuses (exit 2, no traceback)
    from lm_mini.cli import main

    assert main(["train", str(repo / "experiments" / "demo.yaml"), f"logging.runs_dir={tmp_path / 'runs'}",
                 "train.accelerator=auto", f"logging.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "model.attn_implementation=flash_attention_2"]) == 2
    # a resumed run may change the backend (the same function, another kernel)
    saved = tmp_path / "config.yaml"
    saved.write_text(OmegaConf.to_yaml(load_config(repo / "experiments" / "demo.yaml")))
    check_resumable(saved, load_config(repo / "experiments" / "demo.yaml", ["model.attn_implementation=eager"]))
