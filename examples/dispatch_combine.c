/* dispatch_combine.c: the smallest complete use of ep's C API.
 *
 * Every rank routes its tokens to random experts, dispatches them, applies an "expert" (here: the identity),
 * combines the results back and checks that each token came back multiplied by the number of ranks it visited.
 * Run it as one process per GPU under the launcher, which also shares the bootstrap bytes between the ranks:
 *
 *   make all && build/bin/ep_launch -n 2 -- build/bin/example_dispatch_combine
 *
 * Outside the launcher, pass the unique id from rank 0 to the others however you like (a file, a socket,
 * torch.distributed); see tests/gpu/harness.c for the file-based way used here. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "ep.h"
#include "gpu/harness.h"

#define TRY(call)                                                                                          \
  do {                                                                                                     \
    ep_status_t st_ = (call);                                                                              \
    if (st_ != EP_STATUS_SUCCESS) {                                                                        \
      fprintf(stderr, "%s failed: %s: %s\n", #call, ep_status_string(st_), ep_last_error(group));         \
      return 1;                                                                                            \
    }                                                                                                      \
  } while (0)

/* bf16 of a small integer (exact): the top 16 bits of the float. */
static uint16_t bf16_of(int v) {
  float f = (float)v;
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

int main(void) {
  enum { kTokens = 64, kHidden = 1024, kTopk = 4, kExperts = 16 };
  harness_t h;
  int rc = harness_init(&h);
  if (rc) return rc;
  ep_group_t group = NULL;

  /* 1. The group: collective, sized for the largest shape we will use. */
  ep_group_config_t config = EP_GROUP_CONFIG_INIT;
  config.num_experts = kExperts;
  config.hidden = kHidden;
  config.max_tokens_per_rank = kTokens;
  config.max_topk = kTopk;
  TRY(harness_group_create(&h, &config, &group));
  cudaStream_t stream;
  cudaStreamCreate(&stream);

  /* 2. Inputs: token t of rank r holds the value r + t % 8 in every channel; distinct random experts. */
  uint64_t seed = harness_seed(&h, "example") ^ (uint64_t)h.rank;
  int64_t idx[kTokens * kTopk];
  uint16_t* x = malloc(sizeof(uint16_t) * kTokens * kHidden);
  for (int t = 0; t < kTokens; ++t) {
    for (int k = 0; k < kTopk; ++k) {
      int64_t e;
      int dup;
      do {
        e = (int64_t)(harness_rand(&seed) % kExperts);
        dup = 0;
        for (int j = 0; j < k; ++j) dup |= idx[t * kTopk + j] == e;
      } while (dup);
      idx[t * kTopk + k] = e;
    }
    for (int c = 0; c < kHidden; ++c) x[t * kHidden + c] = bf16_of(h.rank + t % 8);
  }
  int64_t* d_idx;
  void *d_x, *d_out;
  cudaMalloc((void**)&d_idx, sizeof(idx));
  cudaMalloc(&d_x, sizeof(uint16_t) * kTokens * kHidden);
  cudaMalloc(&d_out, sizeof(uint16_t) * kTokens * kHidden);
  cudaMemcpy(d_idx, idx, sizeof(idx), cudaMemcpyHostToDevice);
  cudaMemcpy(d_x, x, sizeof(uint16_t) * kTokens * kHidden, cudaMemcpyHostToDevice);

  /* 3. Prepare (eager form): agree on the routing; learn how many rows this rank receives. */
  ep_handle_t handle;
  TRY(ep_handle_create(group, &handle));
  int num_recv = 0;
  ep_dispatch_prepare_args_t pa = EP_DISPATCH_PREPARE_ARGS_INIT;
  pa.topk_idx = d_idx;
  pa.num_tokens = kTokens;
  pa.num_topk = kTopk;
  pa.num_experts = kExperts;
  pa.num_recv_tokens = &num_recv;
  TRY(ep_dispatch_prepare(group, handle, &pa, stream));

  /* 4. Dispatch the rows; an identity "expert"; combine them back (fp32 sum in rank order). */
  void* d_recv;
  cudaMalloc(&d_recv, sizeof(uint16_t) * (size_t)(num_recv > 0 ? num_recv : 1) * kHidden);
  ep_dispatch_args_t da = EP_DISPATCH_ARGS_INIT;
  da.x = d_x;
  da.x_dtype = EP_BF16;
  da.hidden = kHidden;
  da.recv_capacity = num_recv;
  da.recv_x = d_recv;
  TRY(ep_dispatch(group, handle, &da, stream));
  ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
  ca.x = d_recv;
  ca.hidden = kHidden;
  ca.combined_x = d_out;
  TRY(ep_combine(group, handle, &ca, stream));
  cudaStreamSynchronize(stream);
  ep_status_t async_status;
  TRY(ep_get_async_error(group, &async_status));
  TRY(async_status);

  /* 5. Check: out[t] = x[t] * (number of ranks token t went to). */
  uint16_t* out = malloc(sizeof(uint16_t) * kTokens * kHidden);
  cudaMemcpy(out, d_out, sizeof(uint16_t) * kTokens * kHidden, cudaMemcpyDeviceToHost);
  int bad = 0;
  const int experts_per_rank = kExperts / h.num_ranks;
  for (int t = 0; t < kTokens; ++t) {
    int ranks = 0;
    for (int r = 0; r < h.num_ranks; ++r) {
      int hit = 0;
      for (int k = 0; k < kTopk; ++k) hit |= idx[t * kTopk + k] / experts_per_rank == r;
      ranks += hit;
    }
    bad += out[t * kHidden] != bf16_of((h.rank + t % 8) * ranks);
  }
  printf("rank %d: %d tokens out, %d rows received, %d wrong\n", h.rank, kTokens, num_recv, bad);

  ep_handle_destroy(handle);
  cudaFree(d_idx); cudaFree(d_x); cudaFree(d_out); cudaFree(d_recv);
  free(x); free(out);
  cudaStreamDestroy(stream);
  ep_group_destroy(group);
  return bad ? 1 : 0;
}
