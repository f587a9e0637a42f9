#!/usr/bin/env bash
# test_gpu_skip (CPU): a GPU test started as one rank where no GPU is visible (CUDA_VISIBLE_DEVICES empty) skips
# (exit 77) with one message that says there is no GPU, on 1 rank as on 2.
#   tests/tooling/test_gpu_skip.sh BUILD_DIR
set -u
build=$(cd "${1:-build}" && pwd)
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
failed=0
check() { # description command...
  local what=$1; shift
  if "$@"; then echo "PASS $what"; else echo "FAIL $what"; failed=$((failed + 1)); fi
}
prog=$(ls "$build"/tests/gpu/test_* 2> /dev/null | head -1)
if [[ -z $prog ]]; then echo "SKIP test_gpu_skip: no GPU test program in $build/tests/gpu"; exit 77; fi

for n in 1 2; do
  out=$(CUDA_VISIBLE_DEVICES= EP_LAUNCH_RANK=0 EP_LAUNCH_NUM_RANKS=$n EP_LAUNCH_DIR="$stage" timeout 60 "$prog" 2>&1)
  rc=$?
  check "$(basename "$prog") on rank 0 of $n with no GPU visible skips (exit $rc)" test "$rc" -eq 77
  check "it prints one line" test "$(wc -l <<< "$out")" -eq 1
  check "the line says that no GPU is visible: $out" grep -q "^SKIP: no GPU" <<< "$out"
done

echo "test_gpu_skip: $failed failed"
[[ $failed -eq 0 ]]
