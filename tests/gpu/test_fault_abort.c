/* test_fault_abort: ep_group_abort after a fatal fault. Rank 0 times out waiting for the last rank (which stays
 * away), then aborts: the abort returns at once (no peer, no device wait), the group and its handle are gone as
 * after destroy, and ep_group_create says that a new group needs a new process. The process then exits without
 * NVSHMEM's shutdown: a run that hangs at exit fails under ep_launch's time limit. Every rank aborts, once rank 0
 * has timed out. */
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
  cfg.timeout_seconds = 1.0;
  ep_group_t g = NULL;
  ep_status_t st = harness_group_create(&h, &cfg, &g);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s", ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return TEST_RESULT();
  ep_handle_t handle = NULL;
  CHECK(ep_handle_create(g, &handle) == EP_STATUS_SUCCESS, "handle: %s", ep_last_error(g));
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const int absent = h.num_ranks - 1;
  if (h.rank != absent) {
    st = ep_group_check(g, stream);
    CHECK(st == EP_STATUS_TIMEOUT, "check with rank %d away gave %s (%s)", absent, ep_status_string(st),
          ep_last_error(g));
  }
  harness_barrier(&h, "timed_out"); /* the last rank stays away from the check, not from the process */
  double t0 = now_s();
  st = ep_group_abort(g);
  const double abort_s = now_s() - t0;
  CHECK(st == EP_STATUS_SUCCESS, "abort: %s", ep_last_error(NULL));
  CHECK(abort_s < 0.5, "abort took %.3f s", abort_s);
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
