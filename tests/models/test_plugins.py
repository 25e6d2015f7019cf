"""A user's compressor trains one step through each plug-in route of ``COMPRESSORS``:
(1) ``@COMPRESSORS.register`` decorator, (2) ``package.module:Class`` in the config,
(3) the ``lm_mini.compressors`` entry-point group of an installed distribution."""
from pathlib import Path

import pytest
import torch

from lm_mini.config import load_config
from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lm_mini.models.llava_mini import LlavaMini
from lm_mini.registry import COMPRESSORS

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = ROOT / "tests" / "plugins"  # holds my_compressor.py, the "user's package"
EP_NAME = "test_ep_gated_pool"


def install_fake_distribution(site: Path) -> None:
    """What ``pip install`` of a plug-in package leaves behind, minus the code: a dist-info folder
    whose entry_points.txt maps a name in ``lm_mini.compressors`` to ``module:Class``."""
    dist = site / "lm_mini_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lm-mini-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[lm_mini.compressors]\n{EP_NAME} = my_compressor:GatedPoolCompressor\n")


def route_decorator(tmp_path, monkeypatch) -> str:
    import my_compressor  # noqa: F401  importing the user's module runs its @COMPRESSORS.register

    return "test_gated_pool"


def route_module_path(tmp_path, monkeypatch) -> str:
    return "my_compressor:GatedPoolCompressor"


def route_entry_point(tmp_path, monkeypatch) -> str:
    assert EP_NAME not in COMPRESSORS.names()
    install_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # also invalidates importlib's caches, metadata included
    assert EP_NAME in COMPRESSORS.names()
    return EP_NAME


def image_batch(model: LlavaMini, batch_size: int = 2, length: int = 10) -> dict:
    """Two image samples: [prompt | <image> | prompt | answer], loss on the answer only."""
    vocab = model.llm.config.vocab_size
    input_ids = torch.randint(3, vocab, (batch_size, length))
    input_ids[:, 2] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -3:] = input_ids[:, -3:]
    size = model.encoder.image_size
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch_size, 3, size, size),
        "frames_per_sample": torch.ones(batch_size, dtype=torch.long),
        "is_video": torch.zeros(batch_size, dtype=torch.bool),
        "sample_ids": [f"s{i}" for i in range(batch_size)],
    }


@pytest.mark.parametrize("route", [route_decorator, route_module_path, route_entry_point], ids=lambda r: r.__name__)
def test_custom_compressor_trains_one_step(route, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    name = route(tmp_path, monkeypatch)
    from my_compressor import GatedPoolCompressor

    cfg = load_config(ROOT / "experiments" / "models" / "tiny.yaml", [f"model.compressor.name={name}", "model.compressor.grid=2"])
    cfg.model.compressor.options = {"gate_init": 0.5}  # replace, not merge: the preset's options are for query_attention
    model = LlavaMini.from_config(cfg.model).train()
    assert isinstance(model.compressor, GatedPoolCompressor)
    assert torch.all(model.compressor.gate == 0.5)  # the options reached the user's constructor

    before = {n: p.detach().clone() for n, p in model.compressor.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(image_batch(model)).loss
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.compressor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached compressor.{n}"
    optimizer.step()
    for n, p in model.compressor.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f"compressor.{n} did not change"
