/* test_timeout: a peer that never answers makes the call fail with EP_STATUS_TIMEOUT naming that peer, instead
 * of hanging. Every rank but the last runs ep_group_check with a 1 s budget while the last rank stays away: the
 * first to time out reports EP_STATUS_TIMEOUT and publishes it, the others may end on that with
 * EP_STATUS_PEER_FAILED; both messages name the absent rank. Then the late rank's check finds the published fault
 * (EP_STATUS_PEER_FAILED), and every rank's destroy is local. */
#include <stdio.h>
#include <string.h>

#include "common/check.h"
#include "gpu/harness.h"

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
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const int absent = h.num_ranks - 1;
  char want[64];
  snprintf(want, sizeof(want), "waiting for rank %d", absent);

  if (h.rank != absent) {
    st = ep_group_check(g, stream);
    CHECK(st == EP_STATUS_TIMEOUT || st == EP_STATUS_PEER_FAILED, "check with rank %d absent gave %s (%s)", absent,
          ep_status_string(st), ep_last_error(g));
    CHECK(strstr(ep_last_error(g), want) != NULL, "timeout message does not name rank %d: %s", absent,
          ep_last_error(g));
    printf("rank %d: %s\n", h.rank, ep_last_error(g));
    /* A failed group refuses further work until destroyed. */
    st = ep_group_check(g, stream);
    CHECK(st == EP_STATUS_INVALID_USAGE, "call on a failed group gave %s", ep_status_string(st));
  }
  harness_barrier(&h, "timed_out");
  if (h.rank == absent) {
    st = ep_group_check(g, stream);
    /* The others' timeout was published into this rank's group fault word: its check reports it. */
    CHECK(st == EP_STATUS_PEER_FAILED, "late check gave %s (%s)", ep_status_string(st), ep_last_error(g));
    printf("rank %d (late): %s\n", h.rank, ep_last_error(g));
  }
  cudaStreamDestroy(stream);
  ep_group_destroy(g);
  return TEST_RESULT();
}
