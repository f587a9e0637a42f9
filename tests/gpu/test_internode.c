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
 * A failure prints the shape, the case and the seed; EP_TEST_SEED=<seed> replays it. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "gpu/test_util.h"
#include "ref/ep_ref.h"

#define MAX_RANKS 64
#define MAX_TOKENS 4096 /* config hints: the largest case */
#define MAX_HIDDEN 7168
#define MAX_TOPK 8
#define MAX_REPORTS 4 /* mismatches printed per buffer */
#define REF_BYTES_BUDGET ((size_t)1 << 30) /* per-process reference receive bytes; big worlds get fewer tokens */

enum routing { ROUTE_RANDOM, ROUTE_SKEWED };
enum topk_out { TOPK_NONE, TOPK_IDX, TOPK_IDX_WEIGHTS }; /* what dispatch delivers besides rows */
enum { BIAS0 = 1, BIAS1 = 2 };

typedef struct {
  int tokens;      /* per rank; with `vary`, the most any rank has */
  int vary;        /* counts differ between ranks, the last rank has 0 */
  int hidden;
  int topk;
  int fp8;         /* x is FP8 E4M3 with fp32 scales, else BF16 */
  int topk_out;    /* enum topk_out */
  int routing;     /* enum routing */
  int few_experts; /* num_experts = 8 * num_ranks instead of the group's config.num_experts */
  int sms;         /* num_sms of dispatch and combine; 0 = the group default */
  int alignment;   /* expert_alignment */
  int bias;        /* BIAS0 | BIAS1 for the combine */
  int cached;      /* a second dispatch of new x through the handle, without prepare */
} case_t;

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
 * The world: every rank's inputs, generated identically on every rank
 * ------------------------------------------------------------------------------------------------------------ */

typedef struct {
  int R, hidden, topk, num_experts;
  int fp8, deliver_idx, with_weights;
  int exact;        /* small-integer payload: every internode partial sum is exact in bf16 */
  size_t row_bytes; /* bytes of one x row */
  int num_scales;   /* hidden / 128 with FP8, else 0 */
  int num_tokens[MAX_RANKS];
  uint8_t* x[MAX_RANKS];      /* [N_r, row_bytes] */
  float* scales[MAX_RANKS];   /* [N_r, num_scales], FP8 only */
  int64_t* idx[MAX_RANKS];    /* [N_r, topk] global expert ids, -1 = none */
  float* weights[MAX_RANKS];  /* [N_r, topk] */
} world_t;

/* An independent random stream per (seed, rank, purpose). */
static uint64_t stream_of(uint64_t seed, int rank, uint64_t salt) {
  uint64_t s = seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(rank + 1)) ^ (0xd1b54a32d192ed69ull * (salt + 1));
  harness_rand(&s);
  return s;
}

/* Tokens of the case, fewer for big worlds so the reference fits in REF_BYTES_BUDGET (more than 4 ranks). */
static int case_tokens(const case_t* k, int R) {
  size_t row = (size_t)k->hidden * (k->fp8 ? 1 : 2);
  int n = k->tokens;
  while (n > 1024 && (size_t)R * (size_t)R * (size_t)n * row > REF_BYTES_BUDGET) n /= 2;
  return n;
}

static void world_token_counts(world_t* w, const case_t* k, uint64_t seed) {
  const int n = case_tokens(k, w->R);
  uint64_t s = stream_of(seed, -1, 7);
  for (int r = 0; r < w->R; ++r) {
    if (!k->vary || n == 0) w->num_tokens[r] = n;
    else if (r == w->R - 1 && w->R > 1) w->num_tokens[r] = 0; /* one rank with no tokens */
    else w->num_tokens[r] = 1 + (int)(harness_rand(&s) % (uint64_t)n);
  }
}

/* Distinct experts per token. Random: any expert, ~10% of the slots -1. Skewed: every token of every rank to
 * experts of rank `target`, no -1. */
static void gen_routing(uint64_t* s, const world_t* w, int n, int routing, int target, int64_t* idx) {
  const int K = w->topk, E = w->num_experts, E_loc = E / w->R;
  for (int t = 0; t < n; ++t) {
    int64_t* row = idx + (size_t)t * K;
    for (int k = 0; k < K; ++k) {
      int dup;
      do {
        row[k] = routing == ROUTE_SKEWED ? (int64_t)target * E_loc + (int64_t)(harness_rand(s) % (uint64_t)E_loc)
                                         : (int64_t)(harness_rand(s) % (uint64_t)E);
        dup = 0;
        for (int j = 0; j < k; ++j) dup |= row[j] == row[k];
      } while (dup && (routing == ROUTE_SKEWED ? K <= E_loc : K <= E));
    }
    if (routing == ROUTE_RANDOM)
      for (int k = 0; k < K; ++k)
        if (harness_uniform(s) < 0.1) row[k] = -1;
  }
}

/* A bf16 with random sign, exponent in [-6, 3] and mantissa: every bit lies in [2^-13, 2^3], so a sum of up to
 * 64 of them plus two biases in [-8, 8] stays within 24 bits: exact in fp32, whatever the order. */
static uint16_t random_bf16(uint64_t bits) {
  uint16_t sign = (uint16_t)((bits >> 15) & 1), e = (uint16_t)(((bits >> 7) & 0xff) % 10), m = (uint16_t)(bits & 0x7f);
  return (uint16_t)(sign << 15 | (uint16_t)(127 - 6 + e) << 7 | m);
}

/* A random e4m3 byte that is not NaN (0x7f / 0xff become +-448). Sums of up to 64 stay exact in fp32 too. */
static uint8_t random_e4m3(uint64_t bits) {
  uint8_t b = (uint8_t)bits;
  return (b & 0x7f) == 0x7f ? (uint8_t)(b ^ 1) : b;
}

/* x, scales and weights of every rank, from stream `salt` (a cached dispatch uses another salt). */
static void world_payload(world_t* w, uint64_t seed, uint64_t salt) {
  for (int r = 0; r < w->R; ++r) {
    uint64_t s = stream_of(seed, r, salt);
    const size_t n = (size_t)w->num_tokens[r], vals = n * (size_t)w->hidden;
    if (w->exact && w->fp8) { /* integers in [-16, 16]: exact in e4m3 */
      for (size_t i = 0; i < vals; ++i) w->x[r][i] = ep_ref_f32_to_e4m3((float)((int)(harness_rand(&s) % 33) - 16));
      for (size_t i = 0; i < n * (size_t)w->num_scales; ++i)
        w->scales[r][i] = (float)(1e-3 + 10.0 * harness_uniform(&s));
    } else if (w->exact) { /* integers in [-25, 25] */
      uint16_t* x = (uint16_t*)w->x[r];
      for (size_t i = 0; i < vals; ++i) x[i] = ep_ref_f32_to_bf16((float)((int)(harness_rand(&s) % 51) - 25));
    } else if (w->fp8) {
      for (size_t i = 0; i < vals; i += 8) {
        uint64_t bits = harness_rand(&s);
        for (size_t j = 0; j < 8 && i + j < vals; ++j) w->x[r][i + j] = random_e4m3(bits >> (8 * j));
      }
      for (size_t i = 0; i < n * (size_t)w->num_scales; ++i)
        w->scales[r][i] = (float)(1e-3 + 10.0 * harness_uniform(&s));
    } else {
      uint16_t* x = (uint16_t*)w->x[r];
      for (size_t i = 0; i < vals; i += 4) {
        uint64_t bits = harness_rand(&s);
        for (size_t j = 0; j < 4 && i + j < vals; ++j) x[i + j] = random_bf16(bits >> (16 * j));
      }
    }
    for (size_t i = 0; i < n * (size_t)w->topk; ++i) w->weights[r][i] = (float)harness_uniform(&s);
  }
}

/* Shape and routing from `count_seed` / `data_seed`; payload from `data_seed`. */
static void world_build(world_t* w, const case_t* k, const ctx_t* c, uint64_t count_seed, uint64_t data_seed,
                        int exact) {
  memset(w, 0, sizeof *w);
  w->R = c->R;
  w->exact = exact;
  w->hidden = k->hidden;
  w->topk = k->topk;
  w->num_experts = k->few_experts && 8 * c->R <= c->max_experts ? 8 * c->R : c->max_experts;
  w->fp8 = k->fp8;
  w->deliver_idx = k->topk_out != TOPK_NONE;
  w->with_weights = k->topk_out == TOPK_IDX_WEIGHTS;
  w->row_bytes = (size_t)k->hidden * (k->fp8 ? 1 : 2);
  w->num_scales = k->fp8 ? k->hidden / EP_REF_FP8_GROUP : 0;
  world_token_counts(w, k, count_seed);
  const int target = (int)((data_seed >> 17) % (uint64_t)c->R);
  for (int r = 0; r < w->R; ++r) {
    const size_t n = (size_t)w->num_tokens[r];
    w->x[r] = xmalloc(n * w->row_bytes);
    w->scales[r] = xmalloc(n * (size_t)w->num_scales * sizeof(float));
    w->idx[r] = xmalloc(n * (size_t)w->topk * sizeof(int64_t));
    w->weights[r] = xmalloc(n * (size_t)w->topk * sizeof(float));
    uint64_t s = stream_of(data_seed, r, 0);
    gen_routing(&s, w, (int)n, k->routing, target, w->idx[r]);
  }
  world_payload(w, data_seed, 1);
}

static void world_free(world_t* w) {
  for (int r = 0; r < w->R; ++r) {
    free(w->x[r]);
    free(w->scales[r]);
    free(w->idx[r]);
    free(w->weights[r]);
  }
  memset(w, 0, sizeof *w);
}

static int max_tokens_of(const world_t* w) {
  int m = 0;
  for (int r = 0; r < w->R; ++r) m = w->num_tokens[r] > m ? w->num_tokens[r] : m;
  return m;
}

/* This rank's biases: small integers in [-8, 8] as bf16. */
static uint16_t* make_bias(uint64_t seed, int me, int which, size_t count) {
  uint16_t* b = xmalloc(count * sizeof(uint16_t));
  uint64_t s = stream_of(seed, me, 10 + (uint64_t)which);
  for (size_t i = 0; i < count; ++i) b[i] = ep_ref_f32_to_bf16((float)((int)(harness_rand(&s) % 17) - 8));
  return b;
}

/* ------------------------------------------------------------------------------------------------------------
 * What this rank expects, from the reference run over the whole world
 * ------------------------------------------------------------------------------------------------------------ */

typedef struct {
  ep_ref_dispatch_t disp;
  const uint16_t* y[MAX_RANKS];  /* rank d's combine input as the reference sees it */
  uint16_t* y_owned[MAX_RANKS];  /* FP8: widened copies (rows of other ranks' tokens elsewhere stay 0) */
  uint16_t* combined_x;          /* this rank's [num_tokens, hidden] */
  uint16_t* abs_x;               /* the same combine over absolute values: sum|terms| per element (bf16) */
  float* combined_w;             /* this rank's [num_tokens, topk] */
} expect_t;

static void widen_fp8_rows(const ep_ref_recv_t* r, int hidden, int only_src_rank, uint16_t* y) {
  uint16_t lut[256];
  for (int b = 0; b < 256; ++b) lut[b] = ep_ref_f32_to_bf16(ep_ref_e4m3_to_f32((uint8_t)b));
  for (int row = 0; row < r->num_recv; ++row) {
    if (only_src_rank >= 0 && r->src_rank[row] != only_src_rank) continue;
    const uint8_t* in = r->x + (size_t)row * (size_t)hidden;
    uint16_t* out = y + (size_t)row * (size_t)hidden;
    for (int c = 0; c < hidden; ++c) out[c] = lut[in[c]];
  }
}

/* ep_ref_combine over a view of the dispatch in which only this rank has tokens: the same sums for this rank's
 * tokens, without computing every other rank's. */
static int reference_combine_mine(expect_t* e, const world_t* w, int me, const uint16_t* bias0,
                                  const uint16_t* bias1, const uint16_t* const* y, uint16_t* combined_x) {
  ep_ref_dispatch_t view = e->disp;
  int tokens[MAX_RANKS] = {0};
  tokens[me] = w->num_tokens[me];
  view.num_tokens = tokens;
  const uint16_t *b0[MAX_RANKS] = {0}, *b1[MAX_RANKS] = {0};
  const float* recv_w[MAX_RANKS] = {0};
  uint16_t* out[MAX_RANKS] = {0};
  float* out_w[MAX_RANKS] = {0};
  b0[me] = bias0;
  b1[me] = bias1;
  out[me] = combined_x;
  out_w[me] = e->combined_w;
  for (int d = 0; d < w->R; ++d) recv_w[d] = e->disp.recv[d].topk_weights;
  return ep_ref_combine(&view, w->hidden, y, w->with_weights ? recv_w : NULL, bias0 ? b0 : NULL,
                        bias1 ? b1 : NULL, out, out_w);
}

/* The reference rejecting inputs this test made is a bug of the test: every rank stops the same way. */
static void expect_build(expect_t* e, const world_t* w, int alignment, int me, const uint16_t* bias0,
                         const uint16_t* bias1) {
  memset(e, 0, sizeof *e);
  ep_ref_world_t rw;
  memset(&rw, 0, sizeof rw);
  rw.num_ranks = w->R;
  rw.ranks_per_node = w->R;
  rw.num_experts = w->num_experts;
  rw.num_topk = w->topk;
  rw.num_tokens = w->num_tokens;
  rw.x = (const void* const*)w->x;
  rw.row_bytes = w->row_bytes;
  rw.x_scales = w->fp8 ? (const float* const*)w->scales : NULL;
  rw.num_scales = w->num_scales;
  rw.topk_idx = (const int64_t* const*)w->idx;
  rw.topk_weights = w->with_weights ? (const float* const*)w->weights : NULL;
  if (ep_ref_dispatch(&rw, alignment, &e->disp) != 0) {
    fprintf(stderr, "FAIL: ep_ref_dispatch rejected the test's inputs\n");
    exit(TEST_FAIL);
  }
  for (int d = 0; d < w->R; ++d) {
    const ep_ref_recv_t* r = &e->disp.recv[d];
    if (!w->fp8) {
      e->y[d] = (const uint16_t*)r->x;
      continue;
    }
    e->y_owned[d] = xcalloc((size_t)r->num_recv * (size_t)w->hidden, sizeof(uint16_t));
    widen_fp8_rows(r, w->hidden, d == me ? -1 : me, e->y_owned[d]);
    e->y[d] = e->y_owned[d];
  }
  e->combined_x = xmalloc((size_t)w->num_tokens[me] * (size_t)w->hidden * sizeof(uint16_t));
  e->combined_w = xcalloc((size_t)w->num_tokens[me] * (size_t)w->topk, sizeof(float));
  if (reference_combine_mine(e, w, me, bias0, bias1, e->y, e->combined_x) != 0) {
    fprintf(stderr, "FAIL: ep_ref_combine rejected the test's inputs\n");
    exit(TEST_FAIL);
  }
  /* sum|terms|: the same combine over |y| (only the rows of this rank's tokens) and |bias|. */
  const size_t n = (size_t)w->num_tokens[me] * (size_t)w->hidden;
  uint16_t* abs_y[MAX_RANKS] = {0};
  uint16_t* abs_b0 = bias0 ? xmalloc(n * sizeof(uint16_t)) : NULL;
  uint16_t* abs_b1 = bias1 ? xmalloc(n * sizeof(uint16_t)) : NULL;
  for (size_t i = 0; i < n; ++i) {
    if (abs_b0) abs_b0[i] = bias0[i] & 0x7fff;
    if (abs_b1) abs_b1[i] = bias1[i] & 0x7fff;
  }
  for (int d = 0; d < w->R; ++d) {
    const ep_ref_recv_t* r = &e->disp.recv[d];
    abs_y[d] = xcalloc((size_t)r->num_recv * (size_t)w->hidden + 1, sizeof(uint16_t));
    for (int row = 0; row < r->num_recv; ++row) {
      if (r->src_rank[row] != me) continue;
      const size_t o = (size_t)row * (size_t)w->hidden;
      for (int c = 0; c < w->hidden; ++c) abs_y[d][o + (size_t)c] = e->y[d][o + (size_t)c] & 0x7fff;
    }
  }
  e->abs_x = xmalloc(n * sizeof(uint16_t) + 2);
  if (reference_combine_mine(e, w, me, abs_b0, abs_b1, (const uint16_t* const*)abs_y, e->abs_x) != 0) {
    fprintf(stderr, "FAIL: ep_ref_combine rejected the test's absolute inputs\n");
    exit(TEST_FAIL);
  }
  for (int d = 0; d < w->R; ++d) free(abs_y[d]);
  free(abs_b0);
  free(abs_b1);
}

static void expect_free(expect_t* e) {
  for (int d = 0; d < e->disp.num_ranks; ++d) free(e->y_owned[d]);
  ep_ref_dispatch_free(&e->disp);
  free(e->combined_x);
  free(e->abs_x);
  free(e->combined_w);
  memset(e, 0, sizeof *e);
}

/* ------------------------------------------------------------------------------------------------------------
 * Device buffers of one case
 * ------------------------------------------------------------------------------------------------------------ */

typedef struct {
  /* inputs: this rank's tokens */
  void* x;
  float* scales;
  int64_t* idx;
  float* weights;
  uint16_t *bias0, *bias1;
  int* num_recv;      /* prepare's device outputs */
  int* expert_counts;
  /* dispatch outputs and the combine's input, `capacity` rows */
  int capacity;
  void* recv_x;
  float* recv_scales;
  int64_t* recv_idx;
  float* recv_w;
  int* recv_src;
  uint16_t* y; /* FP8 only: the received rows widened to bf16 */
  /* combine outputs, this rank's tokens */
  uint16_t* comb_x;
  float* comb_w;
} bufs_t;

static void bufs_alloc_inputs(bufs_t* b, const world_t* w, int me) {
  memset(b, 0, sizeof *b);
  const size_t n = (size_t)w->num_tokens[me], K = (size_t)w->topk;
  b->x = dev_alloc(n * w->row_bytes);
  b->scales = dev_alloc(n * (size_t)w->num_scales * sizeof(float));
  b->idx = dev_alloc(n * K * sizeof(int64_t));
  b->weights = dev_alloc(n * K * sizeof(float));
  b->bias0 = dev_alloc(n * (size_t)w->hidden * 2);
  b->bias1 = dev_alloc(n * (size_t)w->hidden * 2);
  b->num_recv = dev_alloc(sizeof(int));
  b->expert_counts = dev_alloc((size_t)(w->num_experts / w->R) * sizeof(int));
  b->comb_x = dev_alloc(n * (size_t)w->hidden * 2);
  b->comb_w = dev_alloc(n * K * sizeof(float));
}

/* Copies this rank's inputs (synchronous: also orders them before a later graph launch). */
static void bufs_upload_inputs(bufs_t* b, const world_t* w, int me, const uint16_t* bias0, const uint16_t* bias1) {
  const size_t n = (size_t)w->num_tokens[me], K = (size_t)w->topk;
  upload(b->x, w->x[me], n * w->row_bytes);
  upload(b->scales, w->scales[me], n * (size_t)w->num_scales * sizeof(float));
  upload(b->idx, w->idx[me], n * K * sizeof(int64_t));
  upload(b->weights, w->weights[me], n * K * sizeof(float));
  if (bias0) upload(b->bias0, bias0, n * (size_t)w->hidden * 2);
  if (bias1) upload(b->bias1, bias1, n * (size_t)w->hidden * 2);
}

static void bufs_free_outputs(bufs_t* b) {
  dev_free(b->recv_x);
  dev_free(b->recv_scales);
  dev_free(b->recv_idx);
  dev_free(b->recv_w);
  dev_free(b->recv_src);
  dev_free(b->y);
  b->recv_x = NULL;
  b->recv_scales = NULL;
  b->recv_idx = NULL;
  b->recv_w = NULL;
  b->recv_src = NULL;
  b->y = NULL;
  b->capacity = 0;
}

static void bufs_alloc_outputs(bufs_t* b, const world_t* w, int capacity) {
  bufs_free_outputs(b);
  const size_t rows = (size_t)capacity, K = (size_t)w->topk;
  b->capacity = capacity;
  b->recv_x = dev_alloc(rows * w->row_bytes);
  b->recv_scales = dev_alloc(rows * (size_t)w->num_scales * sizeof(float));
  b->recv_idx = dev_alloc(rows * K * sizeof(int64_t));
  b->recv_w = dev_alloc(rows * K * sizeof(float));
  b->recv_src = dev_alloc(rows * sizeof(int));
  if (w->fp8) b->y = dev_alloc(rows * (size_t)w->hidden * 2);
}

static void bufs_free(bufs_t* b) {
  bufs_free_outputs(b);
  void* inputs[] = {b->x, b->scales, b->idx, b->weights, b->bias0, b->bias1,
                    b->num_recv, b->expert_counts, b->comb_x, b->comb_w};
  for (size_t i = 0; i < sizeof(inputs) / sizeof(inputs[0]); ++i) dev_free(inputs[i]);
  memset(b, 0, sizeof *b);
}

/* Poison prepare's device counts (0xA5A5A5A5), before a prepare. */
static void bufs_poison_counts(const bufs_t* b, const world_t* w, cudaStream_t s) {
  CUDA_CHECK(cudaMemsetAsync(b->num_recv, 0xA5, sizeof(int), s));
  CUDA_CHECK(cudaMemsetAsync(b->expert_counts, 0xA5, (size_t)(w->num_experts / w->R) * sizeof(int), s));
}

/* Poison the dispatch and combine outputs: integers 0xA5A5..., fp32 and bf16 NaN, so an unwritten one fails. */
static void bufs_poison(const bufs_t* b, const world_t* w, int me, cudaStream_t s) {
  const size_t rows = (size_t)b->capacity, K = (size_t)w->topk, n = (size_t)w->num_tokens[me];
  if (rows) {
    CUDA_CHECK(cudaMemsetAsync(b->recv_x, 0xA5, rows * w->row_bytes, s));
    if (w->fp8) CUDA_CHECK(cudaMemsetAsync(b->recv_scales, 0xFF, rows * (size_t)w->num_scales * sizeof(float), s));
    CUDA_CHECK(cudaMemsetAsync(b->recv_idx, 0xA5, rows * K * sizeof(int64_t), s));
    CUDA_CHECK(cudaMemsetAsync(b->recv_w, 0xFF, rows * K * sizeof(float), s));
    CUDA_CHECK(cudaMemsetAsync(b->recv_src, 0xA5, rows * sizeof(int), s));
  }
  if (n) {
    CUDA_CHECK(cudaMemsetAsync(b->comb_x, 0xFF, n * (size_t)w->hidden * 2, s));
    CUDA_CHECK(cudaMemsetAsync(b->comb_w, 0xFF, n * K * sizeof(float), s));
  }
}

/* ------------------------------------------------------------------------------------------------------------
 * Library calls
 * ------------------------------------------------------------------------------------------------------------ */

/* Graph-safe when host_num_recv is NULL; the device counts are asked for when `dev_counts`. */
static ep_dispatch_prepare_args_t prepare_args(const world_t* w, int me, const bufs_t* b, int alignment,
                                               int* host_num_recv, int* host_counts, int dev_counts) {
  ep_dispatch_prepare_args_t p = EP_DISPATCH_PREPARE_ARGS_INIT;
  p.topk_idx = b->idx;
  p.num_tokens = w->num_tokens[me];
  p.num_topk = w->topk;
  p.num_experts = w->num_experts;
  p.expert_alignment = alignment;
  p.num_recv_tokens = host_num_recv;
  p.num_recv_tokens_per_expert = host_counts;
  if (dev_counts) {
    p.num_recv_tokens_dev = b->num_recv;
    p.num_recv_tokens_per_expert_dev = b->expert_counts;
  }
  return p;
}

static ep_dispatch_args_t dispatch_args(const world_t* w, const bufs_t* b, int sms) {
  ep_dispatch_args_t a = EP_DISPATCH_ARGS_INIT;
  a.x = b->x;
  a.x_dtype = w->fp8 ? EP_FP8_E4M3 : EP_BF16;
  a.hidden = w->hidden;
  a.x_scales = w->fp8 ? b->scales : NULL;
  a.topk_idx = w->deliver_idx ? b->idx : NULL; /* needed only for the top-k outputs */
  a.topk_weights = w->with_weights ? b->weights : NULL;
  a.recv_capacity = b->capacity;
  a.recv_x = b->recv_x;
  a.recv_x_scales = w->fp8 ? b->recv_scales : NULL;
  a.recv_topk_idx = w->deliver_idx ? b->recv_idx : NULL;
  a.recv_topk_weights = w->with_weights ? b->recv_w : NULL;
  a.recv_src_idx = b->recv_src;
  a.num_sms = sms;
  return a;
}

/* y = the received rows (BF16: recv_x itself; FP8: b->y, filled by the caller), with the received weights. */
static ep_combine_args_t combine_args(const world_t* w, const bufs_t* b, int bias, int sms) {
  ep_combine_args_t a = EP_COMBINE_ARGS_INIT;
  a.x = w->fp8 ? (const void*)b->y : b->recv_x;
  a.hidden = w->hidden;
  a.topk_weights = w->with_weights ? b->recv_w : NULL;
  a.bias0 = (bias & BIAS0) ? b->bias0 : NULL;
  a.bias1 = (bias & BIAS1) ? b->bias1 : NULL;
  a.combined_x = b->comb_x;
  a.combined_topk_weights = w->with_weights ? b->comb_w : NULL;
  a.num_sms = sms;
  return a;
}

/* FP8: the combine input, the reference's received rows of this rank widened to bf16. */
static void upload_y(const bufs_t* b, const world_t* w, const expect_t* e, int me) {
  if (!w->fp8) return;
  int rows = e->disp.recv[me].num_recv < b->capacity ? e->disp.recv[me].num_recv : b->capacity;
  upload(b->y, e->y[me], (size_t)rows * (size_t)w->hidden * 2);
}

/* ------------------------------------------------------------------------------------------------------------
 * Checks
 * ------------------------------------------------------------------------------------------------------------ */

enum elem { ELEM_U8, ELEM_I32, ELEM_I64, ELEM_F32 };
static const size_t k_elem_bytes[] = {1, 4, 8, 4};

static void format_elem(enum elem type, const uint8_t* p, char* out, size_t len) {
  int32_t i32;
  int64_t i64;
  float f;
  uint32_t u;
  switch (type) {
    case ELEM_U8: snprintf(out, len, "0x%02x", p[0]); break;
    case ELEM_I32: memcpy(&i32, p, 4); snprintf(out, len, "%d", i32); break;
    case ELEM_I64: memcpy(&i64, p, 8); snprintf(out, len, "%lld", (long long)i64); break;
    case ELEM_F32: memcpy(&f, p, 4); memcpy(&u, p, 4); snprintf(out, len, "%g (0x%08x)", f, u); break;
  }
}

/* `rows` received rows of `row_elems` elements, bit for bit; the first bad rows are reported with their source. */
static void compare_rows(const char* what, const void* got, const void* want, int rows, size_t row_elems,
                         enum elem type, const ep_ref_recv_t* src) {
  const size_t eb = k_elem_bytes[type], row_bytes = row_elems * eb;
  int bad = 0;
  for (int r = 0; r < rows; ++r) {
    const uint8_t* g = (const uint8_t*)got + (size_t)r * row_bytes;
    const uint8_t* w = (const uint8_t*)want + (size_t)r * row_bytes;
    if (memcmp(g, w, row_bytes) == 0) continue;
    if (bad++ >= MAX_REPORTS) continue;
    size_t e = 0;
    while (memcmp(g + e * eb, w + e * eb, eb) == 0) ++e;
    char gs[48], ws[48];
    format_elem(type, g + e * eb, gs, sizeof gs);
    format_elem(type, w + e * eb, ws, sizeof ws);
    fprintf(stderr, "  %s: row %d (token %d of rank %d), element %zu: got %s, want %s\n", what, r, src->src_idx[r],
            src->src_rank[r], e, gs, ws);
  }
  CHECK(bad == 0, "%s: %d of %d rows differ from the reference", what, bad, rows);
}

/* Rows [from, to) past the received count must read -1. */
static void check_tail(const char* what, const void* got, size_t row_elems, enum elem type, int from, int to) {
  int bad = 0;
  for (int r = from; r < to; ++r)
    for (size_t e = 0; e < row_elems; ++e) {
      size_t i = (size_t)r * row_elems + e;
      long long v = type == ELEM_I64 ? (long long)((const int64_t*)got)[i] : (long long)((const int32_t*)got)[i];
      if (v != -1 && bad++ < MAX_REPORTS)
        fprintf(stderr, "  %s: row %d past the count (%d), element %zu is %lld, want -1\n", what, r, from, e, v);
    }
  CHECK(bad == 0, "%s: %d elements past the received count are not -1", what, bad);
}

/* The received count and the per-expert counts that prepare reported. */
static void check_counts(const char* path, const world_t* w, const ep_ref_recv_t* want, const int* got_num_recv,
                         const int* got_counts) {
  CHECK(*got_num_recv == want->num_recv, "%s: received %d rows, want %d", path, *got_num_recv, want->num_recv);
  for (int e = 0; e < w->num_experts / w->R; ++e)
    if (got_counts[e] != want->num_recv_tokens_per_expert[e]) {
      CHECK(0, "%s: num_recv_tokens_per_expert[%d] = %d, want %d", path, e, got_counts[e],
            want->num_recv_tokens_per_expert[e]);
      break;
    }
}

/* This rank's dispatch outputs against the reference. `got_num_recv` / `got_counts` are what prepare reported
 * (NULL: not checked here); `tail`: check the rows past the count (graph-safe outputs). */
static void check_dispatch(const char* path, const world_t* w, const ep_ref_recv_t* want, const bufs_t* b,
                           const int* got_num_recv, const int* got_counts, int tail) {
  char what[96];
  const size_t K = (size_t)w->topk;
  if (got_num_recv) check_counts(path, w, want, got_num_recv, got_counts);
  const int n = want->num_recv < b->capacity ? want->num_recv : b->capacity;
  CHECK(n == want->num_recv, "%s: capacity %d < %d received rows", path, b->capacity, want->num_recv);

  void* x = download(b->recv_x, (size_t)n * w->row_bytes);
  snprintf(what, sizeof what, "%s recv_x", path);
  compare_rows(what, x, want->x, n, w->row_bytes, ELEM_U8, want);
  free(x);
  if (w->fp8) {
    float* sc = download(b->recv_scales, (size_t)n * (size_t)w->num_scales * sizeof(float));
    snprintf(what, sizeof what, "%s recv_x_scales", path);
    compare_rows(what, sc, want->x_scales, n, (size_t)w->num_scales, ELEM_F32, want);
    free(sc);
  }
  if (w->deliver_idx) {
    int64_t* idx = download(b->recv_idx, (size_t)b->capacity * K * sizeof(int64_t));
    snprintf(what, sizeof what, "%s recv_topk_idx", path);
    compare_rows(what, idx, want->topk_idx, n, K, ELEM_I64, want);
    if (tail) check_tail(what, idx, K, ELEM_I64, n, b->capacity);
    free(idx);
  }
  if (w->with_weights) {
    float* wt = download(b->recv_w, (size_t)n * K * sizeof(float));
    snprintf(what, sizeof what, "%s recv_topk_weights", path);
    compare_rows(what, wt, want->topk_weights, n, K, ELEM_F32, want);
    free(wt);
  }
  int* src = download(b->recv_src, (size_t)b->capacity * sizeof(int));
  snprintf(what, sizeof what, "%s recv_src_idx", path);
  compare_rows(what, src, want->src_idx, n, 1, ELEM_I32, want);
  if (tail) check_tail(what, src, 1, ELEM_I32, n, b->capacity);
  free(src);
}

/* The prepare's device counts (graph-safe form, or eager with the device outputs asked for). */
static void check_dev_counts(const char* path, const world_t* w, const ep_ref_recv_t* want, const bufs_t* b) {
  const int E_loc = w->num_experts / w->R;
  int* n = download(b->num_recv, sizeof(int));
  int* counts = download(b->expert_counts, (size_t)E_loc * sizeof(int));
  char what[96];
  snprintf(what, sizeof what, "%s (device counts)", path);
  check_counts(what, w, want, n, counts);
  free(n);
  free(counts);
}

/* combined_x within 2^-7 of |ref| (bit-identical expected: reported when not), weights within 1e-6 relative. */
static void check_combine(const char* path, const world_t* w, int me, const expect_t* e, const bufs_t* b) {
  const size_t n = (size_t)w->num_tokens[me], H = (size_t)w->hidden, K = (size_t)w->topk;
  uint16_t* got = download(b->comb_x, n * H * 2);
  size_t bad = 0, inexact = 0;
  for (size_t i = 0; i < n * H; ++i) {
    if (got[i] == e->combined_x[i]) continue;
    float g = ep_ref_bf16_to_f32(got[i]), r = ep_ref_bf16_to_f32(e->combined_x[i]);
    const float bound = (ldexpf(1.0f, -7) + ldexpf(1.0f, -8)) * ep_ref_bf16_to_f32(e->abs_x[i]) * 1.02f;
    if (!w->exact && fabsf(g - r) <= bound) {
      inexact++;
      continue;
    }
    if (bad++ < MAX_REPORTS)
      fprintf(stderr, "  %s combined_x: token %zu channel %zu: got %g (0x%04x), want %g (0x%04x)\n", path, i / H,
              i % H, g, got[i], r, e->combined_x[i]);
  }
  CHECK(bad == 0, "%s combined_x: %zu of %zu values differ from the reference", path, bad, n * H);
  if (inexact && !w->exact)
    printf("  note: %s combined_x: %zu values within the partial-rounding bound, not bit-identical (expected)\n",
           path, inexact);
  free(got);
  if (!w->with_weights) return;
  float* gw = download(b->comb_w, n * K * sizeof(float));
  bad = 0;
  for (size_t i = 0; i < n * K; ++i) {
    float r = e->combined_w[i];
    if (fabsf(gw[i] - r) <= 1e-6f * fabsf(r)) continue;
    if (bad++ < MAX_REPORTS)
      fprintf(stderr, "  %s combined_topk_weights: token %zu slot %zu: got %g, want %g\n", path, i / K, i % K,
              gw[i], r);
  }
  CHECK(bad == 0, "%s combined_topk_weights: %zu of %zu values differ", path, bad, n * K);
  free(gw);
}

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
  check_combine("eager", w, c->me, e, b);
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
  check_combine("graph-safe", w, c->me, e, b);
  free(n);
  free(counts);
}

static const char* topk_out_name(int t) { return t == TOPK_NONE ? "none" : t == TOPK_IDX ? "idx" : "idx+weights"; }

static void print_case(const ctx_t* c, const char* label, int index, const case_t* k, const world_t* w) {
  char counts[MAX_RANKS * 8] = "";
  size_t len = 0;
  for (int r = 0; r < w->R && len + 8 < sizeof counts; ++r)
    len += (size_t)snprintf(counts + len, sizeof counts - len, "%s%d", r ? "," : "", w->num_tokens[r]);
  printf("rank %d: shape %dx%d: %s %d FAILED (seed 0x%016llx, replay with EP_TEST_SEED=0x%016llx): tokens=[%s] hidden=%d "
         "topk=%d dtype=%s topk_out=%s routing=%s experts=%d sms=%d alignment=%d bias=%d cached=%d\n",
         c->me, c->R / c->rpn, c->rpn, label, index, (unsigned long long)c->seed, (unsigned long long)c->seed, counts, k->hidden, k->topk,
         k->fp8 ? "fp8" : "bf16", topk_out_name(k->topk_out), k->routing == ROUTE_SKEWED ? "skewed" : "random",
         w->num_experts, k->sms, k->alignment, k->bias, k->cached);
  fflush(stdout);
}

/* Returns 1 when a check of the case failed. */
static int run_case(const ctx_t* c, const case_t* k, int index) {
  const int before = g_check_failures;
  const uint64_t case_seed = c->seed + 0x9e3779b97f4a7c15ull * (uint64_t)(index + 1);
  world_t w;
  world_build(&w, k, c, case_seed, case_seed, index % 2 == 0);
  const size_t bias_elems = (size_t)w.num_tokens[c->me] * (size_t)w.hidden;
  uint16_t* bias0 = (k->bias & BIAS0) ? make_bias(case_seed, c->me, 0, bias_elems) : NULL;
  uint16_t* bias1 = (k->bias & BIAS1) ? make_bias(case_seed, c->me, 1, bias_elems) : NULL;
  expect_t e;
  expect_build(&e, &w, k->alignment, c->me, bias0, bias1);
  bufs_t b;
  bufs_alloc_inputs(&b, &w, c->me);
  bufs_upload_inputs(&b, &w, c->me, bias0, bias1);
  run_eager(c, k, index % 2, &w, &e, &b); /* every other case also asks for the device counts */
  if (k->cached) {
    world_payload(&w, case_seed, 2); /* same routing, new x, scales and weights */
    expect_free(&e);
    expect_build(&e, &w, k->alignment, c->me, bias0, bias1);
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
  world_build(&w, &k, c, c->seed ^ 0x7a11d, c->seed ^ 0x7a11d, 1);
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
  world_build(&w, &k, c, c->seed ^ 0x0f10, c->seed ^ 0x0f10, 1);
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
  world_build(&w, &k, c, graph_seed, graph_seed, 1); /* shapes and buffers; data comes per replay */
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
    world_build(&wr, &k, c, graph_seed, graph_seed + 1 + (uint64_t)replay, replay == 0);
    uint16_t* bias0 = make_bias(graph_seed + (uint64_t)replay, c->me, 0,
                                (size_t)wr.num_tokens[c->me] * (size_t)wr.hidden);
    expect_t e;
    expect_build(&e, &wr, k.alignment, c->me, bias0, NULL);
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
    check_combine(path, &wr, c->me, &e, &b);
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

/* One group of `rpn` ranks per node: validation, the cases, a CUDA graph, the overflow. */
static void run_shape(const harness_t* h, ctx_t* c, int rpn) {
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ranks_per_node = rpn;
  cfg.num_experts = 256 / c->R * c->R;
  cfg.hidden = MAX_HIDDEN;
  cfg.max_tokens_per_rank = MAX_TOKENS;
  cfg.max_topk = MAX_TOPK;
  c->max_experts = cfg.num_experts;
  c->rpn = rpn;
  ep_status_t st = harness_group_create(h, &cfg, &c->g);
  CHECK(st == EP_STATUS_SUCCESS, "create (ranks_per_node=%d): %s: %s", rpn, ep_status_string(st),
        ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return;
  ep_group_info_t info;
  CHECK(ep_group_get_info(c->g, &info) == EP_STATUS_SUCCESS, "get_info: %s", ep_last_error(c->g));
  CHECK(info.num_nodes == c->R / rpn && info.num_nodes > 1, "shape %dx%d: the group has %d nodes", c->R / rpn, rpn,
        info.num_nodes);
  const int nodes = c->R / rpn;
  printf("rank %d: shape %d nodes x %d ranks (node %d, local %d)\n", c->me, nodes, rpn, info.node, info.local_rank);
  CUDA_CHECK(cudaStreamCreate(&c->s));
  CHECK(ep_handle_create(c->g, &c->handle) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(c->g));

  double t0 = now_s();
  int failed = run_validation(c);
  printf("rank %d: %dx%d validation: %s (%.1f s)\n", c->me, nodes, rpn, failed ? "FAILED" : "ok", now_s() - t0);

  t0 = now_s();
  failed = 0;
  /* EP_TEST_SMALL=1 keeps the small cases only (for compute-sanitizer, which is slow). */
  const int small_only = getenv("EP_TEST_SMALL") != NULL;
  for (int i = 0; i < NUM_CASES; ++i)
    if (!small_only || k_cases[i].tokens <= 64) failed += run_case(c, &k_cases[i], i);
  printf("rank %d: %dx%d dispatch/combine: %d cases (eager + graph-safe each), %d failed (%.1f s)\n", c->me, nodes,
         rpn, NUM_CASES, failed, now_s() - t0);

  if (!small_only) {
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
  for (int i = 0; i < num_shapes; ++i) run_shape(&h, &c, shapes[i]);
  return TEST_RESULT();
}
