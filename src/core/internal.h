/* internal.h: the group object and the error plumbing shared by the host sources (C11, no NVSHMEM here). */
#ifndef EP_CORE_INTERNAL_H
#define EP_CORE_INTERNAL_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "ep.h"
#include "kernels/launch.h"

#define EP_ERROR_MESSAGE_BYTES 512
#define EP_LL_MAX_EXPERTS (1 << 18) /* num_experts of an LL call stays below: a message packs e << 13 | j in an int */

struct ep_group {
  int rank, num_ranks;
  int ranks_per_node, num_nodes, node, local_rank;
  int cuda_device;
  int num_sms;                       /* SMs for normal-mode kernels */
  ep_group_config_t config;          /* as given, defaults filled in */
  unsigned long long timeout_ns;     /* device wait budget */
  size_t heap_bytes;                 /* symmetric heap reserved at init */

  void** peer_bases;                 /* [num_ranks] host: peer's mapping of `workspace`, NULL if not NVLink */
  void** peer_bases_dev;             /* the same table in device memory */
  int num_nvlink_peers;
  unsigned long long check_epoch;    /* ep_group_check calls so far */
  int* layout_scratch;               /* device: ep_get_dispatch_layout's per-block histograms */
  cudaEvent_t layout_done;           /* recorded after each eager layout call: the scratch is free once it fires */
  cudaStream_t layout_stream;        /* the stream of the last eager layout call */
  bool layout_recorded;              /* layout_done holds a launch */

  cudaStream_t control_stream;       /* non-blocking: the group's own barriers, an abort's publication */
  cudaStream_t handle_stream;        /* non-blocking, made with the first handle: handle memory is allocated and freed
                                        (after the handle's last use) in its order, apart from control_stream so
                                        that an abort's publication never waits behind a handle's last kernel */
  unsigned long long barrier_epoch;  /* bounded barriers on the workspace's signals so far */
  ep_device_error_t* error_word;     /* pinned host memory, mapped into the device */
  ep_device_error_t* error_word_dev; /* the device's view of it */

  void* workspace;                   /* symmetric, group-owned: signals and check blocks */
  size_t workspace_bytes;

  /* Normal (high-throughput) path. */
  size_t normal_offset;              /* the normal region's offset inside `workspace` */
  ep_normal_region_t normal_region;
  ep_normal_state_t* normal_state;   /* device: call epochs */
  int* expert_sum;                   /* device scratch [config.num_experts / num_ranks] */
  /* Normal path across nodes (num_nodes > 1 only; 0 / unset otherwise). */
  size_t internode_offset;           /* the internode region's offset inside `workspace` */
  ep_internode_region_t internode_region;
  int internode_force_put;           /* EP_INTERNODE_FORCE_PUT was set at create: cross-node legs always put */

  /* Low-latency path (absent when config.ll_max_tokens_per_rank is 0). */
  int device_sms;                    /* SMs the group's kernels may occupy (device, MPS cap, config.max_sms);
                                        LL grids use them all */
  size_t ll_offset;                  /* the LL region's offset inside `workspace` */
  ep_ll_region_t ll_region;
  ep_ll_state_t* ll_state;           /* device: call counters per half */
  int ll_next_half;                  /* the half the next dispatch takes */
  unsigned long long ll_dispatches;  /* dispatches so far: the serial number of the next one is this + 1 */
  unsigned long long ll_half_serial[2]; /* serial of the dispatch that owns each half */
  bool ll_half_pending[2];           /* a send phase on the half waits for its receive phase */
  unsigned long long ll_cleans;      /* ep_ll_clean calls so far: a clean abandons every pending receive phase */
  bool ll_clean_needed;              /* a rank was unmasked: the next LL dispatch waits for an ep_ll_clean */
  bool normal_used;                  /* a normal prepare ran: its epochs and acknowledgements are in use */
  bool normal_unmasked;              /* a rank was unmasked after normal_used: the normal path is refused */

  int32_t* rank_mask; /* device [num_ranks], 1 = masked (config.mask_failed_ranks), else NULL */

  bool failed;                       /* a sticky fault (timeout) was reported: only destroy is allowed */
  char last_error[EP_ERROR_MESSAGE_BYTES];
  char fatal_error[EP_ERROR_MESSAGE_BYTES]; /* the message of the fault that failed the group, kept for its life */

  _Atomic uintptr_t busy_thread; /* the thread inside a call on the group (live.c), 0 when none */
  _Atomic(const char*) busy_fn;  /* ...and the call's name */
};

/* Live objects (live.c): every public call looks its group and handles up before dereferencing them. */
typedef enum ep_object_kind { EP_OBJECT_GROUP = 1, EP_OBJECT_HANDLE, EP_OBJECT_LL_HANDLE } ep_object_kind_t;
bool ep_live_add(const void* object, ep_object_kind_t kind); /* false: out of host memory */
void ep_live_remove(const void* object);
bool ep_live_is(const void* object, ep_object_kind_t kind);
void ep_live_orphan_handles(ep_group_t group); /* the group is going: its handles' group becomes NULL */

/* One thread per group at a time: a public call opens a scope (EP_CALL_SCOPE) before its first ep_enter; the
 * ep_enter that takes the group marks it busy with this thread and the scope gives it back when the call returns,
 * on every path. A second thread's call meanwhile fails with EP_STATUS_INVALID_USAGE naming the call in progress. */
typedef struct ep_call_scope {
  struct ep_call_scope* outer;
  ep_group_t held;
} ep_call_scope_t;
void ep_call_scope_begin(ep_call_scope_t* scope);
void ep_call_scope_end(ep_call_scope_t* scope);
void ep_call_scope_release(ep_group_t group);                /* the group is being freed: its scopes forget it */
ep_status_t ep_take_group(ep_group_t group, const char* fn); /* mark busy, or fail if another thread is inside */
#define EP_CALL_SCOPE()                                                       \
  ep_call_scope_t ep_call_scope_ __attribute__((cleanup(ep_call_scope_end))); \
  ep_call_scope_begin(&ep_call_scope_)

/* Record a message for `group` (or the thread when group is NULL) and return `status`. printf-style. */
ep_status_t ep_fail(ep_group_t group, ep_status_t status, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Turn a CUDA error into EP_STATUS_CUDA_ERROR with the call's text and CUDA's message. */
ep_status_t ep_fail_cuda(ep_group_t group, cudaError_t err, const char* what);

/* `group` is not NULL (EP_STATUS_INVALID_ARGUMENT) and live (EP_STATUS_INVALID_USAGE); the message is the thread's. */
ep_status_t ep_check_live_group(ep_group_t group, const char* fn);

/* Mark the group failed; the first call keeps its last_error as the fatal message for the group's life. */
void ep_mark_failed(ep_group_t group);

/* Publish a fatal fault this rank met to the peers its kernels cannot reach (those without NVLink: the kernels
 * publish to NVLink peers themselves), by host-initiated stores into their group fault words (group.c). */
void ep_publish_fault_remote(ep_group_t group, unsigned long long word);

/* Report a fatal fault recorded in the error word (failing the group), leaving a data fault pending. */
ep_status_t ep_take_fatal_fault(ep_group_t group);

/* The group's barrier with its time budget, on `stream` (group.c): a device kernel over the workspace's barrier
 * signals, then a wait on the stream that the kernel's own bound bounds. A rank that never arrives becomes
 * EP_STATUS_TIMEOUT naming it (and is published to the group); a fault published by a peer, EP_STATUS_PEER_FAILED.
 * Collective: every rank calls it in the same order. */
ep_status_t ep_group_barrier(ep_group_t group, cudaStream_t stream);

/* Kernels of check.cu that only the host sources above launch (the barrier reads workspace as its signals). */
cudaError_t ep_launch_barrier(const ep_check_launch_t* p, cudaStream_t stream);
cudaError_t ep_launch_publish(const ep_device_error_t* error, unsigned long long word, cudaStream_t stream);
cudaError_t ep_launch_mask_set(int32_t* mask, int rank, int value, cudaStream_t stream); /* mask[rank] = value */

/* Whether the group's rank mask has any rank masked (a blocking read of the device mask; false without a mask). */
bool ep_group_has_masked_rank(ep_group_t group);

/* Config agreement at ep_group_create: the values every rank must share (those that size or place the symmetric
 * regions, and the workspace they add up to, and the rank mask, which picks the kernels' form: with it an internode
 * call takes every round of the pool), as one record per rank. */
#define EP_CONFIG_RECORD_FIELDS 8
typedef struct ep_config_record {
  int64_t value[EP_CONFIG_RECORD_FIELDS];
} ep_config_record_t;
ep_config_record_t ep_config_record(ep_group_t group);
/* Compare every rank's record with rank 0's; on the first difference write a message naming the rank, the field
 * and both values to `message` and return false. Every rank, given the same table, says the same. */
bool ep_config_agreement(const ep_config_record_t* records, int num_ranks, char* message, size_t message_bytes);

/* Refuse a config whose kernels could never launch on a device allowing `smem_per_block` bytes of dynamic shared
 * memory per block (every call would fail with a CUDA error): the layout kernel's and the LL phases' largest
 * shapes. Named EP_STATUS_INVALID_ARGUMENT; the message is the thread's. */
ep_status_t ep_check_launchable(ep_group_t group, size_t smem_per_block);

/* Entry check every group call makes first: group not NULL and live, no other thread inside a call on it, not
 * failed, no pending device error. */
ep_status_t ep_enter(ep_group_t group, const char* fn);

/* The entry of a collective call: as ep_enter, but a pending data fault is left in the word (for
 * ep_get_async_error and the next local call) instead of ending the call: a rank that skipped a collective call
 * would leave its peers waiting for it until their time budget ran out. */
ep_status_t ep_enter_collective(ep_group_t group, const char* fn);

/* Validate the size/magic header of an args struct; names the struct type in the message. */
ep_status_t ep_check_header(ep_group_t group, const char* fn, const char* type_name, const void* args,
                            uint32_t size, uint32_t want_size, uint32_t magic, uint32_t want_magic);

/* Shared by the dispatch calls: num_topk in [1, config.max_topk], num_experts a positive multiple of num_ranks
 * and <= config.num_experts. */
ep_status_t ep_check_topk_and_experts(ep_group_t group, const char* fn, int num_topk, int num_experts);
/* The LL region of a config (low_latency.c): its check at create, and the group's layout (config.ll_region_bytes:
 * the halves and the handles' sizes). */
ep_status_t ep_ll_check_config(const ep_group_config_t* c, int num_ranks, const char* fn);
ep_ll_region_t ep_ll_group_region(const ep_group_config_t* c, int num_ranks);

/* The rows a hidden size is for: BF16 rows move in 16-byte words (8 channels), FP8 rows carry a scale per 128
 * channels, UE8M0 scales pack four to an int (512 channels). */
typedef enum ep_row_format { EP_ROWS_BF16, EP_ROWS_FP8, EP_ROWS_FP8_UE8M0 } ep_row_format_t;

/* The hidden-size rule, with its one message: `hidden` (called `name` in it) is a positive multiple of what `format`
 * needs, at most config.hidden for a call on `group`, or EP_MAX_HIDDEN for a configuration (group NULL). */
ep_status_t ep_check_hidden(ep_group_t group, const char* fn, const char* name, int hidden, ep_row_format_t format);

/* Natural alignment of typed device pointers (int64: 8, float and int: 4): a misaligned load kills the CUDA context.
 * The first misaligned pointer of the NULL-terminated list of (name, pointer, alignment) makes the call fail with
 * EP_STATUS_INVALID_ARGUMENT naming it; NULL pointers count as aligned. */
typedef struct ep_typed_ptr {
  const char* name;
  const void* ptr;
  unsigned align;
} ep_typed_ptr_t;
ep_status_t ep_check_natural_alignment(ep_group_t group, const char* fn, const ep_typed_ptr_t* ptrs, int count);
#define EP_CHECK_ALIGNED(group, fn, ...)                                                                        \
  do {                                                                                                          \
    const ep_typed_ptr_t ep_ptrs_[] = {__VA_ARGS__};                                                            \
    EP_TRY(ep_check_natural_alignment((group), (fn), ep_ptrs_, (int)(sizeof(ep_ptrs_) / sizeof(ep_ptrs_[0])))); \
  } while (0)

/* Device pointers the kernels move 16 bytes at a time must be 16-byte aligned (NULL counts as aligned). */
static inline bool ep_misaligned16(const void* ptr) { return ((uintptr_t)ptr & 15) != 0; }

#define EP_CUDA_TRY(group, call)                                  \
  do {                                                            \
    cudaError_t ep_cuda_err_ = (call);                            \
    if (ep_cuda_err_ != cudaSuccess) return ep_fail_cuda((group), ep_cuda_err_, #call); \
  } while (0)

#define EP_TRY(call)                          \
  do {                                        \
    ep_status_t ep_try_st_ = (call);          \
    if (ep_try_st_ != EP_STATUS_SUCCESS) return ep_try_st_; \
  } while (0)

/* Handle memory the library owns (normal.c; the LL handles' too). It is allocated on the group's handle_stream
 * (stream ordered), each eager launch that uses it records `last_use` on its stream, and destroy frees it on the
 * handle_stream after that event, with no host wait: only the handle's own work is waited for, never the device.
 * Launches captured into a graph record nothing (an event recorded in a capture cannot be waited on outside it):
 * the caller must not destroy a handle while a graph that uses it may still run, as for any memory of its own. */
typedef struct ep_handle_memory {
  void* ptr;
  cudaEvent_t last_use; /* recorded after each eager launch on the handle; NULL for memory the caller owns */
  bool pooled;          /* from cudaMallocAsync; false where the device has no memory pools (plain cudaMalloc,
                           whose cudaFree waits for the device) */
} ep_handle_memory_t;
ep_status_t ep_handle_memory_alloc(ep_group_t group, size_t bytes, bool zeroed, ep_handle_memory_t* memory);
/* After an eager launch on `stream` that reads or writes the memory. */
cudaError_t ep_handle_memory_used(ep_handle_memory_t* memory, cudaStream_t stream);
/* Free after the last use, on the group's handle_stream; `group` NULL (an orphan: its group was destroyed, and with
 * it the handle_stream, after the device finished): a plain cudaFree. */
cudaError_t ep_handle_memory_free(ep_group_t group, ep_handle_memory_t* memory);

struct ep_handle {
  ep_group_t group;
  ep_handle_memory_t memory; /* one device allocation holding the arrays (the caller's, from ep_handle_create_in) */
  bool owns_memory;          /* made by ep_handle_create (not _in): destroy frees `memory` */
  ep_normal_handle_view_t arrays; /* carved from `memory` (ep_normal_handle_carve) */
  /* What the last prepare was given, for validating the calls that use it. */
  bool prepared;
  int num_tokens, num_topk, num_experts;
  int num_recv_host;     /* received rows when the prepare was eager, else -1 */
  int num_rounds_host;   /* several nodes, max_rounds > 1: the call's rounds when the prepare was eager, else -1 */
  bool prepare_captured; /* a prepare of this handle was captured in a graph, whose replays re-prepare it unseen */
  int recv_rows_limit;   /* rows combine may read from its x: the last dispatch's recv_capacity (INT_MAX before) */
};

struct ep_ll_handle {
  ep_group_t group;
  ep_handle_memory_t memory;  /* one device allocation holding the arrays */
  ep_ll_handle_view_t arrays; /* carved from `memory` (ep_ll_handle_carve) */
  /* The last dispatch, for validating and launching the calls that use it. */
  bool dispatched;             /* a dispatch's send phase was issued */
  bool dispatch_recv_pending;  /* ...and its receive phase not yet */
  bool combine_recv_pending;   /* a combine's send phase waits for its receive phase */
  unsigned long long cleans;   /* the group's ll_cleans when the pending flags were last valid */
  int half;
  unsigned long long serial;   /* which dispatch of the group */
  ep_ll_call_t call;           /* the dispatch's shape and outputs, the pending combine's inputs (x, topk_idx, y and
                                  zero_copy stay NULL / 0: only the call that takes them launches with them) */
  ep_ll_region_t region;       /* the LL region's layout for the dispatch: the group's, or (config.ll_region_bytes)
                                  the dispatch's own shape in the group's halves */
};

#endif /* EP_CORE_INTERNAL_H */
