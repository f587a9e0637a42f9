/* test_fault_abort: ep_group_abort, and what the peers see of it. Rank 0 aborts a healthy group while every other
 * rank waits for it in a group check with a 10 s budget: the abort returns at once (no peer, no device wait) and is
 * published, so each other rank's check ends with EP_STATUS_PEER_FAILED "rank 0 failed: aborted the group" within
 * a second or two instead of timing out after 10 s. Then every other rank aborts too (nothing to publish: its group
 * failed already). After an abort the group and its handle are gone as after destroy, and ep_group_create says that
 * a new group needs a new process. The process then exits without NVSHMEM's shutdown: a run that hangs at exit
 * fails under ep_launch's time limit. */
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

int main(void) {
  harness_t h;
  int rc = harness_init(&h);
  if (!rc) rc = harness_need_ranks(&h, 2);
  if (rc) return rc;
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.num_experts = 4 * h.num_ranks;
  cfg.hidden = 1024;
  cfg.max_tokens_per_rank = 64;
  cfg.timeout_seconds = 10.0;
  ep_group_t g = NULL;
  ep_status_t st = harness_group_create(&h, &cfg, &g);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s", ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return TEST_RESULT();
  ep_handle_t handle = NULL;
  CHECK(ep_handle_create(g, &handle) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(g));
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  harness_barrier(&h, "created");
  double abort_s = 0;
  if (h.rank == 0) {
    struct timespec ts = {0, 500000000}; /* the others are waiting in their checks by then */
    nanosleep(&ts, NULL);
    const double t0 = now_s();
    st = ep_group_abort(g);
    abort_s = now_s() - t0;
  } else {
    const double t0 = now_s();
    st = ep_group_check(g, stream);
    const double wait_s = now_s() - t0;
    CHECK(st == EP_STATUS_PEER_FAILED && strstr(ep_last_error(g), "rank 0 failed: aborted the group") != NULL,
          "check while rank 0 aborts gave %s (%s)", ep_status_string(st), ep_last_error(g));
    CHECK(wait_s < 3.0, "rank 0's abort reached this rank after %.3f s (budget %.0f s)", wait_s, cfg.timeout_seconds);
    printf("rank %d: rank 0's abort seen in %.3f s: %s\n", h.rank, wait_s, ep_last_error(g));
    const double t1 = now_s();
    st = ep_group_abort(g);
    abort_s = now_s() - t1;
  }
  CHECK(st == EP_STATUS_SUCCESS, "abort: %s", ep_last_error(NULL));
  CHECK(abort_s < 0.5, "abort took %.3f s", abort_s);
  harness_barrier(&h, "aborted"); /* rank 0 stays until every rank has seen its abort */
  ep_group_info_t info;
  CHECK(ep_group_get_info(g, &info) == EP_STATUS_INVALID_USAGE, "info after abort is not refused");
  CHECK(ep_handle_destroy(handle) == EP_STATUS_SUCCESS, "orphan handle after abort: %s", ep_last_error(NULL));
  ep_unique_id_t id;
  memset(&id, 0, sizeof(id));
  ep_group_t again = NULL;
  st = ep_group_create(&again, &id, h.rank, h.num_ranks, h.cuda_device, &cfg);
  CHECK(st == EP_STATUS_INVALID_USAGE && strstr(ep_last_error(NULL), "new process") != NULL,
        "create after abort gave %s (%s)", ep_status_string(st), ep_last_error(NULL));
  printf("rank %d: abort in %.3f s; create after it: %s\n", h.rank, abort_s, ep_status_string(st));
  cudaStreamDestroy(stream);
  return TEST_RESULT();
}
