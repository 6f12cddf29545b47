#!/usr/bin/env bash
# CUDA compile check, no GPU needed: builds adello_kernels._C against a CUDA build of torch
# (the whole extension: csrc/*.cpp, csrc/cpu, csrc/cuda; TORCH_CUDA_ARCH_LIST "8.0;9.0") in a
# second venv, out of tree, then imports it, checks that adello::flexda_fwd, adello::flexda_step
# and adello::scale_grads_ have C++ CUDA kernels, and runs tests/test_cuda_kernel.py (its build
# checks require a CUDA kernel for every adello:: op, the C++ one for those three, none a Python
# function; the GPU tests skip without a GPU).
#
#   tests/cuda_build_check.sh            # from anywhere; ~4-6 min cold on 2 cores, ~1 min warm
#
# Out of tree on purpose: an in-tree build would overwrite adello_kernels/_C*.so of the CPU venv.
# The sources are copied (mtimes kept) to $BUILD_DIR/src; ninja's objects persist in
# $BUILD_DIR/temp, so an unchanged source is not recompiled on the next run.
#
# Environment (defaults):
#   ADELLO_CUDA_VENV=<repo>/.venv-cuda   created with torch==2.14.1 (CUDA 13) if missing
#   ADELLO_CUDA_BUILD_DIR=/tmp/adello-cuda-build
#   CUDA_HOME=/usr/local/cuda  TORCH_CUDA_ARCH_LIST="8.0;9.0"  MAX_JOBS=1
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ADELLO_CUDA_VENV:-$ROOT/.venv-cuda}"
BUILD_DIR="${ADELLO_CUDA_BUILD_DIR:-/tmp/adello-cuda-build}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-1}"
export ADELLO_FORCE_CUDA=1   # fail loudly instead of silently building the CPU-only extension

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_build_check: no nvcc under CUDA_HOME=$CUDA_HOME" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "cuda_build_check: creating $VENV (torch==2.14.1, CUDA 13 build)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 numpy ninja pyyaml pytest
fi
PY="$VENV/bin/python"
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch in $VENV is not a CUDA build')"

# Fresh copy of the sources (tracked and untracked-but-not-ignored files), mtimes preserved.
rm -rf "$BUILD_DIR/src"
mkdir -p "$BUILD_DIR/src" "$BUILD_DIR/temp"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -co --exclude-standard -z \
    | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
    | tar --null -T - -cf -) | tar -xf - -C "$BUILD_DIR/src"
else
  tar -C "$ROOT" --exclude='./.venv*' --exclude=./.git --exclude=./build --exclude='*.so' \
    --exclude='*.egg-info' -cf - . | tar -xf - -C "$BUILD_DIR/src"
fi

cd "$BUILD_DIR/src"
echo "cuda_build_check: building in $BUILD_DIR/src (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
"$PY" setup.py -q build_ext --inplace --build-temp "$BUILD_DIR/temp"
echo "cuda_build_check: build took $(( $(date +%s) - start )) s"

export PYTHONPATH="$BUILD_DIR/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import os
import warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import adello_kernels
bad = [str(w.message) for w in caught if "_C" in str(w.message)]
assert not bad, f"adello_kernels fell back to the reference backend: {bad}"
from adello_kernels.ops import flexda
assert adello_kernels.__file__.startswith(os.getcwd()), adello_kernels.__file__
for op in ("flexda_fwd", "flexda_step", "scale_grads_"):
    assert flexda.has_kernel(op, "CUDA"), f"no CUDA kernel for adello::{op}"
    line = next((l for l in torch._C._dispatch_dump("adello::" + op).splitlines()
                 if l.startswith("CUDA:")), "")
    assert "csrc/cuda/" in line and "unboxed" in line, f"adello::{op}: CUDA kernel is {line!r}"
print(f"cuda_build_check: import ok (torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU available: {torch.cuda.is_available()})")
EOF
# the emulated-kernel tests already run in the main (CPU venv) pytest
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_kernel.py -k "not emulated"
