#!/usr/bin/env bash
# Run tests/gpu/test_masking.c in its eleven modes: hand (every rank masks the last one by hand: LL and normal path),
# dispatch-death and combine-death (the last rank dies by SIGKILL before an LL dispatch / combine; the survivors mask
# it and go on), normal-dispatch-death and normal-combine-death (the same before an intranode normal dispatch /
# combine), normal-partition-death (rank 1 exchanges nothing with the dying rank, rank 0 does: no survivor may mask
# another), no-mask-death (the same death without the mask: the fatal fault), and internode-hand,
# internode-hand-rounds, internode-dispatch-death, internode-combine-death (the hand mask, the hand mask with calls in
# rounds, and the two normal deaths on the internode path: two virtual nodes of EP_MASK_RANKS / 2 ranks). A death
# mode passes the dying rank to ep_launch -k, so that its death is the injected fault and the survivors finish.
#   tests/gpu/masking.sh [BUILD_DIR]       e.g. scripts/shared_gpu.sh env EP_MASK_RANKS=4 tests/gpu/masking.sh build
# Environment: EP_MASK_RANKS (default 4; at least 2; normal-partition-death needs 3, the internode modes an even
# count), EP_MASK_MODES (default all eleven, space-separated), EP_MASK_LOG_DIR (default BUILD_DIR/masking-logs). Prints
# every survivor's "masking ..." lines and one verdict per mode; exits 0 when all pass.
set -u
build=${1:-build}
prog=$build/tests/gpu/test_masking
launch=$build/bin/ep_launch
for f in "$prog" "$launch"; do
  [[ -x $f ]] || { echo "masking: $f is missing (make -j tests)" >&2; exit 2; }
done
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none} NVSHMEM_DISABLE_NVLS=1
n=${EP_MASK_RANKS:-4}
logs=${EP_MASK_LOG_DIR:-$build/masking-logs}
share=()
num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[[ $n -gt ${num_gpus:-0} && ${EP_TEST_SHARE_GPU:-0} != 0 ]] &&
  share=(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${CUDA_MPS_ACTIVE_THREAD_PERCENTAGE:-$((100 * ${num_gpus:-1} / n))})
bad=0
all="hand dispatch-death no-mask-death normal-dispatch-death normal-combine-death normal-partition-death combine-death
  internode-hand internode-hand-rounds internode-dispatch-death internode-combine-death"
for mode in ${EP_MASK_MODES:-$all}; do
  [[ $mode == normal-partition-death && $n -lt 3 ]] && { echo "SKIP masking $mode@$n (3 ranks)"; continue; }
  [[ $mode == internode-* && $((n % 2)) -ne 0 ]] && { echo "SKIP masking $mode@$n (an even count)"; continue; }
  kill_arg=(); [[ $mode == *death ]] && kill_arg=(-k $((n - 1)))
  mkdir -p "$logs/$mode"
  out=$(env "${share[@]}" "$launch" -n "$n" -t 300 -q -l "$logs/$mode" "${kill_arg[@]}" -- "$prog" "$mode" 2>&1)
  rc=$?
  cat "$logs/$mode"/rank*.log 2>/dev/null | grep -E "^masking |seed" | sort -u
  if [[ $rc -eq 0 ]]; then echo "PASS masking $mode@$n"; else echo "$out"; echo "FAIL masking $mode@$n (rc $rc)"; bad=1; fi
done
exit $bad
