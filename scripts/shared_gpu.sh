#!/usr/bin/env bash
# Run a command with the GPUs shared between ranks: more ranks than GPUs, for correctness runs on a small machine.
#   scripts/shared_gpu.sh COMMAND [ARGS...]      e.g. scripts/shared_gpu.sh env EP_TEST_RANKS="2 4 8" make test
# Starts a private CUDA MPS control daemon (pipe and log folders under a fresh temporary folder; the GPU's compute
# mode is left as it is), so that the kernels of ranks on one GPU run side by side instead of time-sliced: ep's
# kernels wait for their peers, which would otherwise time out. Sets EP_TEST_SHARE_GPU=1 for the command
# (tests/gpu/harness.c then places rank r on GPU r % GPUs; tests/run_tests.sh gives each rank its share of the SMs
# through CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), stops the daemon when the command ends and exits with its status.
# Timings taken this way are not timings of the fabric: every "peer" is the same GPU's memory.
set -uo pipefail
if [[ $# -eq 0 ]]; then
  echo "usage: scripts/shared_gpu.sh COMMAND [ARGS...]" >&2; exit 2
fi
mps=$(command -v nvidia-cuda-mps-control || true)
if [[ -z $mps ]]; then
  echo "shared_gpu: nvidia-cuda-mps-control is not on PATH (it comes with the NVIDIA driver)" >&2; exit 1
fi
root=$(mktemp -d "${TMPDIR:-/tmp}/ep-mps.XXXXXX")
export CUDA_MPS_PIPE_DIRECTORY=$root/pipe CUDA_MPS_LOG_DIRECTORY=$root/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if ! "$mps" -d; then
  echo "shared_gpu: nvidia-cuda-mps-control -d failed; logs in $CUDA_MPS_LOG_DIRECTORY" >&2; exit 1
fi
stop_mps() {
  echo quit | "$mps" > /dev/null 2>&1
  for _ in $(seq 50); do pgrep -f "nvidia-cuda-mps-(control|server)" > /dev/null || break; sleep 0.1; done
}
trap stop_mps EXIT
for _ in $(seq 50); do [[ -S $CUDA_MPS_PIPE_DIRECTORY/control ]] && break; sleep 0.1; done
if [[ ! -S $CUDA_MPS_PIPE_DIRECTORY/control ]]; then
  echo "shared_gpu: the MPS control daemon did not open $CUDA_MPS_PIPE_DIRECTORY/control" >&2
  cat "$CUDA_MPS_LOG_DIRECTORY"/control.log >&2 2> /dev/null
  exit 1
fi
export EP_TEST_SHARE_GPU=1
"$@"
