/* test_lifecycle: what happens around the calls rather than inside them: objects used after they are freed, the
 * first fatal message kept for the group's life, one thread per group at a time, integer bounds, natural alignment
 * of typed pointers, and the LL receive phase a dropped hook leaves pending. Runs without a GPU, under ASan/UBSan:
 * a use after free or a leak here fails the run even where the statuses look right.
 *
 * Groups are host-only objects (white box, as in test_api.c), made on the heap and registered as live the way
 * ep_group_create registers a real one, so that ep_group_destroy frees them for real. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "core/internal.h"

#define EXPECT_FAIL(call, group, want, needle)                                                             \
  do {                                                                                                     \
    ep_status_t st_ = (call);                                                                              \
    CHECK(st_ == (want), "%s returned %s, want %s", #call, ep_status_string(st_), ep_status_string(want)); \
    CHECK(strstr(ep_last_error(group), (needle)) != NULL, "%s: message \"%s\" lacks \"%s\"", #call,        \
          ep_last_error(group), (needle));                                                                 \
  } while (0)

static ep_device_error_t g_error_word;

static ep_group_t new_host_group(void) {
  ep_group_t g = (ep_group_t)calloc(1, sizeof(*g));
  g->num_ranks = 4;
  g->ranks_per_node = 4;
  g->num_nodes = 1;
  g->config = (ep_group_config_t)EP_GROUP_CONFIG_INIT;
  g->config.ll_max_tokens_per_rank = 128;
  g->normal_region =
      ep_normal_region(4, g->config.num_experts, g->config.max_tokens_per_rank, g->config.hidden, g->config.max_topk);
  g->ll_region = ep_ll_region(4, g->config.num_experts, 128, g->config.hidden, g->config.max_topk);
  g->error_word = &g_error_word;
  CHECK(ep_live_add(g, EP_OBJECT_GROUP), "registering the host group");
  return g;
}

/* Destroy a host group: the real call, with the pinned error word (not pinned here) taken away first. */
static ep_status_t destroy_host_group(ep_group_t g) {
  g->error_word = NULL;
  return ep_group_destroy(g);
}

/* Defect: ep_handle_destroy after ep_group_destroy was a heap use after free, a second ep_group_destroy a double
 * free, ep_group_get_info after destroy a success. Each is now a named EP_STATUS_INVALID_USAGE, and the handles of
 * a destroyed group are orphans that can still be destroyed. */
static void test_use_after_destroy(void) {
  ep_group_t g = new_host_group();
  size_t bytes = 0;
  CHECK(ep_handle_memory_bytes(g, &bytes) == EP_STATUS_SUCCESS, "handle bytes: %s", ep_last_error(g));
  void* memory = aligned_alloc(256, (bytes + 255) / 256 * 256);
  ep_handle_t h = NULL;
  CHECK(ep_handle_create_in(g, memory, bytes, &h) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(g));
  ep_ll_handle_t ll = (ep_ll_handle_t)calloc(1, sizeof(*ll)); /* ep_ll_handle_create needs the device */
  ll->group = g;
  CHECK(ep_live_add(ll, EP_OBJECT_LL_HANDLE), "registering the LL handle");

  (void)destroy_host_group(g); /* no device here: the status may be a CUDA error, the group is gone either way */
  EXPECT_FAIL(ep_group_destroy(g), g, EP_STATUS_INVALID_USAGE, "not a live group");
  ep_group_info_t info;
  EXPECT_FAIL(ep_group_get_info(g, &info), g, EP_STATUS_INVALID_USAGE, "ep_group_get_info: group");
  ep_layout_args_t la = EP_LAYOUT_ARGS_INIT;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &la, 0), g, EP_STATUS_INVALID_USAGE, "destroyed already");
  ep_status_t async_st;
  EXPECT_FAIL(ep_get_async_error(g, &async_st), g, EP_STATUS_INVALID_USAGE, "not a live group");
  EXPECT_FAIL(ep_handle_memory_bytes(g, &bytes), g, EP_STATUS_INVALID_USAGE, "not a live group");
  ep_ll_handle_state_t state = EP_LL_HANDLE_STATE_INIT;
  EXPECT_FAIL(ep_ll_handle_get_state(ll, &state), NULL, EP_STATUS_INVALID_USAGE, "group was destroyed");

  CHECK(ep_handle_destroy(h) == EP_STATUS_SUCCESS, "orphaned handle destroy: %s", ep_last_error(NULL));
  CHECK(ep_ll_handle_destroy(ll) == EP_STATUS_SUCCESS, "orphaned LL handle destroy: %s", ep_last_error(NULL));
  EXPECT_FAIL(ep_handle_destroy(h), NULL, EP_STATUS_INVALID_USAGE, "not a live handle");
  EXPECT_FAIL(ep_ll_handle_destroy(ll), NULL, EP_STATUS_INVALID_USAGE, "not a live LL handle");
  EXPECT_FAIL(ep_ll_get_routing(ll, NULL, NULL), NULL, EP_STATUS_INVALID_USAGE, "not a live LL handle");
  free(memory);

  /* A pointer that was never a group is refused the same way, without being read. */
  struct ep_group never;
  memset(&never, 0, sizeof(never));
  EXPECT_FAIL(ep_group_get_info(&never, &info), NULL, EP_STATUS_INVALID_USAGE, "never created");
  EXPECT_FAIL(ep_group_destroy(&never), NULL, EP_STATUS_INVALID_USAGE, "never created");
}

/* Defect: after a fatal fault every later call overwrote the message with "the group failed earlier" and the
 * fault (peer, site, cause) was lost. It stays readable in every later message for the group's life. */
static void test_first_fatal_message_kept(void) {
  ep_group_t g = new_host_group();
  memset(&g_error_word, 0, sizeof(g_error_word));
  g_error_word.code = EP_FAULT_TIMEOUT;
  g_error_word.rank = 1;
  g_error_word.peer = 3;
  g_error_word.site = EP_SITE_DISPATCH_STAGED;
  g_error_word.value0 = 2000000000;
  ep_layout_args_t la = EP_LAYOUT_ARGS_INIT;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &la, 0), g, EP_STATUS_TIMEOUT, "waiting for rank 3");
  const char* cause = "rank 1 timed out after 2.000 s waiting for rank 3 (node 0, local 3) in dispatch, waiting for "
                      "the peer's staged rows";
  for (int i = 0; i < 3; ++i) { /* later calls, failing for reasons of their own too, keep the first message */
    EXPECT_FAIL(ep_get_dispatch_layout(g, &la, 0), g, EP_STATUS_INVALID_USAGE, "the group failed earlier: ");
    CHECK(strstr(ep_last_error(g), cause) != NULL, "call %d after the fault: \"%s\" lost the cause", i,
          ep_last_error(g));
    size_t bytes;
    EXPECT_FAIL(ep_handle_memory_bytes(g, &bytes), g, EP_STATUS_INVALID_USAGE, cause);
  }
  ep_status_t async_st = EP_STATUS_SUCCESS;
  CHECK(ep_get_async_error(g, &async_st) == EP_STATUS_SUCCESS && async_st == EP_STATUS_INVALID_USAGE,
        "async error after the fault: %s", ep_status_string(async_st));
  CHECK(strstr(ep_last_error(g), cause) != NULL, "ep_get_async_error's message \"%s\" lacks the cause",
        ep_last_error(g));
  /* A second fatal fault does not replace the first. */
  g_error_word.peer = 2;
  g->failed = false;
  (void)ep_get_dispatch_layout(g, &la, 0);
  CHECK(strstr(g->fatal_error, "waiting for rank 3") != NULL, "fatal message replaced: \"%s\"", g->fatal_error);
  memset(&g_error_word, 0, sizeof(g_error_word));
  (void)destroy_host_group(g);
}

/* A fault a peer published (EP_STATUS_PEER_FAILED) names the origin rank and its cause, distinct from this rank's
 * own timeout; it fails the group like any fatal fault. Clearing a reported data fault keeps where faults are
 * published (the error word's group fault fields), or a peer's later fault would no longer end this rank's waits. */
static void test_peer_failed(void) {
  ep_group_t g = new_host_group();
  unsigned long long group_word = 0;
  memset(&g_error_word, 0, sizeof(g_error_word));
  g_error_word.group_fault = &group_word;
  g_error_word.num_ranks = 4;
  g_error_word.code = EP_FAULT_BAD_EXPERT;
  g_error_word.value0 = 1;
  g_error_word.value1 = 77;
  size_t bytes;
  EXPECT_FAIL(ep_handle_memory_bytes(g, &bytes), g, EP_STATUS_DEVICE_ERROR, "holds expert 77");
  CHECK(g_error_word.code == EP_FAULT_NONE, "the data fault was not cleared");
  CHECK(g_error_word.group_fault == &group_word && g_error_word.num_ranks == 4,
        "clearing a data fault forgot where faults are published");

  g_error_word.code = EP_FAULT_PEER_FAILED;
  g_error_word.rank = 1;
  g_error_word.peer = 2; /* the origin */
  g_error_word.site = EP_SITE_DISPATCH_STAGED;
  g_error_word.value0 = EP_FAULT_TIMEOUT; /* its cause */
  g_error_word.value1 = 3;                /* the rank it waited on */
  const char* cause = "rank 2 failed: timed out waiting for rank 3 (node 0, local 3) in dispatch, waiting for the "
                      "peer's staged rows";
  EXPECT_FAIL(ep_handle_memory_bytes(g, &bytes), g, EP_STATUS_PEER_FAILED, cause);
  CHECK(g->failed, "a published fault did not fail the group");
  EXPECT_FAIL(ep_handle_memory_bytes(g, &bytes), g, EP_STATUS_INVALID_USAGE, cause);
  CHECK(strcmp(ep_status_string(EP_STATUS_PEER_FAILED), "EP_STATUS_PEER_FAILED") == 0, "status name");
  memset(&g_error_word, 0, sizeof(g_error_word));
  (void)destroy_host_group(g);

  /* The packing of the group fault word round-trips, the rank waited on included when it is -1. */
  const unsigned long long w = EP_GROUP_FAULT_PACK(EP_FAULT_TIMEOUT, EP_SITE_LL_COMBINE_RECV, 1023, 1022);
  CHECK(w != 0 && EP_GROUP_FAULT_CODE(w) == EP_FAULT_TIMEOUT && EP_GROUP_FAULT_SITE(w) == EP_SITE_LL_COMBINE_RECV &&
            EP_GROUP_FAULT_ORIGIN(w) == 1023 && EP_GROUP_FAULT_PEER(w) == 1022,
        "group fault word 0x%llx", w);
  const unsigned long long a = EP_GROUP_FAULT_PACK(EP_FAULT_ABORTED, 0, 0, -1);
  CHECK(a != 0 && EP_GROUP_FAULT_ORIGIN(a) == 0 && EP_GROUP_FAULT_PEER(a) == -1, "abort word 0x%llx", a);
}

/* Defect: ranks that disagreed on an LL dispatch's T, hidden or num_experts went unnoticed, and a receiver placed a
 * larger sender's rows by its own shape, past its recv_x. Each source now sends its shape word beside its count;
 * a receiver that finds another shape records EP_FAULT_SHAPE_MISMATCH, which names the source and the field, is
 * EP_STATUS_INVALID_ARGUMENT, fails the group, and reads as the cause on the ranks it is published to. */
static void test_ll_shape_mismatch(void) {
  const uint64_t mine = ep_ll_shape_word(128, 7168, 256, 1);
  CHECK(ep_ll_shape_value(mine, EP_LL_SHAPE_TOKENS) == 128 && ep_ll_shape_value(mine, EP_LL_SHAPE_HIDDEN) == 7168 &&
            ep_ll_shape_value(mine, EP_LL_SHAPE_EXPERTS) == 256 && ep_ll_shape_value(mine, EP_LL_SHAPE_FP8) == 1,
        "shape word 0x%llx", (unsigned long long)mine);
  const uint64_t most = ep_ll_shape_word(EP_LL_MAX_TOKENS_PER_RANK, EP_MAX_HIDDEN, EP_LL_MAX_EXPERTS - 1, 0);
  CHECK(ep_ll_shape_value(most, EP_LL_SHAPE_TOKENS) == EP_LL_MAX_TOKENS_PER_RANK &&
            ep_ll_shape_value(most, EP_LL_SHAPE_HIDDEN) == EP_MAX_HIDDEN &&
            ep_ll_shape_value(most, EP_LL_SHAPE_EXPERTS) == EP_LL_MAX_EXPERTS - 1,
        "the largest shape does not round-trip: 0x%llx", (unsigned long long)most);
  CHECK(ep_ll_shape_differs(mine, mine) == EP_LL_SHAPE_AGREES, "a shape differs from itself");
  CHECK(ep_ll_shape_differs(ep_ll_shape_word(64, 7168, 256, 1), mine) == EP_LL_SHAPE_TOKENS, "T");
  CHECK(ep_ll_shape_differs(ep_ll_shape_word(128, 4096, 256, 1), mine) == EP_LL_SHAPE_HIDDEN, "hidden");
  CHECK(ep_ll_shape_differs(ep_ll_shape_word(128, 7168, 288, 1), mine) == EP_LL_SHAPE_EXPERTS, "num_experts");
  CHECK(ep_ll_shape_differs(ep_ll_shape_word(128, 7168, 256, 0), mine) == EP_LL_SHAPE_FP8, "recv_dtype");

  ep_group_t g = new_host_group();
  unsigned long long group_word = 0;
  memset(&g_error_word, 0, sizeof(g_error_word));
  g_error_word.code = EP_FAULT_SHAPE_MISMATCH;
  g_error_word.rank = 1;
  g_error_word.peer = 3;
  g_error_word.site = EP_LL_SHAPE_HIDDEN;
  g_error_word.value0 = 4096;
  g_error_word.value1 = 7168;
  size_t bytes;
  const char* cause = "rank 3 dispatched with hidden 4096, this rank (1) with 7168";
  EXPECT_FAIL(ep_handle_memory_bytes(g, &bytes), g, EP_STATUS_INVALID_ARGUMENT, cause);
  CHECK(g->failed, "a shape disagreement did not fail the group");
  EXPECT_FAIL(ep_handle_memory_bytes(g, &bytes), g, EP_STATUS_INVALID_USAGE, cause);
  memset(&g_error_word, 0, sizeof(g_error_word));
  (void)destroy_host_group(g);

  /* Published to a peer: its PEER_FAILED message names the disagreement. */
  g = new_host_group();
  g_error_word.group_fault = &group_word;
  g_error_word.num_ranks = 4;
  g_error_word.code = EP_FAULT_PEER_FAILED;
  g_error_word.rank = 2;
  g_error_word.peer = 1;                         /* the origin */
  g_error_word.site = EP_LL_SHAPE_TOKENS;        /* the field */
  g_error_word.value0 = EP_FAULT_SHAPE_MISMATCH; /* its cause */
  g_error_word.value1 = 3;                       /* the rank it disagreed with */
  EXPECT_FAIL(ep_handle_memory_bytes(g, &bytes), g, EP_STATUS_PEER_FAILED,
              "rank 1 failed: found that rank 3 passed ep_ll_dispatch another max_tokens_per_rank");
  memset(&g_error_word, 0, sizeof(g_error_word));
  (void)destroy_host_group(g);
}

/* One thread per group at a time: a call while another thread is inside one on the group is refused, naming that
 * call; the group is given back on every return path, so the next call (from any thread) proceeds. */
typedef struct {
  ep_group_t group;
  ep_status_t status;
} thread_call_t;

static void* layout_from_thread(void* arg) {
  thread_call_t* c = (thread_call_t*)arg;
  ep_layout_args_t la = EP_LAYOUT_ARGS_INIT;
  la.num_tokens = -1; /* fails validation after the group is taken: the scope must give it back */
  c->status = ep_get_dispatch_layout(c->group, &la, 0);
  return NULL;
}

static void test_one_thread_at_a_time(void) {
  ep_group_t g = new_host_group();
  ep_layout_args_t la = EP_LAYOUT_ARGS_INIT;
  la.num_tokens = -1;
  EXPECT_FAIL(ep_get_dispatch_layout(g, &la, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens is -1");
  CHECK(atomic_load(&g->busy_thread) == 0, "the group is still marked busy after a failed call");

  thread_call_t c = {g, EP_STATUS_SUCCESS};
  pthread_t t;
  CHECK(pthread_create(&t, NULL, layout_from_thread, &c) == 0, "pthread_create");
  pthread_join(t, NULL);
  CHECK(c.status == EP_STATUS_INVALID_ARGUMENT, "a call from another thread after the first returned: %s",
        ep_status_string(c.status));

  /* Another thread inside ep_dispatch (as the flag says): calls from this thread are refused, destroy too. */
  static char other_thread;
  atomic_store(&g->busy_thread, (uintptr_t)&other_thread);
  atomic_store(&g->busy_fn, "ep_dispatch");
  EXPECT_FAIL(ep_get_dispatch_layout(g, &la, 0), NULL, EP_STATUS_INVALID_USAGE,
              "another thread is inside ep_dispatch on this group");
  EXPECT_FAIL(ep_group_destroy(g), NULL, EP_STATUS_INVALID_USAGE, "another thread is inside ep_dispatch");
  size_t bytes;
  EXPECT_FAIL(ep_handle_memory_bytes(g, &bytes), NULL, EP_STATUS_INVALID_USAGE, "ep_dispatch");
  CHECK(strstr(g->last_error, "another thread") == NULL, "the refusal overwrote the group's message");
  atomic_store(&g->busy_thread, (uintptr_t)0);
  CHECK(ep_handle_memory_bytes(g, &bytes) == EP_STATUS_SUCCESS, "after the other thread left: %s", ep_last_error(g));
  (void)destroy_host_group(g);
}

/* Integer bounds and natural alignment, checked on the host before anything is launched. */
static void test_bounds_and_alignment(void) {
  ep_group_t g = new_host_group();
  const uintptr_t base = 0x10000; /* a made-up device address: the calls fail before touching it */
  ep_layout_args_t la = EP_LAYOUT_ARGS_INIT;
  la.topk_idx = (const int64_t*)base;
  la.num_topk = 8;
  la.num_experts = 256;
  la.num_tokens_per_rank = (int*)base;
  la.num_tokens_per_expert = (int*)base;
  la.is_token_in_rank = (uint8_t*)base;
  la.num_tokens = (1 << 27) + 1; /* times 8 slots: past 2^30 pairs */
  EXPECT_FAIL(ep_get_dispatch_layout(g, &la, 0), g, EP_STATUS_INVALID_ARGUMENT, "num_tokens is 134217729");
  la.num_tokens = 16;
  la.topk_idx = (const int64_t*)(base + 4);
  EXPECT_FAIL(ep_get_dispatch_layout(g, &la, 0), g, EP_STATUS_INVALID_ARGUMENT, "topk_idx");
  EXPECT_FAIL(ep_get_dispatch_layout(g, &la, 0), g, EP_STATUS_INVALID_ARGUMENT, "not 8-byte aligned");
  la.topk_idx = (const int64_t*)base;
  la.num_tokens_per_expert = (int*)(base + 2);
  EXPECT_FAIL(ep_get_dispatch_layout(g, &la, 0), g, EP_STATUS_INVALID_ARGUMENT,
              "num_tokens_per_expert (0x10002) is not 4-byte aligned");

  struct ep_handle handle;
  memset(&handle, 0, sizeof(handle));
  handle.group = g;
  CHECK(ep_live_add(&handle, EP_OBJECT_HANDLE), "registering the handle");
  ep_dispatch_prepare_args_t pa = EP_DISPATCH_PREPARE_ARGS_INIT;
  pa.topk_idx = (const int64_t*)(base + 12);
  pa.num_tokens = 4;
  pa.num_topk = 8;
  pa.num_experts = 256;
  EXPECT_FAIL(ep_dispatch_prepare(g, &handle, &pa, 0), g, EP_STATUS_INVALID_ARGUMENT, "topk_idx (0x1000c)");
  handle.prepared = true;
  handle.num_tokens = 4;
  handle.num_recv_host = -1;
  ep_dispatch_args_t da = EP_DISPATCH_ARGS_INIT;
  da.x = (const void*)base;
  da.hidden = 128;
  da.recv_capacity = 4;
  da.recv_x = (void*)base;
  da.topk_weights = (const float*)(base + 1);
  EXPECT_FAIL(ep_dispatch(g, &handle, &da, 0), g, EP_STATUS_INVALID_ARGUMENT, "topk_weights (0x10001) is not 4-byte");
  ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
  ca.x = (const void*)base;
  ca.hidden = 128;
  ca.combined_x = (void*)base;
  ca.topk_weights = (const float*)base;
  ca.combined_topk_weights = (float*)(base + 6);
  EXPECT_FAIL(ep_combine(g, &handle, &ca, 0), g, EP_STATUS_INVALID_ARGUMENT, "combined_topk_weights");
  ep_live_remove(&handle);
  (void)destroy_host_group(g);
}

/* ep_ll_handle_create leaked its host struct when cudaSetDevice failed (here it fails: no device). LeakSanitizer
 * at exit is the check. */
static void test_ll_handle_create_failure_frees(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) == cudaSuccess && n > 0) {
    printf("a GPU is present: the cudaSetDevice failure of ep_ll_handle_create is not exercised here\n");
    return;
  }
  ep_group_t g = new_host_group();
  ep_ll_handle_t h = (ep_ll_handle_t)0x1;
  CHECK(ep_ll_handle_create(g, &h) != EP_STATUS_SUCCESS && h == NULL, "ep_ll_handle_create without a device");
  (void)destroy_host_group(g);
}

/* A receive hook that was dropped or failed left the LL path wedged: ep_ll_clean refused while a receive phase was
 * pending, and the handle kept its pending flag. ep_ll_clean now abandons pending receive phases. */
static void test_ll_clean_abandons_pending_receive(void) {
  ep_group_t g = new_host_group();
  struct ep_ll_handle handle;
  memset(&handle, 0, sizeof(handle));
  handle.group = g;
  CHECK(ep_live_add(&handle, EP_OBJECT_LL_HANDLE), "registering the LL handle");
  handle.dispatched = true;
  handle.dispatch_recv_pending = true;
  g->ll_half_pending[0] = true;
  /* Without a device the clean fails at its first CUDA call, but not for the pending receive. */
  ep_status_t st = ep_ll_clean(g, 0);
  CHECK(st != EP_STATUS_INVALID_USAGE, "ep_ll_clean refused with a receive pending: %s", ep_last_error(g));
  /* What a clean that ran through leaves (white box: the counters its end sets). */
  g->ll_half_pending[0] = false;
  g->ll_cleans++;
  ep_ll_handle_state_t state = EP_LL_HANDLE_STATE_INIT;
  CHECK(ep_ll_handle_get_state(&handle, &state) == EP_STATUS_SUCCESS && state.dispatch_recv_pending == 0,
        "after a clean the handle's receive is still pending");
  EXPECT_FAIL(ep_ll_dispatch_recv(g, &handle, 0), g, EP_STATUS_INVALID_USAGE, "no dispatch waiting");
  ep_live_remove(&handle);
  (void)destroy_host_group(g);
}

/* The verdict of ep_group_create's config exchange, from the table every rank holds after it (the exchange itself
 * needs NVSHMEM: tests/gpu/test_faults.c). */
static void test_config_agreement(void) {
  ep_group_t g = new_host_group();
  ep_config_record_t table[4];
  for (int r = 0; r < 4; ++r) table[r] = ep_config_record(g);
  char message[256] = "";
  CHECK(ep_config_agreement(table, 4, message, sizeof(message)), "equal configs disagree: %s", message);
  table[3].value[2] = 2048; /* rank 3's hidden */
  table[2].value[4] = 4;    /* rank 2's max_topk: the first difference is the one named */
  CHECK(!ep_config_agreement(table, 4, message, sizeof(message)), "differing configs agree");
  CHECK(strstr(message, "rank 2 has config.max_topk = 4 but rank 0 has 8") != NULL, "message: %s", message);
  table[2] = table[0];
  CHECK(!ep_config_agreement(table, 4, message, sizeof(message)) &&
            strstr(message, "rank 3 has config.hidden = 2048 but rank 0 has 7168") != NULL,
        "message: %s", message);
  /* The rank mask picks the kernels' form (with it, an internode call in rounds takes every round): one for all. */
  table[3] = table[0];
  table[1].value[7] = !table[0].value[7];
  CHECK(!ep_config_agreement(table, 4, message, sizeof(message)) &&
            strstr(message, "rank 1 has config.mask_failed_ranks") != NULL,
        "message: %s", message);
  (void)destroy_host_group(g);
}

/* Configs whose kernels could never launch are refused at create, not by every call (227 KB: an H100's or H200's
 * opt-in shared memory per block). */
static void test_launchable_configs(void) {
  const size_t hopper = 227 * 1024;
  ep_group_t g = new_host_group();
  g->device_sms = 132;
  CHECK(ep_check_launchable(g, hopper) == EP_STATUS_SUCCESS, "the default config: %s", ep_last_error(NULL));
  g->config.num_experts = 1 << 16; /* the layout kernel's histograms alone: 256 KB */
  EXPECT_FAIL(ep_check_launchable(g, hopper), NULL, EP_STATUS_INVALID_ARGUMENT,
              "config.num_experts is 65536: the layout kernel would need");
  g->config.num_experts =
      1 << 15; /* layout 128 KB fits; the LL dispatch send (2 ints per expert, more per token) not */
  g->config.ll_max_tokens_per_rank = 8192;
  g->config.max_topk = 32;
  EXPECT_FAIL(ep_check_launchable(g, hopper), NULL, EP_STATUS_INVALID_ARGUMENT, "the low-latency kernels would need");
  (void)destroy_host_group(g);
}

/* A data fault (a bad expert index) made a rank's next call return it without launching; when that call was
 * collective, the peers waited for the rank until their time budget ran out. Collective calls now leave a data fault
 * pending (ep_get_async_error and the next local call report it) and go on; fatal faults still end them. */
static void test_data_fault_does_not_skip_collectives(void) {
  ep_group_t g = new_host_group();
  const uintptr_t base = 0x10000;
  struct ep_handle handle;
  memset(&handle, 0, sizeof(handle));
  handle.group = g;
  handle.prepared = true;
  handle.num_tokens = 4;
  handle.num_recv_host = -1;
  CHECK(ep_live_add(&handle, EP_OBJECT_HANDLE), "registering the handle");
  ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
  ca.x = (const void*)base;
  ca.hidden = 128;
  ca.combined_x = (void*)base;

  memset(&g_error_word, 0, sizeof(g_error_word));
  g_error_word.code = EP_FAULT_BAD_EXPERT;
  g_error_word.value0 = 5;
  g_error_word.value1 = 999;
  ep_status_t st = ep_combine(g, &handle, &ca, 0); /* no device here: it gets as far as its first CUDA call */
  CHECK(st != EP_STATUS_DEVICE_ERROR, "a collective call returned the pending data fault instead of running: %s",
        ep_last_error(g));
  CHECK(g_error_word.code == EP_FAULT_BAD_EXPERT, "the collective call consumed the data fault");
  ep_status_t async_st = EP_STATUS_SUCCESS;
  CHECK(ep_get_async_error(g, &async_st) == EP_STATUS_SUCCESS && async_st == EP_STATUS_DEVICE_ERROR,
        "ep_get_async_error after it: %s", ep_status_string(async_st));
  CHECK(strstr(ep_last_error(g), "token 5 holds expert 999") != NULL, "message: %s", ep_last_error(g));
  CHECK(g_error_word.code == EP_FAULT_NONE && !g->failed, "the data fault was not cleared, or failed the group");

  g_error_word.code = EP_FAULT_BAD_EXPERT; /* a local call reports it at entry, as before */
  g_error_word.value1 = 999;
  size_t bytes;
  EXPECT_FAIL(ep_handle_memory_bytes(g, &bytes), g, EP_STATUS_DEVICE_ERROR, "holds expert 999");

  g_error_word.code = EP_FAULT_TIMEOUT; /* a fatal fault ends collective calls too */
  g_error_word.peer = 2;
  EXPECT_FAIL(ep_combine(g, &handle, &ca, 0), g, EP_STATUS_TIMEOUT, "waiting for rank 2");
  memset(&g_error_word, 0, sizeof(g_error_word));
  ep_live_remove(&handle);
  (void)destroy_host_group(g);
}

/* ep_group_abort: a local teardown that needs no peer. The group and its handles are gone as after destroy, and the
 * process says plainly that it cannot make another group. Last in main: it marks the process. */
static void test_abort(void) {
  ep_group_t g = new_host_group();
  struct ep_ll_handle* ll = (struct ep_ll_handle*)calloc(1, sizeof(struct ep_ll_handle));
  ll->group = g;
  CHECK(ep_live_add(ll, EP_OBJECT_LL_HANDLE), "registering the LL handle");
  CHECK(ep_group_abort(NULL) == EP_STATUS_SUCCESS, "abort(NULL) is a no-op");
  CHECK(ep_group_abort(g) == EP_STATUS_SUCCESS, "abort: %s", ep_last_error(NULL));
  EXPECT_FAIL(ep_group_abort(g), NULL, EP_STATUS_INVALID_USAGE, "not a live group");
  EXPECT_FAIL(ep_group_destroy(g), NULL, EP_STATUS_INVALID_USAGE, "not a live group");
  CHECK(ep_ll_handle_destroy(ll) == EP_STATUS_SUCCESS, "orphan of an aborted group: %s", ep_last_error(NULL));
  ep_unique_id_t id;
  memset(&id, 0, sizeof(id));
  ep_group_t again = NULL;
  EXPECT_FAIL(ep_group_create(&again, &id, 0, 2, 0, NULL), NULL, EP_STATUS_INVALID_USAGE,
              "a new group needs a new "
              "process");
}

int main(void) {
  test_use_after_destroy();
  test_first_fatal_message_kept();
  test_peer_failed();
  test_ll_shape_mismatch();
  test_one_thread_at_a_time();
  test_bounds_and_alignment();
  test_ll_handle_create_failure_frees();
  test_ll_clean_abandons_pending_receive();
  test_config_agreement();
  test_launchable_configs();
  test_data_fault_does_not_skip_collectives();
  test_abort();
  printf("test_lifecycle: %d failed checks\n", g_check_failures);
  return TEST_RESULT();
}
