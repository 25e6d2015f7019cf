"""benchmarks/gpu_check.sh --dry-run: every stage on the CPU with the tiny preset, so the GPU check cannot rot;
and a stage that fails or runs out of time is recorded while the next ones still run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_check(out, work, **env):
    environ = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(work), **env}
    environ.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=940)


@pytest.mark.timeout(960)  # ~1.5-3 min on 2 cores; the dry run's stage limits sum to 820 s
def test_dry_run_runs_every_stage_and_writes_a_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = run_check(out, work)
    log = (out / "stages.log").read_text() if (out / "stages.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-6000:]
    # few files under OUT: the device tool brings back at most 8, two folders deep
    assert sorted(p.name for p in out.iterdir()) == ["gpu_tests.xml", "stages.log", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    stages = {name: s["result"] for name, s in summary["stages"].items()}
    assert all(s["ok"] and s["status"]["exit_code"] == 0 for s in summary["stages"].values())

    assert stages["env"]["attention_backends"]["sdpa"] == "runs here"
    tests = stages["tests"]  # the GPU-marked tests were collected (and skipped, with the reason, on this CPU)
    assert "tests/models/test_attention_backends.py" in tests["files"] and tests["counts"]["tests"] >= 4
    assert tests["counts"]["failures"] == tests["counts"]["errors"] == 0

    demo = stages["demo"]  # lm-mini train in bf16-mixed, metrics read back from its MLflow run
    assert demo["exit_code"] == 0 and "bf16-mixed" in demo["command"]
    assert demo["mlflow"]["train/loss"]["steps_logged"] == 3
    assert 0 <= demo["mlflow"]["data/padding_fraction"]["last"] < 1
    assert demo["eval"]["n"] > 0

    fsdp = stages["fsdp"]  # FSDP2 (sharded DTensors), bf16, activation checkpointing; FLOPs of forward + backward
    assert fsdp["strategy"] == "FSDP2Strategy" and fsdp["sharded"] and fsdp["activation_checkpointing"]
    assert fsdp["flops_per_step"]["backward"] > fsdp["flops_per_step"]["forward"] > 0
    assert fsdp["samples_per_s"] > 0 and fsdp["mfu"] is None  # no peak FLOP/s for a CPU

    latency = stages["latency"]  # both models for each backend that runs here
    for backend in ("sdpa", "eager"):
        r = latency["results"][backend]
        assert r["llava_mini_vicuna7b"]["prefill_ms"] > 0 and r["llava15_vicuna7b"]["per_token_ms"] > 0 and "ratio" in r
    md = (out / "summary.md").read_text()
    assert "| fsdp | yes |" in md and "**Latency**" in md and "**FSDP2**" in md


def test_a_stage_that_times_out_is_recorded_and_the_next_still_runs(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = run_check(out, work, GPU_CHECK_STAGES="env tests", GPU_CHECK_LIMIT_ENV="1")
    assert proc.returncode == 2, proc.stdout + proc.stderr  # not every stage passed
    summary = json.loads((out / "summary.json").read_text())
    st = summary["stages"]
    assert not st["env"]["ok"] and st["env"]["status"]["note"] == "timed out after 1s"
    assert st["tests"]["ok"] and st["tests"]["result"]["counts"]["tests"] >= 4  # the next stage ran all the same
    assert st["fsdp"]["status"]["note"] == "not run" and not summary["ok"]
    assert "| env | NO |" in (out / "summary.md").read_text()


def test_peak_flops_table_names_the_gpu():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future GPU") is None
