/* ep_ref_expert_map.c: the reference of ep_map_experts (ep_ref_expert_map.h). */
#include "ep_ref_expert_map.h"

#include <stddef.h>

static int copy_is_live(int32_t slot, int num_experts, int experts_per_rank, int rank, const int32_t* mask) {
  if (slot < 0 || slot >= num_experts) return 0;
  const int owner = slot / experts_per_rank;
  if (mask == NULL || owner == rank) return 1;
  return mask[owner] == 0 && mask[rank] == 0;
}

int ep_ref_map_experts(const int32_t* slots, int num_logical, int max_copies, int num_experts, int num_ranks, int rank,
                       const int32_t* mask, const int64_t* logical, int64_t* physical, int num_tokens, int num_topk,
                       long* bad_values) {
  if (num_ranks < 1 || num_experts < 1 || num_experts % num_ranks != 0 || rank < 0 || rank >= num_ranks ||
      num_logical < 1 || max_copies < 1 || num_tokens < 0 || num_topk < 1 || (num_tokens > 0 && !slots))
    return -1;
  const int experts_per_rank = num_experts / num_ranks;
  long bad = 0;
  for (int t = 0; t < num_tokens; ++t)
    for (int k = 0; k < num_topk; ++k) {
      const size_t i = (size_t)t * num_topk + k;
      const int64_t l = logical[i];
      int64_t out = -1;
      if (l < -1 || l >= num_logical) {
        ++bad;
      } else if (l >= 0) {
        const int32_t* row = slots + (size_t)l * max_copies;
        int live = 0;
        for (int c = 0; c < max_copies; ++c) {
          bad += row[c] < -1 || row[c] >= num_experts;
          live += copy_is_live(row[c], num_experts, experts_per_rank, rank, mask);
        }
        int j = live > 0 ? (t + rank) % live : -1;
        for (int c = 0; c < max_copies && j >= 0; ++c) {
          if (!copy_is_live(row[c], num_experts, experts_per_rank, rank, mask)) continue;
          if (j-- == 0) out = row[c];
        }
      }
      physical[i] = out;
    }
  if (bad_values) *bad_values = bad;
  return 0;
}
