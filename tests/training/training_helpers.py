"""Shared pieces of the training tests: a tiny config and an in-memory data module.

The data module serves a fixed learnable task (the answer token is the image's brightness class)
through a torchdata ``StatefulDataLoader``, so Lightning saves and restores its position exactly.
Runs that go through the real shards use ``experiments/demo.yaml`` instead.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import lightning as L
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lm_mini.config import load_config
from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "models" / "tiny.yaml"
# Smaller than the tiny preset: distributed tests start several processes on 2 cores.
MICRO = [
    "model.encoder.config.num_hidden_layers=2", "model.llm.config.num_hidden_layers=2",
    "model.llm.config.hidden_size=64", "model.llm.config.intermediate_size=128", "model.prefusion.depth=1",
    "model.llm.config.vocab_size=64",
]


def tiny_config(tmp: Path, *overrides: str):
    return load_config(TINY, [
        *MICRO, f"logging.runs_dir={tmp / 'runs'}", f"logging.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "experiment=test", "run_name=r", "train.precision=32-true", "train.accelerator=cpu", "train.eval_at_end=false",
        "train.lr=3e-3", "train.warmup_ratio=0.0", "train.checkpoint_every_n_steps=2", "train.keep_last_k=2",
        "train.log_every_n_steps=1", "data.batch_size=4", *overrides,
    ])


class BrightnessQA(Dataset):
    """Image + 3 prompt tokens -> answer token 10 + brightness class (4 classes), then end token 2."""

    def __init__(self, n: int, image_size: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.classes = torch.randint(0, 4, (n,), generator=g)
        self.noise = torch.rand(n, 3, image_size, image_size, generator=g) * 0.2
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, Any]:
        c = int(self.classes[i])
        return {"pixels": self.noise[i] + (c / 3.0) * 1.6 - 0.8, "answer": 10 + c, "id": f"s{i}"}


def collate(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6, s["answer"], 2] for s in samples])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 4:] = ids[:, 4:]
    n = len(samples)
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.stack([s["pixels"] for s in samples]), "frames_per_sample": torch.ones(n, dtype=torch.long),
            "is_video": torch.zeros(n, dtype=torch.bool), "sample_ids": [s["id"] for s in samples]}


class TinyData(L.LightningDataModule):
    """Each rank reads its own contiguous slice; the loader's position is checkpointed by Lightning."""

    def __init__(self, n: int = 64, batch_size: int = 4):
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> StatefulDataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        data = BrightnessQA(self.n)
        part = torch.utils.data.Subset(data, range(rank, self.n, world))
        return StatefulDataLoader(part, batch_size=self.batch_size, shuffle=False, collate_fn=collate)

    def skip_counts(self) -> Dict[str, int]:
        return {"corrupt_image": 1}


def subprocess_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def params_of(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


PYTHON = sys.executable
