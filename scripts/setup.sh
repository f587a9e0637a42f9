#!/usr/bin/env bash
# Install what the build needs and is not on a fresh machine: the NVSHMEM 3.4.5 wheel (headers, host library,
# device library), and setuptools and wheel for the Python package's build. Each step does nothing when what it
# installs is already there (as on machines without network access). Says where NVSHMEM is.
#   PYTHON=python3 scripts/setup.sh
set -euo pipefail
PYTHON=${PYTHON:-python3}
scripts=$(cd "$(dirname "$0")" && pwd)
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }

# NVSHMEM counts as installed where its header and libraries are (scripts/find_nvshmem.py), not where an empty
# `nvidia/nvshmem` folder is left from an earlier install.
if ! nvshmem=$("$PYTHON" "$scripts/find_nvshmem.py" 2> /dev/null); then
  pip_install "nvidia-nvshmem-cu13==3.4.5"
  nvshmem=$("$PYTHON" "$scripts/find_nvshmem.py") || {
    echo "setup: pip installed nvidia-nvshmem-cu13==3.4.5, but NVSHMEM is still incomplete (above)" >&2; exit 1; }
  echo "setup: installed nvidia-nvshmem-cu13==3.4.5 in $nvshmem"
fi
# setuptools and wheel: `pip install --no-build-isolation .` and tests/install/test_pip_install.sh build with them.
if ! "$PYTHON" -c "import setuptools, wheel" 2> /dev/null; then
  pip_install setuptools wheel
  echo "setup: installed setuptools and wheel for $PYTHON"
fi
echo "NVSHMEM: $nvshmem"  # the folder the Makefile builds with (NVSHMEM_HOME)
command -v nvcc > /dev/null || [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]] || {
  echo "setup: nvcc not found: install the CUDA toolkit (13.0) or set CUDA_HOME" >&2; exit 1; }
