/* test_api: every public call rejects bad input with EP_STATUS_INVALID_ARGUMENT and a message that names the
 * argument and its value; status strings; the no-GPU path of ep_group_create. Runs without a GPU.
 *
 * Calls that need a group get a host-only group object (white box: tests/host links the library's objects), so
 * validation is exercised without NVSHMEM; no valid call is made on it. */
#include <stdio.h>
#include <string.h>

#include "common/check.h"
#include "core/internal.h"

/* The call must fail with `want`, and its message must contain `needle`. */
#define EXPECT_FAIL(call, group, want, needle)                                                             \
  do {                                                                                                     \
    ep_status_t st_ = (call);                                                                              \
    CHECK(st_ == (want), "%s returned %s, want %s", #call, ep_status_string(st_), ep_status_string(want)); \
    CHECK(strstr(ep_last_error(group), (needle)) != NULL, "%s: message \"%s\" lacks \"%s\"", #call,        \
          ep_last_error(group), (needle));                                                                 \
  } while (0)

static void test_status_strings(void) {
  for (int s = 0; s < EP_STATUS_COUNT; ++s) {
    const char* name = ep_status_string((ep_status_t)s);
    CHECK(name && strncmp(name, "EP_STATUS_", 10) == 0 && strstr(name, "unknown") == NULL, "status %d has name %s",
          s, name ? name : "(null)");
    for (int o = 0; o < s; ++o) CHECK(strcmp(name, ep_status_string((ep_status_t)o)) != 0, "duplicate name %s", name);
  }
  CHECK(strstr(ep_status_string(EP_STATUS_COUNT), "unknown") != NULL, "EP_STATUS_COUNT is not a code");
  CHECK(strstr(ep_status_string((ep_status_t)-3), "unknown") != NULL, "negative code has a name");
  CHECK(ep_last_error(NULL) != NULL, "ep_last_error(NULL) is NULL");
}

static void test_group_create_args(void) {
  ep_unique_id_t id;
  memset(&id, 0, sizeof(id));
  ep_group_t g = (ep_group_t)0x1;
  EXPECT_FAIL(ep_group_create(NULL, &id, 0, 2, 0, NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "group is NULL");
  EXPECT_FAIL(ep_group_create(&g, NULL, 0, 2, 0, NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "unique_id is NULL");
  CHECK(g == NULL, "group not cleared on failure");
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 0, 0, NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "num_ranks is 0");
  EXPECT_FAIL(ep_group_create(&g, &id, 0, -2, 0, NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "num_ranks is -2");
  EXPECT_FAIL(ep_group_create(&g, &id, 2, 2, 0, NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "rank is 2");
  EXPECT_FAIL(ep_group_create(&g, &id, -1, 2, 0, NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "rank is -1");
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 2, -1, NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "cuda_device is -1");

  ep_group_config_t c = EP_GROUP_CONFIG_INIT;
  c.magic = 0;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 2, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "magic");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.size = 8;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 2, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "size is 8");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.num_experts = 250;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "num_experts is 250");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.num_experts = 0;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "num_experts is 0");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.hidden = 7000;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "hidden is 7000");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.hidden = -128;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "hidden is -128");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.ranks_per_node = 3;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "ranks_per_node is 3");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.max_tokens_per_rank = 0;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "max_tokens_per_rank is 0");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.max_topk = 33;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "max_topk is 33");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.num_sms = -1;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "num_sms is -1");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.timeout_seconds = 0;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "timeout_seconds is 0");
  CHECK(g == NULL, "group set on failure");

  /* With valid arguments and no GPU, the call refuses before NVSHMEM starts. */
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    EXPECT_FAIL(ep_group_create(&g, &id, 0, 2, 0, NULL), NULL, EP_STATUS_UNSUPPORTED, "no usable CUDA device");
  } else {
    printf("a GPU is present: the no-GPU refusal is not exercised here\n");
  }
  EXPECT_FAIL(ep_get_unique_id(NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "unique_id is NULL");
  CHECK(ep_group_destroy(NULL) == EP_STATUS_SUCCESS, "destroy(NULL) must be a no-op");
}

/* A group object with no device behind it: enough for argument validation. */
static ep_device_error_t g_error_word;
static struct ep_group make_host_group(int num_ranks) {
  struct ep_group g;
  memset(&g, 0, sizeof(g));
  g.num_ranks = num_ranks;
  g.ranks_per_node = num_ranks;
  g.num_nodes = 1;
  g.config = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  g.error_word = &g_error_word;
  return g;
}

static void test_group_calls(void) {
  struct ep_group host_group = make_host_group(4);
  ep_group_t g = &host_group;
  EXPECT_FAIL(ep_group_get_info(NULL, NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "group is NULL");
  EXPECT_FAIL(ep_group_get_info(g, NULL), g, EP_STATUS_INVALID_ARGUMENT, "info is NULL");
  EXPECT_FAIL(ep_get_async_error(g, NULL), g, EP_STATUS_INVALID_ARGUMENT, "async_status is NULL");
  EXPECT_FAIL(ep_group_check(NULL, 0), NULL, EP_STATUS_INVALID_ARGUMENT, "group is NULL");
  ep_status_t async_st = EP_STATUS_INTERNAL_ERROR;
  CHECK(ep_get_async_error(g, &async_st) == EP_STATUS_SUCCESS && async_st == EP_STATUS_SUCCESS, "clean word");

  /* A fault in the error word becomes the next call's status and message. */
  g_error_word.code = EP_FAULT_TIMEOUT;
  g_error_word.peer = 3;
  g_error_word.rank = 0;
  g_error_word.value0 = 2000000000;
  ep_layout_args_t a = EP_LAYOUT_ARGS_INIT;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_TIMEOUT, "waiting for rank 3");
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_USAGE, "failed earlier");
  memset(&g_error_word, 0, sizeof(g_error_word));
}

static void test_layout_args(void) {
  struct ep_group host_group = make_host_group(4);
  ep_group_t g = &host_group;
  int64_t dummy_idx[1];
  int dummy[256];
  uint8_t dummy_in[16];
  ep_layout_args_t good = EP_LAYOUT_ARGS_INIT;
  good.topk_idx = dummy_idx;
  good.num_tokens = 2;
  good.num_topk = 8;
  good.num_experts = 256;
  good.num_tokens_per_rank = dummy;
  good.num_tokens_per_expert = dummy;
  good.is_token_in_rank = dummy_in;
  ep_layout_args_t a;

  EXPECT_FAIL(ep_get_dispatch_layout(g, NULL, 0), g, EP_STATUS_INVALID_ARGUMENT, "args is NULL");
  EXPECT_FAIL(ep_get_dispatch_layout(NULL, &good, 0), NULL, EP_STATUS_INVALID_ARGUMENT, "group is NULL");
  a = good; a.magic = 0x1234;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "magic is 0x00001234");
  a = good; a.size = 4;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "size is 4");
  a = good; a.num_tokens = -1;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens is -1");
  a = good; a.num_topk = 0;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_topk is 0");
  a = good; a.num_topk = 40;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_topk is 40");
  a = good; a.num_experts = 254;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_experts is 254");
  a = good; a.num_experts = -4;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_experts is -4");
  a = good; a.num_experts = 512;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "config.num_experts=256");
  a = good; a.topk_idx = NULL;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "topk_idx is NULL");
  a = good; a.num_tokens_per_rank = NULL;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens_per_rank is NULL");
  a = good; a.num_tokens_per_expert = NULL;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens_per_expert is NULL");
  a = good; a.is_token_in_rank = NULL;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "is_token_in_rank is NULL");
}

int main(void) {
  test_status_strings();
  test_group_create_args();
  test_group_calls();
  test_layout_args();
  printf("test_api: %d failed checks\n", g_check_failures);
  return TEST_RESULT();
}
