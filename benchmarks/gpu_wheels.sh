#!/usr/bin/env bash
# Wheels that a GPU machine without lm_mini's environment needs for benchmarks/gpu_check.sh, fetched here into .whl/
# (gpu_check.sh installs whatever .whl/ holds into a temporary folder before its stages run).
#
#   benchmarks/gpu_wheels.sh [PYTHON_VERSION]      (default 3.12: the python3 of this workplace's CUDA image)
#
# Sized for that image (torch, lightning, timm, torchmetrics, tokenizers, huggingface-hub already there): the
# pinned transformers (its 5.17 lacks the 5.24 APIs lm_mini uses), omegaconf, torchdata, webdataset, braceexpand;
# about 14 MB. Not fetched: mlflow (with what it pulls in, ~36 MB more) and PyAV (~35 MB) do not fit with the
# repository under the 64 MiB a device call carries, so there the demo stage trains in-process without MLflow
# and without the video set, and says so in the summary; xformers / flash-attn are built per torch version and
# are far larger (there, the latency stage measures sdpa and eager).
#
# Carry it: in the device call, carry ".whl" (and keep /.whl/ in .git/info/exclude so it is not sent twice).
set -eu
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -i "^$1==" constraints.txt | head -1; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "$(pin transformers)" "$(pin omegaconf)" "$(pin torchdata)" "$(pin webdataset)" braceexpand==0.1.7
du -sh .whl
ls .whl
