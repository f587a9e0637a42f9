/* test_soak: many iterations of normal dispatch / combine and of LL dispatch / combine on one group, each with
 * fresh random routing and shapes, every one against the pure-C reference; 0 mismatches required.
 *
 * Each iteration draws (the same on every rank, from the printed seed): a normal case -- 1..256 tokens per rank,
 * now and then a rank (or several) with none, hidden 1024 or 2048, top-1..8 with about 10% of the slots -1 (or
 * an expert twice), BF16 or FP8, biases, num_sms, alignment, a cached second dispatch -- run eagerly, cached and
 * graph-safe (tests/gpu/normal_runs.c); then an LL round -- T 1..256, hidden 1024 or 2048, top-1..8, 10% -1, BF16
 * or FP8, with or without the receive hook, now and then a rank with no tokens (tests/gpu/ll_round.h).
 * Iterations: 1000 with EP_TEST_LEVEL=full, 100 at the default level (the default test command); EP_SOAK_ITERS
 * sets any count. EP_TEST_SEED replays a run. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "gpu/ll_round.h"
#include "gpu/normal_runs.h"
#include "gpu/test_util.h"

#define SOAK_TOKENS 256
#define SOAK_HIDDEN 2048
#define SOAK_TOPK 8

static int pick(uint64_t* st, int n) { return (int)(harness_uniform(st) * n); }

/* A normal case from the iteration's draw. */
static case_t draw_normal(uint64_t* st) {
  static const int varies[] = {VARY_LAST, VARY_FIRST, VARY_MIDDLE, VARY_SEVERAL};
  static const int sms[] = {8, 16, 24};
  case_t k;
  k.tokens = 1 + pick(st, SOAK_TOKENS);
  k.vary = pick(st, 4) == 0 ? varies[pick(st, 4)] : VARY_NONE; /* a quarter of the iterations: ranks without tokens */
  k.hidden = pick(st, 2) ? 2048 : 1024;
  k.topk = 1 + pick(st, SOAK_TOPK);
  k.fp8 = pick(st, 2);
  k.topk_out = TOPK_IDX_WEIGHTS;
  k.routing = pick(st, 4) == 0 ? ROUTE_REPEAT : ROUTE_RANDOM; /* both carry about 10% -1 slots */
  k.few_experts = 0;
  k.sms = sms[pick(st, 3)];
  k.alignment = pick(st, 2) ? 128 : 1;
  k.bias = pick(st, 4);
  k.cached = pick(st, 2);
  return k;
}

/* An LL round's shape from the iteration's draw. */
static ll_shape_t draw_ll(uint64_t* st, int R, int experts) {
  ll_shape_t k;
  k.T = 1 + pick(st, SOAK_TOKENS);
  k.hidden = pick(st, 2) ? 2048 : 1024;
  k.topk = 1 + pick(st, SOAK_TOPK);
  k.experts = experts;
  k.fp8 = pick(st, 2);
  k.hook = pick(st, 2);
  k.neg = 10;
  k.zero_rank = pick(st, 4) == 0 ? pick(st, R) : -1;
  return k;
}

int main(void) {
  harness_t h;
  int rc = harness_init(&h);
  if (!rc && h.num_ranks > LL_MAX_RANKS) {
    printf("SKIP: more than %d ranks\n", LL_MAX_RANKS);
    rc = TEST_SKIP;
  }
  if (rc) return rc;
  const char* env = getenv("EP_SOAK_ITERS");
  const int iters = env ? atoi(env) : test_level_full() ? 1000 : 100;
  normal_ctx_t c;
  memset(&c, 0, sizeof(c));
  c.R = h.num_ranks;
  c.me = h.rank;
  c.seed = harness_seed(&h, "soak");
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.num_experts = 8 * c.R;
  cfg.hidden = SOAK_HIDDEN;
  cfg.max_tokens_per_rank = SOAK_TOKENS;
  cfg.max_topk = SOAK_TOPK;
  cfg.ll_max_tokens_per_rank = SOAK_TOKENS;
  c.max_experts = cfg.num_experts;
  ep_status_t st = harness_group_create(&h, &cfg, &c.g);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s: %s", ep_status_string(st), ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return TEST_RESULT();
  CUDA_CHECK(cudaStreamCreate(&c.s));
  EP_CHECK(&c, ep_handle_create(c.g, &c.handle));
  ll_bufs_t ll;
  const ll_shape_t ll_max = {SOAK_TOKENS, SOAK_HIDDEN, SOAK_TOPK, cfg.num_experts, 1, 1, 10, -1};
  EP_CHECK(&c, ll_bufs_alloc(c.g, &ll, &ll_max, c.R));

  uint64_t draw = c.seed ^ 0x50a4ull;
  int normal_failed = 0, ll_failed = 0;
  const double t0 = now_s();
  for (int i = 0; i < iters; ++i) {
    const case_t k = draw_normal(&draw);
    normal_failed += normal_run_case(&c, &k, i);
    const ll_shape_t lk = draw_ll(&draw, c.R, cfg.num_experts);
    ll_world_t w;
    if (ll_world_make(&w, &lk, c.R, c.seed ^ (0xd1b54a32d192ed03ull * (uint64_t)(i + 1)))) {
      CHECK(0, "iteration %d: the reference rejected the LL world", i);
      ++ll_failed;
    } else if (ll_run_round(c.g, c.s, &ll, &w, c.me) != 0) {
      fprintf(stderr, "rank %d: LL iteration %d failed: T=%d hidden=%d topk=%d %s hook=%d zero_rank=%d\n", c.me, i,
              lk.T, lk.hidden, lk.topk, lk.fp8 ? "fp8" : "bf16", lk.hook, lk.zero_rank);
      ++ll_failed;
    }
    ll_world_free(&w);
    if ((i + 1) % 100 == 0 || i + 1 == iters)
      printf("rank %d: %d iterations, %d normal and %d LL failed (%.1f s)\n", c.me, i + 1, normal_failed, ll_failed,
             now_s() - t0);
  }
  printf("rank %d: soak of %d iterations: %d normal and %d LL iterations with mismatches (seed 0x%016llx)\n", c.me,
         iters, normal_failed, ll_failed, (unsigned long long)c.seed);
  ll_bufs_free(&ll);
  ep_handle_destroy(c.handle);
  cudaStreamDestroy(c.s);
  st = ep_group_destroy(c.g);
  CHECK(st == EP_STATUS_SUCCESS, "destroy: %s", ep_last_error(NULL));
  return TEST_RESULT();
}
