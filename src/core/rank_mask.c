/* rank_mask.c: the group's rank mask (config.mask_failed_ranks): the calls that set, read and clear it. The mask is
 * the group's, not one path's: the low-latency and normal kernels read it and mask a peer whose wait runs out of
 * time, the group's barrier skips masked ranks, and destroy frees a group with a masked rank on each rank
 * alone (group.c). */
#include "core/internal.h"

/* Every mask call: a live, healthy group made with the mask. A pending data fault stays pending (as in a collective
 * call): masking a rank is no reason to report it. */
static ep_status_t enter_mask(ep_group_t group, const char* fn) {
  EP_TRY(ep_enter_collective(group, fn));
  if (!group->rank_mask)
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: the group has no rank mask (config.mask_failed_ranks is 0); create it with "
                   "config.mask_failed_ranks = 1",
                   fn);
  return EP_STATUS_SUCCESS;
}

/* An unmask: the LL path takes it at the next ep_ll_clean; the normal path, once used, never (its epochs and
 * acknowledgements with a rank fell out of step while the rank was masked, and nothing restarts them). */
static void unmasked(ep_group_t group) {
  group->ll_clean_needed = true;
  if (group->normal_used) group->normal_unmasked = true;
}

ep_status_t ep_group_mask_rank(ep_group_t group, int rank, int masked, cudaStream_t stream) {
  const char* fn = "ep_group_mask_rank";
  EP_CALL_SCOPE();
  EP_TRY(enter_mask(group, fn));
  if (rank < 0 || rank >= group->num_ranks)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: rank is %d; it must be in [0, num_ranks=%d)", fn, rank,
                   group->num_ranks);
  if (masked != 0 && masked != 1)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: masked is %d; it must be 0 or 1", fn, masked);
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  EP_CUDA_TRY(group, ep_launch_mask_set(group->rank_mask, rank, masked, stream));
  if (!masked) unmasked(group);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_group_get_rank_mask(ep_group_t group, int32_t* mask, cudaStream_t stream) {
  const char* fn = "ep_group_get_rank_mask";
  EP_CALL_SCOPE();
  EP_TRY(enter_mask(group, fn));
  if (!mask) return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: mask is NULL", fn);
  EP_CHECK_ALIGNED(group, fn, {"mask", mask, 4});
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  EP_CUDA_TRY(group, cudaMemcpyAsync(mask, group->rank_mask, sizeof(int32_t) * (size_t)group->num_ranks,
                                     cudaMemcpyDeviceToDevice, stream));
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_group_clear_rank_mask(ep_group_t group, cudaStream_t stream) {
  const char* fn = "ep_group_clear_rank_mask";
  EP_CALL_SCOPE();
  EP_TRY(enter_mask(group, fn));
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  EP_CUDA_TRY(group, cudaMemsetAsync(group->rank_mask, 0, sizeof(int32_t) * (size_t)group->num_ranks, stream));
  unmasked(group);
  return EP_STATUS_SUCCESS;
}

bool ep_group_has_masked_rank(ep_group_t group) {
  if (!group->rank_mask) return false;
  bool any = false;
  int32_t word = 0;
  for (int r = 0; r < group->num_ranks && !any; ++r) {
    /* A failed read counts as masked: the teardown then stays local, which never waits for a peer. */
    any = cudaMemcpy(&word, group->rank_mask + r, sizeof(word), cudaMemcpyDeviceToHost) != cudaSuccess || word != 0;
  }
  return any;
}
