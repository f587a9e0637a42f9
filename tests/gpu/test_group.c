/* test_group: group lifecycle and the data paths, on every rank of ep_launch.
 *
 * For each node shape (one NVLink domain; virtual nodes of one rank; virtual nodes of half the ranks) the group
 * is created, its facts checked, ep_group_check run (every pair of ranks exchanges a tagged block through the
 * transport's put-with-signal and through NVLink stores, and verifies it), and destroyed. Creating the next
 * shape after destroying the last is the create/destroy/create check. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "gpu/harness.h"

static void run_shape(const harness_t* h, int ranks_per_node) {
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ranks_per_node = ranks_per_node;
  cfg.num_experts = 8 * h->num_ranks;
  cfg.hidden = 1024;
  cfg.max_tokens_per_rank = 256;
  ep_group_t g = NULL;
  ep_status_t st = harness_group_create(h, &cfg, &g);
  CHECK(st == EP_STATUS_SUCCESS, "create (ranks_per_node=%d): %s: %s", ranks_per_node, ep_status_string(st),
        ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return;

  ep_group_info_t info;
  CHECK(ep_group_get_info(g, &info) == EP_STATUS_SUCCESS, "get_info: %s", ep_last_error(g));
  int rpn = ranks_per_node ? ranks_per_node : h->num_ranks;
  CHECK_EQ_INT(info.rank, h->rank, "info.rank");
  CHECK_EQ_INT(info.num_ranks, h->num_ranks, "info.num_ranks");
  CHECK_EQ_INT(info.ranks_per_node, rpn, "info.ranks_per_node");
  CHECK_EQ_INT(info.num_nodes, h->num_ranks / rpn, "info.num_nodes");
  CHECK_EQ_INT(info.node, h->rank / rpn, "info.node");
  CHECK_EQ_INT(info.local_rank, h->rank % rpn, "info.local_rank");
  CHECK(info.num_nvlink_peers >= rpn, "num_nvlink_peers %d < ranks_per_node %d", info.num_nvlink_peers, rpn);
  CHECK(info.symmetric_heap_bytes > 0, "heap bytes is 0");
  int device_sms = 0;
  cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, h->cuda_device);
  CHECK(info.device_sms >= 1 && info.device_sms <= device_sms, "info.device_sms %d, device has %d SMs",
        info.device_sms, device_sms);
  CHECK(info.num_sms >= 1 && info.num_sms <= info.device_sms, "info.num_sms %d, device_sms %d", info.num_sms,
        info.device_sms);
  const char* mps_percent = getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE");
  printf("rank %d: group SMs %d of the %d the device reports (MPS percentage %s)\n", h->rank, info.device_sms,
         device_sms, mps_percent ? mps_percent : "unset");

  cudaStream_t stream;
  cudaStreamCreate(&stream);
  for (int round = 0; round < 3; ++round) {
    st = ep_group_check(g, stream);
    CHECK(st == EP_STATUS_SUCCESS, "group check round %d (ranks_per_node=%d): %s: %s", round, ranks_per_node,
          ep_status_string(st), ep_last_error(g));
  }
  ep_status_t async_st = EP_STATUS_INTERNAL_ERROR;
  CHECK(ep_get_async_error(g, &async_st) == EP_STATUS_SUCCESS && async_st == EP_STATUS_SUCCESS,
        "async error after clean checks: %s", ep_status_string(async_st));
  cudaStreamDestroy(stream);
  st = ep_group_destroy(g);
  CHECK(st == EP_STATUS_SUCCESS, "destroy: %s", ep_last_error(NULL));
  printf("shape ranks_per_node=%d: create, check x3, destroy done\n", rpn);
}

int main(void) {
  harness_t h;
  int rc = harness_init(&h);
  if (rc) return rc;

  run_shape(&h, 0);
  run_shape(&h, 1);
  if (h.num_ranks >= 4 && h.num_ranks % 2 == 0) run_shape(&h, h.num_ranks / 2); /* 2 nodes: 2x2, 2x4 */
  if (h.num_ranks >= 8 && h.num_ranks % 2 == 0) run_shape(&h, 2);                 /* nodes of 2: 4x2 */
  run_shape(&h, 0); /* and once more after all that */

  /* A device this machine lacks is refused before NVSHMEM starts. */
  ep_unique_id_t id;
  memset(&id, 0, sizeof(id));
  ep_group_t g = NULL;
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.num_experts = 8 * h.num_ranks; /* a config valid at every rank count: the device alone is wrong */
  ep_status_t st = ep_group_create(&g, &id, h.rank, h.num_ranks, h.num_devices + 3, &cfg);
  CHECK(st == EP_STATUS_INVALID_ARGUMENT && g == NULL, "create on a missing device gave %s", ep_status_string(st));
  CHECK(strstr(ep_last_error(NULL), "cuda_device") != NULL, "message does not name cuda_device: %s",
        ep_last_error(NULL));
  return TEST_RESULT();
}
