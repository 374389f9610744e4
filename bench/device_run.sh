#!/usr/bin/env bash
# On a GPU machine with no network (the device tool's), as its one call:
#
#   bash bench/device_run.sh [--dry-run] [gpu_suite options]        (carry .device; $OUT comes back)
#
# installs the carried wheels (.device/, filled here by bench/device_prepare.sh) without network,
# makes misotts importable from the copied tree, names the commit it is (.device/code.env), and
# runs the GPU suite with its results in /tmp and $OUT kept to suite.log, the running step's log and
# gpu-suite.tgz (the whole results folder, renewed after each step).  --dry-run: the same on the CPU
# with what is installed here (the wheels are the device's Python's), as CI runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT: the folder to hand back (the device tool sets it)}"
PY=${PYTHON:-python3}
DRY=
[[ " $* " == *" --dry-run "* ]] && DRY=1

if [[ -z $DRY ]] && compgen -G ".device/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/misotts-site .device/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/misotts-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -z $DRY ]] && compgen -G ".device/wheels-cpu/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/misotts-site-cpu .device/wheels-cpu/*.whl \
    && export CPU_PYTHONPATH=/tmp/misotts-site-cpu
fi
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('misotts.engine') is None)" 2> /dev/null; then
  # misotts is not installed: link the tree's package layout
  "$PY" bench/device_layout.py || exit 1
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -f .device/code.env ]]; then
  set -a
  source .device/code.env
  set +a
fi
name=$("$PY" -c 'import torch; from misotts.bench.run import default_out
print(default_out(torch.device("cuda" if torch.cuda.is_available() else "cpu")).name)') || exit 1
exec bash bench/gpu_suite.sh --return "$OUT" "$@" "${TMPDIR:-/tmp}/gpu-suite-$$/$name"
