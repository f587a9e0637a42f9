/* test_normal_region: the normal region in a byte pool (config.normal_region_bytes): how many tokens a round holds
 * (ep_normal_region_pool, src/kernels/normal_region.h; on several nodes ep_internode_regions, both regions in one
 * pool), the rounds a handle is sized for, the handle's round arrays, ep_group_create's checks of the pool and
 * ep_normal_region_size_hint.
 * Runs without a GPU. */
#include <stdio.h>
#include <string.h>

#include "common/check.h"
#include "core/internal.h"
#include "kernels/internode_region.h"

/* The pool's T is the largest whose region fits: T fits, T + 1 does not (unless T is the call's whole size). */
static void check_pool(int R, int E, size_t bytes, int call_tokens, int hidden, int topk) {
  const ep_normal_region_t l = ep_normal_region_pool(R, E, bytes, call_tokens, hidden, topk);
  const int T = l.max_tokens;
  CHECK(T >= 0 && T <= call_tokens, "R %d, %zu bytes: T = %d out of [0, %d]", R, bytes, T, call_tokens);
  CHECK(l.call_tokens == call_tokens, "call_tokens %d, want %d", l.call_tokens, call_tokens);
  if (T > 0) {
    CHECK(l.total_bytes <= bytes, "R %d, T %d: the region takes %zu of %zu bytes", R, T, l.total_bytes, bytes);
    CHECK(l.max_rounds == (call_tokens + T - 1) / T, "R %d, T %d: max_rounds %d", R, T, l.max_rounds);
    CHECK(l.total_bytes == ep_normal_region(R, E, T, hidden, topk).total_bytes, "R %d, T %d: not the plain layout", R,
          T);
  }
  if (T < call_tokens)
    CHECK(ep_normal_region(R, E, T + 1, hidden, topk).total_bytes > bytes, "R %d, %zu bytes: T %d + 1 also fits", R,
          bytes, T);
}

static void test_pool_capacity(void) {
  const int ranks[] = {1, 2, 4, 8};
  for (size_t i = 0; i < sizeof(ranks) / sizeof(ranks[0]); ++i) {
    const int R = ranks[i], E = 32 * R;
    for (int T = 1; T <= 300; T += 7) {
      const size_t exact = ep_normal_region(R, E, T, 7168, 8).total_bytes;
      check_pool(R, E, exact, 4096, 7168, 8);
      CHECK(ep_normal_region_pool(R, E, exact, 4096, 7168, 8).max_tokens == T, "R %d: %zu bytes hold T %d", R, exact,
            T);
      check_pool(R, E, exact - 1, 4096, 7168, 8);
      check_pool(R, E, exact + 100000, 4096, 2048, 4);
    }
    /* A pool larger than the whole call: one round, and only the bytes the call needs. */
    const ep_normal_region_t big = ep_normal_region_pool(R, E, (size_t)1 << 40, 4096, 7168, 8);
    CHECK(big.max_tokens == 4096 && big.max_rounds == 1, "R %d: a huge pool gives T %d, %d rounds", R, big.max_tokens,
          big.max_rounds);
    CHECK(big.total_bytes == ep_normal_region(R, E, 4096, 7168, 8).total_bytes, "R %d: a huge pool is used whole", R);
    /* Too small for one token. */
    const ep_normal_region_t none = ep_normal_region_pool(R, E, 1024, 4096, 7168, 8);
    CHECK(none.max_tokens == 0 && none.max_rounds == 0, "R %d: 1 KiB holds %d tokens", R, none.max_tokens);
  }
}

/* The handle of a pooled group holds every token of the largest call and one round table per round. */
static void test_handle_rounds(void) {
  const ep_normal_region_t l =
      ep_normal_region_pool(4, 128, ep_normal_region(4, 128, 40, 7168, 8).total_bytes, 4096, 7168, 8);
  CHECK(l.max_tokens == 40 && l.max_rounds == 103, "T %d, %d rounds", l.max_tokens, l.max_rounds);
  static char memory[1 << 20];
  ep_normal_handle_view_t v;
  const size_t bytes = ep_normal_handle_carve(&l, 1, 4, memory, &v);
  CHECK(bytes <= sizeof(memory), "handle of %zu bytes", bytes);
  CHECK(v.round_rows && v.num_rounds && v.recv_taken && !v.recv_slot, "one node: round arrays, no internode arrays");
  CHECK((char*)v.recv_src - (char*)v.send_pos >= (ptrdiff_t)(4096 * 4 * sizeof(int)), "send_pos holds 4096 tokens");
  CHECK((size_t)((char*)memory + bytes - (char*)v.round_rows) >= 103 * (2 * 4 + 1) * sizeof(int),
        "round_rows holds 103 rounds");
  const ep_normal_region_t plain = ep_normal_region(4, 128, 4096, 7168, 8);
  CHECK(plain.max_rounds == 1 && plain.call_tokens == 4096, "hints: %d rounds of %d", plain.max_rounds,
        plain.call_tokens);
}

/* Several nodes: the pool holds both regions for the same T, the largest that fits (T + 1 does not); without a pool
 * T is the call's whole size (at most EP_INTERNODE_MAX_TOKENS_PER_RANK); too small a pool holds no token. */
static size_t both_regions(int R, int P, int E, int T, int hidden, int topk) {
  return ep_normal_region(R, E, T, hidden, topk).total_bytes +
         ep_internode_region(R, P, E, T, hidden, topk).total_bytes;
}

static void test_internode_pool(void) {
  const int shapes[][2] = {{2, 1}, {4, 2}, {8, 4}, {16, 8}, {24, 1}};
  for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); ++i) {
    const int R = shapes[i][0], P = shapes[i][1], E = 8 * R;
    for (int T = 1; T <= 300; T += 11) {
      const size_t exact = both_regions(R, P, E, T, 7168, 8);
      const ep_internode_regions_t r = ep_internode_regions(R, P, E, exact, 4096, 7168, 8);
      CHECK(r.normal.max_tokens == T && r.inter.max_tokens == T, "R %d P %d: %zu bytes hold T %d / %d, want %d", R, P,
            exact, r.normal.max_tokens, r.inter.max_tokens, T);
      CHECK(r.normal.call_tokens == 4096 && r.normal.max_rounds == (4096 + T - 1) / T, "R %d, T %d: %d rounds of %d", R,
            T, r.normal.max_rounds, r.normal.call_tokens);
      CHECK(r.normal.total_bytes + r.inter.total_bytes == exact, "R %d, T %d: the regions take %zu of %zu bytes", R, T,
            r.normal.total_bytes + r.inter.total_bytes, exact);
      const ep_internode_regions_t less = ep_internode_regions(R, P, E, exact - 1, 4096, 7168, 8);
      CHECK(less.normal.max_tokens == T - 1, "R %d: %zu bytes hold T %d, want %d", R, exact - 1, less.normal.max_tokens,
            T - 1);
      /* The intranode region alone for T is not enough: the internode one counts too. */
      const ep_internode_regions_t intra_only =
          ep_internode_regions(R, P, E, ep_normal_region(R, E, T, 7168, 8).total_bytes, 4096, 7168, 8);
      CHECK(intra_only.normal.max_tokens < T, "R %d: the intranode region's bytes hold T %d of both", R,
            intra_only.normal.max_tokens);
    }
    const ep_internode_regions_t hints = ep_internode_regions(R, P, E, 0, 4096, 7168, 8);
    CHECK(hints.normal.max_tokens == 4096 && hints.normal.max_rounds == 1 && hints.inter.max_tokens == 4096,
          "R %d: no pool: T %d, %d rounds", R, hints.normal.max_tokens, hints.normal.max_rounds);
    CHECK(hints.inter.total_bytes == ep_internode_region(R, P, E, 4096, 7168, 8).total_bytes,
          "R %d: no pool: not the hints' internode region", R);
    const ep_internode_regions_t none = ep_internode_regions(R, P, E, 1024, 4096, 7168, 8);
    CHECK(none.normal.max_tokens == 0 && none.normal.max_rounds == 0, "R %d: 1 KiB holds %d tokens", R,
          none.normal.max_tokens);
  }
  /* A slot word packs the token index within its round: T stops at EP_INTERNODE_MAX_TOKENS_PER_RANK, and calls of
   * more run in rounds of it. */
  const int big = EP_INTERNODE_MAX_TOKENS_PER_RANK + 5;
  const ep_internode_regions_t clamp = ep_internode_regions(4, 2, 8, 0, big, 128, 1);
  CHECK(clamp.normal.max_tokens == EP_INTERNODE_MAX_TOKENS_PER_RANK && clamp.normal.max_rounds == 2,
        "a call of %d tokens: T %d, %d rounds", big, clamp.normal.max_tokens, clamp.normal.max_rounds);
}

/* The handle on several nodes: the internode arrays hold every token of the largest call, and a count table per
 * round and node (node_count, fwd_count), a base per round and local rank (send_base). */
static void test_internode_handle(void) {
  const int R = 8, P = 4, N = 2, E = 64;
  const ep_internode_regions_t r = ep_internode_regions(R, P, E, both_regions(R, P, E, 64, 7168, 8), 4096, 7168, 8);
  CHECK(r.normal.max_tokens == 64 && r.normal.max_rounds == 64, "T %d, %d rounds", r.normal.max_tokens,
        r.normal.max_rounds);
  static char memory[4 << 20];
  ep_normal_handle_view_t v;
  const size_t bytes = ep_normal_handle_carve(&r.normal, N, P, memory, &v);
  CHECK(bytes <= sizeof(memory), "handle of %zu bytes", bytes);
  CHECK(v.recv_slot && v.send_slot && v.node_tokens && v.node_count && v.fwd_count && v.fwd_row && v.send_base &&
            v.round_counts && v.round_drop,
        "several nodes: every internode array");
  CHECK((char*)v.send_slot - (char*)v.recv_slot >= (ptrdiff_t)(R * 4096 * sizeof(int)), "recv_slot holds 4096 rows");
  CHECK((char*)v.fwd_count - (char*)v.node_count >= (ptrdiff_t)(64 * 2 * N * sizeof(int)),
        "node_count holds 64 rounds");
  CHECK((char*)v.fwd_row - (char*)v.fwd_count >= (ptrdiff_t)(64 * 2 * N * sizeof(int)), "fwd_count holds 64 rounds");
  CHECK((char*)v.send_base - (char*)v.fwd_row >= (ptrdiff_t)(N * 4096 * P * sizeof(int)), "fwd_row holds 4096 slots");
  CHECK((char*)v.round_counts - (char*)v.send_base >= (ptrdiff_t)(64 * P * sizeof(int)), "send_base holds 64 rounds");
  CHECK((size_t)((char*)memory + bytes - (char*)v.round_drop) >= R * sizeof(int), "round_drop holds R ranks");
}

#define EXPECT_FAIL(call, want, needle)                                                                    \
  do {                                                                                                     \
    ep_status_t st_ = (call);                                                                              \
    CHECK(st_ == (want), "%s returned %s, want %s", #call, ep_status_string(st_), ep_status_string(want)); \
    CHECK(strstr(ep_last_error(NULL), (needle)) != NULL, "%s: message \"%s\" lacks \"%s\"", #call,         \
          ep_last_error(NULL), (needle));                                                                  \
  } while (0)

static void test_create_checks(void) {
  ep_unique_id_t id;
  memset(&id, 0, sizeof(id));
  ep_group_t g = NULL;
  ep_group_config_t c = EP_GROUP_CONFIG_INIT;
  c.normal_region_bytes = 4096;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), EP_STATUS_INVALID_ARGUMENT,
              "config.normal_region_bytes is 4096; one token of hidden 7168 and top-k 8 among 4 ranks needs");
  /* Several nodes: one token of both regions. Enough for the intranode region alone is too little. */
  c.ranks_per_node = 2;
  c.normal_region_bytes = ep_normal_region(4, c.num_experts, 1, c.hidden, c.max_topk).total_bytes;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), EP_STATUS_INVALID_ARGUMENT,
              "among 4 ranks (both regions of several nodes) needs");
  /* A pool that holds them is taken (the create then fails later, here without a GPU, not on the pool). */
  c.normal_region_bytes = both_regions(4, 2, c.num_experts, 1, c.hidden, c.max_topk);
  const ep_status_t st = ep_group_create(&g, &id, 0, 4, 0, &c);
  CHECK(strstr(ep_last_error(NULL), "normal_region_bytes") == NULL, "a pool of one token on 2 nodes: %s: %s",
        ep_status_string(st), ep_last_error(NULL));
  CHECK(g == NULL, "group set on failure");
}

/* ep_normal_region_size_hint: the pool that holds T tokens a round holds T (and T - 1 tokens' pool less), on one
 * node and on several; bad shapes are refused naming the argument. */
static void test_size_hint(void) {
  const int shapes[][3] = {{1, 0, 8}, {8, 0, 256}, {8, 4, 256}, {16, 8, 256}, {6, 3, 12}};
  for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); ++i) {
    const int R = shapes[i][0], P = shapes[i][1], E = shapes[i][2];
    for (int T = 1; T <= 300; T += 99) {
      size_t bytes = 0, less = 0;
      CHECK(ep_normal_region_size_hint(T, 7168, R, P, E, 8, &bytes) == EP_STATUS_SUCCESS, "hint R %d P %d T %d: %s", R,
            P, T, ep_last_error(NULL));
      CHECK(T == 1 || ep_normal_region_size_hint(T - 1, 7168, R, P, E, 8, &less) == EP_STATUS_SUCCESS, "hint T - 1");
      const bool several = P > 0 && P < R;
      const int got = several ? ep_internode_regions(R, P, E, bytes, 65536, 7168, 8).normal.max_tokens
                              : ep_normal_region_pool(R, E, bytes, 65536, 7168, 8).max_tokens;
      CHECK(got >= T, "R %d P %d: the pool of the hint for %d tokens holds %d", R, P, T, got);
      CHECK(bytes == (several ? both_regions(R, P, E, T, 7168, 8) : ep_normal_region(R, E, T, 7168, 8).total_bytes),
            "R %d P %d T %d: the hint is the regions' bytes", R, P, T);
      CHECK(T == 1 || less < bytes, "R %d P %d: fewer tokens, fewer bytes", R, P);
    }
  }
  size_t b = 0;
  EXPECT_FAIL(ep_normal_region_size_hint(0, 7168, 8, 0, 256, 8, &b), EP_STATUS_INVALID_ARGUMENT,
              "tokens_per_round is 0");
  EXPECT_FAIL(ep_normal_region_size_hint(EP_INTERNODE_MAX_TOKENS_PER_RANK + 1, 7168, 8, 4, 256, 8, &b),
              EP_STATUS_INVALID_ARGUMENT, "on several nodes");
  EXPECT_FAIL(ep_normal_region_size_hint(64, 7168, 8, 3, 256, 8, &b), EP_STATUS_INVALID_ARGUMENT,
              "ranks_per_node is 3");
  EXPECT_FAIL(ep_normal_region_size_hint(64, 100, 8, 0, 256, 8, &b), EP_STATUS_INVALID_ARGUMENT, "hidden");
  EXPECT_FAIL(ep_normal_region_size_hint(64, 7168, 8, 0, 12, 8, &b), EP_STATUS_INVALID_ARGUMENT, "num_experts is 12");
  EXPECT_FAIL(ep_normal_region_size_hint(64, 7168, 8, 0, 256, 33, &b), EP_STATUS_INVALID_ARGUMENT, "max_topk is 33");
  EXPECT_FAIL(ep_normal_region_size_hint(64, 7168, 8, 0, 256, 8, NULL), EP_STATUS_INVALID_ARGUMENT, "bytes is NULL");
}

int main(void) {
  test_pool_capacity();
  test_handle_rounds();
  test_internode_pool();
  test_internode_handle();
  test_create_checks();
  test_size_hint();
  printf("test_normal_region: %d failed checks\n", g_check_failures);
  return TEST_RESULT();
}
