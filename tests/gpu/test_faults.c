/* test_faults: faults met at the edges of a group's life, on real groups.
 *
 *  1. Ranks that disagree on the config: the last rank asks for another hidden size. Every rank's ep_group_create
 *     fails with EP_STATUS_INVALID_ARGUMENT naming the last rank and config.hidden (none hangs: the check is one
 *     exchange and a barrier, before the workspace is allocated), and a group made next with one config works.
 *  2. Objects used after they are freed: a handle and an LL handle destroyed after their group (orphans: success),
 *     the group destroyed twice and asked for its info after destroy (EP_STATUS_INVALID_USAGE, no memory error).
 *  3. An expert id out of range in the layout, and in an eager prepare on rank 0 only: reported to the rank that
 *     made it (EP_STATUS_DEVICE_ERROR) and the group keeps working (the next group check passes on every rank).
 *     Two layout calls overlapping on two streams: the second is refused. Handle destroy waits for the handle's
 *     own work only: with another stream held 300 ms by a host function it returns at once.
 *  4. The fatal cases, each in a fresh process of its own (harness_run_case: a failed group's destroy leaves
 *     NVSHMEM to the process, which then makes no other group): "published", a published fault (rank 0 stalls;
 *     rank 1 times out first, over an unread data fault, and the others get EP_STATUS_PEER_FAILED long before their
 *     own budget); "destroy", a destroy whose barrier a rank never reaches (EP_STATUS_TIMEOUT naming it, within the
 *     budget). `test_faults CASE` runs one of them alone.
 *  5. "exit-after-reinit", in a fresh process too: two groups made and destroyed, a third aborted, and main returns.
 *     The process must exit with status 0. NVSHMEM registers an exit handler at each initialisation; with NVSHMEM
 *     still up at exit, the second one to run would call into the bootstrap plugin the first unloaded (SIGSEGV,
 *     status 139), unless the transport ends NVSHMEM the non-collective way first (nvshmem_host.cu, NOTES).
 * Every rank prints one line per case: name, outcome, seconds. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "common/check.h"
#include "gpu/harness.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void CUDART_CB sleep_200ms(void* unused) {
  (void)unused;
  struct timespec ts = {0, 200000000};
  nanosleep(&ts, NULL);
}

static void CUDART_CB sleep_300ms(void* unused) {
  (void)unused;
  struct timespec ts = {0, 300000000};
  nanosleep(&ts, NULL);
}

static ep_group_config_t small_config(const harness_t* h) {
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.num_experts = 4 * h->num_ranks;
  cfg.hidden = 1024;
  cfg.max_tokens_per_rank = 64;
  cfg.ll_max_tokens_per_rank = 16;
  cfg.timeout_seconds = 5.0;
  return cfg;
}

static void case_config_disagreement(const harness_t* h) {
  ep_group_config_t cfg = small_config(h);
  const int odd = h->num_ranks - 1;
  if (h->rank == odd) cfg.hidden = 2048;
  ep_group_t g = NULL;
  double t0 = now_s();
  ep_status_t st = harness_group_create(h, &cfg, &g);
  char want[96];
  snprintf(want, sizeof(want), "rank %d has config.hidden = 2048 but rank 0 has 1024", odd);
  CHECK(st == EP_STATUS_INVALID_ARGUMENT && g == NULL, "create with disagreeing configs gave %s", ep_status_string(st));
  CHECK(strstr(ep_last_error(NULL), want) != NULL, "message \"%s\" lacks \"%s\"", ep_last_error(NULL), want);
  printf("rank %d: config disagreement: %s in %.3f s: %s\n", h->rank, ep_status_string(st), now_s() - t0,
         ep_last_error(NULL));
  if (g) ep_group_destroy(g);
  harness_barrier(h, "disagreed");
}

static void case_use_after_destroy(const harness_t* h) {
  ep_group_config_t cfg = small_config(h);
  ep_group_t g = NULL;
  ep_status_t st = harness_group_create(h, &cfg, &g);
  CHECK(st == EP_STATUS_SUCCESS, "create after the disagreement: %s", ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return;
  ep_handle_t handle = NULL;
  ep_ll_handle_t ll = NULL;
  CHECK(ep_handle_create(g, &handle) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(g));
  CHECK(ep_ll_handle_create(g, &ll) == EP_STATUS_SUCCESS, "LL handle: %s", ep_last_error(g));
  cudaStream_t stream;
  cudaStreamCreate(&stream);

  /* A bad expert id in the layout is this rank's data fault; the group keeps working. */
  int64_t* topk = NULL;
  int *per_rank = NULL, *per_expert = NULL;
  uint8_t* in_rank = NULL;
  cudaMalloc((void**)&topk, 2 * sizeof(int64_t));
  cudaMalloc((void**)&per_rank, sizeof(int) * (size_t)h->num_ranks);
  cudaMalloc((void**)&per_expert, sizeof(int) * (size_t)cfg.num_experts);
  cudaMalloc((void**)&in_rank, (size_t)h->num_ranks);
  const int64_t ids[2] = {0, cfg.num_experts + 7};
  cudaMemcpy(topk, ids, sizeof(ids), cudaMemcpyHostToDevice);
  ep_layout_args_t la = EP_LAYOUT_ARGS_INIT;
  la.topk_idx = topk;
  la.num_tokens = 1;
  la.num_topk = 2;
  la.num_experts = cfg.num_experts;
  la.num_tokens_per_rank = per_rank;
  la.num_tokens_per_expert = per_expert;
  la.is_token_in_rank = in_rank;
  CHECK(ep_get_dispatch_layout(g, &la, stream) == EP_STATUS_SUCCESS, "layout launch: %s", ep_last_error(g));
  cudaStreamSynchronize(stream);
  ep_status_t async_st = EP_STATUS_SUCCESS;
  ep_get_async_error(g, &async_st);
  CHECK(async_st == EP_STATUS_DEVICE_ERROR, "bad expert id gave %s", ep_status_string(async_st));
  CHECK(ep_group_check(g, stream) == EP_STATUS_SUCCESS, "group check after a data fault: %s", ep_last_error(g));
  printf("rank %d: bad expert id in layout: %s, then group check ok\n", h->rank, ep_status_string(async_st));

  /* The same bad id on rank 0 only, in an eager prepare (collective): rank 0's call reports it once its kernel has
   * run (the status after the call), the other ranks' calls succeed, and the group keeps working. */
  if (h->rank != 0) cudaMemcpy(topk, ids, sizeof(int64_t), cudaMemcpyHostToDevice); /* {0, 0}: fine */
  ep_dispatch_prepare_args_t pa = EP_DISPATCH_PREPARE_ARGS_INIT;
  pa.topk_idx = topk;
  pa.num_tokens = 1;
  pa.num_topk = h->rank == 0 ? 2 : 1;
  pa.num_experts = cfg.num_experts;
  int num_recv = -1;
  pa.num_recv_tokens = &num_recv;
  st = ep_dispatch_prepare(g, handle, &pa, stream);
  CHECK(st == (h->rank == 0 ? EP_STATUS_DEVICE_ERROR : EP_STATUS_SUCCESS), "prepare with a bad id on rank 0: %s (%s)",
        ep_status_string(st), ep_last_error(g));
  CHECK(ep_group_check(g, stream) == EP_STATUS_SUCCESS, "group check after the prepare: %s", ep_last_error(g));
  printf("rank %d: bad expert id in an eager prepare on rank 0: %s, then group check ok\n", h->rank,
         ep_status_string(st));

  /* A bad id in an LL dispatch on rank 0 only: treated as -1 there (the token still reaches expert 0), reported to
   * rank 0 alone by ep_get_async_error, and every rank's dispatch ran: expert 0 (on rank 0) got one row per rank. */
  {
    const int E = cfg.num_experts, E_loc = E / h->num_ranks, T = cfg.ll_max_tokens_per_rank, H = cfg.hidden;
    void *x = NULL, *recv_x = NULL;
    int* recv_count = NULL;
    cudaMalloc(&x, sizeof(uint16_t) * (size_t)H);
    cudaMemset(x, 0, sizeof(uint16_t) * (size_t)H);
    cudaMalloc(&recv_x, sizeof(uint16_t) * (size_t)E_loc * (size_t)(h->num_ranks * T) * (size_t)H);
    cudaMalloc((void**)&recv_count, sizeof(int) * (size_t)E_loc);
    const int64_t ll_ids[2] = {0, h->rank == 0 ? E + 3 : 1};
    cudaMemcpy(topk, ll_ids, sizeof(ll_ids), cudaMemcpyHostToDevice);
    ep_ll_dispatch_args_t da = EP_LL_DISPATCH_ARGS_INIT;
    da.x = x;
    da.num_tokens = 1;
    da.hidden = H;
    da.topk_idx = topk;
    da.num_topk = 2;
    da.num_experts = E;
    da.max_tokens_per_rank = T;
    da.recv_dtype = EP_BF16;
    da.recv_x = recv_x;
    da.recv_count = recv_count;
    st = ep_ll_dispatch(g, ll, &da, stream);
    CHECK(st == EP_STATUS_SUCCESS, "LL dispatch with a bad id on rank 0: %s (%s)", ep_status_string(st),
          ep_last_error(g));
    cudaStreamSynchronize(stream);
    ep_get_async_error(g, &async_st);
    CHECK(async_st == (h->rank == 0 ? EP_STATUS_DEVICE_ERROR : EP_STATUS_SUCCESS), "LL bad id reported as %s",
          ep_status_string(async_st));
    int count0 = -1;
    cudaMemcpy(&count0, recv_count, sizeof(int), cudaMemcpyDeviceToHost);
    if (h->rank == 0) CHECK(count0 == h->num_ranks, "expert 0 received %d rows, want %d", count0, h->num_ranks);
    CHECK(ep_ll_clean(g, stream) == EP_STATUS_SUCCESS, "LL clean after the data fault: %s", ep_last_error(g));
    CHECK(ep_group_check(g, stream) == EP_STATUS_SUCCESS, "group check after the LL data fault: %s", ep_last_error(g));
    printf("rank %d: bad expert id in an LL dispatch on rank 0: %s, expert 0 rows %d\n", h->rank,
           ep_status_string(async_st), count0);
    cudaFree(x);
    cudaFree(recv_x);
    cudaFree(recv_count);
  }

  /* Handle destroy waits for the handle's own work only, never for the device (it used to synchronise it). With a
   * 300 ms host function holding another stream, destroying a handle whose prepare is done, and an LL handle never
   * used, returns at once; so does destroying a handle whose prepare still waits behind that function: its memory
   * is freed on the group's stream once the prepare has run (the group check after it passes on every rank). */
  {
    const int64_t fine[2] = {0, 1};
    cudaMemcpy(topk, fine, sizeof(fine), cudaMemcpyHostToDevice);
    int* recv_dev = NULL;
    cudaMalloc((void**)&recv_dev, sizeof(int) * (size_t)(1 + cfg.num_experts / h->num_ranks));
    ep_dispatch_prepare_args_t ga = EP_DISPATCH_PREPARE_ARGS_INIT;
    ga.topk_idx = topk;
    ga.num_tokens = 1;
    ga.num_topk = 2;
    ga.num_experts = cfg.num_experts;
    ga.num_recv_tokens_dev = recv_dev;
    ga.num_recv_tokens_per_expert_dev = recv_dev + 1;
    ep_handle_t done = NULL, pending = NULL;
    ep_ll_handle_t unused = NULL;
    CHECK(ep_handle_create(g, &done) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(g));
    CHECK(ep_handle_create(g, &pending) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(g));
    CHECK(ep_ll_handle_create(g, &unused) == EP_STATUS_SUCCESS, "LL handle: %s", ep_last_error(g));
    CHECK(ep_dispatch_prepare(g, done, &ga, stream) == EP_STATUS_SUCCESS, "prepare: %s", ep_last_error(g));
    cudaStreamSynchronize(stream);
    cudaStream_t busy;
    cudaStreamCreate(&busy);
    cudaLaunchHostFunc(busy, sleep_300ms, NULL);
    double t0 = now_s();
    CHECK(ep_handle_destroy(done) == EP_STATUS_SUCCESS, "destroy: %s", ep_last_error(g));
    CHECK(ep_ll_handle_destroy(unused) == EP_STATUS_SUCCESS, "LL destroy: %s", ep_last_error(g));
    const double done_s = now_s() - t0;
    CHECK(ep_dispatch_prepare(g, pending, &ga, busy) == EP_STATUS_SUCCESS, "prepare behind the host function: %s",
          ep_last_error(g));
    t0 = now_s();
    CHECK(ep_handle_destroy(pending) == EP_STATUS_SUCCESS, "destroy of the pending handle: %s", ep_last_error(g));
    const double pending_s = now_s() - t0;
    cudaStreamSynchronize(busy);
    CHECK(done_s < 0.1 && pending_s < 0.1, "handle destroy waited for other work: %.3f s (done), %.3f s (pending)",
          done_s, pending_s);
    CHECK(ep_group_check(g, stream) == EP_STATUS_SUCCESS, "group check after the destroys: %s", ep_last_error(g));
    printf("rank %d: handle destroy with another stream busy for 0.3 s: %.3f s (work done), %.3f s (work pending)\n",
           h->rank, done_s, pending_s);
    cudaStreamDestroy(busy);
    cudaFree(recv_dev);
  }

  /* Two layout calls overlapping on two streams would share the group's scratch: the second is refused while the
   * first waits behind a 200 ms host function, and runs once the first is done. */
  const int64_t good[2] = {0, 1};
  cudaMemcpy(topk, good, sizeof(good), cudaMemcpyHostToDevice);
  cudaStream_t other;
  cudaStreamCreate(&other);
  cudaLaunchHostFunc(stream, sleep_200ms, NULL);
  la.num_topk = 2;
  CHECK(ep_get_dispatch_layout(g, &la, stream) == EP_STATUS_SUCCESS, "layout behind the sleep: %s", ep_last_error(g));
  st = ep_get_dispatch_layout(g, &la, other);
  CHECK(st == EP_STATUS_INVALID_USAGE && strstr(ep_last_error(g), "another stream") != NULL,
        "overlapping layout on another stream gave %s (%s)", ep_status_string(st), ep_last_error(g));
  cudaStreamSynchronize(stream);
  CHECK(ep_get_dispatch_layout(g, &la, other) == EP_STATUS_SUCCESS, "layout after the first finished: %s",
        ep_last_error(g));
  cudaStreamSynchronize(other);
  cudaStreamDestroy(other);
  printf("rank %d: overlapping layouts on two streams: %s\n", h->rank, ep_status_string(st));
  cudaFree(topk);
  cudaFree(per_rank);
  cudaFree(per_expert);
  cudaFree(in_rank);
  cudaStreamDestroy(stream);

  CHECK(ep_group_destroy(g) == EP_STATUS_SUCCESS, "destroy: %s", ep_last_error(NULL));
  CHECK(ep_group_destroy(g) == EP_STATUS_INVALID_USAGE, "second destroy is not refused");
  ep_group_info_t info;
  CHECK(ep_group_get_info(g, &info) == EP_STATUS_INVALID_USAGE, "info after destroy is not refused");
  CHECK(ep_handle_destroy(handle) == EP_STATUS_SUCCESS, "orphan handle destroy: %s", ep_last_error(NULL));
  CHECK(ep_ll_handle_destroy(ll) == EP_STATUS_SUCCESS, "orphan LL handle destroy: %s", ep_last_error(NULL));
  CHECK(ep_handle_destroy(handle) == EP_STATUS_INVALID_USAGE, "second handle destroy is not refused");
  printf("rank %d: use after destroy: refused, orphans destroyed\n", h->rank);
}

static void make_data_fault(const harness_t* h, ep_group_t g, const ep_group_config_t* cfg, cudaStream_t stream) {
  int64_t* topk = NULL;
  int *per_rank = NULL, *per_expert = NULL;
  uint8_t* in_rank = NULL;
  cudaMalloc((void**)&topk, sizeof(int64_t));
  cudaMalloc((void**)&per_rank, sizeof(int) * (size_t)h->num_ranks);
  cudaMalloc((void**)&per_expert, sizeof(int) * (size_t)cfg->num_experts);
  cudaMalloc((void**)&in_rank, (size_t)h->num_ranks);
  const int64_t bad = -5;
  cudaMemcpy(topk, &bad, sizeof(bad), cudaMemcpyHostToDevice);
  ep_layout_args_t la = EP_LAYOUT_ARGS_INIT;
  la.topk_idx = topk;
  la.num_tokens = 1;
  la.num_topk = 1;
  la.num_experts = cfg->num_experts;
  la.num_tokens_per_rank = per_rank;
  la.num_tokens_per_expert = per_expert;
  la.is_token_in_rank = in_rank;
  CHECK(ep_get_dispatch_layout(g, &la, stream) == EP_STATUS_SUCCESS, "layout: %s", ep_last_error(g));
  cudaStreamSynchronize(stream); /* the data fault is in the word, unread */
  cudaFree(topk);
  cudaFree(per_rank);
  cudaFree(per_expert);
  cudaFree(in_rank);
}

/* After a fatal fault a destroy frees the group on this rank alone, at once (no barrier: a failed peer may never
 * come), and the process cannot make another group. */
static void check_local_destroy(const harness_t* h, ep_group_t g, const char* name) {
  double t0 = now_s();
  ep_status_t st = ep_group_destroy(g);
  const double destroy_s = now_s() - t0;
  CHECK(st == EP_STATUS_SUCCESS && destroy_s < 0.5, "%s: destroy after the fault gave %s in %.3f s (%s)", name,
        ep_status_string(st), destroy_s, ep_last_error(NULL));
  ep_unique_id_t id;
  memset(&id, 0, sizeof(id));
  ep_group_t again = NULL;
  ep_group_config_t cfg = small_config(h);
  st = ep_group_create(&again, &id, h->rank, h->num_ranks, h->cuda_device, &cfg);
  CHECK(st == EP_STATUS_INVALID_USAGE && strstr(ep_last_error(NULL), "new process") != NULL,
        "%s: create after a local destroy gave %s (%s)", name, ep_status_string(st), ep_last_error(NULL));
  printf("rank %d: %s: local destroy in %.3f s\n", h->rank, name, destroy_s);
}

/* One rank's fatal fault ends every peer's waits at once. Rank 0 stalls 3 s before a group check; rank 1, whose
 * budget is 1 s, times out waiting for it first, over an unread data fault of its own (fatal outranks data), and
 * publishes the timeout. Every other rank (budget 10 s) gets EP_STATUS_PEER_FAILED naming rank 1 and its cause
 * within rank 1's budget plus slack; rank 0, arriving late to a check whose blocks all came, gets it at once. The
 * first fatal message stays; every destroy is local and prompt. */
static void case_published_fault(const harness_t* h) {
  ep_group_config_t cfg = small_config(h);
  const double budget = h->rank == 1 ? 1.0 : 10.0, origin_budget = 1.0, slack = 1.5, stall = 3.0;
  cfg.timeout_seconds = budget; /* each rank's own */
  ep_group_t g = NULL;
  ep_status_t st = harness_group_create(h, &cfg, &g);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s", ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return;
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  if (h->rank == 1) make_data_fault(h, g, &cfg, stream);
  harness_barrier(h, "published_start");
  if (h->rank == 0) {
    struct timespec ts = {(time_t)stall, 0};
    nanosleep(&ts, NULL);
  }
  const double t0 = now_s();
  st = ep_group_check(g, stream);
  const double wait_s = now_s() - t0;
  const char* want = h->rank == 1 ? "rank 1 timed out" : "rank 1 failed: timed out waiting for rank 0";
  const ep_status_t want_st = h->rank == 1 ? EP_STATUS_TIMEOUT : EP_STATUS_PEER_FAILED;
  const double most_s = h->rank == 0 ? 0.5 : origin_budget + slack;
  CHECK(st == want_st && strstr(ep_last_error(g), want) != NULL && strstr(ep_last_error(g), "waiting for rank 0"),
        "published fault: %s (%s), want %s with \"%s\"", ep_status_string(st), ep_last_error(g),
        ep_status_string(want_st), want);
  CHECK(wait_s < most_s, "published fault: rank %d reported after %.3f s, want under %.3f s", h->rank, wait_s, most_s);
  printf("rank %d: published fault (rank 0 stalls %.0f s, rank 1's budget %.0f s, mine %.0f s): %s in %.3f s: %s\n",
         h->rank, stall, origin_budget, budget, ep_status_string(st), wait_s, ep_last_error(g));
  st = ep_group_check(g, stream);
  CHECK(st == EP_STATUS_INVALID_USAGE && strstr(ep_last_error(g), want) != NULL, "a call after the fault: %s (%s)",
        ep_status_string(st), ep_last_error(g));
  cudaStreamDestroy(stream);
  check_local_destroy(h, g, "published fault");
}

/* The group's barrier has the time budget: the last rank stays away from ep_group_destroy, and every other
 * rank's destroy returns EP_STATUS_TIMEOUT naming it (or EP_STATUS_PEER_FAILED, where another rank's timeout
 * was published first) within the budget plus slack, freeing the group on that rank alone. The last rank's
 * destroy, once it comes, sees the published fault and frees its group at once. */
static void case_destroy_without_a_peer(const harness_t* h) {
  ep_group_config_t cfg = small_config(h);
  cfg.timeout_seconds = 1.0;
  ep_group_t g = NULL;
  ep_status_t st = harness_group_create(h, &cfg, &g);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s", ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return;
  const int absent = h->num_ranks - 1;
  char want[64];
  snprintf(want, sizeof(want), "waiting for rank %d", absent);
  if (h->rank != absent) {
    const double t0 = now_s();
    st = ep_group_destroy(g);
    const double wait_s = now_s() - t0;
    CHECK((st == EP_STATUS_TIMEOUT || st == EP_STATUS_PEER_FAILED) && strstr(ep_last_error(NULL), want) != NULL &&
              strstr(ep_last_error(NULL), "barrier") != NULL,
          "destroy with rank %d away gave %s (%s)", absent, ep_status_string(st), ep_last_error(NULL));
    CHECK(wait_s < cfg.timeout_seconds + 1.5, "destroy with rank %d away took %.3f s", absent, wait_s);
    printf("rank %d: destroy with rank %d away: %s in %.3f s: %s\n", h->rank, absent, ep_status_string(st), wait_s,
           ep_last_error(NULL));
  }
  harness_barrier(h, "destroyed_without_a_peer");
  if (h->rank == absent) check_local_destroy(h, g, "destroy after the others gave up");
}

/* The pass is this process's exit status (0; 139 is the SIGSEGV inside exit), read by harness_run_case or
 * ep_launch. The test waits for its abort's publish kernel and for the other ranks, so that every rank's exit meets
 * an idle device and no peer ends before a rank's publish has reached it. */
static void case_exit_after_reinit(const harness_t* h) {
  ep_group_config_t cfg = small_config(h);
  ep_group_t g = NULL;
  for (int i = 0; i < 3; ++i) {
    ep_status_t st = harness_group_create(h, &cfg, &g);
    CHECK(st == EP_STATUS_SUCCESS, "create %d: %s", i, ep_last_error(NULL));
    if (st != EP_STATUS_SUCCESS) return;
    if (i < 2) CHECK(ep_group_destroy(g) == EP_STATUS_SUCCESS, "destroy %d: %s", i, ep_last_error(NULL));
  }
  CHECK(ep_group_abort(g) == EP_STATUS_SUCCESS, "abort: %s", ep_last_error(NULL));
  cudaDeviceSynchronize();
  harness_barrier(h, "aborted");
  printf("rank %d: exit after 2 destroyed groups and an aborted one: returning from main\n", h->rank);
}

int main(int argc, char** argv) {
  harness_t h;
  int rc = harness_init(&h);
  if (!rc) rc = harness_need_ranks(&h, 2);
  if (rc) return rc;
  if (argc > 1) {
    if (strcmp(argv[1], "published") == 0) case_published_fault(&h);
    else if (strcmp(argv[1], "destroy") == 0) case_destroy_without_a_peer(&h);
    else if (strcmp(argv[1], "exit-after-reinit") == 0) case_exit_after_reinit(&h);
    else CHECK(0, "unknown case %s (published, destroy, exit-after-reinit)", argv[1]);
    return TEST_RESULT();
  }
  case_config_disagreement(&h);
  case_use_after_destroy(&h);
  const char* const fatal_cases[] = {"published", "destroy", "exit-after-reinit"};
  for (int i = 0; i < 3; ++i) {
    const int rc = harness_run_case(&h, fatal_cases[i]);
    CHECK(rc == 0, "the %s case's process ended with %d", fatal_cases[i], rc);
  }
  return TEST_RESULT();
}
