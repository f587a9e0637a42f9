/* test_internode: the normal (high-throughput) path across nodes -- ep_dispatch_prepare, ep_dispatch, ep_combine
 * with num_nodes > 1 -- against the pure-C reference. One host is split into virtual nodes with
 * config.ranks_per_node, so the inter-node leg (puts with signals between rail peers) runs through the transport
 * while the intra-node leg uses NVLink loads and stores. Shapes (nodes x ranks per node), one group each:
 * 2 GPUs: 2x1; 4 GPUs: 2x2 and 4x1; 8 GPUs: 2x4 and 4x2. Skips (77) with one GPU or fewer GPUs than ranks.
 *
 * Mirrors test_intranode.c (same cases, same world, same checks) with these differences:
 *   dispatch:  bit-identical to the reference, exactly as intranode (same order: source rank, then token).
 *   combine:   the internode path rounds each remote node's partial sum to bf16 before the last hop
 *              (docs/internode.md 1.4), so
 *                - even-numbered cases use small-integer payloads (|v| <= 25 BF16, <= 16 FP8; biases <= 8): every
 *                  partial sum is exact in bf16 and the output must be bit-identical to the reference;
 *                - odd-numbered cases use the random payload and must satisfy
 *                  |out - ref| <= (2^-7 + 2^-8) * sum|terms| * 1.02 per element, where sum|terms| is the
 *                  reference combine of the absolute values (copies and biases);
 *              weights within 1e-6 relative; and a second combine with another num_sms must give the same bytes.
 * Each shape runs twice: as the host finds it (rail peers NVLink-mapped, so the inter-node leg is warp stores),
 * then in a second group created with EP_INTERNODE_FORCE_PUT=1, which makes every cross-node transfer take the
 * NVSHMEM put / put-with-signal / quiet branch that a real NIC would use ("put-forced": the small cases and two
 * 4096-token cases).
 * A failure prints the shape, the case and the seed; EP_TEST_SEED=<seed> replays it. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "gpu/normal_cases.h"
#include "gpu/test_util.h"
#include "ref/ep_ref.h"

#define MAX_TOKENS 4096 /* config hints: the largest case */
#define MAX_HIDDEN 7168
#define MAX_TOPK 8

/* Short names for the table: top-k outputs none / ids / ids and weights; random / skewed routing. */
enum { NO = TOPK_NONE, IDX = TOPK_IDX, IDW = TOPK_IDX_WEIGHTS, RND = ROUTE_RANDOM, SKW = ROUTE_SKEWED };
static const case_t k_cases[] = {
  /*  tok  vary  hidden  topk  fp8  out  route  few  sms  align           bias  cached */
    {   0,    0,   2048,    1,   0, IDW,   RND,   0,   8,     1,             0,      0},
    {   0,    0,   7168,    8,   1, IDW,   RND,   1,  32,   128, BIAS0 | BIAS1,      1},
    {   1,    0,   2048,    1,   0, IDW,   RND,   0,  16,     1,         BIAS0,      1},
    {   1,    0,   2688,    4,   1,  NO,   SKW,   0,  24,   128,         BIAS1,      0},
    {   1,    0,   4096,    8,   0, IDX,   RND,   1,  32,     1, BIAS0 | BIAS1,      0},
    {   7,    0,   2560,    4,   0, IDW,   RND,   0,   8,   128,             0,      1},
    {   7,    0,   7168,    8,   1, IDW,   RND,   0,  16,     1,         BIAS0,      0},
    {   7,    0,   2688,    1,   1, IDX,   SKW,   1,  24,     1,         BIAS1,      1},
    {   7,    0,   2048,    8,   0,  NO,   SKW,   0,  32,   128, BIAS0 | BIAS1,      0},
    {   7,    1,   4096,    4,   1, IDW,   RND,   0,   8,     1,             0,      0},
    {   7,    1,   2560,    8,   0, IDW,   RND,   1,  16,   128,         BIAS0,      1},
    {4096,    0,   2048,    8,   0, IDW,   RND,   0,  24,   128, BIAS0 | BIAS1,      1},
    {4096,    0,   7168,    8,   0, IDW,   RND,   0,  32,     1,         BIAS0,      0},
    {4096,    0,   7168,    4,   1, IDW,   RND,   0,  16,   128,         BIAS1,      1},
    {4096,    0,   2688,    1,   0,  NO,   RND,   1,   8,     1,             0,      0},
    {4096,    0,   2560,    8,   1, IDX,   SKW,   0,  24,     1, BIAS0 | BIAS1,      0},
    {4096,    0,   4096,    4,   0, IDW,   SKW,   1,  32,   128,         BIAS0,      1},
    {4096,    1,   2688,    8,   1, IDW,   RND,   0,  16,     1, BIAS0 | BIAS1,      1},
    {4096,    1,   7168,    1,   0, IDW,   RND,   1,   8,   128,         BIAS1,      0},
    {4096,    1,   2048,    4,   0, IDX,   SKW,   0,  24,     1,             0,      1},
    {4096,    1,   4096,    8,   1,  NO,   RND,   0,  32,   128,         BIAS0,      0},
    {4096,    1,   7168,    8,   1, IDW,   SKW,   0,   8,     1, BIAS0 | BIAS1,      0},
};
#define NUM_CASES ((int)(sizeof(k_cases) / sizeof(k_cases[0])))

typedef struct {
  ep_group_t g;
  ep_handle_t handle;
  cudaStream_t s;
  int R, me;
  int rpn;         /* ranks per (virtual) node of the current group */
  int forced;      /* the group was created with EP_INTERNODE_FORCE_PUT=1 */
  int max_experts; /* config.num_experts */
  uint64_t seed;   /* this run's seed */
} ctx_t;

/* ------------------------------------------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------------------------------------------ */


/* Whether `msg` contains `name` as a whole identifier ("x" matches "args.x is NULL", not "x_dtype" or "0x1"). */
static int is_ident_char(char ch) { return isalnum((unsigned char)ch) || ch == '_'; }
static int mentions(const char* msg, const char* name) {
  size_t len = strlen(name);
  for (const char* p = strstr(msg, name); p; p = strstr(p + 1, name))
    if ((p == msg || !is_ident_char(p[-1])) && !is_ident_char(p[len])) return 1;
  return 0;
}

/* ------------------------------------------------------------------------------------------------------------
 * The combine tolerance
 * ------------------------------------------------------------------------------------------------------------ */

/* The small-integer payload (w->exact): bit-identical only. The random payload: each remote node's partial sum is
 * rounded to bf16 before the last hop, so |out - ref| <= (2^-7 + 2^-8) * sum|terms| * 1.02 (e->abs_x). */
static int within_partial_rounding(const world_t* w, const expect_t* e, size_t i, float got, float want) {
  const float bound = (ldexpf(1.0f, -7) + ldexpf(1.0f, -8)) * ep_ref_bf16_to_f32(e->abs_x[i]) * 1.02f;
  return !w->exact && fabsf(got - want) <= bound;
}
static const combine_rule_t k_combine_rule = {within_partial_rounding,
                                              "values within the partial-rounding bound, not bit-identical (expected)"};

/* ------------------------------------------------------------------------------------------------------------
 * One case: eager, cached, graph-safe
 * ------------------------------------------------------------------------------------------------------------ */

static void run_eager(const ctx_t* c, const case_t* k, int dev_counts, const world_t* w, const expect_t* e,
                      bufs_t* b) {
  const ep_ref_recv_t* want = &e->disp.recv[c->me];
  const int E_loc = w->num_experts / w->R;
  int num_recv = -12345;
  int* counts = xmalloc((size_t)E_loc * sizeof(int));
  memset(counts, 0xA5, (size_t)E_loc * sizeof(int));
  bufs_poison_counts(b, w, c->s);
  ep_dispatch_prepare_args_t p = prepare_args(w, c->me, b, k->alignment, &num_recv, counts, dev_counts);
  EP_CHECK(c, ep_dispatch_prepare(c->g, c->handle, &p, c->s));
  int got_num_recv = num_recv;
  /* Outputs sized exactly. A wrong count fails below; an impossible one is replaced by the reference's, so the
   * rank still makes the same calls as its peers. */
  if (num_recv < 0 || num_recv > w->R * MAX_TOKENS) num_recv = want->num_recv;
  bufs_alloc_outputs(b, w, num_recv);
  bufs_poison(b, w, c->me, c->s);
  ep_dispatch_args_t d = dispatch_args(w, b, k->sms);
  EP_CHECK(c, ep_dispatch(c->g, c->handle, &d, c->s));
  upload_y(b, w, e, c->me);
  ep_combine_args_t cb = combine_args(w, b, k->bias, k->sms);
  EP_CHECK(c, ep_combine(c->g, c->handle, &cb, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  check_dispatch("eager", w, want, b, &got_num_recv, counts, 0);
  if (dev_counts) check_dev_counts("eager", w, want, b);
  check_combine("eager", w, c->me, e, b, &k_combine_rule);
  /* Determinism: the same combine with another SM count gives the same bytes. */
  const size_t out_bytes = (size_t)w->num_tokens[c->me] * (size_t)w->hidden * 2;
  uint16_t* first = download(b->comb_x, out_bytes);
  cb.num_sms = k->sms == 8 ? 32 : 8;
  EP_CHECK(c, ep_combine(c->g, c->handle, &cb, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  uint16_t* second = download(b->comb_x, out_bytes);
  CHECK(memcmp(first, second, out_bytes) == 0, "eager combine: num_sms %d and %d give different bytes", k->sms,
        cb.num_sms);
  free(first);
  free(second);
  free(counts);
}

static void run_cached(const ctx_t* c, const case_t* k, const world_t* w, const expect_t* e, bufs_t* b) {
  bufs_poison(b, w, c->me, c->s);
  ep_dispatch_args_t d = dispatch_args(w, b, k->sms);
  EP_CHECK(c, ep_dispatch(c->g, c->handle, &d, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  check_dispatch("cached", w, &e->disp.recv[c->me], b, NULL, NULL, 0);
}

static void run_graph_safe(const ctx_t* c, const case_t* k, const world_t* w, const expect_t* e, bufs_t* b) {
  const int max_tokens = max_tokens_of(w);
  bufs_alloc_outputs(b, w, w->R * (max_tokens > 0 ? max_tokens : 1));
  bufs_poison_counts(b, w, c->s);
  bufs_poison(b, w, c->me, c->s);
  ep_dispatch_prepare_args_t p = prepare_args(w, c->me, b, k->alignment, NULL, NULL, 1);
  EP_CHECK(c, ep_dispatch_prepare(c->g, c->handle, &p, c->s));
  ep_dispatch_args_t d = dispatch_args(w, b, k->sms);
  EP_CHECK(c, ep_dispatch(c->g, c->handle, &d, c->s));
  upload_y(b, w, e, c->me);
  ep_combine_args_t cb = combine_args(w, b, k->bias, k->sms);
  EP_CHECK(c, ep_combine(c->g, c->handle, &cb, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  const ep_ref_recv_t* want = &e->disp.recv[c->me];
  int* n = download(b->num_recv, sizeof(int));
  int* counts = download(b->expert_counts, (size_t)(w->num_experts / w->R) * sizeof(int));
  check_dispatch("graph-safe", w, want, b, n, counts, 1);
  check_combine("graph-safe", w, c->me, e, b, &k_combine_rule);
  free(n);
  free(counts);
}

static const char* topk_out_name(int t) { return t == TOPK_NONE ? "none" : t == TOPK_IDX ? "idx" : "idx+weights"; }

static void print_case(const ctx_t* c, const char* label, int index, const case_t* k, const world_t* w) {
  char counts[MAX_RANKS * 8] = "";
  size_t len = 0;
  for (int r = 0; r < w->R && len + 8 < sizeof counts; ++r)
    len += (size_t)snprintf(counts + len, sizeof counts - len, "%s%d", r ? "," : "", w->num_tokens[r]);
  printf("rank %d: shape %dx%d%s: %s %d FAILED (seed 0x%016llx, replay with EP_TEST_SEED=0x%016llx): tokens=[%s] hidden=%d "
         "topk=%d dtype=%s topk_out=%s routing=%s experts=%d sms=%d alignment=%d bias=%d cached=%d\n",
         c->me, c->R / c->rpn, c->rpn, c->forced ? " put-forced" : "", label, index, (unsigned long long)c->seed, (unsigned long long)c->seed, counts, k->hidden, k->topk,
         k->fp8 ? "fp8" : "bf16", topk_out_name(k->topk_out), k->routing == ROUTE_SKEWED ? "skewed" : "random",
         w->num_experts, k->sms, k->alignment, k->bias, k->cached);
  fflush(stdout);
}

/* Returns 1 when a check of the case failed. */
static int run_case(const ctx_t* c, const case_t* k, int index) {
  const int before = g_check_failures;
  const uint64_t case_seed = c->seed + 0x9e3779b97f4a7c15ull * (uint64_t)(index + 1);
  world_t w;
  world_build(&w, k, c->R, c->max_experts, case_seed, case_seed, index % 2 == 0);
  const size_t bias_elems = (size_t)w.num_tokens[c->me] * (size_t)w.hidden;
  uint16_t* bias0 = (k->bias & BIAS0) ? make_bias(case_seed, c->me, 0, bias_elems) : NULL;
  uint16_t* bias1 = (k->bias & BIAS1) ? make_bias(case_seed, c->me, 1, bias_elems) : NULL;
  expect_t e;
  expect_build(&e, &w, k->alignment, c->me, bias0, bias1, 1);
  bufs_t b;
  bufs_alloc_inputs(&b, &w, c->me);
  bufs_upload_inputs(&b, &w, c->me, bias0, bias1);
  run_eager(c, k, index % 2, &w, &e, &b); /* every other case also asks for the device counts */
  if (k->cached) {
    world_payload(&w, case_seed, 2); /* same routing, new x, scales and weights */
    expect_free(&e);
    expect_build(&e, &w, k->alignment, c->me, bias0, bias1, 1);
    bufs_upload_inputs(&b, &w, c->me, bias0, bias1);
    run_cached(c, k, &w, &e, &b);
  }
  run_graph_safe(c, k, &w, &e, &b); /* with the cached payload when there was one */
  CHECK_ASYNC_CLEAN(c, "a case");
  bufs_free(&b);
  int failed = g_check_failures != before;
  if (failed) print_case(c, "case", index, k, &w);
  expect_free(&e);
  free(bias0);
  free(bias1);
  world_free(&w);
  return failed;
}

/* ------------------------------------------------------------------------------------------------------------
 * Argument validation on the live group
 * ------------------------------------------------------------------------------------------------------------ */

static void expect_invalid(const ctx_t* c, ep_status_t st, const char* call, const char* arg) {
  CHECK(st == EP_STATUS_INVALID_ARGUMENT, "%s with a bad %s gave %s (%s)", call, arg, ep_status_string(st),
        ep_last_error(c->g));
  CHECK(mentions(ep_last_error(c->g), arg), "%s: the message does not name %s: \"%s\"", call, arg,
        ep_last_error(c->g));
}

/* Every rank makes the same (rejected) calls, so nothing collective is left half done. */
static int run_validation(const ctx_t* c) {
  const int before = g_check_failures;
  const case_t k = {16, 0, 2048, 4, 0, TOPK_IDX_WEIGHTS, ROUTE_RANDOM, 0, 16, 1, 0, 0};
  world_t w;
  world_build(&w, &k, c->R, c->max_experts, c->seed ^ 0x7a11d, c->seed ^ 0x7a11d, 1);
  bufs_t b;
  bufs_alloc_inputs(&b, &w, c->me);
  bufs_upload_inputs(&b, &w, c->me, NULL, NULL);
  int num_recv = -1;
  ep_dispatch_prepare_args_t p = prepare_args(&w, c->me, &b, 1, &num_recv, NULL, 0);
  EP_CHECK(c, ep_dispatch_prepare(c->g, c->handle, &p, c->s));
  bufs_alloc_outputs(&b, &w, w.R * 16);
  /* room for an FP8 call of hidden 2056 too */
  float* scales = dev_alloc(16 * 32 * sizeof(float));
  float* recv_scales = dev_alloc((size_t)w.R * 16 * 32 * sizeof(float));
  const ep_dispatch_args_t good = dispatch_args(&w, &b, 16);

  ep_dispatch_args_t a = good;
  a.x = NULL;
  expect_invalid(c, ep_dispatch(c->g, c->handle, &a, c->s), "ep_dispatch", "x");
  a = good;
  a.x_dtype = EP_FP8_E4M3;
  a.hidden = 2056; /* a multiple of 8, not of 128 */
  a.x_scales = scales;
  a.recv_x_scales = recv_scales;
  expect_invalid(c, ep_dispatch(c->g, c->handle, &a, c->s), "ep_dispatch", "hidden");
  a = good;
  a.x_dtype = (ep_dtype_t)42;
  expect_invalid(c, ep_dispatch(c->g, c->handle, &a, c->s), "ep_dispatch", "x_dtype");
  a = good;
  a.x_dtype = EP_DTYPE_INVALID;
  expect_invalid(c, ep_dispatch(c->g, c->handle, &a, c->s), "ep_dispatch", "x_dtype");
  a = good;
  a.num_sms = -1;
  expect_invalid(c, ep_dispatch(c->g, c->handle, &a, c->s), "ep_dispatch", "num_sms");

  /* The template itself is valid: the handle still dispatches after the rejected calls. */
  EP_CHECK(c, ep_dispatch(c->g, c->handle, &good, c->s));
  CHECK_ASYNC_CLEAN(c, "the valid dispatch after rejected ones");

  if (c->R > 1 && 8 * c->R + 1 <= c->max_experts) {
    ep_dispatch_prepare_args_t q = prepare_args(&w, c->me, &b, 1, &num_recv, NULL, 0);
    q.num_experts = 8 * c->R + 1;
    expect_invalid(c, ep_dispatch_prepare(c->g, c->handle, &q, c->s), "ep_dispatch_prepare", "num_experts");
  }
  dev_free(scales);
  dev_free(recv_scales);
  bufs_free(&b);
  world_free(&w);
  return g_check_failures != before;
}

/* ------------------------------------------------------------------------------------------------------------
 * recv_capacity overflow in the graph-safe path
 * ------------------------------------------------------------------------------------------------------------ */

/* Every rank sends 4 tokens to every rank and offers room for 1 row: each must see EP_STATUS_DEVICE_ERROR. */
static int run_overflow(const ctx_t* c) {
  const int before = g_check_failures;
  const case_t k = {4 * c->R, 0, 2048, 1, 0, TOPK_IDX_WEIGHTS, ROUTE_RANDOM, 0, 16, 1, 0, 0};
  world_t w;
  world_build(&w, &k, c->R, c->max_experts, c->seed ^ 0x0f10, c->seed ^ 0x0f10, 1);
  const int E_loc = w.num_experts / w.R;
  for (int t = 0; t < w.num_tokens[c->me]; ++t) w.idx[c->me][t] = (int64_t)(t % w.R) * E_loc + (t / w.R) % E_loc;
  bufs_t b;
  bufs_alloc_inputs(&b, &w, c->me);
  bufs_upload_inputs(&b, &w, c->me, NULL, NULL);
  bufs_alloc_outputs(&b, &w, 4 * w.R);
  b.capacity = 1; /* the outputs hold all rows; the library is told 1 */
  ep_dispatch_prepare_args_t p = prepare_args(&w, c->me, &b, 1, NULL, NULL, 1);
  EP_CHECK(c, ep_dispatch_prepare(c->g, c->handle, &p, c->s));
  ep_dispatch_args_t d = dispatch_args(&w, &b, 16);
  EP_CHECK(c, ep_dispatch(c->g, c->handle, &d, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  ep_status_t async = EP_STATUS_SUCCESS;
  CHECK(ep_get_async_error(c->g, &async) == EP_STATUS_SUCCESS, "ep_get_async_error: %s", ep_last_error(c->g));
  CHECK(async == EP_STATUS_DEVICE_ERROR, "%d rows into recv_capacity 1 gave %s, want EP_STATUS_DEVICE_ERROR",
        4 * w.R, ep_status_string(async));
  printf("rank %d: overflow reported: %s: %s\n", c->me, ep_status_string(async), ep_last_error(c->g));
  bufs_free(&b);
  world_free(&w);
  return g_check_failures != before;
}

/* ------------------------------------------------------------------------------------------------------------
 * The graph-safe path in a CUDA graph, replayed with new data
 * ------------------------------------------------------------------------------------------------------------ */

static int run_cuda_graph(const ctx_t* c) {
  const int before = g_check_failures;
  case_t k = {1024, 1, 2560, 4, 0, TOPK_IDX_WEIGHTS, ROUTE_RANDOM, 0, 0, 128, BIAS0, 0};
  const uint64_t graph_seed = c->seed ^ 0x6a9f;
  world_t w;
  /* shapes and buffers; data comes per replay */
  world_build(&w, &k, c->R, c->max_experts, graph_seed, graph_seed, 1);
  bufs_t b;
  bufs_alloc_inputs(&b, &w, c->me);
  bufs_alloc_outputs(&b, &w, w.R * (max_tokens_of(&w) > 0 ? max_tokens_of(&w) : 1));

  ep_dispatch_prepare_args_t p = prepare_args(&w, c->me, &b, k.alignment, NULL, NULL, 1);
  ep_dispatch_args_t d = dispatch_args(&w, &b, k.sms);
  ep_combine_args_t cb = combine_args(&w, &b, k.bias, k.sms); /* x = recv_x, weights = recv_topk_weights */
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  CUDA_CHECK(cudaStreamBeginCapture(c->s, cudaStreamCaptureModeGlobal));
  EP_CHECK(c, ep_dispatch_prepare(c->g, c->handle, &p, c->s));
  EP_CHECK(c, ep_dispatch(c->g, c->handle, &d, c->s));
  EP_CHECK(c, ep_combine(c->g, c->handle, &cb, c->s));
  CUDA_CHECK(cudaStreamEndCapture(c->s, &graph));
  if (graph) CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

  for (int replay = 0; replay < 2 && exec; ++replay) {
    const int replay_before = g_check_failures;
    /* Replay 1 moves every token to one rank: new routing as well as new rows. */
    k.routing = replay == 0 ? ROUTE_RANDOM : ROUTE_SKEWED;
    world_t wr;
    world_build(&wr, &k, c->R, c->max_experts, graph_seed, graph_seed + 1 + (uint64_t)replay, replay == 0);
    uint16_t* bias0 = make_bias(graph_seed + (uint64_t)replay, c->me, 0,
                                (size_t)wr.num_tokens[c->me] * (size_t)wr.hidden);
    expect_t e;
    expect_build(&e, &wr, k.alignment, c->me, bias0, NULL, 1);
    bufs_upload_inputs(&b, &wr, c->me, bias0, NULL); /* cudaMemcpy into the captured buffers */
    bufs_poison_counts(&b, &wr, c->s);
    bufs_poison(&b, &wr, c->me, c->s);
    CUDA_CHECK(cudaGraphLaunch(exec, c->s));
    CUDA_CHECK(cudaStreamSynchronize(c->s));
    char path[32];
    snprintf(path, sizeof path, "graph replay %d", replay);
    int* n = download(b.num_recv, sizeof(int));
    int* counts = download(b.expert_counts, (size_t)(wr.num_experts / wr.R) * sizeof(int));
    check_dispatch(path, &wr, &e.disp.recv[c->me], &b, n, counts, 1);
    check_combine(path, &wr, c->me, &e, &b, &k_combine_rule);
    free(n);
    free(counts);
    CHECK_ASYNC_CLEAN(c, "a graph replay");
    if (g_check_failures != replay_before) print_case(c, "graph replay", replay, &k, &wr);
    expect_free(&e);
    free(bias0);
    world_free(&wr);
  }
  CHECK(exec != NULL, "no CUDA graph to replay");
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  bufs_free(&b);
  world_free(&w);
  return g_check_failures != before;
}

/* ------------------------------------------------------------------------------------------------------------ */

/* Cases the put-forced pass runs besides the small ones: 4096 tokens, BF16 top-8 (hidden 7168) and FP8 with
 * differing token counts. */
static int forced_case(int i) { return k_cases[i].tokens <= 64 || i == 12 || i == 17; }

/* One group of `rpn` ranks per node: validation, the cases, a CUDA graph, the overflow. `forced`: create the group
 * with EP_INTERNODE_FORCE_PUT=1 (read once at create) and run the small cases and two large ones. */
static void run_shape(const harness_t* h, ctx_t* c, int rpn, int forced) {
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ranks_per_node = rpn;
  cfg.num_experts = 256 / c->R * c->R;
  cfg.hidden = MAX_HIDDEN;
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
    failed = run_validation(c);
    printf("rank %d: %dx%d validation: %s (%.1f s)\n", c->me, nodes, rpn, failed ? "FAILED" : "ok", now_s() - t0);
  }

  t0 = now_s();
  failed = 0;
  /* EP_TEST_SMALL=1 keeps the small cases only (for compute-sanitizer, which is slow). */
  const int small_only = getenv("EP_TEST_SMALL") != NULL;
  int ran = 0;
  for (int i = 0; i < NUM_CASES; ++i)
    if (small_only ? k_cases[i].tokens <= 64 : !forced || forced_case(i)) {
      failed += run_case(c, &k_cases[i], i);
      ++ran;
    }
  printf("rank %d: %dx%d%s dispatch/combine: %d cases (eager + graph-safe each), %d failed (%.1f s)\n", c->me, nodes,
         rpn, mode, ran, failed, now_s() - t0);

  if (!small_only && !forced) {
    t0 = now_s();
    failed = run_cuda_graph(c);
    printf("rank %d: %dx%d CUDA graph, 2 replays: %s (%.1f s)\n", c->me, nodes, rpn, failed ? "FAILED" : "ok",
           now_s() - t0);
    /* Last, so that a group left failed by it cannot hide the results above. */
    t0 = now_s();
    failed = run_overflow(c);
    failed += run_case(c, &k_cases[10], NUM_CASES); /* the group still works */
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
  setvbuf(stdout, NULL, _IOLBF, 0);
  harness_t h;
  int rc = harness_init(&h);
  if (rc) return rc;
  if (h.num_ranks > MAX_RANKS) {
    printf("SKIP: more than %d ranks\n", MAX_RANKS);
    return TEST_SKIP;
  }
  /* Virtual shapes: ranks per node for each rank count (nodes = ranks / rpn > 1). */
  int shapes[2] = {0, 0}, num_shapes = 0;
  if (h.num_ranks == 2) shapes[num_shapes++] = 1;
  else if (h.num_ranks == 4) { shapes[num_shapes++] = 2; shapes[num_shapes++] = 1; }
  else if (h.num_ranks == 8) { shapes[num_shapes++] = 4; shapes[num_shapes++] = 2; }
  else if (h.num_ranks > 1 && h.num_ranks % 2 == 0 && h.num_ranks / 2 <= 8) shapes[num_shapes++] = h.num_ranks / 2;
  if (num_shapes == 0) {
    printf("SKIP: %d rank(s): no multi-node shape to test\n", h.num_ranks);
    return TEST_SKIP;
  }
  ctx_t c;
  memset(&c, 0, sizeof c);
  c.R = h.num_ranks;
  c.me = h.rank;
  c.seed = harness_seed(&h, "internode");
  for (int i = 0; i < num_shapes; ++i) run_shape(&h, &c, shapes[i], 0);
  for (int i = 0; i < num_shapes; ++i) run_shape(&h, &c, shapes[i], 1); /* the NIC branch */
  return TEST_RESULT();
}
