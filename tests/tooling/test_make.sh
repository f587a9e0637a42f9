#!/usr/bin/env bash
# test_make (CPU): what the Makefile promises a newcomer, checked with dry runs (`make -n`) and a machine without a
# GPU (an nvidia-smi on PATH that lists none), so that nothing is built:
# - `make test` ends with the test summary: make removes no intermediate file after it;
# - `make bench` stops before building when there is no GPU, and with a clear message when there is no NCCL;
# - without NCCL, `make all` still builds everything but the benchmark;
# - the C example builds from the public header and libep alone (not the GPU tests' harness);
# - no Makefile line is longer than 120 characters.
#   tests/tooling/test_make.sh BUILD_DIR
set -u
build=$(cd "${1:-build}" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd)
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
unset MAKEFLAGS MFLAGS MAKELEVEL  # when run under `make test`: this make is not a sub-make of that one
failed=0
check() { # description command...
  local what=$1; shift
  if "$@"; then echo "PASS $what"; else echo "FAIL $what"; failed=$((failed + 1)); fi
}
mk() { make --no-print-directory -C "$repo" "$@" 2>&1; }

# A machine without a GPU, one with a GPU (an nvidia-smi that lists one), and an NCCL that the Makefile finds (its
# files only need to exist for these checks).
mkdir -p "$stage/bin" "$stage/gpu" "$stage/nccl/include" "$stage/nccl/lib" "$stage/none"
printf '#!/bin/sh\nexit 6\n' > "$stage/bin/nvidia-smi"
printf '#!/bin/sh\necho "GPU 0: test GPU (UUID: GPU-0)"\n' > "$stage/gpu/nvidia-smi"
chmod +x "$stage/bin/nvidia-smi" "$stage/gpu/nvidia-smi"
touch "$stage/nccl/include/nccl.h" "$stage/nccl/lib/libnccl.so.2"
no_gpu=(env PATH="$stage/bin:$PATH")
one_gpu=(env PATH="$stage/gpu:$PATH")

# 1. As if a test's reference source had changed (-W): the objects it rebuilds are kept, so make prints nothing
#    after the test runner's summary.
ref_src=$(cd "$repo" && ls tests/ref/*.c | head -1)
out=$(mk -n -W "$ref_src" test BUILD="$build")
check "make -n test rebuilds the reference objects ($ref_src)" grep -q "obj/ref/" <<< "$out"
check "make test removes no intermediate file after the summary" test -z "$(grep '^rm ' <<< "$out")"
check "make test's last command is the test runner" grep -q "tests/run_tests.sh" <<< "$(tail -1 <<< "$out")"

# 2. make bench with no GPU: one message, before anything is built.
out=$(timeout 120 "${no_gpu[@]}" make --no-print-directory -C "$repo" bench BUILD="$stage/b1" \
        NCCL_HOME="$stage/nccl" 2>&1); rc=$?
check "make bench without a GPU fails (exit $rc)" test "$rc" -ne 0 -a "$rc" -ne 124
check "make bench without a GPU says so" grep -q "no GPU" <<< "$out"
check "make bench without a GPU builds nothing" test ! -e "$stage/b1"
[[ $failed -eq 0 ]] || echo "$out" | tail -5

# 3. make bench and make bench-build without NCCL: a message that says where NCCL comes from; no nvcc error.
for goal in bench bench-build; do
  out=$("${one_gpu[@]}" make --no-print-directory -C "$repo" -n -B "$goal" BUILD="$build" NCCL_HOME="$stage/none" 2>&1)
  rc=$?
  check "make $goal without NCCL fails (exit $rc)" test "$rc" -ne 0
  check "make $goal without NCCL names nvidia-nccl-cu13 and NCCL_HOME" \
    grep -q "nvidia-nccl-cu13.*NCCL_HOME\|NCCL_HOME.*nvidia-nccl-cu13" <<< "$out"
  check "make $goal without NCCL runs no nvcc" test -z "$(grep -E 'nvcc|Unknown option' <<< "$out")"
done
out=$(mk -n -B all BUILD="$build" NCCL_HOME="$stage/none"); rc=$?
check "make -n all without NCCL succeeds (exit $rc)" test "$rc" -eq 0
check "make all without NCCL still builds the library" grep -q -- "-o $build/lib/libep.so" <<< "$out"
check "make all without NCCL still builds the example" grep -q -- "-o $build/bin/example_dispatch_combine" <<< "$out"
check "make all without NCCL leaves out the benchmark" test -z "$(grep -E 'ep_bench|-lnccl|libnccl' <<< "$out")"
out=$(mk -n -B all BUILD="$build" NCCL_HOME="$stage/nccl")
check "make all with NCCL builds the benchmark" grep -q "ep_bench" <<< "$out"

# 4. The example is built from the public header and libep only.
out=$(mk -n -B "$build/bin/example_dispatch_combine" BUILD="$build" | grep -- "-o $build/bin/example_dispatch_combine")
check "the example's compile line has it" test -n "$out"
check "the example is built without the test harness or the tests' include path" \
  test -z "$(grep -E 'harness|-Itests' <<< "$out")"

# 5. Lines of at most 120 characters.
long=$(awk 'length > 120 { print FILENAME ":" FNR ": " length " characters" }' "$repo/Makefile")
check "no Makefile line over 120 characters" test -z "$long"
[[ -z $long ]] || echo "$long"

echo "test_make: $failed failed"
[[ $failed -eq 0 ]]
