#!/usr/bin/env bash
# The GPU check: the one training loop on one GPU with AMP (tools/gpu_check.py), against CPU.
# Not part of CI. Run it from the project root:
#
#   tools/gpu-check.sh --fetch-wheels build/gpu-wheels
#       where PyPI is reachable: download the wheels the check needs beside torch and
#       torchaudio (CPython 3.12, manylinux x86_64; the versions this project's .venv runs),
#       print their total size, and fail if it is over 64 MiB.
#   tools/gpu-check.sh [--wheels DIR] [gpu_check.py options, e.g. --out FILE, --allow-cpu]
#       on the GPU machine (torch 2.11 + torchaudio 2.11 installed, no package index): the
#       Python packages it lacks are installed from DIR (default build/gpu-wheels) into a
#       folder on PYTHONPATH (pip --no-index --target, or plain unzip without pip), then the
#       check runs. $PYTHON picks the interpreter (default: python3 or python, whichever has torch).
#
# Exit status: gpu_check.py's (0 passed, 1 failed, 2 no GPU), or 3 for a setup problem.
set -euo pipefail
cd "$(dirname "$0")/.."
# what the check imports beside torch and torchaudio: "module:distribution:lowest version"
NEEDED=(numpy:numpy:1.26 pydantic:pydantic:2.6 yaml:pyyaml:5.1 jiwer:jiwer:3.0)
# exit 0 when module $1 imports and distribution $2 is at least version $3
PROBE='import importlib, importlib.metadata as m, sys
mod, dist, low = sys.argv[1:]
importlib.import_module(mod)
have = tuple(int(p) for p in m.version(dist).split(".")[:2] if p.isdigit())
sys.exit(have < tuple(int(p) for p in low.split(".")))'
LIMIT_BYTES=$((64 * 1024 * 1024))
die() { echo "gpu-check: $*" >&2; exit 3; }

fetch_wheels() {
  local dir=$1 py=.venv/bin/python reqs=() dist version
  [ -x "$py" ] || py=python3
  for pair in "${NEEDED[@]}"; do
    dist=${pair#*:}; dist=${dist%%:*}
    # pin to what the project's environment runs, so the check runs the tested versions
    version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist" 2>/dev/null || true)
    reqs+=("${dist}${version:+==$version}")
  done
  mkdir -p "$dir"
  echo ">> downloading ${reqs[*]} (and their dependencies) into $dir" >&2
  "$py" -m pip download --disable-pip-version-check -q --only-binary=:all: -d "$dir" \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${reqs[@]}"
  local total=0 size f
  for f in "$dir"/*.whl; do
    size=$(stat -c %s "$f"); total=$((total + size))
    printf '%10d  %s\n' "$size" "$(basename "$f")"
  done
  printf '%10d  total (%s MiB; limit 64 MiB)\n' "$total" "$(awk "BEGIN{printf \"%.1f\", $total/1048576}")"
  [ "$total" -le "$LIMIT_BYTES" ] || die "the wheels in $dir come to more than 64 MiB: remove what the check does not import"
}

install_missing() {
  local py=$1 wheels=$2 missing=() pair dist site
  for pair in "${NEEDED[@]}"; do
    dist=${pair#*:}; dist=${dist%%:*}
    IFS=: read -r -a probe_args <<<"$pair"
    "$py" -c "$PROBE" "${probe_args[@]}" 2>/dev/null || missing+=("$dist")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ -d "$wheels" ] || die "$py lacks ${missing[*]} and there is no wheel folder $wheels: run
  'tools/gpu-check.sh --fetch-wheels $wheels' where PyPI is reachable and carry that folder here"
  site=${TMPDIR:-/tmp}/asr-retune-gpu-site
  rm -rf "$site"
  echo ">> installing ${missing[*]} from $wheels into $site" >&2
  if "$py" -m pip --version >/dev/null 2>&1; then
    "$py" -m pip install --disable-pip-version-check -q --no-index --find-links "$wheels" --target "$site" \
      --no-warn-script-location "${missing[@]}" || die "pip could not install ${missing[*]} from $wheels"
  else  # no pip: a wheel is a zip laid out for site-packages
    "$py" -c "import sys, zipfile, glob; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob(sys.argv[2] + '/*.whl')]" \
      "$site" "$wheels"
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

if [ "${1:-}" = "--fetch-wheels" ]; then
  [ -n "${2:-}" ] || die "usage: tools/gpu-check.sh --fetch-wheels DIR"
  fetch_wheels "$2"
  exit 0
fi
WHEELS=build/gpu-wheels
if [ "${1:-}" = "--wheels" ]; then
  [ -n "${2:-}" ] || die "usage: tools/gpu-check.sh --wheels DIR [options]"
  WHEELS=$2; shift 2
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the first of python3, python that has torch
  for candidate in python3 python; do
    command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null && { PY=$candidate; break; }
  done
  PY=${PY:-python3}
fi
command -v "$PY" >/dev/null 2>&1 || die "no Python interpreter '$PY': set PYTHON"
"$PY" -c "import torch, torchaudio" 2>/dev/null || die "$PY cannot import torch and torchaudio (2.11): install them, or set PYTHON"
install_missing "$PY" "$WHEELS"
set +e
"$PY" tools/gpu_check.py "$@"
exit $?
