#!/usr/bin/env bash
# On a GPU machine: build, run the tests (GPU tests on every rank count the machine allows), run the benchmark,
# keep full logs under $OUT (or ./gpu-out), and print a short summary last. The bench step also runs
# bench/ll_kernel_time.py where PyTorch is installed.
#   scripts/gpu_run.sh [tests|bench|sanitize|faults|compat|all] [extra ep_bench args...]
# `sanitize` runs the small GPU cases under compute-sanitizer (memcheck; racecheck for the layout and LL kernels);
# EP_SANITIZE_RUNS picks runs ("TOOL:TEST ...", e.g. "memcheck:test_low_latency"), EP_SANITIZE_TIMEOUT (s, default
# 600) bounds each: memcheck slows the LL test past 150 s on one H100.
# `faults` runs the fault matrix at 2 and 4 ranks sharing the GPU (EP_FM_RANKS), the 1,000-iteration soak at 2 and
# the rank mask's modes at 4 (tests/gpu/masking.sh; docs/faults.md). `compat` runs DeepEP V1's test scripts
# (EP_DEEPEP_TESTS: their folder) and Megatron-Core's fused_a2a (EP_MEGATRON_WHEEL: a megatron-core wheel) on ep at
# 1 rank and 2 ranks sharing the GPU (tests/compat).
# EP_TEST_SHARE_GPU=1 on a machine of fewer than 8 GPUs: the tests step also runs the GPU tests on more ranks than
# GPUs, ranks sharing GPUs under CUDA MPS (correctness only; scripts/shared_gpu.sh). EP_TEST_RANKS overrides the
# rank counts of the tests step (e.g. "8", for a shorter run; "1 2 3 4 5 6 7 8" with EP_TEST_SHARE_GPU=1 on one GPU).
# EP_TEST_LEVEL=full runs the GPU tests' long tail too (tests/run_tests.sh says what it adds).
set -uo pipefail
what=${1:-all}; shift || true
out=${OUT:-gpu-out}; mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
num_gpus=$(nvidia-smi -L | grep -c '^GPU')
nvidia-smi -L > "$out/gpus.txt"
start=$(date +%s)
make -j"$(nproc)" lib tests > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; echo "BUILD FAILED"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
summary=()
if [[ $what == all || $what == tests ]]; then
  ranks=""; for n in 2 4 8; do [[ $n -le $num_gpus ]] && ranks="$ranks $n"; done
  share=()
  if [[ $num_gpus -lt 8 && ${EP_TEST_SHARE_GPU:-0} != 0 ]]; then
    # Ranks share the GPUs under MPS (scripts/shared_gpu.sh): the GPU tests also run on 2, 4 and 8 ranks here.
    ranks="2 4 8"; share=(scripts/shared_gpu.sh)
  fi
  ranks=${EP_TEST_RANKS:-$ranks}
  EP_TEST_RANKS="$ranks" EP_TEST_LOG_DIR="$out/test-logs" "${share[@]}" bash tests/run_tests.sh build all \
    > "$out/tests.log" 2>&1
  grep -E "^(FAIL|SKIP)" "$out/tests.log" | head -20
  summary+=("tests: $(tail -1 "$out/tests.log")")
  (cd "$out" && tar czf test-logs.tgz test-logs && rm -rf test-logs)
fi
if [[ $what == sanitize ]]; then
  # On 2 ranks (1 on a one-GPU machine: every peer is then this rank itself, and the internode test skips). API
  # errors are not counted: NCCL, inside NVSHMEM's init, probes kernel images that this GPU lacks (error 209).
  n=$(( num_gpus < 2 ? 1 : 2 ))
  runs=${EP_SANITIZE_RUNS:-memcheck:test_layout racecheck:test_layout memcheck:test_intranode \
memcheck:test_low_latency racecheck:test_low_latency memcheck:test_internode}
  for run in $runs; do
    set -- ${run/:/ }
    EP_TEST_SMALL=1 build/bin/ep_launch -n $n -t "${EP_SANITIZE_TIMEOUT:-600}" -q -l "$out/san-$2-$1" -- \
      compute-sanitizer --tool "$1" --report-api-errors no --error-exitcode 9 "build/tests/gpu/$2" \
      > "$out/san-$2-$1.log" 2>&1
    rc=$?; verdict="exit $rc"; [[ $rc -eq 77 ]] && verdict="skipped (exit 77: needs more ranks)"
    summary+=("compute-sanitizer $1 $2 (-n $n): $verdict")
    grep -m3 -E "ERROR SUMMARY|Invalid|Race|SKIP" "$out/san-$2-$1.log"
  done
fi
if [[ $what == faults ]]; then
  scripts/shared_gpu.sh env EP_FM_RANKS="${EP_FM_RANKS:-2 4}" tests/gpu/fault_matrix.sh build \
    > "$out/fault-matrix.log" 2>&1
  rc=$?; grep -A16 "^| call" "$out/fault-matrix.log"
  summary+=("fault matrix: exit $rc, $(grep -E 'cells not ok' "$out/fault-matrix.log" | tail -1)")
  scripts/shared_gpu.sh env CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 EP_SOAK_ITERS=1000 \
    build/bin/ep_launch -n 2 -t 600 -l "$out/soak-logs" -- build/tests/gpu/test_soak > "$out/soak.log" 2>&1
  summary+=("soak: exit $?, $(grep 'soak of' "$out/soak.log" | tail -1)")
  scripts/shared_gpu.sh env EP_MASK_RANKS=4 EP_MASK_LOG_DIR="$out/masking-logs" tests/gpu/masking.sh build \
    > "$out/masking.log" 2>&1
  rc=$?
  summary+=("masking at 4 ranks: exit $rc, $(grep -cE '^PASS' "$out/masking.log") modes passed, \
$(grep -cE '^FAIL' "$out/masking.log") failed")
fi
if [[ $what == compat ]]; then
  export PYTHONPATH="$PWD/python" EP_LIBRARY_PATH="$PWD/build/lib/libep.so"
  tests/compat/run_deepep_tests.sh 1 > "$out/deepep-tests.log" 2>&1
  summary+=("DeepEP's tests at 1 rank: exit $?"); grep -E "^(PASS|FAIL|SKIP)" "$out/deepep-tests.log"
  for n in 1 2; do
    EP_TEST_WORLD=$n scripts/shared_gpu.sh python3 tests/compat/megatron_fused_a2a.py > "$out/megatron-$n.log" 2>&1
    summary+=("Megatron-Core fused_a2a at $n rank(s): exit $?")
  done
fi
if [[ $what == all || $what == bench ]]; then
  make -j"$(nproc)" bench-build >> "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; echo "BENCH BUILD FAILED"; }
  build/bin/ep_launch -n "$num_gpus" -t 500 -l "$out/bench-logs" -- build/bin/ep_bench "$@" > "$out/bench.log" 2>&1
  summary+=("bench exit $?")
  cat "$out/bench.log" | grep -v "^-----" | tail -40
  # LL kernel time as DeepEP measures it (PyTorch profiler), when PyTorch is here (bench/README.md).
  if python3 -c "import torch" 2> /dev/null; then
    EP_LIBRARY_PATH="$PWD/build/lib/libep.so" timeout 300 python3 bench/ll_kernel_time.py \
      > "$out/ll_kernel_time.log" 2>&1
    summary+=("ll_kernel_time exit $?")
    grep -A12 "^ll kernel time" "$out/ll_kernel_time.log"
  fi
fi
echo "== $(head -1 "$out/gpus.txt") x$num_gpus"
for s in "${summary[@]}"; do echo "$s"; done
