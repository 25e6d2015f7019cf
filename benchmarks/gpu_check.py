"""The stages of ``benchmarks/gpu_check.sh``: one prepared check of lm_mini on one CUDA GPU.

    python benchmarks/gpu_check.py STAGE --out DIR --work DIR [--dry-run]

Stages (each a separate process, so the shell script can time it out and go on):

- ``env``      the machine: GPU, driver, versions, attention backends that run here, the peak bf16 FLOP/s used for MFU.
- ``tests``    ``pytest -m gpu`` over the test files that hold GPU-marked tests (JUnit XML kept).
- ``demo``     ``lm-mini train experiments/demo.yaml`` in bf16-mixed for ``--demo-steps`` steps (300) on the GPU;
               loss, held-out exact match, throughput and padding fraction read back from its MLflow run.
- ``fsdp``     a 2-layer real-width LLaVA-Mini (Vicuna-7B width 4096: 2 LLM and 2 pre-fusion decoder layers, the
               full CLIP ViT-L/336 frozen) trained under FSDP2 (``train.strategy=fsdp``, world size 1) with bf16-mixed
               and activation checkpointing: samples/s, tokens/s, peak memory, MFU. MFU = model FLOPs of one step
               (forward + backward counted on the ``meta`` device, no recomputation) / step time / the GPU's peak.
- ``latency``  prefill latency and time per generated token of ``llava_mini_vicuna7b`` vs ``llava15_vicuna7b``
               (random bf16 weights built on the GPU) for every attention backend that runs here.
- ``summary``  every stage's results and status -> ``summary.json`` and ``summary.md`` in ``--out``.

``--dry-run`` runs every stage on the CPU with the tiny preset and a few steps (CI runs it: the script cannot rot).
Each stage writes ``<work>/<stage>.json``; a stage that fails writes its error there (the shell script records
its exit status and time in ``<work>/<stage>.status.json``).
"""
from __future__ import annotations

import argparse
import gc
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("env", "tests", "demo", "fsdp", "latency")
PAPER_LATENCY_MS = {"llava_mini_vicuna7b": 40.0, "llava15_vicuna7b": 100.0}  # LLaVA-Mini paper, A100, per image

# Dense bf16 tensor-core peak (no sparsity) by GPU name, from the vendors' data sheets; first match wins.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),  # H200 SXM: 989 TFLOP/s
    ("H100 PCIe", 756e12),  # H100 PCIe: 756 TFLOP/s
    ("H100 NVL", 835e12),  # H100 NVL: 835 TFLOP/s
    ("H100", 989e12),  # H100 SXM (the "80GB HBM3" part): 989 TFLOP/s
    ("A100", 312e12),  # A100 SXM / PCIe: 312 TFLOP/s
    ("L40S", 362e12),  # L40S: 362 TFLOP/s
    ("A10G", 70e12),  # A10G (AWS): 70 TFLOP/s
    ("A10", 125e12),  # A10: 125 TFLOP/s
)

PACKAGES = ("torch", "transformers", "lightning", "timm", "torchmetrics", "torchdata", "webdataset", "omegaconf",
            "mlflow", "av", "xformers", "flash-attn", "tokenizers", "numpy")


# --------------------------------------------------------------------------- helpers
def peak_flops(device_name: str) -> Optional[float]:
    """The table's dense bf16 peak for a ``torch.cuda.get_device_name()``; None for a GPU not in the table."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def model_config(preset: str, *overrides: str) -> Any:
    from lm_mini.config import load_config

    return load_config(REPO / "experiments" / "models" / f"{preset}.yaml", list(overrides)).model


# --------------------------------------------------------------------------- env
def stage_env(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from lm_mini.models.attention import BACKENDS, backend_problem

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    out: Dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
                           "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                           "attention_backends": {b: backend_problem(b) or "runs here" for b in BACKENDS}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        out.update(gpu=name, gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=list(torch.cuda.get_device_capability(0)),
                   multiprocessors=props.multi_processor_count, peak_bf16_flops=peak_flops(name))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            out["nvidia_smi"] = f"unavailable: {e}"
    else:
        out.update(gpu=None, peak_bf16_flops=None, cpu=platform.processor() or platform.machine())
    return out


# --------------------------------------------------------------------------- tests
def gpu_test_files() -> List[str]:
    """Test files that hold GPU-marked tests (found by text, so that collecting them imports nothing else)."""
    files = sorted(glob.glob(str(REPO / "tests" / "**" / "test_*.py"), recursive=True))
    return [os.path.relpath(f, REPO) for f in files if "mark.gpu" in Path(f).read_text()]


def stage_tests(args: argparse.Namespace) -> Dict[str, Any]:
    files = gpu_test_files()
    if not files:
        return {"files": [], "note": "no GPU-marked tests found"}
    xml = Path(args.work) / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.tests_timeout)
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n", flush=True)
    out: Dict[str, Any] = {"files": files, "command": " ".join(cmd[1:]), "exit_code": proc.returncode}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        out["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        out["passed"] = out["counts"]["tests"] - sum(out["counts"][k] for k in ("failures", "errors", "skipped"))
        out["cases"] = [{"name": case.get("name"), "outcome": next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed"),
                         "message": next((c.get("message", "")[:300] for c in case if c.tag in ("failure", "error", "skipped")), "")}
                        for case in suite.iter("testcase")]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"GPU tests failed (pytest exit code {proc.returncode}); see the cases")
    return out


# --------------------------------------------------------------------------- demo
def _missing(*modules: str) -> List[str]:
    """The modules of ``modules`` that cannot be found (or whose lookup fails: a broken install)."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return True

    return [m for m in modules if absent(m)]


def demo_overrides(args: argparse.Namespace, work: Path) -> List[str]:
    steps = 3 if args.dry_run else args.demo_steps
    overrides = [
        "train.precision=bf16-mixed", f"train.max_steps={steps}", "train.max_epochs=-1",
        f"logging.runs_dir={work / 'runs'}", f"logging.tracking_uri=sqlite:///{work / 'mlflow.db'}", "run_name=demo-bf16",
        f"train.accelerator={'cpu' if args.dry_run else 'gpu'}", f"train.checkpoint_every_n_steps={max(steps, 1)}",
    ]
    if args.dry_run:  # a few small steps on the CPU
        overrides += ["eval.max_samples=4", "data.num_workers=0", "train.log_every_n_steps=1", "data.batch_size=8", "eval.batch_size=4"]
    else:
        overrides += ["data.num_workers=4"]
    return overrides


def stage_demo(args: argparse.Namespace) -> Dict[str, Any]:
    """``lm-mini train`` as a user runs it. Without mlflow or PyAV (the device image may lack them, and carrying
    them exceeds what one call can take along): :func:`demo_in_process`, saying what it left out."""
    work = Path(args.work)
    overrides = demo_overrides(args, work)
    missing = _missing("mlflow", "av") if not args.force_fallback else ["(forced)"]
    if missing:
        return demo_in_process(args, overrides, missing)
    cmd = [sys.executable, "-m", "lm_mini.cli", "train", "experiments/demo.yaml", *overrides]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.demo_timeout)
    wall = time.perf_counter() - started
    print(proc.stdout[-20000:], proc.stderr[-8000:], sep="\n", flush=True)
    out: Dict[str, Any] = {"command": "lm-mini " + " ".join(cmd[3:]), "exit_code": proc.returncode, "wall_s": round(wall, 1),
                           "steps": 3 if args.dry_run else args.demo_steps}
    if proc.returncode != 0:
        raise RuntimeError(f"lm-mini train exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    run_dir = work / "runs" / "demo" / "demo-bf16"
    eval_file = run_dir / "eval.json"
    if eval_file.is_file():  # the scores, without the per-sample predictions
        out["eval"] = {k: v for k, v in json.loads(eval_file.read_text()).items() if k not in ("predictions", "excluded")}
    out["mlflow"] = _mlflow_metrics(f"sqlite:///{work / 'mlflow.db'}", json.loads((run_dir / "mlflow.json").read_text())["run_id"])
    return out


def demo_in_process(args: argparse.Namespace, overrides: List[str], missing: List[str]) -> Dict[str, Any]:
    """The demo's config, model, training module and loader under a plain Lightning Trainer, without MLflow (and,
    without PyAV, without the video shard set); per-step loss, samples/s and padding fraction recorded here."""
    import types

    if "av" in missing:  # lm_mini.data.media imports PyAV at the top; only video decoding uses it
        sys.modules.setdefault("av", types.ModuleType("av"))
    import lightning as L

    from lm_mini.config import load_config
    from lm_mini.data.datamodule import build_datamodule
    from lm_mini.data.grouping import padding_fraction
    from lm_mini.training.callbacks import _tokens_per_frame, llm_lengths
    from lm_mini.training.module import LmMiniModule
    from lm_mini.training.strategy import build_strategy

    cfg = load_config(REPO / "experiments" / "demo.yaml", [o for o in overrides if not o.startswith(("logging.", "run_name"))])
    dropped = []
    if "av" in missing:
        keep = [s for s in cfg.data.train if "video" not in json.loads((REPO / s.path / "index.json").read_text())["media"]
                or not json.loads((REPO / s.path / "index.json").read_text())["media"]["video"]]
        dropped = [s.path for s in cfg.data.train if s not in keep]
        cfg.data.train = keep
    records: Dict[str, list] = {"loss": [], "padding_fraction": [], "samples": []}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            records["loss"].append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))
            records["padding_fraction"].append(padding_fraction(llm_lengths(batch, _tokens_per_frame(pl_module)).tolist()))
            records["samples"].append(sum(i is not None for i in batch["sample_ids"]))

    t = cfg.train
    timer = StepTimer(min(10, t.max_steps // 4))
    os.chdir(REPO)  # the demo's shard paths are relative to the repository
    started = time.perf_counter()
    trainer = L.Trainer(accelerator=t.accelerator, devices=1, strategy=build_strategy(t), precision=t.precision,
                        max_steps=t.max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        gradient_clip_val=t.max_grad_norm or None, use_distributed_sampler=False, callbacks=[Record(), timer])
    trainer.fit(LmMiniModule(cfg), datamodule=build_datamodule(cfg))
    wall = time.perf_counter() - started
    n = len(records["loss"])
    half = slice(n // 2, None)
    timed = records["samples"][len(records["samples"]) - len(timer.times):]

    def stats(values: List[float]) -> Dict[str, Any]:
        late = values[half]
        return {"first": values[0], "last": values[-1], "mean_second_half": sum(late) / max(1, len(late)), "steps_logged": len(values)}

    return {"mode": "in-process Lightning Trainer (no MLflow, no end-of-run eval)", "missing": missing,
            "dropped_sets": dropped, "steps": n, "wall_s": round(wall, 1),
            "mlflow": {"train/loss": stats(records["loss"]), "data/padding_fraction": stats(records["padding_fraction"]),
                       "perf/samples_per_sec": {"mean_second_half": sum(timed) / sum(timer.times)} if timer.times else None}}


def _mlflow_metrics(uri: str, run_id: str) -> Dict[str, Any]:
    """First, last and mean of the per-step metrics the demo run logged (mean over the second half for rates)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    out = {}
    for name in ("train/loss", "perf/samples_per_sec", "perf/tokens_per_sec", "data/padding_fraction"):
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        if not history:
            out[name] = None
            continue
        values = [m.value for m in history]
        late = values[len(values) // 2 :]
        out[name] = {"first": values[0], "last": values[-1], "mean_second_half": sum(late) / len(late), "steps_logged": len(values)}
    return out


# --------------------------------------------------------------------------- fsdp
def synthetic_train_batch(model_cfg: Any, batch_size: int, prompt_tokens: int, answer_tokens: int, vocab: int,
                          generator: Any = None) -> Dict[str, Any]:
    """A training batch of single-image samples: prompt tokens with the image slot after the first quarter,
    then labelled answer tokens; uint8 pixels at the encoder's size (as the loader hands them over)."""
    import torch

    from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from lm_mini.models.encoders import image_preprocessing

    size = image_preprocessing(model_cfg.encoder)[0]
    length = prompt_tokens + 1 + answer_tokens
    ids = torch.randint(3, vocab, (batch_size, length), generator=generator)
    ids[:, prompt_tokens // 4] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, prompt_tokens + 1 :] = ids[:, prompt_tokens + 1 :]
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator),
            "frames_per_sample": torch.ones(batch_size, dtype=torch.long), "is_video": torch.zeros(batch_size, dtype=torch.bool),
            "sample_ids": [f"synthetic-{i}" for i in range(batch_size)]}


def training_flops(model_cfg: Any, parts_cfg: Any, batch: Dict[str, Any], on: str = "meta") -> Dict[str, int]:
    """Model FLOPs of one training step on ``batch``: forward and backward of the model with the stage's frozen
    parts (the frozen encoder has no backward), counted by ``FlopCounterMode`` (2 per multiply-add, attention
    QK^T and AV in full); activation recomputation is not counted (MFU, not HFU).

    ``on="meta"``: built on the ``meta`` device (no memory, any size; the batch's bookkeeping stays real under
    ``MetaHybridMode``). ``on="cpu"``: a real run, for models so small that the hybrid mode keeps some
    activations real (their gradients would then come back on meta).
    """
    import contextlib

    import torch

    from lm_mini.eval.counting import MetaHybridMode, flop_counter, use_eager_attention
    from lm_mini.models.llava_mini import LlavaMini
    from lm_mini.training.module import apply_stage

    with torch.device(on):
        model = LlavaMini.from_config(model_cfg)
    use_eager_attention(model)
    apply_stage(model, parts_cfg)
    batch = {**batch, "pixel_values": batch["pixel_values"].to(on)}
    with MetaHybridMode() if on == "meta" else contextlib.nullcontext():
        with flop_counter() as counter:
            loss = model(batch).loss
        forward = counter.get_total_flops()
        with flop_counter() as counter:
            loss.backward()
        backward = counter.get_total_flops()
    return {"forward": int(forward), "backward": int(backward), "total": int(forward + backward), "counted_on": on}


class StepTimer:
    """Lightning callback: wall time of each optimizer step after ``warmup`` steps (the GPU synchronised)."""

    def __new__(cls, *args: Any, **kwargs: Any):  # a Callback subclass made lazily: Lightning is imported in the stage
        import lightning as L

        class _StepTimer(L.Callback):
            def __init__(self, warmup: int):
                self.warmup, self.times, self._last = warmup, [], None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == self.warmup and self._last is None:
                    synchronize()
                    self._last = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if self._last is not None:
                    synchronize()
                    now = time.perf_counter()
                    self.times.append(now - self._last)
                    self._last = now

        return _StepTimer(*args, **kwargs)


def stage_fsdp(args: argparse.Namespace) -> Dict[str, Any]:
    import lightning as L
    import torch

    from lm_mini.config import load_config
    from lm_mini.training.module import LmMiniModule
    from lm_mini.training.strategy import build_strategy

    dry = args.dry_run
    if dry:
        preset, layers, batch_size, prompt, answer, warmup, measured = "tiny", 2, 2, 16, 8, 1, 1
    else:
        preset, layers, batch_size, prompt, answer, warmup, measured = (
            "llava_mini_vicuna7b", 2, args.fsdp_batch, 96, 32, 3, args.fsdp_steps)
    overrides = [f"model.llm.config.num_hidden_layers={layers}", f"model.prefusion.depth={layers}"]
    cfg = load_config(REPO / "experiments" / "models" / f"{preset}.yaml", [
        *overrides, "model.dtype=float32",  # fp32 master weights; bf16 compute from FSDP2's mixed precision
        "train.strategy=fsdp", "train.precision=bf16-mixed", "train.activation_checkpointing=true", "train.stage=finetune",
        f"train.accelerator={'cpu' if dry else 'gpu'}", "train.devices=1", f"train.max_steps={warmup + measured}",
        "train.lr=1e-5", f"data.batch_size={batch_size}"])
    vocab = int(cfg.model.llm.config.get("vocab_size", 32000))
    g = torch.Generator().manual_seed(0)
    batches = [synthetic_train_batch(cfg.model, batch_size, prompt, answer, vocab, g) for _ in range(2)]
    steps = warmup + measured

    class Synthetic(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([batches[i % 2] for i in range(steps)], batch_size=None)

    flops = training_flops(cfg.model, cfg.train.parts, batches[0], on="cpu" if dry else "meta")
    free_memory()
    if not dry:
        torch.cuda.reset_peak_memory_stats()
    module = LmMiniModule(cfg)
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator=cfg.train.accelerator, devices=1, strategy=build_strategy(cfg.train),
                        precision=cfg.train.precision, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[timer])
    trainer.fit(module, datamodule=Synthetic())
    step_s = sum(timer.times) / len(timer.times)
    llm_tokens = batch_size * (prompt + answer + module.model.compressor.num_tokens)  # text + C² visual per sample
    params = {"total": sum(p.numel() for p in module.model.parameters()),
              "trainable": sum(p.numel() for p in module.model.parameters() if p.requires_grad)}
    out: Dict[str, Any] = {
        "model": f"{preset} with {layers} LLM and {layers} pre-fusion layers (width {cfg.model.llm.config.hidden_size}), "
                 f"encoder {cfg.model.encoder.config.get('num_hidden_layers')} layers frozen",
        "strategy": type(trainer.strategy).__name__, "world_size": trainer.world_size, "precision": cfg.train.precision,
        "activation_checkpointing": True, "batch_size": batch_size, "text_tokens_per_sample": prompt + answer,
        "params": params, "warmup_steps": warmup, "measured_steps": len(timer.times), "step_s": step_s,
        "step_s_all": timer.times, "samples_per_s": batch_size / step_s, "llm_tokens_per_s": llm_tokens / step_s,
        "flops_per_step": flops, "achieved_flops": flops["total"] / step_s,
        "sharded": any(type(p).__name__ == "DTensor" for p in module.model.parameters()),
        "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
    }
    if torch.cuda.is_available() and not dry:
        name = torch.cuda.get_device_name(0)
        peak = peak_flops(name)
        out.update(gpu=name, peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, peak_bf16_flops=peak,
                   mfu=flops["total"] / step_s / peak if peak else None)
    else:
        out.update(peak_memory_gib=None, mfu=None, note="dry run on CPU: timings and MFU are not meaningful")
    return out


# --------------------------------------------------------------------------- latency
def stage_latency(args: argparse.Namespace) -> Dict[str, Any]:
    """Each (backend, model) measurement is written as soon as it is done: a stage cut short keeps the rest."""
    from lm_mini.eval.efficiency import baseline_config, measure_latency
    from lm_mini.models.attention import available_backends

    dry = args.dry_run
    dev = device()
    backends = sorted(available_backends(), key=lambda b: ("sdpa", "flash_attention_2", "xformers", "eager").index(b))
    if dry:
        presets = {"llava_mini_vicuna7b": model_config("tiny"), "llava15_vicuna7b": baseline_config(model_config("tiny"))}
        kwargs = dict(text_tokens=16, new_tokens=2, repeats=1, warmup=0)
    else:
        presets = {name: model_config(name) for name in ("llava_mini_vicuna7b", "llava15_vicuna7b")}
        kwargs = dict(text_tokens=args.text_tokens, new_tokens=args.new_tokens, repeats=args.repeats, warmup=2)
    path = Path(args.work) / "latency.json"
    out: Dict[str, Any] = {"device": dev, "backends": backends, "setup": {**kwargs, "sample": "one image",
                           "weights": "random, in the preset's model.dtype (bf16 for the 7B presets), built on the device"},
                           "paper_ms_A100": PAPER_LATENCY_MS, "results": {}, "errors": {}}
    if dev == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    for backend in backends:
        for name, cfg in presets.items():
            cfg = cfg.copy()
            cfg.attn_implementation = backend
            try:
                started = time.perf_counter()
                figures = measure_latency(cfg, device=dev, **kwargs)
                figures = {"prefill_ms": figures["prefill_s"] * 1e3, "per_token_ms": figures["per_token_s"] * 1e3,
                           "stage_s": round(time.perf_counter() - started, 1)}
                out["results"].setdefault(backend, {})[name] = figures
            except Exception as e:  # one backend failing (a kernel missing for this GPU) does not stop the others
                out["errors"][f"{backend}/{name}"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            free_memory()
            write_json(path, {"partial": True, **out})
        measured = out["results"].get(backend, {})
        if "llava_mini_vicuna7b" in measured and "llava15_vicuna7b" in measured:
            mini, base = measured["llava_mini_vicuna7b"], measured["llava15_vicuna7b"]
            measured["ratio"] = {k: mini[k] / base[k] for k in ("prefill_ms", "per_token_ms")}
    if out["errors"] and not out["results"]:
        raise RuntimeError(f"no latency measured: {out['errors']}")
    return out


# --------------------------------------------------------------------------- summary
def stage_summary(args: argparse.Namespace) -> Dict[str, Any]:
    work, out_dir = Path(args.work), Path(args.out)
    stages: Dict[str, Any] = {}
    for name in STAGES:
        status_file, result_file = work / f"{name}.status.json", work / f"{name}.json"
        status = json.loads(status_file.read_text()) if status_file.is_file() else {"exit_code": None, "note": "not run"}
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
        ok = status.get("exit_code") == 0 and result is not None and "error" not in (result or {})
        stages[name] = {"ok": ok, "status": status, "result": result}
    summary = {"dry_run": args.dry_run, "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
               "ok": all(s["ok"] for s in stages.values()), "stages": stages}
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(markdown(summary))
    print((out_dir / "summary.md").read_text())
    return {"ok": summary["ok"]}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _first(mapping: Dict[str, Any], *keys: str) -> Any:
    return next((mapping[k] for k in keys if mapping.get(k) is not None), None)


def markdown(summary: Dict[str, Any]) -> str:
    """The summary as the Markdown that goes into benchmarks/RESULTS.md."""
    st = summary["stages"]
    env = st["env"]["result"] or {}
    lines = [f"# gpu_check {'(dry run, CPU)' if summary['dry_run'] else ''}", "",
             f"Finished {summary['finished_utc']} UTC on {env.get('gpu') or env.get('cpu') or '?'}"
             + (f" ({env.get('gpu_memory_gib')} GiB, {env.get('nvidia_smi', '')})" if env.get("gpu") else "")
             + f"; torch {env.get('versions', {}).get('torch')}, transformers {env.get('versions', {}).get('transformers')},"
             f" xformers {env.get('versions', {}).get('xformers')}, flash-attn {env.get('versions', {}).get('flash-attn')}.", "",
             "| stage | ok | exit | seconds | note |", "|---|---|---|---|---|"]
    for name, s in st.items():
        status, result = s["status"], s["result"] or {}
        note = result.get("error", "") or status.get("note", "")
        lines.append(f"| {name} | {'yes' if s['ok'] else 'NO'} | {_fmt(status.get('exit_code'))} | {_fmt(status.get('seconds'))} "
                     f"| {str(note).splitlines()[0][:160] if note else ''} |")
    tests = st["tests"]["result"] or {}
    if tests.get("counts"):
        c = tests["counts"]
        lines += ["", f"**GPU tests**: {tests.get('passed')} passed, {c['failures']} failed, {c['errors']} errors, "
                      f"{c['skipped']} skipped ({', '.join(tests.get('files', []))})."]
        lines += [f"- {case['outcome']}: {case['name']} {case['message'][:160]}" for case in tests.get("cases", [])
                  if case["outcome"] != "passed"]
    demo = st["demo"]["result"] or {}
    if demo.get("mlflow"):
        m = demo["mlflow"]
        loss, sps, pad = m.get("train/loss") or {}, m.get("perf/samples_per_sec") or {}, m.get("data/padding_fraction") or {}
        how = f" ({demo['mode']}; missing {', '.join(demo['missing'])}; left out {', '.join(demo['dropped_sets']) or 'nothing'})" if demo.get("mode") else ""
        lines += ["", f"**Demo, bf16-mixed, {demo.get('steps')} steps**{how} ({demo.get('wall_s')} s wall incl. start): "
                      f"loss {_fmt(loss.get('first'))} -> {_fmt(loss.get('last'))}, {_fmt(sps.get('mean_second_half'))} samples/s, "
                      f"padding fraction {_fmt(pad.get('mean_second_half'))}, held-out exact match "
                      f"{_fmt(_first((demo.get('eval') or {}), 'accuracy', 'exact_match'))} (majority baseline "
                      f"{_fmt((demo.get('eval') or {}).get('majority_baseline'))})."]
    fsdp = st["fsdp"]["result"] or {}
    if fsdp.get("step_s"):
        lines += ["", f"**FSDP2** ({fsdp.get('model')}; {fsdp.get('strategy')}, world size {fsdp.get('world_size')}, "
                      f"{fsdp.get('precision')}, activation checkpointing, batch {fsdp.get('batch_size')} x "
                      f"{fsdp.get('text_tokens_per_sample')} text tokens + 1 image):", "",
                  "| step | samples/s | LLM tokens/s | peak memory | model FLOPs/step | achieved | MFU |", "|---|---|---|---|---|---|---|",
                  f"| {fsdp['step_s'] * 1e3:.1f} ms | {fsdp['samples_per_s']:.1f} | {fsdp['llm_tokens_per_s']:.0f} | "
                  f"{_fmt(fsdp.get('peak_memory_gib'))} GiB | {fsdp['flops_per_step']['total'] / 1e12:.2f} T | "
                  f"{fsdp['achieved_flops'] / 1e12:.1f} TFLOP/s | {_fmt(fsdp.get('mfu'))} |",
                  "", f"MFU against {_fmt(fsdp.get('peak_bf16_flops'))} FLOP/s dense bf16 (table in benchmarks/gpu_check.py)."]
    lat = st["latency"]["result"] or {}
    if lat.get("results"):
        lines += ["", f"**Latency** ({lat.get('gpu') or lat.get('device')}; one image + {lat['setup'].get('text_tokens')} text tokens, "
                      f"{lat['setup'].get('new_tokens')} new tokens, median of {lat['setup'].get('repeats')}; paper on an A100: "
                      f"{PAPER_LATENCY_MS['llava_mini_vicuna7b']:.0f} ms vs {PAPER_LATENCY_MS['llava15_vicuna7b']:.0f} ms):", "",
                  "| backend | LLaVA-Mini prefill | LLaVA-1.5 prefill | ratio | LLaVA-Mini per token | LLaVA-1.5 per token | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for backend, r in lat["results"].items():
            mini, base, ratio = r.get("llava_mini_vicuna7b", {}), r.get("llava15_vicuna7b", {}), r.get("ratio", {})
            lines.append(f"| {backend} | {_fmt(mini.get('prefill_ms'))} ms | {_fmt(base.get('prefill_ms'))} ms | {_fmt(ratio.get('prefill_ms'))} "
                         f"| {_fmt(mini.get('per_token_ms'))} ms | {_fmt(base.get('per_token_ms'))} ms | {_fmt(ratio.get('per_token_ms'))} |")
        for key, err in (lat.get("errors") or {}).items():
            lines.append(f"- {key}: {err[:200]}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
RUNNERS: Dict[str, Callable[[argparse.Namespace], Dict[str, Any]]] = {
    "env": stage_env, "tests": stage_tests, "demo": stage_demo, "fsdp": stage_fsdp, "latency": stage_latency,
    "summary": stage_summary,
}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=list(RUNNERS))
    p.add_argument("--out", required=True, help="folder for summary.json / summary.md")
    p.add_argument("--work", required=True, help="folder for each stage's results, runs, MLflow store, JUnit XML")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps (CI)")
    p.add_argument("--demo-steps", type=int, default=300)
    p.add_argument("--fsdp-batch", type=int, default=16)
    p.add_argument("--fsdp-steps", type=int, default=10)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tests-timeout", type=float, default=600)
    p.add_argument("--demo-timeout", type=float, default=600)
    p.add_argument("--force-fallback", action="store_true", help="demo: the in-process path even with mlflow and PyAV (tests)")
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result_file = Path(args.work) / f"{args.stage}.json"
    started = time.perf_counter()
    try:
        result = RUNNERS[args.stage](args)
    except BaseException as e:  # the error is a result too: the summary shows it; the exit code tells the script
        traceback.print_exc()
        partial = json.loads(result_file.read_text()) if result_file.is_file() else {}
        if args.stage != "summary":
            write_json(result_file, {**partial, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - started})
        return 1
    if args.stage != "summary":
        write_json(result_file, {**result, "seconds": round(time.perf_counter() - started, 1)})
    return 0 if args.stage != "summary" or result.get("ok") else 2


if __name__ == "__main__":
    sys.exit(main())
