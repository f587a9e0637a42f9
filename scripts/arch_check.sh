#!/usr/bin/env bash
# On a machine with one Hopper GPU (H100 / H200): the library's architecture builds side by side, in one run.
#  - build        ARCHS="80 90 100" (the default; the GPU runs its sm_90 image),
#  - build-80on90 ARCHS=80-on-90: the kernels' compute_80 (Ampere) code compiled to this GPU's SASS,
#  - build-sm80   ARCHS=80, library and C example only: no image for this GPU, so group creation must refuse it
#                 with EP_STATUS_UNSUPPORTED naming the device (never "no kernel image").
# Then: the GPU tests at 1 rank on build and build-80on90, and on 2 ranks sharing the GPU (scripts/shared_gpu.sh)
# on build-80on90; the one-rank bench rows (layout, intranode, ll) of both, one after the other on the same card;
# the fp8_cast probe (the sm_80 software e4m3 cast against the instruction, all 2^32 inputs); the C example of
# build-sm80. Logs under $OUT/arch (or ./gpu-out/arch); a short summary last. `build` and `run` split the two
# halves over two calls on the same machine (the build folders stay); the default does both.
#   scripts/arch_check.sh [all|build|run]
set -uo pipefail
cd "$(dirname "$0")/.."
step=${1:-all}
out=${OUT:-gpu-out}/arch; mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
nvidia-smi -L > "$out/gpus.txt"
summary=()

# The three builds at once (a fresh machine has idle cores); each log says how long it took.
jobs=$(( $(nproc) / 3 > 1 ? $(nproc) / 3 : 1 ))
build() { # BUILD ARCHS GOALS...
  local dir=$1 archs=$2 start=$(date +%s); shift 2
  make -j"$jobs" BUILD="$dir" ARCHS="$archs" "$@" > "$out/build-$dir.log" 2>&1
  local rc=$?
  echo "build $dir (ARCHS=\"$archs\"): exit $rc, $(( $(date +%s) - start )) s" >> "$out/build-$dir.log"
  return $rc
}
if [[ $step != run ]]; then
  build build "80 90 100" all & p1=$!
  build build-80on90 "80-on-90" all & p2=$!
  build build-sm80 "80" lib build-sm80/bin/example_dispatch_combine & p3=$!
  for p in "$p1:build" "$p2:build-80on90" "$p3:build-sm80"; do
    wait "${p%%:*}" || tail -20 "$out/build-${p#*:}.log"
    summary+=("$(tail -1 "$out/build-${p#*:}.log")")
  done
  for b in build build-80on90 build-sm80; do
    [[ -f $b/lib/libep.so ]] || continue
    summary+=("$b: libep.so $(stat -L -c %s "$b/lib/libep.so") bytes, SASS: $(cuobjdump --list-elf "$b/lib/libep.so" |
      sed -n 's/.*\.\(sm_[0-9]*\)\.cubin$/\1/p' | sort -u | paste -sd' ')")
  done
fi
built() { [[ $step != build && -f $1/lib/libep.so && -f $1/bin/ep_launch ]]; }

# GPU tests (the C and Python GPU tests of tests/run_tests.sh; the CPU tests are CI's).
tests() { # BUILD RANKS [shared]
  local log=$out/tests-$1-n$2.log
  if [[ ${3:-} == shared ]]; then
    EP_TEST_RANKS=$2 EP_TEST_LOG_DIR="$out/test-logs-$1-n$2" scripts/shared_gpu.sh bash tests/run_tests.sh "$1" gpu \
      > "$log" 2>&1
  else
    EP_TEST_RANKS=$2 EP_TEST_LOG_DIR="$out/test-logs-$1-n$2" bash tests/run_tests.sh "$1" gpu > "$log" 2>&1
  fi
  grep -E "^(FAIL|SKIP)" "$log" | head -10
  summary+=("tests $1 at $2 rank(s)${3:+ sharing the GPU}: $(tail -1 "$log")")
}
built build && tests build 1
built build-80on90 && tests build-80on90 1 && tests build-80on90 2 shared

# Bench rows, default build then the Ampere code, same card.
for b in build build-80on90; do
  built "$b" && [[ -x $b/bin/ep_bench ]] || continue
  "$b/bin/ep_launch" -n 1 -t 300 -l "$out/bench-logs-$b" -- "$b/bin/ep_bench" --family layout,intranode,ll \
    > "$out/bench-$b.log" 2>&1
  summary+=("bench $b: exit $?")
done

# The e4m3 cast: the software rounding of sm_80 code against the sm_90 instruction, every input.
if built build && [[ -x build/bin/fp8_cast ]]; then
  build/bin/fp8_cast > "$out/fp8_cast.log" 2>&1
  summary+=("fp8_cast (exit $?): $(tail -1 "$out/fp8_cast.log")")
fi

# A build without this GPU's image: group creation must refuse it by name.
if [[ $step != build && -x build-sm80/bin/example_dispatch_combine && -x build/bin/ep_launch ]]; then
  build/bin/ep_launch -n 1 -t 120 -l "$out/sm80-logs" -- build-sm80/bin/example_dispatch_combine \
    > "$out/sm80-example.log" 2>&1
  rc=$?
  summary+=("ARCHS=80 on this GPU (exit $rc, want non-zero): $(grep -m1 -o 'ep_group_create.*' "$out/sm80-example.log" \
    "$out"/sm80-logs/* 2> /dev/null | head -1 | cut -c1-300)")
fi

echo "== $(head -1 "$out/gpus.txt")"
for b in build build-80on90; do
  [[ -f $out/bench-$b.log ]] || continue
  echo "-- bench $b"; grep -v "^-----" "$out/bench-$b.log" | grep -E "^ *(family|layout|intranode|ll)" | head -20
done
for s in "${summary[@]}"; do echo "$s"; done
