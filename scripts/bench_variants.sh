#!/usr/bin/env bash
# A/B runs on one GPU machine: build the library once per variant and run ep_bench on all GPUs for each, so every
# number comes from one machine. A variant is compile-time knobs through EXTRA_NVCCFLAGS (`name=FLAGS`, built from
# this tree in build-NAME) or another source tree (`name@DIR`, built in DIR/build-bench; make one of a revision
# with `git archive REV | tar -x -C DIR`), e.g. to find which commit moved a row.
#   scripts/bench_variants.sh 'name=FLAGS' | 'name@DIR' ... -- [ep_bench args]
# e.g. scripts/bench_variants.sh 'warp8=' 'push4=-DEP_COMBINE_PUSH_WARPS=4' -- --family intranode
#      scripts/bench_variants.sh 'base=' 'prof=-DEP_NORMAL_PROFILE=1' -- --family intranode --shapes 0,2 --sms 16,24
#      (a profile build: its per-phase lines are in the ranks' logs, variant-logs.tgz; bench/README.md, "Profile builds", says how to read them)
#      ROUNDS=2 scripts/bench_variants.sh 'v010@../ep-0.1.0' 'head=' -- --family ll
# The variants build side by side (the cores shared out), then run in turn; ROUNDS=N (default 1) repeats the turn,
# so that a drift of the machine shows as a difference between rounds, not between variants. ARCHS, if set, applies
# to every build (ARCHS=90 builds faster on an H100 / H200). Logs go to $OUT (or ./gpu-out); the rows of every
# variant and round are printed last.
set -uo pipefail
variants=()
while [[ $# -gt 0 && $1 != -- ]]; do variants+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
out=${OUT:-gpu-out}; mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
num_gpus=$(nvidia-smi -L | grep -c '^GPU')
rounds=${ROUNDS:-1}
[[ ${#variants[@]} -gt 0 ]] || { echo "usage: scripts/bench_variants.sh 'name=FLAGS' | 'name@DIR' ... -- [ep_bench args]"; exit 2; }

name_of() { [[ $1 == *@* ]] && echo "${1%%@*}" || echo "${1%%=*}"; }
bin_of() { [[ $1 == *@* ]] && echo "${1#*@}/build-bench/bin" || echo "build-$(name_of "$1")/bin"; }
what_of() { [[ $1 == *@* ]] && echo "tree ${1#*@}" || echo "flags '${1#*=}'"; }

jobs=$(( $(nproc) / ${#variants[@]} > 1 ? $(nproc) / ${#variants[@]} : 1 ))
pids=()
for v in "${variants[@]}"; do
  name=$(name_of "$v")
  if [[ $v == *@* ]]; then
    make -C "${v#*@}" -j"$jobs" BUILD=build-bench lib bench-build > "$out/build-$name.log" 2>&1 &
  else
    make -j"$jobs" BUILD="build-$name" EXTRA_NVCCFLAGS="${v#*=}" lib bench-build > "$out/build-$name.log" 2>&1 &
  fi
  pids+=($!)
done
built=()
for i in "${!variants[@]}"; do
  v=${variants[$i]}; name=$(name_of "$v")
  if wait "${pids[$i]}"; then built+=("$v"); else echo "variant $name: build failed"; tail -20 "$out/build-$name.log"; fi
done

for ((r = 1; r <= rounds; ++r)); do
  for v in "${built[@]}"; do
    name=$(name_of "$v") bin=$(bin_of "$v")
    "$bin/ep_launch" -n "$num_gpus" -t 300 -l "$out/logs-$name-$r" -- "$bin/ep_bench" "$@" > "$out/bench-$name-$r.log" 2>&1
    echo "variant $name ($(what_of "$v")), round $r: exit $?"
  done
done
(cd "$out" && tar czf variant-logs.tgz logs-* && rm -rf logs-*)  # one archive instead of many small files
for v in "${built[@]}"; do
  for ((r = 1; r <= rounds; ++r)); do
    echo "== $(name_of "$v") ($(what_of "$v")), round $r"
    grep -E "^(intranode|internode|ll|prepare|layout|ratio)" "$out/bench-$(name_of "$v")-$r.log" 2>/dev/null
  done
done
