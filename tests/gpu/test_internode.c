/* test_internode: the normal (high-throughput) path across nodes -- ep_dispatch_prepare, ep_dispatch, ep_combine
 * with num_nodes > 1 -- against the pure-C reference. One host is split into virtual nodes with
 * config.ranks_per_node, so the inter-node leg (puts with signals between rail peers) runs through the transport
 * while the intra-node leg uses NVLink loads and stores. Shapes (nodes x ranks per node), one group each:
 * 2 ranks: 2x1; 4: 2x2 and 4x1; 8: 2x4 and 4x2; 6: 2x3; 3, 5, 7: Rx1; EP_TEST_LEVEL=full adds Rx1 (up to 24
 * ranks) where it is missing, and runs normal_full_table (FULL_MAX_HIDDEN) after the default cases. Skips (77)
 * with one rank, or fewer GPUs than ranks unless they share them (scripts/shared_gpu.sh).
 *
 * Runs the cases and checks test_intranode runs (tests/gpu/normal_runs.c), with these differences:
 *   dispatch:  bit-identical to the reference, exactly as intranode (same order: source rank, then token).
 *   combine:   the internode path rounds each remote node's partial sum to bf16 before the last hop
 *              (docs/internode.md 1.4), so
 *                - even-numbered cases use small-integer payloads (|v| <= 25 BF16, <= 16 FP8; biases <= 8): every
 *                  partial sum is exact in bf16 and the output must be bit-identical to the reference;
 *                - odd-numbered cases use the random payload and must satisfy
 *                  |out - ref| <= (2^-7 + 2^-8) * sum|terms| * 1.02 per element, where sum|terms| is the
 *                  reference combine of the absolute values (copies and biases);
 *              weights within 1e-6 relative; and a second combine with another num_sms, into re-poisoned
 *              outputs, must pass the same check and give the same bytes.
 * Each shape runs twice: as the host finds it (rail peers NVLink-mapped, so the inter-node leg is warp stores),
 * then in a second group created with EP_INTERNODE_FORCE_PUT=1, which makes every cross-node transfer take the
 * NVSHMEM put / put-with-signal / quiet branch that a real NIC would use ("put-forced": the small cases and two
 * 4096-token cases).
 * Then, in the first shape (mapped, then put-forced), a group whose config.normal_region_bytes holds 64 tokens a
 * round in both regions runs calls of 0 to 1000 tokens in rounds (normal_run_rounds); EP_TEST_ROUNDS=only runs
 * these alone.
 * A failure prints the shape, the case and the seed; EP_TEST_SEED=<seed> replays it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "gpu/normal_runs.h"
#include "gpu/test_util.h"

/* Cases the put-forced pass runs besides the small ones: 4096 tokens, BF16 top-8 (hidden 7168) and FP8 with
 * differing token counts. */
static int forced_case(int i) { return normal_case_table[i].tokens <= 64 || i == 12 || i == 17; }

/* One group of `rpn` ranks per node: validation, the cases, a CUDA graph, the overflow. `forced`: create the group
 * with EP_INTERNODE_FORCE_PUT=1 (read once at create) and run the small cases and two large ones. */
static void run_shape(const harness_t* h, normal_ctx_t* c, int rpn, int forced) {
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ranks_per_node = rpn;
  cfg.num_experts = 256 / c->R * c->R;
  cfg.hidden = normal_config_hidden();
  cfg.max_tokens_per_rank = MAX_TOKENS;
  cfg.max_topk = MAX_TOPK;
  c->max_experts = cfg.num_experts;
  c->rpn = rpn;
  c->forced = forced;
  if (forced) setenv("EP_INTERNODE_FORCE_PUT", "1", 1);
  ep_status_t st = harness_group_create(h, &cfg, &c->g);
  if (forced) unsetenv("EP_INTERNODE_FORCE_PUT");
  CHECK(st == EP_STATUS_SUCCESS, "create (ranks_per_node=%d%s): %s: %s", rpn, forced ? ", put-forced" : "",
        ep_status_string(st), ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return;
  ep_group_info_t info;
  CHECK(ep_group_get_info(c->g, &info) == EP_STATUS_SUCCESS, "get_info: %s", ep_last_error(c->g));
  CHECK(info.num_nodes == c->R / rpn && info.num_nodes > 1, "shape %dx%d: the group has %d nodes", c->R / rpn, rpn,
        info.num_nodes);
  const int nodes = c->R / rpn;
  const char* mode = forced ? " put-forced" : "";
  printf("rank %d: shape %d nodes x %d ranks%s (node %d, local %d)\n", c->me, nodes, rpn, mode, info.node,
         info.local_rank);
  CUDA_CHECK(cudaStreamCreate(&c->s));
  CHECK(ep_handle_create(c->g, &c->handle) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(c->g));

  double t0 = now_s();
  int failed = 0;
  if (!forced) {
    failed = normal_run_validation(c);
    printf("rank %d: %dx%d validation: %s (%.1f s)\n", c->me, nodes, rpn, failed ? "FAILED" : "ok", now_s() - t0);
  }

  t0 = now_s();
  failed = 0;
  /* EP_TEST_SMALL=1 keeps the small cases only (for compute-sanitizer, which is slow). */
  const int small_only = getenv("EP_TEST_SMALL") != NULL;
  int ran = 0;
  for (int i = 0; i < normal_num_cases; ++i)
    if (small_only ? normal_case_table[i].tokens <= 64 : !forced || forced_case(i)) {
      failed += normal_run_case(c, &normal_case_table[i], i);
      ++ran;
    }
  for (int i = 0; i < normal_num_full_cases && test_level_full() && !small_only && !forced; ++i, ++ran)
    failed += normal_run_case(c, &normal_full_table[i], normal_num_cases + 1 + i);
  printf("rank %d: %dx%d%s dispatch/combine: %d cases (eager + graph-safe each), %d failed (%.1f s)\n", c->me, nodes,
         rpn, mode, ran, failed, now_s() - t0);

  if (!small_only && forced) { /* the graph whose cross-node transfers are puts */
    t0 = now_s();
    failed = normal_run_cuda_graph(c, 1);
    printf("rank %d: %dx%d%s CUDA graph (FP8 top-8), 2 replays: %s (%.1f s)\n", c->me, nodes, rpn, mode,
           failed ? "FAILED" : "ok", now_s() - t0);
  }
  if (!small_only && !forced) {
    t0 = now_s();
    failed = normal_run_cuda_graph(c, 0) + normal_run_cuda_graph(c, 1);
    printf("rank %d: %dx%d CUDA graph, 2 replays: %s (%.1f s)\n", c->me, nodes, rpn, failed ? "FAILED" : "ok",
           now_s() - t0);
    /* Last, so that a group left failed by it cannot hide the results above. */
    t0 = now_s();
    failed = normal_run_overflow(c);
    failed += normal_run_case(c, &normal_case_table[10], normal_num_cases); /* the group still works */
    printf("rank %d: %dx%d recv_capacity overflow, then a normal case: %s (%.1f s)\n", c->me, nodes, rpn,
           failed ? "FAILED" : "ok", now_s() - t0);
  }
  CHECK(ep_handle_destroy(c->handle) == EP_STATUS_SUCCESS, "handle destroy: %s", ep_last_error(c->g));
  cudaStreamDestroy(c->s);
  CHECK(ep_group_destroy(c->g) == EP_STATUS_SUCCESS, "destroy: %s", ep_last_error(NULL));
  c->g = NULL;
  c->handle = NULL;
}

int main(void) {
  harness_t h;
  int rc = harness_init(&h);
  if (rc) return rc;
  if (h.num_ranks > MAX_RANKS) {
    printf("SKIP: more than %d ranks\n", MAX_RANKS);
    return TEST_SKIP;
  }
  /* Virtual shapes: ranks per node for each rank count (nodes = ranks / rpn > 1): two nodes where the count is
   * even (6: 2 x 3), one rank per node where it is odd (3, 5, 7); EP_TEST_LEVEL=full adds one rank per node. */
  const int R = h.num_ranks;
  static const int k_shapes[9][2] = {{0, 0}, {0, 0}, {1, 0}, {1, 0}, {2, 1}, {1, 0}, {3, 0}, {1, 0}, {4, 2}};
  int shapes[3] = {0, 0, 0}, num_shapes = 0;
  if (R <= 8) {
    for (int j = 0; j < 2; ++j)
      if (k_shapes[R][j]) shapes[num_shapes++] = k_shapes[R][j];
  } else if (R % 2 == 0 && R / 2 <= 8) {
    shapes[num_shapes++] = R / 2;
  }
  if (test_level_full() && num_shapes > 0 && R > 2 && R <= 24 && shapes[num_shapes - 1] != 1) shapes[num_shapes++] = 1;
  if (num_shapes == 0) {
    printf("SKIP: %d rank(s): no multi-node shape to test\n", h.num_ranks);
    return TEST_SKIP;
  }
  normal_ctx_t c;
  memset(&c, 0, sizeof c);
  c.R = h.num_ranks;
  c.me = h.rank;
  c.seed = harness_seed(&h, "internode");
  /* EP_TEST_ROUNDS=only runs the rounds alone. */
  const char* rounds = getenv("EP_TEST_ROUNDS");
  const int rounds_only = rounds && strcmp(rounds, "only") == 0;
  for (int i = 0; i < num_shapes && !rounds_only; ++i) run_shape(&h, &c, shapes[i], 0);
  for (int i = 0; i < num_shapes && !rounds_only; ++i) run_shape(&h, &c, shapes[i], 1); /* the NIC branch */
  for (int forced = 0; forced < 2; ++forced) {
    const double t0 = now_s();
    const int failed = normal_run_rounds(&h, c.seed ^ 0x120d5, shapes[0], forced);
    printf("rank %d: %dx%d%s rounds (%d tokens a round, calls of up to %d): %s (%.1f s)\n", c.me, R / shapes[0],
           shapes[0], forced ? " put-forced" : "", INTER_ROUND_TOKENS, MAX_TOKENS, failed ? "FAILED" : "ok",
           now_s() - t0);
  }
  return TEST_RESULT();
}
