#!/usr/bin/env bash
# Set up (or refresh) the project on a fresh machine: a virtual environment with the pinned CPU
# build of torch and everything the library, the trainer and the tests use, the Fashion-MNIST
# files (Debian package, offline), and the compiled extension adello_kernels._C.
#   bash .ci/setup.sh            # then use .venv/bin/python
# Idempotent: a second run only rebuilds the extension when a C++ source changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ADELLO_VENV:-.venv}
PY=$VENV/bin/python

[ -x "$PY" ] || python3 -m venv "$VENV"
# torch==2.13.0 is the CPU build (local wheel); an unpinned torch would pull a multi-GB CUDA build.
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
# The extras of pyproject.toml (train, test, triton) and the build/lint tools, pinned where it matters.
"$PY" -m pip install -q --disable-pip-version-check "triton==3.7.1" numpy ninja pyyaml tqdm \
    matplotlib torchmetrics pillow pytest pytest-benchmark "cmake>=3.26" "setuptools>=77" wheel \
    ruff

# Fashion-MNIST idx files for the default training run (Debian: dataset-fashion-mnist).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 ||
      echo "setup: could not install dataset-fashion-mnist; pass --data-root to the trainer"
  else
    echo "setup: run 'sudo apt-get install dataset-fashion-mnist' for the default training run"
  fi
fi

# Build adello_kernels._C in place (editable install). setup.py compiles against the venv's torch
# either way; --no-build-isolation also skips the isolated environment (setuptools, wheel), so a
# rebuild needs no network.
so=$(ls adello_kernels/_C*.so 2>/dev/null | head -n1 || true)
if [ -z "$so" ] || [ -n "$(find csrc python setup.py -newer "$so" -type f 2>/dev/null | head -n1)" ]; then
  MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --disable-pip-version-check \
      --no-build-isolation --no-deps -e .
fi
"$PY" -c "import adello_kernels as ak; print('adello_kernels backends:', ak.available_backends())"
