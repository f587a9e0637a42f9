/* CPU test of the reference model (tests/ref/ep_ref.c).
 *
 * The expected values below are worked out by hand from the pictures, not produced by the reference,
 * so a wrong reference fails here before it can mislead a GPU test. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "ep_ref.h"
#include "kernels/ll_logfmt.h"

/* ------------------------------------------------------------------------------------------------
 * Array comparison helpers: one failure line per differing element.
 * ---------------------------------------------------------------------------------------------- */

static void expect_ints(const char* what, const int* got, const int* want, int n) {
  CHECK(got != NULL, "%s is NULL", what);
  if (!got) return;
  for (int i = 0; i < n; ++i) CHECK(got[i] == want[i], "%s[%d]: got %d, want %d", what, i, got[i], want[i]);
}

static void expect_i64s(const char* what, const int64_t* got, const int64_t* want, int n) {
  CHECK(got != NULL, "%s is NULL", what);
  if (!got) return;
  for (int i = 0; i < n; ++i)
    CHECK(got[i] == want[i], "%s[%d]: got %lld, want %lld", what, i, (long long)got[i], (long long)want[i]);
}

static void expect_u8s(const char* what, const uint8_t* got, const uint8_t* want, int n) {
  CHECK(got != NULL, "%s is NULL", what);
  if (!got) return;
  for (int i = 0; i < n; ++i)
    CHECK(got[i] == want[i], "%s[%d]: got 0x%02x, want 0x%02x", what, i, got[i], want[i]);
}

static void expect_floats(const char* what, const float* got, const float* want, int n) {
  CHECK(got != NULL, "%s is NULL", what);
  if (!got) return;
  for (int i = 0; i < n; ++i)
    CHECK(got[i] == want[i], "%s[%d]: got %.9g, want %.9g", what, i, got[i], want[i]);
}

static uint16_t bf(float x) { return ep_ref_f32_to_bf16(x); }
static float unbf(uint16_t b) { return ep_ref_bf16_to_f32(b); }

static uint32_t bits_of(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}

static float float_of(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

/* ================================================================================================
 * 1. Number helpers
 * ============================================================================================== */

static void test_bf16(void) {
  /* Every bf16 code survives a round trip; NaNs stay NaN. */
  for (uint32_t c = 0; c < 0x10000u; ++c) {
    float f = unbf((uint16_t)c);
    uint16_t back = bf(f);
    if (isnan(f))
      CHECK(isnan(unbf(back)), "bf16 NaN 0x%04x came back as 0x%04x", (unsigned)c, back);
    else
      CHECK(back == c, "bf16 0x%04x came back as 0x%04x", (unsigned)c, back);
  }
  CHECK_EQ_INT(bf(1.0f), 0x3f80, "bf16(1)");
  CHECK_EQ_INT(bf(-2.0f), 0xc000, "bf16(-2)");
  /* Ties go to the even kept mantissa; anything past the tie goes up. */
  CHECK_EQ_INT(bf(float_of(0x3f808000u)), 0x3f80, "tie below odd lsb stays even");
  CHECK_EQ_INT(bf(float_of(0x3f818000u)), 0x3f82, "tie above odd lsb rounds up to even");
  CHECK_EQ_INT(bf(float_of(0xbf818000u)), 0xbf82, "negative tie");
  CHECK_EQ_INT(bf(float_of(0x3f808001u)), 0x3f81, "just past the tie");
  CHECK_EQ_INT(bf(float_of(0x3f807fffu)), 0x3f80, "just below the tie");
  CHECK_EQ_INT(bf(float_of(0x7f7fffffu)), 0x7f80, "FLT_MAX rounds to +inf");
  CHECK_EQ_INT(bf(INFINITY), 0x7f80, "+inf");
  CHECK_EQ_INT(bf(-INFINITY), 0xff80, "-inf");
  /* A signalling NaN whose payload lives only in the low half must not truncate to infinity. */
  uint16_t snan = bf(float_of(0x7f800001u)), neg_nan = bf(float_of(0xff800001u));
  CHECK(isnan(unbf(snan)), "sNaN became 0x%04x", snan);
  CHECK(isnan(unbf(neg_nan)) && (neg_nan & 0x8000), "-NaN became 0x%04x", neg_nan);
  CHECK(bits_of(unbf(0x3f80)) == 0x3f800000u, "bf16 -> f32 is a shift");
}

static void test_e4m3(void) {
  /* Spot values. */
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(0.0f), 0x00, "e4m3(0)");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(-0.0f), 0x80, "e4m3(-0)");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(1.0f), 0x38, "e4m3(1)");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(-1.0f), 0xb8, "e4m3(-1)");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(240.0f), 0x77, "e4m3(240)");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(0x1p-6f), 0x08, "smallest normal");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(0x1p-9f), 0x01, "smallest subnormal");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(0x1p-10f), 0x00, "half the smallest subnormal ties to 0");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(0x3p-10f), 0x02, "1.5 subnormal steps tie to 2");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(0xfp-10f), 0x08, "7.5 subnormal steps tie up into the normals");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(1e-30f), 0x00, "underflow to 0");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(-1e-30f), 0x80, "underflow to -0");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(448.0f), 0x7e, "448");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(449.0f), 0x7e, "449 saturates");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(464.0f), 0x7e, "464 saturates");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(1e9f), 0x7e, "1e9 saturates");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(-1e9f), 0xfe, "-1e9 saturates");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(INFINITY), 0x7e, "+inf saturates");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(-INFINITY), 0xfe, "-inf saturates");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(NAN), 0x7f, "NaN");
  CHECK_EQ_INT(ep_ref_f32_to_e4m3(-NAN), 0xff, "-NaN");
  CHECK(ep_ref_e4m3_to_f32(0x7e) == 448.0f, "0x7e decodes to 448");
  CHECK(ep_ref_e4m3_to_f32(0x01) == 0x1p-9f, "0x01 decodes to 2^-9");
  CHECK(ep_ref_e4m3_to_f32(0x07) == 0x7p-9f, "0x07 decodes to 7 * 2^-9");
  CHECK(ep_ref_e4m3_to_f32(0xb8) == -1.0f, "0xb8 decodes to -1");

  /* All 256 codes: exactly two NaNs, everything else round-trips (the sign of zero included). */
  int nans = 0;
  for (int c = 0; c < 256; ++c) {
    float f = ep_ref_e4m3_to_f32((uint8_t)c);
    if (isnan(f)) {
      ++nans;
      CHECK(c == 0x7f || c == 0xff, "code 0x%02x decodes to NaN", c);
    }
    CHECK_EQ_INT(ep_ref_f32_to_e4m3(f), c, "e4m3 round trip");
  }
  CHECK_EQ_INT(nans, 2, "number of e4m3 NaN codes");

  /* Between every pair of neighbours: strictly increasing, the midpoint goes to the even code, and
   * the floats just either side of it go to the nearer code. Mirrored for negatives. */
  for (int c = 0; c < 0x7e; ++c) {
    float lo = ep_ref_e4m3_to_f32((uint8_t)c), hi = ep_ref_e4m3_to_f32((uint8_t)(c + 1));
    CHECK(lo < hi, "e4m3 0x%02x (%g) !< 0x%02x (%g)", c, lo, c + 1, hi);
    float mid = (lo + hi) / 2; /* exact: both have 4 significant bits */
    int even = (c & 1) ? c + 1 : c;
    CHECK_EQ_INT(ep_ref_f32_to_e4m3(mid), even, "midpoint to even");
    CHECK_EQ_INT(ep_ref_f32_to_e4m3(-mid), even | 0x80, "negative midpoint to even");
    CHECK_EQ_INT(ep_ref_f32_to_e4m3(nextafterf(mid, 0.0f)), c, "below the midpoint");
    CHECK_EQ_INT(ep_ref_f32_to_e4m3(nextafterf(mid, INFINITY)), c + 1, "above the midpoint");
  }
}

/* ================================================================================================
 * 2. FP8 cast and UE8M0
 * ============================================================================================== */

static void test_cast_fp8(void) {
  enum { H = 384 }; /* three groups */
  uint16_t x[H];
  memset(x, 0, sizeof x);
  /* Group 0: amax 7 gives scale 7/448 = 2^-6 exactly, i.e. inv_scale 64. */
  x[0] = bf(1.0f);    /* 64   -> 0x68 */
  x[1] = bf(7.0f);    /* 448  -> 0x7e */
  x[2] = bf(-0.5f);   /* -32  -> 0xe0 */
  x[3] = bf(0x1p-7f); /* 0.5  -> 0x30 */
  /* Group 1: amax 3 gives scale 3/448 (not a power of two). */
  x[128] = bf(3.0f);
  x[129] = bf(1.0f);
  x[130] = bf(-3.0f);
  /* Group 2: all zero, so amax is floored to 1e-4. */
  uint8_t q[H];
  float scales[3];

  ep_ref_cast_row_fp8(x, H, 0, q, scales);
  CHECK(scales[0] == 0x1p-6f, "scale of group 0: %g", scales[0]);
  CHECK(scales[1] == 3.0f / 448.0f, "scale of group 1: %g", scales[1]);
  CHECK(scales[2] == 1e-4f / 448.0f, "scale of the zero group: %g", scales[2]);
  CHECK_EQ_INT(q[0], 0x68, "q[0]");
  CHECK_EQ_INT(q[1], 0x7e, "q[1]");
  CHECK_EQ_INT(q[2], 0xe0, "q[2]");
  CHECK_EQ_INT(q[3], 0x30, "q[3]");
  CHECK_EQ_INT(q[4], 0x00, "q[4]");
  CHECK_EQ_INT(q[128], 0x7e, "q[128]: 3 * 448/3 ~ 448");
  CHECK_EQ_INT(q[129], 0x71, "q[129]: 149.3 -> 144");
  CHECK_EQ_INT(q[130], 0xfe, "q[130]");
  for (int c = 256; c < H; ++c) CHECK_EQ_INT(q[c], 0x00, "zero group");

  ep_ref_cast_row_fp8(x, H, 1, q, scales);
  /* 2^-6 is already a power of two and must not be bumped to 2^-5. */
  CHECK(scales[0] == 0x1p-6f, "rounded scale of group 0: %g", scales[0]);
  CHECK(scales[1] == 0x1p-7f, "rounded scale of group 1: %g (3/448 -> 2^-7)", scales[1]);
  CHECK(scales[2] == 0x1p-22f, "rounded scale of the zero group: %g (2.2e-7 -> 2^-22)", scales[2]);
  CHECK_EQ_INT(q[0], 0x68, "round_scale q[0]");
  CHECK_EQ_INT(q[1], 0x7e, "round_scale q[1]");
  CHECK_EQ_INT(q[128], 0x7c, "round_scale q[128]: 384");
  CHECK_EQ_INT(q[129], 0x70, "round_scale q[129]: 128");
  CHECK_EQ_INT(q[130], 0xfc, "round_scale q[130]: -384");

  /* inv_scale is 1.0f / (amax / 448), not 448 / amax: with amax = 1.078125 the two differ in the last
   * bit, and x = 0x1.9ep-4 lands either side of the 40/44 midpoint (0x63 vs 0x62). */
  uint16_t tie[128] = {0};
  tie[0] = bf(0x1.14p0f);
  tie[1] = bf(0x1.9ep-4f);
  ep_ref_cast_row_fp8(tie, 128, 0, q, scales);
  CHECK_EQ_INT(q[1], 0x63, "x * (1 / scale), not x * (448 / amax)");
}

static void test_ue8m0(void) {
  const float s[4] = {0x1p-7f, 1.0f, 8.0f, 0x1p-20f}; /* bytes 120, 127, 130, 107 */
  CHECK(ep_ref_pack_ue8m0(s) == 0x6B827F78u, "pack_ue8m0: got 0x%08x", (unsigned)ep_ref_pack_ue8m0(s));
  const float ones[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  CHECK(ep_ref_pack_ue8m0(ones) == 0x7F7F7F7Fu, "pack_ue8m0(1,1,1,1)");
}

/* ================================================================================================
 * Hand-checked topologies
 *
 *  Case A: 2 ranks on one node, 4 experts (2 per rank), top-2, 3 tokens per rank.
 *
 *      +---------------- node 0 ----------------+
 *      |  rank 0: e0 e1        rank 1: e2 e3    |
 *      +-----------------------------------------+
 *
 *      rank 0 tokens                       rank 1 tokens
 *        t0 {1, 2}   -> r0, r1               t0 {0, -1} -> r0
 *        t1 {-1, -1} -> nowhere              t1 {2, 0}  -> r1, r0
 *        t2 {3, 2}   -> r1 (both experts)    t2 {-1, 1} -> r0
 *
 *      rank 0 receives (src rank, token): (0,0) (1,0) (1,1) (1,2)
 *      rank 1 receives                  : (0,0) (0,2) (1,1)
 *
 *  Case B: 2 nodes x 2 ranks, 8 experts (2 per rank), top-2; rank 1 has no tokens.
 *
 *      +------------ node 0 ------------+   +------------ node 1 ------------+
 *      | rank 0: e0 e1   rank 1: e2 e3  |   | rank 2: e4 e5   rank 3: e6 e7  |
 *      +--------------------------------+   +--------------------------------+
 *
 *      rank 0: t0 {0,2} -> r0 r1 (node 0)        rank 2: t0 {7,-1} -> r3 (node 1)
 *              t1 {1,5} -> r0 r2 (nodes 0,1)             t1 {0, 6} -> r0 r3 (nodes 0,1)
 *              t2 {6,7} -> r3 (node 1)           rank 3: t0 {2, 3} -> r1 (node 0)
 *              t3 {4,3} -> r1 r2 (nodes 0,1)
 * ============================================================================================== */

enum { A_R = 2, A_E = 4, A_N = 3, A_K = 2, A_H = 4, A_S = 2 };
static const int64_t A_TOPK0[A_N * A_K] = {1, 2, -1, -1, 3, 2};
static const int64_t A_TOPK1[A_N * A_K] = {0, -1, 2, 0, -1, 1};
static const float A_W0[A_N * A_K] = {0.5f, 0.25f, 0.75f, 0.125f, 1.5f, 2.5f};
static const float A_W1[A_N * A_K] = {3.0f, 0.375f, 4.0f, 5.0f, 6.5f, 7.25f};

/* Row payload of case A: x[s][t][c] = s*16 + t*4 + c + 1 (small integers, exact in bf16). */
static float a_x_value(int s, int t, int c) { return (float)(s * 16 + t * 4 + c + 1); }

typedef struct {
  uint16_t x[A_R][A_N * A_H];
  float scales[A_R][A_N * A_S];
  int num_tokens[A_R];
  const void* x_ptr[A_R];
  const float* scale_ptr[A_R];
  const int64_t* topk_ptr[A_R];
  const float* weight_ptr[A_R];
  ep_ref_world_t world;
} case_a_t;

static void case_a_init(case_a_t* a) {
  for (int s = 0; s < A_R; ++s) {
    a->num_tokens[s] = A_N;
    for (int t = 0; t < A_N; ++t) {
      for (int c = 0; c < A_H; ++c) a->x[s][t * A_H + c] = bf(a_x_value(s, t, c));
      for (int j = 0; j < A_S; ++j) a->scales[s][t * A_S + j] = (float)(s * 100 + t * 10 + j);
    }
    a->x_ptr[s] = a->x[s];
    a->scale_ptr[s] = a->scales[s];
  }
  a->topk_ptr[0] = A_TOPK0;
  a->topk_ptr[1] = A_TOPK1;
  a->weight_ptr[0] = A_W0;
  a->weight_ptr[1] = A_W1;
  memset(&a->world, 0, sizeof a->world);
  a->world.num_ranks = A_R;
  a->world.ranks_per_node = A_R;
  a->world.num_experts = A_E;
  a->world.num_topk = A_K;
  a->world.num_tokens = a->num_tokens;
  a->world.x = a->x_ptr;
  a->world.row_bytes = A_H * sizeof(uint16_t);
  a->world.x_scales = a->scale_ptr;
  a->world.num_scales = A_S;
  a->world.topk_idx = a->topk_ptr;
  a->world.topk_weights = a->weight_ptr;
}

static void test_layout_case_a(void) {
  int per_rank[A_R], per_node[A_R], per_expert[A_E];
  uint8_t in_rank[A_N * A_R];
  int bad = 123;

  CHECK_EQ_INT(ep_ref_layout(A_R, 2, A_E, A_N, A_K, A_TOPK0, per_rank, per_node, per_expert, in_rank, &bad),
               0, "layout rank 0");
  CHECK_EQ_INT(bad, -1, "bad_token when valid");
  expect_ints("A0 per_rank", per_rank, (const int[]){1, 2}, A_R);
  expect_ints("A0 per_node", per_node, (const int[]){2}, 1);
  expect_ints("A0 per_expert", per_expert, (const int[]){0, 1, 2, 1}, A_E);
  expect_u8s("A0 in_rank", in_rank, (const uint8_t[]){1, 1, 0, 0, 0, 1}, A_N * A_R);

  CHECK_EQ_INT(ep_ref_layout(A_R, 2, A_E, A_N, A_K, A_TOPK1, per_rank, per_node, per_expert, in_rank, NULL),
               0, "layout rank 1");
  expect_ints("A1 per_rank", per_rank, (const int[]){3, 1}, A_R);
  expect_ints("A1 per_node", per_node, (const int[]){3}, 1);
  expect_ints("A1 per_expert", per_expert, (const int[]){2, 1, 1, 0}, A_E);
  expect_u8s("A1 in_rank", in_rank, (const uint8_t[]){1, 0, 1, 1, 1, 0}, A_N * A_R);

  /* One rank per node: nodes are ranks. */
  CHECK_EQ_INT(ep_ref_layout(A_R, 1, A_E, A_N, A_K, A_TOPK0, NULL, per_node, NULL, NULL, NULL), 0,
               "layout, one rank per node");
  expect_ints("A0 per_node (1 rank/node)", per_node, (const int[]){1, 2}, 2);

  /* A repeated expert counts once. */
  const int64_t dup[2] = {3, 3};
  CHECK_EQ_INT(ep_ref_layout(A_R, 2, A_E, 1, 2, dup, per_rank, NULL, per_expert, NULL, NULL), 0,
               "dup layout");
  expect_ints("dup per_rank", per_rank, (const int[]){0, 1}, A_R);
  expect_ints("dup per_expert", per_expert, (const int[]){0, 0, 0, 1}, A_E);

  /* Zero tokens: all counts zero. */
  per_rank[0] = per_rank[1] = 7;
  CHECK_EQ_INT(ep_ref_layout(A_R, 2, A_E, 0, A_K, NULL, per_rank, NULL, NULL, NULL, NULL), 0, "empty layout");
  expect_ints("empty per_rank", per_rank, (const int[]){0, 0}, A_R);
}

static void test_bad_index(void) {
  int bad = 0;
  const int64_t too_big[6] = {0, 1, 4, 0, -2, 1}; /* token 1 has expert 4 of 4 */
  CHECK_EQ_INT(ep_ref_layout(2, 2, 4, 3, 2, too_big, NULL, NULL, NULL, NULL, &bad), -1, "expert 4 rejected");
  CHECK_EQ_INT(bad, 1, "first bad token (too big)");
  const int64_t negative[6] = {0, 1, 1, -2, 9, 9}; /* token 1 has -2 */
  CHECK_EQ_INT(ep_ref_layout(2, 2, 4, 3, 2, negative, NULL, NULL, NULL, NULL, &bad), -1, "-2 rejected");
  CHECK_EQ_INT(bad, 1, "first bad token (negative)");
  const int64_t first[2] = {-1, 5};
  CHECK_EQ_INT(ep_ref_layout(2, 2, 4, 1, 2, first, NULL, NULL, NULL, NULL, &bad), -1, "5 rejected");
  CHECK_EQ_INT(bad, 0, "first bad token (token 0)");

  /* Bad shapes: experts not divisible by ranks, ranks not divisible by ranks_per_node. */
  CHECK_EQ_INT(ep_ref_layout(3, 3, 4, 1, 2, first, NULL, NULL, NULL, NULL, &bad), -1, "E % R != 0");
  CHECK_EQ_INT(bad, -1, "bad_token for a bad shape");
  CHECK_EQ_INT(ep_ref_layout(4, 3, 4, 1, 2, first, NULL, NULL, NULL, NULL, &bad), -1, "R % rpn != 0");

  /* The dispatches refuse it too and leave nothing allocated. */
  case_a_t a;
  case_a_init(&a);
  a.topk_ptr[1] = too_big;
  ep_ref_dispatch_t d;
  CHECK_EQ_INT(ep_ref_dispatch(&a.world, 1, &d), -1, "dispatch with a bad expert");
  CHECK(d.recv == NULL && d.recv_row == NULL, "failed dispatch left memory behind");

  const int n[2] = {3, 3};
  const int64_t* topk[2] = {A_TOPK0, too_big};
  ep_ref_ll_world_t lw = {2, 4, 2, 4, 3, n, NULL, topk, NULL};
  ep_ref_ll_dispatch_t ld;
  CHECK_EQ_INT(ep_ref_ll_dispatch(&lw, 0, 0, 0, &ld), -1, "ll dispatch with a bad expert");
  const int too_many[2] = {4, 3}; /* more than max_tokens_per_rank */
  lw.num_tokens = too_many;
  topk[1] = A_TOPK1;
  CHECK_EQ_INT(ep_ref_ll_dispatch(&lw, 0, 0, 0, &ld), -1, "ll dispatch with N_r > T");
}

/* ================================================================================================
 * 4./5. Normal dispatch and combine
 * ============================================================================================== */

static void test_dispatch_case_a(void) {
  case_a_t a;
  case_a_init(&a);
  ep_ref_dispatch_t d;
  CHECK_EQ_INT(ep_ref_dispatch(&a.world, 1, &d), 0, "dispatch A");
  if (!d.recv) return;

  expect_ints("A rank_prefix_matrix", d.rank_prefix_matrix, (const int[]){1, 2, 4, 3}, A_R * A_R);
  CHECK_EQ_INT(d.recv[0].num_recv, 4, "rank 0 num_recv");
  CHECK_EQ_INT(d.recv[1].num_recv, 3, "rank 1 num_recv");

  expect_ints("r0 src_rank", d.recv[0].src_rank, (const int[]){0, 1, 1, 1}, 4);
  expect_ints("r0 src_idx", d.recv[0].src_idx, (const int[]){0, 0, 1, 2}, 4);
  expect_i64s("r0 topk_idx", d.recv[0].topk_idx, (const int64_t[]){1, -1, 0, -1, -1, 0, -1, 1}, 8);
  expect_floats("r0 topk_weights", d.recv[0].topk_weights,
                (const float[]){0.5f, 0, 3.0f, 0, 0, 5.0f, 0, 7.25f}, 8);
  expect_ints("r0 per expert", d.recv[0].num_recv_tokens_per_expert, (const int[]){2, 2}, 2);

  expect_ints("r1 src_rank", d.recv[1].src_rank, (const int[]){0, 0, 1}, 3);
  expect_ints("r1 src_idx", d.recv[1].src_idx, (const int[]){0, 2, 1}, 3);
  expect_i64s("r1 topk_idx", d.recv[1].topk_idx, (const int64_t[]){-1, 0, 1, 0, 0, -1}, 6);
  expect_floats("r1 topk_weights", d.recv[1].topk_weights, (const float[]){0, 0.25f, 1.5f, 2.5f, 4.0f, 0}, 6);
  expect_ints("r1 per expert", d.recv[1].num_recv_tokens_per_expert, (const int[]){3, 1}, 2);

  /* Row map: [t][d] per source rank. */
  expect_ints("recv_row from rank 0", d.recv_row[0], (const int[]){0, 0, -1, -1, -1, 1}, A_N * A_R);
  expect_ints("recv_row from rank 1", d.recv_row[1], (const int[]){1, -1, 2, 2, 3, -1}, A_N * A_R);
  CHECK_EQ_INT(ep_ref_dispatch_row(&d, 1, 2, 0), 3, "dispatch_row(1, 2, 0)");

  /* Payload bytes and scales are the source rows. */
  for (int dst = 0; dst < A_R; ++dst)
    for (int i = 0; i < d.recv[dst].num_recv; ++i) {
      int s = d.recv[dst].src_rank[i], t = d.recv[dst].src_idx[i];
      CHECK(memcmp(d.recv[dst].x + (size_t)i * a.world.row_bytes, a.x[s] + t * A_H, a.world.row_bytes) == 0,
            "rank %d row %d: x differs from (%d, %d)", dst, i, s, t);
      CHECK(memcmp(d.recv[dst].x_scales + i * A_S, a.scales[s] + t * A_S, sizeof(float) * A_S) == 0,
            "rank %d row %d: scales differ from (%d, %d)", dst, i, s, t);
    }
  ep_ref_dispatch_free(&d);

  /* Alignment rounds each local expert's count up. */
  CHECK_EQ_INT(ep_ref_dispatch(&a.world, 2, &d), 0, "dispatch A, alignment 2");
  if (d.recv) {
    expect_ints("r0 per expert (align 2)", d.recv[0].num_recv_tokens_per_expert, (const int[]){2, 2}, 2);
    expect_ints("r1 per expert (align 2)", d.recv[1].num_recv_tokens_per_expert, (const int[]){4, 2}, 2);
  }
  ep_ref_dispatch_free(&d);
  CHECK_EQ_INT(ep_ref_dispatch(&a.world, 4, &d), 0, "dispatch A, alignment 4");
  if (d.recv) {
    expect_ints("r0 per expert (align 4)", d.recv[0].num_recv_tokens_per_expert, (const int[]){4, 4}, 2);
    expect_ints("r1 per expert (align 4)", d.recv[1].num_recv_tokens_per_expert, (const int[]){4, 4}, 2);
  }
  ep_ref_dispatch_free(&d);
  CHECK_EQ_INT(ep_ref_dispatch(&a.world, 0, &d), -1, "alignment 0 rejected");
}

static void test_combine_case_a(void) {
  case_a_t a;
  case_a_init(&a);
  ep_ref_dispatch_t d;
  CHECK_EQ_INT(ep_ref_dispatch(&a.world, 1, &d), 0, "dispatch A for combine");
  if (!d.recv) return;

  /* Experts are the identity: y_d = received x. */
  const uint16_t* y[A_R] = {(const uint16_t*)d.recv[0].x, (const uint16_t*)d.recv[1].x};
  const float* rw[A_R] = {d.recv[0].topk_weights, d.recv[1].topk_weights};
  uint16_t out[A_R][A_N * A_H];
  float out_w[A_R][A_N * A_K];
  uint16_t* out_ptr[A_R] = {out[0], out[1]};
  float* out_w_ptr[A_R] = {out_w[0], out_w[1]};

  /* Without bias: out = x * (number of ranks the token went to). */
  static const int fanout[A_R][A_N] = {{2, 0, 1}, {1, 2, 1}};
  CHECK_EQ_INT(ep_ref_combine(&d, A_H, y, rw, NULL, NULL, out_ptr, out_w_ptr), 0, "combine A");
  for (int s = 0; s < A_R; ++s)
    for (int t = 0; t < A_N; ++t)
      for (int c = 0; c < A_H; ++c)
        CHECK(unbf(out[s][t * A_H + c]) == a_x_value(s, t, c) * fanout[s][t],
              "combine rank %d token %d ch %d: got %g, want %g", s, t, c, unbf(out[s][t * A_H + c]),
              a_x_value(s, t, c) * fanout[s][t]);
  /* Combined weights: the original weight of every valid slot, 0 for -1 slots. */
  expect_floats("A0 combined weights", out_w[0], (const float[]){0.5f, 0.25f, 0, 0, 1.5f, 2.5f}, 6);
  expect_floats("A1 combined weights", out_w[1], (const float[]){3.0f, 0, 4.0f, 5.0f, 0, 7.25f}, 6);

  /* With both biases: bias0 = 0.5, bias1 = 0.25 everywhere. */
  uint16_t b0[A_R][A_N * A_H], b1[A_R][A_N * A_H];
  for (int s = 0; s < A_R; ++s)
    for (int i = 0; i < A_N * A_H; ++i) {
      b0[s][i] = bf(0.5f);
      b1[s][i] = bf(0.25f);
    }
  const uint16_t* b0p[A_R] = {b0[0], b0[1]};
  const uint16_t* b1p[A_R] = {b1[0], b1[1]};
  CHECK_EQ_INT(ep_ref_combine(&d, A_H, y, NULL, b0p, b1p, out_ptr, NULL), 0, "combine A with bias");
  for (int s = 0; s < A_R; ++s)
    for (int t = 0; t < A_N; ++t)
      for (int c = 0; c < A_H; ++c) {
        float want = 0.75f + a_x_value(s, t, c) * fanout[s][t];
        CHECK(unbf(out[s][t * A_H + c]) == want, "biased combine rank %d token %d ch %d: got %g, want %g", s,
              t, c, unbf(out[s][t * A_H + c]), want);
      }
  CHECK(unbf(out[0][1 * A_H]) == 0.75f, "token sent nowhere yields bias0 + bias1");
  ep_ref_dispatch_free(&d);
}

/* The accumulation order is observable in fp32: pin it. */
static void test_combine_order(void) {
  /* 4 ranks; rank 0 has one token sent to every rank; y_d[0] = {2^24, 1, -2^24, 1}[d].
   * Ranks ascending: ((2^24 + 1) - 2^24) + 1 = 0 + 1 = 1 (2^24 + 1 rounds to 2^24).
   * Ranks descending would give 2. */
  const int n[4] = {1, 0, 0, 0};
  const int64_t topk0[4] = {3, 2, 1, 0};
  const int64_t* topk[4] = {topk0, NULL, NULL, NULL};
  ep_ref_world_t w = {0};
  w.num_ranks = 4;
  w.ranks_per_node = 4;
  w.num_experts = 4;
  w.num_topk = 4;
  w.num_tokens = n;
  w.topk_idx = topk;
  ep_ref_dispatch_t d;
  CHECK_EQ_INT(ep_ref_dispatch(&w, 1, &d), 0, "order dispatch");
  if (!d.recv) return;
  uint16_t yv[4] = {bf(0x1p24f), bf(1.0f), bf(-0x1p24f), bf(1.0f)};
  const uint16_t* y[4] = {&yv[0], &yv[1], &yv[2], &yv[3]};
  uint16_t out0;
  uint16_t* out[4] = {&out0, NULL, NULL, NULL};
  CHECK_EQ_INT(ep_ref_combine(&d, 1, y, NULL, NULL, NULL, out, NULL), 0, "order combine");
  CHECK(unbf(out0) == 1.0f, "ranks ascending: got %g, want 1", unbf(out0));

  /* bias0 = 2^24, bias1 = -2^24, y all 1: biases first gives (2^24 - 2^24) + 1 + 1 + 1 + 1 = 4;
   * adding bias1 after the ranks would absorb every 1 into 2^24 and give 0. */
  uint16_t b0 = bf(0x1p24f), b1 = bf(-0x1p24f);
  const uint16_t* b0p[4] = {&b0, NULL, NULL, NULL};
  const uint16_t* b1p[4] = {&b1, NULL, NULL, NULL};
  uint16_t ones[4] = {bf(1.0f), bf(1.0f), bf(1.0f), bf(1.0f)};
  const uint16_t* y1[4] = {&ones[0], &ones[1], &ones[2], &ones[3]};
  CHECK_EQ_INT(ep_ref_combine(&d, 1, y1, NULL, b0p, b1p, out, NULL), 0, "bias order combine");
  CHECK(unbf(out0) == 4.0f, "bias0, bias1, then ranks: got %g, want 4", unbf(out0));
  ep_ref_dispatch_free(&d);
}

enum { B_R = 4, B_RPN = 2, B_E = 8, B_K = 2 };
static const int B_NUM_TOKENS[B_R] = {4, 0, 2, 1};
static const int64_t B_TOPK0[8] = {0, 2, 1, 5, 6, 7, 4, 3};
static const int64_t B_TOPK2[4] = {7, -1, 0, 6};
static const int64_t B_TOPK3[2] = {2, 3};

static ep_ref_world_t case_b_world(const int64_t** topk) {
  topk[0] = B_TOPK0;
  topk[1] = NULL; /* rank 1 has no tokens */
  topk[2] = B_TOPK2;
  topk[3] = B_TOPK3;
  ep_ref_world_t w = {0};
  w.num_ranks = B_R;
  w.ranks_per_node = B_RPN;
  w.num_experts = B_E;
  w.num_topk = B_K;
  w.num_tokens = B_NUM_TOKENS;
  w.topk_idx = topk;
  return w;
}

static void test_nodes_case_b(void) {
  int per_rank[B_R], per_node[2], per_expert[B_E];
  uint8_t in_rank[4 * B_R];
  CHECK_EQ_INT(ep_ref_layout(B_R, B_RPN, B_E, 4, B_K, B_TOPK0, per_rank, per_node, per_expert, in_rank, NULL),
               0, "layout B0");
  expect_ints("B0 per_rank", per_rank, (const int[]){2, 2, 2, 1}, B_R);
  expect_ints("B0 per_node", per_node, (const int[]){3, 3}, 2);
  expect_ints("B0 per_expert", per_expert, (const int[]){1, 1, 1, 1, 1, 1, 1, 1}, B_E);
  expect_u8s("B0 in_rank", in_rank, (const uint8_t[]){1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1, 0, 1, 1, 0}, 16);
  CHECK_EQ_INT(ep_ref_layout(B_R, B_RPN, B_E, 2, B_K, B_TOPK2, per_rank, per_node, per_expert, in_rank, NULL),
               0, "layout B2");
  expect_ints("B2 per_rank", per_rank, (const int[]){1, 0, 0, 2}, B_R);
  expect_ints("B2 per_node", per_node, (const int[]){1, 2}, 2);
  expect_ints("B2 per_expert", per_expert, (const int[]){1, 0, 0, 0, 0, 0, 1, 1}, B_E);
  CHECK_EQ_INT(ep_ref_layout(B_R, B_RPN, B_E, 1, B_K, B_TOPK3, per_rank, per_node, per_expert, in_rank, NULL),
               0, "layout B3");
  expect_ints("B3 per_rank", per_rank, (const int[]){0, 1, 0, 0}, B_R);
  expect_ints("B3 per_node", per_node, (const int[]){1, 0}, 2);

  const int64_t* topk[B_R];
  ep_ref_world_t w = case_b_world(topk);
  ep_ref_dispatch_t d;
  CHECK_EQ_INT(ep_ref_dispatch(&w, 1, &d), 0, "dispatch B");
  if (d.recv) {
    expect_ints("B rank_prefix_matrix", d.rank_prefix_matrix,
                (const int[]){2, 2, 2, 1, 2, 2, 2, 1, 3, 2, 2, 3, 3, 3, 2, 3}, 16);
    static const int want_num[B_R] = {3, 3, 2, 3};
    static const int want_src_rank[B_R][3] = {{0, 0, 2}, {0, 0, 3}, {0, 0}, {0, 2, 2}};
    static const int want_src_idx[B_R][3] = {{0, 1, 1}, {0, 3, 0}, {1, 3}, {2, 0, 1}};
    static const int64_t want_topk[B_R][6] = {
        {0, -1, 1, -1, 0, -1}, {-1, 0, -1, 1, 0, 1}, {-1, 1, 0, -1}, {0, 1, 1, -1, -1, 0}};
    static const int want_per_expert[B_R][2] = {{2, 1}, {2, 2}, {1, 1}, {2, 2}};
    for (int r = 0; r < B_R; ++r) {
      CHECK_EQ_INT(d.recv[r].num_recv, want_num[r], "B num_recv");
      expect_ints("B src_rank", d.recv[r].src_rank, want_src_rank[r], want_num[r]);
      expect_ints("B src_idx", d.recv[r].src_idx, want_src_idx[r], want_num[r]);
      expect_i64s("B topk_idx", d.recv[r].topk_idx, want_topk[r], 2 * want_num[r]);
      expect_ints("B per expert", d.recv[r].num_recv_tokens_per_expert, want_per_expert[r], 2);
      CHECK(d.recv[r].x == NULL && d.recv[r].x_scales == NULL && d.recv[r].topk_weights == NULL,
            "rank %d: outputs without inputs should be NULL", r);
    }
  }
  ep_ref_dispatch_free(&d);

  uint8_t node0[8], node2[4], node3[2];
  uint8_t* in_node[B_R] = {node0, NULL, node2, node3};
  int sends[B_R], recv_rows[B_R];
  CHECK_EQ_INT(ep_ref_internode_counts(&w, in_node, sends, recv_rows), 0, "internode counts B");
  expect_u8s("B0 in_node", node0, (const uint8_t[]){1, 0, 1, 1, 0, 1, 1, 1}, 8);
  expect_u8s("B2 in_node", node2, (const uint8_t[]){0, 1, 1, 1}, 4);
  expect_u8s("B3 in_node", node3, (const uint8_t[]){1, 0}, 2);
  expect_ints("B node sends", sends, (const int[]){6, 0, 3, 1}, B_R);
  expect_ints("B recv rows", recv_rows, (const int[]){3, 3, 2, 3}, B_R);
}

/* Routing given directly (no topk_idx) must be followed as is. */
static void test_routing_override(void) {
  const int n[2] = {2, 1};
  const uint8_t r0[4] = {0, 1, 1, 1}, r1[2] = {1, 0};
  const uint8_t* in_rank[2] = {r0, r1};
  ep_ref_world_t w = {0};
  w.num_ranks = 2;
  w.ranks_per_node = 1;
  w.num_experts = 2;
  w.num_tokens = n;
  w.is_token_in_rank = in_rank;
  ep_ref_dispatch_t d;
  CHECK_EQ_INT(ep_ref_dispatch(&w, 1, &d), 0, "override dispatch");
  if (!d.recv) return;
  expect_ints("override prefix", d.rank_prefix_matrix, (const int[]){1, 2, 2, 2}, 4);
  expect_ints("override r0 src_idx", d.recv[0].src_idx, (const int[]){1, 0}, 2);
  expect_ints("override r0 src_rank", d.recv[0].src_rank, (const int[]){0, 1}, 2);
  expect_ints("override r1 src_idx", d.recv[1].src_idx, (const int[]){0, 1}, 2);
  CHECK(d.recv[0].topk_idx == NULL, "no topk in, no topk out");
  expect_ints("override per expert", d.recv[0].num_recv_tokens_per_expert, (const int[]){0}, 1);
  ep_ref_dispatch_free(&d);
}

/* Without topk_idx, per-expert counts are the sources' num_tokens_per_expert summed, then aligned (DeepEP's
 * dispatch without top-k); with topk_idx too, the world is refused (two owners of the counts). */
static void test_routing_override_expert_counts(void) {
  const int n[2] = {2, 1};
  const uint8_t r0[4] = {0, 1, 1, 1}, r1[2] = {1, 0};
  const uint8_t* in_rank[2] = {r0, r1};
  const int c0[4] = {0, 0, 3, 1}, c1[4] = {2, 5, 0, 0};
  const int* counts[2] = {c0, c1};
  ep_ref_world_t w = {0};
  w.num_ranks = 2;
  w.ranks_per_node = 1;
  w.num_experts = 4;
  w.num_tokens = n;
  w.is_token_in_rank = in_rank;
  w.num_tokens_per_expert = counts;
  ep_ref_dispatch_t d;
  CHECK_EQ_INT(ep_ref_dispatch(&w, 4, &d), 0, "override dispatch with expert counts");
  if (!d.recv) return;
  expect_ints("override r0 per expert", d.recv[0].num_recv_tokens_per_expert, (const int[]){4, 8}, 2);
  expect_ints("override r1 per expert", d.recv[1].num_recv_tokens_per_expert, (const int[]){4, 4}, 2);
  ep_ref_dispatch_free(&d);
  const int64_t t0[2] = {0, 1}, t1[1] = {2};
  const int64_t* topk[2] = {t0, t1};
  w.topk_idx = topk;
  w.num_topk = 1;
  CHECK(ep_ref_dispatch(&w, 1, &d) != 0, "topk_idx with num_tokens_per_expert is refused");
}

/* ================================================================================================
 * 6./7. Low-latency dispatch and combine (case A routing, with a repeated expert on rank 1 token 2)
 * ============================================================================================== */

enum { L_T = 4 };
static const int64_t L_TOPK1[A_N * A_K] = {0, -1, 2, 0, 1, 1}; /* t2 selects expert 1 twice */
static const float L_W1[A_N * A_K] = {3.0f, 0.375f, 4.0f, 5.0f, 0.5f, 0.25f};

typedef struct {
  uint16_t x[A_R][A_N * A_H];
  int num_tokens[A_R];
  const uint16_t* x_ptr[A_R];
  const int64_t* topk_ptr[A_R];
  const float* weight_ptr[A_R];
  ep_ref_ll_world_t world;
} case_l_t;

static void case_l_init(case_l_t* l) {
  for (int s = 0; s < A_R; ++s) {
    l->num_tokens[s] = A_N;
    for (int i = 0; i < A_N * A_H; ++i) l->x[s][i] = bf(a_x_value(s, i / A_H, i % A_H));
    l->x_ptr[s] = l->x[s];
  }
  l->topk_ptr[0] = A_TOPK0;
  l->topk_ptr[1] = L_TOPK1;
  l->weight_ptr[0] = A_W0;
  l->weight_ptr[1] = L_W1;
  ep_ref_ll_world_t w = {A_R, A_E, A_K, A_H, L_T, l->num_tokens, l->x_ptr, l->topk_ptr, l->weight_ptr};
  l->world = w;
}

static void test_ll_dispatch(void) {
  case_l_t l;
  case_l_init(&l);
  ep_ref_ll_dispatch_t d;
  CHECK_EQ_INT(ep_ref_ll_dispatch(&l.world, 0, 0, 0, &d), 0, "ll dispatch");
  if (!d.recv) return;
  /* rank 0: e0 <- (1,0) (1,1); e1 <- (0,0) (1,2) [once despite the repeat]
   * rank 1: e0 (global 2) <- (0,0) (0,2) (1,1); e1 (global 3) <- (0,2) */
  const ep_ref_ll_recv_t* r0 = &d.recv[0];
  const ep_ref_ll_recv_t* r1 = &d.recv[1];
  expect_ints("ll r0 count", r0->count, (const int[]){2, 2}, 2);
  expect_ints("ll r0 offset", r0->expert_offset, (const int[]){0, 2, 4}, 3);
  expect_ints("ll r0 src_rank", r0->src_rank, (const int[]){1, 1, 0, 1}, 4);
  expect_ints("ll r0 src_idx", r0->src_idx, (const int[]){0, 1, 0, 2}, 4);
  expect_ints("ll r0 range_begin", r0->range_begin, (const int[]){0, 0, 0, 1}, 4);
  expect_ints("ll r0 range_count", r0->range_count, (const int[]){0, 2, 1, 1}, 4);
  expect_ints("ll r1 count", r1->count, (const int[]){3, 1}, 2);
  expect_ints("ll r1 offset", r1->expert_offset, (const int[]){0, 3, 4}, 3);
  expect_ints("ll r1 src_rank", r1->src_rank, (const int[]){0, 0, 1, 0}, 4);
  expect_ints("ll r1 src_idx", r1->src_idx, (const int[]){0, 2, 1, 2}, 4);
  expect_ints("ll r1 range_begin", r1->range_begin, (const int[]){0, 2, 0, 1}, 4);
  expect_ints("ll r1 range_count", r1->range_count, (const int[]){2, 1, 1, 0}, 4);
  expect_ints("ll token_row from 0", d.token_row[0], (const int[]){0, 0, -1, -1, 0, 1}, 6);
  expect_ints("ll token_row from 1", d.token_row[1], (const int[]){0, -1, 2, 1, 1, 1}, 6);
  for (int dst = 0; dst < A_R; ++dst) {
    const ep_ref_ll_recv_t* r = &d.recv[dst];
    CHECK(r->x_fp8 == NULL && r->scales == NULL && r->scales_ue8m0 == NULL, "bf16 mode has no fp8 arrays");
    for (int i = 0; i < r->num_rows; ++i)
      CHECK(memcmp(r->x + i * A_H, l.x[r->src_rank[i]] + r->src_idx[i] * A_H, A_H * sizeof(uint16_t)) == 0,
            "ll rank %d row %d payload", dst, i);
  }
  ep_ref_ll_dispatch_free(&d);

  /* A rank without tokens receives from the others and sends nothing. */
  l.num_tokens[0] = 0;
  CHECK_EQ_INT(ep_ref_ll_dispatch(&l.world, 0, 0, 0, &d), 0, "ll dispatch, rank 0 empty");
  if (d.recv) {
    expect_ints("ll empty r0 count", d.recv[0].count, (const int[]){2, 1}, 2);
    expect_ints("ll empty r1 count", d.recv[1].count, (const int[]){1, 0}, 2);
    expect_ints("ll empty r1 range_count", d.recv[1].range_count, (const int[]){0, 1, 0, 0}, 4);
  }
  ep_ref_ll_dispatch_free(&d);
}

/* Expert outputs for the combine tests: identity, or x scaled by (global expert + 1). */
typedef struct {
  const uint16_t* const* x; /* [R] -> [N_r, hidden] the source rows */
  int num_local_experts;
  int scale_by_expert;
} expert_ctx_t;

static void expert_fn(void* ctx, int dst_rank, int local_expert, int src_rank, int src_token, int hidden,
                      uint16_t* y_row) {
  const expert_ctx_t* e = ctx;
  const float mul = e->scale_by_expert ? (float)(dst_rank * e->num_local_experts + local_expert + 1) : 1.0f;
  for (int c = 0; c < hidden; ++c)
    y_row[c] = bf(unbf(e->x[src_rank][(size_t)src_token * hidden + c]) * mul); /* exact: small ints */
}

static void test_ll_combine(void) {
  case_l_t l;
  case_l_init(&l);
  ep_ref_ll_dispatch_t d;
  CHECK_EQ_INT(ep_ref_ll_dispatch(&l.world, 0, 0, 0, &d), 0, "ll dispatch for combine");
  if (!d.recv) return;
  const int E_loc = A_E / A_R;
  uint16_t* ybuf[A_R];
  const size_t y_elems = (size_t)E_loc * A_R * L_T * A_H;
  for (int r = 0; r < A_R; ++r) {
    ybuf[r] = malloc(y_elems * sizeof(uint16_t));
    memset(ybuf[r], 0xff, y_elems * sizeof(uint16_t)); /* poison: fill must zero unused rows */
  }
  const uint16_t* y[A_R] = {ybuf[0], ybuf[1]};
  uint16_t out_a[A_R][A_N * A_H], out_f[A_R][A_N * A_H];
  uint16_t* out_a_ptr[A_R] = {out_a[0], out_a[1]};
  uint16_t* out_f_ptr[A_R] = {out_f[0], out_f[1]};

  /* sum_k w_k (identity) and sum_k w_k * (e_k + 1) per token, by hand; the repeat adds twice. */
  static const float wsum[2][A_R][A_N] = {{{0.75f, 0.0f, 4.0f}, {3.0f, 9.0f, 0.75f}},
                                          {{0.5f * 2 + 0.25f * 3, 0.0f, 1.5f * 4 + 2.5f * 3},
                                           {3.0f * 1, 4.0f * 3 + 5.0f * 1, 0.5f * 2 + 0.25f * 2}}};
  for (int mode = 0; mode < 2; ++mode) {
    expert_ctx_t ctx = {l.x_ptr, E_loc, mode};
    CHECK_EQ_INT(ep_ref_ll_fill_expert_outputs(&d, expert_fn, &ctx, ybuf), 0, "fill y");
    CHECK_EQ_INT(ep_ref_ll_combine(&l.world, &d, y, out_a_ptr), 0, "ll combine");
    CHECK_EQ_INT(ep_ref_ll_combine_fn(&l.world, expert_fn, &ctx, out_f_ptr), 0, "ll combine fn");
    for (int s = 0; s < A_R; ++s)
      for (int t = 0; t < A_N; ++t)
        for (int c = 0; c < A_H; ++c) {
          float want = unbf(bf(wsum[mode][s][t] * a_x_value(s, t, c))); /* product exact in fp32 */
          int i = t * A_H + c;
          CHECK(unbf(out_a[s][i]) == want, "ll combine mode %d rank %d token %d ch %d: got %g, want %g", mode,
                s, t, c, unbf(out_a[s][i]), want);
          CHECK(out_f[s][i] == out_a[s][i], "ll combine forms differ: mode %d rank %d token %d ch %d", mode,
                s, t, c);
        }
  }
  /* Row 0 of rank 1's expert 0 is token (0,0): in the padded layout at [0][0]; rows past the count
   * are zero. */
  CHECK(unbf(ybuf[1][0]) == 1.0f * 3, "fill: rank 1 e0 row 0 ch 0");
  CHECK(ybuf[1][(size_t)3 * A_H] == 0, "fill: unused row zeroed");
  for (int r = 0; r < A_R; ++r) free(ybuf[r]);
  ep_ref_ll_dispatch_free(&d);
}

/* Each term is one fused multiply-add: acc = -(1 + 2^-7 + 3*2^-23) * 1, then
 * fmaf(1 + 3*2^-23, 1 + 2^-7, acc) = 3*2^-30 exactly, where a separate multiply would round the
 * product to -acc and leave 0. */
static const float FMA_W[2] = {-(1.0f + 0x1p-7f + 0x3p-23f), 1.0f + 0x3p-23f};

static void fma_expert(void* ctx, int dst_rank, int local_expert, int src_rank, int src_token, int hidden,
                       uint16_t* y_row) {
  (void)ctx;
  (void)local_expert;
  (void)src_rank;
  (void)src_token;
  y_row[0] = bf(dst_rank == 0 ? 1.0f : 1.0f + 0x1p-7f);
  for (int c = 1; c < hidden; ++c) y_row[c] = 0;
}

static void test_ll_combine_fma(void) {
  const int n[2] = {1, 0};
  const int64_t topk0[2] = {0, 1};
  const int64_t* topk[2] = {topk0, NULL};
  const float* wt[2] = {FMA_W, NULL};
  ep_ref_ll_world_t w = {2, 2, 2, 1, 1, n, NULL, topk, wt};
  uint16_t out0 = 0xffff;
  uint16_t* out[2] = {&out0, NULL};
  CHECK_EQ_INT(ep_ref_ll_combine_fn(&w, fma_expert, NULL, out), 0, "fma combine");
  CHECK(unbf(out0) == 0x3p-30f, "fused accumulation: got %g, want %g", unbf(out0), 0x3p-30f);
}

static void test_ll_fp8(void) {
  enum { R = 2, E = 4, T = 3, K = 2, H = 512, G = H / 128 };
  const int n[R] = {3, 2};
  static const int64_t topk0[T * K] = {0, 3, 2, -1, 1, 2};
  static const int64_t topk1[T * K] = {3, 1, -1, 0};
  const int64_t* topk[R] = {topk0, topk1};
  static uint16_t x[R][T * H];
  uint32_t seed = 12345;
  for (int s = 0; s < R; ++s)
    for (int i = 0; i < T * H; ++i) {
      seed = seed * 1664525u + 1013904223u;
      int group = (i % H) / 128;
      /* Magnitudes differ per group so the scales differ. */
      x[s][i] = bf(((float)(seed >> 9) / (float)(1u << 23) - 0.5f) * ldexpf(1.0f, 3 * group - 4));
    }
  const uint16_t* xp[R] = {x[0], x[1]};
  ep_ref_ll_world_t w = {R, E, K, H, T, n, xp, topk, NULL};

  for (int mode = 0; mode < 3; ++mode) { /* plain fp8, round_scale, round_scale + ue8m0 */
    const int round_scale = mode >= 1, ue8m0 = mode == 2;
    ep_ref_ll_dispatch_t d;
    CHECK_EQ_INT(ep_ref_ll_dispatch(&w, 1, round_scale, ue8m0, &d), 0, "ll fp8 dispatch");
    if (!d.recv) continue;
    for (int dst = 0; dst < R; ++dst) {
      const ep_ref_ll_recv_t* r = &d.recv[dst];
      CHECK(r->x == NULL && r->x_fp8 && r->scales, "fp8 arrays");
      CHECK((r->scales_ue8m0 != NULL) == ue8m0, "ue8m0 array present iff asked");
      if (!r->x_fp8 || !r->scales) continue;
      for (int i = 0; i < r->num_rows; ++i) {
        const uint16_t* src = x[r->src_rank[i]] + r->src_idx[i] * H;
        const uint8_t* q = r->x_fp8 + (size_t)i * H;
        const float* sc = r->scales + (size_t)i * G;
        uint8_t want_q[H];
        float want_sc[G];
        ep_ref_cast_row_fp8(src, H, round_scale, want_q, want_sc);
        CHECK(memcmp(q, want_q, H) == 0, "rank %d row %d: fp8 differs from the cast", dst, i);
        CHECK(memcmp(sc, want_sc, sizeof want_sc) == 0, "rank %d row %d: scales differ", dst, i);
        for (int g = 0; g < G; ++g) {
          int e2;
          if (round_scale) CHECK(frexpf(sc[g], &e2) == 0.5f, "scale %g is not a power of two", sc[g]);
          /* Dequantised values are within one e4m3 step (2^-3 relative, 2^-9 absolute units) of x. */
          for (int c = g * 128; c < (g + 1) * 128; ++c) {
            float xv = unbf(src[c]), back = ep_ref_e4m3_to_f32(q[c]) * sc[g];
            float tol = fmaxf(fabsf(xv) * 0x1p-3f, 0x1p-9f * sc[g]);
            CHECK(fabsf(back - xv) <= tol, "rank %d row %d ch %d: %g dequantises to %g", dst, i, c, xv, back);
          }
        }
        if (ue8m0 && r->scales_ue8m0)
          CHECK(r->scales_ue8m0[i] == ep_ref_pack_ue8m0(sc), "rank %d row %d: ue8m0", dst, i);
      }
    }
    ep_ref_ll_dispatch_free(&d);
  }
  ep_ref_ll_dispatch_t d;
  CHECK_EQ_INT(ep_ref_ll_dispatch(&w, 1, 0, 1, &d), -1, "ue8m0 needs round_scale");
  w.hidden = 256;
  CHECK_EQ_INT(ep_ref_ll_dispatch(&w, 1, 1, 1, &d), -1, "ue8m0 needs hidden % 512 == 0");
  w.hidden = 100;
  CHECK_EQ_INT(ep_ref_ll_dispatch(&w, 1, 0, 0, &d), -1, "fp8 needs hidden % 128 == 0");
}

/* ================================================================================================
 * Random worlds: invariants that must hold whatever the routing.
 * ============================================================================================== */

static uint32_t rng_state;
static int rnd(int n) {
  rng_state = rng_state * 1664525u + 1013904223u;
  return (int)((rng_state >> 8) % (uint32_t)n);
}

static void test_random_worlds(void) {
  enum { R = 4, RPN = 2, E = 16, K = 4, H = 8, TMAX = 12 };
  for (int seed = 1; seed <= 20; ++seed) {
    rng_state = (uint32_t)seed;
    int n[R];
    static int64_t topk[R][TMAX * K];
    static float wt[R][TMAX * K];
    static uint16_t x[R][TMAX * H];
    const int64_t* topk_p[R];
    const float* wt_p[R];
    const void* x_p[R];
    const uint16_t* x16_p[R];
    for (int s = 0; s < R; ++s) {
      n[s] = rnd(TMAX + 1);
      for (int i = 0; i < n[s] * K; ++i) {
        topk[s][i] = rnd(5) == 0 ? -1 : rnd(E); /* repeats happen too */
        wt[s][i] = (float)(rnd(8) + 1) * 0.125f;
      }
      for (int i = 0; i < n[s] * H; ++i) x[s][i] = bf((float)(rnd(16) - 8));
      topk_p[s] = topk[s];
      wt_p[s] = wt[s];
      x_p[s] = x[s];
      x16_p[s] = x[s];
    }
    ep_ref_world_t w = {0};
    w.num_ranks = R;
    w.ranks_per_node = RPN;
    w.num_experts = E;
    w.num_topk = K;
    w.num_tokens = n;
    w.x = x_p;
    w.row_bytes = H * sizeof(uint16_t);
    w.topk_idx = topk_p;
    w.topk_weights = wt_p;
    ep_ref_dispatch_t d;
    CHECK_EQ_INT(ep_ref_dispatch(&w, 1, &d), 0, "random dispatch");
    if (!d.recv) continue;

    /* Fan-out of each token and the per-expert receive counts, by brute force. */
    static int fanout[R][TMAX];
    int want_per_expert[E] = {0};
    for (int s = 0; s < R; ++s)
      for (int t = 0; t < n[s]; ++t) {
        int to[R] = {0};
        int64_t seen[K];
        int num_seen = 0;
        for (int k = 0; k < K; ++k) {
          int64_t e = topk[s][t * K + k];
          if (e < 0) continue;
          to[e / (E / R)] = 1;
          int dup = 0;
          for (int j = 0; j < num_seen; ++j) dup |= seen[j] == e;
          if (!dup) {
            seen[num_seen++] = e;
            want_per_expert[e]++;
          }
        }
        fanout[s][t] = to[0] + to[1] + to[2] + to[3];
        for (int dst = 0; dst < R; ++dst)
          CHECK((ep_ref_dispatch_row(&d, s, t, dst) >= 0) == to[dst], "seed %d: routing of (%d,%d) to %d",
                seed, s, t, dst);
      }
    int recv_rows[R];
    CHECK_EQ_INT(ep_ref_internode_counts(&w, NULL, NULL, recv_rows), 0, "random internode");
    for (int dst = 0; dst < R; ++dst) {
      const ep_ref_recv_t* r = &d.recv[dst];
      CHECK_EQ_INT(r->num_recv, d.rank_prefix_matrix[(R - 1) * R + dst], "num_recv vs prefix matrix");
      CHECK_EQ_INT(r->num_recv, recv_rows[dst], "num_recv vs internode count");
      for (int e = 0; e < E / R; ++e)
        CHECK_EQ_INT(r->num_recv_tokens_per_expert[e], want_per_expert[dst * (E / R) + e],
                     "per expert count");
      for (int i = 0; i < r->num_recv; ++i) {
        CHECK_EQ_INT(ep_ref_dispatch_row(&d, r->src_rank[i], r->src_idx[i], dst), i, "row map round trip");
        if (i > 0)
          CHECK(r->src_rank[i - 1] < r->src_rank[i] ||
                    (r->src_rank[i - 1] == r->src_rank[i] && r->src_idx[i - 1] < r->src_idx[i]),
                "seed %d rank %d rows %d,%d out of order", seed, dst, i - 1, i);
      }
    }

    /* Combine of identity experts: x times the fan-out; weights come back where valid. */
    static uint16_t out[R][TMAX * H];
    static float out_w[R][TMAX * K];
    uint16_t* out_p[R];
    float* out_w_p[R];
    const uint16_t* y[R];
    const float* rw[R];
    for (int r = 0; r < R; ++r) {
      out_p[r] = out[r];
      out_w_p[r] = out_w[r];
      y[r] = (const uint16_t*)d.recv[r].x;
      rw[r] = d.recv[r].topk_weights;
    }
    CHECK_EQ_INT(ep_ref_combine(&d, H, y, rw, NULL, NULL, out_p, out_w_p), 0, "random combine");
    for (int s = 0; s < R; ++s)
      for (int t = 0; t < n[s]; ++t) {
        for (int c = 0; c < H; ++c)
          CHECK(unbf(out[s][t * H + c]) == unbf(x[s][t * H + c]) * (float)fanout[s][t],
                "seed %d: combine (%d,%d) ch %d", seed, s, t, c);
        for (int k = 0; k < K; ++k)
          CHECK(out_w[s][t * K + k] == (topk[s][t * K + k] >= 0 ? wt[s][t * K + k] : 0.0f),
                "seed %d: combined weight (%d,%d,%d)", seed, s, t, k);
      }
    ep_ref_dispatch_free(&d);

    /* Low-latency: every (token, distinct expert) pair lands exactly once, and both combine forms
     * agree. */
    ep_ref_ll_world_t lw = {R, E, K, H, TMAX, n, x16_p, topk_p, wt_p};
    ep_ref_ll_dispatch_t ld;
    CHECK_EQ_INT(ep_ref_ll_dispatch(&lw, 0, 0, 0, &ld), 0, "random ll dispatch");
    if (!ld.recv) continue;
    for (int dst = 0; dst < R; ++dst) {
      const ep_ref_ll_recv_t* r = &ld.recv[dst];
      for (int e = 0; e < E / R; ++e) {
        CHECK_EQ_INT(r->count[e], want_per_expert[dst * (E / R) + e], "ll count");
        int sum = 0;
        for (int s = 0; s < R; ++s) {
          CHECK_EQ_INT(r->range_begin[e * R + s], sum, "ll range begin");
          sum += r->range_count[e * R + s];
        }
        CHECK_EQ_INT(sum, r->count[e], "ll ranges cover the expert");
      }
      /* One destination's lists alone: the same as in the whole dispatch, the other ranks' empty. */
      ep_ref_ll_dispatch_t one;
      CHECK_EQ_INT(ep_ref_ll_dispatch_to(&lw, dst, 0, 0, 0, &one), 0, "ll dispatch to one rank");
      if (!one.recv) continue;
      const ep_ref_ll_recv_t* o = &one.recv[dst];
      CHECK_EQ_INT(o->num_rows, r->num_rows, "ll dispatch to one rank: rows");
      CHECK(memcmp(o->count, r->count, sizeof(int) * (size_t)(E / R)) == 0 &&
                memcmp(o->range_count, r->range_count, sizeof(int) * (size_t)E) == 0 &&
                memcmp(o->src_rank, r->src_rank, sizeof(int) * (size_t)r->num_rows) == 0 &&
                memcmp(o->src_idx, r->src_idx, sizeof(int) * (size_t)r->num_rows) == 0 &&
                memcmp(o->x, r->x, sizeof(uint16_t) * (size_t)r->num_rows * H) == 0,
            "seed %d: ll dispatch to rank %d differs from the whole dispatch", seed, dst);
      for (int other = 0; other < R; ++other)
        CHECK(other == dst || (!one.recv[other].count && !one.recv[other].x), "ll dispatch to one rank: rank %d",
              other);
      for (int s = 0; s < R; ++s)
        for (int i = 0; i < n[s] * K; ++i) {
          const int e = (int)topk[s][i];
          CHECK_EQ_INT(one.token_row[s][i], e >= 0 && e / (E / R) == dst ? ld.token_row[s][i] : -1,
                       "ll dispatch to one rank: token_row");
        }
      ep_ref_ll_dispatch_free(&one);
    }
    static uint16_t out_f[R][TMAX * H];
    uint16_t* out_f_p[R];
    uint16_t* ybuf[R];
    for (int r = 0; r < R; ++r) {
      out_f_p[r] = out_f[r];
      ybuf[r] = calloc((size_t)(E / R) * R * TMAX * H, sizeof(uint16_t));
      y[r] = ybuf[r];
    }
    for (int mode = 0; mode < 2; ++mode) {
      expert_ctx_t ctx = {x16_p, E / R, mode};
      CHECK_EQ_INT(ep_ref_ll_fill_expert_outputs(&ld, expert_fn, &ctx, ybuf), 0, "random fill");
      CHECK_EQ_INT(ep_ref_ll_combine(&lw, &ld, y, out_p), 0, "random ll combine");
      CHECK_EQ_INT(ep_ref_ll_combine_fn(&lw, expert_fn, &ctx, out_f_p), 0, "random ll combine fn");
      for (int s = 0; s < R; ++s)
        for (int t = 0; t < n[s]; ++t) {
          float wsum = 0.0f; /* identity experts: out = x * sum of the valid weights (all exact) */
          for (int k = 0; k < K; ++k) wsum += topk[s][t * K + k] >= 0 ? wt[s][t * K + k] : 0.0f;
          for (int c = 0; c < H; ++c) {
            int i = t * H + c;
            CHECK(out_f[s][i] == out[s][i], "seed %d mode %d: ll combine forms differ at (%d,%d) ch %d", seed,
                  mode, s, t, c);
            if (mode == 0)
              CHECK(unbf(out[s][i]) == unbf(bf(wsum * unbf(x[s][i]))), "seed %d: ll combine (%d,%d) ch %d",
                    seed, s, t, c);
          }
        }
      /* One source rank's output alone (the others NULL): the same rows as in the whole combine. */
      static uint16_t out_one[TMAX * H];
      uint16_t* one_p[R];
      for (int r = 0; r < R; ++r) one_p[r] = r == seed % R ? out_one : NULL;
      CHECK_EQ_INT(ep_ref_ll_combine_fn(&lw, expert_fn, &ctx, one_p), 0, "ll combine fn, one rank");
      CHECK(memcmp(out_one, out_f[seed % R], sizeof(uint16_t) * (size_t)n[seed % R] * H) == 0,
            "seed %d: ll combine fn of rank %d alone differs", seed, seed % R);
    }
    for (int r = 0; r < R; ++r) free(ybuf[r]);
    ep_ref_ll_dispatch_free(&ld);
  }
}

/* ================================================================================================
 * 7b. LogFMT-10: one group by hand, then DeepEP's accuracy bound on its test's data
 * ============================================================================================== */

static void test_logfmt_by_hand(void) {
  CHECK(ep_ref_logfmt_row_bytes(7168) == 7168 * 10 / 8 + 7168 / 128 * 4, "row bytes: DeepEP's count");
  uint16_t x[128] = {0};
  x[0] = bf(1.0f);
  x[1] = bf(0.5f);
  x[2] = bf(-0.25f);
  uint8_t row[164];
  ep_ref_logfmt_encode(x, 128, row);
  /* amax 1 (la 0), amin 0.25 (lb -2; the zeros do not count), step 2 / 510: codes
   * floor((l + 2) * 255 + 1.5) = 511, 256, 1. */
  const uint8_t meta[4] = {0x80, 0x3f, 0x80, 0x3e};
  expect_u8s("meta (bf16 amax | amin << 16)", row, meta, 4);
  const uint8_t low[4] = {0xff, 0x00, 0x01, 0x00};
  expect_u8s("low bytes of 511, 256, -1, 0", row + 4, low, 4);
  CHECK(row[4 + 128] == (1 | 1 << 2 | 2 << 4), "high bits of group 0: 0x%02x", row[4 + 128]);
  float back[128];
  ep_ref_logfmt_decode(row, 128, back);
  const float want[3] = {1.0f, 0.5f, -0.25f};
  for (int j = 0; j < 3; ++j) /* within half a step: 2^(1 / 510) - 1 */
    CHECK(fabsf(back[j] - want[j]) <= fabsf(want[j]) * 0.0014f, "decode %d: %g, want %g", j, back[j], want[j]);
  CHECK(back[3] == 0.0f && back[127] == 0.0f, "zeros decode to 0");
  for (int j = 0; j < 128; ++j) x[j] = bf(-3.0f); /* one magnitude: step 0, code 1 */
  ep_ref_logfmt_encode(x, 128, row);
  ep_ref_logfmt_decode(row, 128, back);
  CHECK(fabsf(back[5] + 3.0f) <= 3.0f * 4e-6f, "a constant group decodes to itself: %.9g", back[5]);
}

/* The kernels' LogFMT helpers (src/kernels/ll_logfmt.h, compiled here as C) against the reference: the same log2
 * table, and the same fields and values, bit for bit, on groups of every kind (zeros, one magnitude, subnormals,
 * wide and narrow ranges). */
static void test_logfmt_kernel_helpers(void) {
  for (int m = 0; m < 128; ++m)
    CHECK(ep_logfmt_log2_mantissa[m] == ep_ref_logfmt_log2((uint16_t)(0x3f80 | m)), "log2 table entry %d: %.9g vs %.9g",
          m, ep_logfmt_log2_mantissa[m], ep_ref_logfmt_log2((uint16_t)(0x3f80 | m)));
  uint64_t seed = 0x5eed1234ull;
  uint16_t x[128];
  uint8_t row[164];
  float back[128];
  long mismatches = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const int kind = trial % 5;
    for (int j = 0; j < 128; ++j) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      const uint16_t r = (uint16_t)(seed >> 40);
      x[j] = kind == 0   ? 0
             : kind == 1 ? (uint16_t)(0x4040 | (r & 0x8000))
             : kind == 2 ? (uint16_t)(r & 0x807f)
             : kind == 3 ? r
                         : (uint16_t)((r & 0x80ff) | 0x3c00);
    }
    ep_ref_logfmt_encode(x, 128, row);
    ep_ref_logfmt_decode(row, 128, back);
    uint32_t meta;
    memcpy(&meta, row, 4);
    float lb, step;
    ep_logfmt_grid(meta, &lb, &step);
    for (int j = 0; j < 128; ++j) {
      const uint32_t field = row[4 + j] | ((row[4 + 128 + j / 4] >> (2 * (j % 4))) & 3u) << 8;
      const int nan = (x[j] & 0x7f80) == 0x7f80;
      if (nan) continue;
      const uint32_t mine = ep_logfmt_field(x[j], lb, step, 1.0f / step);
      const float value = ep_logfmt_value(field, lb, step);
      if ((mine != field || memcmp(&value, &back[j], 4) != 0) && mismatches++ < 5)
        fprintf(stderr, "trial %d j %d: field %u vs %u, value %.9g vs %.9g\n", trial, j, mine, field, value, back[j]);
    }
  }
  CHECK(mismatches == 0, "kernel helpers differ from the reference in %ld values", mismatches);
}

/* A normal deviate from a 64-bit LCG (Box-Muller). */
static double lcg_normal(uint64_t* s) {
  *s = *s * 6364136223846793005ull + 1442695040888963407ull;
  const double u1 = ((*s >> 11) + 1.0) / 9007199254740993.0;
  *s = *s * 6364136223846793005ull + 1442695040888963407ull;
  const double u2 = (double)(*s >> 11) / 9007199254740992.0;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* DeepEP's calc_diff: 1 - 2 sum((a+1)(b+1)) / sum((a+1)^2 + (b+1)^2). */
static double calc_diff(const uint16_t* a, const uint16_t* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double x = unbf(a[i]) + 1.0, y = unbf(b[i]) + 1.0;
    num += x * y;
    den += x * x + y * y;
  }
  return 1.0 - 2.0 * num / den;
}

typedef struct {
  const uint16_t* const* x;
} same_fn_ctx_t;

static void same_row_fn(void* ctx, int dst_rank, int local_expert, int src_rank, int src_token, int hidden,
                        uint16_t* y_row) {
  (void)dst_rank, (void)local_expert;
  const same_fn_ctx_t* c = ctx;
  memcpy(y_row, c->x[src_rank] + (size_t)src_token * hidden, sizeof(uint16_t) * (size_t)hidden);
}

/* test_low_latency.py's LogFMT data (a constant row per rank with the token index in its last 128 channels,
 * N(0, 1) * 0.5 * U(0, 1), N(0, 1) * 0.1), every expert returning its input, |N(0, 1)| weights, top-8 of 32
 * experts at 2 ranks: the LogFMT combine within its bound of the BF16 one (calc_diff < 1e-5, BF16 dispatch). */
static void test_logfmt_deepep_bound(void) {
  enum { R = 2, E = 32, K = 8, H = 1024, T = 48 };
  uint64_t seed = 0x10f3a7ull;
  static uint16_t x[R][T * H];
  static int64_t idx[R][T * K];
  static float w[R][T * K];
  static uint16_t got[R][T * H], want[R][T * H];
  int n[R];
  const uint16_t* xp[R];
  const int64_t* ip[R];
  const float* wp[R];
  uint16_t *gp[R], *wantp[R];
  for (int kind = 0; kind < 3; ++kind) {
    const double scale = kind == 1 ? 0.5 : 0.1; /* 0.5 * U(0, 1) at its largest */
    for (int s = 0; s < R; ++s) {
      n[s] = T;
      xp[s] = x[s], ip[s] = idx[s], wp[s] = w[s], gp[s] = got[s], wantp[s] = want[s];
      for (int t = 0; t < T; ++t) {
        for (int c = 0; c < H; ++c) {
          const float v = kind == 0 ? (c >= H - 128 ? (float)t : (float)(s - 128)) : (float)(lcg_normal(&seed) * scale);
          x[s][t * H + c] = bf(v);
        }
        for (int k = 0; k < K; ++k) { /* K distinct experts */
          idx[s][t * K + k] = (t * 7 + k * 4 + s) % E;
          w[s][t * K + k] = (float)fabs(lcg_normal(&seed));
        }
      }
    }
    ep_ref_ll_world_t world = {R, E, K, H, T, n, xp, ip, wp};
    same_fn_ctx_t ctx = {xp};
    CHECK_EQ_INT(ep_ref_ll_combine_fn(&world, same_row_fn, &ctx, wantp), 0, "bf16 combine");
    CHECK_EQ_INT(ep_ref_ll_combine_logfmt_fn(&world, same_row_fn, &ctx, gp), 0, "LogFMT combine");
    double worst = 0;
    for (int s = 0; s < R; ++s) {
      const double d = calc_diff(want[s], got[s], (size_t)T * H);
      if (d > worst) worst = d;
    }
    CHECK(worst < 1e-5, "LogFMT data kind %d: calc_diff %.3g, DeepEP's bound 1e-5", kind, worst);
    printf("LogFMT-10 combine, DeepEP test data kind %d: calc_diff %.3g (bound 1e-5)\n", kind, worst);
  }
}

int main(void) {
  test_bf16();
  test_e4m3();
  test_cast_fp8();
  test_ue8m0();
  test_layout_case_a();
  test_bad_index();
  test_dispatch_case_a();
  test_combine_case_a();
  test_combine_order();
  test_nodes_case_b();
  test_routing_override();
  test_routing_override_expert_counts();
  test_ll_dispatch();
  test_ll_combine();
  test_ll_combine_fma();
  test_ll_fp8();
  test_logfmt_by_hand();
  test_logfmt_kernel_helpers();
  test_logfmt_deepep_bound();
  test_random_worlds();
  if (g_check_failures) fprintf(stderr, "%d check(s) failed\n", g_check_failures);
  return TEST_RESULT();
}
