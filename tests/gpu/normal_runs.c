/* normal_runs.c: the runs the normal-path GPU tests share (test_intranode, test_internode): the case table, one
 * case (eager with a determinism check, cached, graph-safe), argument validation, the recv_capacity overflow and a
 * CUDA graph replayed with new data. Every other case carries the small-integer payload, whose combine must be
 * bit-identical to the reference on both paths; on the random payload ctx->rpn selects the tolerance: 0 (one
 * NVLink domain) one bf16 ulp, > 0 (virtual nodes) the documented partial rounding. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "gpu/normal_runs.h"
#include "gpu/test_util.h"
#include "kernels/internode_region.h"
#include "kernels/normal_region.h"
#include "ref/ep_ref.h"

/* clang-format off */
const case_t normal_case_table[] = {
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
  /* Small cases for the regions above: an expert twice in a top-k, top-k 9..32, BF16 hidden a multiple of 8
   * below 1024, num_sms 1 (the internode relay shares its block with send and pull), odd and above the device's,
   * no tokens on rank 0 / a middle rank / the odd ranks / the first half (a whole virtual node). */
    {   7,  FST,   1000,    9,   0, IDW,   RPT,   0,    1,     1,         BIAS0,      0},
    {  33,  MID,     72,   32,   0, IDW,   RND,   1,    3,   128,         BIAS1,      1},
    {  16,  SEV,   2048,   16,   1, IDW,   RPT,   0, 1000,     1,             0,      0},
    {   9,  NOD,   1000,    4,   0, IDX,   RPT,   0,    5,     1, BIAS0 | BIAS1,      1},
    {  64,    0,      8,    2,   0, IDW,   RPT,   1,    7,     1,             0,      0},
};
const int normal_num_cases = (int)(sizeof(normal_case_table) / sizeof(normal_case_table[0]));

const case_t normal_full_table[] = {
  /*  tok  vary  hidden  topk  fp8  out  route  few  sms  align           bias  cached */
    {4096,    0,   1000,   32,   0, IDW,   RPT,   0,   24,   128,         BIAS0,      1},
    {4096,  FST,   2056,   12,   0, IDW,   RND,   0,    1,     1,         BIAS1,      0},
    {2048,  NOD,   7168,   20,   1, IDW,   RPT,   1,   33,   128, BIAS0 | BIAS1,      1},
    {4096,  SEV,    520,    8,   0, IDX,   SKW,   0, 1000,     1,             0,      0},
    {4096,  MID,   7168,   24,   1, IDW,   RND,   0,    5,     1,         BIAS0,      0},
    { 512,  LST,    264,   17,   0, IDW,   RPT,   1,    3,     1,         BIAS0,      1},
    {1024,  LST,   8192,    8,   1, IDW,   RND,   0,   24,   128,         BIAS0,      1},
    { 256,    0,  16384,    4,   0, IDW,   RPT,   0,   32,     1, BIAS0 | BIAS1,      0},
    {1024,    1,  16384,    6,   1,  NO,   RND,   0,   16,     1,             0,      0},
};
const int normal_num_full_cases = (int)(sizeof(normal_full_table) / sizeof(normal_full_table[0]));
/* clang-format on */

int normal_config_hidden(void) { return test_level_full() ? FULL_MAX_HIDDEN : MAX_HIDDEN; }

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

/* Intranode: one fp32 sum in the reference's order (biases, then ranks ascending), rounded once. The small-integer
 * payload (w->exact: every even case and the first graph replay) makes every sum exact, so anything but the
 * reference's bits fails. The random payload accepts, and reports, values within 2^-7 of |ref| (one bf16 ulp). */
static int within_bf16_rounding(const world_t* w, const expect_t* e, size_t i, float got, float want) {
  (void)e;
  (void)i;
  return !w->exact && fabsf(got - want) <= ldexpf(fabsf(want), -7);
}
static const combine_rule_t k_intranode_rule = {within_bf16_rounding,
                                                "values within bf16 rounding but not bit-identical"};

/* Internode: the small-integer payload (w->exact) must be bit-identical. The random payload: each remote node's
 * partial sum is rounded to bf16 before the last hop, so |out - ref| <= (2^-7 + 2^-8) * sum|terms| * 1.02
 * (e->abs_x). */
static int within_partial_rounding(const world_t* w, const expect_t* e, size_t i, float got, float want) {
  const float bound = (ldexpf(1.0f, -7) + ldexpf(1.0f, -8)) * ep_ref_bf16_to_f32(e->abs_x[i]) * 1.02f;
  return !w->exact && fabsf(got - want) <= bound;
}
static const combine_rule_t k_internode_rule = {within_partial_rounding,
                                                "values within the partial-rounding bound, not bit-identical (expected)"};

static const combine_rule_t* combine_rule(const normal_ctx_t* c) {
  return c->rpn > 0 ? &k_internode_rule : &k_intranode_rule;
}

/* ------------------------------------------------------------------------------------------------------------
 * One case: eager, cached, graph-safe
 * ------------------------------------------------------------------------------------------------------------ */

static void run_eager(const normal_ctx_t* c, const case_t* k, int dev_counts, const world_t* w, const expect_t* e,
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
  check_combine("eager", w, c->me, e, b, combine_rule(c));
  /* Determinism: the same combine with another SM count, into re-poisoned outputs (so that anything it leaves
   * unwritten fails), gives the reference's values and the same bytes as the first. */
  const size_t out_bytes = (size_t)w->num_tokens[c->me] * (size_t)w->hidden * 2;
  uint16_t* first = download(b->comb_x, out_bytes);
  cb.num_sms = k->sms == 8 ? 32 : 8;
  bufs_poison_combine(b, w, c->me, c->s);
  EP_CHECK(c, ep_combine(c->g, c->handle, &cb, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  check_combine("eager, other num_sms", w, c->me, e, b, combine_rule(c));
  uint16_t* second = download(b->comb_x, out_bytes);
  CHECK(memcmp(first, second, out_bytes) == 0, "eager combine: num_sms %d and %d give different bytes", k->sms,
        cb.num_sms);
  free(first);
  free(second);
  free(counts);
}

static void run_cached(const normal_ctx_t* c, const case_t* k, const world_t* w, const expect_t* e, bufs_t* b) {
  bufs_poison(b, w, c->me, c->s);
  ep_dispatch_args_t d = dispatch_args(w, b, k->sms);
  EP_CHECK(c, ep_dispatch(c->g, c->handle, &d, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  check_dispatch("cached", w, &e->disp.recv[c->me], b, NULL, NULL, 0);
}

static void run_graph_safe(const normal_ctx_t* c, const case_t* k, const world_t* w, const expect_t* e, bufs_t* b) {
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
  check_combine("graph-safe", w, c->me, e, b, combine_rule(c));
  free(n);
  free(counts);
}

static const char* routing_name(int r) {
  return r == ROUTE_SKEWED ? "skewed" : r == ROUTE_REPEAT ? "random with repeats" : "random";
}
static const char* topk_out_name(int t) { return t == TOPK_NONE ? "none" : t == TOPK_IDX ? "idx" : "idx+weights"; }

static void print_case(const normal_ctx_t* c, const char* label, int index, const case_t* k, const world_t* w) {
  char counts[MAX_RANKS * 8] = "";
  size_t len = 0;
  for (int r = 0; r < w->R && len + 8 < sizeof counts; ++r)
    len += (size_t)snprintf(counts + len, sizeof counts - len, "%s%d", r ? "," : "", w->num_tokens[r]);
  char shape[48] = "";
  if (c->rpn > 0) snprintf(shape, sizeof shape, "shape %dx%d%s: ", c->R / c->rpn, c->rpn, c->forced ? " put-forced" : "");
  printf("rank %d: %s%s %d FAILED (seed 0x%016llx, replay with EP_TEST_SEED=0x%016llx): tokens=[%s] hidden=%d "
         "topk=%d dtype=%s topk_out=%s routing=%s experts=%d sms=%d alignment=%d bias=%d cached=%d\n",
         c->me, shape, label, index, (unsigned long long)c->seed, (unsigned long long)c->seed, counts, k->hidden,
         k->topk, k->fp8 ? "fp8" : "bf16", topk_out_name(k->topk_out), routing_name(k->routing), w->num_experts, k->sms,
         k->alignment, k->bias, k->cached);
  fflush(stdout);
}

/* Returns 1 when a check of the case failed. */
int normal_run_case(const normal_ctx_t* c, const case_t* k, int index) {
  const int before = g_check_failures;
  const uint64_t case_seed = c->seed + 0x9e3779b97f4a7c15ull * (uint64_t)(index + 1);
  world_t w;
  world_build(&w, k, c->R, c->max_experts, case_seed, case_seed, index % 2 == 0); /* even: exact payload */
  const size_t bias_elems = (size_t)w.num_tokens[c->me] * (size_t)w.hidden;
  uint16_t* bias0 = (k->bias & BIAS0) ? make_bias(case_seed, c->me, 0, bias_elems) : NULL;
  uint16_t* bias1 = (k->bias & BIAS1) ? make_bias(case_seed, c->me, 1, bias_elems) : NULL;
  expect_t e;
  expect_build(&e, &w, k->alignment, c->me, bias0, bias1, c->rpn > 0);
  bufs_t b;
  bufs_alloc_inputs(&b, &w, c->me);
  bufs_upload_inputs(&b, &w, c->me, bias0, bias1);
  run_eager(c, k, index % 2, &w, &e, &b); /* every other case also asks for the device counts */
  if (k->cached) {
    world_payload(&w, case_seed, 2); /* same routing, new x, scales and weights */
    expect_free(&e);
    expect_build(&e, &w, k->alignment, c->me, bias0, bias1, c->rpn > 0);
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

void world_drop_masked(world_t* w, const int* masked, int64_t** orig) {
  const int K = w->topk, E_loc = w->num_experts / w->R;
  for (int r = 0; r < w->R; ++r) {
    const size_t n = (size_t)w->num_tokens[r] * (size_t)K;
    orig[r] = xmalloc(n * sizeof(int64_t) + 8);
    memcpy(orig[r], w->idx[r], n * sizeof(int64_t));
    for (size_t i = 0; i < n; ++i) {
      const int64_t e = w->idx[r][i];
      if (e >= 0 && (masked[r] ? e / E_loc != r : masked[e / E_loc])) w->idx[r][i] = -1;
    }
  }
}

/* Swap the top-k a world holds: the dropped one (for the reference) and the original one (for the calls). */
static void swap_idx(world_t* w, int64_t** other) {
  for (int r = 0; r < w->R; ++r) {
    int64_t* t = w->idx[r];
    w->idx[r] = other[r];
    other[r] = t;
  }
}

int normal_run_masked_case(const normal_ctx_t* c, const case_t* k, int index, const int* masked) {
  const int before = g_check_failures;
  const uint64_t case_seed = c->seed + 0x51ed270b27f3a3c5ull * (uint64_t)(index + 1);
  world_t w;
  world_build(&w, k, c->R, c->max_experts, case_seed, case_seed, index % 2 == 0);
  int64_t* orig[MAX_RANKS];
  world_drop_masked(&w, masked, orig);
  expect_t e;
  expect_build(&e, &w, k->alignment, c->me, NULL, NULL, c->rpn > 0);
  bufs_t b;
  bufs_alloc_inputs(&b, &w, c->me);
  swap_idx(&w, orig); /* the calls get the unmasked top-k */
  bufs_upload_inputs(&b, &w, c->me, NULL, NULL);
  swap_idx(&w, orig);
  run_eager(c, k, index % 2, &w, &e, &b);
  if (k->cached) {
    world_payload(&w, case_seed, 2);
    expect_free(&e);
    expect_build(&e, &w, k->alignment, c->me, NULL, NULL, c->rpn > 0);
    swap_idx(&w, orig);
    bufs_upload_inputs(&b, &w, c->me, NULL, NULL);
    swap_idx(&w, orig);
    run_cached(c, k, &w, &e, &b);
  }
  run_graph_safe(c, k, &w, &e, &b);
  CHECK_ASYNC_CLEAN(c, "a masked case");
  bufs_free(&b);
  const int failed = g_check_failures != before;
  if (failed) print_case(c, "masked case", index, k, &w);
  expect_free(&e);
  for (int r = 0; r < w.R; ++r) free(orig[r]);
  world_free(&w);
  return failed;
}

/* ------------------------------------------------------------------------------------------------------------
 * Argument validation on the live group
 * ------------------------------------------------------------------------------------------------------------ */

static void expect_invalid(const normal_ctx_t* c, ep_status_t st, const char* call, const char* arg) {
  CHECK(st == EP_STATUS_INVALID_ARGUMENT, "%s with a bad %s gave %s (%s)", call, arg, ep_status_string(st),
        ep_last_error(c->g));
  CHECK(mentions(ep_last_error(c->g), arg), "%s: the message does not name %s: \"%s\"", call, arg,
        ep_last_error(c->g));
}

/* Every rank makes the same (rejected) calls, so nothing collective is left half done. */
int normal_run_validation(const normal_ctx_t* c) {
  const int before = g_check_failures;
  const case_t k = {16, 0, 2048, 4, 0, TOPK_IDX_WEIGHTS, ROUTE_RANDOM, 0, 16, 1, 0, 0};
  world_t w;
  world_build(&w, &k, c->R, c->max_experts, c->seed ^ 0x7a11d, c->seed ^ 0x7a11d, c->rpn > 0);
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
int normal_run_overflow(const normal_ctx_t* c) {
  const int before = g_check_failures;
  const case_t k = {4 * c->R, 0, 2048, 1, 0, TOPK_IDX_WEIGHTS, ROUTE_RANDOM, 0, 16, 1, 0, 0};
  world_t w;
  world_build(&w, &k, c->R, c->max_experts, c->seed ^ 0x0f10, c->seed ^ 0x0f10, c->rpn > 0);
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
  /* Combine along the overflowed handle with an input of exactly recv_capacity rows: it must read no row past
   * it (compute-sanitizer memcheck, scripts/gpu_run.sh sanitize, sees any that it does) and finish. */
  void* one_row = NULL;
  CUDA_CHECK(cudaMalloc(&one_row, (size_t)w.hidden * 2));
  CUDA_CHECK(cudaMemset(one_row, 0, (size_t)w.hidden * 2));
  ep_combine_args_t cb = combine_args(&w, &b, 0, 16);
  cb.x = one_row;
  cb.topk_weights = NULL;
  cb.combined_topk_weights = NULL;
  EP_CHECK(c, ep_combine(c->g, c->handle, &cb, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  CHECK(ep_get_async_error(c->g, &async) == EP_STATUS_SUCCESS && async == EP_STATUS_SUCCESS,
        "combine after the overflow: %s", ep_last_error(c->g));
  CUDA_CHECK(cudaFree(one_row));
  bufs_free(&b);
  world_free(&w);
  return g_check_failures != before;
}

/* ------------------------------------------------------------------------------------------------------------
 * The graph-safe path in a CUDA graph, replayed with new data
 * ------------------------------------------------------------------------------------------------------------ */

int normal_run_cuda_graph(const normal_ctx_t* c, int variant) {
  const int before = g_check_failures;
  /* 0: BF16 top-4, one bias. 1: FP8 top-8, both biases, an expert twice in some tokens, and an eager case on the
   * same handle between the replays. */
  case_t k = {1024, 1, 2560, 4, 0, TOPK_IDX_WEIGHTS, ROUTE_RANDOM, 0, 0, 128, BIAS0, 0};
  if (variant == 1) k = (case_t){512, LST, 2048, 8, 1, TOPK_IDX_WEIGHTS, ROUTE_REPEAT, 0, 20, 1, BIAS0 | BIAS1, 0};
  const int first_routing = k.routing;
  const uint64_t graph_seed = c->seed ^ 0x6a9f;
  world_t w;
  /* shapes and buffers; data comes per replay */
  world_build(&w, &k, c->R, c->max_experts, graph_seed, graph_seed, c->rpn > 0);
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
    k.routing = replay == 0 ? first_routing : ROUTE_SKEWED;
    world_t wr;
    world_build(&wr, &k, c->R, c->max_experts, graph_seed, graph_seed + 1 + (uint64_t)replay, replay == 0);
    const size_t bias_elems = (size_t)wr.num_tokens[c->me] * (size_t)wr.hidden;
    uint16_t* bias0 = make_bias(graph_seed + (uint64_t)replay, c->me, 0, bias_elems);
    uint16_t* bias1 = (k.bias & BIAS1) ? make_bias(graph_seed + (uint64_t)replay, c->me, 1, bias_elems) : NULL;
    expect_t e;
    expect_build(&e, &wr, k.alignment, c->me, bias0, bias1, c->rpn > 0);
    bufs_upload_inputs(&b, &wr, c->me, bias0, bias1); /* cudaMemcpy into the captured buffers */
    bufs_poison_counts(&b, &wr, c->s);
    bufs_poison(&b, &wr, c->me, c->s);
    upload_y(&b, &wr, &e, c->me); /* FP8: the combine's input, what the replay's dispatch receives, widened */
    CUDA_CHECK(cudaGraphLaunch(exec, c->s));
    CUDA_CHECK(cudaStreamSynchronize(c->s));
    char path[32];
    snprintf(path, sizeof path, "graph replay %d", replay);
    int* n = download(b.num_recv, sizeof(int));
    int* counts = download(b.expert_counts, (size_t)(wr.num_experts / wr.R) * sizeof(int));
    check_dispatch(path, &wr, &e.disp.recv[c->me], &b, n, counts, 1);
    check_combine(path, &wr, c->me, &e, &b, combine_rule(c));
    free(n);
    free(counts);
    CHECK_ASYNC_CLEAN(c, "a graph replay");
    if (g_check_failures != replay_before) print_case(c, "graph replay", replay, &k, &wr);
    expect_free(&e);
    free(bias0);
    free(bias1);
    world_free(&wr);
    /* Eager calls on the same handle between replays: the next replay prepares it again. */
    if (variant == 1 && replay == 0) normal_run_case(c, &normal_case_table[5], 1000);
  }
  CHECK(exec != NULL, "no CUDA graph to replay");
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  bufs_free(&b);
  world_free(&w);
  return g_check_failures != before;
}

/* ------------------------------------------------------------------------------------------------------------
 * Rounds: more tokens than the normal region holds
 * ------------------------------------------------------------------------------------------------------------ */

/* clang-format off */
static const case_t rounds_table[] = {
  /*  tok  vary  hidden  topk  fp8  out  route  few  sms  align           bias  cached */
    { 121,    0,   7168,    8,   0, IDW,   RND,   0,  16,     1,         BIAS0,      1}, /* 40 + 40 + 40 + 1 */
    { 121,    0,   2048,    4,   1,  NO,   SKW,   0,  24,   128,             0,      0}, /* FP8, no weights */
    { 200,  SEV,   4096,    8,   1, IDW,   RPT,   1,   8,     1,         BIAS1,      1}, /* FP8, weights */
    { 129,  LST,   2560,    1,   0, IDX,   RND,   0,   3,     1,             0,      0},
    {  41,    1,   1000,    2,   0, IDW,   RND,   0,   1,     1,             0,      0}, /* 1..41 tokens a rank */
    {4096,    1,   7168,    8,   0, IDW,   RND,   0,  32,   128, BIAS0 | BIAS1,      0}, /* up to 103 rounds */
};
/* clang-format on */

/* clang-format off */
static const case_t inter_rounds_table[] = { /* INTER_ROUND_TOKENS (64) tokens a round */
  /*  tok  vary  hidden  topk  fp8  out  route  few  sms  align           bias  cached */
    {   0,    0,   2688,    4,   0, IDW,   RND,   0,   8,     1,         BIAS0,      1}, /* no tokens anywhere */
    {  63,    0,   1000,    8,   0, IDW,   RND,   0,  16,     1,         BIAS0,      1}, /* T - 1: one round */
    {  64,    0,   2688,    4,   1, IDW,   RPT,   0,  24,   128,         BIAS1,      0}, /* T: one round, FP8 */
    { 197,    0,   2560,    8,   0, IDW,   RND,   1,   8,     1, BIAS0 | BIAS1,      1}, /* 3T + 5: four rounds */
    { 197,  NOD,   2688,    4,   1, IDX,   RND,   0,   3,     1,             0,      0}, /* a whole node has none */
    { 197,  SEV,   1000,    2,   0, IDW,   RND,   0,   1,   128,             0,      1}, /* odd ranks none, 1 SM */
    { 130,  LST,   7168,    8,   0,  NO,   SKW,   0,  32,     1,         BIAS0,      0}, /* 1..130, last rank 0 */
    {1000,  LST,   2688,    8,   1, IDW,   RND,   0,  16,     1,         BIAS1,      1}, /* up to 16 rounds */
};
/* clang-format on */

int normal_run_rounds(const harness_t* h, uint64_t seed, int rpn, int forced) {
  const int before = g_check_failures;
  normal_ctx_t c;
  memset(&c, 0, sizeof c);
  c.R = h->num_ranks;
  c.me = h->rank;
  c.seed = seed;
  c.rpn = rpn;
  c.forced = forced;
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ranks_per_node = rpn;
  cfg.num_experts = 256 / c.R * c.R;
  cfg.hidden = MAX_HIDDEN;
  cfg.max_tokens_per_rank = MAX_TOKENS;
  cfg.max_topk = 8;
  /* Exactly ROUND_TOKENS (one node) or INTER_ROUND_TOKENS (several) tokens a round: one more would not fit. */
  const int round_tokens = rpn > 0 ? INTER_ROUND_TOKENS : ROUND_TOKENS;
  cfg.normal_region_bytes = ep_normal_region(c.R, cfg.num_experts, round_tokens, cfg.hidden, cfg.max_topk).total_bytes;
  int pool_tokens = 0;
  if (rpn > 0) {
    cfg.normal_region_bytes +=
        ep_internode_region(c.R, rpn, cfg.num_experts, round_tokens, cfg.hidden, cfg.max_topk).total_bytes;
    pool_tokens = ep_internode_regions(c.R, rpn, cfg.num_experts, cfg.normal_region_bytes, cfg.max_tokens_per_rank,
                                       cfg.hidden, cfg.max_topk)
                      .normal.max_tokens;
  } else {
    pool_tokens = ep_normal_region_pool(c.R, cfg.num_experts, cfg.normal_region_bytes, cfg.max_tokens_per_rank,
                                        cfg.hidden, cfg.max_topk)
                      .max_tokens;
  }
  CHECK(pool_tokens == round_tokens, "the pool holds %d tokens a round, not %d", pool_tokens, round_tokens);
  c.max_experts = cfg.num_experts;
  if (forced) setenv("EP_INTERNODE_FORCE_PUT", "1", 1); /* read once, at create */
  ep_status_t st = harness_group_create(h, &cfg, &c.g);
  if (forced) unsetenv("EP_INTERNODE_FORCE_PUT");
  CHECK(st == EP_STATUS_SUCCESS, "create with normal_region_bytes: %s: %s", ep_status_string(st), ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return 1;
  CUDA_CHECK(cudaStreamCreate(&c.s));
  CHECK(ep_handle_create(c.g, &c.handle) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(c.g));
  const case_t* table = rpn > 0 ? inter_rounds_table : rounds_table;
  const int num_cases = rpn > 0 ? (int)(sizeof(inter_rounds_table) / sizeof(inter_rounds_table[0]))
                                : (int)(sizeof(rounds_table) / sizeof(rounds_table[0]));
  for (int i = 0; i < num_cases; ++i) normal_run_case(&c, &table[i], 1000 + i);
  normal_run_cuda_graph(&c, 0);
  /* Several nodes: eager calls on a handle whose prepare a graph holds (the host launches every round for them). */
  if (rpn > 0) normal_run_cuda_graph(&c, 1);
  CHECK(ep_handle_destroy(c.handle) == EP_STATUS_SUCCESS, "handle destroy: %s", ep_last_error(c.g));
  cudaStreamDestroy(c.s);
  CHECK(ep_group_destroy(c.g) == EP_STATUS_SUCCESS, "destroy: %s", ep_last_error(NULL));
  return g_check_failures != before;
}
