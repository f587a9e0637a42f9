#!/usr/bin/env bash
# test_arch_build (CPU): libep.so holds one SASS image per word of the ARCHS it was built with (BUILD/obj/archs;
# the default is sm_80, sm_90 and sm_100), NVSHMEM's device code included (its symbols are in every image), and no
# other; the Makefile turns N-on-M into compute_N code for sm_M, and refuses an architecture it does not know
# before building anything. Skips with one line without cuobjdump.
#   tests/tooling/test_arch_build.sh BUILD_DIR
set -u
build=$(cd "${1:-build}" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd)
unset MAKEFLAGS MFLAGS MAKELEVEL
failed=0
check() { # description command...
  local what=$1; shift
  if "$@"; then echo "PASS $what"; else echo "FAIL $what"; failed=$((failed + 1)); fi
}
cuobjdump=$(command -v cuobjdump || ls "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" 2> /dev/null)
if [[ -z $cuobjdump ]]; then echo "SKIP test_arch_build: no cuobjdump on PATH or in CUDA_HOME/bin"; exit 77; fi
lib=$build/lib/libep.so
if [[ ! -f $lib || ! -f $build/obj/archs ]]; then echo "SKIP test_arch_build: no $lib built"; exit 77; fi

# 1. The images: sm_M for each word N or N-on-M of the build's ARCHS.
archs=$(cat "$build/obj/archs")
want=$(for a in $archs; do echo "sm_${a##*-on-}"; done | sort -u | paste -sd' ')
have=$("$cuobjdump" --list-elf "$lib" | sed -n 's/.*\.\(sm_[0-9a-z]*\)\.cubin$/\1/p' | sort -u | paste -sd' ')
check "libep.so of ARCHS=\"$archs\" holds SASS for exactly: $want (has: $have)" test "$have" == "$want"
# NVSHMEM's device library joined every image in the device link.
for sm in $want; do
  n=$("$cuobjdump" --gpu-architecture "$sm" --dump-elf-symbols "$lib" 2> /dev/null | grep -c 'nvshmemi_device_state')
  check "the $sm image holds NVSHMEM's device state ($n symbols)" test "$n" -gt 0
done

# 2. The Makefile's reading of ARCHS (dry runs: nothing is built).
out=$(make --no-print-directory -C "$repo" -n -B lib BUILD="$build/archs-dry" ARCHS="80-on-90 100" 2>&1)
check "ARCHS=\"80-on-90 100\" compiles compute_80 to sm_90 and compute_100 to sm_100" \
  grep -q -- "-gencode arch=compute_80,code=sm_90 -gencode arch=compute_100,code=sm_100 .*-rdc" <<< "$out"
check "the device link gets the same images" \
  grep -q -- "-gencode arch=compute_80,code=sm_90 -gencode arch=compute_100,code=sm_100 -dlink" <<< "$out"
check "the check at group creation is told the SASS images" grep -q -- "-DEP_SASS_ARCHS='\"90 100\"'" <<< "$out"
out=$(make --no-print-directory -C "$repo" -n -B lib BUILD="$build/archs-dry" ARCHS="80 75" 2>&1); rc=$?
check "ARCHS=\"80 75\" is refused (exit $rc) naming the choices" \
  test "$rc" -ne 0 -a -n "$(grep 'ARCHS="80 75".*80 86' <<< "$out")"
out=$(make --no-print-directory -C "$repo" -n -B lib BUILD="$build/archs-dry" ARCHS="80-ptx" 2>&1); rc=$?
check "ARCHS=80-ptx is refused (exit $rc), pointing to 80-on-90" \
  test "$rc" -ne 0 -a -n "$(grep 'PTX.*80-on-90' <<< "$out")"
check "nothing was built by the dry runs" test ! -e "$build/archs-dry"

echo "test_arch_build: $failed failed"
[[ $failed -eq 0 ]]
