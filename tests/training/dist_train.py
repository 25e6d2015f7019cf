"""Run by the distributed tests: ``python dist_train.py OUT STRATEGY MAX_STEPS [RESUME]``.

Lightning starts the second process by running this same command line again. Trains the tiny model
on ``TinyData`` and writes, per rank, how its parameters are held, plus (rank 0) the full weights.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from training_helpers import TinyData, tiny_config  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lm_mini.training.run import train  # noqa: E402

out, strategy, max_steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
resume = sys.argv[4] if len(sys.argv) > 4 else None
tag = "resumed" if resume else "first"
cfg = tiny_config(out, f"train.strategy={strategy}", "train.devices=2", f"train.max_steps={max_steps}", "run_name=dist")
result = train(cfg, resume=resume, datamodule=TinyData(64, batch_size=2))
trainer = result.trainer
model = trainer.lightning_module.model
params = dict(model.named_parameters())
info = {
    "rank": trainer.global_rank,
    "world_size": trainer.world_size,
    "step": trainer.global_step,
    "dtensor": all(isinstance(p, DTensor) for p in params.values()),
    "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params.values()),
    "full_numel": sum(p.numel() for p in params.values()),
    "checksum": float(sum(p.full_tensor().double().sum() if isinstance(p, DTensor) else p.double().sum() for p in params.values())),
}
(out / f"{tag}-rank{trainer.global_rank}.json").write_text(json.dumps(info))
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if trainer.global_rank == 0:
    torch.save(full, out / f"{tag}-weights.pt")
