#!/usr/bin/env bash
# The GPU suite: one command, one results folder, done within BUDGET seconds (default 480: 8 min).
#
#   bash bench/gpu_suite.sh [--dry-run] [--budget S] [--return DIR] [RESULTS_DIR]
#
# RESULTS_DIR (default bench/results/<date>-<gpu>) gets every step's log and results as they come;
# --return DIR keeps DIR to three files (suite.log, the running step's log, gpu-suite.tgz of
# RESULTS_DIR renewed after each step): what bench/device_run.sh hands back from a device machine.
# Steps, the most valuable first, each with its share of the budget (bench/suite_runner.sh says
# how the limits follow from it; 100 = what is left):
#   cuda-kernels    every kernel against its reference at the csm-1b and miso-8b shapes, fp32/bf16/fp16
#   cuda-engine     graph replay = eager, engine = reference in fp32, 8 streams = solo, bf16 bound (-s: figures)
#   bench-miso-8b   engine rows: latency, steady throughput at 1/4/16/64 streams, the most real-time
#                   streams (a search of --rt-search-s, 12 s) and TTFA at that load, memory, floors
#   bench-csm-1b    the same for csm-1b
#   kernels         kernel microbenchmarks (python -m misotts.bench.kernels)
#   profile         frame profile of PROFILE_MODEL (miso-8b) at PROFILE_BATCHES (1 64) (python -m
#                   misotts.bench.profile; noted as not run while it is not in the tree)
#   quant-frames    miso-8b's frame (batch 1) unquantised, then with int8, fp8 and int4 weights, in one
#                   run (python -m misotts.bench.profile --weights ...): issue 26's frame ratios
#   host            the engine loop's host µs per frame over a null runner, csm-1b at 1/8/64 streams
#                   (python -m misotts.bench.host: the GPU machine's CPU, no GPU work)
#   peers-csm-1b    reference and transformers rows on a short plan (short prompt, 1 and 16 streams)
#   peers-miso-8b   the same for miso-8b
#   pytest-cpu      the CPU test suite as CI runs it (Triton interpreted, CUDA hidden)
# then the merged report (results.md/json/png).  STEPS=a,b runs some steps only.
#
# --dry-run: the CPU rehearsal (CI runs it): the same steps, order and budget logic on the CPU, with
# `tiny` for every model and a small budget (default 360 s; it takes ~70 s of CPU time), the
# packages a bare GPU machine lacks hidden (bench/bare), the CUDA test selections collected (and
# skipped), the kernel bench and the profile in their CPU modes (the kernel bench, until it has
# one, must refuse cleanly: exit 2, saying it needs CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

DRY= RETURN= RESULTS=
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --return) RETURN=$2; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) RESULTS=$1 ;;
  esac
  shift
done

if [[ -n $DRY ]]; then
  BUDGET=${BUDGET:-360} RESERVE=${RESERVE:-20} GRACE=${GRACE:-3} MIN_STEP=${MIN_STEP:-3}
  SKIPPED_FAILS=1  # a rehearsal that leaves a step out has not rehearsed it
  export CUDA_VISIBLE_DEVICES=
  # What the device image lacks (KINDS.md package list, 2026-11-17) and the suite does not carry:
  export MISOTTS_WITHOUT=fastapi,starlette,uvicorn,av,multipart,python_multipart,websockets,openai,ray,sphn,sounddevice,bitsandbytes
  export PYTHONPATH=$PWD/bench/bare${PYTHONPATH:+:$PYTHONPATH}
else
  BUDGET=${BUDGET:-480} RESERVE=${RESERVE:-20} GRACE=${GRACE:-10} MIN_STEP=${MIN_STEP:-20}
fi
: "${RESULTS:=$("$PY" -c 'import torch; from misotts.bench.run import default_out
print(default_out(torch.device("cuda" if torch.cuda.is_available() else "cpu")))')}"
[[ -n $RESULTS ]] || { echo "no results folder" >&2; exit 2; }

source bench/suite_runner.sh
suite_start "$RESULTS" "$RETURN"

# What ran, on what: the commit (MISOTTS_GIT_COMMIT where the tree has no .git) and the versions.
{
  timeout 60 "$PY" -c 'import json, sys, numpy, torch, triton
from misotts.bench.provenance import code_version
print(json.dumps({"code": code_version(), "python": sys.version.split()[0], "torch": torch.__version__,
                  "triton": triton.__version__, "numpy": numpy.__version__,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))'
  timeout 20 nvidia-smi 2>&1 || echo "(no nvidia-smi)"
} > "$RES/versions.txt" 2>&1
say "== versions: $(head -n 1 "$RES/versions.txt")"

BENCH=("$PY" -m misotts.bench --out "$RES" --no-report)
PEER_PLAN=(--frames 12 --repeats 1 --streams 1,16 --batch-frames 6 --workloads short)
DRY_PLAN=()  # the dry run: tiny on the CPU, a few frames, the engine not compiled (argparse: last wins)
[[ -n $DRY ]] && DRY_PLAN=(--models tiny --device cpu --threads 1 --no-compile --frames 2 --repeats 1 --streams 1
                           --batch-frames 2 --window-frames 2 --ttfa-arrivals 1 --workloads short)
gpu_only() {  # a GPU-only tool; in the dry run it must refuse cleanly (exit 2, naming CUDA) or run
  [[ -n $DRY ]] || { "$@"; return; }
  local said code
  said=$("$@" 2>&1)
  code=$?
  echo "$said"
  if ((code == 2)) && [[ $said == *CUDA* ]]; then
    echo "(refused without CUDA: as it should, in a dry run)"
    return 0
  fi
  return $code
}
kernel_bench() {  # the kernel microbenchmarks; in the dry run, every case once, interpreted, where the tool can
  if [[ -z $DRY ]]; then
    "$PY" -m misotts.bench.kernels --out "$RES"
  elif grep -q -- '"--dry-run"' bench/kernels.py; then  # issue 21's CPU mode (until then: it must refuse)
    TRITON_INTERPRET=1 "$PY" -m misotts.bench.kernels --dry-run --out "$RES"
  else
    gpu_only "$PY" -m misotts.bench.kernels --out "$RES"
  fi
}
profiles() {  # the frame profile, a table per batch size written as each is done; in the dry run on the CPU
  if [[ -n $DRY ]]; then
    "$PY" -m misotts.bench.profile --device cpu --model tiny --batch 2 --frames 1 --context 40 --out "$RES"
  else
    # shellcheck disable=SC2086  # PROFILE_BATCHES: several numbers
    "$PY" -m misotts.bench.profile --model "${PROFILE_MODEL:-miso-8b}" --batch ${PROFILE_BATCHES:-1 64} --out "$RES"
  fi
}
quant_frames() {  # the frame with weight-only quantised linears next to the unquantised one, same run
  if [[ -n $DRY ]]; then
    "$PY" -m misotts.bench.profile --device cpu --model tiny --batch 2 --frames 1 --context 40 --weights int8 \
      --out "$RES"
  else
    "$PY" -m misotts.bench.profile --model "${PROFILE_MODEL:-miso-8b}" --batch 1 --frames 5 \
      --weights int8 --weights fp8 --weights int4 --out "$RES"
  fi
}
host_cost() {  # the loop's host cost per frame (CPU only); in the dry run tiny and short
  if [[ -n $DRY ]]; then
    "$PY" -m misotts.bench.host --model tiny --batch 1,2 --frames 20 --out "$RES/host.json"
  else
    "$PY" -m misotts.bench.host --model csm-1b --batch 1,8,64 --out "$RES/host.json"
  fi
}
export DRY PY PROFILE_MODEL PROFILE_BATCHES

# --- the steps, the most valuable first; shares in % of (BUDGET - RESERVE) ---
step cuda-kernels 14 "$PY" -m misotts.bench.pytest_step --run cuda -q tests/kernels
step cuda-engine 26 "$PY" -m misotts.bench.pytest_step --run cuda -q -s --ignore=tests/kernels
step bench-miso-8b 18 "${BENCH[@]}" --models miso-8b --systems engine "${DRY_PLAN[@]}"
step bench-csm-1b 14 "${BENCH[@]}" --models csm-1b --systems engine "${DRY_PLAN[@]}"
step kernels 10 kernel_bench
if [[ -f bench/profile.py ]]; then
  step profile 8 profiles
  step quant-frames 6 quant_frames
else
  note profile "not run: bench/profile.py is not in this tree yet"
fi
step host 3 host_cost
step peers-csm-1b 100 "${BENCH[@]}" --models csm-1b --systems reference,transformers "${PEER_PLAN[@]}" "${DRY_PLAN[@]}"
step peers-miso-8b 100 "${BENCH[@]}" --models miso-8b --systems reference,transformers "${PEER_PLAN[@]}" "${DRY_PLAN[@]}"
if [[ -n $DRY ]]; then  # the whole suite collects on a bare machine
  step pytest-cpu 100 "$PY" -m misotts.bench.pytest_step --run cpu --collect-only -q
else  # CPU_PYTHONPATH: packages for the interpreted run only (numpy < 2.4 under triton 3.6)
  step pytest-cpu 100 env PYTHONPATH="${CPU_PYTHONPATH:+$CPU_PYTHONPATH:}${PYTHONPATH:-}" \
    "$PY" -m misotts.bench.pytest_step --run cpu -v  # -v: each result printed as it comes, even if killed
fi

# --- the report, inside RESERVE ---
if compgen -G "$RES/part-*.json" > /dev/null; then
  timeout $((RESERVE / 2)) "$PY" -m misotts.bench.report "$RES" > "$RES/report.log" 2>&1
  code=$?
  verdict="FAILED (exit $code)"
  ((code == 0)) && verdict=passed
  say "== report: $verdict ($(wc -l < "$RES/report.log") lines in report.log)"
else
  note report "no benchmark parts to report"
fi
suite_end
