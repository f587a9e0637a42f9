/* ep_ref_expert_map.h: the pure-C reference of ep_map_experts (include/ep.h, "Redundant experts"), the same rule
 * written plainly: a pick of logical expert l becomes the j-th live copy of l in its row's column order, with
 * j = (token + rank) % (live copies of l). A copy is live when its slot's rank r exchanges with this rank: r is
 * this rank, or neither r nor this rank is masked (a rank masked by hand exchanges with nobody but itself). */
#ifndef EP_REF_EXPERT_MAP_H
#define EP_REF_EXPERT_MAP_H

#include <stdint.h>

/* slots: [num_logical, max_copies] physical slots, -1 = no copy. mask: [num_ranks] (1 = masked) or NULL (no mask).
 * logical: [num_tokens, num_topk]; physical: [num_tokens, num_topk] (may be logical). A logical index outside
 * [-1, num_logical) maps to -1 and a slot outside [-1, num_experts) is skipped; each makes *bad_values count one
 * (NULL: not counted). Returns 0, or -1 on a bad shape (num_experts not a positive multiple of num_ranks, ...). */
int ep_ref_map_experts(const int32_t* slots, int num_logical, int max_copies, int num_experts, int num_ranks, int rank,
                       const int32_t* mask, const int64_t* logical, int64_t* physical, int num_tokens, int num_topk,
                       long* bad_values);

#endif /* EP_REF_EXPERT_MAP_H */
