#!/usr/bin/env bash
# The GPU suite: one command, one results folder, at most ~9.5 minutes on an H100.
#
#   bash bench/gpu_suite.sh [RESULTS_DIR]      (default: bench/results/<date>-<gpu name>)
#
# Steps, each under its own time limit so that one stuck step cannot sink the rest; each logs
# to RESULTS_DIR/<step>.log, and the benchmark writes its JSON parts as it goes:
#   1. the CUDA-only tests (pytest -m cuda)
#   2. the kernel microbenchmarks (python -m misotts.bench.kernels)
#   3. csm-1b and 4. miso-8b: latency, throughput and memory of our reference path, our engine
#      and transformers (eager), next to the bandwidth floor
#   5. transformers with a static cache, compiled by torch.compile (csm-1b, one stream): the
#      slowest to start, so it gets whatever time is left
#   6. the report: results.md, results.json, results.png (with matplotlib) and the targets
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-570}  # seconds for the whole suite
STEPS=${STEPS:-pytest-cuda,kernels,bench-csm-1b,bench-miso-8b,bench-csm-1b-compiled}  # a rerun can pick steps
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
  echo "== $name: exit $? at $((SECONDS - START)) s" | tee -a "$OUT/suite.log"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
step pytest-cuda 90 python -m pytest -m cuda -q
step kernels 70 python -m misotts.bench.kernels --out "$OUT"
step bench-csm-1b 140 python -m misotts.bench --models csm-1b --systems reference,engine,transformers --out "$OUT" --no-report
step bench-miso-8b 150 python -m misotts.bench --models miso-8b --systems reference,engine,transformers --out "$OUT" --no-report
step bench-csm-1b-compiled 600 python -m misotts.bench --models csm-1b --systems transformers-static --streams 1 \
  --workloads short --out "$OUT" --no-report
python -m misotts.bench.report "$OUT" > "$OUT/report.log" 2>&1; cat "$OUT/report.log"
echo "suite done in $((SECONDS - START)) s; results in $OUT"
