/* launch.h: every kernel launcher and the launch structs they take, declared in one place (C linkage,
 * C11-includable). The callers validate arguments; launchers trust them and only launch. */
#ifndef EP_KERNELS_LAUNCH_H
#define EP_KERNELS_LAUNCH_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "kernels/device_abi.h"
#include "kernels/host_device.h"
#include "kernels/internode_region.h"
#include "kernels/ll_region.h"
#include "kernels/normal_region.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Layout: the routing counts of ep_get_dispatch_layout ---- */
typedef struct ep_layout_launch {
  const int64_t* topk_idx;
  int num_tokens, num_topk, num_experts, num_ranks, ranks_per_node;
  int* num_tokens_per_rank;   /* [num_ranks] */
  int* num_tokens_per_node;   /* [num_nodes] or NULL */
  int* num_tokens_per_expert; /* [num_experts] */
  uint8_t* is_token_in_rank;  /* [num_tokens, num_ranks] */
  int* scratch;               /* ep_layout_scratch_ints() ints, device, group-owned; first int zero */
  ep_device_error_t* error;   /* device view of the error word */
  int rank;
} ep_layout_launch_t;

size_t ep_layout_scratch_ints(int num_experts, int num_ranks);
size_t ep_layout_smem_bytes(int num_experts, int num_ranks); /* dynamic shared memory of a layout launch */
cudaError_t ep_launch_layout(const ep_layout_launch_t* p, cudaStream_t stream);

/* ---- Redundant experts: logical top-k ids to physical slots (ep_map_experts, expert_map.cu) ---- */
typedef struct ep_expert_map_launch {
  const int32_t* slots; /* [num_logical, max_copies] physical slots, -1 padded */
  int num_logical, max_copies, num_experts, num_ranks, rank;
  const int32_t* mask;         /* the group's rank mask, or NULL (every copy live) */
  const int64_t* logical_topk; /* [num_tokens, num_topk] */
  int64_t* physical_topk;      /* [num_tokens, num_topk]; may be logical_topk */
  int num_tokens, num_topk;
  ep_device_error_t* error;
} ep_expert_map_launch_t;

cudaError_t ep_launch_expert_map(const ep_expert_map_launch_t* p, cudaStream_t stream);

/* ---- Group self-check (ep_group_check) ---- */
typedef struct ep_check_launch {
  void* workspace;            /* symmetric; ep_check_workspace_bytes() long */
  void* const* peer_bases;    /* device array [num_ranks]: NVLink mapping of `workspace`, NULL if none */
  int rank, num_ranks;
  unsigned long long epoch;   /* increases every check; tags the blocks and the signals */
  unsigned long long timeout_ns;
  ep_device_error_t* error;
  int32_t* mask; /* the barrier: the group's rank mask (masked ranks skipped, a timeout masks), or NULL */
} ep_check_launch_t;

size_t ep_check_workspace_bytes(int num_ranks);
cudaError_t ep_launch_check(const ep_check_launch_t* p, cudaStream_t stream);

/* ---- Normal (high-throughput) path: prepare, dispatch, combine, inside one NVLink domain (intranode.cu) or
 * across nodes (internode.cu, docs/internode.md). ---- */

/* Device-side call counters of the group (device memory, zeroed at create). */
typedef struct ep_normal_state {
  unsigned long long prepare_epoch, dispatch_epoch, combine_epoch; /* completed calls */
  unsigned int prepare_done, dispatch_done, combine_done;          /* blocks finished in the running call */
  unsigned int call_rounds; /* the running prepare's rounds once block 0 decided them (rank mask only), else 0 */
} ep_normal_state_t;

/* What the normal path's kernels take from the group: the same for every call. */
typedef struct ep_normal_group_view {
  int rank, num_ranks;
  char* normal_base;              /* this rank's normal region (symmetric) */
  void* const* peer_workspace;    /* device [num_ranks]: peer's mapping of the group workspace */
  size_t normal_offset;           /* normal region's offset inside the workspace */
  ep_normal_region_t region;
  ep_normal_state_t* state;
  int* expert_sum;                /* device [num_local_experts] scratch, zero between calls */
  unsigned long long timeout_ns;
  ep_device_error_t* error;
  int32_t* mask; /* the group's rank mask [num_ranks] (config.mask_failed_ranks), or NULL: the kernels without it
                    (timeouts fatal) */
} ep_normal_group_view_t;

/* A call's arguments: prepare's, dispatch's or combine's (the others zero), with the handle's routing shape. */
typedef struct ep_normal_call {
  int num_tokens, num_topk, num_experts, expert_alignment;
  const int64_t* topk_idx;
  const uint8_t* is_token_in_rank;  /* prepare's rank-mask form [num_tokens][num_ranks], used when topk_idx is NULL */
  const int* num_tokens_per_expert; /* with is_token_in_rank: [num_experts] my tokens per expert, or NULL */
  int* out_num_recv;              /* optional */
  int* out_expert_counts;         /* optional */
  int hidden, is_fp8;
  const void* x;
  const float* x_scales;
  const float* topk_weights;
  int recv_capacity;              /* dispatch: rows of recv_x; combine: rows of y (the last dispatch's capacity) */
  void* recv_x;
  float* recv_scales;
  int64_t* recv_topk_idx;
  float* recv_topk_weights;
  int* recv_src_idx;
  const void* y;
  const float* y_weights;
  const void* bias0;
  const void* bias1;
  void* combined_x;
  float* combined_weights;
  int num_blocks; /* the dispatch and combine grids: blocks wait on each other, all are resident */
} ep_normal_call_t;

/* One NVLink domain. */
typedef struct ep_intranode_launch {
  ep_normal_group_view_t group;
  ep_normal_handle_view_t handle; /* normal_region.h */
  ep_normal_call_t call;
} ep_intranode_launch_t;

cudaError_t ep_launch_intranode_prepare(const ep_intranode_launch_t* p, cudaStream_t stream);
/* A prepared handle's counts in prefix form (ep_handle_get_rank_prefix): matrix [R][R] (one node only) and this
 * rank's received-rows prefix [R]; either may be NULL. */
cudaError_t ep_launch_handle_rank_prefix(const ep_normal_handle_view_t* handle, int num_ranks, int32_t* matrix,
                                         int32_t* recv_prefix, cudaStream_t stream);
cudaError_t ep_launch_intranode_dispatch(const ep_intranode_launch_t* p, cudaStream_t stream);
cudaError_t ep_launch_intranode_combine(const ep_intranode_launch_t* p, cudaStream_t stream);

/* What the internode kernels also take from the group (num_nodes > 1): where this rank is, and the internode region
 * (internode_region.h). Rank indices elsewhere are global. */
typedef struct ep_internode_group_view {
  int ranks_per_node, num_nodes, node, local_rank;
  char* inter_base;               /* this rank's internode region (symmetric) */
  size_t inter_offset;            /* its offset inside the workspace */
  ep_internode_region_t region;
  int force_put; /* 1: cross-node transfers take the put (NIC) path even to NVLink-mapped rail
                    peers (EP_INTERNODE_FORCE_PUT at group creation, a test knob) */
} ep_internode_group_view_t;

/* Several nodes. */
typedef struct ep_internode_launch {
  ep_normal_group_view_t group;
  ep_normal_handle_view_t handle; /* its internode arrays included */
  ep_normal_call_t call;
  ep_internode_group_view_t inter;
  int round; /* the round this launch runs (docs/internode.md 1.5.1): the host launches each kernel up to
                region.max_rounds times; a launch past the prepared call's rounds returns at once */
} ep_internode_launch_t;

cudaError_t ep_launch_internode_prepare(const ep_internode_launch_t* p, cudaStream_t stream);
cudaError_t ep_launch_internode_dispatch(const ep_internode_launch_t* p, cudaStream_t stream);
cudaError_t ep_launch_internode_combine(const ep_internode_launch_t* p, cudaStream_t stream);

/* ---- Low-latency path: dispatch and combine, each a send phase and a receive phase (ll_region.h) ---- */

/* Device-side counters of the group (device memory, zeroed at create and by ep_ll_clean). */
typedef struct ep_ll_state {
  unsigned long long seq[2];  /* calls started on each half (the call number of the next one is seq + 1) */
  unsigned int dispatch_done; /* blocks of the running kernel that finished dispatch's receive phase */
  unsigned int combine_done;  /* the same for combine */
} ep_ll_state_t;

/* What the LL kernels take from the group: the same for every call. */
typedef struct ep_ll_group_view {
  int rank, num_ranks, ranks_per_node;
  int node_first_rank;            /* the first rank of this rank's node: its NVLink peers are
                                     [node_first_rank, node_first_rank + ranks_per_node) */
  char* ll_base;                  /* this rank's LL region (symmetric), both halves */
  void* const* peer_workspace;    /* device [num_ranks]: peer's mapping of the group workspace, NULL if none */
  size_t ll_offset;               /* LL region's offset inside the workspace */
  ep_ll_region_t region;
  ep_ll_state_t* state;
  unsigned long long timeout_ns;
  ep_device_error_t* error;
  int num_sms; /* SMs the group's kernels may occupy: the grids are sized from it */
  int32_t* mask; /* the group's rank mask [num_ranks] (config.mask_failed_ranks), or NULL: no mask, timeouts fatal */
} ep_ll_group_view_t;

/* The handle's dispatch (its shape and outputs) and the combine's inputs. The handle keeps one (ep_ll_handle_t);
 * a launch adds the inputs that only the call itself reads (x, topk_idx, y, zero_copy). */
typedef struct ep_ll_call {
  int num_tokens, num_topk, num_experts, hidden, max_tokens; /* max_tokens: the call's T (output shapes) */
  int fp8, round_scale, ue8m0;
  ep_fastdiv_t by_local_experts;  /* n / (num_experts / num_ranks): an expert's rank */
  const void* x;
  const int64_t* topk_idx;
  void* recv_x;
  void* recv_scales;
  int* recv_count;
  const float* dispatch_weights;  /* dispatch: [num_tokens][K] or NULL: weights that travel with the tokens */
  const void* y;                  /* combine input, or NULL with zero_copy */
  int zero_copy;
  const float* topk_weights;
  void* out;
  int sum_on_expert_ranks;        /* combine: each token's rows are weighted and summed on their rank, with the
                                     dispatch's weights */
  long long* wait_stats;          /* [R] or NULL: the receive phase adds its clock64 cycles of waiting per source */
  int logfmt;                     /* combine: rows travel as LogFMT-10 (ll_logfmt.h) */
  int renormalize;                /* combine with a mask: kept weights rescaled to the sum of the valid ones */
} ep_ll_call_t;

typedef struct ep_ll_launch {
  ep_ll_group_view_t group;
  ep_ll_handle_view_t handle; /* ll_region.h */
  int half;                   /* 0 or 1: the half of the LL region the handle's dispatch took */
  ep_ll_call_t call;
} ep_ll_launch_t;

cudaError_t ep_launch_ll_dispatch_send(const ep_ll_launch_t* p, cudaStream_t stream);
cudaError_t ep_launch_ll_dispatch_recv(const ep_ll_launch_t* p, cudaStream_t stream);
cudaError_t ep_launch_ll_combine_send(const ep_ll_launch_t* p, cudaStream_t stream);
cudaError_t ep_launch_ll_combine_recv(const ep_ll_launch_t* p, cudaStream_t stream);
/* Without the receive hook: the send phase and the receive phase in one cooperative kernel. *launched = 1 if it was
 * launched; else (a build with EP_LL_FUSED=0, a grid above the SM count or above what can be resident at once, no
 * cooperative launch on the device) nothing is launched, *launched = 0, and the result is cudaSuccess: the caller
 * then launches the send kernel and the receive kernel. */
cudaError_t ep_launch_ll_dispatch_fused(const ep_ll_launch_t* p, cudaStream_t stream, int* launched);
/* The largest dynamic shared memory of any LL phase for the call shape in p (group.num_ranks, group.num_sms and
 * call.num_tokens / num_experts / num_topk / hidden): host only, launches nothing. */
size_t ep_ll_smem_bytes(const ep_ll_launch_t* p);
cudaError_t ep_launch_ll_combine_fused(const ep_ll_launch_t* p, cudaStream_t stream, int* launched);

#ifdef __cplusplus
}
#endif

#endif /* EP_KERNELS_LAUNCH_H */
