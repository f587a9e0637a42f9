/* normal_cases.c: the world, the expectation, the device buffers and the checks that test_intranode and
 * test_internode share (normal_cases.h). */
#include "gpu/normal_cases.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "gpu/test_util.h"
#include "ref/ep_ref.h"


/* ------------------------------------------------------------------------------------------------------------
 * The world: every rank's inputs, generated identically on every rank
 * ------------------------------------------------------------------------------------------------------------ */

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

/* Whether rank r of R has no tokens under `vary` (enum vary). */
static int rank_is_empty(int vary, int r, int R) {
  if (R < 2) return 0;
  switch (vary) {
    case VARY_LAST: return r == R - 1;
    case VARY_FIRST: return r == 0;
    case VARY_MIDDLE: return r == R / 2;
    case VARY_SEVERAL: return r % 2 == 1;
    case VARY_NODE: return r < R / 2;
    default: return 0;
  }
}

static void world_token_counts(world_t* w, const case_t* k, uint64_t seed) {
  const int n = case_tokens(k, w->R);
  uint64_t s = stream_of(seed, -1, 7);
  for (int r = 0; r < w->R; ++r) {
    if (!k->vary || n == 0) w->num_tokens[r] = n;
    else if (k->vary == VARY_PEAK) w->num_tokens[r] = w->R < 2 || r == w->R / 2 - 1 ? n : 1;
    else if (rank_is_empty(k->vary, r, w->R)) w->num_tokens[r] = 0;
    else w->num_tokens[r] = 1 + (int)(harness_rand(&s) % (uint64_t)n);
  }
}

/* Per token, as enum routing says. Skewed: to experts of rank `target`. Repeat: a random slot k > 0 of every third
 * token names the expert of a random earlier slot, before the -1s are drawn. */
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
    if (routing == ROUTE_REPEAT && K > 1 && t % 3 == 0) {
      const int k = 1 + (int)(harness_rand(s) % (uint64_t)(K - 1));
      row[k] = row[harness_rand(s) % (uint64_t)k];
    }
    if (routing != ROUTE_SKEWED)
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

/* x, scales and weights of every rank, from stream `salt` (a cached dispatch uses another salt). The random
 * payload, or with w->exact small integers, so that every partial sum of the internode combine is exact in bf16. */
void world_payload(world_t* w, uint64_t seed, uint64_t salt) {
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

void world_build(world_t* w, const case_t* k, int num_ranks, int max_experts, uint64_t count_seed,
                 uint64_t data_seed, int exact) {
  memset(w, 0, sizeof *w);
  w->R = num_ranks;
  w->exact = exact;
  w->hidden = k->hidden;
  w->topk = k->topk;
  w->num_experts = k->few_experts && 8 * num_ranks <= max_experts ? 8 * num_ranks : max_experts;
  w->fp8 = k->fp8;
  w->deliver_idx = k->topk_out != TOPK_NONE;
  w->with_weights = k->topk_out == TOPK_IDX_WEIGHTS;
  w->row_bytes = (size_t)k->hidden * (k->fp8 ? 1 : 2);
  w->num_scales = k->fp8 ? k->hidden / EP_REF_FP8_GROUP : 0;
  world_token_counts(w, k, count_seed);
  const int target = (int)((data_seed >> 17) % (uint64_t)num_ranks);
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

void world_free(world_t* w) {
  for (int r = 0; r < w->R; ++r) {
    free(w->x[r]);
    free(w->scales[r]);
    free(w->idx[r]);
    free(w->weights[r]);
  }
  memset(w, 0, sizeof *w);
}

int max_tokens_of(const world_t* w) {
  int m = 0;
  for (int r = 0; r < w->R; ++r) m = w->num_tokens[r] > m ? w->num_tokens[r] : m;
  return m;
}

uint16_t* make_bias(uint64_t seed, int me, int which, size_t count) {
  uint16_t* b = xmalloc(count * sizeof(uint16_t));
  uint64_t s = stream_of(seed, me, 10 + (uint64_t)which);
  for (size_t i = 0; i < count; ++i) b[i] = ep_ref_f32_to_bf16((float)((int)(harness_rand(&s) % 17) - 8));
  return b;
}

/* ------------------------------------------------------------------------------------------------------------
 * What this rank expects, from the reference run over the whole world
 * ------------------------------------------------------------------------------------------------------------ */

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

/* e->abs_x, sum|terms|: the same combine over |y| (only the rows of this rank's tokens) and |bias|. */
static void expect_abs_sums(expect_t* e, const world_t* w, int me, const uint16_t* bias0, const uint16_t* bias1) {
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

void expect_build(expect_t* e, const world_t* w, int alignment, int me, const uint16_t* bias0,
                  const uint16_t* bias1, int with_abs_sums) {
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
  if (with_abs_sums) expect_abs_sums(e, w, me, bias0, bias1);
}

void expect_free(expect_t* e) {
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

void bufs_alloc_inputs(bufs_t* b, const world_t* w, int me) {
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
void bufs_upload_inputs(bufs_t* b, const world_t* w, int me, const uint16_t* bias0, const uint16_t* bias1) {
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

void bufs_alloc_outputs(bufs_t* b, const world_t* w, int capacity) {
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

void bufs_free(bufs_t* b) {
  bufs_free_outputs(b);
  void* inputs[] = {b->x, b->scales, b->idx, b->weights, b->bias0, b->bias1,
                    b->num_recv, b->expert_counts, b->comb_x, b->comb_w};
  for (size_t i = 0; i < sizeof(inputs) / sizeof(inputs[0]); ++i) dev_free(inputs[i]);
  memset(b, 0, sizeof *b);
}

/* Poison prepare's device counts (0xA5A5A5A5), before a prepare. */
void bufs_poison_counts(const bufs_t* b, const world_t* w, cudaStream_t s) {
  CUDA_CHECK(cudaMemsetAsync(b->num_recv, 0xA5, sizeof(int), s));
  CUDA_CHECK(cudaMemsetAsync(b->expert_counts, 0xA5, (size_t)(w->num_experts / w->R) * sizeof(int), s));
}

/* Poison the dispatch and combine outputs: integers 0xA5A5..., fp32 and bf16 NaN, so an unwritten one fails. */
void bufs_poison(const bufs_t* b, const world_t* w, int me, cudaStream_t s) {
  const size_t rows = (size_t)b->capacity, K = (size_t)w->topk;
  if (rows) {
    CUDA_CHECK(cudaMemsetAsync(b->recv_x, 0xA5, rows * w->row_bytes, s));
    if (w->fp8) CUDA_CHECK(cudaMemsetAsync(b->recv_scales, 0xFF, rows * (size_t)w->num_scales * sizeof(float), s));
    CUDA_CHECK(cudaMemsetAsync(b->recv_idx, 0xA5, rows * K * sizeof(int64_t), s));
    CUDA_CHECK(cudaMemsetAsync(b->recv_w, 0xFF, rows * K * sizeof(float), s));
    CUDA_CHECK(cudaMemsetAsync(b->recv_src, 0xA5, rows * sizeof(int), s));
  }
  bufs_poison_combine(b, w, me, s);
}

void bufs_poison_combine(const bufs_t* b, const world_t* w, int me, cudaStream_t s) {
  const size_t n = (size_t)w->num_tokens[me];
  if (!n) return;
  CUDA_CHECK(cudaMemsetAsync(b->comb_x, 0xFF, n * (size_t)w->hidden * 2, s));
  CUDA_CHECK(cudaMemsetAsync(b->comb_w, 0xFF, n * (size_t)w->topk * sizeof(float), s));
}

/* ------------------------------------------------------------------------------------------------------------
 * Library calls
 * ------------------------------------------------------------------------------------------------------------ */

/* Graph-safe when host_num_recv is NULL; the device counts are asked for when `dev_counts`. */
ep_dispatch_prepare_args_t prepare_args(const world_t* w, int me, const bufs_t* b, int alignment,
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

ep_dispatch_args_t dispatch_args(const world_t* w, const bufs_t* b, int sms) {
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
ep_combine_args_t combine_args(const world_t* w, const bufs_t* b, int bias, int sms) {
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
void upload_y(const bufs_t* b, const world_t* w, const expect_t* e, int me) {
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
  for (int e = 0; got_counts && e < w->num_experts / w->R; ++e)
    if (got_counts[e] != want->num_recv_tokens_per_expert[e]) {
      CHECK(0, "%s: num_recv_tokens_per_expert[%d] = %d, want %d", path, e, got_counts[e],
            want->num_recv_tokens_per_expert[e]);
      break;
    }
}

/* This rank's dispatch outputs against the reference. `got_num_recv` / `got_counts` are what prepare reported
 * (NULL: not checked here); `tail`: check the rows past the count (graph-safe outputs). */
void check_dispatch(const char* path, const world_t* w, const ep_ref_recv_t* want, const bufs_t* b,
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
void check_dev_counts(const char* path, const world_t* w, const ep_ref_recv_t* want, const bufs_t* b) {
  const int E_loc = w->num_experts / w->R;
  int* n = download(b->num_recv, sizeof(int));
  int* counts = download(b->expert_counts, (size_t)E_loc * sizeof(int));
  char what[96];
  snprintf(what, sizeof what, "%s (device counts)", path);
  check_counts(what, w, want, n, counts);
  free(n);
  free(counts);
}

/* combined_x bit-identical or within the test's rule (the accepted values are reported), weights within 1e-6
 * relative. */
void check_combine(const char* path, const world_t* w, int me, const expect_t* e, const bufs_t* b,
                   const combine_rule_t* rule) {
  const size_t n = (size_t)w->num_tokens[me], H = (size_t)w->hidden, K = (size_t)w->topk;
  uint16_t* got = download(b->comb_x, n * H * 2);
  size_t bad = 0, inexact = 0;
  for (size_t i = 0; i < n * H; ++i) {
    if (got[i] == e->combined_x[i]) continue;
    float g = ep_ref_bf16_to_f32(got[i]), r = ep_ref_bf16_to_f32(e->combined_x[i]);
    if (rule->accept(w, e, i, g, r)) {
      inexact++;
      continue;
    }
    if (bad++ < MAX_REPORTS)
      fprintf(stderr, "  %s combined_x: token %zu channel %zu: got %g (0x%04x), want %g (0x%04x)\n", path, i / H,
              i % H, g, got[i], r, e->combined_x[i]);
  }
  CHECK(bad == 0, "%s combined_x: %zu of %zu values differ from the reference", path, bad, n * H);
  if (inexact) printf("  note: %s combined_x: %zu %s\n", path, inexact, rule->note);
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
