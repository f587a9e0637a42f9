#!/usr/bin/env bash
# test_pyflakes (CPU): pyflakes finds nothing (unused imports and names, undefined names, ...) in the Python files
# of python/, tests/, bench/ and examples/. Skips where pyflakes is not installed (.ci/run installs it).
#   tests/lint/test_pyflakes.sh BUILD_DIR
set -u
cd "$(dirname "$0")/../.." || exit 1
python=${PYTHON:-python3}
"$python" -m pyflakes --version > /dev/null 2>&1 || { echo "SKIP test_pyflakes: pyflakes not found for $python" \
  "(pip install pyflakes)"; exit 77; }
mapfile -t files < <(find python tests bench examples -name '*.py' -not -path '*/__pycache__/*' | sort)
if out=$("$python" -m pyflakes "${files[@]}" 2>&1); then
  echo "PASS pyflakes finds nothing in ${#files[@]} Python files"
else
  echo "$out"
  echo "FAIL pyflakes (above)"
  exit 1
fi
