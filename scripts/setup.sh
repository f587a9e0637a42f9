#!/usr/bin/env bash
# Install what the build needs and is not on a fresh machine: the NVSHMEM 3.4.5 wheel (headers, host library,
# device library), and setuptools and wheel for the Python package's build. Each step does nothing when its package
# is already importable (as on the GPU machines, which have no network).
set -euo pipefail
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import nvidia.nvshmem" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "nvidia-nvshmem-cu13==3.4.5"
fi
# setuptools and wheel: `pip install --no-build-isolation .` and tests/install/test_pip_install.sh build with them.
if ! "$PYTHON" -c "import setuptools, wheel" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore setuptools wheel
fi
"$PYTHON" -c "import nvidia.nvshmem as m; print('NVSHMEM:', list(m.__path__)[0])"
command -v nvcc >/dev/null || [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]] || {
  echo "setup: nvcc not found: install the CUDA toolkit (13.0) or set CUDA_HOME" >&2; exit 1; }
