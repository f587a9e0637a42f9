/* test_api: every public call rejects bad input with EP_STATUS_INVALID_ARGUMENT and a message that names the
 * argument and its value; status strings; the no-GPU path of ep_group_create. Runs without a GPU.
 *
 * Calls that need a group get a host-only group object (white box: tests/host links the library's objects), so
 * validation is exercised without NVSHMEM; the only valid calls made on it are those that touch no device
 * (ep_handle_memory_bytes, ep_handle_create_in over host memory, ep_handle_destroy of that handle). */
#include <stdio.h>
#include <stdlib.h>
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
  c.hidden = 65536 + 128;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "hidden is 65664");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.max_tokens_per_rank = 1 << 29;  /* times 4 ranks: 2^31 rows, one past what a rank may receive */
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT,
              "max_tokens_per_rank is 536870912");
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
  c.ll_max_tokens_per_rank = -1;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "ll_max_tokens_per_rank is -1");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.ll_max_tokens_per_rank = 9000;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT,
              "ll_max_tokens_per_rank is 9000");
  c.ll_max_tokens_per_rank = 0;
  c.ll_region_bytes = (size_t)1 << 30;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT,
              "ll_region_bytes is 1073741824 but config.ll_max_tokens_per_rank is 0");
  c.ll_max_tokens_per_rank = 128;
  c.ll_region_bytes = 4096;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT,
              "ll_region_bytes is 4096; it must be at least");
  c.ll_region_bytes = 0;
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.num_sms = -1;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "num_sms is -1");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.max_sms = -1;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "max_sms is -1");
  c.max_sms = 2000;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "max_sms is 2000");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.timeout_seconds = 0;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "timeout_seconds is 0");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.mask_failed_ranks = 2;
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "mask_failed_ranks is 2");
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  CHECK(c.mask_failed_ranks == 0, "the rank mask is off by default");
  c.timeout_seconds = 1e-12; /* positive, but shorter than a kernel launch: every wait would time out */
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 4, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, "timeout_seconds is 1e-12");
  CHECK(g == NULL, "group set on failure");

  /* With valid arguments and no GPU, the call refuses before NVSHMEM starts. */
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    EXPECT_FAIL(ep_group_create(&g, &id, 0, 2, 0, NULL), NULL, EP_STATUS_UNSUPPORTED, "no usable CUDA device");
  } else {
    printf("a GPU is present: the no-GPU refusal is not exercised here\n");
  }
  EXPECT_FAIL(ep_get_unique_id(NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "unique_id is NULL");
  int version = -1;
  CHECK(ep_get_version(&version) == EP_STATUS_SUCCESS && version == EP_VERSION_CODE,
        "ep_get_version gave %d, the header says %d", version, EP_VERSION_CODE);
  EXPECT_FAIL(ep_get_version(NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "version is NULL");
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
  g.normal_region = ep_normal_region(num_ranks, g.config.num_experts, g.config.max_tokens_per_rank, g.config.hidden,
                                     g.config.max_topk);
  g.error_word = &g_error_word;
  return g;
}

static void test_group_calls(void) {
  struct ep_group host_group = make_host_group(4);
  ep_live_add(&host_group, EP_OBJECT_GROUP); /* calls look their group up */
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
  ep_live_add(&host_group, EP_OBJECT_GROUP); /* calls look their group up */
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

/* The bytes of DeepEP's low-latency buffer (its LowLatencyLayout, both halves) for the same shape. */
static size_t deepep_ll_bytes(size_t T, size_t H, size_t E) {
  const size_t d = 16 + (2 * H > H + H / 128 * 4 ? 2 * H : H + H / 128 * 4), c = H / 128 * 4 + 2 * H;
  const size_t send = T * d > E * T * c ? T * d : E * T * c;
  const size_t recv = E * T * d > E * T * c ? E * T * d : E * T * c;
  const size_t sig = (4 * E + 127) / 128 * 128;
  return (2 * (send + recv + sig) + 127) / 128 * 128;
}

static void test_ll_size_hint(void) {
  size_t bytes = 1;
  EXPECT_FAIL(ep_ll_buffer_size_hint(128, 7168, 4, 256, 8, NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "bytes is NULL");
  EXPECT_FAIL(ep_ll_buffer_size_hint(0, 7168, 4, 256, 8, &bytes), NULL, EP_STATUS_INVALID_ARGUMENT,
              "max_tokens_per_rank is 0");
  EXPECT_FAIL(ep_ll_buffer_size_hint(128, 7000, 4, 256, 8, &bytes), NULL, EP_STATUS_INVALID_ARGUMENT,
              "hidden is 7000");
  EXPECT_FAIL(ep_ll_buffer_size_hint(128, 1 << 17, 4, 256, 8, &bytes), NULL, EP_STATUS_INVALID_ARGUMENT,
              "hidden is 131072");
  EXPECT_FAIL(ep_ll_buffer_size_hint(128, 7168, 0, 256, 8, &bytes), NULL, EP_STATUS_INVALID_ARGUMENT,
              "num_ranks is 0");
  EXPECT_FAIL(ep_ll_buffer_size_hint(128, 7168, 3, 256, 8, &bytes), NULL, EP_STATUS_INVALID_ARGUMENT,
              "num_experts is 256");
  EXPECT_FAIL(ep_ll_buffer_size_hint(128, 7168, 4, 256, 33, &bytes), NULL, EP_STATUS_INVALID_ARGUMENT,
              "max_topk is 33");
  CHECK(bytes == 0, "bytes not cleared on failure");
  /* No larger than DeepEP's buffer for the shapes it serves (E >= 64), over ranks and top-k. */
  const int tokens[] = {1, 128, 256, 1024}, hiddens[] = {2048, 2560, 4096, 7168, 8192}, experts[] = {64, 256, 288};
  const int ranks[] = {1, 2, 4, 8, 16, 32};
  for (size_t a = 0; a < sizeof(tokens) / sizeof(tokens[0]); ++a)
    for (size_t b = 0; b < sizeof(hiddens) / sizeof(hiddens[0]); ++b)
      for (size_t e = 0; e < sizeof(experts) / sizeof(experts[0]); ++e)
        for (size_t r = 0; r < sizeof(ranks) / sizeof(ranks[0]); ++r) {
          if (experts[e] % ranks[r] != 0) continue;
          CHECK(ep_ll_buffer_size_hint(tokens[a], hiddens[b], ranks[r], experts[e], 16, &bytes) == EP_STATUS_SUCCESS,
                "size hint: %s", ep_last_error(NULL));
          const size_t theirs = deepep_ll_bytes((size_t)tokens[a], (size_t)hiddens[b], (size_t)experts[e]);
          CHECK(bytes <= theirs, "T=%d H=%d E=%d R=%d: %zu bytes > DeepEP's %zu", tokens[a], hiddens[b], experts[e],
                ranks[r], bytes, theirs);
        }
  CHECK(ep_ll_buffer_size_hint(128, 7168, 4, 256, 8, &bytes) == EP_STATUS_SUCCESS, "hint");
  printf("LL buffer, T=128 H=7168 E=256 (4 ranks): %zu bytes (DeepEP %zu)\n", bytes, deepep_ll_bytes(128, 7168, 256));
}

/* A group sized in bytes (config.ll_region_bytes): every shape DeepEP's buffer of the same bytes takes (its
 * top-k up to 9, E >= 64) fits ep's, whatever the rank count; ep's excess below 64 experts is printed. The calls
 * are refused with the bytes they need, the hidden hint bounds nothing, and the handles hold the experts that fit
 * at the hidden hint. */
static void test_ll_region_bytes(void) {
  const int tokens[] = {1, 64, 128, 256}, hiddens[] = {2048, 4096, 7168}, experts[] = {8, 16, 32, 64, 256, 288};
  const int ranks[] = {1, 2, 4, 8, 16, 32};
  size_t worst_excess = 0;
  for (size_t a = 0; a < sizeof(tokens) / sizeof(tokens[0]); ++a)
    for (size_t b = 0; b < sizeof(hiddens) / sizeof(hiddens[0]); ++b)
      for (size_t e = 0; e < sizeof(experts) / sizeof(experts[0]); ++e)
        for (size_t r = 0; r < sizeof(ranks) / sizeof(ranks[0]); ++r) {
          if (experts[e] % ranks[r] != 0) continue;
          const size_t theirs = deepep_ll_bytes((size_t)tokens[a], (size_t)hiddens[b], (size_t)experts[e]);
          const ep_ll_region_t l = ep_ll_region_in(theirs, ranks[r], experts[e], tokens[a], hiddens[b], 9);
          const bool fits = l.total_bytes == 2 * ep_ll_budget_half(theirs);
          if (experts[e] >= 64)
            CHECK(fits, "T=%d H=%d E=%d R=%d: DeepEP's %zu bytes do not hold ep's layout", tokens[a], hiddens[b],
                  experts[e], ranks[r], theirs);
          const size_t need = ep_ll_region(ranks[r], experts[e], tokens[a], hiddens[b], 9).total_bytes;
          if (!fits && need - theirs > worst_excess) worst_excess = need - theirs;
        }
  printf("LL bytes: below 64 experts ep needs at most %zu bytes more than DeepEP (its send stage)\n", worst_excess);

  const size_t bytes = deepep_ll_bytes(128, 7168, 288); /* DeepEP's test_low_latency.py default */
  struct ep_group host_group = make_host_group(4);
  ep_live_add(&host_group, EP_OBJECT_GROUP);
  host_group.config.ll_max_tokens_per_rank = 128;
  host_group.config.ll_region_bytes = bytes;
  CHECK(ep_ll_check_config(&host_group.config, 4, "test") == EP_STATUS_SUCCESS, "DeepEP's bytes: %s",
        ep_last_error(NULL));
  host_group.ll_region = ep_ll_group_region(&host_group.config, 4);
  const ep_ll_region_t* L = &host_group.ll_region;
  CHECK(L->total_bytes <= bytes && L->total_bytes + 256 > bytes, "the region is the bytes: %zu of %zu", L->total_bytes,
        bytes);
  CHECK(L->num_experts >= 288 && L->num_experts % 4 == 0, "the handles hold %d experts (288 fit)", L->num_experts);
  ep_group_t g = &host_group;
  struct ep_ll_handle handle;
  ep_live_add(&handle, EP_OBJECT_LL_HANDLE);
  memset(&handle, 0, sizeof(handle));
  handle.group = g;
  static uint16_t x[64];
  static int64_t idx[64];
  static uint8_t recv[64];
  static float scales[64];
  static int count[64];
  ep_ll_dispatch_args_t a = EP_LL_DISPATCH_ARGS_INIT;
  a.x = x;
  a.num_tokens = 4;
  a.hidden = 7168;
  a.topk_idx = idx;
  a.num_topk = 8;
  a.num_experts = 288;
  a.max_tokens_per_rank = 128;
  a.recv_x = recv;
  a.recv_x_scales = scales;
  a.recv_count = count;
  a.hidden = 8192; /* above the hidden hint (7168): refused for its bytes only */
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT,
              "max_tokens_per_rank=128, hidden=8192 and num_experts=288 (config.max_topk=8) need");
  CHECK(strstr(ep_last_error(g), "config.ll_region_bytes is") != NULL, "names the bytes: %s", ep_last_error(g));
  a.hidden = 7168;
  a.num_experts = L->num_experts + 4;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "the experts config.ll_region_bytes");
  a.num_experts = 288;
  a.hidden = 7000;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "hidden is 7000");
  a.hidden = 7168;
  a.num_topk = 9;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_topk is 9");
  ep_live_remove(&handle);
  ep_live_remove(&host_group);
}

static void test_ll_args(void) {
  struct ep_group no_ll = make_host_group(4);
  ep_live_add(&no_ll, EP_OBJECT_GROUP); /* calls look their group up */
  ep_ll_handle_t h = NULL;
  EXPECT_FAIL(ep_ll_handle_create(&no_ll, &h), &no_ll, EP_STATUS_INVALID_USAGE, "ll_max_tokens_per_rank is 0");
  EXPECT_FAIL(ep_ll_handle_create(NULL, &h), NULL, EP_STATUS_INVALID_ARGUMENT, "group is NULL");

  struct ep_group host_group = make_host_group(4);
  ep_live_add(&host_group, EP_OBJECT_GROUP); /* calls look their group up */
  host_group.config.ll_max_tokens_per_rank = 128;
  host_group.ll_region = ep_ll_region(4, 256, 128, 7168, 8);
  ep_group_t g = &host_group;
  EXPECT_FAIL(ep_ll_handle_create(g, NULL), g, EP_STATUS_INVALID_ARGUMENT, "handle is NULL");
  /* A handle object with no device memory: enough for validation. */
  struct ep_ll_handle handle;
  ep_live_add(&handle, EP_OBJECT_LL_HANDLE);
  memset(&handle, 0, sizeof(handle));
  handle.group = g;
  struct ep_ll_handle other = handle;
  ep_live_add(&other, EP_OBJECT_LL_HANDLE);
  other.group = &no_ll;

  static uint16_t x[64];
  static int64_t idx[64];
  static uint8_t recv[64];
  static float scales[64];
  static int count[64];
  ep_ll_dispatch_args_t good = EP_LL_DISPATCH_ARGS_INIT;
  good.x = x;
  good.num_tokens = 4;
  good.hidden = 7168;
  good.topk_idx = idx;
  good.num_topk = 8;
  good.num_experts = 256;
  good.max_tokens_per_rank = 128;
  good.recv_x = recv;
  good.recv_x_scales = scales;
  good.recv_count = count;
  ep_ll_dispatch_args_t a;

  EXPECT_FAIL(ep_ll_dispatch(g, &handle, NULL, 0), g, EP_STATUS_INVALID_ARGUMENT, "args is NULL");
  EXPECT_FAIL(ep_ll_dispatch(NULL, &handle, &good, 0), NULL, EP_STATUS_INVALID_ARGUMENT, "group is NULL");
  EXPECT_FAIL(ep_ll_dispatch(g, NULL, &good, 0), g, EP_STATUS_INVALID_ARGUMENT, "handle is NULL");
  EXPECT_FAIL(ep_ll_dispatch(g, &other, &good, 0), g, EP_STATUS_INVALID_ARGUMENT, "another group");
  EXPECT_FAIL(ep_ll_dispatch(&no_ll, &other, &good, 0), &no_ll, EP_STATUS_INVALID_USAGE, "no low-latency buffer");
  a = good; a.magic = 7;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "magic is 0x00000007");
  a = good; a.size = 12;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "size is 12");
  a = good; a.max_tokens_per_rank = 0;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "max_tokens_per_rank is 0");
  a = good; a.max_tokens_per_rank = 129;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "max_tokens_per_rank is 129");
  a = good; a.num_tokens = 129;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens is 129");
  a = good; a.num_tokens = -1;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens is -1");
  a = good; a.num_topk = 0;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_topk is 0");
  a = good; a.num_topk = 9;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_topk is 9");
  a = good; a.num_experts = 250;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_experts is 250");
  a = good; a.num_experts = 512;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_experts is 512");
  a = good; a.recv_dtype = EP_FP32;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "recv_dtype is 3");
  a = good; a.hidden = 2000;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "hidden is 2000");
  a = good; a.hidden = 7296;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "hidden is 7296");
  a = good; a.hidden = 2688; a.round_scale = 1; a.use_ue8m0 = 1;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "hidden is 2688");
  a = good; a.use_ue8m0 = 1;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "use_ue8m0 is 1");
  a = good; a.round_scale = 2;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "round_scale is 2");
  a = good; a.recv_dtype = EP_BF16; a.hidden = 100;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "hidden is 100");
  a = good; a.x = NULL;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "x is NULL");
  a = good; a.x = (const char*)x + 2;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "16-byte aligned");
  a = good; a.topk_idx = NULL;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "topk_idx is NULL");
  a = good; a.recv_x = NULL;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "recv_x is NULL");
  a = good; a.recv_x_scales = NULL;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "recv_x_scales is NULL");
  a = good; a.recv_count = NULL;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "recv_count is NULL");
  a = good; a.return_after_send = 3;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "return_after_send is 3");
  static int64_t stats[8];
  a = good;
  a.wait_recv_cost_stats = (int64_t*)((char*)stats + 4);
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &a, 0), g, EP_STATUS_INVALID_ARGUMENT, "wait_recv_cost_stats");

  EXPECT_FAIL(ep_ll_dispatch_recv(g, &handle, 0), g, EP_STATUS_INVALID_USAGE, "no dispatch waiting");
  EXPECT_FAIL(ep_ll_combine_recv(g, &handle, 0), g, EP_STATUS_INVALID_USAGE, "no combine waiting");
  void* buffer = (void*)1;
  EXPECT_FAIL(ep_ll_get_combine_buffer(g, &handle, NULL), g, EP_STATUS_INVALID_ARGUMENT, "buffer is NULL");
  EXPECT_FAIL(ep_ll_get_combine_buffer(g, &handle, &buffer), g, EP_STATUS_INVALID_USAGE, "no dispatch yet");
  CHECK(buffer == NULL, "combine buffer not cleared on failure");
  EXPECT_FAIL(ep_ll_get_routing(NULL, NULL, NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "handle is NULL");

  static uint16_t y[64], out[64];
  static float w[64];
  ep_ll_combine_args_t cgood = EP_LL_COMBINE_ARGS_INIT;
  cgood.x = y;
  cgood.topk_weights = w;
  cgood.out = out;
  ep_ll_combine_args_t ca;
  EXPECT_FAIL(ep_ll_combine(g, &handle, NULL, 0), g, EP_STATUS_INVALID_ARGUMENT, "args is NULL");
  ca = cgood; ca.magic = 0;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "magic");
  ca = cgood; ca.x = NULL;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "x is NULL");
  ca = cgood; ca.zero_copy = 2;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "zero_copy is 2");
  EXPECT_FAIL(ep_ll_combine(g, &handle, &cgood, 0), g, EP_STATUS_INVALID_USAGE, "no dispatch yet");
  /* A handle whose half a later dispatch took (two-buffer rule). */
  handle.dispatched = true;
  handle.serial = 1;
  handle.call.num_tokens = 4;
  host_group.ll_half_serial[0] = 3;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &cgood, 0), g, EP_STATUS_INVALID_USAGE, "two-buffer rule");
  host_group.ll_half_serial[0] = 1;
  ca = cgood; ca.topk_weights = NULL;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "topk_weights is NULL");
  ca = cgood; ca.out = NULL;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "out is NULL");
  ca = cgood;
  ca.wait_recv_cost_stats = (int64_t*)((char*)stats + 4);
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "wait_recv_cost_stats");
  ca = cgood;
  ca.use_logfmt = 2;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "use_logfmt is 2");
  ca.use_logfmt = 1;
  ca.zero_copy = 1;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "zero_copy=1, sum_on_expert_ranks=0");
  ca.zero_copy = 0;
  handle.call.hidden = 2056; /* a BF16 dispatch's hidden: not whole 128-channel groups */
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "hidden a multiple of 128");
  handle.call.hidden = 0;
  /* Sums on the experts' ranks: a flag, no weights of its own, the dispatch's weights, room in the buffer. */
  ca = cgood; ca.sum_on_expert_ranks = 2;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "sum_on_expert_ranks is 2");
  ca = cgood; ca.sum_on_expert_ranks = 1;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "uses the dispatch's weights");
  ca.topk_weights = NULL;
  handle.call.dispatch_weights = NULL;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_USAGE, "had no topk_weights");
  const ep_ll_region_t roomy = host_group.ll_region;
  handle.region = ep_ll_region(4, 8, 128, 7168, 8); /* 2 experts per rank: no room for the sums */
  handle.call.dispatch_weights = w;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_USAGE, "2 experts per rank");
  handle.region = roomy;
  CHECK(ep_ll_sums_fit(&roomy), "64 experts per rank leave room for the sums");
  handle.dispatch_recv_pending = true;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &cgood, 0), g, EP_STATUS_INVALID_USAGE, "ep_ll_dispatch_recv first");
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &good, 0), g, EP_STATUS_INVALID_USAGE, "receive phase");
  handle.dispatch_recv_pending = false;
  host_group.ll_half_pending[0] = true;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &good, 0), g, EP_STATUS_INVALID_USAGE, "two-buffer rule");
  host_group.ll_half_pending[0] = false;
  /* The rank mask: renormalize_masked is a flag, needs the mask, and is not for sums on the experts' ranks. */
  ca = cgood;
  ca.renormalize_masked = 2;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "renormalize_masked is 2");
  ca = cgood;
  ca.renormalize_masked = 1;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_USAGE, "config.mask_failed_ranks = 1");
  static int32_t host_mask[4];
  host_group.rank_mask = host_mask; /* host memory: only the checks before the device are reached */
  ca.sum_on_expert_ranks = 1;
  ca.topk_weights = NULL;
  EXPECT_FAIL(ep_ll_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "sum_on_expert_ranks=1");
  /* After an unmask, no LL dispatch before ep_ll_clean. */
  host_group.ll_clean_needed = true;
  EXPECT_FAIL(ep_ll_dispatch(g, &handle, &good, 0), g, EP_STATUS_INVALID_USAGE, "ep_ll_clean before");
  host_group.ll_clean_needed = false;
  host_group.rank_mask = NULL;
}

/* The rank mask's calls: a group made without it refuses them naming the config field; arguments are checked. */
static void test_rank_mask_args(void) {
  struct ep_group host_group = make_host_group(4);
  ep_live_add(&host_group, EP_OBJECT_GROUP);
  ep_group_t g = &host_group;
  static int32_t out[4];
  EXPECT_FAIL(ep_group_mask_rank(NULL, 0, 1, 0), NULL, EP_STATUS_INVALID_ARGUMENT, "group is NULL");
  EXPECT_FAIL(ep_group_get_rank_mask(NULL, out, 0), NULL, EP_STATUS_INVALID_ARGUMENT, "group is NULL");
  EXPECT_FAIL(ep_group_clear_rank_mask(NULL, 0), NULL, EP_STATUS_INVALID_ARGUMENT, "group is NULL");
  EXPECT_FAIL(ep_group_mask_rank(g, 0, 1, 0), g, EP_STATUS_INVALID_USAGE, "config.mask_failed_ranks is 0");
  EXPECT_FAIL(ep_group_get_rank_mask(g, out, 0), g, EP_STATUS_INVALID_USAGE, "config.mask_failed_ranks is 0");
  EXPECT_FAIL(ep_group_clear_rank_mask(g, 0), g, EP_STATUS_INVALID_USAGE, "config.mask_failed_ranks is 0");
  static int32_t host_mask[4];
  host_group.config.mask_failed_ranks = 1;
  host_group.rank_mask = host_mask; /* host memory: only the checks before the device are reached */
  EXPECT_FAIL(ep_group_mask_rank(g, 4, 1, 0), g, EP_STATUS_INVALID_ARGUMENT, "rank is 4");
  EXPECT_FAIL(ep_group_mask_rank(g, -1, 1, 0), g, EP_STATUS_INVALID_ARGUMENT, "rank is -1");
  EXPECT_FAIL(ep_group_mask_rank(g, 1, 2, 0), g, EP_STATUS_INVALID_ARGUMENT, "masked is 2");
  EXPECT_FAIL(ep_group_get_rank_mask(g, NULL, 0), g, EP_STATUS_INVALID_ARGUMENT, "mask is NULL");
  EXPECT_FAIL(ep_group_get_rank_mask(g, (int32_t*)((char*)out + 2), 0), g, EP_STATUS_INVALID_ARGUMENT, "mask (");
  CHECK(!host_group.ll_clean_needed, "refused calls leave the clean rule alone");
  ep_live_remove(&host_group);
}

/* ep_map_experts: the map and the call are checked before the device is touched; a data fault of its kernel reads
 * back with a message naming the token or the logical expert. */
static void test_expert_map_args(void) {
  struct ep_group host_group = make_host_group(4);
  ep_live_add(&host_group, EP_OBJECT_GROUP);
  ep_group_t g = &host_group;
  static int32_t slots[64];
  static int64_t in[16], out[16];
  ep_expert_map_t good = EP_EXPERT_MAP_INIT;
  good.slots = slots;
  good.num_logical_experts = 16;
  good.max_copies = 2;
  good.num_experts = 32;
  ep_expert_map_t m;
  EXPECT_FAIL(ep_map_experts(NULL, &good, in, out, 2, 4, 0), NULL, EP_STATUS_INVALID_ARGUMENT, "group is NULL");
  EXPECT_FAIL(ep_map_experts(g, NULL, in, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "map is NULL");
  m = good;
  m.magic = 0x1234;
  EXPECT_FAIL(ep_map_experts(g, &m, in, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "ep_expert_map_t");
  m = good;
  m.size = 4;
  EXPECT_FAIL(ep_map_experts(g, &m, in, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "size is 4");
  m = good;
  m.num_experts = 30;
  EXPECT_FAIL(ep_map_experts(g, &m, in, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "map->num_experts is 30");
  m = good;
  m.num_experts = 0;
  EXPECT_FAIL(ep_map_experts(g, &m, in, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "map->num_experts is 0");
  m = good;
  m.num_logical_experts = 0;
  EXPECT_FAIL(ep_map_experts(g, &m, in, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "map->num_logical_experts is 0");
  m = good;
  m.max_copies = 0;
  EXPECT_FAIL(ep_map_experts(g, &m, in, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "map->max_copies is 0");
  m = good;
  m.max_copies = 33;
  EXPECT_FAIL(ep_map_experts(g, &m, in, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "map->max_copies is 33");
  m = good;
  m.slots = NULL;
  EXPECT_FAIL(ep_map_experts(g, &m, in, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "map->slots is NULL");
  m = good;
  m.slots = (const int32_t*)((const char*)slots + 2);
  EXPECT_FAIL(ep_map_experts(g, &m, in, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "map->slots (");
  EXPECT_FAIL(ep_map_experts(g, &good, in, out, -1, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens is -1");
  EXPECT_FAIL(ep_map_experts(g, &good, in, out, 2, 0, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_topk is 0");
  EXPECT_FAIL(ep_map_experts(g, &good, in, out, 2, 33, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_topk is 33");
  EXPECT_FAIL(ep_map_experts(g, &good, in, out, 1 << 28, 8, 0), g, EP_STATUS_INVALID_ARGUMENT,
              "num_tokens is 268435456");
  EXPECT_FAIL(ep_map_experts(g, &good, NULL, out, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "logical_topk is NULL");
  EXPECT_FAIL(ep_map_experts(g, &good, in, NULL, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "physical_topk is NULL");
  EXPECT_FAIL(ep_map_experts(g, &good, (const int64_t*)((const char*)in + 4), out, 2, 4, 0), g,
              EP_STATUS_INVALID_ARGUMENT, "logical_topk (");
  EXPECT_FAIL(ep_map_experts(g, &good, in, in + 1, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "overlap");
  EXPECT_FAIL(ep_map_experts(g, &good, in + 1, in, 2, 4, 0), g, EP_STATUS_INVALID_ARGUMENT, "overlap");
  /* Nothing to map: no device work, and NULL arrays are fine. */
  CHECK(ep_map_experts(g, &good, NULL, NULL, 0, 4, 0) == EP_STATUS_SUCCESS, "0 tokens: %s", ep_last_error(g));

  /* The kernel's data faults: a bad logical index names the token, a bad slot the logical expert; both clear. */
  g_error_word.code = EP_FAULT_BAD_EXPERT_MAP;
  g_error_word.rank = 2;
  g_error_word.site = 0;
  g_error_word.value0 = 7;
  g_error_word.value1 = 99;
  ep_status_t async_st = EP_STATUS_SUCCESS;
  CHECK(ep_get_async_error(g, &async_st) == EP_STATUS_SUCCESS && async_st == EP_STATUS_DEVICE_ERROR,
        "a bad logical index: %s", ep_status_string(async_st));
  CHECK(strstr(ep_last_error(g), "logical_topk of token 7 holds logical expert 99") != NULL, "message: %s",
        ep_last_error(g));
  g_error_word.code = EP_FAULT_BAD_EXPERT_MAP;
  g_error_word.site = 1;
  g_error_word.value0 = 5;
  g_error_word.value1 = -3;
  EXPECT_FAIL(ep_map_experts(g, &good, in, out, 0, 4, 0), g, EP_STATUS_DEVICE_ERROR,
              "row of logical expert 5 holds slot -3");
  CHECK(ep_map_experts(g, &good, in, out, 0, 4, 0) == EP_STATUS_SUCCESS, "a reported data fault clears: %s",
        ep_last_error(g));
  memset(&g_error_word, 0, sizeof(g_error_word));
  ep_live_remove(&host_group);
}

/* ep_dispatch_prepare / ep_dispatch / ep_combine: every check that comes before the device is touched. */
static void test_normal_args(void) {
  struct ep_group host_group = make_host_group(4);
  ep_live_add(&host_group, EP_OBJECT_GROUP); /* calls look their group up */
  ep_group_t g = &host_group;
  struct ep_handle handle;
  ep_live_add(&handle, EP_OBJECT_HANDLE);
  memset(&handle, 0, sizeof(handle));
  handle.group = g;
  handle.num_recv_host = -1;
  struct ep_group other_group = make_host_group(4);
  ep_live_add(&other_group, EP_OBJECT_GROUP); /* calls look their group up */
  struct ep_handle foreign = handle;
  ep_live_add(&foreign, EP_OBJECT_HANDLE);
  foreign.group = &other_group;
  int64_t idx[8];
  _Alignas(16) uint8_t rows[64];

  ep_dispatch_prepare_args_t pgood = EP_DISPATCH_PREPARE_ARGS_INIT;
  pgood.topk_idx = idx;
  pgood.num_tokens = 1;
  pgood.num_topk = 8;
  pgood.num_experts = 256;
  ep_dispatch_prepare_args_t pa;
  EXPECT_FAIL(ep_dispatch_prepare(g, NULL, &pgood, 0), g, EP_STATUS_INVALID_ARGUMENT, "handle is NULL");
  EXPECT_FAIL(ep_dispatch_prepare(g, &foreign, &pgood, 0), g, EP_STATUS_INVALID_ARGUMENT, "another group");
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, NULL, 0), g, EP_STATUS_INVALID_ARGUMENT, "args is NULL");
  pa = pgood; pa.magic = 7;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "magic");
  pa = pgood; pa.num_tokens = 4097;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens is 4097");
  pa = pgood; pa.num_tokens = -1;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens is -1");
  pa = pgood; pa.num_topk = 9;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_topk is 9");
  pa = pgood; pa.num_experts = 258;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_experts is 258");
  pa = pgood; pa.expert_alignment = 0;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "expert_alignment is 0");
  pa = pgood; pa.expert_alignment = (1 << 16) + 1;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "expert_alignment is 65537");
  pa = pgood; pa.topk_idx = NULL;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "topk_idx is NULL");
  int counts[64];
  pa = pgood; pa.num_recv_tokens_per_expert = counts;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "needs num_recv_tokens");
  /* The rank-mask form: num_topk 0 and no topk_idx; is_token_in_rank required, never beside topk_idx. */
  uint8_t in_rank[4] = {1, 0, 1, 0};
  pa = pgood;
  pa.is_token_in_rank = in_rank;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "give one routing");
  pa = pgood;
  pa.num_tokens_per_expert = counts;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "give one routing");
  pa = pgood;
  pa.topk_idx = NULL;
  pa.num_topk = 0;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT,
              "topk_idx and is_token_in_rank are NULL");
  pa = pgood;
  pa.topk_idx = NULL;
  pa.num_topk = 0;
  pa.is_token_in_rank = in_rank;
  pa.num_experts = 6;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_experts is 6");
  pa = pgood;
  pa.topk_idx = NULL;
  pa.num_topk = 0;
  pa.is_token_in_rank = in_rank;
  pa.num_tokens_per_expert = (const int*)((const char*)counts + 2);
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens_per_expert");
  pa = pgood;
  pa.topk_idx = NULL;
  pa.num_topk = -1;
  pa.is_token_in_rank = in_rank;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_topk is -1");

  /* The rank prefix query: a live, prepared handle; the matrix on one node only; aligned outputs. */
  int32_t prefix[16];
  EXPECT_FAIL(ep_handle_get_rank_prefix(NULL, prefix, NULL, 0), NULL, EP_STATUS_INVALID_ARGUMENT, "handle is NULL");
  EXPECT_FAIL(ep_handle_get_rank_prefix((ep_handle_t)(void*)rows, prefix, NULL, 0), NULL, EP_STATUS_INVALID_USAGE,
              "not a live handle");
  EXPECT_FAIL(ep_handle_get_rank_prefix(&handle, prefix, NULL, 0), g, EP_STATUS_INVALID_USAGE,
              "call ep_dispatch_prepare first");
  handle.prepared = true;
  EXPECT_FAIL(ep_handle_get_rank_prefix(&handle, (int32_t*)(void*)(rows + 2), NULL, 0), g, EP_STATUS_INVALID_ARGUMENT,
              "rank_prefix_matrix");
  EXPECT_FAIL(ep_handle_get_rank_prefix(&handle, NULL, (int32_t*)(void*)(rows + 1), 0), g, EP_STATUS_INVALID_ARGUMENT,
              "recv_rank_prefix_sum");
  CHECK(ep_handle_get_rank_prefix(&handle, NULL, NULL, 0) == EP_STATUS_SUCCESS, "no outputs: nothing to do (%s)",
        ep_last_error(g));
  host_group.num_nodes = 2;
  host_group.ranks_per_node = 2;
  EXPECT_FAIL(ep_handle_get_rank_prefix(&handle, prefix, NULL, 0), g, EP_STATUS_UNSUPPORTED, "one-node groups");
  host_group.num_nodes = 1;
  host_group.ranks_per_node = 4;
  handle.prepared = false;

  ep_dispatch_args_t dgood = EP_DISPATCH_ARGS_INIT;
  dgood.x_dtype = EP_BF16;
  dgood.hidden = 7168;
  dgood.x = rows;
  dgood.recv_capacity = 4;
  dgood.recv_x = rows;
  ep_dispatch_args_t da;
  EXPECT_FAIL(ep_dispatch(g, &handle, &dgood, 0), g, EP_STATUS_INVALID_USAGE, "call ep_dispatch_prepare first");
  handle.prepared = true;
  handle.num_tokens = 1;
  da = dgood; da.x_dtype = EP_FP32;
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "x_dtype");
  da = dgood; da.hidden = 7168 + 128;
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "hidden is 7296");
  da = dgood; da.x_dtype = EP_FP8_E4M3; da.hidden = 2000;
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "multiple of 128");
  da = dgood; da.x = NULL;
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "x is NULL");
  da = dgood; da.x = rows + 4;
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "16-byte aligned");
  da = dgood; da.x_dtype = EP_FP8_E4M3;
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "x_scales is NULL");
  da = dgood; da.recv_capacity = -1;
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "recv_capacity is -1");
  handle.num_recv_host = 9;
  EXPECT_FAIL(ep_dispatch(g, &handle, &dgood, 0), g, EP_STATUS_INVALID_ARGUMENT, "receives 9 rows");
  handle.num_recv_host = -1;
  da = dgood; da.recv_x = NULL;
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "recv_x is NULL");
  da = dgood; da.recv_topk_idx = (int64_t*)rows;
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "topk_idx is NULL");
  da = dgood; da.num_sms = 1025;
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_sms is 1025");

  ep_combine_args_t cgood = EP_COMBINE_ARGS_INIT;
  cgood.hidden = 7168;
  cgood.x = rows;
  cgood.combined_x = rows;
  ep_combine_args_t ca;
  EXPECT_FAIL(ep_combine(g, &handle, NULL, 0), g, EP_STATUS_INVALID_ARGUMENT, "args is NULL");
  ca = cgood; ca.hidden = 12;
  EXPECT_FAIL(ep_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "hidden is 12");
  ca = cgood; ca.x = NULL;
  EXPECT_FAIL(ep_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "x is NULL");
  ca = cgood; ca.combined_x = NULL;
  EXPECT_FAIL(ep_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "combined_x is NULL");
  ca = cgood; ca.bias0 = rows + 2;
  EXPECT_FAIL(ep_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "bias is not 16-byte aligned");
  ca = cgood; ca.combined_topk_weights = (float*)rows;
  EXPECT_FAIL(ep_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "topk_weights is NULL");
  ca = cgood; ca.num_sms = -1;
  EXPECT_FAIL(ep_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_sms is -1");

  /* The rank mask: after an unmask of a group whose one-node normal path ran, every call of that path is refused
   * (its call epochs with the unmasked rank are out of step), before its arguments are looked at. */
  host_group.normal_unmasked = true;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pgood, 0), g, EP_STATUS_UNSUPPORTED, "a rank was unmasked");
  EXPECT_FAIL(ep_dispatch(g, &handle, &dgood, 0), g, EP_STATUS_UNSUPPORTED, "needs a new group");
  EXPECT_FAIL(ep_combine(g, &handle, NULL, 0), g, EP_STATUS_UNSUPPORTED, "a rank was unmasked");
  host_group.normal_unmasked = false;
}

/* One rule, one message: every call that takes a hidden size words its refusal the same way (ep_check_hidden), so
 * the text after "function: " depends on the rule broken, not on which call broke it. */
static void expect_hidden_message(ep_status_t st, ep_group_t group, const char* want) {
  const char* msg = ep_last_error(group);
  const char* rest = strstr(msg, ": ");
  CHECK(st == EP_STATUS_INVALID_ARGUMENT && rest && strcmp(rest + 2, want) == 0,
        "status %s, message \"%s\", want \"<function>: %s\"", ep_status_string(st), msg, want);
}

static void test_hidden_rule(void) {
  struct ep_group host_group = make_host_group(4); /* config.hidden = 7168 */
  ep_live_add(&host_group, EP_OBJECT_GROUP);       /* calls look their group up */
  host_group.config.ll_max_tokens_per_rank = 128;
  host_group.ll_region = ep_ll_region(4, 256, 128, 7168, 8);
  ep_group_t g = &host_group;
  struct ep_handle handle;
  ep_live_add(&handle, EP_OBJECT_HANDLE);
  memset(&handle, 0, sizeof(handle));
  handle.group = g;
  handle.num_recv_host = -1;
  handle.prepared = true;
  handle.num_tokens = 1;
  struct ep_ll_handle ll_handle;
  ep_live_add(&ll_handle, EP_OBJECT_LL_HANDLE);
  memset(&ll_handle, 0, sizeof(ll_handle));
  ll_handle.group = g;
  _Alignas(16) static uint8_t rows[64];
  static int64_t idx[8];
  static float scales[8];
  static int count[64];

  ep_dispatch_args_t d = EP_DISPATCH_ARGS_INIT;
  d.x = rows;
  d.x_scales = scales;
  d.recv_capacity = 4;
  d.recv_x = rows;
  d.recv_x_scales = scales;
  ep_combine_args_t c = EP_COMBINE_ARGS_INIT;
  c.x = rows;
  c.combined_x = rows;
  ep_ll_dispatch_args_t l = EP_LL_DISPATCH_ARGS_INIT;
  l.x = rows;
  l.num_tokens = 1;
  l.topk_idx = idx;
  l.num_topk = 8;
  l.num_experts = 256;
  l.max_tokens_per_rank = 128;
  l.recv_x = rows;
  l.recv_x_scales = scales;
  l.recv_count = count;

  const char* bf16_100 =
      "hidden is 100; it must be a positive multiple of 8 (BF16 rows) and at most config.hidden=7168";
  d.x_dtype = EP_BF16;
  d.hidden = c.hidden = l.hidden = 100;
  l.recv_dtype = EP_BF16;
  expect_hidden_message(ep_dispatch(g, &handle, &d, 0), g, bf16_100);
  expect_hidden_message(ep_combine(g, &handle, &c, 0), g, bf16_100);
  expect_hidden_message(ep_ll_dispatch(g, &ll_handle, &l, 0), g, bf16_100);

  const char* bf16_big =
      "hidden is 7296; it must be a positive multiple of 8 (BF16 rows) and at most config.hidden=7168";
  d.hidden = c.hidden = l.hidden = 7296;
  expect_hidden_message(ep_dispatch(g, &handle, &d, 0), g, bf16_big);
  expect_hidden_message(ep_combine(g, &handle, &c, 0), g, bf16_big);
  expect_hidden_message(ep_ll_dispatch(g, &ll_handle, &l, 0), g, bf16_big);

  const char* fp8_200 =
      "hidden is 200; it must be a positive multiple of 128 (FP8 rows, a scale per 128 channels) and at most "
      "config.hidden=7168";
  d.x_dtype = EP_FP8_E4M3;
  d.hidden = l.hidden = 200;
  l.recv_dtype = EP_FP8_E4M3;
  expect_hidden_message(ep_dispatch(g, &handle, &d, 0), g, fp8_200);
  expect_hidden_message(ep_ll_dispatch(g, &ll_handle, &l, 0), g, fp8_200);
  l.hidden = 2688;
  l.round_scale = l.use_ue8m0 = 1;
  expect_hidden_message(ep_ll_dispatch(g, &ll_handle, &l, 0), g,
                        "hidden is 2688; it must be a positive multiple of 512 (FP8 rows with UE8M0 scales, four to "
                        "an int) and at most config.hidden=7168");

  ep_unique_id_t id;
  memset(&id, 0, sizeof(id));
  ep_group_t none = NULL;
  ep_group_config_t config = EP_GROUP_CONFIG_INIT;
  config.hidden = 200;
  expect_hidden_message(ep_group_create(&none, &id, 0, 4, 0, &config), NULL,
                        "config.hidden is 200; it must be a positive multiple of 128 (FP8 rows, a scale per 128 "
                        "channels) and at most 65536");
}

/* ep_ll_handle_carve (what ep_ll_handle_create allocates and how it is cut): every array in the memory, 16-byte
 * aligned, with room for its elements, none overlapping the next; sizing alone (NULL memory) gives the same bytes. */
static void test_ll_handle_carve(void) {
  const size_t R = 4, T = 128, E_loc = 64, K = 8;
  const ep_ll_region_t region = ep_ll_region((int)R, (int)(E_loc * R), (int)T, 7168, (int)K);
  ep_ll_handle_view_t none;
  memset(&none, 0xff, sizeof(none));
  const size_t bytes = ep_ll_handle_carve(&region, NULL, &none);
  CHECK(!none.slot_of && !none.ops, "carving no memory leaves the arrays NULL");
  char* memory = (char*)aligned_alloc(256, (bytes + 255) / 256 * 256);
  ep_ll_handle_view_t v;
  CHECK(ep_ll_handle_carve(&region, memory, &v) == bytes, "carving and sizing disagree");
  const void* arrays[] = {v.slot_of, v.rank_slot_of, v.msg_off, v.src_info, v.layout_range, v.ops};
  const size_t sizes[] = {T * K * 4, T * K * 4, (R + 1) * 4, E_loc * R * T * 4, E_loc * R * 8, 2 * 8};
  const char* next = memory;
  for (int i = 0; i < 6; ++i) {
    const char* at = (const char*)arrays[i];
    CHECK(at >= next && (uintptr_t)at % 16 == 0, "LL handle array %d misplaced", i);
    next = at + sizes[i];
  }
  CHECK(next <= memory + bytes, "the LL handle's arrays end %td bytes past its memory", next - (memory + bytes));
  free(memory);
}

/* ep_handle_memory_bytes / ep_handle_create_in over host memory (no device is touched): the checks, and every
 * array of the handle inside the memory it was given, one node and two. */
static void test_handle_in(void) {
  for (int nodes = 1; nodes <= 2; ++nodes) {
    struct ep_group host_group = make_host_group(4);
    ep_live_add(&host_group, EP_OBJECT_GROUP); /* calls look their group up */
    host_group.num_nodes = nodes;
    host_group.ranks_per_node = 4 / nodes;
    ep_group_t g = &host_group;
    size_t bytes = 0;
    EXPECT_FAIL(ep_handle_memory_bytes(g, NULL), g, EP_STATUS_INVALID_ARGUMENT, "bytes is NULL");
    CHECK(ep_handle_memory_bytes(g, &bytes) == EP_STATUS_SUCCESS && bytes > 0, "%d node(s): no handle size", nodes);
    char* memory = (char*)aligned_alloc(256, (bytes + 255) / 256 * 256);
    ep_handle_t h = (ep_handle_t)0x1;
    EXPECT_FAIL(ep_handle_create_in(g, memory, bytes, NULL), g, EP_STATUS_INVALID_ARGUMENT, "handle is NULL");
    EXPECT_FAIL(ep_handle_create_in(g, NULL, bytes, &h), g, EP_STATUS_INVALID_ARGUMENT, "memory is NULL");
    CHECK(h == NULL, "a failed ep_handle_create_in leaves *handle NULL");
    EXPECT_FAIL(ep_handle_create_in(g, memory + 16, bytes, &h), g, EP_STATUS_INVALID_ARGUMENT, "256-byte aligned");
    EXPECT_FAIL(ep_handle_create_in(g, memory, bytes - 4, &h), g, EP_STATUS_INVALID_ARGUMENT, "ep_handle_memory_bytes");
    CHECK(ep_handle_create_in(g, memory, bytes, &h) == EP_STATUS_SUCCESS && h, "%d node(s): create_in: %s", nodes,
          ep_last_error(g));
    if (h) {
      /* Every array in the memory, 16-byte aligned, with room for its ints, none overlapping the next. */
      const size_t R = 4, T = (size_t)host_group.config.max_tokens_per_rank, E_loc = host_group.config.num_experts / R;
      const size_t N = (size_t)nodes, P = R / N;
      const ep_normal_handle_view_t* v = &h->arrays;
      const int* arrays[] = {v->send_pos,   v->matrix,        v->num_tokens_of, v->recv_src,  v->recv_offset,
                             v->num_recv,   v->expert_counts, v->recv_slot,     v->send_slot, v->node_tokens,
                             v->node_count, v->fwd_count,     v->fwd_row};
      const size_t ints[] = {T * R, R * R, R, R * T, R + 1, 1, E_loc, R * T, T * N, N * T, N, N, N * T * P};
      const int used = nodes > 1 ? 13 : 7;
      const char* next = memory;
      for (int i = 0; i < 13; ++i) {
        const char* at = (const char*)arrays[i];
        if (i >= used) {
          CHECK(at == NULL, "one node: internode array %d is set", i);
          continue;
        }
        CHECK(at && at >= next && (uintptr_t)at % 16 == 0, "%d node(s): array %d misplaced", nodes, i);
        if (at) next = at + ints[i] * sizeof(int);
      }
      CHECK(next <= memory + bytes, "%d node(s): the arrays end %td bytes past the memory", nodes,
            next - (memory + bytes));
      CHECK((char*)v->send_pos == memory && h->num_recv_host == -1 && !h->prepared, "%d node(s): not a fresh handle",
            nodes);
      CHECK(ep_handle_destroy(h) == EP_STATUS_SUCCESS, "destroy of a create_in handle");
    }
    free(memory);
  }
}

/* ep_get_limits: the size field is checked, the values are the header's, and the calls enforce exactly them. */
static void test_limits(void) {
  EXPECT_FAIL(ep_get_limits(NULL), NULL, EP_STATUS_INVALID_ARGUMENT, "limits is NULL");
  ep_limits_t bad = EP_LIMITS_INIT;
  bad.size = 0;
  EXPECT_FAIL(ep_get_limits(&bad), NULL, EP_STATUS_INVALID_ARGUMENT, "limits.size is 0");
  bad.size = (uint32_t)sizeof(ep_limits_t) + 4; /* a later header's larger struct */
  EXPECT_FAIL(ep_get_limits(&bad), NULL, EP_STATUS_INVALID_ARGUMENT, "EP_LIMITS_INIT");
  CHECK(bad.max_topk == 0, "ep_get_limits wrote into a struct it rejected");

  ep_limits_t l = EP_LIMITS_INIT;
  CHECK(ep_get_limits(&l) == EP_STATUS_SUCCESS, "ep_get_limits: %s", ep_last_error(NULL));
  CHECK_EQ_INT(l.size, sizeof(ep_limits_t), "limits.size");
  CHECK_EQ_INT(l.max_ranks, EP_MAX_RANKS, "max_ranks");
  CHECK_EQ_INT(l.max_topk, EP_MAX_TOPK, "max_topk");
  CHECK_EQ_INT(l.max_hidden, EP_MAX_HIDDEN, "max_hidden");
  CHECK_EQ_INT(l.ll_max_tokens_per_rank, EP_LL_MAX_TOKENS_PER_RANK, "ll_max_tokens_per_rank");
  CHECK_EQ_INT(l.max_expert_alignment, EP_MAX_EXPERT_ALIGNMENT, "max_expert_alignment");
  CHECK_EQ_INT(l.max_sms, EP_MAX_SMS, "max_sms");
  CHECK_EQ_INT(l.default_num_sms, EP_DEFAULT_NUM_SMS, "default_num_sms");
  CHECK_EQ_INT(l.max_timeout_seconds, EP_MAX_TIMEOUT_SECONDS, "max_timeout_seconds");
  CHECK(l.default_num_sms >= 1 && l.default_num_sms <= l.max_sms, "default_num_sms %d outside [1, max_sms]",
        l.default_num_sms);

  /* Each limit is the bound a call enforces: at the limit accepted, one past it rejected naming the limit. */
  size_t bytes = 0;
  CHECK(ep_ll_buffer_size_hint(l.ll_max_tokens_per_rank, 128, 1, 1, 1, &bytes) == EP_STATUS_SUCCESS,
        "T at ll_max_tokens_per_rank: %s", ep_last_error(NULL));
  CHECK(ep_ll_buffer_size_hint(1, l.max_hidden, 1, 1, 1, &bytes) == EP_STATUS_SUCCESS, "hidden at max_hidden: %s",
        ep_last_error(NULL));
  CHECK(ep_ll_buffer_size_hint(1, 128, l.max_ranks, l.max_ranks, 1, &bytes) == EP_STATUS_SUCCESS,
        "num_ranks at max_ranks: %s", ep_last_error(NULL));
  CHECK(ep_ll_buffer_size_hint(1, 128, 1, 1, l.max_topk, &bytes) == EP_STATUS_SUCCESS, "max_topk at its limit: %s",
        ep_last_error(NULL));
  char want[64];
  snprintf(want, sizeof(want), "[1, %d]", l.ll_max_tokens_per_rank);
  EXPECT_FAIL(ep_ll_buffer_size_hint(l.ll_max_tokens_per_rank + 1, 128, 1, 1, 1, &bytes), NULL,
              EP_STATUS_INVALID_ARGUMENT, want);
  snprintf(want, sizeof(want), "at most %d", l.max_hidden);
  EXPECT_FAIL(ep_ll_buffer_size_hint(1, l.max_hidden + 128, 1, 1, 1, &bytes), NULL, EP_STATUS_INVALID_ARGUMENT,
              want);
  snprintf(want, sizeof(want), "[1, %d]", l.max_ranks);
  EXPECT_FAIL(ep_ll_buffer_size_hint(1, 128, l.max_ranks + 1, l.max_ranks + 1, 1, &bytes), NULL,
              EP_STATUS_INVALID_ARGUMENT, want);
  snprintf(want, sizeof(want), "[1, %d]", l.max_topk);
  EXPECT_FAIL(ep_ll_buffer_size_hint(1, 128, 1, 1, l.max_topk + 1, &bytes), NULL, EP_STATUS_INVALID_ARGUMENT, want);
  /* The config checks run before any device is looked for. */
  ep_group_t g = NULL;
  ep_unique_id_t id;
  memset(&id, 0, sizeof(id));
  ep_group_config_t c = EP_GROUP_CONFIG_INIT;
  c.num_sms = l.max_sms + 1;
  snprintf(want, sizeof(want), "config.num_sms is %d; it must be in [0, %d]", c.num_sms, l.max_sms);
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 1, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, want);
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.max_sms = l.max_sms + 1;
  snprintf(want, sizeof(want), "config.max_sms is %d; it must be in [0, %d]", c.max_sms, l.max_sms);
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 1, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, want);
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.timeout_seconds = l.max_timeout_seconds + 1.0;
  snprintf(want, sizeof(want), "it must be in [%g, %d]", EP_MIN_TIMEOUT_SECONDS, l.max_timeout_seconds);
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 1, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, want);
  c = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  c.ll_max_tokens_per_rank = l.ll_max_tokens_per_rank + 1;
  snprintf(want, sizeof(want), "it must be in [0, %d]", l.ll_max_tokens_per_rank);
  EXPECT_FAIL(ep_group_create(&g, &id, 0, 1, 0, &c), NULL, EP_STATUS_INVALID_ARGUMENT, want);
}

/* ep_ll_handle_get_state mirrors the handle's place in the two-buffer turn-taking, and agrees with the calls that
 * enforce it (ep_ll_get_combine_buffer, ep_ll_combine, ep_ll_clean's reset). */
static void test_ll_handle_state(void) {
  ep_ll_handle_state_t s = EP_LL_HANDLE_STATE_INIT;
  EXPECT_FAIL(ep_ll_handle_get_state(NULL, &s), NULL, EP_STATUS_INVALID_ARGUMENT, "handle is NULL");
  struct ep_group host_group = make_host_group(4);
  ep_live_add(&host_group, EP_OBJECT_GROUP); /* calls look their group up */
  host_group.config.ll_max_tokens_per_rank = 128;
  host_group.ll_region = ep_ll_region(4, 256, 128, 7168, 8);
  ep_group_t g = &host_group;
  struct ep_ll_handle handle;
  ep_live_add(&handle, EP_OBJECT_LL_HANDLE);
  memset(&handle, 0, sizeof(handle));
  handle.group = g;
  EXPECT_FAIL(ep_ll_handle_get_state(&handle, NULL), g, EP_STATUS_INVALID_ARGUMENT, "state is NULL");
  s.size = 8;
  EXPECT_FAIL(ep_ll_handle_get_state(&handle, &s), g, EP_STATUS_INVALID_ARGUMENT, "state.size is 8");
  EXPECT_FAIL(ep_ll_handle_get_state(&handle, &s), g, EP_STATUS_INVALID_ARGUMENT, "EP_LL_HANDLE_STATE_INIT");

  /* Before its first dispatch. */
  s = (ep_ll_handle_state_t)EP_LL_HANDLE_STATE_INIT;
  CHECK(ep_ll_handle_get_state(&handle, &s) == EP_STATUS_SUCCESS, "get_state: %s", ep_last_error(g));
  CHECK(s.half == -1 && s.serial == 0 && !s.is_current && !s.dispatch_recv_pending && !s.combine_recv_pending,
        "fresh handle: half %d serial %llu current %d pending %d/%d", s.half, (unsigned long long)s.serial,
        s.is_current, s.dispatch_recv_pending, s.combine_recv_pending);

  /* Dispatch 3 took half 0 and waits for its receive phase. */
  void* buffer = NULL;
  handle.dispatched = true;
  handle.half = 0;
  handle.serial = 3;
  handle.dispatch_recv_pending = true;
  host_group.ll_half_serial[0] = 3;
  CHECK(ep_ll_handle_get_state(&handle, &s) == EP_STATUS_SUCCESS, "get_state: %s", ep_last_error(g));
  CHECK(s.half == 0 && s.serial == 3 && s.is_current && s.dispatch_recv_pending && !s.combine_recv_pending,
        "dispatch 3 pending: half %d serial %llu current %d pending %d/%d", s.half, (unsigned long long)s.serial,
        s.is_current, s.dispatch_recv_pending, s.combine_recv_pending);
  handle.dispatch_recv_pending = false;
  handle.combine_recv_pending = true;
  CHECK(ep_ll_handle_get_state(&handle, &s) == EP_STATUS_SUCCESS && !s.dispatch_recv_pending &&
            s.combine_recv_pending, "combine pending: %d/%d", s.dispatch_recv_pending, s.combine_recv_pending);
  handle.combine_recv_pending = false;
  CHECK(ep_ll_handle_get_state(&handle, &s) == EP_STATUS_SUCCESS && s.is_current, "current");
  CHECK(ep_ll_get_combine_buffer(g, &handle, &buffer) == EP_STATUS_SUCCESS,
        "a current handle has a combine buffer: %s", ep_last_error(g));

  /* Dispatch 5 took half 0: the handle is no longer current, and the calls refuse it. */
  host_group.ll_half_serial[0] = 5;
  CHECK(ep_ll_handle_get_state(&handle, &s) == EP_STATUS_SUCCESS && !s.is_current && s.serial == 3 && s.half == 0,
        "after the dispatch after next: current %d serial %llu half %d", s.is_current, (unsigned long long)s.serial,
        s.half);
  EXPECT_FAIL(ep_ll_get_combine_buffer(g, &handle, &buffer), g, EP_STATUS_INVALID_USAGE, "two-buffer rule");

  /* Half 1, then ep_ll_clean's reset of the halves' owners: not current either. */
  handle.half = 1;
  handle.serial = 6;
  host_group.ll_half_serial[1] = 6;
  CHECK(ep_ll_handle_get_state(&handle, &s) == EP_STATUS_SUCCESS && s.is_current && s.half == 1 && s.serial == 6,
        "dispatch 6 on half 1: current %d half %d", s.is_current, s.half);
  host_group.ll_half_serial[0] = host_group.ll_half_serial[1] = 0;
  CHECK(ep_ll_handle_get_state(&handle, &s) == EP_STATUS_SUCCESS && !s.is_current, "after a clean: current %d",
        s.is_current);
}

int main(void) {
  test_status_strings();
  test_group_create_args();
  test_group_calls();
  test_layout_args();
  test_ll_size_hint();
  test_ll_args();
  test_rank_mask_args();
  test_expert_map_args();
  test_ll_region_bytes();
  test_normal_args();
  test_hidden_rule();
  test_ll_handle_carve();
  test_handle_in();
  test_limits();
  test_ll_handle_state();
  printf("test_api: %d failed checks\n", g_check_failures);
  return TEST_RESULT();
}
