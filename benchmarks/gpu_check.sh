#!/usr/bin/env bash
# One prepared check of lm_mini on one CUDA GPU, in under 8 minutes (issue 20):
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# Stages, each in its own process with its own time limit; a stage that fails or runs out of time is recorded
# and the next one still runs (benchmarks/gpu_check.py says what each measures):
#   env      GPU, driver, versions, attention backends that run here           limit  25 s
#   tests    pytest -m gpu (the GPU-marked tests)                                limit  70 s
#   demo     lm-mini train experiments/demo.yaml, bf16-mixed, 300 steps          limit 110 s
#   fsdp     2-layer real-width LLaVA-Mini, FSDP2 + bf16 + activation ckpt      limit  90 s
#   latency  7B prefill / per-token latency, LLaVA-Mini vs LLaVA-1.5, per backend limit 100 s
#   summary  summary.json + summary.md                                          limit  15 s
# Limits sum to 410 s, plus 5 s each to kill a stage's whole process group when it ignores SIGTERM: the check
# ends within 8 minutes whatever happens (a dry run gets twice each limit).
#
# Output: OUT_DIR (default $OUT, else benchmarks/gpu_check_out) gets summary.json, summary.md (the Markdown for
# benchmarks/RESULTS.md), stages.log (every stage's output) and gpu_tests.xml: few files, as the device tool
# brings back at most 8. Bulky things (the demo's run directory and MLflow store) go to $GPU_CHECK_WORK
# (default: a temporary folder). --dry-run: every stage on the CPU with the tiny preset and a few steps (CI).
#
# Python: $PYTHON, else .venv/bin/python when there is one, else python3. The repository is put on PYTHONPATH,
# so an environment with lm_mini's dependencies is enough (no install needed). Wheels carried in .whl/ (see
# benchmarks/gpu_wheels.sh) are installed into a temporary folder first.
set -u
cd "$(dirname "$0")/.."

DRY=""
OUT_DIR="${OUT:-benchmarks/gpu_check_out}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY="--dry-run" ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="${GPU_CHECK_WORK:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$WORK"

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

LOG="$OUT_DIR/stages.log"
: > "$LOG"
started_all=$(date +%s)

run_stage() {  # run_stage NAME LIMIT_S [extra args]
  local name=$1 limit=$2; shift 2
  local t0 rc t1
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$PY" benchmarks/gpu_check.py "$name" --out "$OUT_DIR" --work "$WORK" $DRY "$@" >> "$LOG" 2>&1
  rc=$?
  t1=$(date +%s)
  local note=""
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note="timed out after ${limit}s"; fi
  printf '{"exit_code": %d, "seconds": %d, "limit_s": %d, "note": "%s"}\n' "$rc" "$((t1 - t0))" "$limit" "$note" > "$WORK/$name.status.json"
  echo "=== $name: exit $rc in $((t1 - t0))s $note" | tee -a "$LOG"
}

# GPU_CHECK_STAGES="env fsdp" runs a subset (the summary always runs); GPU_CHECK_LIMIT_<STAGE>=S changes a limit.
STAGES=" ${GPU_CHECK_STAGES:-env tests demo fsdp latency} "
# A dry run (CI, a shared CPU) gets twice the GPU run's limits: they guard the 8 minutes of a GPU call.
SCALE=1; [ -n "$DRY" ] && SCALE=2
limit() { local var="GPU_CHECK_LIMIT_$(echo "$1" | tr '[:lower:]' '[:upper:]')"; echo "${!var:-$(( $2 * SCALE ))}"; }
wanted() { [[ "$STAGES" == *" $1 "* ]]; }
rm -f "$WORK"/*.status.json "$WORK"/{env,tests,demo,fsdp,latency}.json  # a reused work folder: no stale results
wanted env && run_stage env "$(limit env 25)"
wanted tests && run_stage tests "$(limit tests 70)" --tests-timeout "$(( $(limit tests 70) - 10 ))"
wanted demo && run_stage demo "$(limit demo 110)" --demo-timeout "$(( $(limit demo 110) - 10 ))"
wanted fsdp && run_stage fsdp "$(limit fsdp 90)"
wanted latency && run_stage latency "$(limit latency 100)"
run_stage summary "$(limit summary 15)"
cp -f "$WORK/gpu_tests.xml" "$OUT_DIR/" 2>/dev/null || true
echo "gpu_check: $(( $(date +%s) - started_all ))s in all; results in $OUT_DIR (work files in $WORK)" | tee -a "$LOG"
# Exit 0 only when every stage passed (the summary stage exits 2 otherwise).
exit "$(sed -n 's/.*"exit_code": \([0-9]*\).*/\1/p' "$WORK/summary.status.json")"
