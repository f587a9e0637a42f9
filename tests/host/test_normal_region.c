/* test_normal_region: the normal region in a byte pool (config.normal_region_bytes): how many tokens a round holds
 * (ep_normal_region_pool, src/kernels/normal_region.h), the rounds a handle is sized for, the handle's round
 * arrays, and ep_group_create's checks of the pool. Runs without a GPU. */
#include <stdio.h>
#include <string.h>

#include "common/check.h"
#include "core/internal.h"

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
  c.normal_region_bytes = (size_t)1 << 30;
  c.ranks_per_node = 2;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), EP_STATUS_UNSUPPORTED,
              "config.normal_region_bytes is 1073741824 with 2 nodes");
  CHECK(g == NULL, "group set on failure");
}

int main(void) {
  test_pool_capacity();
  test_handle_rounds();
  test_create_checks();
  printf("test_normal_region: %d failed checks\n", g_check_failures);
  return TEST_RESULT();
}
