/* test_low_latency: the low-latency path -- ep_ll_dispatch (+ _recv), ep_ll_combine (+ _recv), zero-copy,
 * CUDA graphs, timeouts -- against the pure-C reference (ep_ref_ll_dispatch_to / ep_ref_ll_combine_fn).
 *
 *   every rank:  all ranks' inputs from one shared seed ──> reference (what this rank receives and returns)
 *                its own inputs ──> the library ──> its outputs == the reference's outputs for this rank, bit for bit
 *
 * Shapes: one NVLink domain (peers by stores), then virtual nodes of one rank (every peer through the transport's
 * put-with-signal), then mixed: virtual nodes of 2 ranks (4, 6 and 8 ranks) and of 4 (8 ranks), NVLink peers inside
 * a node and put peers across, with the cases of T <= 64 and two graphs (EP_TEST_LEVEL=full: everything). For the
 * first two, the cases of k_cases (FP8 with plain, power-of-two and UE8M0 scales, and BF16; hook and no hook;
 * zero-copy; -1 entries; repeated experts; ranks with 0 tokens; T = 1 .. 1024; hidden 2048, 2056 (BF16), 2688,
 * 4096, 7168; top-k 1, 2, 3, 5, 8, 9, 16, 17, 24, 32; tokens whose experts cover several or all experts of a rank,
 * and tokens with no destination), each repeated with fresh data; two micro-batches in flight (both halves);
 * dispatch + expert copy + combine captured in a CUDA graph and replayed with new inputs, and two micro-batches
 * captured together with the hook, zero-copy and UE8M0, eager calls after the replays; many repetitions; the
 * combine with sums on the experts' ranks (the dispatch carries the weights) in both shapes, the graph included.
 * Checked: recv_count, layout_range, src_info, recv_x bytes, scales (fp32 column-major or packed UE8M0), the
 * combined output; every output is poisoned before every call. Last, in a fresh process (`test_low_latency
 * timeout`, harness_run_case: the failed group is torn down locally), a peer that never calls makes the call time
 * out naming it. Any rank count from 1 to 16: a case's expert count is rounded down to a multiple of it.
 * EP_TEST_LEVEL=full adds k_big_t_cases (T 1536 .. 8192) on a group with ll_max_tokens_per_rank 8192, and at 6 ranks
 * virtual nodes of 3. A failure prints the case and the seed; EP_TEST_SEED=<seed> replays it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "gpu/test_util.h"
#include "ref/ep_ref.h"

#define MAX_RANKS 16
#define CFG_EXPERTS 64
#define CFG_HIDDEN 7168
#define CFG_TOKENS 1024
#define CFG_TOPK 32 /* EP_MAX_TOPK */
/* EP_TEST_LEVEL=full: a second group for T above CFG_TOKENS, up to the API's EP_LL_MAX_TOKENS_PER_RANK. */
#define BIG_T_HIDDEN 2048
#define BIG_T_EXPERTS 40 /* top-k 32 fits at every rank count up to 8 */
#define MAX_REPORTS 3

enum { BF16, FP8, FP8_POW2, UE8M0 };
static const char* const k_mode_names[] = {"bf16", "fp8", "fp8-pow2", "fp8-ue8m0"};

typedef struct {
  int T;         /* max_tokens_per_rank; every rank has T tokens unless `vary` */
  int hidden;
  int topk;
  int experts;
  int mode;
  int hook;      /* send phase, then the receive phase as a separate call */
  int zero_copy;
  int neg;       /* percent of top-k entries that are -1 */
  int dup;       /* some tokens list an expert twice */
  int vary;      /* token counts differ between ranks; the last rank has none */
  int reps;      /* repetitions with fresh data */
  int sums;      /* the dispatch carries the weights and the combine sums on the experts' ranks */
  int logfmt;    /* the combine's rows travel as LogFMT-10 (use_logfmt) */
} case_t;

/* clang-format off */
static const case_t k_cases[] = {
  /*   T  hidden topk exp  mode      hook zc neg dup vary reps sums logfmt */
    {   1, 2048,   1, 64, FP8,        0,  0,  0,  0,  0,   4,  0, 0},
    {   1, 7168,   8, 64, BF16,       1,  1,  0,  0,  1,   4,  0, 0},
    { 128, 7168,   8, 64, FP8,        1,  0, 10,  0,  0,   4,  0, 0},
    { 128, 7168,   8, 64, BF16,       0,  1,  0,  0,  0,   3,  0, 0},
    { 128, 2688,  16, 32, FP8,        0,  0, 10,  1,  1,   3,  0, 0},
    { 128, 2688,   9, 16, BF16,       1,  1, 20,  0,  1,   3,  0, 0},
    { 128, 7168,  16, 64, UE8M0,      1,  1,  0,  0,  1,   2,  0, 0},
    { 256, 4096,   9, 64, FP8_POW2,   1,  1,  5,  1,  1,   3,  0, 0},
    { 256, 2048,  16, 64, UE8M0,      0,  0,  5,  0,  0,   2,  0, 0},
    {  64, 4096,   8, 64, FP8_POW2,   0,  0, 30,  1,  0,   3,  0, 0},
    {1024, 2048,   8, 64, FP8,        1,  0, 10,  0,  0,   2,  0, 0},
    {1024, 4096,   1, 64, BF16,       0,  0,  0,  0,  1,   1,  0, 0},
    /* A token crosses the link once per destination rank and carries its (expert, slot) list: every token on
     * every rank with several experts each (top-k = experts), many tokens with no destination at all (top-1, half
     * -1), a BF16 hidden that is a multiple of 8 but not of 16 (the last lane's second word), UE8M0 + zero-copy
     * with all experts of a token on few ranks. */
    { 128, 2688,  16, 16, FP8,        0,  0,  0,  1,  0,   2,  0, 0},
    {  64, 2048,   1, 64, FP8,        1,  0, 50,  0,  1,   3,  0, 0},
    { 128, 2056,   8, 64, BF16,       1,  0, 10,  1,  1,   2,  0, 0},
    {  32, 4096,   8,  8, UE8M0,      0,  1, 10,  1,  0,   2,  0, 0},
    /* Fewer send blocks than ranks (one block per token): a block publishes the counts and dispatch_meta rows of
     * several ranks (rank r by block r % grid), no hook and hook. */
    {   3, 2048,   8, 64, FP8,        0,  0,  0,  0,  0,   3,  0, 0},
    {   2, 4096,   9, 16, BF16,       1,  0, 10,  1,  0,   3,  0, 0},
    /* Sums on the experts' ranks: the dispatch carries each (token, expert) weight, each rank sums its experts'
     * rows of a token and one row per (token, rank) goes back. Many experts per rank (top-16 of 16), repeated
     * experts (their weights add), -1 entries, empty ranks, zero-copy, the hook, T = 1 and 1024. */
    { 128, 7168,   8, 64, FP8,        0,  0, 10,  1,  1,   3, 1, 0},
    { 128, 2688,  16, 16, BF16,       1,  1, 20,  1,  1,   3, 1, 0},
    {   1, 2048,   9, 64, FP8,        1,  0,  0,  0,  0,   3, 1, 0},
    {1024, 4096,   8, 64, UE8M0,      0,  1,  5,  1,  0,   2, 1, 0},
    {   3, 2048,  16, 16, BF16,       0,  0, 30,  1,  1,   3, 1, 0},
    /* Top-k 2..5 and 17..32: the slot-packing factors and the combine rounds the cases above do not reach. */
    {  64, 2048,   2, 64, BF16,       1,  0, 10,  1,  1,   2, 0, 0},
    {  32, 4096,   3, 64, FP8,        0,  0,  0,  0,  0,   2, 0, 0},
    {  16, 4096,   5, 32, UE8M0,      0,  1, 10,  1,  1,   2, 0, 0},
    {  64, 2048,  17, 64, FP8,        1,  0, 10,  1,  0,   2, 0, 0},
    {  16, 7168,  32, 64, BF16,       0,  1, 20,  1,  1,   2, 0, 0},
    {  32, 2048,  24, 32, FP8_POW2,   1,  0,  5,  1,  0,   2, 1, 0},
    {   8, 2048,  32, 64, BF16,       0,  0,  0,  1,  1,   2, 1, 0},
    /* LogFMT-10 combine (last column): the reference's encoding and decoding, bit for bit; hook and no hook, -1
     * entries, repeated experts, empty ranks, a hidden of 3 groups short of 256-channel chunks. */
    {  64, 7168,   8, 64, FP8,        0,  0, 10,  1,  1,   2, 0, 1},
    {  32, 2048,   5, 64, BF16,       1,  0,  0,  0,  0,   2, 0, 1},
    { 128, 4096,   9, 64, FP8_POW2,   0,  0, 10,  1,  0,   2, 0, 1},
    {  16,  384,   8, 16, BF16,       1,  0, 20,  1,  1,   2, 0, 1},
};
#define NUM_CASES ((int)(sizeof(k_cases) / sizeof(k_cases[0])))

/* EP_TEST_LEVEL=full, on a group with ll_max_tokens_per_rank EP_LL_MAX_TOKENS_PER_RANK: T above 1024. */
static const case_t k_big_t_cases[] = {
  /*   T  hidden topk exp  mode      hook zc neg dup vary reps sums logfmt */
    {8192,  512,   2, 16, BF16,       0,  0, 10,  1,  1,   1, 0, 0},
    {4096, 1024,  32, 32, FP8,        1,  0,  5,  1,  0,   1, 0, 0},
    {2048, 2048,  17, 32, UE8M0,      0,  1, 10,  0,  1,   2, 1, 0},
    {1536, 2048,   4, 16, FP8_POW2,   1,  1,  0,  1,  0,   2, 0, 0},
};
#define NUM_BIG_T_CASES ((int)(sizeof(k_big_t_cases) / sizeof(k_big_t_cases[0])))
/* clang-format on */

/* The case with its expert count made a multiple of the rank count (64 at 3 ranks: 63): rounded down, or up where
 * that leaves fewer than one per rank or fewer than top-k (world_make draws distinct experts). */
static case_t for_ranks(const case_t* k, int R) {
  case_t f = *k;
  const int least = k->topk > R ? k->topk : R;
  f.experts = k->experts / R * R;
  if (f.experts < least) f.experts = (least + R - 1) / R * R;
  return f;
}

typedef struct {
  ep_group_t g;
  cudaStream_t s;
  int R, me;
  uint64_t seed;
  const char* shape; /* "one node" / "virtual nodes of 1 rank" */
} ctx_t;


/* ------------------------------------------------------------------------------------------------------------
 * The world: every rank's inputs, the same on every rank for one seed
 * ------------------------------------------------------------------------------------------------------------ */
typedef struct {
  case_t k;
  int R;
  uint64_t seed;
  int num_tokens[MAX_RANKS];
  uint16_t* x[MAX_RANKS];
  int64_t* idx[MAX_RANKS];
  float* w[MAX_RANKS];
  ep_ref_ll_world_t ref;
} world_t;

static uint16_t bf16_of(float f) { return ep_ref_f32_to_bf16(f); }

static void world_make(world_t* w, const case_t* k, int R, uint64_t seed) {
  memset(w, 0, sizeof(*w));
  w->k = *k;
  w->R = R;
  w->seed = seed;
  uint64_t st = seed;
  const int H = k->hidden, K = k->topk, E = k->experts;
  for (int r = 0; r < R; ++r) {
    int n = k->T;
    if (k->vary) n = r == R - 1 ? 0 : (int)(harness_uniform(&st) * (k->T + 1));
    w->num_tokens[r] = n;
    w->x[r] = xmalloc((size_t)n * H * 2 + 2);
    w->idx[r] = xmalloc((size_t)n * K * 8 + 8);
    w->w[r] = xmalloc((size_t)n * K * 4 + 4);
    for (int t = 0; t < n; ++t) {
      for (int g = 0; g < H / 128 + (H % 128 != 0); ++g) {
        /* Each group has its own magnitude; some are all zero (the amax floor). */
        const double u = harness_uniform(&st);
        const float mag = u < 0.05 ? 0.0f : (float)(1 << (int)(harness_uniform(&st) * 12)) / 64.0f;
        for (int c = g * 128; c < (g + 1) * 128 && c < H; ++c)
          w->x[r][(size_t)t * H + c] = bf16_of(mag * (float)(2.0 * harness_uniform(&st) - 1.0));
      }
      int64_t* row = w->idx[r] + (size_t)t * K;
      for (int j = 0; j < K; ++j) {
        int64_t e;
        int fresh;
        do { /* distinct experts, as a router picks them */
          e = (int64_t)(harness_uniform(&st) * E);
          fresh = 1;
          for (int q = 0; q < j; ++q) fresh &= row[q] != e;
        } while (!fresh);
        row[j] = e;
      }
      for (int j = 0; j < K; ++j) {
        if (k->dup && j > 0 && harness_uniform(&st) < 0.15) row[j] = row[(int)(harness_uniform(&st) * j)];
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
}

static void world_free(world_t* w) {
  for (int r = 0; r < w->R; ++r) {
    free(w->x[r]);
    free(w->idx[r]);
    free(w->w[r]);
  }
}

/* The experts' output for token (s, t) at expert le of rank d: small values, exact in bf16. */
static void expert_fn(void* ctx, int d, int le, int s, int t, int hidden, uint16_t* y) {
  const uint64_t salt = *(const uint64_t*)ctx;
  for (int c = 0; c < hidden; ++c) {
    uint64_t h = salt ^ ((uint64_t)d << 52) ^ ((uint64_t)le << 40) ^ ((uint64_t)s << 32) ^ ((uint64_t)t << 16) ^ (uint64_t)c;
    h = harness_rand(&h);
    y[c] = bf16_of((float)((int)(h % 255) - 127) / 32.0f);
  }
}

/* ------------------------------------------------------------------------------------------------------------
 * One micro-batch: device buffers, the calls, the checks
 * ------------------------------------------------------------------------------------------------------------ */
typedef struct {
  ep_ll_handle_t h;
  size_t RT, E_loc, G;
  void *x, *idx, *w, *recv_x, *recv_scales, *recv_count, *y, *out;
  size_t x_bytes, recv_bytes, scale_bytes, y_bytes, out_bytes;
} mb_t;

static void mb_alloc(const ctx_t* c, mb_t* m, const case_t* k) {
  memset(m, 0, sizeof(*m));
  CHECK(ep_ll_handle_create(c->g, &m->h) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(c->g));
  m->RT = (size_t)c->R * k->T;
  m->E_loc = (size_t)k->experts / c->R;
  m->G = (size_t)k->hidden / 128;
  const size_t elem = k->mode == BF16 ? 2 : 1;
  m->x_bytes = (size_t)k->T * k->hidden * 2;
  m->recv_bytes = m->E_loc * m->RT * k->hidden * elem;
  m->scale_bytes = m->E_loc * m->RT * m->G * 4;
  m->y_bytes = m->E_loc * m->RT * k->hidden * 2;
  m->out_bytes = (size_t)k->T * k->hidden * 2;
  m->x = dev_alloc(m->x_bytes);
  m->idx = dev_alloc((size_t)k->T * k->topk * 8);
  m->w = dev_alloc((size_t)k->T * k->topk * 4);
  m->recv_x = dev_alloc(m->recv_bytes);
  m->recv_scales = dev_alloc(m->scale_bytes);
  m->recv_count = dev_alloc(m->E_loc * 4);
  m->y = dev_alloc(m->y_bytes);
  m->out = dev_alloc(m->out_bytes);
}

static void mb_free(mb_t* m) {
  ep_ll_handle_destroy(m->h);
  void* bufs[] = {m->x, m->idx, m->w, m->recv_x, m->recv_scales, m->recv_count, m->y, m->out};
  for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); ++i) cudaFree(bufs[i]);
}

/* Inputs of this rank, outputs poisoned. */
static void mb_load(const ctx_t* c, mb_t* m, const world_t* w) {
  const case_t* k = &w->k;
  const int n = w->num_tokens[c->me];
  upload(m->x, w->x[c->me], (size_t)n * k->hidden * 2);
  upload(m->idx, w->idx[c->me], (size_t)n * k->topk * 8);
  upload(m->w, w->w[c->me], (size_t)n * k->topk * 4);
  CUDA_CHECK(cudaMemset(m->recv_x, 0xA5, m->recv_bytes));
  CUDA_CHECK(cudaMemset(m->recv_scales, 0xFF, m->scale_bytes));
  CUDA_CHECK(cudaMemset(m->recv_count, 0xFF, m->E_loc * 4));
  CUDA_CHECK(cudaMemset(m->out, 0xFF, m->out_bytes));
}

static ep_ll_dispatch_args_t dispatch_args(const ctx_t* c, const mb_t* m, const world_t* w, int hook) {
  const case_t* k = &w->k;
  ep_ll_dispatch_args_t a = EP_LL_DISPATCH_ARGS_INIT;
  a.x = m->x;
  a.num_tokens = w->num_tokens[c->me];
  a.hidden = k->hidden;
  a.topk_idx = m->idx;
  a.num_topk = k->topk;
  a.num_experts = k->experts;
  a.max_tokens_per_rank = k->T;
  a.recv_dtype = k->mode == BF16 ? EP_BF16 : EP_FP8_E4M3;
  a.round_scale = k->mode == FP8_POW2 || k->mode == UE8M0;
  a.use_ue8m0 = k->mode == UE8M0;
  a.recv_x = m->recv_x;
  a.recv_x_scales = k->mode == BF16 ? NULL : m->recv_scales;
  a.recv_count = m->recv_count;
  a.return_after_send = hook;
  a.topk_weights = k->sums ? m->w : NULL;
  return a;
}

/* The experts' outputs of this rank for the reference's routing: bf16 [E_loc, RT, H], valid rows only. */
static uint16_t* expected_y(const ctx_t* c, const mb_t* m, const world_t* w, const ep_ref_ll_dispatch_t* ref) {
  const int H = w->k.hidden;
  const ep_ref_ll_recv_t* r = &ref->recv[c->me];
  uint16_t* y = xmalloc(m->y_bytes);
  for (size_t e = 0; e < m->E_loc; ++e)
    for (int i = 0; i < r->count[e]; ++i) {
      const int row = r->expert_offset[e] + i;
      expert_fn((void*)&w->seed, c->me, (int)e, r->src_rank[row], r->src_idx[row], H, y + (e * m->RT + i) * H);
    }
  return y;
}

/* Every dispatch output of this rank against the reference. Returns the number of mismatches. */
static long check_dispatch(const ctx_t* c, const mb_t* m, const world_t* w, const ep_ref_ll_dispatch_t* ref) {
  const case_t* k = &w->k;
  const int H = k->hidden, R = c->R;
  const size_t RT = m->RT, G = m->G;
  const ep_ref_ll_recv_t* r = &ref->recv[c->me];
  long bad = 0;
  int* count = download(m->recv_count, m->E_loc * 4);
  const int* d_src = NULL;
  const int64_t* d_range = NULL;
  ep_ll_get_routing(m->h, &d_src, &d_range);
  int* src = download(d_src, m->E_loc * RT * 4);
  int64_t* range = download(d_range, m->E_loc * R * 8);
  uint8_t* x = download(m->recv_x, m->recv_bytes);
  uint8_t* sc = k->mode == BF16 ? NULL : download(m->recv_scales, m->scale_bytes);
#define MISMATCH(...)                                  \
  do {                                                 \
    if (bad++ < MAX_REPORTS) {                         \
      fprintf(stderr, "rank %d: ", c->me);             \
      fprintf(stderr, __VA_ARGS__);                    \
      fprintf(stderr, "\n");                           \
    }                                                  \
  } while (0)
  for (size_t e = 0; e < m->E_loc; ++e) {
    if (count[e] != r->count[e]) {
      MISMATCH("recv_count[%zu] = %d, want %d", e, count[e], r->count[e]);
      continue;
    }
    for (int s = 0; s < R; ++s) {
      const int64_t want = ((int64_t)r->range_begin[e * R + s] << 32) | (uint32_t)r->range_count[e * R + s];
      if (range[e * R + s] != want)
        MISMATCH("layout_range[%zu][%d] = 0x%llx, want 0x%llx", e, s, (long long)range[e * R + s], (long long)want);
    }
    for (int i = 0; i < count[e]; ++i) {
      const size_t row = (size_t)r->expert_offset[e] + i, at = e * RT + i;
      if (src[at] != r->src_idx[row]) MISMATCH("src_info[%zu][%d] = %d, want %d", e, i, src[at], r->src_idx[row]);
      if (k->mode == BF16) {
        if (memcmp(x + at * H * 2, r->x + row * H, (size_t)H * 2) != 0) MISMATCH("recv_x[%zu][%d] (bf16) differs", e, i);
      } else {
        const uint8_t* got = x + at * H;
        const uint8_t* want_q = r->x_fp8 + row * H;
        for (int ch = 0; ch < H; ++ch)
          if (got[ch] != want_q[ch]) {
            MISMATCH("recv_x[%zu][%d][%d] = 0x%02x, want 0x%02x (source rank %d token %d)", e, i, ch, got[ch],
                     want_q[ch], r->src_rank[row], r->src_idx[row]);
            break;
          }
        if (k->mode == UE8M0) {
          const uint32_t* packed = (const uint32_t*)sc + e * (G / 4) * RT;
          for (size_t q = 0; q < G / 4; ++q)
            if (packed[q * RT + i] != r->scales_ue8m0[row * (G / 4) + q])
              MISMATCH("ue8m0 scales[%zu][%zu][%d] = 0x%08x, want 0x%08x", e, q, i, packed[q * RT + i],
                       r->scales_ue8m0[row * (G / 4) + q]);
        } else {
          const float* f = (const float*)sc + e * G * RT;
          for (size_t g = 0; g < G; ++g)
            if (memcmp(&f[g * RT + i], &r->scales[row * G + g], 4) != 0)
              MISMATCH("scales[%zu][%zu][%d] = %g, want %g", e, g, i, f[g * RT + i], r->scales[row * G + g]);
        }
      }
    }
  }
#undef MISMATCH
  free(count);
  free(src);
  free(range);
  free(x);
  free(sc);
  return bad;
}

static long check_combine(const ctx_t* c, const mb_t* m, const world_t* w) {
  const int H = w->k.hidden, n = w->num_tokens[c->me];
  uint16_t* want[MAX_RANKS] = {NULL}; /* this rank's output only: the reference skips the others */
  want[c->me] = xmalloc((size_t)n * H * 2 + 2);
  long bad = 0;
  const int rc = w->k.sums     ? ep_ref_ll_combine_sums_fn(&w->ref, expert_fn, (void*)&w->seed, want)
                 : w->k.logfmt ? ep_ref_ll_combine_logfmt_fn(&w->ref, expert_fn, (void*)&w->seed, want)
                               : ep_ref_ll_combine_fn(&w->ref, expert_fn, (void*)&w->seed, want);
  if (rc != 0) {
    fprintf(stderr, "rank %d: the reference combine rejected the world\n", c->me);
    bad = 1;
  }
  uint16_t* got = download(m->out, (size_t)n * H * 2);
  for (size_t i = 0; !bad && i < (size_t)n * H; ++i)
    if (got[i] != want[c->me][i] && bad++ < MAX_REPORTS)
      fprintf(stderr, "rank %d: out[%zu][%zu] = 0x%04x, want 0x%04x\n", c->me, i / H, i % H, got[i],
              want[c->me][i]);
  free(got);
  free(want[c->me]);
  return bad;
}

static void print_case(const ctx_t* c, const char* what, int idx, const world_t* w) {
  const case_t* k = &w->k;
  fprintf(stderr,
          "rank %d: FAILED [%s] %s case %d: T=%d hidden=%d topk=%d experts=%d %s hook=%d zero_copy=%d neg=%d%% dup=%d "
          "vary=%d sums=%d logfmt=%d, world seed 0x%016llx (run seed 0x%016llx)\n",
          c->me, c->shape, what, idx, k->T, k->hidden, k->topk, k->experts, k_mode_names[k->mode], k->hook,
          k->zero_copy, k->neg, k->dup, k->vary, k->sums, k->logfmt, (unsigned long long)w->seed,
          (unsigned long long)c->seed);
}

/* Dispatch (send [+ receive]) of one micro-batch. */
static void do_dispatch(const ctx_t* c, mb_t* m, const world_t* w, int hook) {
  ep_ll_dispatch_args_t a = dispatch_args(c, m, w, hook);
  EP_CHECK(c, ep_ll_dispatch(c->g, m->h, &a, c->s));
}

/* The experts' outputs into y (or the zero-copy buffer), then the combine's send [+ receive]. */
static void do_combine(const ctx_t* c, mb_t* m, const world_t* w, const uint16_t* y, int hook) {
  void* dst = m->y;
  if (w->k.zero_copy) EP_CHECK(c, ep_ll_get_combine_buffer(c->g, m->h, &dst));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  if (dst) upload(dst, y, m->y_bytes);
  ep_ll_combine_args_t a = EP_LL_COMBINE_ARGS_INIT;
  a.x = w->k.zero_copy ? NULL : m->y;
  a.topk_weights = w->k.sums ? NULL : m->w;
  a.out = m->out;
  a.zero_copy = w->k.zero_copy;
  a.return_after_send = hook;
  a.sum_on_expert_ranks = w->k.sums;
  a.use_logfmt = w->k.logfmt;
  EP_CHECK(c, ep_ll_combine(c->g, m->h, &a, c->s));
}

/* One case: `reps` rounds of fresh data through one handle; odd rounds run two micro-batches in flight. */
static int run_case(const ctx_t* c, const case_t* k_table, int idx) {
  const int before = g_check_failures;
  const case_t fitted = for_ranks(k_table, c->R);
  const case_t* k = &fitted;
  mb_t m[2];
  mb_alloc(c, &m[0], k);
  mb_alloc(c, &m[1], k);
  for (int rep = 0; rep < k->reps; ++rep) {
    const int pair = rep % 2 == 1;  /* two micro-batches: D(A) D(B) [recv A, B] C(A) C(B) [recv A, B] */
    const int nmb = pair ? 2 : 1;
    world_t w[2];
    ep_ref_ll_dispatch_t ref[2];
    uint16_t* y[2];
    for (int b = 0; b < nmb; ++b) {
      world_make(&w[b], k, c->R, c->seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(idx * 64 + rep * 2 + b + 1)));
      CHECK(ep_ref_ll_dispatch_to(&w[b].ref, c->me, k->mode != BF16, k->mode == FP8_POW2 || k->mode == UE8M0,
                                  k->mode == UE8M0, &ref[b]) == 0,
            "reference dispatch rejected case %d", idx);
      y[b] = expected_y(c, &m[b], &w[b], &ref[b]);
      mb_load(c, &m[b], &w[b]);
    }
    for (int b = 0; b < nmb; ++b) do_dispatch(c, &m[b], &w[b], k->hook);
    if (k->hook)
      for (int b = 0; b < nmb; ++b) EP_CHECK(c, ep_ll_dispatch_recv(c->g, m[b].h, c->s));
    CHECK_ASYNC_CLEAN(c, "dispatch");
    for (int b = 0; b < nmb; ++b) {
      const int bad_before = g_check_failures;
      const long bad = check_dispatch(c, &m[b], &w[b], &ref[b]);
      CHECK(bad == 0, "dispatch: %ld mismatches", bad);
      if (g_check_failures != bad_before) print_case(c, "dispatch", idx, &w[b]);
    }
    for (int b = 0; b < nmb; ++b) do_combine(c, &m[b], &w[b], y[b], k->hook);
    if (k->hook)
      for (int b = 0; b < nmb; ++b) EP_CHECK(c, ep_ll_combine_recv(c->g, m[b].h, c->s));
    CHECK_ASYNC_CLEAN(c, "combine");
    for (int b = 0; b < nmb; ++b) {
      const long bad = check_combine(c, &m[b], &w[b]);
      CHECK(bad == 0, "combine: %ld mismatches", bad);
      if (bad) print_case(c, "combine", idx, &w[b]);
      free(y[b]);
      ep_ref_ll_dispatch_free(&ref[b]);
      world_free(&w[b]);
    }
  }
  mb_free(&m[0]);
  mb_free(&m[1]);
  return g_check_failures != before;
}

/* Dispatch, the experts (a device copy of their outputs) and combine in one CUDA graph; replayed with new x,
 * routing, weights and expert outputs in the same buffers. Then an eager round on the same group. */
static int run_graph(const ctx_t* c, int sums) {
  const int before = g_check_failures;
  /* Token counts are kernel arguments, fixed in the graph: every rank has T tokens here. */
  const case_t k_table = {128, 7168, 8, 64, FP8, 0, 0, 10, 1, 0, 1, sums, 0};
  const case_t k = for_ranks(&k_table, c->R);
  mb_t m;
  mb_alloc(c, &m, &k);
  void* y_src = dev_alloc(m.y_bytes);
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  const int replays = 4;
  world_t w;
  for (int round = 0; round <= replays; ++round) {
    world_make(&w, &k, c->R, c->seed ^ (0xd1b54a32d192ed03ull * (uint64_t)(round + 1)));
    ep_ref_ll_dispatch_t ref;
    CHECK(ep_ref_ll_dispatch_to(&w.ref, c->me, 1, 0, 0, &ref) == 0, "reference dispatch");
    uint16_t* y = expected_y(c, &m, &w, &ref);
    mb_load(c, &m, &w);
    upload(y_src, y, m.y_bytes);
    CUDA_CHECK(cudaMemset(m.y, 0xFF, m.y_bytes));
    if (round == 0) { /* capture; the inputs are already in place, the first launch is round 0 */
      CUDA_CHECK(cudaStreamBeginCapture(c->s, cudaStreamCaptureModeThreadLocal));
      ep_ll_dispatch_args_t da = dispatch_args(c, &m, &w, 0);
      EP_CHECK(c, ep_ll_dispatch(c->g, m.h, &da, c->s));
      CUDA_CHECK(cudaMemcpyAsync(m.y, y_src, m.y_bytes, cudaMemcpyDeviceToDevice, c->s));
      ep_ll_combine_args_t ca = EP_LL_COMBINE_ARGS_INIT;
      ca.x = m.y;
      ca.topk_weights = sums ? NULL : m.w;
      ca.out = m.out;
      ca.sum_on_expert_ranks = sums;
      EP_CHECK(c, ep_ll_combine(c->g, m.h, &ca, c->s));
      CUDA_CHECK(cudaStreamEndCapture(c->s, &graph));
      if (graph) CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    }
    if (exec) CUDA_CHECK(cudaGraphLaunch(exec, c->s));
    CHECK_ASYNC_CLEAN(c, "graph replay");
    const long bad = check_dispatch(c, &m, &w, &ref) + check_combine(c, &m, &w);
    CHECK(bad == 0, "graph replay %d: %ld mismatches", round, bad);
    if (bad) print_case(c, "graph replay", round, &w);
    free(y);
    ep_ref_ll_dispatch_free(&ref);
    world_free(&w);
  }
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  cudaFree(y_src);
  mb_free(&m);
  return g_check_failures != before;
}

/* Two micro-batches captured together, with the hook, zero-copy and UE8M0 scales: D(A) D(B), both receives, the
 * experts' outputs copied into each handle's zero-copy buffer and C(A) C(B) with the hook, both receives. Replayed
 * with new inputs and expert outputs, then an eager case on the same group. */
static int run_graph_pair(const ctx_t* c) {
  const int before = g_check_failures;
  /* every rank T tokens: fixed in the graph */
  const case_t k_table = {128, 2048, 8, 64, UE8M0, 1, 1, 10, 1, 0, 1, 0, 0};
  const case_t k = for_ranks(&k_table, c->R);
  mb_t m[2];
  void* y_src[2];
  for (int b = 0; b < 2; ++b) {
    mb_alloc(c, &m[b], &k);
    y_src[b] = dev_alloc(m[b].y_bytes);
  }
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  for (int round = 0; round <= 2; ++round) {
    world_t w[2];
    ep_ref_ll_dispatch_t ref[2];
    for (int b = 0; b < 2; ++b) {
      world_make(&w[b], &k, c->R, c->seed ^ (0x2545f4914f6cdd1dull * (uint64_t)(round * 2 + b + 1)));
      CHECK(ep_ref_ll_dispatch_to(&w[b].ref, c->me, 1, 1, 1, &ref[b]) == 0, "reference dispatch");
      uint16_t* y = expected_y(c, &m[b], &w[b], &ref[b]);
      mb_load(c, &m[b], &w[b]);
      upload(y_src[b], y, m[b].y_bytes);
      free(y);
    }
    if (round == 0) { /* capture; the inputs are already in place, the first launch is round 0 */
      CUDA_CHECK(cudaStreamBeginCapture(c->s, cudaStreamCaptureModeThreadLocal));
      for (int b = 0; b < 2; ++b) {
        ep_ll_dispatch_args_t da = dispatch_args(c, &m[b], &w[b], 1);
        EP_CHECK(c, ep_ll_dispatch(c->g, m[b].h, &da, c->s));
      }
      for (int b = 0; b < 2; ++b) EP_CHECK(c, ep_ll_dispatch_recv(c->g, m[b].h, c->s));
      for (int b = 0; b < 2; ++b) {
        void* dst = NULL;
        EP_CHECK(c, ep_ll_get_combine_buffer(c->g, m[b].h, &dst));
        if (dst) CUDA_CHECK(cudaMemcpyAsync(dst, y_src[b], m[b].y_bytes, cudaMemcpyDeviceToDevice, c->s));
        ep_ll_combine_args_t ca = EP_LL_COMBINE_ARGS_INIT;
        ca.topk_weights = m[b].w;
        ca.out = m[b].out;
        ca.zero_copy = 1;
        ca.return_after_send = 1;
        EP_CHECK(c, ep_ll_combine(c->g, m[b].h, &ca, c->s));
      }
      for (int b = 0; b < 2; ++b) EP_CHECK(c, ep_ll_combine_recv(c->g, m[b].h, c->s));
      CUDA_CHECK(cudaStreamEndCapture(c->s, &graph));
      if (graph) CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    }
    if (exec) CUDA_CHECK(cudaGraphLaunch(exec, c->s));
    CHECK_ASYNC_CLEAN(c, "graph replay (two micro-batches)");
    for (int b = 0; b < 2; ++b) {
      const long bad = check_dispatch(c, &m[b], &w[b], &ref[b]) + check_combine(c, &m[b], &w[b]);
      CHECK(bad == 0, "graph replay %d, micro-batch %d: %ld mismatches", round, b, bad);
      if (bad) print_case(c, "graph replay (two micro-batches)", round, &w[b]);
      ep_ref_ll_dispatch_free(&ref[b]);
      world_free(&w[b]);
    }
  }
  CHECK(exec != NULL, "no CUDA graph to replay");
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  for (int b = 0; b < 2; ++b) {
    cudaFree(y_src[b]);
    mb_free(&m[b]);
  }
  run_case(c, &k_cases[1], 103); /* eager calls on the same group after the replays */
  return g_check_failures != before;
}

/* What a shape runs: every case, the graphs and the repetitions; only the cases with T <= 64 and the graphs of
 * sums 0 and of two micro-batches (the default level's mixed NVLink / put shapes); or k_big_t_cases on a group
 * sized for them (EP_TEST_LEVEL=full). */
enum scope { SCOPE_ALL, SCOPE_SMALL, SCOPE_BIG_T };

static void run_shape(const harness_t* h, int ranks_per_node, const char* name, int scope) {
  ctx_t c;
  memset(&c, 0, sizeof(c));
  c.R = h->num_ranks;
  c.me = h->rank;
  c.shape = name;
  char seed_name[32];
  snprintf(seed_name, sizeof(seed_name), "ll_rpn%d%s", ranks_per_node, scope == SCOPE_BIG_T ? "_big_t" : "");
  c.seed = harness_seed(h, seed_name);
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ranks_per_node = ranks_per_node;
  cfg.num_experts = (scope == SCOPE_BIG_T ? BIG_T_EXPERTS : CFG_EXPERTS) / c.R * c.R;
  if (cfg.num_experts < c.R) cfg.num_experts = c.R;
  cfg.hidden = scope == SCOPE_BIG_T ? BIG_T_HIDDEN : CFG_HIDDEN;
  cfg.max_tokens_per_rank = 1; /* the normal path is not used here */
  cfg.max_topk = CFG_TOPK;
  cfg.ll_max_tokens_per_rank = scope == SCOPE_BIG_T ? EP_LL_MAX_TOKENS_PER_RANK : CFG_TOKENS;
  ep_status_t st = harness_group_create(h, &cfg, &c.g);
  CHECK(st == EP_STATUS_SUCCESS, "create (%s): %s: %s", name, ep_status_string(st), ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return;
  CUDA_CHECK(cudaStreamCreate(&c.s));

  const case_t* table = scope == SCOPE_BIG_T ? k_big_t_cases : k_cases;
  const int num_cases = scope == SCOPE_BIG_T ? NUM_BIG_T_CASES : NUM_CASES;
  double t0 = now_s();
  int failed = 0, ran = 0;
  for (int i = 0; i < num_cases; ++i) {
    if ((getenv("EP_TEST_SMALL") && table[i].T > 128) || (scope == SCOPE_SMALL && table[i].T > 64)) continue;
    failed += run_case(&c, &table[i], scope == SCOPE_BIG_T ? 200 + i : i);
    ++ran;
  }
  printf("rank %d [%s]: %d cases, %d failed (%.1f s)\n", c.me, name, ran, failed, now_s() - t0);

  for (int sums = 0; sums <= 1 && scope != SCOPE_BIG_T; ++sums) {
    if (scope == SCOPE_SMALL && sums) break;
    t0 = now_s();
    failed = run_graph(&c, sums);
    printf("rank %d [%s]: CUDA graph capture + 5 launches%s: %s (%.1f s)\n", c.me, name,
           sums ? " (sums on the experts' ranks)" : "", failed ? "FAILED" : "ok", now_s() - t0);
  }

  if (scope != SCOPE_BIG_T) {
    t0 = now_s();
    failed = run_graph_pair(&c);
    printf("rank %d [%s]: CUDA graph of two micro-batches (hook, zero-copy, UE8M0) + 3 launches, then eager: %s "
           "(%.1f s)\n",
           c.me, name, failed ? "FAILED" : "ok", now_s() - t0);
  }

  if (scope == SCOPE_ALL) {
    /* Many repetitions with fresh data (small, so they are quick), then a clean and one more round. */
    t0 = now_s();
    const case_t many = {32, 2048, 8, 64, FP8, 1, 0, 10, 1, 1, 50, 0, 0};
    const case_t many_sums = {32, 2048, 8, 64, BF16, 0, 1, 10, 1, 1, 20, 1, 0};
    failed = run_case(&c, &many, 100) + run_case(&c, &many_sums, 102);
    EP_CHECK(&c, ep_ll_clean(c.g, c.s));
    failed += run_case(&c, &k_cases[2], 101);
    printf("rank %d [%s]: 50 + 20 (sums) repetitions, clean, one more case: %s (%.1f s)\n", c.me, name,
           failed ? "FAILED" : "ok", now_s() - t0);
  }

  cudaStreamDestroy(c.s);
  st = ep_group_destroy(c.g);
  CHECK(st == EP_STATUS_SUCCESS, "destroy: %s", ep_last_error(NULL));
}

/* Rank 0 dispatches while the last rank stays away: rank 0's receive phase times out naming the last rank. Then
 * the last rank dispatches: rank 0's tokens did arrive, so its call succeeds. */
static void run_timeout(const harness_t* h) {
  if (h->num_ranks < 2) return;
  ctx_t c;
  memset(&c, 0, sizeof(c));
  c.R = h->num_ranks;
  c.me = h->rank;
  c.shape = "timeout";
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.num_experts = 4 * h->num_ranks;
  cfg.hidden = 1024;
  cfg.max_tokens_per_rank = 1;
  cfg.max_topk = 2;
  cfg.ll_max_tokens_per_rank = 8;
  cfg.timeout_seconds = 1.0;
  ep_status_t st = harness_group_create(h, &cfg, &c.g);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s", ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return;
  CUDA_CHECK(cudaStreamCreate(&c.s));
  const case_t k = {8, 1024, 2, 4 * h->num_ranks, BF16, 0, 0, 0, 0, 0, 1, 0, 0};
  world_t w;
  world_make(&w, &k, c.R, 12345);
  mb_t m;
  mb_alloc(&c, &m, &k);
  mb_load(&c, &m, &w);
  const int absent = h->num_ranks - 1;
  char want[64];
  snprintf(want, sizeof(want), "waiting for rank %d", absent);
  if (c.me != absent) {
    do_dispatch(&c, &m, &w, 0);
    cudaStreamSynchronize(c.s);
    ep_status_t async = EP_STATUS_SUCCESS;
    ep_get_async_error(c.g, &async);
    CHECK(async == EP_STATUS_TIMEOUT || async == EP_STATUS_PEER_FAILED, "dispatch with rank %d absent gave %s (%s)",
          absent, ep_status_string(async), ep_last_error(c.g));
    CHECK(strstr(ep_last_error(c.g), want) != NULL && strstr(ep_last_error(c.g), "low-latency") != NULL,
          "timeout message does not name rank %d and the LL wait: %s", absent, ep_last_error(c.g));
    printf("rank %d: %s\n", c.me, ep_last_error(c.g));
  }
  harness_barrier(h, "ll_timed_out");
  if (c.me == absent) { /* the others' timeout was published to this rank: its late dispatch ends on it */
    do_dispatch(&c, &m, &w, 0);
    cudaStreamSynchronize(c.s);
    ep_status_t async = EP_STATUS_SUCCESS;
    ep_get_async_error(c.g, &async);
    CHECK(async == EP_STATUS_PEER_FAILED || async == EP_STATUS_SUCCESS, "the late dispatch gave %s (%s)",
          ep_status_string(async), ep_last_error(c.g));
  }
  world_free(&w);
  mb_free(&m);
  cudaStreamDestroy(c.s);
  ep_group_destroy(c.g);
}

/* A group sized in bytes (config.ll_region_bytes, DeepEP's num_rdma_bytes): the bytes of one shape, hints far below
 * the cases' experts and hidden; shapes change from call to call with no clean (each call lays the region out for
 * itself), with the hook, zero-copy and the sums. Every output is checked against the reference. */
/* clang-format off */
static const case_t k_bytes_cases[] = {
  /* T, hidden, topk, experts, mode, hook, zero_copy, neg, dup, vary, reps, sums, logfmt */
  {32, 4096, 8, 64, FP8, 0, 0, 10, 1, 0, 2, 0, 0},
  {64, 2048, 4, 48, BF16, 1, 0, 0, 0, 1, 2, 0, 0},
  {16, 2560, 8, 64, FP8_POW2, 0, 1, 10, 0, 0, 2, 0, 0},
  {64, 4096, 8, 64, BF16, 0, 0, 10, 0, 0, 2, 1, 0},
  {32, 4096, 8, 64, FP8, 1, 0, 10, 1, 0, 2, 0, 0},
};
/* clang-format on */

static void run_bytes(const harness_t* h) {
  ctx_t c;
  memset(&c, 0, sizeof(c));
  c.R = h->num_ranks;
  c.me = h->rank;
  c.shape = "ll_region_bytes";
  c.seed = harness_seed(h, "ll_bytes");
  const int experts = 64 / c.R * c.R > 0 ? 64 / c.R * c.R : c.R;
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.num_experts = c.R; /* hints below the cases: the bytes bound the calls */
  cfg.hidden = 1024;
  cfg.max_tokens_per_rank = 1;
  cfg.max_topk = 8;
  cfg.ll_max_tokens_per_rank = 64;
  CHECK(ep_ll_buffer_size_hint(64, 4096, c.R, experts, 8, &cfg.ll_region_bytes) == EP_STATUS_SUCCESS, "hint: %s",
        ep_last_error(NULL));
  ep_status_t st = harness_group_create(h, &cfg, &c.g);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s", ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return;
  CUDA_CHECK(cudaStreamCreate(&c.s));
  const double t0 = now_s();
  int failed = 0;
  const int n = (int)(sizeof(k_bytes_cases) / sizeof(k_bytes_cases[0]));
  for (int i = 0; i < n; ++i) failed += run_case(&c, &k_bytes_cases[i], 300 + i);
  printf("rank %d [%s]: %d cases of several shapes in %zu bytes, %d failed (%.1f s)\n", c.me, c.shape, n,
         cfg.ll_region_bytes, failed, now_s() - t0);
  cudaStreamDestroy(c.s);
  ep_group_destroy(c.g);
}

/* Wait-cost stats (wait_recv_cost_stats of dispatch and combine): [R] int64 with a guard entry after it. Round 0
 * (hook) and round 1 (one kernel): every entry only grows, the guard stays, the outputs still equal the reference.
 * Round 1 has the last rank start each call 300 ms late: on every other rank its entry grows the most. */
static long long stats_get(long long* host, const void* dev, int n) {
  void* got = download(dev, (size_t)n * 8);
  memcpy(host, got, (size_t)n * 8);
  free(got);
  return host[n - 1];
}

static void sleep_ms(int ms) {
  const struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static void run_stats(const harness_t* h) {
  ctx_t c;
  memset(&c, 0, sizeof(c));
  c.R = h->num_ranks;
  c.me = h->rank;
  c.shape = "wait-cost stats";
  c.seed = harness_seed(h, "ll_stats");
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.num_experts = 4 * h->num_ranks;
  cfg.hidden = 1024;
  cfg.max_tokens_per_rank = 1;
  cfg.max_topk = 4;
  cfg.ll_max_tokens_per_rank = 16;
  ep_status_t st = harness_group_create(h, &cfg, &c.g);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s", ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return;
  CUDA_CHECK(cudaStreamCreate(&c.s));
  const int R = c.R, late = R - 1, guard = 0x5a5a;
  const case_t k = {16, 1024, 4, 4 * R, FP8, 0, 0, 10, 0, 0, 1, 0, 0};
  long long init[MAX_RANKS + 1] = {0}, before[2][MAX_RANKS + 1], after[MAX_RANKS + 1];
  init[R] = guard;
  void* stats[2] = {dev_alloc((size_t)(R + 1) * 8), dev_alloc((size_t)(R + 1) * 8)}; /* dispatch, combine */
  for (int i = 0; i < 2; ++i) upload(stats[i], init, (size_t)(R + 1) * 8);
  const int before_failures = g_check_failures;
  for (int round = 0; round < 2; ++round) {
    const int hook = round == 0;
    world_t w;
    ep_ref_ll_dispatch_t ref;
    world_make(&w, &k, R, c.seed ^ (0x51a7ull + (uint64_t)round));
    CHECK(ep_ref_ll_dispatch_to(&w.ref, c.me, 1, 0, 0, &ref) == 0, "reference dispatch rejected the stats case");
    mb_t m;
    mb_alloc(&c, &m, &k);
    uint16_t* y = expected_y(&c, &m, &w, &ref);
    mb_load(&c, &m, &w);
    for (int i = 0; i < 2; ++i) stats_get(before[i], stats[i], R + 1);
    harness_barrier(h, "ll_stats_dispatch");
    if (round == 1 && c.me == late) sleep_ms(300);
    ep_ll_dispatch_args_t a = dispatch_args(&c, &m, &w, hook);
    a.wait_recv_cost_stats = (int64_t*)stats[0];
    EP_CHECK(&c, ep_ll_dispatch(c.g, m.h, &a, c.s));
    if (hook) EP_CHECK(&c, ep_ll_dispatch_recv(c.g, m.h, c.s));
    CHECK_ASYNC_CLEAN(&c, "stats dispatch");
    CHECK(check_dispatch(&c, &m, &w, &ref) == 0, "stats dispatch (hook=%d): mismatches", hook);
    upload(m.y, y, m.y_bytes);
    harness_barrier(h, "ll_stats_combine");
    if (round == 1 && c.me == late) sleep_ms(300);
    ep_ll_combine_args_t ca = EP_LL_COMBINE_ARGS_INIT;
    ca.x = m.y;
    ca.topk_weights = m.w;
    ca.out = m.out;
    ca.return_after_send = hook;
    ca.wait_recv_cost_stats = (int64_t*)stats[1];
    EP_CHECK(&c, ep_ll_combine(c.g, m.h, &ca, c.s));
    if (hook) EP_CHECK(&c, ep_ll_combine_recv(c.g, m.h, c.s));
    CHECK_ASYNC_CLEAN(&c, "stats combine");
    CHECK(check_combine(&c, &m, &w) == 0, "stats combine (hook=%d): mismatches", hook);
    for (int i = 0; i < 2; ++i) {
      const char* what = i ? "combine" : "dispatch";
      CHECK(stats_get(after, stats[i], R + 1) == guard, "%s stats: the entry after [R] was written (%lld)", what,
            after[R]);
      long long most = -1;
      int at = -1;
      for (int r = 0; r < R; ++r) {
        const long long grew = after[r] - before[i][r];
        CHECK(grew >= 0, "%s stats (hook=%d): entry %d went from %lld to %lld", what, hook, r, before[i][r], after[r]);
        if (grew > most) most = grew, at = r;
      }
      if (round == 1 && c.me != late)
        CHECK(at == late, "%s stats: rank %d started 300 ms late, but entry %d grew the most (%lld cycles)", what, late,
              at, most);
      if (round == 1 && c.me == 0)
        printf("rank 0: %s wait cycles by source, the last rank late: grew %lld at rank %d\n", what, most, at);
    }
    free(y);
    ep_ref_ll_dispatch_free(&ref);
    world_free(&w);
    mb_free(&m);
  }
  printf("rank %d [%s]: %s\n", c.me, c.shape, g_check_failures == before_failures ? "ok" : "FAILED");
  cudaFree(stats[0]);
  cudaFree(stats[1]);
  cudaStreamDestroy(c.s);
  ep_group_destroy(c.g);
}

int main(int argc, char** argv) {
  harness_t h;
  int rc = harness_init(&h);
  if (rc) return rc;
  if (argc > 1) {
    if (strcmp(argv[1], "timeout") == 0) run_timeout(&h);
    else CHECK(0, "unknown case %s (timeout)", argv[1]);
    return TEST_RESULT();
  }
  if (h.num_ranks > MAX_RANKS) {
    printf("SKIP: more than %d ranks\n", MAX_RANKS);
    return TEST_SKIP;
  }
  const int R = h.num_ranks, full = test_level_full();
  run_shape(&h, 0, "one node", SCOPE_ALL);
  run_shape(&h, 1, "virtual nodes of 1 rank", SCOPE_ALL);
  /* Mixed: NVLink peers inside a virtual node, put peers across (src/kernels/ll_common.cuh picks per peer). */
  if (R >= 4 && R % 2 == 0) run_shape(&h, 2, "virtual nodes of 2 ranks", full ? SCOPE_ALL : SCOPE_SMALL);
  if (R == 8) run_shape(&h, 4, "virtual nodes of 4 ranks", full ? SCOPE_ALL : SCOPE_SMALL);
  if (full && R == 6) run_shape(&h, 3, "virtual nodes of 3 ranks", SCOPE_ALL);
  if (full) run_shape(&h, 0, "one node, T up to 8192", SCOPE_BIG_T);
  run_stats(&h);
  run_bytes(&h);
  if (R >= 2) {
    rc = harness_run_case(&h, "timeout");
    CHECK(rc == 0, "the timeout case's process ended with %d", rc);
  }
  return TEST_RESULT();
}
