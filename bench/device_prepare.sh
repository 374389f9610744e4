#!/usr/bin/env bash
# Here, before each device call: bash bench/device_prepare.sh
#
# Fills .device/ (git-ignored; the device call carries it): the wheels that the GPU machine's image
# lacks (downloaded once, for its Python), and code.env, the commit this tree is at and whether it
# has uncommitted changes (the copy sent there has no .git; bench/provenance.py reads these).
#   .device/wheels/      misotts' own needs: moshi (Mimi) and runtime/audio.py's soundfile and soxr
#   .device/wheels-cpu/  numpy < 2.4 for the interpreted CPU test run only (triton 3.6's interpreter
#                        fails on numpy >= 2.4; the CUDA steps keep the image's numpy)
# DEVICE_PYTHON (default 3.12) is the device image's Python (KINDS.md: 3.12.3, torch 2.11, triton 3.6).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
WHEELS=(moshi==0.2.13 soundfile==0.14.0 cffi==2.0.0 pycparser==3.12 soxr==1.1.0)
CPU_WHEELS=(numpy==2.3.5)

fetch() {  # fetch FOLDER SPEC...: binary wheels for the device's Python and platform, no dependencies
  local folder=$1
  shift
  mkdir -p "$folder"
  local spec missing=()
  for spec in "$@"; do  # only what is not there yet: no network once the folder is full
    compgen -G "$folder/${spec%%==*}-${spec#*==}-*.whl" > /dev/null || missing+=("$spec")
  done
  ((${#missing[@]})) || return 0
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$folder" "${missing[@]}"
}

fetch .device/wheels "${WHEELS[@]}"
fetch .device/wheels-cpu "${CPU_WHEELS[@]}"
dirty=0
[[ -z $(git status --porcelain --untracked-files=no) ]] || dirty=1
printf 'MISOTTS_GIT_COMMIT=%s\nMISOTTS_GIT_DIRTY=%s\n' "$(git rev-parse HEAD)" "$dirty" > .device/code.env
echo "device carry ready: $(du -sh .device | cut -f1) in .device/ ($(ls .device/wheels .device/wheels-cpu | grep -c whl) wheels);" \
  "commit $(git rev-parse --short HEAD)$( ((dirty)) && echo ' + uncommitted changes')"
