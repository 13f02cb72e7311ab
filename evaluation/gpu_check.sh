#!/usr/bin/env bash
# The GPU check, prepared as one run (issue 4). From the repository root:
#
#   bash evaluation/gpu_check.sh OUT_DIR          # on a CUDA machine: about 7-10 minutes on one H100
#   bash evaluation/gpu_check.sh OUT_DIR --cpu    # CPU fallback: the same steps at toy sizes
#
# Needs only python3 with torch, triton, transformers (4.48+ or 5.x) and pytest: no network,
# no Feast/MLflow/polars/LMCache. The package is staged from this checkout (the top-level
# kernels/ and evaluation/ folders become rcllm_sdk.kernels / rcllm_sdk.evaluation, as the
# installed package lays them out). Steps: versions; kernel tests against the torch reference
# (bf16 and serving sizes included on a GPU); kernel benchmark against masked SDPA (and
# FlashAttention varlen when it imports); end-to-end TTFT of full / prefix / rcllm on a
# Qwen2-0.5B-shaped random model, reference and long_item workloads; the same shape served
# through the public API (RcRecommender.from_frames, in-memory features, memory:// store):
# bf16 policy=full vs mode=full top-1 on every clear margin, fp32 exact modes vs full and the
# default policy's reuse, TTFT ratios printed (evaluation/frames_check.py). Everything lands in
# OUT_DIR (JSON + markdown); a failed step is reported and the next one still runs.
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR [--cpu]}
MODE=${2:-gpu}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}  # e.g. PYTHON=$PWD/.venv/bin/python here
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
cp -r "$ROOT/rcllm_sdk" "$STAGE/rcllm_sdk"
for sub in kernels evaluation pipelines; do
  rm -rf "$STAGE/rcllm_sdk/$sub" && cp -r "$ROOT/$sub" "$STAGE/rcllm_sdk/$sub"
done
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}" LMCACHE_TRACK_USAGE=false HF_HUB_OFFLINE=1
cd "$STAGE"  # `python -m` puts the working directory first: the checkout's rcllm_sdk/ lacks the mapped folders

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log, remember failures, carry on
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!! $name failed (exit $rc)"; status=1; }
}

step versions 120 "$PY" - <<'EOF'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in ("triton", "transformers", "flash_attn"):
    try:
        info[name] = __import__(name).__version__
    except ImportError:
        info[name] = None
print(json.dumps(info))
major_minor = tuple(int(x) for x in (info["transformers"] or "0.0").split(".")[:2])
if major_minor < (4, 48):
    print("transformers < 4.48: the block runner needs attention modules with `.scaling` (4.48+); "
          "the end-to-end step will fail")
EOF

if [ "$MODE" = "--cpu" ]; then
  step kernel_tests 600 env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider --noconftest \
    --rootdir "$ROOT" "$ROOT/tests/test_kernel.py"
  step kernel_bench 300 "$PY" -m rcllm_sdk.evaluation.kernel_bench --cpu --out "$OUT/kernel"
  step e2e_bench 900 "$PY" -m rcllm_sdk.evaluation.bench --model tiny --store memory:// --warm 2 1 --cold 1 1 \
    --other-policies none --out "$OUT/bench/bench.json"
  step frames 600 "$PY" -m rcllm_sdk.evaluation.frames_check --model tiny --device cpu --users 12 --items 80 \
    --out "$OUT/frames"
else
  step kernel_tests 240 "$PY" -m pytest -q -p no:cacheprovider --noconftest -m "gpu or not gpu" \
    --rootdir "$ROOT" "$ROOT/tests/test_kernel.py"
  step kernel_bench 200 "$PY" -m rcllm_sdk.evaluation.kernel_bench --out "$OUT/kernel"
  step e2e_bench 300 "$PY" -m rcllm_sdk.evaluation.bench --model qwen-0.5b --device cuda --store memory:// \
    --warm 30 12 --cold 5 3 --out "$OUT/bench/bench.json"
  step frames 300 "$PY" -m rcllm_sdk.evaluation.frames_check --model qwen-0.5b --device cuda --out "$OUT/frames"
fi
echo "== done: results in $OUT (status $status)"
exit $status
