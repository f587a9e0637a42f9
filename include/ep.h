/*
 * ep.h: the public C API of `ep`, an expert-parallel communication library for Mixture-of-Experts models.
 *
 * `ep` moves tokens to the GPUs that hold their top-k experts (dispatch) and brings the expert outputs back,
 * summed (combine). It runs on NVSHMEM (symmetric memory, NVLink loads/stores, GPU-initiated puts).
 *
 * Conventions that hold for every call in this header:
 *  - Every function returns an `ep_status_t`. `ep_status_string()` names the code; `ep_last_error()` gives a
 *    message that names the argument and value (or the peer) that made the call fail.
 *  - The library never exits, aborts or prints on success or on failure.
 *  - Tensors are device pointers plus sizes; rows are contiguous (row-major, no strides).
 *  - A call that takes a `cudaStream_t` takes it last; its device work is ordered on that stream, and it never
 *    synchronises the device behind the caller's back (a call that waits on the host says so).
 *  - Argument structs open with `size` and `magic`; initialise them with their `_INIT` macro so that a struct
 *    from another version of this header, or an uninitialised one, is rejected instead of misread.
 *  - Doc blocks end with: Collective (every rank of the group must make the call), Allocates (device or host
 *    memory), Graph-capturable (may be recorded into a CUDA graph).
 *  - Typed device pointers are naturally aligned (int64: 8 bytes, fp32 and int32: 4); a misaligned one is refused
 *    with EP_STATUS_INVALID_ARGUMENT naming it (it would otherwise kill the CUDA context).
 *
 * Threads: the calls on one group (and on its handles) come from one thread at a time; any thread may make them,
 * in turn. A call made while another thread is inside a call on the same group returns EP_STATUS_INVALID_USAGE
 * naming the call in progress (its message is in ep_last_error(NULL), the calling thread's: the group's message
 * belongs to the call in progress). Calls that take no group (ep_status_string, ep_get_version, ep_get_limits,
 * ep_get_unique_id, ep_ll_buffer_size_hint) may be made from any thread at any time.
 *
 * Lifetimes: handles are made after their group and destroyed before or after it. ep_group_destroy orphans the
 * group's handles: an orphan can only be destroyed (ep_handle_destroy / ep_ll_handle_destroy, which then free its
 * memory without waiting on anything). A destroyed group or handle, destroyed again or passed to any call, is
 * EP_STATUS_INVALID_USAGE ("not a live group"), never a use of freed memory; ep_last_error() of a destroyed group
 * is the thread's message.
 *
 * Device-side faults are not lost: a kernel that sees bad data (an expert index out of range) or whose wait on
 * a peer runs out of its time budget records it in the group's error word with a message naming the token or the
 * peer. Two classes:
 *  - Data faults (EP_STATUS_DEVICE_ERROR: a bad expert index, a graph-safe receive past its bound) belong to the
 *    rank that made them. A collective call never skips its work for one (its peers would wait for it until their
 *    budget ran out): it leaves the fault pending and runs. The fault is reported by ep_get_async_error(), by the
 *    next local call (layout, handle creation, ...), or by the eager prepare whose own kernel met it (after the
 *    kernel ran on every rank). The group keeps working.
 *  - Fatal faults (EP_STATUS_TIMEOUT, a corrupted transfer) outrank data faults: one is recorded over an unread
 *    data fault. The rank that meets one publishes it to every rank of the group (origin rank, cause, wait site),
 *    whose waits then end at once: there the fault is EP_STATUS_PEER_FAILED, "rank 2 failed: timed out waiting
 *    for rank 3 ... in <site>", while the origin reports its own EP_STATUS_TIMEOUT "rank 2 timed out ... waiting
 *    for rank 3". An aborted group (ep_group_abort) is published the same way. A data fault is never published.
 *    The next call reports the fault and fails the group: every later call but ep_group_destroy returns
 *    EP_STATUS_INVALID_USAGE with "<call>: the group failed earlier: <the first fatal fault's message>", so that
 *    the origin (peer, wait site, cause) stays readable for the group's life whatever was called since. A failed
 *    group stays failed on every rank until it is destroyed; the next group starts healthy.
 * `ep_get_async_error()` reads the word without making a call.
 */
#ifndef EP_H
#define EP_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Marks the functions libep.so exports; everything else in the library is hidden. */
#if defined(__GNUC__)
#define EP_API __attribute__((visibility("default")))
#else
#define EP_API
#endif

#define EP_VERSION_MAJOR 0
#define EP_VERSION_MINOR 1
#define EP_VERSION_PATCH 0
#define EP_VERSION_CODE (EP_VERSION_MAJOR * 10000 + EP_VERSION_MINOR * 100 + EP_VERSION_PATCH)

/* ------------------------------------------------------------------------------------------------------------
 * Status codes
 * ------------------------------------------------------------------------------------------------------------ */
typedef enum ep_status {
  EP_STATUS_SUCCESS = 0,
  EP_STATUS_INVALID_ARGUMENT = 1, /* an argument is null, out of range, or inconsistent with another */
  EP_STATUS_INVALID_USAGE = 2,    /* the call is not allowed in this state (e.g. group already failed) */
  EP_STATUS_UNSUPPORTED = 3,      /* valid request this build or this machine cannot serve */
  EP_STATUS_OUT_OF_MEMORY = 4,    /* device or host memory could not be allocated */
  EP_STATUS_CUDA_ERROR = 5,       /* a CUDA runtime call failed; the message carries CUDA's text */
  EP_STATUS_SUBSTRATE_ERROR = 6,  /* NVSHMEM failed (init, allocation, bootstrap) */
  EP_STATUS_DEVICE_ERROR = 7,     /* a kernel saw bad data (e.g. expert index out of range) */
  EP_STATUS_TIMEOUT = 8,          /* a device-side wait on a peer ran out of its time budget */
  EP_STATUS_INTERNAL_ERROR = 9,   /* a self-check of the library failed: a bug, please report */
  EP_STATUS_PEER_FAILED = 10,     /* another rank met a fatal fault (the message names it and its cause) and
                                     published it: this rank's waits ended at once instead of timing out */
  EP_STATUS_COUNT                 /* number of codes, not a code */
} ep_status_t;

/* A constant, never-NULL name for a status ("EP_STATUS_TIMEOUT"), or "EP_STATUS_<unknown>". */
EP_API const char* ep_status_string(ep_status_t status);

/* The version of the loaded libep.so, as EP_VERSION_CODE counts it (major * 10000 + minor * 100 + patch). A
 * program built against this header can compare it with EP_VERSION_CODE to find a library of another version at
 * run time. Not collective; allocates nothing; graph-capturable (no device work). */
EP_API ep_status_t ep_get_version(int* version);

/* ------------------------------------------------------------------------------------------------------------
 * Limits: the bounds every call checks its arguments against, in one place. Bindings read them at run time with
 * ep_get_limits() rather than repeating the numbers.
 * ------------------------------------------------------------------------------------------------------------ */
#define EP_MAX_RANKS 1024                /* ranks in a group */
#define EP_MAX_TOPK 32                   /* experts per token: config.max_topk, num_topk */
#define EP_MAX_HIDDEN 65536              /* config.hidden: the kernels count a row's bytes in an int */
#define EP_LL_MAX_TOKENS_PER_RANK 8192   /* config.ll_max_tokens_per_rank: an LL message numbers a token's place
                                            among its source's tokens in 13 bits */
#define EP_MAX_EXPERT_ALIGNMENT 65536    /* ep_dispatch_prepare_args_t.expert_alignment: an aligned count stays an
                                            int */
#define EP_MAX_SMS 1024                  /* config.num_sms, config.max_sms, a call's num_sms */
#define EP_DEFAULT_NUM_SMS 24            /* SMs of a normal dispatch or combine when config.num_sms is 0; the other
                                            SMs stay free for the compute that overlaps the communication */
#define EP_MAX_TIMEOUT_SECONDS 3600      /* config.timeout_seconds */
#define EP_MIN_TIMEOUT_SECONDS 0.001     /* config.timeout_seconds: a shorter budget ends waits a launch's time takes */

/* The limits above, as the loaded libep.so has them. `size` comes first so that the struct can grow: set it with
 * EP_LIMITS_INIT; a size this library does not know is rejected (EP_STATUS_INVALID_ARGUMENT) instead of being
 * written past. */
typedef struct ep_limits {
  uint32_t size;               /* [IN] sizeof(ep_limits_t) */
  int max_ranks;               /* [OUT] EP_MAX_RANKS */
  int max_topk;                /* [OUT] EP_MAX_TOPK */
  int max_hidden;              /* [OUT] EP_MAX_HIDDEN */
  int ll_max_tokens_per_rank;  /* [OUT] EP_LL_MAX_TOKENS_PER_RANK */
  int max_expert_alignment;    /* [OUT] EP_MAX_EXPERT_ALIGNMENT */
  int max_sms;                 /* [OUT] EP_MAX_SMS */
  int default_num_sms;         /* [OUT] EP_DEFAULT_NUM_SMS */
  int max_timeout_seconds;     /* [OUT] EP_MAX_TIMEOUT_SECONDS */
} ep_limits_t;

#define EP_LIMITS_INIT { (uint32_t)sizeof(ep_limits_t), 0, 0, 0, 0, 0, 0, 0, 0 }

/* Fill `limits` (its size set by EP_LIMITS_INIT) with the library's limits.
 * Collective: no. Allocates: no. Graph-capturable: yes (host only). */
EP_API ep_status_t ep_get_limits(ep_limits_t* limits);

/* ------------------------------------------------------------------------------------------------------------
 * Types
 * ------------------------------------------------------------------------------------------------------------ */
typedef enum ep_dtype {
  EP_DTYPE_INVALID = 0,
  EP_BF16 = 1,     /* bfloat16, 2 bytes */
  EP_FP8_E4M3 = 2, /* float8 e4m3fn, 1 byte; travels with fp32 scales, one per 128 channels */
  EP_FP32 = 3,
  EP_INT32 = 4,
  EP_INT64 = 5,
} ep_dtype_t;

/* A group of ranks that exchange tokens; owns the NVSHMEM state, symmetric buffers and tuning config. */
typedef struct ep_group* ep_group_t;

/* Bytes that bootstrap a group: rank 0 makes them, the caller copies them to every rank (pipe, file,
 * torch.distributed broadcast), every rank passes them to ep_group_create(). */
#define EP_UNIQUE_ID_BYTES 128
typedef struct ep_unique_id {
  unsigned char bytes[EP_UNIQUE_ID_BYTES];
} ep_unique_id_t;

/* ------------------------------------------------------------------------------------------------------------
 * Group
 * ------------------------------------------------------------------------------------------------------------ */
#define EP_GROUP_CONFIG_MAGIC 0x45504731u /* "EPG1" */

/* How a group is laid out and sized. Start from EP_GROUP_CONFIG_INIT and change what you need.
 * Buffer sizes derive from the shape hints (the largest shape any later call will use); a call whose shape
 * exceeds them is rejected with EP_STATUS_INVALID_ARGUMENT naming the hint to raise. */
typedef struct ep_group_config {
  uint32_t size;               /* sizeof(ep_group_config_t) */
  uint32_t magic;              /* EP_GROUP_CONFIG_MAGIC */
  int ranks_per_node;          /* ranks per NVLink domain; 0 = all ranks in one domain. Smaller values make
                                  virtual nodes (e.g. 2 on a 4-GPU host) whose traffic takes the internode path.
                                  Test/debug knob: with the environment variable EP_INTERNODE_FORCE_PUT=1 at
                                  ep_group_create, every cross-node transfer of that group uses NVSHMEM puts
                                  (the NIC path) even where the peer is NVLink-reachable; same results, slower */
  int num_experts;             /* hint: largest number of experts, a multiple of the number of ranks */
  int hidden;                  /* hint: largest hidden size (channels per token), a multiple of 128, <= 65536 */
  int max_tokens_per_rank;     /* hint: largest number of tokens one rank dispatches in one call; times the
                                  number of ranks (the rows one rank may receive) below 2^31 */
  int max_topk;                /* hint: largest top-k (experts per token), 1..32 */
  int ll_max_tokens_per_rank;  /* low-latency path: largest max_tokens_per_rank of any ep_ll_dispatch (1..8192);
                                  0 = no low-latency buffer. The group reserves ep_ll_buffer_size_hint() bytes of
                                  symmetric memory for it, sized with num_experts, hidden and max_topk above (or
                                  ll_region_bytes below) */
  int num_sms;                 /* SMs a normal-mode dispatch or combine may use; 0 = the measured default */
  int max_sms;                 /* SMs any kernel of the group may occupy at once; 0 = all the device reports (a CUDA
                                  MPS limit lowers that). The low-latency kernels use this many; normal-mode grids
                                  are clamped to it. Lower it to leave SMs to work that overlaps the calls */
  double timeout_seconds;      /* budget of every device-side wait on a peer, in seconds, in
                                  [EP_MIN_TIMEOUT_SECONDS, EP_MAX_TIMEOUT_SECONDS] */
  size_t normal_region_bytes;  /* symmetric bytes of the normal path; 0 = sized to hold max_tokens_per_rank tokens
                                  of hidden and max_topk. Otherwise the region holds as many tokens per round as
                                  fit (for hidden and max_topk above), and a call of more tokens, up to
                                  max_tokens_per_rank, runs in rounds with the same results. On several nodes
                                  the pool holds the intranode and the internode regions together */
  size_t ll_region_bytes;      /* low-latency buffer in bytes (DeepEP's num_rdma_bytes in low-latency mode); 0 = sized
                                  from the hints (ep_ll_buffer_size_hint). Else the LL buffer is this many bytes
                                  (at least what one token of hidden 128 needs), every LL dispatch lays it out for
                                  its own shape and is refused, naming the bytes that shape needs, when it does not
                                  fit; the num_experts and hidden hints then bound no LL call (num_experts only sizes
                                  the handles, with the experts that fit at the hidden hint if more).
                                  Needs ll_max_tokens_per_rank > 0 (T and max_topk still bound the calls) */
  int mask_failed_ranks;       /* 1: the group keeps a rank mask (DeepEP's enable_shrink): a low-latency or
                                  normal-path call whose wait on a peer runs out of the time
                                  budget masks that peer on this rank and succeeds without it, instead of failing
                                  the group; ep_group_mask_rank and the calls after it read and set the mask by
                                  hand (see "Rank mask" below).
                                  0 (the default): no mask, a timeout is fatal (the rules above). The same on
                                  every rank */
} ep_group_config_t;

#define EP_GROUP_CONFIG_INIT \
  { (uint32_t)sizeof(ep_group_config_t), EP_GROUP_CONFIG_MAGIC, 0, 256, 7168, 4096, 8, 0, 0, 0, 20.0, 0, 0, 0 }

/* Facts about a created group, filled by ep_group_get_info(). */
typedef struct ep_group_info {
  int rank;                   /* this rank, 0..num_ranks-1 */
  int num_ranks;
  int ranks_per_node;
  int num_nodes;              /* num_ranks / ranks_per_node */
  int node;                   /* rank / ranks_per_node */
  int local_rank;             /* rank % ranks_per_node */
  int cuda_device;
  int num_nvlink_peers;       /* ranks whose memory this rank reaches by loads/stores (itself included) */
  int num_sms;                /* SMs the normal-mode kernels use by default */
  int device_sms;             /* SMs this rank's kernels may occupy at once: config.max_sms, or all the device
                                 reports; the low-latency grids use them all, and no grid is larger */
  size_t symmetric_heap_bytes; /* NVSHMEM heap reserved for this group on this GPU */
} ep_group_info_t;

/* Fill `unique_id` with fresh bootstrap bytes. Call it on rank 0 only, before ep_group_create().
 *   unique_id  [OUT] host memory
 * Collective: no. Allocates: no. Graph-capturable: no. */
EP_API ep_status_t ep_get_unique_id(ep_unique_id_t* unique_id);

/* Create a group: bootstrap NVSHMEM from the unique id, reserve the symmetric heap the config asks for, map
 * the NVLink peers, and allocate the group's buffers on `cuda_device`.
 *   group        [OUT] the new group, or NULL on failure
 *   unique_id    [IN]  the bytes rank 0 got from ep_get_unique_id()
 *   rank         [IN]  0..num_ranks-1
 *   num_ranks    [IN]  >= 1
 *   cuda_device  [IN]  CUDA device ordinal this rank uses; becomes the current device of the calling thread
 *   config       [IN]  EP_GROUP_CONFIG_INIT-initialised; NULL means all defaults
 * Checks what it can before NVSHMEM starts (device exists, sizes, free memory) so that a bad request returns a
 * status instead of ending the process. Waits on the peers (the config exchange, the end of setup) have the
 * config's time budget: a rank that never comes is EP_STATUS_TIMEOUT naming it; NVSHMEM's own init and symmetric
 * allocations are NVSHMEM's collectives and wait as NVSHMEM does. One group per process at a time; after a
 * collective ep_group_destroy() (see there) a new group may be created.
 * Collective: yes (all ranks, same config). Allocates: yes (device, pinned host). Graph-capturable: no. */
EP_API ep_status_t ep_group_create(ep_group_t* group, const ep_unique_id_t* unique_id, int rank, int num_ranks,
                            int cuda_device, const ep_group_config_t* config);

/* Free everything the group owns and shut NVSHMEM down. Waits for the group's device work to finish, then for
 * every rank, within the group's time budget. A group that failed anywhere (a fatal fault here, or one a peer
 * published) is instead freed on this rank alone at once, as ep_group_abort does, and EP_STATUS_SUCCESS returned;
 * a destroy that a rank never reaches returns EP_STATUS_TIMEOUT naming it after the budget, the group freed on
 * this rank alone. In both cases NVSHMEM, whose shutdown needs every peer, stays up: a new group needs a new
 * process. The group's handles that are still alive become orphans (see Lifetimes above); a group destroyed
 * already is EP_STATUS_INVALID_USAGE, as is a destroy while another thread is inside a call on the group.
 *   group  [IN] may be NULL (then nothing happens)
 * Collective: yes (unless the group failed). Allocates: no. Graph-capturable: no. */
EP_API ep_status_t ep_group_destroy(ep_group_t group);

/* Tear the group down locally, without any peer and without waiting for the device, as after a fatal fault (a peer
 * that is gone would leave ep_group_destroy waiting in NVSHMEM's collective shutdown). The group's handles become
 * orphans (destroy them, or leave them to the process's exit). Host memory is freed; device memory, the pinned
 * error word and NVSHMEM are left as they are (kernels still waiting on a peer end within the time budget, and
 * NVSHMEM's shutdown is collective), so after an abort this process cannot create another group: ep_group_create
 * says so. Restart the process (every rank, or the survivors with a new unique id) to make a new group. Unless
 * the group had failed already, the abort is published to the peers (a one-thread kernel this call does not wait
 * for): their waits end at once with EP_STATUS_PEER_FAILED ("rank 0 failed: aborted the group").
 *   group  [IN] may be NULL (then nothing happens); destroyed or aborted already: EP_STATUS_INVALID_USAGE.
 * Collective: no. Allocates: no. Graph-capturable: no. Any thread, but not while another is inside a call on it. */
EP_API ep_status_t ep_group_abort(ep_group_t group);

/* Facts about the group (rank, nodes, NVLink peers, heap size).
 * Collective: no. Allocates: no. Graph-capturable: yes (host only). */
EP_API ep_status_t ep_group_get_info(ep_group_t group, ep_group_info_t* info);

/* The message of the last failed call on `group`, or of the last failed call of this thread that had no group
 * (e.g. ep_group_create) when `group` is NULL. Never NULL; "" when nothing failed. Valid until the next call. */
EP_API const char* ep_last_error(ep_group_t group);

/* Read the group's device error word without launching anything: EP_STATUS_SUCCESS, or the fault a kernel
 * recorded (EP_STATUS_DEVICE_ERROR, EP_STATUS_TIMEOUT, ...), with its message in ep_last_error(). Reading it
 * reports it, as the next local call would have: a data fault (bad expert index, receive overflow) is then cleared
 * (collective calls leave data faults for this call to report); a timeout leaves the group failed, and every later
 * call but ep_group_destroy returns EP_STATUS_INVALID_USAGE (then *async_status is EP_STATUS_INVALID_USAGE too,
 * with the first fatal message). Only kernels that have finished are seen; synchronise the stream first to see a
 * given call's outcome.
 *   async_status [OUT]
 * Collective: no. Allocates: no. Graph-capturable: no. */
EP_API ep_status_t ep_get_async_error(ep_group_t group, ep_status_t* async_status);

/* Check the group's data paths end to end: every rank sends a tagged block to every other rank through the
 * transport (put with signal, and NVLink stores where the peer is reachable), waits for all blocks with the
 * group's timeout, and verifies them. Returns EP_STATUS_INTERNAL_ERROR naming the first bad (source, target)
 * pair, EP_STATUS_TIMEOUT naming the peer that never delivered, or EP_STATUS_PEER_FAILED when the group failed
 * on another rank. Synchronises `stream`.
 * Collective: yes. Allocates: no. Graph-capturable: no. */
EP_API ep_status_t ep_group_check(ep_group_t group, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------------------
 * Rank mask (config.mask_failed_ranks = 1): which ranks this rank no longer exchanges with. One int32 per rank in
 * device memory owned by the group, this rank's own view (1 = masked); zero at create. A masked peer is skipped by
 * the low-latency calls: nothing is sent to it, nothing is awaited from it, its tokens count as none (recv_count and
 * layout_range say 0 rows from it) and a token's top-k entries whose expert lives on it are dropped (the combine sums
 * the other entries; ep_ll_combine_args_t.renormalize_masked rescales the kept weights). A rank is masked
 *  - by the kernels: a low-latency wait on a peer (an acknowledgement, a count, the combine's rows) or the group's
 *    barrier (ep_ll_clean's) that runs out of config.timeout_seconds masks that peer and goes on: the call
 *    succeeds. A peer that stopped calling is thus masked on every survivor by the same call, and costs
 *    them one time budget once; later calls do not wait for it. The mask is for ranks that stopped: one that was
 *    only late and calls again must first mask itself (its stores could land in the survivors' later calls);
 *  - by hand: ep_group_mask_rank. Masking a healthy rank r means every rank, r included, masks r before the same
 *    call; r then exchanges with nobody but itself (its tokens keep only its own experts).
 * Unmasking (ep_group_mask_rank with masked = 0, ep_group_clear_rank_mask) takes effect at the next ep_ll_clean,
 * which every rank must call after it and before its next low-latency dispatch (a dispatch before it is
 * EP_STATUS_INVALID_USAGE): the masked rank's acknowledgements and call numbers fell out of step, and the clean
 * restarts them on every rank. A group with a masked rank is destroyed on each rank alone (as a failed group:
 * NVSHMEM's collective shutdown needs every peer). Everything else stays fatal: bad data, a shape mismatch, a fault
 * a peer published, a timeout of ep_group_check (docs/faults.md, "What stays fatal").
 *
 * The normal path honours the mask too. Its waits on a peer mask it as above; the prepare
 * drops a token's top-k entries whose expert lives on a masked rank and takes 0 rows from a masked rank (the handle,
 * the counts and ep_handle_get_rank_prefix say so); dispatch and combine send nothing to masked ranks and wait for
 * nothing from them; a rank masked after the prepare leaves its rows of the dispatch empty (recv_topk_idx -1,
 * weights 0, recv_src_idx -1) and its copies out of the combine's sums. An unmask, once the group has made a
 * normal-path call, makes every later prepare / dispatch / combine EP_STATUS_UNSUPPORTED (its call epochs with
 * the rank fell out of step; a new group takes the rank back). With several nodes a token reaches node m only
 * through its source's rail peer there (the rank of m with the source's local index), so the prepare also drops
 * every top-k entry of node m for a source whose rail peer on m is masked (docs/faults.md, "Masking failed ranks").
 * A group without config.mask_failed_ranks refuses these calls with EP_STATUS_INVALID_USAGE.
 * ------------------------------------------------------------------------------------------------------------ */

/* Mask (masked = 1) or unmask (masked = 0) `rank` in this rank's mask, in stream order.
 *   rank [IN] 0..num_ranks-1 (this rank included: see "by hand" above);  masked [IN] 0 or 1
 * Collective: no (every rank masks by hand as above). Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_group_mask_rank(ep_group_t group, int rank, int masked, cudaStream_t stream);

/* Copy this rank's mask into `mask`, in stream order (DeepEP's low_latency_query_mask_buffer).
 *   mask [OUT] int32 device [num_ranks]: 1 = masked, 0 = not
 * Collective: no. Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_group_get_rank_mask(ep_group_t group, int32_t* mask, cudaStream_t stream);

/* Unmask every rank, in stream order (DeepEP's low_latency_clean_mask_buffer); ep_ll_clean then as for an unmask.
 * Collective: no. Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_group_clear_rank_mask(ep_group_t group, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------------------
 * Redundant experts: logical experts served by physical copies (the EPLB model)
 *
 * The model has L logical experts; the group has num_experts physical expert slots (num_experts / num_ranks per
 * rank, slot s on rank s / (num_experts / num_ranks)), and a logical expert may be held by several slots (a hot
 * expert replicated for load balance, or a copy kept so that a rank's loss loses no expert). The router picks
 * logical experts; ep_map_experts turns each pick into one physical slot before the dispatch, choosing among the
 * copies on ranks this rank's mask has not masked (see "Rank mask"), so that a masked rank's experts are served by
 * their surviving copies and a token loses only the experts with no copy left.
 *
 * The map is the caller's device memory, passed to each call rather than registered on the group: every MoE layer
 * may have its own placement, and a rebalance that writes new slots into the same memory (in stream order) takes
 * effect at the next call, inside a captured graph too, with no host step.
 * ------------------------------------------------------------------------------------------------------------ */
#define EP_EXPERT_MAP_MAGIC 0x45504d31u /* "EPM1" */

typedef struct ep_expert_map {
  uint32_t size;           /* sizeof(ep_expert_map_t) */
  uint32_t magic;          /* EP_EXPERT_MAP_MAGIC */
  const int32_t* slots;    /* [IN] [num_logical_experts, max_copies] int32 device: row l lists the physical slots
                              that hold a copy of logical expert l, in [0, num_experts); -1 = no copy in that
                              column (padding, anywhere in the row). A row without a valid slot is an expert
                              with no copy: it maps to -1 */
  int num_logical_experts; /* L >= 1 */
  int max_copies;          /* C: columns of `slots`, 1..num_experts */
  int num_experts;         /* physical slots: a positive multiple of num_ranks; the num_experts of the
                              dispatches that take the mapped ids */
} ep_expert_map_t;

#define EP_EXPERT_MAP_INIT \
  { (uint32_t)sizeof(ep_expert_map_t), EP_EXPERT_MAP_MAGIC, NULL, 0, 0, 0 }

/* Map every logical pick to a physical slot: physical_topk[t][k] = the j-th live copy of logical expert
 * l = logical_topk[t][k], in column order, with j = (t + rank) % (live copies of l), where a copy is live when this
 * rank exchanges with its slot's rank under this rank's mask at the time the kernel runs: that rank is this one, or
 * neither is masked (see "Rank mask"). The mask is read on the device: the call follows the kernels' automatic
 * masking with no host step. Without a rank mask (config.mask_failed_ranks 0)
 * every copy is live: the plain EPLB map. Spreading by token index (shifted by the rank, so that the ranks' first
 * tokens do not all pick the first copy) gives each copy an equal share of a logical expert's tokens, the same on
 * every run. -1 stays -1; a logical expert with no live copy becomes -1 (lost, as a masked rank's expert is without
 * a map). A logical index outside [-1, L), or a slot outside [-1, num_experts), is a data fault
 * (EP_STATUS_DEVICE_ERROR from ep_get_async_error or the next local call, naming the token or the logical expert):
 * the pick becomes -1, the bad copy is skipped. logical_topk and physical_topk may be the same memory (mapped in
 * place).
 *   map            [IN]  EP_EXPERT_MAP_INIT-initialised; its slots in device memory
 *   logical_topk   [IN]  [num_tokens, num_topk] int64 device; -1 = no expert
 *   physical_topk  [OUT] [num_tokens, num_topk] int64 device
 *   num_tokens     [IN]  >= 0; num_tokens * num_topk <= 2^30
 *   num_topk       [IN]  1..EP_MAX_TOPK
 * Collective: no. Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_map_experts(ep_group_t group, const ep_expert_map_t* map, const int64_t* logical_topk,
                                  int64_t* physical_topk, int num_tokens, int num_topk, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------------------
 * Layout: from the routing, who receives what
 * ------------------------------------------------------------------------------------------------------------ */
#define EP_LAYOUT_ARGS_MAGIC 0x45504c31u /* "EPL1" */

typedef struct ep_layout_args {
  uint32_t size;                /* sizeof(ep_layout_args_t) */
  uint32_t magic;               /* EP_LAYOUT_ARGS_MAGIC */
  const int64_t* topk_idx;      /* [IN]  [num_tokens, num_topk] int64 device; -1 = no expert */
  int num_tokens;               /* >= 0; 0 is allowed (all outputs become zero); num_tokens * num_topk <= 2^30 */
  int num_topk;                 /* 1..32 */
  int num_experts;              /* multiple of the group's num_ranks */
  int* num_tokens_per_rank;     /* [OUT] [num_ranks] int32 device: tokens with >= 1 expert on that rank */
  int* num_tokens_per_node;     /* [OUT] [num_nodes] int32 device, or NULL when not wanted */
  int* num_tokens_per_expert;   /* [OUT] [num_experts] int32 device: tokens that select the expert */
  uint8_t* is_token_in_rank;    /* [OUT] [num_tokens, num_ranks] bool (0/1 bytes) device */
} ep_layout_args_t;

#define EP_LAYOUT_ARGS_INIT \
  { (uint32_t)sizeof(ep_layout_args_t), EP_LAYOUT_ARGS_MAGIC, NULL, 0, 0, 0, NULL, NULL, NULL, NULL }

/* Count, from `topk_idx`, the tokens each rank, node and expert receives, and which ranks each token goes to.
 * A token counts once per rank, node and expert, even when several of its experts live on one rank or its
 * top-k names one expert twice. An index outside
 * [-1, num_experts) is not counted: it is recorded in the group's error word and the next call returns
 * EP_STATUS_DEVICE_ERROR naming the token (the next local call, or ep_get_async_error: a collective call leaves it
 * pending). Local: no data leaves this GPU. The group's scratch serves one layout
 * call at a time: a call while an earlier one still runs on another stream is EP_STATUS_INVALID_USAGE (order
 * them; captured calls are ordered by the caller).
 * Collective: no. Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_get_dispatch_layout(ep_group_t group, const ep_layout_args_t* args, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------------------
 * Normal (high-throughput) dispatch and combine: training and prefill, thousands of tokens per rank
 *
 * Three steps, all on the caller's stream:
 *   1. ep_dispatch_prepare(): from `topk_idx`, agree with every rank on who sends what to whom, and store that
 *      routing in a handle. Eager form: it waits on the host for the number of rows this rank receives, so
 *      the caller can size the outputs exactly. Graph-safe form: no host wait; the counts land in device memory
 *      and the caller gives outputs sized for a worst-case bound.
 *   2. ep_dispatch(): move the rows (and their scales, top-k ids made local, weights) to the ranks that own the
 *      experts. Output rows are ordered by source rank, then source token: deterministic. Calling it again on
 *      the same handle moves other data along the same routing ("cached dispatch"), with no prepare.
 *   3. ep_combine(): send expert outputs back along the handle's routing and sum each token's copies in fp32,
 *      in ascending rank order (deterministic), plus up to two biases.
 * Combine is the backward of dispatch and dispatch the backward of combine: both take the same handle.
 * Calls on one group must be ordered (one stream, or events between streams), and every rank makes the same
 * sequence of prepare / dispatch / combine calls.
 * ------------------------------------------------------------------------------------------------------------ */

/* The routing of one dispatch: which rows go where. Created once, refilled by every ep_dispatch_prepare(). */
typedef struct ep_handle* ep_handle_t;

/* Bytes of config.normal_region_bytes that hold `tokens_per_round` tokens a round: the normal path's symmetric
 * regions for that many tokens (on several nodes the intranode and the internode one together). A group given this
 * pool runs a call of more tokens, up to config.max_tokens_per_rank, in rounds of at least that many (DeepEP's
 * NVLink buffer hint plays this part for its ring buffers).
 *   tokens_per_round [IN] >= 1 (times num_ranks below 2^31; on several nodes at most 2^23);
 *   hidden [IN] as config.hidden;  num_ranks [IN] >= 1;  ranks_per_node [IN] 0 (one node) or a divisor of num_ranks;
 *   num_experts [IN] positive multiple of num_ranks;  max_topk [IN] 1..32;  bytes [OUT]
 * Collective: no. Allocates: no. Graph-capturable: yes (host only). */
EP_API ep_status_t ep_normal_region_size_hint(int tokens_per_round, int hidden, int num_ranks, int ranks_per_node,
                                              int num_experts, int max_topk, size_t* bytes);

/* Allocate a handle sized for the group's largest shape (config hints).
 * Collective: no. Allocates: yes (device, about max_tokens_per_rank * num_ranks * 8 bytes). Graph-capturable: no. */
EP_API ep_status_t ep_handle_create(ep_group_t group, ep_handle_t* handle);

/* Bytes of device memory a handle of this group needs (for ep_handle_create_in).
 * Collective: no. Allocates: no. Graph-capturable: yes (host only). */
EP_API ep_status_t ep_handle_memory_bytes(ep_group_t group, size_t* bytes);

/* Make a handle in device memory the caller owns (e.g. from a framework's caching allocator), so that creating
 * and dropping handles never synchronises the device. `memory` must hold ep_handle_memory_bytes() bytes,
 * 256-byte aligned, and outlive the handle.
 * Collective: no. Allocates: host memory only (the handle struct). Graph-capturable: no. */
EP_API ep_status_t ep_handle_create_in(ep_group_t group, void* memory, size_t bytes, ep_handle_t* handle);

/* Free a handle. One made by ep_handle_create frees its memory in stream order after the last call that used it
 * (on the group's own stream, behind an event of that call; the host waits for nothing, the device is never
 * synchronised); one made by ep_handle_create_in frees only the host struct (the caller frees the memory once no
 * call that uses the handle is in flight). A call captured into a CUDA graph is not tracked: do not destroy a
 * handle while a graph that uses it may still run (as for any memory a graph uses). `handle` may be NULL.
 * Collective: no. Allocates: no. Graph-capturable: no. */
EP_API ep_status_t ep_handle_destroy(ep_handle_t handle);

#define EP_DISPATCH_PREPARE_ARGS_MAGIC 0x45505031u /* "EPP1" */

typedef struct ep_dispatch_prepare_args {
  uint32_t size;                       /* sizeof(ep_dispatch_prepare_args_t) */
  uint32_t magic;                      /* EP_DISPATCH_PREPARE_ARGS_MAGIC */
  const int64_t* topk_idx;             /* [IN] [num_tokens, num_topk] int64 device; -1 = no expert */
  int num_tokens;                      /* 0..config.max_tokens_per_rank; may differ between ranks */
  int num_topk;                        /* 1..config.max_topk */
  int num_experts;                     /* multiple of num_ranks, <= config.num_experts; same on every rank */
  int expert_alignment;                /* 1..65536: per-expert received counts are rounded up to a multiple */
  /* Eager form: when `num_recv_tokens` is not NULL the call waits on the host (synchronises `stream`) and fills: */
  int* num_recv_tokens;                /* [OUT] host int: rows this rank will receive */
  int* num_recv_tokens_per_expert;     /* [OUT] host [num_experts / num_ranks], aligned; may be NULL */
  /* Graph-safe form (and also filled in the eager form when not NULL): */
  int* num_recv_tokens_dev;            /* [OUT] device int */
  int* num_recv_tokens_per_expert_dev; /* [OUT] device [num_experts / num_ranks], aligned */
  /* Rank-mask form (DeepEP's dispatch without top-k), used only when topk_idx is NULL; num_topk is then 0: */
  const uint8_t* is_token_in_rank;  /* [IN] [num_tokens, num_ranks] device bool/uint8: nonzero = send token t to
                                       rank r (once, whatever its experts there) */
  const int* num_tokens_per_expert; /* [IN] [num_experts] int32 device, or NULL: my tokens per expert (as from
                                       ep_get_dispatch_layout); summed over sources into the received per-expert
                                       counts, which are 0 without it */
} ep_dispatch_prepare_args_t;

#define EP_DISPATCH_PREPARE_ARGS_INIT                                                                                 \
  {                                                                                                                   \
    (uint32_t)sizeof(ep_dispatch_prepare_args_t), EP_DISPATCH_PREPARE_ARGS_MAGIC, NULL, 0, 0, 0, 1, NULL, NULL, NULL, \
        NULL, NULL, NULL                                                                                              \
  }

/* Agree on the routing of the next dispatch and store it in `handle` (the handle's previous routing is replaced).
 * The routing comes from topk_idx (a token goes to every rank that holds one of its experts) or, with topk_idx
 * NULL, from is_token_in_rank; every rank of a call uses the same form. Exchanges per-destination and per-expert
 * counts with every rank over NVLink. An expert index outside
 * [-1, num_experts) is a data fault (see the top of this header): that token is not sent; the eager form returns
 * EP_STATUS_DEVICE_ERROR once its kernel has run on every rank.
 * Collective: yes. Allocates: no. Graph-capturable: yes in the graph-safe form (num_recv_tokens == NULL);
 * the eager form waits on the host. */
EP_API ep_status_t ep_dispatch_prepare(ep_group_t group, ep_handle_t handle, const ep_dispatch_prepare_args_t* args,
                                       cudaStream_t stream);

/* Copy a prepared handle's rank counts, in DeepEP's prefix form, into int32 device arrays the caller owns (each
 * may be NULL), stream-ordered after the prepare that filled the handle:
 *   rank_prefix_matrix    [num_ranks, num_ranks]: entry [s][d] = rows rank d receives from ranks 0..s (DeepEP's
 *                         intranode handle[0]). One-node groups only (EP_STATUS_UNSUPPORTED otherwise: a rank of
 *                         several nodes learns the counts to its own node's ranks only).
 *   recv_rank_prefix_sum  [num_ranks]: entry s = rows this rank receives from ranks 0..s (DeepEP's internode
 *                         recv_gbl_rank_prefix_sum); any group.
 * Collective: no. Allocates: no. Graph-capturable: yes (one small kernel). */
EP_API ep_status_t ep_handle_get_rank_prefix(ep_handle_t handle, int32_t* rank_prefix_matrix,
                                             int32_t* recv_rank_prefix_sum, cudaStream_t stream);

#define EP_DISPATCH_ARGS_MAGIC 0x45504431u /* "EPD1" */

typedef struct ep_dispatch_args {
  uint32_t size;               /* sizeof(ep_dispatch_args_t) */
  uint32_t magic;              /* EP_DISPATCH_ARGS_MAGIC */
  const void* x;               /* [IN] [num_tokens, hidden] device, 16-byte aligned; num_tokens from the prepare */
  ep_dtype_t x_dtype;          /* EP_BF16, or EP_FP8_E4M3 (then x_scales is required) */
  int hidden;                  /* <= config.hidden; multiple of 8 (BF16) or 128 (FP8) */
  const float* x_scales;       /* [IN] [num_tokens, hidden / 128] fp32 device, FP8 only */
  const int64_t* topk_idx;     /* [IN] [num_tokens, num_topk] the routing given to the prepare; needed only for
                                  recv_topk_idx / recv_topk_weights */
  const float* topk_weights;   /* [IN] [num_tokens, num_topk] fp32 device, or NULL */
  int recv_capacity;           /* rows available in the outputs (>= received rows; the worst-case bound in the
                                  graph-safe form is num_ranks * max tokens per rank) */
  void* recv_x;                /* [OUT] [recv_capacity, hidden] same dtype as x, 16-byte aligned */
  float* recv_x_scales;        /* [OUT] [recv_capacity, hidden / 128] fp32, FP8 only */
  int64_t* recv_topk_idx;      /* [OUT] [recv_capacity, num_topk] local expert ids (others -1), or NULL; rows past
                                  the received count are set to -1 */
  float* recv_topk_weights;    /* [OUT] [recv_capacity, num_topk] (0 where the id is -1), or NULL; needs
                                  topk_weights */
  int* recv_src_idx;           /* [OUT] [recv_capacity] index of each row's token on its source rank, or NULL;
                                  -1 past the received count */
  int num_sms;                 /* SMs this call may use; 0 = the group's config.num_sms */
} ep_dispatch_args_t;

#define EP_DISPATCH_ARGS_INIT \
  { (uint32_t)sizeof(ep_dispatch_args_t), EP_DISPATCH_ARGS_MAGIC, NULL, EP_BF16, 0, NULL, NULL, NULL, 0, NULL, \
    NULL, NULL, NULL, NULL, 0 }

/* Move rows to the ranks that hold their experts, along the handle's routing. More received rows than
 * recv_capacity is a data fault (EP_STATUS_DEVICE_ERROR from ep_get_async_error or the next local call; the extra
 * rows are dropped).
 * Collective: yes. Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_dispatch(ep_group_t group, ep_handle_t handle, const ep_dispatch_args_t* args,
                               cudaStream_t stream);

#define EP_COMBINE_ARGS_MAGIC 0x45504331u /* "EPC1" */

typedef struct ep_combine_args {
  uint32_t size;               /* sizeof(ep_combine_args_t) */
  uint32_t magic;              /* EP_COMBINE_ARGS_MAGIC */
  const void* x;               /* [IN] [received rows, hidden] bf16 device, in the handle's dispatch order */
  int hidden;                  /* <= config.hidden, multiple of 8 */
  const float* topk_weights;   /* [IN] [received rows, num_topk] fp32, or NULL: summed back like x */
  const void* bias0;           /* [IN] [num_tokens, hidden] bf16, or NULL: added to the output */
  const void* bias1;           /* [IN] [num_tokens, hidden] bf16, or NULL */
  void* combined_x;            /* [OUT] [num_tokens, hidden] bf16 */
  float* combined_topk_weights; /* [OUT] [num_tokens, num_topk] fp32, or NULL; needs topk_weights */
  int num_sms;                 /* SMs this call may use; 0 = the group's config.num_sms */
} ep_combine_args_t;

#define EP_COMBINE_ARGS_INIT \
  { (uint32_t)sizeof(ep_combine_args_t), EP_COMBINE_ARGS_MAGIC, NULL, 0, NULL, NULL, NULL, NULL, NULL, 0 }

/* Sum each token's expert outputs back on its source rank: out[t] = bias0[t] + bias1[t] + sum over the ranks r
 * that token t went to, ascending, of x_r[row of t on r], accumulated in fp32 and rounded once to bf16.
 * Tokens sent nowhere get bias0 + bias1 (or zeros).
 * Collective: yes. Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_combine(ep_group_t group, ep_handle_t handle, const ep_combine_args_t* args,
                              cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------------------
 * Low-latency (LL) dispatch and combine: decoding, up to a few hundred tokens per rank
 *
 * Every token goes in one hop straight into a packed per-expert buffer on the rank that owns the expert: NVLink
 * stores for peers of this node, NVSHMEM put-with-signal for peers of other nodes (real or virtual). FP8 casting
 * happens inside the dispatch kernel. Nothing on this path synchronises the host or allocates: a dispatch,
 * the expert computation and a combine can be captured in one CUDA graph and replayed with new inputs.
 *
 *   ep_ll_dispatch():  x [num_tokens, hidden] bf16 -> recv_x [num_local_experts, num_ranks * max_tokens_per_rank,
 *                      hidden] (FP8 e4m3 + scales, or BF16) and recv_count [num_local_experts]. Row i of local
 *                      expert e is valid for i < recv_count[e]; rows are ordered by source rank, then source token
 *                      (deterministic); a token that lists an expert twice appears once.
 *   ep_ll_combine():   y [num_local_experts, num_ranks * max_tokens_per_rank, hidden] bf16 (the experts' outputs in
 *                      the dispatch layout) -> out [num_tokens, hidden] bf16 with
 *                      out[t] = bf16(sum over k in top-k order, topk_idx[t][k] != -1, of w[t][k] * y[expert_k][row]),
 *                      accumulated in fp32 with one fused multiply-add per term (deterministic).
 *
 * Receive hook: with return_after_send = 1 a call only issues its sends (no SM waits for peers) and returns;
 * ep_ll_dispatch_recv() / ep_ll_combine_recv() later launch the receive phase on the caller's stream. Without the
 * hook a call normally runs as one cooperative kernel (at most one block per SM, all resident at once) that sends,
 * then receives.
 *
 * Buffers: the LL region has two identical halves. Each dispatch takes the next half (alternating) and its
 * handle's combine uses the same half, so micro-batch B can be dispatched while micro-batch A is combined. The
 * two-buffer rule (as in DeepEP): at most two dispatches may be outstanding; a handle's combine must come before
 * the dispatch after next (otherwise its half has been reused and the combine returns EP_STATUS_INVALID_USAGE).
 * Before data enters a peer's half the sender waits until that peer has finished receiving the previous call on
 * that half, so reuse is safe whatever the timing; a peer that never gets there times out with its rank named.
 * Calls on one group must be ordered (one stream, or events), and every rank makes the same sequence of LL calls.
 * ------------------------------------------------------------------------------------------------------------ */

/* Bytes of symmetric memory the LL buffer needs for a shape: both halves, each with signals, a send staging area
 * for one rank's messages, a combine staging area (the zero-copy buffer) and the receive area. Never more than
 * DeepEP's LowLatencyLayout for E >= 64 (for fewer experts, up to T * (2 * hidden + 16) bytes more).
 *   max_tokens_per_rank [IN] >= 1;  hidden [IN] positive multiple of 128;  num_ranks [IN] >= 1;
 *   num_experts [IN] positive multiple of num_ranks;  max_topk [IN] 1..32;  bytes [OUT]
 * Collective: no. Allocates: no. Graph-capturable: yes (host only). */
EP_API ep_status_t ep_ll_buffer_size_hint(int max_tokens_per_rank, int hidden, int num_ranks, int num_experts,
                                          int max_topk, size_t* bytes);

/* The routing of one LL dispatch, reused by its combine. Created once, refilled by every ep_ll_dispatch(). */
typedef struct ep_ll_handle* ep_ll_handle_t;

/* Allocate an LL handle sized for the group's config (config.ll_max_tokens_per_rank must be > 0).
 * Collective: no. Allocates: yes (device, about num_experts * ll_max_tokens_per_rank * 4 bytes). Graph-capturable: no. */
EP_API ep_status_t ep_ll_handle_create(ep_group_t group, ep_ll_handle_t* handle);

/* Free an LL handle: its memory goes in stream order after the last call that used it, as for ep_handle_destroy
 * (no host wait, no device synchronisation; captured calls are the caller's to finish first). Work of the caller's
 * own that reads the handle's routing (ep_ll_get_routing) must be done, or ordered before the handle's last call,
 * by then. `handle` may be NULL.
 * Collective: no. Allocates: no. Graph-capturable: no. */
EP_API ep_status_t ep_ll_handle_destroy(ep_ll_handle_t handle);

#define EP_LL_DISPATCH_ARGS_MAGIC 0x45504c44u /* "EPLD" */

typedef struct ep_ll_dispatch_args {
  uint32_t size;               /* sizeof(ep_ll_dispatch_args_t) */
  uint32_t magic;              /* EP_LL_DISPATCH_ARGS_MAGIC */
  const void* x;               /* [IN] [num_tokens, hidden] bf16 device, 16-byte aligned */
  int num_tokens;              /* 0..max_tokens_per_rank; may differ between ranks */
  int hidden;                  /* <= config.hidden; multiple of 128 (FP8; 512 with use_ue8m0) or of 8 (BF16);
                                  the same on every rank */
  const int64_t* topk_idx;     /* [IN] [num_tokens, num_topk] int64 device; -1 = no expert */
  int num_topk;                /* 1..config.max_topk */
  int num_experts;             /* multiple of num_ranks, <= config.num_experts; the same on every rank */
  int max_tokens_per_rank;     /* T: 1..config.ll_max_tokens_per_rank, the same on every rank; sets the shapes */
  ep_dtype_t recv_dtype;       /* EP_FP8_E4M3 (cast in the kernel) or EP_BF16; the same on every rank */
  int round_scale;             /* FP8: round each scale up to a power of two */
  int use_ue8m0;               /* FP8: scales as packed UE8M0 bytes (needs round_scale and hidden % 512 == 0) */
  void* recv_x;                /* [OUT] [E_loc, R * T, hidden] e4m3 or bf16 device, 16-byte aligned */
  void* recv_x_scales;         /* [OUT] FP8 only. fp32 [E_loc, hidden / 128, R * T]: scale of group g of row i of
                                  expert e at (e * (hidden / 128) + g) * R * T + i, i.e. [E_loc, R * T, hidden / 128]
                                  column-major in the last two dims, as DeepEP returns it. With use_ue8m0: int32
                                  [E_loc, hidden / 512, R * T] likewise, 4 UE8M0 bytes per int (group 4j in the low
                                  byte), as DeepGEMM consumes them */
  int* recv_count;             /* [OUT] [E_loc] int32 device: valid rows per local expert (none from masked ranks:
                                  see "Rank mask") */
  int return_after_send;       /* 1: only issue the sends; ep_ll_dispatch_recv() completes the call */
  const float* topk_weights;   /* [IN] optional [num_tokens, num_topk] fp32 device: the router's weights. They travel
                                  with the tokens (4 bytes per (token, expert) pair), so that the handle's combine
                                  can weight and sum on the experts' ranks (ep_ll_combine_args_t.sum_on_expert_ranks);
                                  that combine needs them from every rank that has tokens */
  int64_t* wait_recv_cost_stats; /* [IN/OUT] optional [num_ranks] int64 device (DeepEP's
                                  dispatch_wait_recv_cost_stats): the receive phase adds to entry s the GPU clock
                                  cycles (clock64) it waited for source rank s's tokens. NULL: nothing is measured */
} ep_ll_dispatch_args_t;

#define EP_LL_DISPATCH_ARGS_INIT                                                                                      \
  {                                                                                                                   \
    (uint32_t)sizeof(ep_ll_dispatch_args_t), EP_LL_DISPATCH_ARGS_MAGIC, NULL, 0, 0, NULL, 0, 0, 0, EP_FP8_E4M3, 0, 0, \
        NULL, NULL, NULL, 0, NULL, NULL                                                                               \
  }

/* Send this rank's tokens to the experts they select and (unless return_after_send) receive the tokens routed
 * to this rank's experts, into recv_x / recv_x_scales / recv_count; the handle keeps the routing for the
 * combine. FP8 cast per 128 channels: scale = max(amax, 1e-4) / 448 (rounded up to a power of two with
 * round_scale), q = e4m3(x * (1 / scale)) with saturation. An expert index outside [-1, num_experts) is
 * treated as -1 and is a data fault (EP_STATUS_DEVICE_ERROR from ep_get_async_error or the next local call).
 * Ranks that pass different max_tokens_per_rank, hidden, num_experts or recv_dtype: every rank's receive phase
 * finds it before it writes a row (each source sends its shape with its count), and it is a fatal fault,
 * EP_STATUS_INVALID_ARGUMENT naming the source rank, the field and both values ("rank 3 dispatched with hidden
 * 4096, this rank (0) with 7168"); the group must then be destroyed.
 * Collective: yes. Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_ll_dispatch(ep_group_t group, ep_ll_handle_t handle, const ep_ll_dispatch_args_t* args,
                                  cudaStream_t stream);

/* The receive phase of a dispatch made with return_after_send = 1: waits (on the device) for every rank's
 * tokens and fills the outputs given to that dispatch.
 * Collective: yes. Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_ll_dispatch_recv(ep_group_t group, ep_ll_handle_t handle, cudaStream_t stream);

/* Device pointers to the handle's routing, valid after its dispatch's receive phase (stream-ordered):
 *   src_info     [OUT] [E_loc, R * T] int32: source token index of each received row
 *   layout_range [OUT] [E_loc, R] int64: (first row << 32) | rows, per (local expert, source rank)
 * Either may be NULL. Collective: no. Allocates: no. Graph-capturable: yes (host only). */
EP_API ep_status_t ep_ll_get_routing(ep_ll_handle_t handle, const int** src_info, const int64_t** layout_range);

/* The zero-copy combine buffer of the handle's half: bf16 [E_loc, R * T, hidden] (the shape of its dispatch),
 * in symmetric memory. Write the experts' outputs there, then call ep_ll_combine with zero_copy = 1. Valid from
 * the end of the handle's dispatch until its combine; the next-but-one dispatch reuses it.
 * Collective: no. Allocates: no. Graph-capturable: yes (host only). */
EP_API ep_status_t ep_ll_get_combine_buffer(ep_group_t group, ep_ll_handle_t handle, void** buffer);

#define EP_LL_COMBINE_ARGS_MAGIC 0x45504c43u /* "EPLC" */

typedef struct ep_ll_combine_args {
  uint32_t size;               /* sizeof(ep_ll_combine_args_t) */
  uint32_t magic;              /* EP_LL_COMBINE_ARGS_MAGIC */
  const void* x;               /* [IN] [E_loc, R * T, hidden] bf16 device, 16-byte aligned: the experts' outputs in
                                  the handle's dispatch layout (only the first recv_count[e] rows are read); NULL
                                  with zero_copy */
  const float* topk_weights;   /* [IN] [num_tokens, num_topk] fp32 device: this rank's weights (num_tokens and
                                  num_topk of the handle's dispatch); NULL with sum_on_expert_ranks */
  void* out;                   /* [OUT] [num_tokens, hidden] bf16 device, 16-byte aligned */
  int zero_copy;               /* 1: the outputs are already in ep_ll_get_combine_buffer(); x is ignored */
  int return_after_send;       /* 1: only issue the sends; ep_ll_combine_recv() completes the call */
  int sum_on_expert_ranks;     /* 1: each rank weights its experts' rows of a token with the weights given to the
                                  dispatch and sums them (fp32, rounded to bf16 once), and one row per (token, rank)
                                  goes back instead of one per (token, expert): fewer bytes when a token has several
                                  experts on a rank. out[t] = bf16(sum over the token's ranks, in the order of their
                                  first top-k slot, of that rank's bf16 sum). The same on every rank; needs 3 or
                                  more experts per rank in the group's config (EP_STATUS_INVALID_USAGE otherwise) */
  int64_t* wait_recv_cost_stats; /* [IN/OUT] optional [num_ranks] int64 device (DeepEP's
                                  combine_wait_recv_cost_stats): the receive phase adds to entry s the GPU clock
                                  cycles (clock64) it waited for rank s's rows. NULL: nothing is measured */
  int use_logfmt;                /* 1: the rows travel as LogFMT-10 (DeepEP's use_logfmt): per 128 channels the bf16
                                    largest and smallest magnitudes, and 10 bits per value (sign and a step on a log2
                                    grid between them, nearest in log2): hidden * 10 / 8 + hidden / 32 bytes a row
                                    instead of 2 * hidden; each value within 2^(step / 2) - 1 of its bf16 (a step is at
                                    most 32 / 510 octaves). out[t] then sums the decoded values as above. Needs hidden a
                                    multiple of 128; not with zero_copy or sum_on_expert_ranks */
  int renormalize_masked;        /* 1: with a rank mask (config.mask_failed_ranks), a token that lost top-k entries to
                                    masked ranks has its kept weights scaled by (sum of its valid entries' weights) /
                                    (sum of its kept entries' weights), so that they add up as all of them did (0 kept:
                                    zeros). 0 (DeepEP's semantics): the kept entries are summed as they are. Not with
                                    sum_on_expert_ranks (the weights are applied on the experts' ranks) */
} ep_ll_combine_args_t;

#define EP_LL_COMBINE_ARGS_INIT \
  { (uint32_t)sizeof(ep_ll_combine_args_t), EP_LL_COMBINE_ARGS_MAGIC, NULL, NULL, NULL, 0, 0, 0, NULL, 0, 0 }

/* Send each expert output row back to the rank its token came from and (unless return_after_send) sum each
 * token's rows there: out[t] = bf16(sum_k fmaf(w[t][k], y_k, acc)) in top-k order, skipping -1 entries. A token
 * with no expert gets zeros. With sum_on_expert_ranks, the rank of a token's experts first sums their rows:
 * s_d = bf16(sum over its distinct experts e, in the order of their first top-k slot, of fmaf(W_e, y_e, acc)),
 * W_e = the sum in slot order of the dispatch's weights of the token's slots with expert e; then
 * out[t] = bf16(sum of the s_d in the order of each rank's first slot), all from acc = 0 in fp32. Uses the routing of the handle's last dispatch, whose receive phase must have run.
 * Collective: yes. Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_ll_combine(ep_group_t group, ep_ll_handle_t handle, const ep_ll_combine_args_t* args,
                                 cudaStream_t stream);

/* The receive phase of a combine made with return_after_send = 1: waits for every rank's rows, writes `out`.
 * Collective: yes. Allocates: no. Graph-capturable: yes. */
EP_API ep_status_t ep_ll_combine_recv(ep_group_t group, ep_ll_handle_t handle, cudaStream_t stream);

/* Zero the LL buffer's signals and acknowledgements in both halves and restart its call counters, so that the
 * next LL call starts from a known state (DeepEP's clean_low_latency_buffer). Shapes up to the config's may change
 * between calls without it. No LL call may be in flight on any rank. A receive phase still pending (a send made with
 * return_after_send = 1 whose ep_ll_dispatch_recv / ep_ll_combine_recv never ran, e.g. a dropped hook) is
 * abandoned: its sends have landed by the clean's barrier, the signals it would wait for are zeroed, and its
 * handle no longer reports it pending (its receive call then returns EP_STATUS_INVALID_USAGE). Synchronises
 * `stream` and the device, then waits for every rank, before and after the zeroing, within the group's time
 * budget (a rank that never comes: EP_STATUS_TIMEOUT naming it; with config.mask_failed_ranks the rank is masked
 * instead and masked ranks are not waited for). After an unmask it is required (see "Rank mask").
 * Collective: yes. Allocates: no. Graph-capturable: no. */
EP_API ep_status_t ep_ll_clean(ep_group_t group, cudaStream_t stream);

/* Where an LL handle stands in the two-buffer turn-taking, so that a binding asks the library instead of keeping
 * its own copy of the rule. Set `size` with EP_LL_HANDLE_STATE_INIT (see ep_limits_t). */
typedef struct ep_ll_handle_state {
  uint32_t size;               /* [IN] sizeof(ep_ll_handle_state_t) */
  int half;                    /* [OUT] buffer half of the handle's last dispatch, 0 or 1; -1 before its first */
  uint64_t serial;             /* [OUT] which LL dispatch of the group last filled the handle (1, 2, ...); 0 before
                                  its first. Changes whenever a dispatch refills the handle */
  int is_current;              /* [OUT] 1: no later dispatch has taken its half and no ep_ll_clean came since, so
                                  its routing, its combine buffer and its combine are valid; 0 otherwise */
  int dispatch_recv_pending;   /* [OUT] 1: its dispatch was made with return_after_send = 1 and
                                  ep_ll_dispatch_recv() has not run yet */
  int combine_recv_pending;    /* [OUT] 1: likewise for its combine and ep_ll_combine_recv() */
} ep_ll_handle_state_t;

#define EP_LL_HANDLE_STATE_INIT { (uint32_t)sizeof(ep_ll_handle_state_t), 0, 0, 0, 0, 0 }

/* Fill `state` for `handle`. Reads host state only (no device work, no wait).
 * Collective: no. Allocates: no. Graph-capturable: yes (host only). */
EP_API ep_status_t ep_ll_handle_get_state(ep_ll_handle_t handle, ep_ll_handle_state_t* state);

#ifdef __cplusplus
}
#endif

#endif /* EP_H */
