#!/usr/bin/env bash
# Run every test this machine can run and end with one line: `N passed, N failed, N skipped`.
#   tests/run_tests.sh BUILD_DIR [host|gpu|all]
# Host tests: each program in BUILD/tests/host; the install tests (tests/install: `make install` with pkg-config,
# the pip wheel), the tooling tests (tests/tooling: the Makefile, this script, scripts/setup.sh, the GPU tests'
# skips) and the lint checks (tests/lint: formatting of changed C/CUDA lines, pyflakes), each script
# `tests/DIR/test_*.sh BUILD`. GPU tests: each program in BUILD/tests/gpu, and the C examples in BUILD/bin/example_*,
# under ep_launch on 2, 4 and 8 ranks (EP_TEST_RANKS overrides the list); a run that needs more GPUs than exist is
# a skip. Without a GPU, every GPU run is counted as a skip, with one line that says why.
# Python tests (tests/python/test_*.py, run with $PYTHON or python3, package from python/, library from BUILD):
# the host section runs those whose name does not end in _gpu.py, the GPU section runs the *_gpu.py ones once per
# rank count (EP_TEST_WORLD; they start their own ranks). Each script run counts as one test.
# EP_TEST_SHARE_GPU=1 (set by scripts/shared_gpu.sh, which starts CUDA MPS) runs the GPU tests on more ranks than
# GPUs, ranks sharing GPUs (of the Python ones, those whose ranks start through tests/python/eptest.py);
# EP_TEST_TIMEOUT (default 300; 1200 with EP_TEST_LEVEL=full) bounds each C GPU test in seconds.
# EP_TEST_LEVEL: unset (the default level) runs, in every GPU test, at least one case of each region of the input
# space (mixed NVLink / put LL peers, repeated experts, top-k 1..32, any rank count, BF16 hidden a multiple of 8
# only, num_sms 1 / odd / above the device's, CUDA graphs, ranks without tokens); EP_TEST_LEVEL=full adds the long
# tail (4096-token and large-T cases, hidden 8192 and 16384, more shapes, more graph variants), several times
# longer. The tests run at any rank count from 1 to 8 (EP_TEST_RANKS="1 2 3 4 5 6 7 8" with scripts/shared_gpu.sh
# on one GPU); internode shapes need ranks_per_node to divide it, which the tests pick.
# EP_TEST_ONLY="NAME..." runs only the GPU programs and scripts of those names (e.g. "test_intranode
# test_buffer_gpu"; a name of no GPU test fails), so that a long level can be split over several runs.
set -u
build=${1:-build}
which=${2:-all}
pass=0; fail=0; skip=0; failed_names=()

record() { # name exit_code
  case $2 in
    0) pass=$((pass + 1)); echo "PASS $1" ;;
    77) skip=$((skip + 1)); echo "SKIP $1" ;;
    *) fail=$((fail + 1)); failed_names+=("$1"); echo "FAIL $1 (exit $2)" ;;
  esac
}

tests_dir=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
export PYTHONPATH="$(dirname "$tests_dir")/python${PYTHONPATH:+:$PYTHONPATH}"
[[ -f $build/lib/libep.so ]] && export EP_LIBRARY_PATH=${EP_LIBRARY_PATH:-$(cd "$build/lib" && pwd)/libep.so}
share=()  # extra environment of a GPU run: set by share_env
# Ranks that share GPUs under MPS (n > GPUs, EP_TEST_SHARE_GPU=1): each rank gets its share of the SMs, so that
# all ranks' kernels fit side by side. Sets share=() otherwise.
share_env() { # num_ranks
  share=()
  [[ $1 -gt $num_gpus && ${EP_TEST_SHARE_GPU:-0} != 0 ]] &&
    share=(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${CUDA_MPS_ACTIVE_THREAD_PERCENTAGE:-$((100 * num_gpus / $1))})
}
run_py() { # script timeout_seconds [log_file [name_suffix]]; runs with the environment in share
  local name="python/$(basename "$1")${4:-}" out rc
  if ! command -v "$python" > /dev/null; then
    skip=$((skip + 1)); echo "SKIP $name: $python not found"; return
  fi
  out=$(env "${share[@]}" timeout "$2" "$python" "$1" 2>&1); rc=$?
  [[ -n ${3:-} ]] && printf '%s\n' "$out" > "$3"
  [[ $rc -ne 0 && $rc -ne 77 ]] && echo "$out"
  record "$name" $rc
}

if [[ $which == all || $which == host ]]; then
  for t in "$build"/tests/host/test_*; do
    [[ -x $t ]] || continue
    out=$(ASAN_OPTIONS=detect_leaks=0 timeout 300 "$t" 2>&1); rc=$?
    [[ $rc -ne 0 && $rc -ne 77 ]] && echo "$out"
    record "host/$(basename "$t")" $rc
  done
  for t in "$tests_dir"/python/test_*.py; do
    [[ $t == *_gpu.py ]] || run_py "$t" 300
  done
  # Scripts that check the build, the install and the sources; a skip prints its reason (its last line).
  for t in "$tests_dir"/{install,tooling,lint}/test_*.sh; do
    [[ -f $t ]] || continue
    out=$(timeout 300 bash "$t" "$build" 2>&1); rc=$?
    [[ $rc -ne 0 ]] && echo "$out" | { [[ $rc -eq 77 ]] && tail -1 || cat; }
    record "$(basename "$(dirname "$t")")/$(basename "$t")" $rc
  done
fi

if [[ $which == all || $which == gpu ]]; then
  num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  rank_counts=${EP_TEST_RANKS:-2 4 8}
  only=${EP_TEST_ONLY:-}
  picked() { [[ -z $only || " $only " == *" $(basename "$1" .py) "* || " $only " == *" $(basename "$1") "* ]]; }
  programs=(); scripts=()
  for t in "$build"/tests/gpu/test_* "$build"/bin/example_*; do [[ -x $t ]] && picked "$t" && programs+=("$t"); done
  for t in "$tests_dir"/python/test_*_gpu.py; do [[ -f $t ]] && picked "$t" && scripts+=("$t"); done
  picked_names=" ${programs[*]##*/} ${scripts[*]##*/} "
  for name in $only; do  # a misspelt name fails rather than running nothing
    [[ $picked_names == *" $name "* || $picked_names == *" $name.py "* ]] ||
      { echo "EP_TEST_ONLY names $name, which is no GPU test"; record "EP_TEST_ONLY/$name" 1; }
  done
  if [[ ${num_gpus:-0} -eq 0 ]]; then
    runs=$(( (${#programs[@]} + ${#scripts[@]}) * $(wc -w <<< "$rank_counts") ))
    skip=$((skip + runs))
    echo "SKIP $runs GPU runs (${#programs[@]} programs and ${#scripts[@]} Python scripts on $rank_counts ranks):" \
      "no GPU on this machine (nvidia-smi lists none)"
  else
    export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none} NVSHMEM_DISABLE_NVLS=1
    logs=${EP_TEST_LOG_DIR:-$build/test-logs}
    default_timeout=300; [[ ${EP_TEST_LEVEL:-} == full ]] && default_timeout=1200
    for n in $rank_counts; do
      for t in "${programs[@]}"; do
        name="$(basename "$(dirname "$t")")/$(basename "$t")@$n"
        if [[ $n -gt $num_gpus && ${EP_TEST_SHARE_GPU:-0} == 0 ]]; then
          skip=$((skip + 1)); echo "SKIP $name: needs $n GPUs, this machine has $num_gpus"; continue
        fi
        share_env "$n"
        mkdir -p "$logs/$name"
        out=$(env "${share[@]}" "$build/bin/ep_launch" -n "$n" -t "${EP_TEST_TIMEOUT:-$default_timeout}" -q \
          -l "$logs/$name" -- \
          "$t" 2>&1)
        rc=$?
        [[ $rc -ne 0 && $rc -ne 77 ]] && echo "$out"
        record "$name" $rc
      done
    done
    mkdir -p "$logs/python"
    for n in $rank_counts; do
      share_env "$n"  # the tests skip when n > GPUs unless sharing (tests/python/eptest.py: gloo, rank % GPUs)
      for t in "${scripts[@]}"; do
        EP_TEST_WORLD=$n run_py "$t" 1200 "$logs/python/$(basename "$t" .py)@$n.log" "@$n"
      done
    done
  fi
fi

[[ $fail -gt 0 ]] && echo "failed: ${failed_names[*]}"
echo "$pass passed, $fail failed, $skip skipped"
[[ $fail -eq 0 ]]
