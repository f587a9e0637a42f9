#!/usr/bin/env bash
# test_pip_install (CPU): `pip wheel` of the repository builds a platform wheel that carries libep.so inside the
# package; installed into a folder of its own (no other copy of the package on the path, EP_LIBRARY_PATH unset),
# `import ep` loads that library and no other. The library's RUNPATH leads from ep/_lib to NVIDIA's wheels in the
# same site-packages ($ORIGIN/../../nvidia/...) and names no folder of the build; with the NVSHMEM wheel there, the
# loader finds it through that RUNPATH alone.
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
check "the wheel holds ep/_lib/libep.so and every module of python/ep" "$python" - "$wheel" "$repo/python" <<'PY'
import glob, os, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
modules = {os.path.relpath(p, sys.argv[2]) for p in glob.glob(os.path.join(sys.argv[2], "ep", "**", "*.py"),
                                                               recursive=True)}
sys.exit(0 if {"ep/_lib/libep.so", "ep/__init__.py", "ep/_capi.py"} | modules <= names else 1)
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

lib=$stage/site/ep/_lib/libep.so
runpath=$(readelf -d "$lib" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]$/\1/p')
entries=$(tr : '\n' <<< "$runpath")
check "the RUNPATH leads to the NVSHMEM wheel: $runpath" grep -qx '$ORIGIN/../../nvidia/nvshmem/lib' <<< "$entries"
check "the RUNPATH leads to the CUDA runtime wheel" grep -qx '$ORIGIN/../../nvidia/cu13/lib' <<< "$entries"
nvshmem_home=$("$python" "$repo/scripts/find_nvshmem.py")
check "the RUNPATH names no folder of the build (repository, BUILD, the build's NVSHMEM)" \
  test -z "$(grep -E "^($repo|$build|$nvshmem_home)(/|\$)" <<< "$entries")"
ln -s "$(dirname "$nvshmem_home")" "$stage/site/nvidia"
check "with the NVSHMEM wheel beside ep, the loader finds it through the RUNPATH" \
  grep -q "libnvshmem_host.so.3 => $stage/site/ep/_lib/../../nvidia/nvshmem/lib/libnvshmem_host.so.3" <(ldd "$lib")
echo "test_pip_install: $failed failed"
[[ $failed -eq 0 ]]
