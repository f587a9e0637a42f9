/* ll_round.h: one low-latency round -- dispatch (with or without the receive hook), the experts' outputs,
 * combine -- checked against the pure-C reference, for tests that need a correct LL call between other work
 * (test_fault_matrix: the group works after a data fault; test_soak: many rounds of fresh routing). Every rank
 * builds the whole world from one seed; the outputs are poisoned before each call. Header-only (static inline
 * functions), so that the tests that include it need no other part. The full LL test is test_low_latency. */
#ifndef EP_TESTS_GPU_LL_ROUND_H
#define EP_TESTS_GPU_LL_ROUND_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "gpu/harness.h"
#include "gpu/test_util.h"
#include "ref/ep_ref.h"

#define LL_MAX_RANKS 16
#define LL_MAX_REPORTS 3

/* The shape of a round; every rank has the same. */
typedef struct {
  int T, hidden, topk, experts;
  int fp8;       /* recv_dtype FP8 E4M3 (plain scales), else BF16 */
  int hook;      /* return_after_send, then the receive calls */
  int neg;       /* percent of top-k slots that are -1 */
  int zero_rank; /* this rank has no tokens; -1: every rank has 1..T */
} ll_shape_t;

/* Every rank's inputs and what the reference makes of them. */
typedef struct {
  ll_shape_t k;
  int R;
  uint64_t seed;
  int num_tokens[LL_MAX_RANKS];
  uint16_t* x[LL_MAX_RANKS];
  int64_t* idx[LL_MAX_RANKS];
  float* w[LL_MAX_RANKS];
  ep_ref_ll_world_t ref;
  ep_ref_ll_dispatch_t disp;
} ll_world_t;

/* Device buffers sized for the largest shape a test uses, and the handle. */
typedef struct {
  ep_ll_handle_t h;
  void *x, *idx, *w, *recv_x, *recv_scales, *recv_count, *y, *out;
  size_t x_bytes, recv_bytes, scale_bytes, count_bytes, y_bytes, out_bytes, idx_bytes, w_bytes;
} ll_bufs_t;

/* The experts' output for token (s, t) at local expert le of rank d: small values, exact in bf16. */
static inline void ll_expert_fn(void* ctx, int d, int le, int s, int t, int hidden, uint16_t* y) {
  const uint64_t salt = *(const uint64_t*)ctx;
  for (int c = 0; c < hidden; ++c) {
    uint64_t h =
        salt ^ ((uint64_t)d << 52) ^ ((uint64_t)le << 40) ^ ((uint64_t)s << 32) ^ ((uint64_t)t << 16) ^ (uint64_t)c;
    h = harness_rand(&h);
    y[c] = ep_ref_f32_to_bf16((float)((int)(h % 255) - 127) / 32.0f);
  }
}

/* Returns 0, or 1 when the reference rejected the world (a bug of the test). */
static inline int ll_world_make(ll_world_t* w, const ll_shape_t* k, int R, uint64_t seed) {
  memset(w, 0, sizeof(*w));
  w->k = *k;
  w->R = R;
  w->seed = seed;
  uint64_t st = seed;
  const int H = k->hidden, K = k->topk, E = k->experts;
  for (int r = 0; r < R; ++r) {
    const int n = r == k->zero_rank ? 0 : 1 + (int)(harness_uniform(&st) * k->T);
    w->num_tokens[r] = n;
    w->x[r] = xmalloc((size_t)n * H * 2 + 2);
    w->idx[r] = xmalloc((size_t)n * K * 8 + 8);
    w->w[r] = xmalloc((size_t)n * K * 4 + 4);
    for (int t = 0; t < n; ++t) {
      for (int c = 0; c < H; ++c)
        w->x[r][(size_t)t * H + c] = ep_ref_f32_to_bf16((float)(2.0 * harness_uniform(&st) - 1.0));
      int64_t* row = w->idx[r] + (size_t)t * K;
      for (int j = 0; j < K; ++j) {
        int fresh;
        do { /* distinct experts, as a router picks them */
          row[j] = (int64_t)(harness_uniform(&st) * E);
          fresh = 1;
          for (int q = 0; q < j; ++q) fresh &= row[q] != row[j];
        } while (!fresh);
      }
      for (int j = 0; j < K; ++j) {
        if (harness_uniform(&st) * 100.0 < k->neg) row[j] = -1;
        w->w[r][(size_t)t * K + j] = (float)harness_uniform(&st);
      }
    }
  }
  w->ref.num_ranks = R;
  w->ref.num_experts = E;
  w->ref.num_topk = K;
  w->ref.hidden = H;
  w->ref.max_tokens_per_rank = k->T;
  w->ref.num_tokens = w->num_tokens;
  w->ref.x = (const uint16_t* const*)w->x;
  w->ref.topk_idx = (const int64_t* const*)w->idx;
  w->ref.topk_weights = (const float* const*)w->w;
  return ep_ref_ll_dispatch(&w->ref, k->fp8, 0, 0, &w->disp) != 0;
}

static inline void ll_world_free(ll_world_t* w) {
  ep_ref_ll_dispatch_free(&w->disp);
  for (int r = 0; r < w->R; ++r) {
    free(w->x[r]);
    free(w->idx[r]);
    free(w->w[r]);
  }
}

/* Buffers for shapes up to `max` (its T, hidden, topk and experts) on R ranks. Returns the handle's status. */
static inline ep_status_t ll_bufs_alloc(ep_group_t g, ll_bufs_t* b, const ll_shape_t* max, int R) {
  memset(b, 0, sizeof(*b));
  const ep_status_t st = ep_ll_handle_create(g, &b->h);
  const size_t E_loc = (size_t)max->experts / R, RT = (size_t)R * max->T, H = (size_t)max->hidden;
  b->x_bytes = (size_t)max->T * H * 2;
  b->idx_bytes = (size_t)max->T * max->topk * 8;
  b->w_bytes = (size_t)max->T * max->topk * 4;
  b->recv_bytes = E_loc * RT * H * 2; /* bf16; FP8 takes half */
  b->scale_bytes = E_loc * RT * (H / 128) * 4;
  b->count_bytes = E_loc * 4;
  b->y_bytes = E_loc * RT * H * 2;
  b->out_bytes = (size_t)max->T * H * 2;
  b->x = dev_alloc(b->x_bytes);
  b->idx = dev_alloc(b->idx_bytes);
  b->w = dev_alloc(b->w_bytes);
  b->recv_x = dev_alloc(b->recv_bytes);
  b->recv_scales = dev_alloc(b->scale_bytes);
  b->recv_count = dev_alloc(b->count_bytes);
  b->y = dev_alloc(b->y_bytes);
  b->out = dev_alloc(b->out_bytes);
  return st;
}

static inline void ll_bufs_free(ll_bufs_t* b) {
  if (b->h) ep_ll_handle_destroy(b->h);
  void* bufs[] = {b->x, b->idx, b->w, b->recv_x, b->recv_scales, b->recv_count, b->y, b->out};
  for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); ++i) dev_free(bufs[i]);
  memset(b, 0, sizeof(*b));
}

/* This rank's inputs in, every output poisoned. */
static inline void ll_load(ll_bufs_t* b, const ll_world_t* w, int me) {
  const int n = w->num_tokens[me];
  upload(b->x, w->x[me], (size_t)n * w->k.hidden * 2);
  upload(b->idx, w->idx[me], (size_t)n * w->k.topk * 8);
  upload(b->w, w->w[me], (size_t)n * w->k.topk * 4);
  CUDA_CHECK(cudaMemset(b->recv_x, 0xA5, b->recv_bytes));
  CUDA_CHECK(cudaMemset(b->recv_scales, 0xFF, b->scale_bytes));
  CUDA_CHECK(cudaMemset(b->recv_count, 0xFF, b->count_bytes));
  CUDA_CHECK(cudaMemset(b->out, 0xFF, b->out_bytes));
}

static inline ep_ll_dispatch_args_t ll_dispatch_args(const ll_bufs_t* b, const ll_world_t* w, int me) {
  ep_ll_dispatch_args_t a = EP_LL_DISPATCH_ARGS_INIT;
  a.x = b->x;
  a.num_tokens = w->num_tokens[me];
  a.hidden = w->k.hidden;
  a.topk_idx = b->idx;
  a.num_topk = w->k.topk;
  a.num_experts = w->k.experts;
  a.max_tokens_per_rank = w->k.T;
  a.recv_dtype = w->k.fp8 ? EP_FP8_E4M3 : EP_BF16;
  a.recv_x = b->recv_x;
  a.recv_x_scales = w->k.fp8 ? b->recv_scales : NULL;
  a.recv_count = b->recv_count;
  a.return_after_send = w->k.hook;
  return a;
}

/* The experts' outputs of this rank for the reference's routing, in the dispatch layout, into b->y. */
static inline void ll_upload_y(ll_bufs_t* b, const ll_world_t* w, int me) {
  const int H = w->k.hidden;
  const size_t E_loc = (size_t)w->k.experts / w->R, RT = (size_t)w->R * w->k.T;
  const ep_ref_ll_recv_t* r = &w->disp.recv[me];
  uint16_t* y = xmalloc(E_loc * RT * H * 2);
  for (size_t e = 0; e < E_loc; ++e)
    for (int i = 0; i < r->count[e]; ++i) {
      const int row = r->expert_offset[e] + i;
      ll_expert_fn((void*)&w->seed, me, (int)e, r->src_rank[row], r->src_idx[row], H, y + (e * RT + i) * H);
    }
  upload(b->y, y, E_loc * RT * H * 2);
  free(y);
}

static inline ep_ll_combine_args_t ll_combine_args(const ll_bufs_t* b, const ll_world_t* w) {
  ep_ll_combine_args_t a = EP_LL_COMBINE_ARGS_INIT;
  a.x = b->y;
  a.topk_weights = b->w;
  a.out = b->out;
  a.return_after_send = w->k.hook;
  return a;
}

/* recv_count and every received row (bf16 bytes, or e4m3 bytes and fp32 scales) against the reference. Returns the
 * number of mismatches (the first few printed). */
static inline long ll_check_dispatch(const ll_bufs_t* b, const ll_world_t* w, int me) {
  const int H = w->k.hidden, fp8 = w->k.fp8;
  const size_t E_loc = (size_t)w->k.experts / w->R, RT = (size_t)w->R * w->k.T, G = (size_t)H / 128;
  const ep_ref_ll_recv_t* r = &w->disp.recv[me];
  int* count = download(b->recv_count, E_loc * 4);
  uint8_t* x = download(b->recv_x, E_loc * RT * H * (fp8 ? 1 : 2));
  float* sc = fp8 ? download(b->recv_scales, E_loc * RT * G * 4) : NULL;
  long bad = 0;
  for (size_t e = 0; e < E_loc; ++e) {
    if (count[e] != r->count[e]) {
      if (bad++ < LL_MAX_REPORTS)
        fprintf(stderr, "rank %d: LL recv_count[%zu] = %d, want %d\n", me, e, count[e], r->count[e]);
      continue;
    }
    for (int i = 0; i < count[e]; ++i) {
      const size_t row = (size_t)r->expert_offset[e] + i, at = e * RT + i;
      int same = fp8 ? memcmp(x + at * H, r->x_fp8 + row * H, (size_t)H) == 0
                     : memcmp(x + at * H * 2, r->x + row * H, (size_t)H * 2) == 0;
      for (size_t g = 0; fp8 && g < G; ++g) same &= memcmp(&sc[(e * G + g) * RT + i], &r->scales[row * G + g], 4) == 0;
      if (!same && bad++ < LL_MAX_REPORTS)
        fprintf(stderr, "rank %d: LL recv row %d of local expert %zu (source rank %d token %d) differs\n", me, i, e,
                r->src_rank[row], r->src_idx[row]);
    }
  }
  free(count);
  free(x);
  free(sc);
  return bad;
}

/* This rank's combined output against the reference combine. Returns the number of mismatching elements. */
static inline long ll_check_combine(const ll_bufs_t* b, const ll_world_t* w, int me) {
  const int H = w->k.hidden, n = w->num_tokens[me];
  uint16_t* want[LL_MAX_RANKS];
  for (int r = 0; r < w->R; ++r) want[r] = xmalloc((size_t)w->num_tokens[r] * H * 2 + 2);
  long bad = ep_ref_ll_combine_fn(&w->ref, ll_expert_fn, (void*)&w->seed, want) != 0;
  if (bad) fprintf(stderr, "rank %d: the reference LL combine rejected the world\n", me);
  uint16_t* got = download(b->out, (size_t)n * H * 2);
  for (size_t i = 0; !bad && i < (size_t)n * H; ++i)
    if (got[i] != want[me][i] && bad++ < LL_MAX_REPORTS)
      fprintf(stderr, "rank %d: LL out[%zu][%zu] = 0x%04x, want 0x%04x\n", me, i / H, i % H, got[i], want[me][i]);
  free(got);
  for (int r = 0; r < w->R; ++r) free(want[r]);
  return bad;
}

/* One round on every rank: dispatch (+ receive), check, the experts' outputs, combine (+ receive), check. Every rank
 * makes the same calls whatever its checks find. Returns the mismatches, or -1 when a call failed (the checks
 * count the failure too). */
static inline long ll_run_round(ep_group_t g, cudaStream_t s, ll_bufs_t* b, const ll_world_t* w, int me) {
  ll_load(b, w, me);
  ep_ll_dispatch_args_t da = ll_dispatch_args(b, w, me);
  ep_status_t st = ep_ll_dispatch(g, b->h, &da, s);
  if (st == EP_STATUS_SUCCESS && w->k.hook) st = ep_ll_dispatch_recv(g, b->h, s);
  CHECK(st == EP_STATUS_SUCCESS, "LL dispatch: %s: %s", ep_status_string(st), ep_last_error(g));
  CUDA_CHECK(cudaStreamSynchronize(s));
  ep_status_t async = EP_STATUS_INTERNAL_ERROR;
  ep_get_async_error(g, &async);
  CHECK(async == EP_STATUS_SUCCESS, "LL dispatch, async: %s: %s", ep_status_string(async), ep_last_error(g));
  long bad = ll_check_dispatch(b, w, me);
  ll_upload_y(b, w, me);
  ep_ll_combine_args_t ca = ll_combine_args(b, w);
  ep_status_t cst = ep_ll_combine(g, b->h, &ca, s);
  if (cst == EP_STATUS_SUCCESS && w->k.hook) cst = ep_ll_combine_recv(g, b->h, s);
  CHECK(cst == EP_STATUS_SUCCESS, "LL combine: %s: %s", ep_status_string(cst), ep_last_error(g));
  CUDA_CHECK(cudaStreamSynchronize(s));
  ep_get_async_error(g, &async);
  CHECK(async == EP_STATUS_SUCCESS, "LL combine, async: %s: %s", ep_status_string(async), ep_last_error(g));
  bad += ll_check_combine(b, w, me);
  CHECK(bad == 0, "LL round (seed 0x%016llx): %ld mismatches", (unsigned long long)w->seed, bad);
  return st != EP_STATUS_SUCCESS || cst != EP_STATUS_SUCCESS || async != EP_STATUS_SUCCESS ? -1 : bad;
}

#endif /* EP_TESTS_GPU_LL_ROUND_H */
