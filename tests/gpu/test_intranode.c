/* test_intranode: the normal (high-throughput) path -- ep_dispatch_prepare, ep_dispatch, ep_combine -- on one
 * NVLink domain, against the pure-C reference.
 *
 *   every rank:  all ranks' inputs, from one shared seed ──> ep_ref_dispatch + ep_ref_combine (whole world)
 *                its own inputs ──> the library ──> its own outputs == the reference's outputs for this rank
 *
 * Each case of the shared table (tests/gpu/normal_runs.c: a sample of dtype x top-k delivery x hidden x top-k x
 * tokens x routing x experts x SMs x expert alignment x biases) runs, on one group and one handle:
 *   eager       prepare (host count) -> dispatch into exactly sized outputs -> combine -> check; a second
 *               combine with another num_sms, into re-poisoned outputs -> check, and the same bytes
 *   cached      (some cases) new x, scales and weights dispatched through the same handle, no prepare -> check
 *   graph-safe  prepare (device counts) -> dispatch into num_ranks * max_tokens rows -> combine -> check, and
 *               the rows past the count: recv_topk_idx == -1, recv_src_idx == -1
 * Both paths are checked bit for bit against the reference, so they are bit-identical to each other.
 *   dispatch:  recv_x bytes, recv_x_scales, recv_topk_idx (local ids), recv_topk_weights, recv_src_idx, the
 *              received count, the per-expert counts (aligned)
 *   combine:   y = the received rows as bf16 (BF16: recv_x itself; FP8: each e4m3 value widened), with the
 *              received weights and sometimes bias0 / bias1; every other case carries small integers, whose
 *              sums are exact: combined_x bit-identical or the case fails; the random payload (also chosen so
 *              every fp32 sum is exact) accepts and reports values within 2^-7 of |ref|; combined_topk_weights
 *              within 1e-6 relative
 *   every output is poisoned before every call (0xA5 bytes, NaN floats), so a row left unwritten fails, and
 *   ep_get_async_error must be EP_STATUS_SUCCESS after each case.
 * Also: argument validation on the live group (each error must name the argument); prepare + dispatch + combine
 * captured in a CUDA graph, replayed twice with new data (and new routing) in the same buffers, BF16 top-4 and FP8
 * top-8 with repeated experts (an eager case on the same handle between its replays); last, a
 * recv_capacity overflow in the graph-safe path reported as EP_STATUS_DEVICE_ERROR, a combine along that handle
 * from an input of exactly recv_capacity rows, then a normal case on the same group. Then, on a second group whose
 * config.normal_region_bytes holds ROUND_TOKENS (40) tokens a round, cases of up to 4096 tokens (calls in rounds)
 * and the BF16 CUDA graph, checked the same way.
 * EP_TEST_LEVEL=full also runs normal_full_table (4096-token cases of the same regions, hidden 8192 and 16384) on
 * a group created with config.hidden = FULL_MAX_HIDDEN. Works at any rank count from 1 to 8.
 * A failure prints the case and the seed; EP_TEST_SEED=<seed> replays it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "gpu/normal_runs.h"
#include "gpu/test_util.h"

int main(void) {
  harness_t h;
  int rc = harness_init(&h);
  if (rc) return rc;
  if (h.num_ranks > MAX_RANKS) {
    printf("SKIP: more than %d ranks\n", MAX_RANKS);
    return TEST_SKIP;
  }
  normal_ctx_t c;
  memset(&c, 0, sizeof c);
  c.R = h.num_ranks;
  c.me = h.rank;
  c.seed = harness_seed(&h, "intranode");

  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ranks_per_node = 0; /* one NVLink domain */
  cfg.num_experts = 256 / c.R * c.R;
  cfg.hidden = normal_config_hidden();
  cfg.max_tokens_per_rank = MAX_TOKENS;
  cfg.max_topk = MAX_TOPK;
  c.max_experts = cfg.num_experts;
  ep_status_t st = harness_group_create(&h, &cfg, &c.g);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s: %s", ep_status_string(st), ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return TEST_RESULT();
  ep_group_info_t info;
  CHECK(ep_group_get_info(c.g, &info) == EP_STATUS_SUCCESS, "get_info: %s", ep_last_error(c.g));
  if (info.num_nodes > 1) {
    printf("SKIP: the group has %d nodes; this test covers one NVLink domain\n", info.num_nodes);
    ep_group_destroy(c.g);
    return TEST_SKIP;
  }
  CUDA_CHECK(cudaStreamCreate(&c.s));
  CHECK(ep_handle_create(c.g, &c.handle) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(c.g));

  double t0 = now_s();
  int failed = normal_run_validation(&c);
  printf("rank %d: validation: %s (%.1f s)\n", c.me, failed ? "FAILED" : "ok", now_s() - t0);

  t0 = now_s();
  failed = 0;
  /* EP_TEST_SMALL=1 keeps the small cases only (for compute-sanitizer, which is slow). */
  const int small_only = getenv("EP_TEST_SMALL") != NULL;
  int ran = 0;
  for (int i = 0; i < normal_num_cases; ++i)
    if (!small_only || normal_case_table[i].tokens <= 64) {
      failed += normal_run_case(&c, &normal_case_table[i], i);
      ++ran;
    }
  for (int i = 0; i < normal_num_full_cases && test_level_full() && !small_only; ++i, ++ran)
    failed += normal_run_case(&c, &normal_full_table[i], normal_num_cases + 1 + i);
  printf("rank %d: dispatch/combine: %d cases (eager + graph-safe each), %d failed (%.1f s)\n", c.me, ran, failed,
         now_s() - t0);

  if (small_only) goto done;
  t0 = now_s();
  failed = normal_run_cuda_graph(&c, 0) + normal_run_cuda_graph(&c, 1);
  printf("rank %d: CUDA graphs (BF16 top-4; FP8 top-8, eager calls between), 2 replays each: %s (%.1f s)\n", c.me,
         failed ? "FAILED" : "ok", now_s() - t0);

  /* Last, so that a group left failed by it cannot hide the results above. */
  t0 = now_s();
  failed = normal_run_overflow(&c);
  failed += normal_run_case(&c, &normal_case_table[10], normal_num_cases); /* the group still works */
  printf("rank %d: recv_capacity overflow, then a normal case: %s (%.1f s)\n", c.me, failed ? "FAILED" : "ok",
         now_s() - t0);

done:
  CHECK(ep_handle_destroy(c.handle) == EP_STATUS_SUCCESS, "handle destroy: %s", ep_last_error(c.g));
  cudaStreamDestroy(c.s);
  CHECK(ep_group_destroy(c.g) == EP_STATUS_SUCCESS, "destroy: %s", ep_last_error(NULL));

  t0 = now_s();
  failed = normal_run_rounds(&h, c.seed ^ 0x120d5, 0, 0);
  printf("rank %d: rounds (%d tokens a round, calls of up to %d): %s (%.1f s)\n", c.me, ROUND_TOKENS, MAX_TOKENS,
         failed ? "FAILED" : "ok", now_s() - t0);
  return TEST_RESULT();
}
