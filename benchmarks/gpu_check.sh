#!/usr/bin/env bash
# One-shot check on a CUDA machine (about 5 minutes on one GPU, 8 at most): the CUDA tests (MoE backends
# against the dense oracle in bf16, connector training and resume, a Uni-MoE step, the NCCL process group),
# then the MoE layer and MoE-LLM benchmarks on CUDA. Everything goes under one folder: JSON rows, logs, the
# test report, and summary.md (python benchmarks/gpu_summary.py FOLDER writes it again from the files).
#
#   benchmarks/gpu_check.sh [OUT]          # default OUT: gpu-check; or `make gpu-check`
#   DEVICE=cpu QUICK=1 benchmarks/gpu_check.sh /tmp/gpu-check   # a dry run of the script itself (tests)
#
# Each step has its own time limit and the script goes on after a failed step; it exits non-zero when
# a step failed. Never part of CI (no GPU there): the CUDA tests skip cleanly without one.
set -u
OUT=${1:-gpu-check}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
mkdir -p "$OUT"
failed=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
    [ "$rc" -eq 0 ] || failed=1
}
: >"$OUT/steps.txt"
step hardware 30 sh -c "nvidia-smi || true; $PY -c 'import torch; c = torch.cuda.is_available(); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if c else \"no GPU\", torch.cuda.device_count())'"
step cuda-tests 240 env HF_HUB_OFFLINE=1 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider --junitxml "$OUT/cuda-tests.xml"
step moe-layer 150 "$PY" benchmarks/moe_layer.py --device "$DEVICE" --check --repeat 10 $QUICK --out "$OUT/moe_layer.json"
step mllm 90 "$PY" benchmarks/mllm.py --device "$DEVICE" --repeat 20 $QUICK --out "$OUT/mllm.json"
"$PY" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
exit $failed
