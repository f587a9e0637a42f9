/* test_masking: the group's rank mask (config.mask_failed_ranks, issue 23) on the low-latency path and the normal
 * path, one node and several. The last rank, R-1, is the masked one. Modes (argv[1]; none: hand, what
 * tests/run_tests.sh runs):
 *   hand            every rank masks R-1 by hand (ep_group_mask_rank): LL rounds (BF16 and FP8, with and without the
 *                   receive hook, and with renormalize_masked) against the reference in which the survivors' tokens
 *                   lose their experts on R-1 and R-1's tokens keep only R-1's (it exchanges with nobody but
 *                   itself); recv_count and layout_range say 0 rows from a masked source; the mask reads {R-1}. Then
 *                   normal-path cases under the same mask (prepare + dispatch + combine: eager, cached, graph-safe;
 *                   BF16 and FP8) against the reference with the same experts dropped (counts, rows, top-k, sums).
 *                   Then the unmask: a dispatch before ep_ll_clean is refused, and after the clean full rounds are
 *                   right; the normal path, used while R-1 was masked, refuses a prepare (EP_STATUS_UNSUPPORTED).
 *   dispatch-death  R-1 dies by SIGKILL with no kernel in flight, before an LL dispatch that the others make: their
 *                   dispatch and combine succeed within the budget plus a slack, the mask reads {R-1}, the results
 *                   are the reference's with R-1's experts removed, and so are 100 more rounds of fresh routing;
 *                   then the group is destroyed on each survivor alone (EP_STATUS_SUCCESS).
 *   combine-death   the same, R-1 dying after a dispatch it took part in, before the combine.
 *   normal-dispatch-death, normal-combine-death
 *                   the same on the intranode normal path: R-1 dies after a prepare (and a dispatch) it took part in,
 *                   before the others' dispatch (combine); their calls succeed within the budget plus a slack, the
 *                   combine is the reference's with R-1's experts dropped, the dispatch's rows from R-1 are empty
 *                   (source -1), the mask reads {R-1}, and 100 masked cases after it are right.
 *   normal-partition-death
 *                   normal-dispatch-death with routing in which rank 1 exchanges no row with R-1 (neither way) while
 *                   rank 0 has rows from R-1, and rank 0 starts its dispatch PARTITION_DELAY_S late: rank 0 waits a
 *                   budget on the dead R-1 while rank 1, done with its dispatch, waits in its combine on rank 0 from
 *                   before rank 0's wait began. No survivor may mask another (after the calls no survivor's mask
 *                   holds a survivor, and rank 0's holds R-1; after the 100 cases every mask reads {R-1}), and the
 *                   calls and the cases are right. The delay makes certain the order that the race of the
 *                   starts gives at random; rank 0 is late by less than a budget, which alone never masks it.
 *   no-mask-death   a group without the mask: the same death as dispatch-death is the fatal fault of docs/faults.md
 *                   (EP_STATUS_TIMEOUT or EP_STATUS_PEER_FAILED), then ep_group_abort.
 *   internode-hand  a group of two virtual nodes (config.ranks_per_node = R/2; an even R): every rank masks R-1 by
 *                   hand, then 16 internode normal cases (BF16 and FP8; eager with host and device counts, cached,
 *                   graph-safe) against the reference with R-1's experts dropped and, since a token crosses nodes
 *                   only through its rail peer, every expert of R-1's node dropped from the tokens of the ranks
 *                   whose rail peer there R-1 is. Then the unmask, after which a prepare is refused.
 *   internode-hand-rounds
 *                   internode-hand in a group whose config.normal_region_bytes holds HAND_ROUND_TOKENS (16) tokens a
 *                   round in both regions: the cases of up to 48 tokens run in the 4 rounds of max_tokens_per_rank
 *                   64 (with the mask a call takes every round); in cases 6 and 14 rank R/2-1 alone has 48.
 *   internode-dispatch-death, internode-combine-death
 *                   normal-dispatch-death and normal-combine-death on those two nodes: the survivors' calls succeed
 *                   within the budget plus a slack, no survivor masks another, the combine is the reference's with
 *                   the internode-hand drops, the dispatch's rows from R-1 and through it (sources whose rail peer on
 *                   my node it is) are empty (source -1), and 100 masked cases after it are right; then every
 *                   survivor's mask reads {R-1}.
 * The death modes run under `ep_launch -k R-1` (tests/gpu/masking.sh runs every mode). Every survivor prints
 * "masking MODE rank R: ..." lines with the seconds from the death to its first correct masked call. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "gpu/ll_round.h"
#include "gpu/normal_runs.h"
#include "gpu/test_util.h"
#include "kernels/internode_region.h"

#define BUDGET_S 1.0       /* config.timeout_seconds of the death modes */
#define HAND_BUDGET_S 10.0 /* of the hand mode, where no wait runs out: a rank late by a moment is not masked */
#define SLACK_S 2.0        /* a call's outcome may come this long after the budget */
#define HAND_ROUND_TOKENS 16 /* tokens a round of internode-hand-rounds */
#define ROUNDS_AFTER_DEATH 100
#define PARTITION_DELAY_S 0.25 /* normal-partition-death: rank 0 starts its dispatch this late */

static const ll_shape_t k_shape = {
    .T = 32, .hidden = 2048, .topk = 4, .experts = 0, .fp8 = 0, .hook = 0, .neg = 5, .zero_rank = -1};

typedef struct {
  const harness_t* h;
  ep_group_t g;
  cudaStream_t s;
  ll_bufs_t b;
  int masked[LL_MAX_RANKS]; /* the mask every rank should read */
  int32_t* mask_dev;
  ep_handle_t handle; /* the normal path's */
  uint64_t seed;
  int rpn; /* ranks per virtual node of the internode modes; 0: one NVLink domain */
} ctx_t;

/* A world whose reference is the masked one: each rank's own top-k and weights are kept in orig_* (what it passes
 * to the calls), and w->idx drops what the mask drops (a masked rank keeps only its own experts; every other rank
 * drops the experts of masked ranks). With renorm, the weights are multiples of 1/8 (their sums exact in any order)
 * and the reference's kept weights are scaled as renormalize_masked scales them. */
typedef struct {
  ll_world_t w;
  int64_t* orig_idx[LL_MAX_RANKS];
  float* orig_w[LL_MAX_RANKS];
} masked_world_t;

static void masked_world_make(masked_world_t* m, const ll_shape_t* k, int R, uint64_t seed, const int* masked,
                              int renorm) {
  CHECK(ll_world_make(&m->w, k, R, seed) == 0, "the reference rejected the world (seed 0x%016llx)",
        (unsigned long long)seed);
  ll_world_t* w = &m->w;
  const int K = k->topk, E_loc = k->experts / R;
  for (int r = 0; r < R; ++r) {
    const int n = w->num_tokens[r];
    m->orig_idx[r] = xmalloc((size_t)n * K * 8 + 8);
    m->orig_w[r] = xmalloc((size_t)n * K * 4 + 4);
    for (int t = 0; t < n; ++t) {
      int64_t* idx = w->idx[r] + (size_t)t * K;
      float* wt = w->w[r] + (size_t)t * K;
      float all = 0.0f, kept = 0.0f;
      for (int j = 0; j < K; ++j) {
        if (renorm) wt[j] = (float)(1 + (int)(wt[j] * 8.0f)) / 8.0f;
        m->orig_idx[r][(size_t)t * K + j] = idx[j];
        m->orig_w[r][(size_t)t * K + j] = wt[j];
        if (idx[j] < 0) continue;
        const int owner = (int)(idx[j] / E_loc);
        all += wt[j];
        if (masked[r] ? owner != r : masked[owner]) idx[j] = -1;
        else kept += wt[j];
      }
      const float factor = kept != 0.0f ? all / kept : 0.0f;
      for (int j = 0; renorm && j < K; ++j) wt[j] *= factor;
    }
  }
  ep_ref_ll_dispatch_free(&w->disp);
  CHECK(ep_ref_ll_dispatch(&w->ref, k->fp8, 0, 0, &w->disp) == 0, "the reference rejected the masked world");
}

static void masked_world_free(masked_world_t* m) {
  for (int r = 0; r < m->w.R; ++r) {
    free(m->orig_idx[r]);
    free(m->orig_w[r]);
  }
  ll_world_free(&m->w);
}

/* This rank's inputs as it passes them (the unmasked top-k and weights), every output poisoned. */
static void masked_load(ctx_t* c, const masked_world_t* m) {
  const int me = c->h->rank, n = m->w.num_tokens[me], K = m->w.k.topk;
  ll_load(&c->b, &m->w, me);
  upload(c->b.idx, m->orig_idx[me], (size_t)n * K * 8);
  upload(c->b.w, m->orig_w[me], (size_t)n * K * 4);
}

/* layout_range against the reference: per (local expert, source) the rows the reference placed, 0 from a masked
 * source, each run starting where the previous source's ended. */
static long check_layout(const ctx_t* c, const ll_world_t* w) {
  const int me = c->h->rank, R = w->R;
  const int E_loc = w->k.experts / R;
  const int64_t* lr_dev = NULL;
  if (!EP_CHECK(c, ep_ll_get_routing(c->b.h, NULL, &lr_dev))) return 1;
  int64_t* lr = download(lr_dev, (size_t)E_loc * R * 8);
  const ep_ref_ll_recv_t* rr = &w->disp.recv[me];
  long bad = 0;
  for (int le = 0; le < E_loc; ++le) {
    int begin = 0;
    for (int s = 0; s < R; ++s) {
      int want = 0;
      for (int i = 0; i < rr->count[le]; ++i) want += rr->src_rank[rr->expert_offset[le] + i] == s;
      const int got = (int)(uint32_t)lr[(size_t)le * R + s], got_begin = (int)(lr[(size_t)le * R + s] >> 32);
      if ((got != want || got_begin != begin) && bad++ < LL_MAX_REPORTS)
        fprintf(stderr, "rank %d: layout_range[%d][%d] = (%d, %d), want (%d, %d)%s\n", me, le, s, got_begin, got, begin,
                want, c->masked[s] ? " (a masked source)" : "");
      CHECK(!(c->masked[s] && s != me && got != 0), "rank %d: %d rows from masked rank %d", me, got, s);
      begin += want;
    }
  }
  free(lr);
  return bad;
}

/* The mask this rank reads is c->masked. */
static void check_mask(ctx_t* c, const char* when) {
  const int R = c->h->num_ranks;
  if (!EP_CHECK(c, ep_group_get_rank_mask(c->g, c->mask_dev, c->s))) return;
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  int32_t* got = download(c->mask_dev, (size_t)R * 4);
  for (int r = 0; r < R; ++r)
    CHECK(got[r] == c->masked[r], "rank %d, %s: mask[%d] = %d, want %d", c->h->rank, when, r, got[r], c->masked[r]);
  free(got);
}

/* A call's outcome once the stream has drained: its status and the error word's. */
static int call_ok(ctx_t* c, ep_status_t st, const char* what) {
  CHECK(st == EP_STATUS_SUCCESS, "rank %d: %s: %s: %s", c->h->rank, what, ep_status_string(st), ep_last_error(c->g));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  ep_status_t async = EP_STATUS_INTERNAL_ERROR;
  ep_get_async_error(c->g, &async);
  CHECK(async == EP_STATUS_SUCCESS, "rank %d: %s, async: %s: %s", c->h->rank, what, ep_status_string(async),
        ep_last_error(c->g));
  return st == EP_STATUS_SUCCESS && async == EP_STATUS_SUCCESS;
}

static ep_status_t dispatch(ctx_t* c, const ll_world_t* w) {
  ep_ll_dispatch_args_t a = ll_dispatch_args(&c->b, w, c->h->rank);
  ep_status_t st = ep_ll_dispatch(c->g, c->b.h, &a, c->s);
  if (st == EP_STATUS_SUCCESS && w->k.hook) st = ep_ll_dispatch_recv(c->g, c->b.h, c->s);
  return st;
}

static ep_status_t combine(ctx_t* c, const ll_world_t* w, int renorm) {
  ep_ll_combine_args_t a = ll_combine_args(&c->b, w);
  a.renormalize_masked = renorm;
  ep_status_t st = ep_ll_combine(c->g, c->b.h, &a, c->s);
  if (st == EP_STATUS_SUCCESS && w->k.hook) st = ep_ll_combine_recv(c->g, c->b.h, c->s);
  return st;
}

/* One round under the mask: dispatch, its checks, the experts' outputs, combine, its check. Returns mismatches. */
static long masked_round(ctx_t* c, const masked_world_t* m, int renorm) {
  const int me = c->h->rank;
  masked_load(c, m);
  long bad = call_ok(c, dispatch(c, &m->w), "LL dispatch") ? 0 : 1;
  bad += ll_check_dispatch(&c->b, &m->w, me) + check_layout(c, &m->w);
  ll_upload_y(&c->b, &m->w, me);
  bad += call_ok(c, combine(c, &m->w, renorm), "LL combine") ? 0 : 1;
  bad += ll_check_combine(&c->b, &m->w, me);
  CHECK(bad == 0, "rank %d: masked LL round (seed 0x%016llx, fp8 %d, hook %d, renormalize %d): %ld mismatches", me,
        (unsigned long long)m->w.seed, m->w.k.fp8, m->w.k.hook, renorm, bad);
  return bad;
}

static ll_shape_t shape_of(const ctx_t* c, int fp8, int hook) {
  ll_shape_t k = k_shape;
  k.experts = 8 * c->h->num_ranks;
  k.fp8 = fp8;
  k.hook = hook;
  return k;
}

/* round_tokens > 0 (virtual nodes only): the normal path's pool holds that many tokens a round. */
static int create(ctx_t* c, const harness_t* h, int mask_on, double budget, int rpn, int round_tokens) {
  memset(c, 0, sizeof(*c));
  c->h = h;
  c->rpn = rpn;
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ranks_per_node = rpn;
  cfg.num_experts = 8 * h->num_ranks;
  cfg.hidden = k_shape.hidden;
  cfg.max_tokens_per_rank = 64;
  cfg.max_topk = 8;
  cfg.ll_max_tokens_per_rank = k_shape.T;
  cfg.timeout_seconds = budget;
  cfg.mask_failed_ranks = mask_on;
  if (round_tokens > 0 && rpn > 0)
    cfg.normal_region_bytes =
        ep_normal_region(h->num_ranks, cfg.num_experts, round_tokens, cfg.hidden, cfg.max_topk).total_bytes +
        ep_internode_region(h->num_ranks, rpn, cfg.num_experts, round_tokens, cfg.hidden, cfg.max_topk).total_bytes;
  const ep_status_t st = harness_group_create(h, &cfg, &c->g);
  CHECK(st == EP_STATUS_SUCCESS, "rank %d: ep_group_create: %s: %s", h->rank, ep_status_string(st),
        ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return 1;
  CUDA_CHECK(cudaStreamCreateWithFlags(&c->s, cudaStreamNonBlocking));
  ll_shape_t max = shape_of(c, 0, 0);
  if (!EP_CHECK(c, ll_bufs_alloc(c->g, &c->b, &max, h->num_ranks))) return 1;
  c->mask_dev = dev_alloc((size_t)h->num_ranks * 4);
  if (!EP_CHECK(c, ep_handle_create(c->g, &c->handle))) return 1;
  return 0;
}

/* ---- the intranode normal path under the mask ---- */
static normal_ctx_t normal_ctx(const ctx_t* c) {
  normal_ctx_t n;
  memset(&n, 0, sizeof(n));
  n.g = c->g;
  n.handle = c->handle;
  n.s = c->s;
  n.R = c->h->num_ranks;
  n.me = c->h->rank;
  n.max_experts = 8 * c->h->num_ranks;
  n.seed = c->seed;
  n.rpn = c->rpn;
  return n;
}

/* Case i of the masked normal runs: BF16 and FP8, top-k 4 and 8, random and repeating routing, a rank without
 * tokens, one rank with all the tokens (in internode-hand-rounds, the rank that reaches node 1 only through the
 * masked R-1: node 1 has no count of it, node 0 has), one token; always the cached dispatch too. */
static case_t normal_case(int i) {
  case_t k = {48, VARY_NONE, k_shape.hidden, 4, i & 1, TOPK_IDX_WEIGHTS, ROUTE_RANDOM, 1, 8, 1, 0, 1};
  if (i % 3 == 1) k.topk = 8;
  if (i % 4 == 1) k.routing = ROUTE_REPEAT;
  if (i % 4 == 2) k.vary = i % 8 == 6 ? VARY_PEAK : VARY_LAST;
  if (i % 8 == 3) k.tokens = 1;
  if (i % 4 == 3) k.alignment = 4;
  return k;
}

static long normal_masked_cases(ctx_t* c, int first, int count) {
  const normal_ctx_t n = normal_ctx(c);
  long failed = 0;
  for (int i = first; i < first + count; ++i) {
    const case_t k = normal_case(i);
    failed += normal_run_masked_case(&n, &k, i, c->masked);
  }
  return failed;
}

/* ---- the internode normal path under the mask (virtual nodes of c->rpn ranks) ---- */

/* A remote node's partial sum is rounded to bf16 before the last hop (docs/internode.md): the small-integer payload
 * must be bit-identical, the random one within (2^-7 + 2^-8) * sum|terms| * 1.02 (test_internode's rule). */
static int within_partial_rounding(const world_t* w, const expect_t* e, size_t i, float got, float want) {
  const float bound = (ldexpf(1.0f, -7) + ldexpf(1.0f, -8)) * ep_ref_bf16_to_f32(e->abs_x[i]) * 1.02f;
  return !w->exact && fabsf(got - want) <= bound;
}
static const combine_rule_t k_partial_rounding = {within_partial_rounding,
                                                  "values within the partial-rounding bound, not bit-identical"};

/* Whether source s's rows and copies cross to node m through a masked rail peer (rank m * rpn + s % rpn). */
static int rail_masked(const int* masked, int rpn, int s, int m) { return m != s / rpn && masked[m * rpn + s % rpn]; }

/* world_drop_masked, and the rail peer: a token of rank r reaches node m only through r's rail peer there, so with
 * that rank masked r's tokens lose every expert of node m (the reference the internode masked calls must give). */
static void world_drop_internode(world_t* w, const int* masked, int rpn, int64_t** orig) {
  world_drop_masked(w, masked, orig);
  const int K = w->topk, E_loc = w->num_experts / w->R;
  for (int r = 0; r < w->R; ++r)
    for (size_t i = 0; i < (size_t)w->num_tokens[r] * (size_t)K; ++i)
      if (w->idx[r][i] >= 0 && rail_masked(masked, rpn, r, (int)(w->idx[r][i] / E_loc) / rpn)) w->idx[r][i] = -1;
}

/* Swap the top-k a world holds: the dropped one (for the reference) and the original one (for the calls). */
static void swap_topk(world_t* w, int64_t** other) {
  for (int r = 0; r < w->R; ++r) {
    int64_t* t = w->idx[r];
    w->idx[r] = other[r];
    other[r] = t;
  }
}

/* This rank's inputs with the unmasked top-k, as the calls get them. */
static void upload_unmasked(bufs_t* b, world_t* w, int me, int64_t** orig) {
  swap_topk(w, orig);
  bufs_upload_inputs(b, w, me, NULL, NULL);
  swap_topk(w, orig);
}

/* One internode case under the mask c->masked (the same on every rank): eager (host and device counts, dispatch,
 * combine), a cached dispatch of new payload, graph-safe, each against the reference run over the top-k that
 * world_drop_internode leaves. Returns 1 when a check failed. */
static int inter_masked_case(ctx_t* c, const case_t* k, int index) {
  const int before = g_check_failures, R = c->h->num_ranks, me = c->h->rank;
  const uint64_t case_seed = c->seed + 0x2545f4914f6cdd1dull * (uint64_t)(index + 1);
  world_t w;
  world_build(&w, k, R, 8 * R, case_seed, case_seed, index % 2 == 0);
  int64_t* orig[MAX_RANKS];
  world_drop_internode(&w, c->masked, c->rpn, orig);
  expect_t e;
  expect_build(&e, &w, k->alignment, me, NULL, NULL, 1);
  const ep_ref_recv_t* want = &e.disp.recv[me];
  bufs_t b;
  bufs_alloc_inputs(&b, &w, me);
  upload_unmasked(&b, &w, me, orig);

  const int E_loc = w.num_experts / R;
  int num_recv = -1;
  int* counts = xmalloc((size_t)E_loc * sizeof(int));
  bufs_poison_counts(&b, &w, c->s);
  ep_dispatch_prepare_args_t pa = prepare_args(&w, me, &b, k->alignment, &num_recv, counts, 1);
  EP_CHECK(c, ep_dispatch_prepare(c->g, c->handle, &pa, c->s));
  const int got_num_recv = num_recv;
  if (num_recv < 0 || num_recv > R * k->tokens) num_recv = want->num_recv; /* fails below; the calls go on */
  bufs_alloc_outputs(&b, &w, num_recv);
  bufs_poison(&b, &w, me, c->s);
  const ep_dispatch_args_t da = dispatch_args(&w, &b, k->sms);
  EP_CHECK(c, ep_dispatch(c->g, c->handle, &da, c->s));
  upload_y(&b, &w, &e, me);
  const ep_combine_args_t ca = combine_args(&w, &b, 0, k->sms);
  EP_CHECK(c, ep_combine(c->g, c->handle, &ca, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  check_dispatch("internode masked, eager", &w, want, &b, &got_num_recv, counts, 0);
  check_dev_counts("internode masked, eager", &w, want, &b);
  check_combine("internode masked, eager", &w, me, &e, &b, &k_partial_rounding);
  free(counts);

  if (k->cached) { /* the same routing, new payload, through the handle */
    world_payload(&w, case_seed, 2);
    expect_free(&e);
    expect_build(&e, &w, k->alignment, me, NULL, NULL, 1);
    want = &e.disp.recv[me];
    upload_unmasked(&b, &w, me, orig);
    bufs_poison(&b, &w, me, c->s);
    EP_CHECK(c, ep_dispatch(c->g, c->handle, &da, c->s));
    CUDA_CHECK(cudaStreamSynchronize(c->s));
    check_dispatch("internode masked, cached", &w, want, &b, NULL, NULL, 0);
  }

  const int most = max_tokens_of(&w);
  bufs_alloc_outputs(&b, &w, R * (most > 0 ? most : 1)); /* graph-safe: room for every row, counts on the device */
  bufs_poison_counts(&b, &w, c->s);
  bufs_poison(&b, &w, me, c->s);
  pa = prepare_args(&w, me, &b, k->alignment, NULL, NULL, 1);
  EP_CHECK(c, ep_dispatch_prepare(c->g, c->handle, &pa, c->s));
  const ep_dispatch_args_t ga = dispatch_args(&w, &b, k->sms);
  EP_CHECK(c, ep_dispatch(c->g, c->handle, &ga, c->s));
  upload_y(&b, &w, &e, me);
  const ep_combine_args_t gc = combine_args(&w, &b, 0, k->sms);
  EP_CHECK(c, ep_combine(c->g, c->handle, &gc, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  int* n = download(b.num_recv, sizeof(int));
  int* dev_counts = download(b.expert_counts, (size_t)E_loc * sizeof(int));
  check_dispatch("internode masked, graph-safe", &w, want, &b, n, dev_counts, 1);
  check_combine("internode masked, graph-safe", &w, me, &e, &b, &k_partial_rounding);
  free(n);
  free(dev_counts);

  bufs_free(&b);
  const int failed = g_check_failures != before;
  if (failed)
    printf("rank %d: internode masked case %d FAILED (seed 0x%016llx, replay with EP_TEST_SEED): fp8 %d topk %d\n", me,
           index, (unsigned long long)c->seed, k->fp8, k->topk);
  expect_free(&e);
  for (int r = 0; r < R; ++r) free(orig[r]);
  world_free(&w);
  return failed;
}

static long inter_masked_cases(ctx_t* c, int first, int count) {
  long failed = 0;
  for (int i = first; i < first + count; ++i) {
    const case_t k = normal_case(i);
    failed += inter_masked_case(c, &k, i);
  }
  return failed;
}

/* After an unmask, in a group whose normal path ran while a rank was masked: a prepare is refused
 * (EP_STATUS_UNSUPPORTED naming the unmask) before any kernel runs. */
static void check_prepare_refused(ctx_t* c, uint64_t seed, const char* name) {
  const int R = c->h->num_ranks, me = c->h->rank;
  world_t w;
  const case_t k = normal_case(0);
  world_build(&w, &k, R, 8 * R, seed ^ 0x77, seed ^ 0x77, 1);
  bufs_t b;
  bufs_alloc_inputs(&b, &w, me);
  ep_dispatch_prepare_args_t pa = prepare_args(&w, me, &b, 1, NULL, NULL, 0);
  const ep_status_t st = ep_dispatch_prepare(c->g, c->handle, &pa, c->s);
  CHECK(st == EP_STATUS_UNSUPPORTED && strstr(ep_last_error(c->g), "unmasked"),
        "rank %d: %s: a normal prepare after the unmask: %s: %s", me, name, ep_status_string(st), ep_last_error(c->g));
  printf("masking %s rank %d: a normal prepare after the unmask: %s\n", name, me, ep_status_string(st));
  bufs_free(&b);
  world_free(&w);
}

/* internode-hand: every rank masks R-1 by hand before the cases; after them the unmask, after which the normal path
 * refuses the group. */
static void run_internode_hand(ctx_t* c, const char* name) {
  const int R = c->h->num_ranks, me = c->h->rank, last = R - 1;
  EP_CHECK(c, ep_group_mask_rank(c->g, last, 1, c->s));
  c->masked[last] = 1;
  check_mask(c, "after masking by hand");
  const int cases = 16;
  const long failed = inter_masked_cases(c, 0, cases);
  printf("masking %s rank %d: %d internode cases (%d nodes of %d; BF16 and FP8; eager, cached, graph-safe) with "
         "rank %d masked by hand, %ld failed\n",
         name, me, cases, R / c->rpn, c->rpn, last, failed);
  check_mask(c, "after the cases");
  CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(harness_barrier(c->h, "before-unmask") == 0, "rank %d: harness barrier before-unmask", me);
  EP_CHECK(c, ep_group_mask_rank(c->g, last, 0, c->s));
  c->masked[last] = 0;
  check_prepare_refused(c, c->seed, name);
}

/* ---- hand: every rank masks R-1, rounds, unmask, clean, rounds ---- */
static void run_hand(ctx_t* c, uint64_t seed) {
  const int R = c->h->num_ranks, me = c->h->rank, last = R - 1;
  EP_CHECK(c, ep_group_mask_rank(c->g, last, 1, c->s));
  c->masked[last] = 1;
  check_mask(c, "after masking by hand");
  long bad = 0;
  int rounds = 0;
  for (int fp8 = 0; fp8 < 2; ++fp8)
    for (int hook = 0; hook < 2; ++hook)
      for (int renorm = 0; renorm < 2; ++renorm)
        for (int i = 0; i < 2; ++i, ++rounds) { /* both buffer halves */
          const ll_shape_t k = shape_of(c, fp8, hook);
          masked_world_t m;
          masked_world_make(&m, &k, R, seed + (uint64_t)rounds, c->masked, renorm);
          bad += masked_round(c, &m, renorm);
          masked_world_free(&m);
        }
  printf("masking hand rank %d: %d rounds with rank %d masked by hand, %ld mismatches\n", me, rounds, last, bad);
  const int normal_cases = 8;
  const long normal_failed = normal_masked_cases(c, 0, normal_cases);
  printf("masking hand rank %d: %d normal cases (eager, cached, graph-safe) with rank %d masked by hand, %ld failed\n",
         me, normal_cases, last, normal_failed);
  check_mask(c, "after the masked rounds");
  /* R-1 made its calls apart from the others: every rank gets here before the unmask and the clean's barrier. */
  CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(harness_barrier(c->h, "before-unmask") == 0, "rank %d: harness barrier before-unmask", me);

  /* The unmask takes effect at ep_ll_clean: a dispatch before it is refused (on every rank alike). */
  EP_CHECK(c, ep_group_mask_rank(c->g, last, 0, c->s));
  c->masked[last] = 0;
  ll_world_t w;
  const ll_shape_t k = shape_of(c, 0, 0);
  CHECK(ll_world_make(&w, &k, R, seed ^ 0x5555) == 0, "the reference rejected the world");
  ll_load(&c->b, &w, me);
  ep_ll_dispatch_args_t a = ll_dispatch_args(&c->b, &w, me);
  const ep_status_t refused = ep_ll_dispatch(c->g, c->b.h, &a, c->s);
  CHECK(refused == EP_STATUS_INVALID_USAGE && strstr(ep_last_error(c->g), "ep_ll_clean"),
        "rank %d: a dispatch after the unmask, before ep_ll_clean: %s: %s", me, ep_status_string(refused),
        ep_last_error(c->g));
  ll_world_free(&w);
  EP_CHECK(c, ep_ll_clean(c->g, c->s));
  check_mask(c, "after the unmask and ep_ll_clean");
  long full_bad = 0;
  for (int fp8 = 0; fp8 < 2; ++fp8)
    for (int hook = 0; hook < 2; ++hook)
      for (int i = 0; i < 2; ++i) {
        const ll_shape_t kk = shape_of(c, fp8, hook);
        CHECK(ll_world_make(&w, &kk, R, seed + 1000 + (uint64_t)(4 * fp8 + 2 * hook + i)) == 0, "reference");
        full_bad += ll_run_round(c->g, c->s, &c->b, &w, me) != 0;
        ll_world_free(&w);
      }
  printf("masking hand rank %d: after the unmask and ep_ll_clean, 8 full rounds, %ld wrong\n", me, full_bad);

  /* The normal path ran while R-1 was masked: it refuses the unmasked group (no call reaches a kernel). */
  check_prepare_refused(c, seed, "hand");
}

/* ---- the death modes ---- */
enum death {
  DEATH_BEFORE_DISPATCH,
  DEATH_BEFORE_COMBINE,
  DEATH_NO_MASK,
  DEATH_NORMAL_DISPATCH,
  DEATH_NORMAL_COMBINE,
  DEATH_NORMAL_PARTITION,
  DEATH_INTERNODE_DISPATCH,
  DEATH_INTERNODE_COMBINE
};

static void die_now(void) {
  fflush(stdout);
  fflush(stderr);
  raise(SIGKILL);
}

/* Every rank has finished every call (no kernel in flight anywhere), then R-1 dies. */
static void sync_then_maybe_die(ctx_t* c, const char* name) {
  CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(harness_barrier(c->h, name) == 0, "rank %d: harness barrier %s", c->h->rank, name);
  if (c->h->rank == c->h->num_ranks - 1) die_now();
}

static void run_death(ctx_t* c, uint64_t seed, enum death mode, const char* name) {
  const int R = c->h->num_ranks, me = c->h->rank, last = R - 1;
  ll_world_t w;
  const ll_shape_t k = shape_of(c, 1, 0);
  for (int i = 0; i < 2; ++i) { /* both halves acknowledged by every rank */
    CHECK(ll_world_make(&w, &k, R, seed + (uint64_t)i) == 0, "reference");
    CHECK(ll_run_round(c->g, c->s, &c->b, &w, me) == 0, "rank %d: a round before the death", me);
    ll_world_free(&w);
  }
  int dead[LL_MAX_RANKS] = {0};
  dead[last] = 1;
  masked_world_t m;
  masked_world_make(&m, &k, R, seed + 2, dead, 0);
  double t_death = 0;
  long bad = 0;
  if (mode == DEATH_BEFORE_COMBINE) {
    ll_world_t full; /* the dispatch is whole: R-1 takes part */
    CHECK(ll_world_make(&full, &k, R, seed + 2) == 0, "reference");
    masked_load(c, &m); /* the same inputs as the full world's */
    bad += call_ok(c, dispatch(c, &full), "LL dispatch before the death") ? 0 : 1;
    bad += ll_check_dispatch(&c->b, &full, me);
    ll_upload_y(&c->b, &full, me);
    ll_world_free(&full);
    sync_then_maybe_die(c, "before-combine");
    t_death = now_s();
    const ep_status_t st = combine(c, &m.w, 0);
    bad += call_ok(c, st, "LL combine after the death") ? 0 : 1;
  } else {
    sync_then_maybe_die(c, "before-dispatch");
    t_death = now_s();
    masked_load(c, &m);
    const ep_status_t st = dispatch(c, &m.w);
    if (mode == DEATH_NO_MASK) {
      CUDA_CHECK(cudaStreamSynchronize(c->s));
      ep_status_t async = EP_STATUS_INTERNAL_ERROR;
      ep_get_async_error(c->g, &async);
      const ep_status_t seen = st != EP_STATUS_SUCCESS ? st : async;
      const double dt = now_s() - t_death;
      printf("masking %s rank %d: dispatch %s, then %s after %.3f s: %s\n", name, me, ep_status_string(st),
             ep_status_string(async), dt, ep_last_error(c->g));
      CHECK(seen == EP_STATUS_TIMEOUT || seen == EP_STATUS_PEER_FAILED,
            "rank %d: without the mask a dead peer is fatal, got %s", me, ep_status_string(seen));
      CHECK(dt < BUDGET_S + SLACK_S, "rank %d: the fault came after %.3f s", me, dt);
      const double t_abort = now_s();
      CHECK(ep_group_abort(c->g) == EP_STATUS_SUCCESS, "rank %d: ep_group_abort", me);
      printf("masking %s rank %d: ep_group_abort in %.3f s\n", name, me, now_s() - t_abort);
      c->g = NULL;
      masked_world_free(&m);
      return;
    }
    bad += call_ok(c, st, "LL dispatch after the death") ? 0 : 1;
    bad += ll_check_dispatch(&c->b, &m.w, me) + check_layout(c, &m.w);
    ll_upload_y(&c->b, &m.w, me);
    bad += call_ok(c, combine(c, &m.w, 0), "LL combine after the death") ? 0 : 1;
  }
  const double t_call = now_s() - t_death;
  c->masked[last] = 1;
  check_mask(c, "after the death");
  bad += ll_check_combine(&c->b, &m.w, me);
  const double t_correct = now_s() - t_death;
  masked_world_free(&m);
  CHECK(bad == 0, "rank %d: the call after the death: %ld mismatches", me, bad);
  CHECK(t_call < BUDGET_S + SLACK_S, "rank %d: the masked call took %.3f s (budget %.1f s + slack %.1f s)", me, t_call,
        BUDGET_S, SLACK_S);
  printf("masking %s rank %d: rank %d masked; first call done %.3f s and checked correct %.3f s after the death "
         "(budget %.1f s)\n",
         name, me, last, t_call, t_correct, BUDGET_S);

  long later_bad = 0;
  const double t0 = now_s();
  for (int i = 0; i < ROUNDS_AFTER_DEATH; ++i) {
    masked_world_t mm;
    const ll_shape_t kk = shape_of(c, i & 1, (i >> 1) & 1);
    masked_world_make(&mm, &kk, R, seed + 100 + (uint64_t)i, c->masked, 0);
    later_bad += masked_round(c, &mm, 0) != 0;
    masked_world_free(&mm);
  }
  printf("masking %s rank %d: %d rounds after the death in %.3f s, %ld wrong\n", name, me, ROUNDS_AFTER_DEATH,
         now_s() - t0, later_bad);
  check_mask(c, "after the rounds");
  const double t_destroy = now_s();
  ll_bufs_free(&c->b);
  const ep_status_t st = ep_group_destroy(c->g);
  CHECK(st == EP_STATUS_SUCCESS, "rank %d: ep_group_destroy with a masked rank: %s: %s", me, ep_status_string(st),
        ep_last_error(NULL));
  printf("masking %s rank %d: ep_group_destroy (local) in %.3f s\n", name, me, now_s() - t_destroy);
  c->g = NULL;
}

/* combined_x within a bf16 rounding of the reference (the sums are exact with the exact payload). */
static int within_rounding(const world_t* w, const expect_t* e, size_t i, float got, float want) {
  (void)w;
  (void)e;
  (void)i;
  return fabsf(got - want) <= fabsf(want) * (1.0f / 128.0f);
}
static const combine_rule_t k_rounding = {within_rounding, "within a bf16 rounding"};

/* normal-partition-death's routing: rank 1 sends nothing to `last` and receives nothing from it; rank 0 receives
 * from it (its first token names rank 0's first expert unless it names one of rank 0's already). */
static void isolate_rank1(world_t* w, int last) {
  const int K = w->topk, E_loc = w->num_experts / w->R;
  for (int t = 0; t < w->num_tokens[1]; ++t)
    for (int j = 0; j < K; ++j)
      if (w->idx[1][(size_t)t * K + j] / E_loc == last) w->idx[1][(size_t)t * K + j] = -1;
  for (int t = 0; t < w->num_tokens[last]; ++t)
    for (int j = 0; j < K; ++j)
      if (w->idx[last][(size_t)t * K + j] / E_loc == 1) w->idx[last][(size_t)t * K + j] = -1;
  int to_rank0 = 0;
  for (int j = 0; j < K; ++j) to_rank0 |= w->idx[last][j] >= 0 && w->idx[last][j] / E_loc == 0;
  if (!to_rank0) w->idx[last][0] = 0;
}

/* After the calls of a death: no survivor is masked (the survivors split), and, where `last_masked`, R-1 is (a
 * survivor that exchanged nothing with it in those calls has not waited on it yet: its next wait masks it). */
static void check_survivors_unmasked(ctx_t* c, const char* name, int last_masked) {
  const int R = c->h->num_ranks, me = c->h->rank, last = R - 1;
  if (!EP_CHECK(c, ep_group_get_rank_mask(c->g, c->mask_dev, c->s))) return;
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  int32_t* got = download(c->mask_dev, (size_t)R * 4);
  printf("masking %s rank %d: mask after the death calls:", name, me);
  for (int r = 0; r < R; ++r) printf(" %d", got[r]);
  printf("\n");
  for (int r = 0; r < last; ++r)
    CHECK(got[r] == 0, "rank %d: survivor %d is masked (mask[%d] = %d): the survivors split", me, r, r, got[r]);
  CHECK(!last_masked || got[last] == 1, "rank %d: mask[%d] = %d after the death, want 1", me, last, got[last]);
  free(got);
}

/* The normal path, of one node or (c->rpn > 0) of several: R-1 dies after a prepare (and, before_combine, a
 * dispatch) it took part in; `partition`: with isolate_rank1's routing and rank 0 late (normal-partition-death).
 * The survivors' calls succeed within the budget and a slack; the combine is the reference's with R-1's experts
 * dropped (and, on several nodes, for tokens whose rail peer on R-1's node is R-1, every expert of that node); the
 * dispatch's rows from R-1 (and through it) are empty (source -1), the others as prepared. */
static void run_normal_death(ctx_t* c, uint64_t seed, int before_combine, int partition, const char* name) {
  const int R = c->h->num_ranks, me = c->h->rank, last = R - 1, rpn = c->rpn, inter = rpn > 0;
  const char* path = inter ? "internode" : "normal";
  long (*masked_cases)(ctx_t*, int, int) = inter ? inter_masked_cases : normal_masked_cases;
  const case_t k = {48, VARY_NONE, k_shape.hidden, 4, 0, TOPK_IDX_WEIGHTS, ROUTE_RANDOM, 1, 8, 1, 0, 0};
  CHECK(masked_cases(c, 0, 2) == 0, "rank %d: %s cases before the death", me, path);
  world_t w;
  world_build(&w, &k, R, 8 * R, seed + 7, seed + 7, 1);
  if (partition) {
    CHECK(R >= 3 && w.num_tokens[last] > 0, "rank %d: %s needs 3 ranks and tokens on rank %d", me, name, last);
    isolate_rank1(&w, last);
  }
  bufs_t b;
  bufs_alloc_inputs(&b, &w, me);
  bufs_upload_inputs(&b, &w, me, NULL, NULL);
  int num_recv = -1;
  ep_dispatch_prepare_args_t pa = prepare_args(&w, me, &b, 1, &num_recv, NULL, 0);
  EP_CHECK(c, ep_dispatch_prepare(c->g, c->handle, &pa, c->s));
  CHECK(num_recv >= 0 && num_recv <= R * k.tokens, "rank %d: prepare before the death: num_recv %d", me, num_recv);
  if (num_recv < 0 || num_recv > R * k.tokens) num_recv = R * k.tokens;
  bufs_alloc_outputs(&b, &w, num_recv);
  bufs_poison(&b, &w, me, c->s);
  const ep_dispatch_args_t da = dispatch_args(&w, &b, k.sms);
  if (before_combine) (void)call_ok(c, ep_dispatch(c->g, c->handle, &da, c->s), "dispatch before the death");
  sync_then_maybe_die(c, name);
  const double t_death = now_s();
  if (partition && me == 0) {
    const struct timespec late = {0, (long)(PARTITION_DELAY_S * 1e9)};
    nanosleep(&late, NULL);
  }
  long bad = 0;
  if (!before_combine) bad += call_ok(c, ep_dispatch(c->g, c->handle, &da, c->s), "dispatch after the death") ? 0 : 1;
  const ep_combine_args_t ca = combine_args(&w, &b, 0, k.sms); /* BF16: y is recv_x, rows from R-1 go back to it */
  bad += call_ok(c, ep_combine(c->g, c->handle, &ca, c->s), "combine after the death") ? 0 : 1;
  const double t_call = now_s() - t_death;
  c->masked[last] = 1;
  if (inter || partition) check_survivors_unmasked(c, name, partition && me != 1);
  else check_mask(c, "after the death");
  int64_t* orig[MAX_RANKS];
  if (inter) world_drop_internode(&w, c->masked, rpn, orig);
  else world_drop_masked(&w, c->masked, orig);
  expect_t e;
  expect_build(&e, &w, 1, me, NULL, NULL, inter); /* the partial-rounding bound needs the sums of |terms| */
  const int before = g_check_failures;
  check_combine(name, &w, me, &e, &b, inter ? &k_partial_rounding : &k_rounding);
  if (!before_combine) {
    ep_ref_world_t rw = {0};
    rw.num_ranks = R;
    rw.ranks_per_node = R;
    rw.num_experts = w.num_experts;
    rw.num_topk = w.topk;
    rw.num_tokens = w.num_tokens;
    rw.topk_idx = (const int64_t* const*)orig; /* the routing that was prepared: R-1 took part */
    ep_ref_dispatch_t full;
    CHECK(ep_ref_dispatch(&rw, 1, &full) == 0, "the reference rejected the prepared world");
    int* src = num_recv > 0 ? download(b.recv_src, (size_t)num_recv * 4) : NULL;
    const ep_ref_recv_t* want = &full.recv[me];
    CHECK(want->num_recv == num_recv, "rank %d: prepared %d rows, the reference %d", me, num_recv, want->num_recv);
    for (int i = 0; i < num_recv && i < want->num_recv; ++i) {
      const int s = want->src_rank[i];
      const int empty = c->masked[s] || (inter && rail_masked(c->masked, rpn, s, me / rpn));
      const int expect_src = empty ? -1 : want->src_idx[i];
      if (src[i] != expect_src && bad++ < 4)
        fprintf(stderr, "rank %d: %s: recv_src_idx[%d] = %d (from rank %d), want %d\n", me, name, i, src[i], s,
                expect_src);
    }
    free(src);
    ep_ref_dispatch_free(&full);
  }
  bad += g_check_failures != before;
  const double t_correct = now_s() - t_death;
  expect_free(&e);
  for (int r = 0; r < R; ++r) free(orig[r]);
  bufs_free(&b);
  world_free(&w);
  CHECK(bad == 0, "rank %d: the %s calls after the death: %ld mismatches", me, path, bad);
  CHECK(t_call < BUDGET_S + SLACK_S, "rank %d: the masked calls took %.3f s (budget %.1f s + slack %.1f s)", me, t_call,
        BUDGET_S, SLACK_S);
  printf("masking %s rank %d: rank %d masked; dispatch + combine done %.3f s and checked correct %.3f s after the "
         "death (budget %.1f s)\n",
         name, me, last, t_call, t_correct, BUDGET_S);
  const double t0 = now_s();
  const long later = masked_cases(c, 100, ROUNDS_AFTER_DEATH);
  printf("masking %s rank %d: %d %s cases after the death in %.3f s, %ld failed\n", name, me, ROUNDS_AFTER_DEATH, path,
         now_s() - t0, later);
  check_mask(c, "after the cases");
  ep_handle_destroy(c->handle);
  c->handle = NULL;
  ll_bufs_free(&c->b);
  const ep_status_t st = ep_group_destroy(c->g);
  CHECK(st == EP_STATUS_SUCCESS, "rank %d: ep_group_destroy with a masked rank: %s: %s", me, ep_status_string(st),
        ep_last_error(NULL));
  c->g = NULL;
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "hand";
  enum death death = DEATH_BEFORE_DISPATCH;
  if (strcmp(mode, "dispatch-death") == 0) death = DEATH_BEFORE_DISPATCH;
  else if (strcmp(mode, "combine-death") == 0) death = DEATH_BEFORE_COMBINE;
  else if (strcmp(mode, "no-mask-death") == 0) death = DEATH_NO_MASK;
  else if (strcmp(mode, "normal-dispatch-death") == 0) death = DEATH_NORMAL_DISPATCH;
  else if (strcmp(mode, "normal-combine-death") == 0) death = DEATH_NORMAL_COMBINE;
  else if (strcmp(mode, "normal-partition-death") == 0) death = DEATH_NORMAL_PARTITION;
  else if (strcmp(mode, "internode-dispatch-death") == 0) death = DEATH_INTERNODE_DISPATCH;
  else if (strcmp(mode, "internode-combine-death") == 0) death = DEATH_INTERNODE_COMBINE;
  else if (strcmp(mode, "hand") != 0 && strcmp(mode, "internode-hand") != 0 &&
           strcmp(mode, "internode-hand-rounds") != 0) {
    fprintf(stderr, "usage: test_masking [hand|dispatch-death|combine-death|no-mask-death|normal-dispatch-death|"
                    "normal-combine-death|normal-partition-death|internode-hand|internode-hand-rounds|"
                    "internode-dispatch-death|internode-combine-death]\n");
    return TEST_FAIL;
  }
  harness_t h;
  int rc = harness_init(&h);
  if (rc != 0) return rc;
  if ((rc = harness_need_ranks(&h, 2)) != 0) return rc;
  if (h.num_ranks > LL_MAX_RANKS) {
    printf("SKIP test_masking: at most %d ranks\n", LL_MAX_RANKS);
    return TEST_SKIP;
  }
  const int internode = strncmp(mode, "internode-", 10) == 0;
  if (internode && h.num_ranks % 2 != 0) {
    printf("SKIP test_masking %s: two virtual nodes need an even rank count\n", mode);
    return TEST_SKIP;
  }
  const uint64_t seed = harness_seed(&h, "test_masking");
  ctx_t c;
  const int round_tokens = strcmp(mode, "internode-hand-rounds") == 0 ? HAND_ROUND_TOKENS : 0;
  const int hand = strcmp(mode, "hand") == 0 || strcmp(mode, "internode-hand") == 0 || round_tokens > 0;
  if (create(&c, &h, death != DEATH_NO_MASK, hand ? HAND_BUDGET_S : BUDGET_S, internode ? h.num_ranks / 2 : 0,
             round_tokens) != 0)
    return TEST_FAIL;
  c.seed = seed;
  if (hand && internode) {
    run_internode_hand(&c, mode);
    ep_handle_destroy(c.handle);
    ll_bufs_free(&c.b);
    CHECK(ep_group_destroy(c.g) == EP_STATUS_SUCCESS, "ep_group_destroy: %s", ep_last_error(NULL));
  } else if (internode) {
    run_normal_death(&c, seed, death == DEATH_INTERNODE_COMBINE, 0, mode);
  } else if (hand) {
    run_hand(&c, seed);
    ep_handle_destroy(c.handle);
    ll_bufs_free(&c.b);
    CHECK(ep_group_destroy(c.g) == EP_STATUS_SUCCESS, "ep_group_destroy: %s", ep_last_error(NULL));
  } else if (death == DEATH_NORMAL_DISPATCH || death == DEATH_NORMAL_COMBINE || death == DEATH_NORMAL_PARTITION) {
    run_normal_death(&c, seed, death == DEATH_NORMAL_COMBINE, death == DEATH_NORMAL_PARTITION, mode);
  } else {
    if (c.handle) ep_handle_destroy(c.handle);
    c.handle = NULL;
    run_death(&c, seed, death, mode);
  }
  if (c.s) cudaStreamDestroy(c.s);
  dev_free(c.mask_dev);
  printf("test_masking %s rank %d: %s\n", mode, h.rank, g_check_failures ? "FAIL" : "ok");
  return TEST_RESULT();
}
