"""Two CPU processes (gloo): DDP keeps replicas equal; FSDP2 really shards, its sharded checkpoint
resumes bit-exactly, and the consolidated checkpoint equals the sharded one."""
import importlib.util
import json
import subprocess
from pathlib import Path

import torch

from training_helpers import PYTHON, ROOT, subprocess_env
from lm_mini import runs
from lm_mini.interop import checkpoint as ckpt

SCRIPT = Path(__file__).with_name("dist_train.py")


def _run(out: Path, strategy: str, steps: int, resume: str = "") -> None:
    cmd = [PYTHON, str(SCRIPT), str(out), strategy, str(steps)] + ([resume] if resume else [])
    proc = subprocess.run(cmd, cwd=out, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _consolidate_tool():
    spec = importlib.util.spec_from_file_location("consolidate_checkpoint", ROOT / "tools" / "consolidate_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _infos(out: Path, tag: str):
    return [json.loads((out / f"{tag}-rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_two_processes_keep_identical_replicas(tmp_path):
    _run(tmp_path, "ddp", 3)
    a, b = _infos(tmp_path, "first")
    assert a["world_size"] == b["world_size"] == 2 and a["step"] == b["step"] == 3
    assert not a["dtensor"] and a["local_numel"] == a["full_numel"]  # full replicas
    assert a["checksum"] == b["checksum"]
    # one full checkpoint file, written by rank 0, with the final weights
    final = runs.latest_checkpoint(tmp_path / "runs" / "test" / "dist" / "checkpoints")
    assert final.name == "step=00000003.ckpt" and final.is_file()
    weights = torch.load(tmp_path / "first-weights.pt")
    saved = ckpt.model_state_dict(ckpt.load_checkpoint(final))
    assert all(torch.equal(weights[k], saved[k]) for k in weights)


def test_fsdp2_shards_parameters_resumes_sharded_checkpoint_and_consolidates(tmp_path):
    _run(tmp_path, "fsdp", 4)
    a, b = _infos(tmp_path, "first")
    assert a["dtensor"] and b["dtensor"]
    assert a["local_numel"] < 0.6 * a["full_numel"] and a["local_numel"] + b["local_numel"] == a["full_numel"]
    checkpoints = tmp_path / "runs" / "test" / "dist" / "checkpoints"
    step2, step4 = runs.list_checkpoints(checkpoints)
    assert step2.is_dir() and sorted(p.name for p in step2.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # consolidated (one file, full tensors) == what the sharded run held at step 4
    out = tmp_path / "step4.pt"
    assert _consolidate_tool().main([str(step4), "--out", str(out)]) == 0
    first = torch.load(tmp_path / "first-weights.pt")
    consolidated = torch.load(out, weights_only=False)
    assert consolidated["global_step"] == 4 and "optimizer_0" in consolidated
    weights = ckpt.model_state_dict(consolidated)
    assert set(weights) == set(first) and all(torch.equal(first[k], weights[k]) for k in first)

    # the sharded step-2 checkpoint resumes (2 processes) to exactly the same step-4 weights
    _run(tmp_path, "fsdp", 4, resume=str(step2))
    resumed = torch.load(tmp_path / "resumed-weights.pt")
    assert all(torch.equal(first[k], resumed[k]) for k in first)
