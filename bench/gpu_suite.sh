#!/usr/bin/env bash
# The GPU suite: one command, one results folder, at most ~9.5 minutes on an H100.
#
#   bash bench/gpu_suite.sh [RESULTS_DIR]      (default: bench/results/<date>-<gpu name>)
#
# Steps, in the order that gives the most first; each under its own time limit so that one stuck
# step cannot sink the rest, a failure in one does not stop the next, and each logs to
# RESULTS_DIR/<step>.log (suite.log says which passed):
#   1. pytest-cpu: the whole CPU suite as CI runs it (Triton interpreted, CUDA hidden)
#   2. cuda-kernels: every kernel against its reference at the real shapes, fp32/bf16/fp16
#      (tests/kernels/test_cuda_shapes.py, with its tolerance table)
#   3. cuda-engine: graph replay = eager in every bucket, engine = reference in fp32 (tiny and a
#      csm-1b-shaped model), the engine's own stream, 8 streams with batched Mimi = solo
#   (1-3 together are `python -m misotts.bench.pytest_step`, the test suite on a GPU machine)
#   4. kernels: the kernel microbenchmarks (python -m misotts.bench.kernels)
#   5. bench-csm-1b and 6. bench-miso-8b: latency, throughput and memory of our reference path,
#      our engine and transformers (eager), next to the bandwidth floor
#   7. bench-csm-1b-compiled: transformers with a static cache, compiled by torch.compile (csm-1b,
#      one stream): the slowest to start, so it gets whatever time is left
#   then the report: results.md, results.json, results.png (with matplotlib) and the targets
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-570}  # seconds for the whole suite
STEPS=${STEPS:-pytest-cpu,cuda-kernels,cuda-engine,kernels,bench-csm-1b,bench-miso-8b,bench-csm-1b-compiled}  # a rerun can pick steps
OUT=${1:-$(python -c "import torch; from misotts.bench.run import default_out; print(default_out(torch.device('cuda')))")}
mkdir -p "$OUT"
START=$SECONDS

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START)))
  shift 2
  [[ ",$STEPS," == *",$name,"* ]] || { echo "== $name: not in STEPS" | tee -a "$OUT/suite.log"; return; }
  ((limit > left)) && limit=$left
  if ((limit < 20)); then echo "== $name: skipped, no time left" | tee -a "$OUT/suite.log"; return; fi
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/suite.log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local code=$?
  local verdict=passed; ((code == 0)) || verdict="FAILED (exit $code)"
  ((code == 124 || code == 137)) && verdict="TIMED OUT after ${limit} s"
  echo "== $name: $verdict at $((SECONDS - START)) s" | tee -a "$OUT/suite.log"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# CPU_PYTHONPATH: packages for the interpreted run only (e.g. numpy < 2.4 under triton 3.6, whose
# interpreter fails on numpy >= 2.4; docs/bench.md)
step pytest-cpu 180 env PYTHONPATH="${CPU_PYTHONPATH:+$CPU_PYTHONPATH:}${PYTHONPATH:-}" \
  python -m misotts.bench.pytest_step --run cpu -v  # -v: each result printed as it comes, even if killed
step cuda-kernels 120 python -m misotts.bench.pytest_step --run cuda -q tests/kernels
step cuda-engine 120 python -m misotts.bench.pytest_step --run cuda -q -s --ignore=tests/kernels  # -s: measured figures printed
step kernels 70 python -m misotts.bench.kernels --out "$OUT"
step bench-csm-1b 140 python -m misotts.bench --models csm-1b --systems reference,engine,transformers --out "$OUT" --no-report
step bench-miso-8b 150 python -m misotts.bench --models miso-8b --systems reference,engine,transformers --out "$OUT" --no-report
step bench-csm-1b-compiled 600 python -m misotts.bench --models csm-1b --systems transformers-static --streams 1 \
  --workloads short --out "$OUT" --no-report
python -m misotts.bench.report "$OUT" > "$OUT/report.log" 2>&1; cat "$OUT/report.log"
echo "suite done in $((SECONDS - START)) s; results in $OUT"
grep -E "^== [a-z0-9-]+: (passed|FAILED|TIMED|skipped)" "$OUT/suite.log"
