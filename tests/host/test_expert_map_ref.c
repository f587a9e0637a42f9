/* CPU test of the expert map's reference (tests/ref/ep_ref_expert_map.c): the picks below are worked out by hand
 * from the map, so a wrong reference fails here before it can mislead test_expert_map on the GPU. */
#include <stdint.h>
#include <string.h>

#include "common/check.h"
#include "ep_ref_expert_map.h"

/* 4 ranks, 8 slots (rank r holds slots 2r and 2r + 1), 6 logical experts of up to 2 copies. */
enum { R = 4, E = 8, L = 6, C = 2, N = 2, K = 4 };
static const int32_t k_slots[L * C] = {
    0,  6,  /* l0: ranks 0 and 3 */
    1,  -1, /* l1: rank 0 only */
    -1, 7,  /* l2: rank 3 only, padding first */
    2,  4,  /* l3: ranks 1 and 2 */
    3,  5,  /* l4: ranks 1 and 2 */
    -1, -1, /* l5: no copy */
};
static const int64_t k_logical[N * K] = {0, 1, 2, -1, 0, 3, 5, 4};

static void expect_map(const char* what, int rank, const int32_t* mask, const int64_t* want) {
  int64_t got[N * K];
  long bad = -1;
  CHECK(ep_ref_map_experts(k_slots, L, C, E, R, rank, mask, k_logical, got, N, K, &bad) == 0, "%s: rejected", what);
  CHECK(bad == 0, "%s: %ld bad values", what, bad);
  for (int i = 0; i < N * K; ++i)
    CHECK(got[i] == want[i], "%s: pick %d (token %d): got %lld, want %lld", what, i, i / K, (long long)got[i],
          (long long)want[i]);
}

static void test_by_hand(void) {
  /* No mask, rank 1: token t takes copy (t + 1) % live. */
  const int64_t plain[N * K] = {6, 1, 7, -1, 0, 2, -1, 3};
  expect_map("no mask, rank 1", 1, NULL, plain);
  const int32_t none[R] = {0, 0, 0, 0};
  expect_map("an empty mask, rank 1", 1, none, plain);
  /* Rank 0 shifts every choice by one: token 0 now takes copy 0 of two, token 1 copy 1. */
  const int64_t rank0[N * K] = {0, 1, 7, -1, 6, 4, -1, 5};
  expect_map("no mask, rank 0", 0, NULL, rank0);
  /* Rank 3 masked, seen from rank 1: l0 keeps its copy on rank 0, l2 (rank 3 only) is lost. */
  const int32_t m3[R] = {0, 0, 0, 1};
  const int64_t masked3[N * K] = {0, 1, -1, -1, 0, 2, -1, 3};
  expect_map("rank 3 masked, rank 1", 1, m3, masked3);
  /* The masked rank itself exchanges with nobody: only its own copies are live. */
  const int64_t self3[N * K] = {6, -1, 7, -1, 6, -1, -1, -1};
  expect_map("rank 3 masked, rank 3", 3, m3, self3);
  /* Rank 1 masked by hand, seen from rank 1: its own slots 2 and 3 only. */
  const int32_t m1[R] = {0, 1, 0, 0};
  const int64_t self1[N * K] = {-1, -1, -1, -1, -1, 2, -1, 3};
  expect_map("rank 1 masked, rank 1", 1, m1, self1);
}

static void test_bad_values_and_in_place(void) {
  int32_t slots[L * C];
  memcpy(slots, k_slots, sizeof(slots));
  slots[2 * C + 0] = E; /* l2's first column: outside [-1, E), skipped */
  int64_t io[N * K];
  memcpy(io, k_logical, sizeof(io));
  io[3] = L; /* outside [-1, L): mapped to -1 */
  long bad = 0;
  CHECK(ep_ref_map_experts(slots, L, C, E, R, 1, NULL, io, io, N, K, &bad) == 0, "in place: rejected");
  const int64_t want[N * K] = {6, 1, 7, -1, 0, 2, -1, 3};
  for (int i = 0; i < N * K; ++i)
    CHECK(io[i] == want[i], "in place: pick %d: got %lld, want %lld", i, (long long)io[i], (long long)want[i]);
  CHECK(bad == 2, "bad values: %ld, want 2 (the logical index and the slot)", bad);
  CHECK(ep_ref_map_experts(slots, L, C, 6, R, 1, NULL, io, io, N, K, NULL) == -1, "6 slots on 4 ranks accepted");
}

/* Spread: with every copy live, a logical expert's picks over many tokens split evenly between its copies. */
static void test_spread(void) {
  enum { T = 1000 };
  static int64_t logical[T], physical[T];
  for (int t = 0; t < T; ++t) logical[t] = 3; /* l3: slots 2 and 4 */
  CHECK(ep_ref_map_experts(k_slots, L, C, E, R, 2, NULL, logical, physical, T, 1, NULL) == 0, "spread: rejected");
  int on2 = 0, on4 = 0;
  for (int t = 0; t < T; ++t) {
    on2 += physical[t] == 2;
    on4 += physical[t] == 4;
  }
  CHECK(on2 == T / 2 && on4 == T / 2, "spread: %d picks on slot 2 and %d on slot 4, want %d each", on2, on4, T / 2);
}

int main(void) {
  test_by_hand();
  test_bad_values_and_in_place();
  test_spread();
  printf("test_expert_map_ref: %d failed checks\n", g_check_failures);
  return TEST_RESULT();
}
