#!/usr/bin/env bash
# USB check (CI step, no GPU needed): adello_kernels.integrations.usb inside Microsoft USB
# (semilearn 0.3.2), through USB's own train() loop, on the CPU (tests/usb_check.py says what
# it checks). Runs from the source tree (PYTHONPATH=<repo>) with the reference backend, so the
# venv needs no build of adello_kernels._C.
#
#   bash tests/usb_check.sh [VENV]     # VENV: default <repo>/.venv-cuda (tests/cuda_build_check.sh)
#
# VENV must have torch 2.14.1. Installed into it (a no-op when present): semilearn==0.3.2 and
# torchaudio==2.11.1 without their dependencies (semilearn pins old versions of everything),
# then semilearn's import-time dependencies (pinned to the versions this check was written
# against), with torch==2.14.1 and torchvision==0.29.1 pinned
# in the same pip call so that none of them replaces torch (torchvision is installed if
# missing). USB_CHECK_SKIP_INSTALL=1 skips the installation.
# Exits non-zero when the installation or the check fails; prints the time each part took.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-cuda}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "usb_check: no python in $VENV (create it with tests/cuda_build_check.sh, or pass a" \
       "venv with torch 2.14.1)" >&2
  exit 1
fi
"$PY" - <<'EOF'
import sys
import torch
v = torch.__version__.split("+")[0]
sys.exit(0 if v == "2.14.1" else f"usb_check: torch {torch.__version__} in {sys.prefix}, "
         "expected 2.14.1 (the pins below would replace it)")
EOF

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

t_all=$(now)
if [ "${USB_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  t=$(now)
  "$PY" -m pip install -q --disable-pip-version-check --no-deps semilearn==0.3.2 \
    torchaudio==2.11.1
  "$PY" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
    matplotlib==3.11.2 progress==1.6.1 ruamel.yaml==0.19.1 scikit-image==0.26.0 \
    scikit-learn==1.9.1 scipy==1.17.1 tensorboard==2.21.0 timm==1.0.31 transformers==5.24.0 \
    wandb==0.31.0 aim==3.29.1 tqdm==4.70.1
  echo "usb_check: install took $(since "$t") s"
fi

t=$(now)
rc=0
( cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" tests/usb_check.py ) || rc=$?
echo "usb_check: tests/usb_check.py took $(since "$t") s (exit $rc); whole step $(since "$t_all") s"
if [ "$rc" != 0 ]; then
  echo "usb_check: FAILED" >&2
fi
exit "$rc"
