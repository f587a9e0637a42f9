#!/usr/bin/env bash
# test_pip_install (CPU): `pip wheel` of the repository builds a platform wheel that carries libep.so inside the
# package; installed into a folder of its own (no other copy of the package on the path, EP_LIBRARY_PATH unset),
# `import ep` loads that library and no other.
#   tests/install/test_pip_install.sh BUILD_DIR
set -u
build=$(cd "${1:-build}" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
if ! "$python" -c "import setuptools, wheel" 2> /dev/null; then
  echo "SKIP test_pip_install: $python lacks setuptools or wheel (scripts/setup.sh installs them)"; exit 77
fi
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
failed=0
check() { # description command...
  local what=$1; shift
  if "$@"; then echo "PASS $what"; else echo "FAIL $what"; failed=$((failed + 1)); fi
}

# --no-build-isolation: build with this Python's setuptools and NVSHMEM wheel (no registry needed); setup.py runs
# `make lib` in BUILD, which is already built here.
if ! BUILD=$build "$python" -m pip wheel --no-build-isolation --no-deps --disable-pip-version-check -w "$stage/dist" \
     "$repo" > "$stage/wheel.log" 2>&1; then
  cat "$stage/wheel.log"; echo "FAIL pip wheel"; exit 1
fi
wheel=$(ls "$stage"/dist/ep-*.whl)
check "one wheel is built" test "$(echo "$wheel" | wc -l)" = 1
check "the wheel is tagged for a platform, not none-any" test "${wheel%-none-any.whl}" = "$wheel"
check "the wheel holds ep/_lib/libep.so and the package" "$python" - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
sys.exit(0 if {"ep/_lib/libep.so", "ep/__init__.py", "ep/_capi.py", "ep/buffer.py", "ep/autograd.py"} <= names else 1)
PY
check "the build left no egg-info in the tree (setuptools' files go under BUILD)" \
  test -z "$(find "$repo" "$repo/python" -maxdepth 1 -name '*.egg-info')"

if ! "$python" -m pip install --no-deps --disable-pip-version-check -q --target "$stage/site" "$wheel" \
     > "$stage/install.log" 2>&1; then
  cat "$stage/install.log"; echo "FAIL pip install --target"; exit 1
fi
out=$(cd "$stage" && env -u EP_LIBRARY_PATH PYTHONPATH="$stage/site" "$python" -c '
import ep
from ep import _capi
_capi.load()
print(ep.__file__); print(_capi.library_path()); print(_capi.status_name(_capi.EP_STATUS_TIMEOUT))' 2>&1)
check "the installed package is the one imported" test "$(sed -n 1p <<< "$out")" = "$stage/site/ep/__init__.py"
check "it loads the library inside the package" test "$(sed -n 2p <<< "$out")" = "$stage/site/ep/_lib/libep.so"
check "the library answers" test "$(sed -n 3p <<< "$out")" = "EP_STATUS_TIMEOUT"
[[ $failed -eq 0 ]] || echo "$out"
echo "test_pip_install: $failed failed"
[[ $failed -eq 0 ]]
