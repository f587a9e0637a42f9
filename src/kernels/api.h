/* api.h: every host-callable kernel launcher, declared in one place (C linkage, C11-includable).
 * The host sources in src/core validate arguments; launchers trust them and only launch. */
#ifndef EP_KERNELS_API_H
#define EP_KERNELS_API_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- The device error word: pinned host memory that kernels write when they must stop. ---- */
typedef enum ep_device_fault {
  EP_FAULT_NONE = 0,
  EP_FAULT_BAD_EXPERT = 1, /* value0 = token, value1 = the bad expert index */
  EP_FAULT_TIMEOUT = 2,    /* peer = the rank waited on, site = which wait */
  EP_FAULT_BAD_DATA = 3,   /* a self-check found wrong bytes: peer = source rank, value0 = offset */
} ep_device_fault_t;

/* Where a device wait happens; ep_fault_site_name() gives the words used in messages. */
typedef enum ep_wait_site {
  EP_SITE_NONE = 0,
  EP_SITE_CHECK_SIGNAL = 1,  /* ep_group_check: waiting for a peer's put-with-signal */
  EP_SITE_CHECK_NVLINK = 2,  /* ep_group_check: waiting for a peer's NVLink stores */
  EP_SITE_BARRIER = 3,       /* device barrier across the group */
  EP_SITE_COUNT
} ep_wait_site_t;

typedef struct ep_device_error {
  int code;          /* ep_device_fault_t; 0 while nothing went wrong */
  int peer;          /* rank involved, or -1 */
  int site;          /* ep_wait_site_t for timeouts */
  int rank;          /* the rank whose kernel recorded it */
  long long value0;  /* fault-specific, see ep_device_fault_t */
  long long value1;
} ep_device_error_t;

const char* ep_fault_site_name(int site);

/* ---- Layout ---- */
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
cudaError_t ep_launch_layout(const ep_layout_launch_t* p, cudaStream_t stream);

/* ---- Group self-check (ep_group_check) ---- */
typedef struct ep_check_launch {
  void* workspace;            /* symmetric; layout from ep_check_workspace_bytes() */
  void* const* peer_bases;    /* device array [num_ranks]: NVLink mapping of `workspace`, NULL if none */
  int rank, num_ranks;
  unsigned long long epoch;   /* increases every check; tags the blocks and the signals */
  unsigned long long timeout_ns;
  ep_device_error_t* error;
} ep_check_launch_t;

size_t ep_check_workspace_bytes(int num_ranks);
cudaError_t ep_launch_check(const ep_check_launch_t* p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* EP_KERNELS_API_H */
