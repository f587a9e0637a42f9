/* test_layout: ep_get_dispatch_layout against the reference, on fresh random routings with the awkward cases:
 * -1 entries, a rank with zero tokens, all tokens to one rank, several experts of a token on one rank, top-k 1
 * to 9, real and virtual nodes; outputs poisoned before each run. Then a bad expert index must come back as
 * EP_STATUS_DEVICE_ERROR naming the token, and the group must work again afterwards. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "ref/ep_ref.h"

enum routing { ROUTING_RANDOM, ROUTING_ONE_RANK, ROUTING_SAME_RANK_EXPERTS };

/* Routing of `rank`: distinct random experts per token, ~10% -1 entries. */
static void make_routing(uint64_t* s, int num_tokens, int num_topk, int num_experts, int num_ranks, int mode,
                         int64_t* topk_idx) {
  int experts_per_rank = num_experts / num_ranks;
  for (int t = 0; t < num_tokens; ++t) {
    int64_t* row = topk_idx + (size_t)t * num_topk;
    for (int k = 0; k < num_topk; ++k) {
      int64_t e;
      int dup;
      do {
        if (mode == ROUTING_ONE_RANK) e = (int64_t)(harness_rand(s) % (uint64_t)experts_per_rank);
        else if (mode == ROUTING_SAME_RANK_EXPERTS)
          e = (int64_t)((t % num_ranks) * experts_per_rank + harness_rand(s) % (uint64_t)experts_per_rank);
        else e = (int64_t)(harness_rand(s) % (uint64_t)num_experts);
        dup = 0;
        for (int j = 0; j < k; ++j) dup |= row[j] == e;
      } while (dup && num_topk <= experts_per_rank);
      row[k] = e;
    }
    for (int k = 0; k < num_topk; ++k)
      if (harness_uniform(s) < 0.1) row[k] = -1;
  }
}

static int run_case(ep_group_t g, const harness_t* h, int rpn, uint64_t seed, int num_tokens, int num_topk,
                    int num_experts, int mode, cudaStream_t stream) {
  const int R = h->num_ranks, nodes = R / rpn;
  uint64_t s = seed ^ (uint64_t)h->rank * 0x9e37ull;
  int64_t* idx = malloc(sizeof(int64_t) * (size_t)(num_tokens * num_topk + 1));
  make_routing(&s, num_tokens, num_topk, num_experts, R, mode, idx);

  int *ref_rank = calloc(R, sizeof(int)), *ref_node = calloc(nodes, sizeof(int));
  int* ref_expert = calloc(num_experts, sizeof(int));
  uint8_t* ref_in = calloc((size_t)num_tokens * R + 1, 1);
  int bad = -1;
  CHECK(ep_ref_layout(R, rpn, num_experts, num_tokens, num_topk, idx, ref_rank, ref_node, ref_expert, ref_in, &bad) ==
            0,
        "reference rejected a valid routing");

  int64_t* d_idx;
  int *d_rank, *d_node, *d_expert;
  uint8_t* d_in;
  cudaMalloc((void**)&d_idx, sizeof(int64_t) * (size_t)(num_tokens * num_topk + 1));
  cudaMalloc((void**)&d_rank, sizeof(int) * R);
  cudaMalloc((void**)&d_node, sizeof(int) * nodes);
  cudaMalloc((void**)&d_expert, sizeof(int) * num_experts);
  cudaMalloc((void**)&d_in, (size_t)num_tokens * R + 1);
  cudaMemcpy(d_idx, idx, sizeof(int64_t) * (size_t)num_tokens * num_topk, cudaMemcpyHostToDevice);
  /* Poison: an unwritten output shows up as 0x5a5a5a5a / 0x5a. */
  cudaMemset(d_rank, 0x5a, sizeof(int) * R);
  cudaMemset(d_node, 0x5a, sizeof(int) * nodes);
  cudaMemset(d_expert, 0x5a, sizeof(int) * num_experts);
  cudaMemset(d_in, 0x5a, (size_t)num_tokens * R + 1);

  ep_layout_args_t a = EP_LAYOUT_ARGS_INIT;
  a.topk_idx = d_idx;
  a.num_tokens = num_tokens;
  a.num_topk = num_topk;
  a.num_experts = num_experts;
  a.num_tokens_per_rank = d_rank;
  a.num_tokens_per_node = d_node;
  a.num_tokens_per_expert = d_expert;
  a.is_token_in_rank = d_in;
  ep_status_t st = ep_get_dispatch_layout(g, &a, stream);
  CHECK(st == EP_STATUS_SUCCESS, "layout: %s", ep_last_error(g));
  cudaStreamSynchronize(stream);
  ep_status_t async_st;
  ep_get_async_error(g, &async_st);
  CHECK(async_st == EP_STATUS_SUCCESS, "async error on valid routing: %s", ep_last_error(g));

  int *got_rank = calloc(R, sizeof(int)), *got_node = calloc(nodes, sizeof(int));
  int* got_expert = calloc(num_experts, sizeof(int));
  uint8_t* got_in = calloc((size_t)num_tokens * R + 1, 1);
  cudaMemcpy(got_rank, d_rank, sizeof(int) * R, cudaMemcpyDeviceToHost);
  cudaMemcpy(got_node, d_node, sizeof(int) * nodes, cudaMemcpyDeviceToHost);
  cudaMemcpy(got_expert, d_expert, sizeof(int) * num_experts, cudaMemcpyDeviceToHost);
  cudaMemcpy(got_in, d_in, (size_t)num_tokens * R + 1, cudaMemcpyDeviceToHost);
  int before = g_check_failures;
  for (int r = 0; r < R; ++r) CHECK(got_rank[r] == ref_rank[r], "per_rank[%d] = %d, want %d", r, got_rank[r], ref_rank[r]);
  for (int n = 0; n < nodes; ++n)
    CHECK(got_node[n] == ref_node[n], "per_node[%d] = %d, want %d", n, got_node[n], ref_node[n]);
  for (int e = 0; e < num_experts; ++e)
    if (got_expert[e] != ref_expert[e]) {
      CHECK(0, "per_expert[%d] = %d, want %d", e, got_expert[e], ref_expert[e]);
      break;
    }
  for (size_t i = 0; i < (size_t)num_tokens * R; ++i)
    if (got_in[i] != ref_in[i]) {
      CHECK(0, "is_token_in_rank[token %zu][rank %zu] = %d, want %d", i / R, i % R, got_in[i], ref_in[i]);
      break;
    }
  CHECK(got_in[(size_t)num_tokens * R] == 0x5a, "layout wrote past is_token_in_rank");
  int failed = g_check_failures != before;
  if (failed)
    printf("case failed: seed=0x%llx ranks_per_node=%d tokens=%d topk=%d experts=%d routing=%d\n",
           (unsigned long long)seed, rpn, num_tokens, num_topk, num_experts, mode);

  cudaFree(d_idx); cudaFree(d_rank); cudaFree(d_node); cudaFree(d_expert); cudaFree(d_in);
  free(idx); free(ref_rank); free(ref_node); free(ref_expert); free(ref_in);
  free(got_rank); free(got_node); free(got_expert); free(got_in);
  return failed;
}

static void run_bad_index(ep_group_t g, cudaStream_t stream, int num_experts) {
  int64_t idx[6] = {0, 1, 2, num_experts + 41, -1, 3}; /* token 1 holds a bad index (top-2) */
  int64_t* d_idx;
  int *d_rank, *d_expert;
  uint8_t* d_in;
  cudaMalloc((void**)&d_idx, sizeof(idx));
  cudaMalloc((void**)&d_rank, sizeof(int) * 64);
  cudaMalloc((void**)&d_expert, sizeof(int) * (size_t)num_experts);
  cudaMalloc((void**)&d_in, 64 * 3);
  cudaMemcpy(d_idx, idx, sizeof(idx), cudaMemcpyHostToDevice);
  ep_layout_args_t a = EP_LAYOUT_ARGS_INIT;
  a.topk_idx = d_idx;
  a.num_tokens = 3;
  a.num_topk = 2;
  a.num_experts = num_experts;
  a.num_tokens_per_rank = d_rank;
  a.num_tokens_per_expert = d_expert;
  a.is_token_in_rank = d_in;
  CHECK(ep_get_dispatch_layout(g, &a, stream) == EP_STATUS_SUCCESS, "launch: %s", ep_last_error(g));
  cudaStreamSynchronize(stream);
  ep_status_t st = ep_get_dispatch_layout(g, &a, stream); /* the next call reports the fault */
  CHECK(st == EP_STATUS_DEVICE_ERROR, "bad index gave %s", ep_status_string(st));
  CHECK(strstr(ep_last_error(g), "token 1") != NULL, "message does not name token 1: %s", ep_last_error(g));
  printf("bad index reported: %s\n", ep_last_error(g));
  idx[3] = 4;
  cudaMemcpy(d_idx, idx, sizeof(idx), cudaMemcpyHostToDevice);
  CHECK(ep_get_dispatch_layout(g, &a, stream) == EP_STATUS_SUCCESS, "call after a reported fault: %s",
        ep_last_error(g));
  cudaStreamSynchronize(stream);
  ep_status_t async_st;
  ep_get_async_error(g, &async_st);
  CHECK(async_st == EP_STATUS_SUCCESS, "fault not cleared: %s", ep_last_error(g));
  cudaFree(d_idx); cudaFree(d_rank); cudaFree(d_expert); cudaFree(d_in);
}

int main(void) {
  harness_t h;
  int rc = harness_init(&h);
  if (rc) return rc;
  const int R = h.num_ranks;
  uint64_t seed = harness_seed(&h, "layout");
  int shapes[2] = {R, 1};
  for (int si = 0; si < 2; ++si) {
    int rpn = shapes[si];
    if (si == 1 && R == 1) break;
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    cfg.ranks_per_node = rpn;
    cfg.num_experts = 256 % R == 0 ? 256 : 64 * R;
    ep_group_t g = NULL;
    ep_status_t st = harness_group_create(&h, &cfg, &g);
    CHECK(st == EP_STATUS_SUCCESS, "create: %s", ep_last_error(NULL));
    if (st != EP_STATUS_SUCCESS) return TEST_RESULT();
    cudaStream_t stream;
    cudaStreamCreate(&stream);
    int tokens[] = {0, 1, 7, 129, 4096};
    int topks[] = {1, 4, 8, 9};
    int cases = 0, failed = 0;
    for (size_t ti = 0; ti < sizeof(tokens) / sizeof(tokens[0]); ++ti)
      for (size_t ki = 0; ki < sizeof(topks) / sizeof(topks[0]); ++ki)
        for (int mode = 0; mode < 3; ++mode) {
          int n = tokens[ti];
          if (h.rank == 1 && mode == ROUTING_RANDOM && ti == 3) n = 0; /* a rank with zero tokens */
          uint64_t cs = seed + (uint64_t)(cases * 131 + si);
          failed += run_case(g, &h, rpn, cs, n, topks[ki], cfg.num_experts, mode, stream);
          failed += run_case(g, &h, rpn, cs, n, topks[ki], 4 * R, mode, stream); /* few experts: many per rank */
          cases += 2;
        }
    printf("ranks_per_node=%d: %d cases, %d failed\n", rpn, cases, failed);
    if (si == 0) run_bad_index(g, stream, cfg.num_experts);
    cudaStreamDestroy(stream);
    ep_group_destroy(g);
  }
  return TEST_RESULT();
}
