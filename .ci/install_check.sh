#!/usr/bin/env bash
# What a user does: a fresh virtual environment that already has torch, then a plain
# `pip install .` (pip's default build isolation) of a clean copy of this checkout. Checks that
# the extension was compiled against THAT torch (the isolated build must not pull a second one)
# and loads: imported from outside the source tree, without the trainer's packages installed and
# with no warning, the cpu backend is available. Then the same for `pip install -e .`, and that
# `pip install .` into an environment without torch stops with a message saying what to do.
#   bash .ci/install_check.sh          # log and timings on stdout; exit 0 when all checks pass
# Environment: INSTALL_CHECK_DIR (default build/install-check), TORCH_SPEC (default torch==2.13.0,
# the CPU build on this machine's disk), MAX_JOBS (default 2), INSTALL_CHECK_EDITABLE (default 1;
# 0 skips the editable install, a second full compile).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DIR=${INSTALL_CHECK_DIR:-$REPO/build/install-check}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export MAX_JOBS=${MAX_JOBS:-2}
PIP_FLAGS=(--disable-pip-version-check --no-input)
t0=$(date +%s)
stamp() { echo "== install-check [$(( $(date +%s) - t0 )) s] $*"; }

rm -rf "$DIR"
mkdir -p "$DIR/src" "$DIR/elsewhere"
# A clean copy of what a clone holds (tracked files and new, not ignored ones): no in-place
# extension, no build directory, nothing from the development venv.
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
     while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
     tar --null -T - -cf -) | tar -C "$DIR/src" -xf -
else
  tar -C "$REPO" --exclude='./.venv*' --exclude=./build --exclude='*.so' --exclude=./.git \
      -cf - . | tar -C "$DIR/src" -xf -
fi

# check_import VENV EXPECTED_PACKAGE_DIR: run from an empty directory, so that what is imported is
# what pip installed (or, for -e, the copy it points to), never this checkout.
check_import() {
  (cd "$DIR/elsewhere" && "$1/bin/python" - "$2" <<'EOF'
import importlib.util
import os
import sys
import warnings

import torch

with warnings.catch_warnings(record=True) as caught:  # e.g. "_C failed to load", "built against"
    warnings.simplefilter("always")
    import adello_kernels as ak
    from adello_kernels import _build_info
    backends = ak.available_backends()
ours = [str(w.message) for w in caught if "adello" in str(w.message)]
assert not ours, ours

expected = os.path.realpath(sys.argv[1])
where = os.path.dirname(os.path.realpath(ak.__file__))
assert where == expected, f"imported {where}, expected {expected}"
assert _build_info.TORCH_VERSION == torch.__version__, (_build_info.TORCH_VERSION, torch.__version__)
print(f"install-check: torch {torch.__version__}, built against {_build_info.TORCH_VERSION}, "
      f"backends {backends}, package {where}")
assert "cpu" in backends, backends
for mod in ("yaml", "tqdm", "matplotlib", "torchmetrics"):  # the `train` extra, not a dependency
    assert importlib.util.find_spec(mod) is None, f"{mod} was installed as a dependency"
EOF
  )
}

# pip_install VENV LOG ARGS...: pip install from the clean copy, the log kept under $DIR.
pip_install() {
  local py=$1/bin/python log=$DIR/$2
  shift 2
  (cd "$DIR/src" && "$py" -m pip install -v "${PIP_FLAGS[@]}" "$@") > "$log" 2>&1
}

stamp "fresh venv + $TORCH_SPEC"
python3 -m venv "$DIR/venv"
"$DIR/venv/bin/python" -m pip install -q "${PIP_FLAGS[@]}" "$TORCH_SPEC"
site=$("$DIR/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

stamp "pip install . (build isolation on, not editable)"
b0=$(date +%s)
pip_install "$DIR/venv" pip-install.log . || { tail -n 60 "$DIR/pip-install.log"; exit 1; }
grep -E "adello_kernels: building" "$DIR/pip-install.log" | sed 's/^ */  /' | sort -u
stamp "built and installed in $(( $(date +%s) - b0 )) s"
check_import "$DIR/venv" "$site/adello_kernels"

if [ "${INSTALL_CHECK_EDITABLE:-1}" != 0 ]; then
  stamp "pip install -e . (build isolation on, editable)"
  b0=$(date +%s)
  pip_install "$DIR/venv" pip-install-editable.log -e . ||
    { tail -n 60 "$DIR/pip-install-editable.log"; exit 1; }
  stamp "built and installed in $(( $(date +%s) - b0 )) s"
  check_import "$DIR/venv" "$DIR/src/adello_kernels"
fi

stamp "pip install . without torch must stop with instructions"
python3 -m venv "$DIR/venv-notorch"
if pip_install "$DIR/venv-notorch" pip-install-notorch.log --no-deps .; then
  echo "install-check: FAILED: pip install . succeeded in an environment without torch"; exit 1
fi
grep -q "Install torch into that environment first" "$DIR/pip-install-notorch.log" ||
  { tail -n 40 "$DIR/pip-install-notorch.log"; echo "install-check: FAILED: no instructions"; exit 1; }
grep -m1 "the target interpreter has none" "$DIR/pip-install-notorch.log" | sed 's/^ */  /'
stamp "ok"
