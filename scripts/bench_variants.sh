#!/usr/bin/env bash
# A/B tuning on one GPU machine: build the library once per variant (compile-time knobs through EXTRA_NVCCFLAGS,
# each in its own build directory) and run ep_bench on all GPUs for each, so every number comes from one machine.
#   scripts/bench_variants.sh 'name=FLAGS' ['name=FLAGS' ...] -- [ep_bench args]
# e.g. scripts/bench_variants.sh 'warp8=' 'push4=-DEP_COMBINE_PUSH_WARPS=4' -- --family intranode
#      scripts/bench_variants.sh 'base=' 'prof=-DEP_NORMAL_PROFILE=1' -- --family intranode --shapes 0,2 --sms 16,24
#      (a profile build: its per-phase lines are in the ranks' logs, variant-logs.tgz; bench/README.md, "Profile builds", says how to read them)
# Logs go to $OUT (or ./gpu-out); the rows of every variant are printed last.
set -uo pipefail
variants=()
while [[ $# -gt 0 && $1 != -- ]]; do variants+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
out=${OUT:-gpu-out}; mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
num_gpus=$(nvidia-smi -L | grep -c '^GPU')
for v in "${variants[@]}"; do
  name=${v%%=*} flags=${v#*=}
  make -j"$(nproc)" BUILD="build-$name" EXTRA_NVCCFLAGS="$flags" lib bench-build > "$out/build-$name.log" 2>&1 ||
    { echo "variant $name: build failed"; tail -20 "$out/build-$name.log"; continue; }
  "build-$name/bin/ep_launch" -n "$num_gpus" -t 300 -l "$out/logs-$name" -- "build-$name/bin/ep_bench" "$@" \
    > "$out/bench-$name.log" 2>&1
  echo "variant $name ($flags): exit $?"
done
(cd "$out" && tar czf variant-logs.tgz logs-* && rm -rf logs-*)  # one archive instead of many small files
for v in "${variants[@]}"; do
  name=${v%%=*}
  echo "== $name: ${v#*=}"
  grep -E "^(intranode|internode|ll|prepare|layout|ratio)" "$out/bench-$name.log" 2>/dev/null
done
