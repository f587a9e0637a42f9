/* test_expert_map: ep_map_experts, the redundant-expert map (issue 23): logical top-k picks become physical slots,
 * a live copy each, against the pure-C reference (tests/ref/ep_ref_expert_map.h). The last rank, R-1, is the masked
 * one. Two parts (argv[1]; none: both, "masked" in a fresh process of its own, as a group with a masked rank is
 * torn down on each rank alone and NVSHMEM then stays up until the process exits):
 *   plain   a group without a rank mask: random maps (logical experts with 0..3 copies, padding anywhere) map a
 *           random logical top-k as the reference does (the plain EPLB map), into another buffer and in place; a
 *           bad logical index and a bad slot are data faults naming the token and the logical expert; then a normal
 *           prepare / dispatch / combine of the mapped ids against the reference.
 *   masked  a group with the rank mask: the same map checks with no rank masked; a map call captured in a CUDA
 *           graph, replayed after every rank masked R-1 by hand, follows the mask; the map checks with R-1 masked;
 *           then LL rounds (BF16 and FP8, both buffer halves) of ids mapped on the device through maps in which
 *           every logical expert has a copy off R-1: the survivors lose no pick and never name R-1, and dispatch
 *           (recv_count, rows) and combine match the reference; then the normal round above with R-1 masked.
 * Every rank prints "expert_map PART rank R: ..." lines. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "gpu/ll_round.h"
#include "gpu/normal_cases.h"
#include "gpu/test_util.h"
#include "ref/ep_ref_expert_map.h"

#define E_LOC 8  /* physical slots per rank */
#define COPIES 3 /* columns of a map */
#define TOPK 4
#define MAPS 6        /* random maps per mask state */
#define MAP_TOKENS 64 /* tokens of a map check */

static const ll_shape_t k_ll_shape = {
    .T = 32, .hidden = 2048, .topk = TOPK, .experts = 0, .fp8 = 0, .hook = 0, .neg = 5, .zero_rank = -1};

typedef struct {
  const harness_t* h;
  ep_group_t g;
  cudaStream_t s;
  int R, me;
  int32_t mask[LL_MAX_RANKS]; /* the mask every rank holds (the group's, set by hand) */
  int mask_on;                /* the group has a rank mask: the reference takes `mask`, else none */
  int32_t* d_slots;
  int64_t *d_in, *d_out;
} ctx_t;

/* A map of L = 4R logical experts over E = 8R slots; each slot holds at most one logical expert. `survivable`:
 * every logical expert has a copy on a rank other than R-1, and up to COPIES in all; otherwise each has 0..COPIES
 * (some none). A quarter of the slots hold nothing. Copies sit in random columns, -1 elsewhere. */
typedef struct {
  int L, E;
  int32_t slots[4 * LL_MAX_RANKS * COPIES];
} map_t;

static void map_place(map_t* m, int l, int32_t slot, uint64_t* st) {
  int32_t* row = m->slots + (size_t)l * COPIES;
  int free_cols[COPIES], n = 0;
  for (int c = 0; c < COPIES; ++c)
    if (row[c] < 0) free_cols[n++] = c;
  row[free_cols[harness_rand(st) % (uint64_t)n]] = slot;
}

static int map_copies(const map_t* m, int l) {
  int n = 0;
  for (int c = 0; c < COPIES; ++c) n += m->slots[(size_t)l * COPIES + c] >= 0;
  return n;
}

static void map_make(map_t* m, int R, uint64_t seed, int survivable) {
  m->L = 4 * R;
  m->E = E_LOC * R;
  for (int i = 0; i < m->L * COPIES; ++i) m->slots[i] = -1;
  uint64_t st = seed;
  int perm[E_LOC * LL_MAX_RANKS];
  for (int i = 0; i < m->E; ++i) perm[i] = i;
  for (int i = m->E - 1; i > 0; --i) {
    const int j = (int)(harness_rand(&st) % (uint64_t)(i + 1)), t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  int used[E_LOC * LL_MAX_RANKS] = {0};
  if (survivable) /* a first copy for every logical expert, off R-1: there are 8(R-1) >= 4R such slots */
    for (int i = 0, l = 0; i < m->E && l < m->L; ++i)
      if (perm[i] / E_LOC != R - 1) {
        map_place(m, l++, perm[i], &st);
        used[i] = 1;
      }
  for (int i = 0; i < m->E; ++i) {
    if (used[i] || harness_rand(&st) % 4 == 0) continue;
    const int l = (int)(harness_rand(&st) % (uint64_t)m->L);
    if (map_copies(m, l) < COPIES) map_place(m, l, perm[i], &st);
  }
}

/* Rank r's logical top-k: distinct logical experts per token, about 10% of the picks -1. */
static void logical_make(int64_t* idx, int n, int L, uint64_t seed) {
  uint64_t st = seed;
  for (int t = 0; t < n; ++t) {
    int64_t* row = idx + (size_t)t * TOPK;
    for (int j = 0; j < TOPK; ++j) {
      int fresh;
      do {
        row[j] = (int64_t)(harness_rand(&st) % (uint64_t)L);
        fresh = 1;
        for (int q = 0; q < j; ++q) fresh &= row[q] != row[j];
      } while (!fresh);
    }
    for (int j = 0; j < TOPK; ++j)
      if (harness_rand(&st) % 10 == 0) row[j] = -1;
  }
}

/* The reference's picks of rank `rank` (every rank holds the same mask). */
static void reference_map(const ctx_t* c, const map_t* m, int rank, const int64_t* logical, int64_t* physical, int n) {
  const int rc = ep_ref_map_experts(m->slots, m->L, COPIES, m->E, c->R, rank, c->mask_on ? c->mask : NULL, logical,
                                    physical, n, TOPK, NULL);
  CHECK(rc == 0, "the reference rejected the map");
}

/* The uploads and memsets of the default stream are done before a call on c->s (a non-blocking stream) reads them. */
static void inputs_ready(void) { CUDA_CHECK(cudaDeviceSynchronize()); }

static ep_expert_map_t device_map(ctx_t* c, const map_t* m) {
  upload(c->d_slots, m->slots, (size_t)m->L * COPIES * 4);
  ep_expert_map_t em = EP_EXPERT_MAP_INIT;
  em.slots = c->d_slots;
  em.num_logical_experts = m->L;
  em.max_copies = COPIES;
  em.num_experts = m->E;
  return em;
}

static long compare_picks(const ctx_t* c, const char* what, const int64_t* dev, const int64_t* want, int n) {
  int64_t* got = download(dev, (size_t)n * TOPK * 8);
  long bad = 0;
  for (int i = 0; i < n * TOPK; ++i)
    if (got[i] != want[i] && bad++ < LL_MAX_REPORTS)
      fprintf(stderr, "rank %d: %s: token %d slot %d: got %lld, want %lld\n", c->me, what, i / TOPK, i % TOPK,
              (long long)got[i], (long long)want[i]);
  free(got);
  return bad;
}

/* This rank's logical top-k mapped on the device, into d_out and then in place, against the reference. */
static long check_one_map(ctx_t* c, const map_t* m, uint64_t seed) {
  int64_t logical[MAP_TOKENS * TOPK], want[MAP_TOKENS * TOPK];
  logical_make(logical, MAP_TOKENS, m->L, seed);
  reference_map(c, m, c->me, logical, want, MAP_TOKENS);
  const ep_expert_map_t em = device_map(c, m);
  upload(c->d_in, logical, sizeof(logical));
  CUDA_CHECK(cudaMemset(c->d_out, 0xA5, sizeof(logical)));
  inputs_ready();
  long bad = EP_CHECK(c, ep_map_experts(c->g, &em, c->d_in, c->d_out, MAP_TOKENS, TOPK, c->s)) ? 0 : 1;
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  bad += compare_picks(c, "mapped", c->d_out, want, MAP_TOKENS);
  bad += EP_CHECK(c, ep_map_experts(c->g, &em, c->d_in, c->d_in, MAP_TOKENS, TOPK, c->s)) ? 0 : 1;
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  bad += compare_picks(c, "mapped in place", c->d_in, want, MAP_TOKENS);
  CHECK_ASYNC_CLEAN(c, "ep_map_experts");
  return bad;
}

/* MAPS random maps, half of them survivable. */
static long check_maps(ctx_t* c, uint64_t seed, const char* part, const char* state) {
  long bad = 0;
  for (int i = 0; i < MAPS; ++i) {
    map_t m;
    map_make(&m, c->R, seed + 31 * (uint64_t)i, i & 1);
    bad += check_one_map(c, &m, seed ^ (0x1000 + (uint64_t)(i * 64 + c->me)));
  }
  CHECK(bad == 0, "rank %d: %s: maps %s: %ld mismatches", c->me, part, state, bad);
  printf("expert_map %s rank %d: %d random maps, %s: %ld mismatches\n", part, c->me, MAPS, state, bad);
  return bad;
}

static int create(ctx_t* c, const harness_t* h, int mask_on) {
  memset(c, 0, sizeof(*c));
  c->h = h;
  c->R = h->num_ranks;
  c->me = h->rank;
  c->mask_on = mask_on;
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.num_experts = E_LOC * c->R;
  cfg.hidden = k_ll_shape.hidden;
  cfg.max_tokens_per_rank = 64;
  cfg.max_topk = 8;
  cfg.ll_max_tokens_per_rank = mask_on ? k_ll_shape.T : 0;
  cfg.timeout_seconds = 10.0; /* no wait runs out here: a rank late by a moment is not masked */
  cfg.mask_failed_ranks = mask_on;
  const ep_status_t st = harness_group_create(h, &cfg, &c->g);
  CHECK(st == EP_STATUS_SUCCESS, "rank %d: ep_group_create: %s: %s", h->rank, ep_status_string(st),
        ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return 1;
  CUDA_CHECK(cudaStreamCreateWithFlags(&c->s, cudaStreamNonBlocking));
  c->d_slots = dev_alloc(sizeof(((map_t*)0)->slots));
  c->d_in = dev_alloc((size_t)MAP_TOKENS * TOPK * 8);
  c->d_out = dev_alloc((size_t)MAP_TOKENS * TOPK * 8);
  return 0;
}

static void release(ctx_t* c) {
  dev_free(c->d_slots);
  dev_free(c->d_in);
  dev_free(c->d_out);
  if (c->s) cudaStreamDestroy(c->s);
}

/* ---- plain: no rank mask ---- */

/* A bad logical index names the token; a bad slot names the logical expert; the group works after either. */
static void check_data_faults(ctx_t* c, uint64_t seed) {
  map_t m;
  map_make(&m, c->R, seed, 1);
  int64_t logical[MAP_TOKENS * TOPK];
  logical_make(logical, MAP_TOKENS, m.L, seed);
  logical[3 * TOPK + 1] = m.L;
  ep_expert_map_t em = device_map(c, &m);
  upload(c->d_in, logical, sizeof(logical));
  inputs_ready();
  EP_CHECK(c, ep_map_experts(c->g, &em, c->d_in, c->d_out, MAP_TOKENS, TOPK, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  ep_status_t async = EP_STATUS_SUCCESS;
  ep_get_async_error(c->g, &async);
  char want[128];
  snprintf(want, sizeof want, "logical_topk of token 3 holds logical expert %d", m.L);
  CHECK(async == EP_STATUS_DEVICE_ERROR && strstr(ep_last_error(c->g), want), "rank %d: a bad logical index: %s: %s",
        c->me, ep_status_string(async), ep_last_error(c->g));
  int64_t pick = 0;
  CUDA_CHECK(cudaMemcpy(&pick, c->d_out + 3 * TOPK + 1, 8, cudaMemcpyDeviceToHost));
  CHECK(pick == -1, "rank %d: a bad logical index mapped to %lld, want -1", c->me, (long long)pick);

  logical[3 * TOPK + 1] = -1;
  logical[0] = 0;                /* a pick of logical expert 0 ... */
  m.slots[COPIES - 1] = m.E + 5; /* ... whose row holds a slot outside [-1, E) */
  em = device_map(c, &m);
  upload(c->d_in, logical, sizeof(logical));
  inputs_ready();
  EP_CHECK(c, ep_map_experts(c->g, &em, c->d_in, c->d_out, MAP_TOKENS, TOPK, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  ep_get_async_error(c->g, &async);
  snprintf(want, sizeof want, "row of logical expert 0 holds slot %d", m.E + 5);
  CHECK(async == EP_STATUS_DEVICE_ERROR && strstr(ep_last_error(c->g), want), "rank %d: a bad slot: %s: %s", c->me,
        ep_status_string(async), ep_last_error(c->g));
  CHECK_ASYNC_CLEAN(c, "the data faults, once read");
  printf("expert_map plain rank %d: a bad logical index and a bad slot are data faults: %s\n", c->me,
         g_check_failures ? "FAIL" : "ok");
}

static int exact_only(const world_t* w, const expect_t* e, size_t i, float got, float want) {
  (void)w, (void)e, (void)i, (void)got, (void)want;
  return 0;
}
static const combine_rule_t k_exact = {exact_only, "(none accepted)"};

/* A normal prepare / dispatch / combine of ids mapped on the device, against the reference run on the mapped ids.
 * The plain part runs it with no mask, the masked part with rank R-1 masked by hand, where the same round holds as
 * it stands: the survivors' mapped picks avoid the masked rank and lose nothing, the masked rank's name
 * only its own slots, so no pick crosses the mask and the reference of the mapped ids is the masked one. */
static void normal_round(ctx_t* c, uint64_t seed) {
  const case_t k = {48, VARY_NONE, 2048, TOPK, 0, TOPK_IDX_WEIGHTS, ROUTE_RANDOM, 1, 0, 1, 0, 0};
  world_t w;
  world_build(&w, &k, c->R, E_LOC * c->R, seed, seed, 1);
  map_t m;
  map_make(&m, c->R, seed ^ 0xabc, 1);
  int64_t* logical_mine = NULL;
  long lost = 0;
  for (int r = 0; r < c->R; ++r) {
    const int n = w.num_tokens[r];
    int64_t* logical = xmalloc((size_t)n * TOPK * 8 + 8);
    logical_make(logical, n, m.L, seed + 7 * (uint64_t)r);
    reference_map(c, &m, r, logical, w.idx[r], n);
    for (int i = 0; i < n * TOPK && !(c->mask_on && c->mask[r]); ++i) lost += logical[i] >= 0 && w.idx[r][i] < 0;
    if (r == c->me) logical_mine = logical;
    else free(logical);
  }
  CHECK(lost == 0, "rank %d: unmasked ranks lost %ld picks, though every logical expert has a live copy", c->me, lost);
  const int n = w.num_tokens[c->me];
  expect_t e;
  expect_build(&e, &w, 1, c->me, NULL, NULL, 0);
  bufs_t b;
  bufs_alloc_inputs(&b, &w, c->me);
  bufs_upload_inputs(&b, &w, c->me, NULL, NULL);
  /* The dispatch takes the device's picks: the reference's, uploaded above, are overwritten. */
  CUDA_CHECK(cudaMemset(b.idx, 0xFF, (size_t)n * TOPK * 8));
  int64_t* d_logical = dev_alloc((size_t)n * TOPK * 8);
  upload(d_logical, logical_mine, (size_t)n * TOPK * 8);
  const ep_expert_map_t em = device_map(c, &m);
  inputs_ready();
  EP_CHECK(c, ep_map_experts(c->g, &em, d_logical, b.idx, n, TOPK, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  long bad = compare_picks(c, "normal round's picks", b.idx, w.idx[c->me], n);

  ep_handle_t handle = NULL;
  EP_CHECK(c, ep_handle_create(c->g, &handle));
  int num_recv = -1, counts[E_LOC];
  memset(counts, 0xA5, sizeof(counts));
  bufs_poison_counts(&b, &w, c->s);
  ep_dispatch_prepare_args_t p = prepare_args(&w, c->me, &b, 1, &num_recv, counts, 0);
  EP_CHECK(c, ep_dispatch_prepare(c->g, handle, &p, c->s));
  const int got_num_recv = num_recv;
  if (num_recv < 0 || num_recv > c->R * 64) num_recv = e.disp.recv[c->me].num_recv;
  bufs_alloc_outputs(&b, &w, num_recv);
  bufs_poison(&b, &w, c->me, c->s);
  ep_dispatch_args_t d = dispatch_args(&w, &b, 0);
  EP_CHECK(c, ep_dispatch(c->g, handle, &d, c->s));
  upload_y(&b, &w, &e, c->me);
  ep_combine_args_t cb = combine_args(&w, &b, 0, 0);
  EP_CHECK(c, ep_combine(c->g, handle, &cb, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  const int before = g_check_failures;
  check_dispatch("mapped", &w, &e.disp.recv[c->me], &b, &got_num_recv, counts, 0);
  check_combine("mapped", &w, c->me, &e, &b, &k_exact);
  CHECK_ASYNC_CLEAN(c, "the normal round of mapped ids");
  bad += g_check_failures - before;
  CHECK(bad == 0, "rank %d: the normal round of mapped ids: %ld mismatches", c->me, bad);
  printf("expert_map %s rank %d: normal dispatch and combine of %d tokens of mapped ids, %s: %ld mismatches, %ld "
         "picks lost\n",
         c->mask_on ? "masked" : "plain", c->me, n, c->mask_on ? "rank R-1 masked" : "no rank mask", bad, lost);
  ep_handle_destroy(handle);
  dev_free(d_logical);
  free(logical_mine);
  bufs_free(&b);
  expect_free(&e);
  world_free(&w);
}

static void run_plain(const harness_t* h, uint64_t seed) {
  ctx_t c;
  if (create(&c, h, 0) != 0) return;
  check_maps(&c, seed, "plain", "no rank mask");
  check_data_faults(&c, seed ^ 0xfa17);
  normal_round(&c, seed ^ 0x4e4f);
  release(&c);
  CHECK(ep_group_destroy(c.g) == EP_STATUS_SUCCESS, "ep_group_destroy: %s", ep_last_error(NULL));
}

/* ---- masked: the rank mask, R-1 masked by hand ---- */

/* A map call captured before the mask changed, replayed after: it reads the mask when it runs. */
static cudaGraphExec_t capture_map(ctx_t* c, const map_t* m, const int64_t* logical) {
  const ep_expert_map_t em = device_map(c, m);
  upload(c->d_in, logical, (size_t)MAP_TOKENS * TOPK * 8);
  inputs_ready();
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  CUDA_CHECK(cudaStreamBeginCapture(c->s, cudaStreamCaptureModeThreadLocal));
  const ep_status_t st = ep_map_experts(c->g, &em, c->d_in, c->d_out, MAP_TOKENS, TOPK, c->s);
  CUDA_CHECK(cudaStreamEndCapture(c->s, &graph));
  CHECK(st == EP_STATUS_SUCCESS, "rank %d: ep_map_experts in a capture: %s: %s", c->me, ep_status_string(st),
        ep_last_error(c->g));
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaGraphDestroy(graph);
  return exec;
}

static long replay_map(ctx_t* c, cudaGraphExec_t exec, const map_t* m, const int64_t* logical, const char* when) {
  int64_t want[MAP_TOKENS * TOPK];
  reference_map(c, m, c->me, logical, want, MAP_TOKENS);
  CUDA_CHECK(cudaMemsetAsync(c->d_out, 0xA5, sizeof(want), c->s));
  CUDA_CHECK(cudaGraphLaunch(exec, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  const long bad = compare_picks(c, when, c->d_out, want, MAP_TOKENS);
  CHECK(bad == 0, "rank %d: the captured map %s: %ld mismatches", c->me, when, bad);
  return bad;
}

/* One LL round of ids mapped on the device with R-1 masked on every rank. The survivors' picks never name R-1 and
 * lose nothing (every logical expert has a copy off R-1); R-1's name only its own slots. So no pick crosses the
 * mask, and the unmasked reference of the mapped ids is what the masked calls must give. */
static long ll_mapped_round(ctx_t* c, ll_bufs_t* b, int fp8, uint64_t seed) {
  const int R = c->R, me = c->me;
  ll_shape_t k = k_ll_shape;
  k.experts = E_LOC * R;
  k.fp8 = fp8;
  ll_world_t w;
  CHECK(ll_world_make(&w, &k, R, seed) == 0, "the reference rejected the world");
  map_t m;
  map_make(&m, R, seed ^ 0x3a9, 1);
  int64_t* logical_mine = NULL;
  long lost = 0, crossing = 0, bad = 0;
  for (int r = 0; r < R; ++r) {
    const int n = w.num_tokens[r];
    int64_t* logical = xmalloc((size_t)n * TOPK * 8 + 8);
    logical_make(logical, n, m.L, seed + 11 * (uint64_t)r);
    reference_map(c, &m, r, logical, w.idx[r], n);
    for (int i = 0; i < n * TOPK; ++i) {
      const int64_t s = w.idx[r][i];
      if (r != R - 1) lost += logical[i] >= 0 && s < 0;
      if (s >= 0) crossing += (r == R - 1) != (s / E_LOC == R - 1);
    }
    if (r == me) logical_mine = logical;
    else free(logical);
  }
  CHECK(lost == 0, "rank %d: the survivors lost %ld picks, though every logical expert has a copy off rank %d", me,
        lost, R - 1);
  CHECK(crossing == 0, "rank %d: %ld picks cross the mask", me, crossing);
  ep_ref_ll_dispatch_free(&w.disp);
  CHECK(ep_ref_ll_dispatch(&w.ref, fp8, 0, 0, &w.disp) == 0, "the reference rejected the mapped world");

  const int n = w.num_tokens[me];
  ll_load(b, &w, me);
  CUDA_CHECK(cudaMemset(b->idx, 0xFF, (size_t)n * TOPK * 8)); /* the dispatch takes the device's picks */
  int64_t* d_logical = dev_alloc((size_t)n * TOPK * 8);
  upload(d_logical, logical_mine, (size_t)n * TOPK * 8);
  const ep_expert_map_t em = device_map(c, &m);
  inputs_ready();
  EP_CHECK(c, ep_map_experts(c->g, &em, d_logical, (int64_t*)b->idx, n, TOPK, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  bad += compare_picks(c, "LL round's picks", b->idx, w.idx[me], n);

  ep_ll_dispatch_args_t da = ll_dispatch_args(b, &w, me);
  bad += EP_CHECK(c, ep_ll_dispatch(c->g, b->h, &da, c->s)) ? 0 : 1;
  CHECK_ASYNC_CLEAN(c, "the LL dispatch of mapped ids");
  bad += ll_check_dispatch(b, &w, me);
  ll_upload_y(b, &w, me);
  ep_ll_combine_args_t ca = ll_combine_args(b, &w);
  bad += EP_CHECK(c, ep_ll_combine(c->g, b->h, &ca, c->s)) ? 0 : 1;
  CHECK_ASYNC_CLEAN(c, "the LL combine of mapped ids");
  bad += ll_check_combine(b, &w, me);
  CHECK(bad == 0, "rank %d: LL round of mapped ids (seed 0x%016llx, fp8 %d): %ld mismatches", me,
        (unsigned long long)seed, fp8, bad);
  dev_free(d_logical);
  free(logical_mine);
  ll_world_free(&w);
  return bad;
}

static void run_masked(const harness_t* h, uint64_t seed) {
  ctx_t c;
  if (create(&c, h, 1) != 0) return;
  const int last = c.R - 1;
  check_maps(&c, seed, "masked", "no rank masked");

  map_t m;
  map_make(&m, c.R, seed ^ 0x9a9, 0);
  int64_t logical[MAP_TOKENS * TOPK];
  logical_make(logical, MAP_TOKENS, m.L, seed ^ (0x77 + (uint64_t)c.me));
  cudaGraphExec_t exec = capture_map(&c, &m, logical);
  long graph_bad = replay_map(&c, exec, &m, logical, "replayed, no rank masked");
  EP_CHECK(&c, ep_group_mask_rank(c.g, last, 1, c.s)); /* every rank, R-1 included */
  c.mask[last] = 1;
  graph_bad += replay_map(&c, exec, &m, logical, "replayed after rank R-1 was masked");
  cudaGraphExecDestroy(exec);
  printf("expert_map masked rank %d: a captured map call follows the mask set after the capture: %ld mismatches\n",
         c.me, graph_bad);

  check_maps(&c, seed ^ 0x5eed, "masked", "rank R-1 masked by hand");

  ll_bufs_t b;
  ll_shape_t max = k_ll_shape;
  max.experts = E_LOC * c.R;
  if (EP_CHECK(&c, ll_bufs_alloc(c.g, &b, &max, c.R))) {
    long bad = 0;
    int rounds = 0;
    for (int fp8 = 0; fp8 < 2; ++fp8)
      for (int i = 0; i < 2; ++i, ++rounds) bad += ll_mapped_round(&c, &b, fp8, seed + 100 + (uint64_t)rounds) != 0;
    printf("expert_map masked rank %d: %d LL rounds of mapped ids with rank %d masked, no pick of a survivor lost: "
           "%ld wrong\n",
           c.me, rounds, last, bad);
  }
  ll_bufs_free(&b);
  normal_round(&c, seed ^ 0x4e4f); /* the one-node normal path honours the mask: no mapped pick crosses it */
  release(&c);
  CHECK(ep_group_destroy(c.g) == EP_STATUS_SUCCESS, "ep_group_destroy with a masked rank: %s", ep_last_error(NULL));
}

int main(int argc, char** argv) {
  const char* part = argc > 1 ? argv[1] : "all";
  if (strcmp(part, "all") != 0 && strcmp(part, "plain") != 0 && strcmp(part, "masked") != 0) {
    fprintf(stderr, "usage: test_expert_map [plain|masked]\n");
    return TEST_FAIL;
  }
  harness_t h;
  int rc = harness_init(&h);
  if (rc != 0) return rc;
  if ((rc = harness_need_ranks(&h, 2)) != 0) return rc;
  if (h.num_ranks > LL_MAX_RANKS) {
    printf("SKIP test_expert_map: at most %d ranks\n", LL_MAX_RANKS);
    return TEST_SKIP;
  }
  const uint64_t seed = harness_seed(&h, "test_expert_map");
  if (strcmp(part, "masked") != 0) run_plain(&h, seed);
  if (strcmp(part, "plain") != 0) {
    if (strcmp(part, "all") == 0) {
      rc = harness_run_case(&h, "masked");
      CHECK(rc == 0, "the masked part's process ended with %d", rc);
    } else {
      run_masked(&h, seed);
    }
  }
  printf("test_expert_map %s rank %d: %s\n", part, h.rank, g_check_failures ? "FAIL" : "ok");
  return TEST_RESULT();
}
