#!/usr/bin/env bash
# test_run_tests (CPU): on a machine without a GPU (an nvidia-smi on PATH that lists none), the GPU section of
# tests/run_tests.sh runs nothing and counts every run it would have made as skipped (each C GPU test and C
# example, and each *_gpu.py script, once per rank count), says why in one line, and ends with the summary;
# EP_TEST_ONLY narrows the count to the programs and scripts it names.
#   tests/tooling/test_run_tests.sh BUILD_DIR
set -u
build=$(cd "${1:-build}" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd)
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
failed=0
check() { # description command...
  local what=$1; shift
  if "$@"; then echo "PASS $what"; else echo "FAIL $what"; failed=$((failed + 1)); fi
}
mkdir -p "$stage/bin"
printf '#!/bin/sh\nexit 6\n' > "$stage/bin/nvidia-smi"; chmod +x "$stage/bin/nvidia-smi"

programs=0
for t in "$build"/tests/gpu/test_* "$build"/bin/example_*; do [[ -x $t ]] && programs=$((programs + 1)); done
scripts=$(find "$repo/tests/python" -maxdepth 1 -name 'test_*_gpu.py' | wc -l)
check "there are GPU programs and scripts to count ($programs, $scripts)" test "$programs" -gt 0 -a "$scripts" -gt 0

out=$(env PATH="$stage/bin:$PATH" EP_TEST_RANKS="2 4" EP_TEST_SHARE_GPU=0 bash "$repo/tests/run_tests.sh" "$build" gpu \
        2>&1); rc=$?
expected=$((2 * (programs + scripts)))
check "the GPU section passes without a GPU (exit $rc)" test "$rc" -eq 0
check "its last line is '0 passed, 0 failed, $expected skipped'" \
  test "$(tail -1 <<< "$out")" = "0 passed, 0 failed, $expected skipped"
check "one line says why" test "$(grep -c "no GPU" <<< "$out")" -eq 1
check "nothing ran" test -z "$(grep -E '^(PASS|FAIL)' <<< "$out")"
[[ $failed -eq 0 ]] || echo "$out"

# EP_TEST_ONLY picks programs and scripts by name: one of each, on 2 rank counts; a name of no test fails.
only() { env PATH="$stage/bin:$PATH" EP_TEST_RANKS="2 4" EP_TEST_SHARE_GPU=0 EP_TEST_ONLY="$1" \
           bash "$repo/tests/run_tests.sh" "$build" gpu 2>&1; }
out=$(only "test_intranode test_buffer_gpu")
check "EP_TEST_ONLY=\"test_intranode test_buffer_gpu\" counts 4 runs" \
  test "$(tail -1 <<< "$out")" = "0 passed, 0 failed, 4 skipped"
out=$(only "test_intranode test_intranod")
check "EP_TEST_ONLY with a name of no test: that name fails" \
  test "$(tail -1 <<< "$out")" = "0 passed, 1 failed, 2 skipped"

echo "test_run_tests: $failed failed"
[[ $failed -eq 0 ]]
