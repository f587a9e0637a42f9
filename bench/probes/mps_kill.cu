/* mps_kill: does SIGKILL of one CUDA process, while its kernel runs, break another process on the same GPU that
 * shares nothing with it? The fault tests kill ranks; on one GPU the ranks are clients of one CUDA MPS server, and
 * the answer decides whether a survivor's error there is the library's or the server's.
 *
 *   scripts/shared_gpu.sh build/bin/ep_launch -n 2 -k 1 -- build/bin/mps_kill    (with MPS)
 *   build/bin/ep_launch -n 2 -k 1 -- build/bin/mps_kill                           (without: time-sliced)
 *
 * Rank 1, the victim, launches a kernel that spins until told to stop and kills itself 200 ms later. Rank 0, the
 * bystander, waits for the death (the victim's file in the launch folder, then 1 s), then runs a kernel that stores
 * 42. Last line (rank 0): `mps_kill: the bystander's kernel after the victim's death: <CUDA status>, value <v>`;
 * exit 0 when it ran cleanly. On one H100 (driver 580), under MPS: cudaErrorIllegalAddress, value 0; without MPS:
 * no error, value 42. */
#include <cuda_runtime.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#include "gpu/harness.h"

__global__ void spin(volatile int* stop) {
  while (*stop == 0) {
  }
}

__global__ void store_42(int* out) { *out = 42; }

int main() {
  harness_t h;
  int rc = harness_init(&h);
  if (!rc) rc = harness_need_ranks(&h, 2);
  if (rc) return rc;
  int* word = NULL;
  if (cudaMalloc(&word, sizeof(int)) != cudaSuccess || cudaMemset(word, 0, sizeof(int)) != cudaSuccess ||
      cudaDeviceSynchronize() != cudaSuccess) {
    printf("mps_kill: rank %d could not set up its device word\n", h.rank);
    return 1;
  }
  harness_barrier(&h, "ready");
  if (h.rank == 1) {
    spin<<<4, 32>>>(word);
    usleep(200000);
    printf("mps_kill: rank 1 dies with its kernel in flight (launch: %s)\n", cudaGetErrorString(cudaGetLastError()));
  }
  harness_barrier(&h, "dying");
  if (h.rank == 1) raise(SIGKILL);
  if (h.rank != 0) return 0;
  sleep(1);
  store_42<<<1, 1>>>(word);
  const cudaError_t status = cudaDeviceSynchronize();
  int value = 0;
  cudaMemcpy(&value, word, sizeof(int), cudaMemcpyDeviceToHost);
  printf("mps_kill: the bystander's kernel after the victim's death: %s, value %d\n", cudaGetErrorString(status),
         value);
  return status == cudaSuccess && value == 42 ? 0 : 1;
}
