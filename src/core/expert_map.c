/* expert_map.c: ep_map_experts, the redundant-expert map's public call (include/ep.h, "Redundant experts"): it
 * validates the map and the call, and launches the kernel (src/kernels/expert_map.cu), which reads the group's rank
 * mask on the device. */
#include "core/internal.h"

/* (token, slot) pairs of one call, as for ep_get_dispatch_layout. */
#define EP_EXPERT_MAP_MAX_PAIRS (1 << 30)

static ep_status_t check_map(ep_group_t group, const char* fn, const ep_expert_map_t* map) {
  if (!map) return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: map is NULL", fn);
  EP_TRY(ep_check_header(group, fn, "ep_expert_map_t", map, map->size, sizeof(ep_expert_map_t), map->magic,
                         EP_EXPERT_MAP_MAGIC));
  if (map->num_experts <= 0 || map->num_experts % group->num_ranks != 0)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "%s: map->num_experts is %d; it must be a positive multiple of num_ranks (%d)", fn, map->num_experts,
                   group->num_ranks);
  if (map->num_logical_experts < 1)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: map->num_logical_experts is %d; it must be >= 1", fn,
                   map->num_logical_experts);
  if (map->max_copies < 1 || map->max_copies > map->num_experts)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "%s: map->max_copies is %d; it must be in [1, map->num_experts=%d]", fn, map->max_copies,
                   map->num_experts);
  if (!map->slots) return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: map->slots is NULL", fn);
  EP_CHECK_ALIGNED(group, fn, {"map->slots", map->slots, 4});
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_map_experts(ep_group_t group, const ep_expert_map_t* map, const int64_t* logical_topk,
                           int64_t* physical_topk, int num_tokens, int num_topk, cudaStream_t stream) {
  const char* fn = "ep_map_experts";
  EP_CALL_SCOPE();
  EP_TRY(ep_enter(group, fn));
  EP_TRY(check_map(group, fn, map));
  if (num_tokens < 0)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: num_tokens is %d; it must be >= 0", fn, num_tokens);
  if (num_topk < 1 || num_topk > EP_MAX_TOPK)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: num_topk is %d; it must be in [1, %d]", fn, num_topk,
                   EP_MAX_TOPK);
  if ((int64_t)num_tokens * num_topk > EP_EXPERT_MAP_MAX_PAIRS)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "%s: num_tokens is %d; times num_topk (%d) it must stay at most 2^30", fn, num_tokens, num_topk);
  if (num_tokens > 0 && !logical_topk)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: logical_topk is NULL with num_tokens=%d", fn, num_tokens);
  if (num_tokens > 0 && !physical_topk)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: physical_topk is NULL with num_tokens=%d", fn, num_tokens);
  EP_CHECK_ALIGNED(group, fn, {"logical_topk", logical_topk, 8}, {"physical_topk", physical_topk, 8});
  /* Partial overlap would let one pick's write change another's input; the same memory maps in place. */
  const size_t bytes = (size_t)num_tokens * (size_t)num_topk * sizeof(int64_t);
  const uintptr_t in = (uintptr_t)logical_topk, out = (uintptr_t)physical_topk;
  if (num_tokens > 0 && in != out && in < out + bytes && out < in + bytes)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "%s: logical_topk and physical_topk overlap without being the same memory; pass the same pointer "
                   "to map in place",
                   fn);
  if (num_tokens == 0) return EP_STATUS_SUCCESS;
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  ep_expert_map_launch_t p;
  p.slots = map->slots;
  p.num_logical = map->num_logical_experts;
  p.max_copies = map->max_copies;
  p.num_experts = map->num_experts;
  p.num_ranks = group->num_ranks;
  p.rank = group->rank;
  p.mask = group->rank_mask;
  p.logical_topk = logical_topk;
  p.physical_topk = physical_topk;
  p.num_tokens = num_tokens;
  p.num_topk = num_topk;
  p.error = group->error_word_dev;
  EP_CUDA_TRY(group, ep_launch_expert_map(&p, stream));
  return EP_STATUS_SUCCESS;
}
