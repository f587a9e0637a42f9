/* normal.c: the normal (high-throughput) path's public calls: handles, prepare, dispatch, combine.
 * Everything here validates and fills a launch struct; the kernels are in src/kernels/intranode.cu (one NVLink
 * domain) and src/kernels/internode.cu (several nodes). */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

#define FAIL_ARG(g, ...) ep_fail((g), EP_STATUS_INVALID_ARGUMENT, __VA_ARGS__)

ep_status_t ep_normal_region_size_hint(int tokens_per_round, int hidden, int num_ranks, int ranks_per_node,
                                       int num_experts, int max_topk, size_t* bytes) {
  const char* fn = "ep_normal_region_size_hint";
  if (!bytes) return FAIL_ARG(NULL, "%s: bytes is NULL", fn);
  *bytes = 0;
  if (num_ranks < 1 || num_ranks > EP_MAX_RANKS)
    return FAIL_ARG(NULL, "%s: num_ranks is %d; it must be in [1, %d]", fn, num_ranks, EP_MAX_RANKS);
  if (ranks_per_node < 0 || (ranks_per_node > 0 && num_ranks % ranks_per_node != 0))
    return FAIL_ARG(NULL, "%s: ranks_per_node is %d; it must be 0 or divide num_ranks (%d)", fn, ranks_per_node,
                    num_ranks);
  const bool several_nodes = ranks_per_node > 0 && ranks_per_node < num_ranks;
  const int most = several_nodes ? EP_INTERNODE_MAX_TOKENS_PER_RANK : INT32_MAX / num_ranks;
  if (tokens_per_round < 1 || tokens_per_round > most)
    return FAIL_ARG(NULL, "%s: tokens_per_round is %d; it must be in [1, %d] for %d ranks%s", fn, tokens_per_round,
                    most, num_ranks, several_nodes ? " on several nodes" : "");
  EP_TRY(ep_check_hidden(NULL, fn, "hidden", hidden, EP_ROWS_FP8)); /* the regions hold FP8 rows too */
  if (num_experts <= 0 || num_experts % num_ranks != 0)
    return FAIL_ARG(NULL, "%s: num_experts is %d; it must be a positive multiple of num_ranks (%d)", fn, num_experts,
                    num_ranks);
  if (max_topk < 1 || max_topk > EP_MAX_TOPK)
    return FAIL_ARG(NULL, "%s: max_topk is %d; it must be in [1, %d]", fn, max_topk, EP_MAX_TOPK);
  *bytes = ep_normal_region(num_ranks, num_experts, tokens_per_round, hidden, max_topk).total_bytes;
  if (several_nodes)
    *bytes +=
        ep_internode_region(num_ranks, ranks_per_node, num_experts, tokens_per_round, hidden, max_topk).total_bytes;
  return EP_STATUS_SUCCESS;
}

static size_t handle_bytes(ep_group_t g) {
  return ep_normal_handle_carve(&g->normal_region, g->num_nodes, g->ranks_per_node, NULL, NULL);
}

ep_status_t ep_handle_memory_bytes(ep_group_t group, size_t* bytes) {
  EP_CALL_SCOPE();
  EP_TRY(ep_enter(group, "ep_handle_memory_bytes"));
  if (!bytes) return FAIL_ARG(group, "ep_handle_memory_bytes: bytes is NULL");
  *bytes = handle_bytes(group);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_handle_create_in(ep_group_t group, void* memory, size_t bytes, ep_handle_t* handle) {
  const char* fn = "ep_handle_create_in";
  EP_CALL_SCOPE();
  EP_TRY(ep_enter(group, fn));
  if (!handle) return FAIL_ARG(group, "%s: handle is NULL", fn);
  *handle = NULL;
  if (!memory) return FAIL_ARG(group, "%s: memory is NULL", fn);
  if ((uintptr_t)memory % 256 != 0) return FAIL_ARG(group, "%s: memory (%p) is not 256-byte aligned", fn, memory);
  if (bytes < handle_bytes(group))
    return FAIL_ARG(group, "%s: bytes is %zu; the handle needs %zu (ep_handle_memory_bytes)", fn, bytes,
                    handle_bytes(group));
  ep_handle_t h = (ep_handle_t)calloc(1, sizeof(*h));
  if (!h) return ep_fail(group, EP_STATUS_OUT_OF_MEMORY, "%s: host allocation failed", fn);
  h->memory.ptr = memory;
  ep_normal_handle_carve(&group->normal_region, group->num_nodes, group->ranks_per_node, memory, &h->arrays);
  h->group = group;
  h->num_recv_host = -1;
  h->num_rounds_host = -1;
  if (!ep_live_add(h, EP_OBJECT_HANDLE)) {
    free(h);
    return ep_fail(group, EP_STATUS_OUT_OF_MEMORY, "%s: host allocation failed", fn);
  }
  *handle = h;
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_handle_create(ep_group_t group, ep_handle_t* handle) {
  const char* fn = "ep_handle_create";
  EP_CALL_SCOPE();
  EP_TRY(ep_enter(group, fn));
  if (!handle) return FAIL_ARG(group, "%s: handle is NULL", fn);
  *handle = NULL;
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  ep_handle_memory_t memory = {NULL, NULL, false};
  const size_t bytes = handle_bytes(group);
  EP_TRY(ep_handle_memory_alloc(group, bytes, false, &memory));
  ep_status_t st = ep_handle_create_in(group, memory.ptr, bytes, handle);
  if (st != EP_STATUS_SUCCESS) {
    ep_handle_memory_free(group, &memory);
    return st;
  }
  (*handle)->memory = memory;
  (*handle)->owns_memory = true;
  return EP_STATUS_SUCCESS;
}

/* After a launch that uses the handle's arrays: the point its destroy waits for, where the library owns them. */
static cudaError_t handle_used(ep_handle_t handle, cudaStream_t stream) {
  return handle->owns_memory ? ep_handle_memory_used(&handle->memory, stream) : cudaSuccess;
}

ep_status_t ep_handle_memory_alloc(ep_group_t group, size_t bytes, bool zeroed, ep_handle_memory_t* memory) {
  memory->ptr = NULL;
  memory->last_use = NULL;
  memory->pooled = false;
  cudaError_t ce = cudaSuccess;
  if (!group->handle_stream) ce = cudaStreamCreateWithFlags(&group->handle_stream, cudaStreamNonBlocking);
  if (ce != cudaSuccess) return ep_fail_cuda(group, ce, "creating the group's handle stream");
  memory->pooled = true;
  ce = cudaMallocAsync(&memory->ptr, bytes, group->handle_stream);
  if (ce == cudaErrorNotSupported) { /* no memory pools on this device or under this MPS setup */
    (void)cudaGetLastError();
    memory->pooled = false;
    ce = cudaMalloc(&memory->ptr, bytes);
  }
  if (ce == cudaSuccess && zeroed) ce = cudaMemsetAsync(memory->ptr, 0, bytes, group->handle_stream);
  /* Usable on every stream from here: a create is not a hot call. */
  if (ce == cudaSuccess) ce = cudaStreamSynchronize(group->handle_stream);
  if (ce == cudaSuccess) ce = cudaEventCreateWithFlags(&memory->last_use, cudaEventDisableTiming);
  if (ce != cudaSuccess) {
    ep_handle_memory_free(group, memory);
    return ep_fail_cuda(group, ce, "allocating handle memory");
  }
  return EP_STATUS_SUCCESS;
}

cudaError_t ep_handle_memory_used(ep_handle_memory_t* memory, cudaStream_t stream) {
  if (!memory->last_use) return cudaSuccess;
  enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t ce = cudaStreamIsCapturing(stream, &capture);
  if (ce != cudaSuccess || capture != cudaStreamCaptureStatusNone) return ce;
  return cudaEventRecord(memory->last_use, stream);
}

cudaError_t ep_handle_memory_free(ep_group_t group, ep_handle_memory_t* memory) {
  cudaError_t ce = cudaSuccess;
  if (memory->ptr && memory->pooled && group && group->handle_stream) {
    ce = cudaSetDevice(group->cuda_device);
    /* An event never recorded is complete: the wait passes at once. */
    if (ce == cudaSuccess && memory->last_use) ce = cudaStreamWaitEvent(group->handle_stream, memory->last_use, 0);
    if (ce == cudaSuccess) ce = cudaFreeAsync(memory->ptr, group->handle_stream);
  } else if (memory->ptr) {
    ce = cudaFree(memory->ptr);
  }
  /* The wait was enqueued before the event goes: CUDA keeps what it needs of it. */
  if (memory->last_use) cudaEventDestroy(memory->last_use);
  memory->ptr = NULL;
  memory->last_use = NULL;
  return ce;
}

ep_status_t ep_handle_destroy(ep_handle_t handle) {
  const char* fn = "ep_handle_destroy";
  if (!handle) return EP_STATUS_SUCCESS;
  if (!ep_live_is(handle, EP_OBJECT_HANDLE))
    return ep_fail(NULL, EP_STATUS_INVALID_USAGE,
                   "%s: handle %p is not a live handle (destroyed already, or never "
                   "created)",
                   fn, (void*)handle);
  EP_CALL_SCOPE();
  ep_group_t g = handle->group; /* NULL once the group is destroyed: its destroy synchronised the device */
  if (g) EP_TRY(ep_take_group(g, fn));
  ep_live_remove(handle);
  const cudaError_t ce = handle->owns_memory ? ep_handle_memory_free(g, &handle->memory) : cudaSuccess;
  free(handle);
  if (ce != cudaSuccess) return ep_fail_cuda(g, ce, "ep_handle_destroy: freeing the handle's memory");
  return EP_STATUS_SUCCESS;
}

/* Checks shared by the three calls: a live group the normal path serves (not after an unmask: rank_mask.c), and a
 * handle of this group. */
static ep_status_t enter_normal(ep_group_t group, ep_handle_t handle, const char* fn, bool need_prepared) {
  EP_TRY(ep_enter_collective(group, fn));
  if (!handle) return FAIL_ARG(group, "%s: handle is NULL", fn);
  if (!ep_live_is(handle, EP_OBJECT_HANDLE))
    return ep_fail(group, EP_STATUS_INVALID_USAGE, "%s: handle %p is not a live handle (destroyed already?)", fn,
                   (void*)handle);
  if (handle->group != group) return FAIL_ARG(group, "%s: handle belongs to another group", fn);
  if (need_prepared && !handle->prepared)
    return ep_fail(group, EP_STATUS_INVALID_USAGE, "%s: handle has no routing yet; call ep_dispatch_prepare first",
                   fn);
  if (group->normal_unmasked)
    return ep_fail(group, EP_STATUS_UNSUPPORTED,
                   "%s: a rank was unmasked (ep_group_mask_rank / ep_group_clear_rank_mask) after normal-path calls; "
                   "the normal path cannot take a masked rank back (its call epochs with that rank fell out of step), "
                   "so it needs a new group",
                   fn);
  if (group->num_nodes > 1) {
    if (group->ranks_per_node > EP_MAX_NVLINK_RANKS || group->num_nodes > EP_MAX_INTERNODE_NODES)
      return ep_fail(group, EP_STATUS_UNSUPPORTED,
                     "%s: the group has %d nodes of %d ranks; the internode path serves up to %d nodes of up to %d",
                     fn, group->num_nodes, group->ranks_per_node, EP_MAX_INTERNODE_NODES, EP_MAX_NVLINK_RANKS);
    return EP_STATUS_SUCCESS;
  }
  if (group->num_ranks > EP_MAX_NVLINK_RANKS)
    return ep_fail(group, EP_STATUS_UNSUPPORTED,
                   "%s: %d ranks in one NVLink domain; the intranode path serves up to %d", fn, group->num_ranks,
                   EP_MAX_NVLINK_RANKS);
  return EP_STATUS_SUCCESS;
}

/* A call's arguments: zero but for the handle's routing shape and the grid, which is num_sms (0: the group's), at
 * most the SMs the group may occupy: the dispatch and combine blocks wait on each other, so all must be resident. */
static ep_normal_call_t base_call(ep_group_t g, ep_handle_t h, int num_sms) {
  ep_normal_call_t c;
  memset(&c, 0, sizeof(c));
  c.num_tokens = h->num_tokens;
  c.num_topk = h->num_topk;
  c.num_experts = h->num_experts;
  c.num_blocks = num_sms > 0 ? num_sms : g->num_sms;
  if (c.num_blocks > g->device_sms) c.num_blocks = g->device_sms;
  return c;
}

static ep_normal_group_view_t normal_group_view(ep_group_t g) {
  ep_normal_group_view_t v;
  memset(&v, 0, sizeof(v));
  v.rank = g->rank;
  v.num_ranks = g->num_ranks;
  v.normal_base = (char*)g->workspace + g->normal_offset;
  v.peer_workspace = g->peer_bases_dev;
  v.normal_offset = g->normal_offset;
  v.region = g->normal_region;
  v.state = g->normal_state;
  v.expert_sum = g->expert_sum;
  v.timeout_ns = g->timeout_ns;
  v.error = g->error_word_dev;
  v.mask = g->rank_mask;
  return v;
}

static ep_intranode_launch_t intranode_launch(ep_group_t g, ep_handle_t h, const ep_normal_call_t* call) {
  ep_intranode_launch_t p;
  memset(&p, 0, sizeof(p));
  p.group = normal_group_view(g);
  p.handle = h->arrays;
  p.call = *call;
  return p;
}

/* Whether work enqueued on `stream` now is captured into a graph (a failed query counts as captured). */
static bool capturing(cudaStream_t stream) {
  enum cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) == cudaSuccess) return status != cudaStreamCaptureStatusNone;
  (void)cudaGetLastError(); /* the launch that follows reports what is wrong with the stream */
  return true;
}

/* The launches of an internode dispatch or combine, one per round (internode.cu): the group's max_rounds, of which
 * those past the call's rounds return at once. After an eager prepare the host knows the call's rounds and launches
 * only those, unless the stream is being captured (a graph must hold every round a later prepare may take) or a
 * prepare of this handle ever was (a replay re-prepares it without the host knowing). */
static int internode_rounds(ep_group_t g, ep_handle_t h, cudaStream_t stream) {
  if (h->num_rounds_host <= 0 || h->prepare_captured || capturing(stream)) return g->normal_region.max_rounds;
  return h->num_rounds_host;
}

static ep_internode_launch_t internode_launch(ep_group_t g, ep_handle_t h, const ep_normal_call_t* call) {
  ep_internode_launch_t p;
  memset(&p, 0, sizeof(p));
  p.group = normal_group_view(g);
  p.handle = h->arrays;
  p.call = *call;
  ep_internode_group_view_t* v = &p.inter;
  v->ranks_per_node = g->ranks_per_node;
  v->num_nodes = g->num_nodes;
  v->node = g->node;
  v->local_rank = g->local_rank;
  v->inter_base = (char*)g->workspace + g->internode_offset;
  v->inter_offset = g->internode_offset;
  v->region = g->internode_region;
  v->force_put = g->internode_force_put;
  return p;
}

ep_status_t ep_dispatch_prepare(ep_group_t group, ep_handle_t handle, const ep_dispatch_prepare_args_t* args,
                                cudaStream_t stream) {
  const char* fn = "ep_dispatch_prepare";
  EP_CALL_SCOPE();
  EP_TRY(enter_normal(group, handle, fn, false));
  EP_TRY(ep_check_header(group, fn, "ep_dispatch_prepare_args_t", args, args ? args->size : 0,
                         sizeof(ep_dispatch_prepare_args_t), args ? args->magic : 0, EP_DISPATCH_PREPARE_ARGS_MAGIC));
  const ep_dispatch_prepare_args_t* a = args;
  const ep_group_config_t* c = &group->config;
  if (a->num_tokens < 0 || a->num_tokens > c->max_tokens_per_rank)
    return FAIL_ARG(group, "%s: num_tokens is %d; it must be in [0, config.max_tokens_per_rank=%d]", fn, a->num_tokens,
                    c->max_tokens_per_rank);
  /* num_topk 0 with no topk_idx selects the rank-mask form; the expert rule is the same for both forms. */
  const bool mask_form = !a->topk_idx && a->num_topk == 0;
  EP_TRY(ep_check_topk_and_experts(group, fn, mask_form ? 1 : a->num_topk, a->num_experts));
  if (a->expert_alignment < 1 || a->expert_alignment > EP_MAX_EXPERT_ALIGNMENT)
    return FAIL_ARG(group, "%s: expert_alignment is %d; it must be in [1, %d]", fn, a->expert_alignment,
                    EP_MAX_EXPERT_ALIGNMENT);
  if (mask_form && a->num_tokens > 0 && !a->is_token_in_rank)
    return FAIL_ARG(group, "%s: topk_idx and is_token_in_rank are NULL with num_tokens=%d", fn, a->num_tokens);
  if (!mask_form && a->num_tokens > 0 && !a->topk_idx)
    return FAIL_ARG(group, "%s: topk_idx is NULL with num_tokens=%d (num_topk=%d; 0 selects is_token_in_rank)", fn,
                    a->num_tokens, a->num_topk);
  if (!mask_form && (a->is_token_in_rank || a->num_tokens_per_expert))
    return FAIL_ARG(group,
                    "%s: is_token_in_rank / num_tokens_per_expert are set with topk_idx; give one routing "
                    "(topk_idx, or is_token_in_rank with num_topk=0)",
                    fn);
  if (a->num_recv_tokens_per_expert && !a->num_recv_tokens)
    return FAIL_ARG(group, "%s: num_recv_tokens_per_expert (host) needs num_recv_tokens (the eager form)", fn);
  EP_CHECK_ALIGNED(group, fn, {"topk_idx", a->topk_idx, 8}, {"num_recv_tokens_dev", a->num_recv_tokens_dev, 4},
                   {"num_recv_tokens_per_expert_dev", a->num_recv_tokens_per_expert_dev, 4},
                   {"num_tokens_per_expert", a->num_tokens_per_expert, 4});
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));

  handle->num_tokens = a->num_tokens;
  handle->num_topk = a->num_topk;
  handle->num_experts = a->num_experts;
  handle->num_recv_host = -1;
  handle->num_rounds_host = -1;
  handle->recv_rows_limit = INT_MAX;
  ep_normal_call_t call = base_call(group, handle, 0);
  call.expert_alignment = a->expert_alignment;
  call.topk_idx = a->topk_idx;
  call.is_token_in_rank = mask_form ? a->is_token_in_rank : NULL;
  call.num_tokens_per_expert = mask_form ? a->num_tokens_per_expert : NULL;
  call.out_num_recv = a->num_recv_tokens_dev;
  call.out_expert_counts = a->num_recv_tokens_per_expert_dev;
  const bool in_rounds = group->num_nodes > 1 && group->normal_region.max_rounds > 1;
  if (in_rounds && !handle->prepare_captured) handle->prepare_captured = capturing(stream);
  if (group->num_nodes > 1) {
    ep_internode_launch_t p = internode_launch(group, handle, &call);
    for (p.round = 0; p.round < group->normal_region.max_rounds; ++p.round)
      EP_CUDA_TRY(group, ep_launch_internode_prepare(&p, stream));
  } else {
    const ep_intranode_launch_t p = intranode_launch(group, handle, &call);
    EP_CUDA_TRY(group, ep_launch_intranode_prepare(&p, stream));
  }
  group->normal_used = true;
  EP_CUDA_TRY(group, handle_used(handle, stream));
  handle->prepared = true;
  if (!a->num_recv_tokens) return EP_STATUS_SUCCESS;

  /* Eager form: wait for the kernel (it has its own timeouts, so this wait ends), then read the counts. Only this
   * stream is waited on: a plain cudaMemcpy runs on the legacy default stream and so would also wait for the work
   * of every blocking stream, PyTorch's default stream among them, i.e. for the compute this call overlaps. */
  EP_CUDA_TRY(group, cudaStreamSynchronize(stream));
  EP_TRY(ep_enter(group, fn));
  EP_CUDA_TRY(
      group, cudaMemcpyAsync(a->num_recv_tokens, handle->arrays.num_recv, sizeof(int), cudaMemcpyDeviceToHost, stream));
  if (a->num_recv_tokens_per_expert)
    EP_CUDA_TRY(group, cudaMemcpyAsync(a->num_recv_tokens_per_expert, handle->arrays.expert_counts,
                                       sizeof(int) * (size_t)(a->num_experts / group->num_ranks),
                                       cudaMemcpyDeviceToHost, stream));
  int rounds = -1; /* the call's rounds, for the dispatch and combine launches (internode_rounds) */
  if (in_rounds && !handle->prepare_captured)
    EP_CUDA_TRY(group,
                cudaMemcpyAsync(&rounds, handle->arrays.num_rounds, sizeof(int), cudaMemcpyDeviceToHost, stream));
  EP_CUDA_TRY(group, cudaStreamSynchronize(stream));
  handle->num_recv_host = *a->num_recv_tokens;
  handle->num_rounds_host = rounds;
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_handle_get_rank_prefix(ep_handle_t handle, int32_t* rank_prefix_matrix, int32_t* recv_rank_prefix_sum,
                                      cudaStream_t stream) {
  const char* fn = "ep_handle_get_rank_prefix";
  if (!handle) return FAIL_ARG(NULL, "%s: handle is NULL", fn);
  if (!ep_live_is(handle, EP_OBJECT_HANDLE))
    return ep_fail(NULL, EP_STATUS_INVALID_USAGE, "%s: handle %p is not a live handle", fn, (void*)handle);
  ep_group_t group = handle->group;
  if (!group) return ep_fail(NULL, EP_STATUS_INVALID_USAGE, "%s: the handle's group is destroyed", fn);
  EP_CALL_SCOPE();
  EP_TRY(ep_enter(group, fn));
  if (!handle->prepared)
    return ep_fail(group, EP_STATUS_INVALID_USAGE, "%s: handle has no routing yet; call ep_dispatch_prepare first",
                   fn);
  if (rank_prefix_matrix && group->num_nodes > 1)
    return ep_fail(group, EP_STATUS_UNSUPPORTED,
                   "%s: rank_prefix_matrix is for one-node groups; this one has %d nodes, whose ranks learn the "
                   "counts to their own node only (recv_rank_prefix_sum is available)",
                   fn, group->num_nodes);
  EP_CHECK_ALIGNED(group, fn, {"rank_prefix_matrix", rank_prefix_matrix, 4},
                   {"recv_rank_prefix_sum", recv_rank_prefix_sum, 4});
  if (!rank_prefix_matrix && !recv_rank_prefix_sum) return EP_STATUS_SUCCESS;
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  EP_CUDA_TRY(group, ep_launch_handle_rank_prefix(&handle->arrays, group->num_ranks, rank_prefix_matrix,
                                                  recv_rank_prefix_sum, stream));
  EP_CUDA_TRY(group, handle_used(handle, stream));
  return EP_STATUS_SUCCESS;
}

static ep_status_t check_num_sms(ep_group_t group, const char* fn, int num_sms) {
  if (num_sms < 0 || num_sms > EP_MAX_SMS)
    return FAIL_ARG(group, "%s: num_sms is %d; it must be in [0, %d] (0 = config.num_sms)", fn, num_sms, EP_MAX_SMS);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_dispatch(ep_group_t group, ep_handle_t handle, const ep_dispatch_args_t* args, cudaStream_t stream) {
  const char* fn = "ep_dispatch";
  EP_CALL_SCOPE();
  EP_TRY(enter_normal(group, handle, fn, true));
  EP_TRY(ep_check_header(group, fn, "ep_dispatch_args_t", args, args ? args->size : 0, sizeof(ep_dispatch_args_t),
                         args ? args->magic : 0, EP_DISPATCH_ARGS_MAGIC));
  const ep_dispatch_args_t* a = args;
  const int n = handle->num_tokens;
  if (a->x_dtype != EP_BF16 && a->x_dtype != EP_FP8_E4M3)
    return FAIL_ARG(group, "%s: x_dtype is %d; it must be EP_BF16 (%d) or EP_FP8_E4M3 (%d)", fn, (int)a->x_dtype,
                    (int)EP_BF16, (int)EP_FP8_E4M3);
  const bool fp8 = a->x_dtype == EP_FP8_E4M3;
  EP_TRY(ep_check_hidden(group, fn, "hidden", a->hidden, fp8 ? EP_ROWS_FP8 : EP_ROWS_BF16));
  if (n > 0 && !a->x) return FAIL_ARG(group, "%s: x is NULL with %d tokens", fn, n);
  if (ep_misaligned16(a->x)) return FAIL_ARG(group, "%s: x (%p) is not 16-byte aligned", fn, a->x);
  if (fp8 && n > 0 && !a->x_scales) return FAIL_ARG(group, "%s: x_scales is NULL with x_dtype EP_FP8_E4M3", fn);
  if (a->recv_capacity < 0) return FAIL_ARG(group, "%s: recv_capacity is %d; it must be >= 0", fn, a->recv_capacity);
  if (handle->num_recv_host >= 0 && a->recv_capacity < handle->num_recv_host)
    return FAIL_ARG(group, "%s: recv_capacity is %d but this rank receives %d rows", fn, a->recv_capacity,
                    handle->num_recv_host);
  if (a->recv_capacity > 0 && !a->recv_x) return FAIL_ARG(group, "%s: recv_x is NULL", fn);
  if (ep_misaligned16(a->recv_x)) return FAIL_ARG(group, "%s: recv_x (%p) is not 16-byte aligned", fn, a->recv_x);
  if (fp8 && a->recv_capacity > 0 && !a->recv_x_scales)
    return FAIL_ARG(group, "%s: recv_x_scales is NULL with x_dtype EP_FP8_E4M3", fn);
  if ((a->recv_topk_idx || a->recv_topk_weights) && n > 0 && !a->topk_idx)
    return FAIL_ARG(group, "%s: recv_topk_idx or recv_topk_weights is set but topk_idx is NULL", fn);
  EP_CHECK_ALIGNED(group, fn, {"x_scales", a->x_scales, 4}, {"topk_idx", a->topk_idx, 8},
                   {"topk_weights", a->topk_weights, 4}, {"recv_x_scales", a->recv_x_scales, 4},
                   {"recv_topk_idx", a->recv_topk_idx, 8}, {"recv_topk_weights", a->recv_topk_weights, 4},
                   {"recv_src_idx", a->recv_src_idx, 4});
  if (a->recv_topk_weights && n > 0 && !a->topk_weights)
    return FAIL_ARG(group, "%s: recv_topk_weights is set but topk_weights is NULL", fn);
  EP_TRY(check_num_sms(group, fn, a->num_sms));
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));

  ep_normal_call_t call = base_call(group, handle, a->num_sms);
  call.hidden = a->hidden;
  call.is_fp8 = fp8;
  call.x = a->x;
  call.x_scales = a->x_scales;
  call.topk_idx = a->topk_idx;
  call.topk_weights = a->topk_weights;
  call.recv_capacity = a->recv_capacity;
  handle->recv_rows_limit = a->recv_capacity;
  call.recv_x = a->recv_x;
  call.recv_scales = a->recv_x_scales;
  call.recv_topk_idx = a->recv_topk_idx;
  call.recv_topk_weights = a->recv_topk_weights;
  call.recv_src_idx = a->recv_src_idx;
  if (group->num_nodes > 1) {
    ep_internode_launch_t p = internode_launch(group, handle, &call);
    const int rounds = internode_rounds(group, handle, stream);
    for (p.round = 0; p.round < rounds; ++p.round) EP_CUDA_TRY(group, ep_launch_internode_dispatch(&p, stream));
  } else {
    const ep_intranode_launch_t p = intranode_launch(group, handle, &call);
    EP_CUDA_TRY(group, ep_launch_intranode_dispatch(&p, stream));
  }
  EP_CUDA_TRY(group, handle_used(handle, stream));
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_combine(ep_group_t group, ep_handle_t handle, const ep_combine_args_t* args, cudaStream_t stream) {
  const char* fn = "ep_combine";
  EP_CALL_SCOPE();
  EP_TRY(enter_normal(group, handle, fn, true));
  EP_TRY(ep_check_header(group, fn, "ep_combine_args_t", args, args ? args->size : 0, sizeof(ep_combine_args_t),
                         args ? args->magic : 0, EP_COMBINE_ARGS_MAGIC));
  const ep_combine_args_t* a = args;
  EP_TRY(ep_check_hidden(group, fn, "hidden", a->hidden, EP_ROWS_BF16));
  if (handle->num_recv_host != 0 && !a->x) return FAIL_ARG(group, "%s: x is NULL", fn);
  if (ep_misaligned16(a->x)) return FAIL_ARG(group, "%s: x (%p) is not 16-byte aligned", fn, a->x);
  if (handle->num_tokens > 0 && !a->combined_x) return FAIL_ARG(group, "%s: combined_x is NULL", fn);
  if (ep_misaligned16(a->combined_x))
    return FAIL_ARG(group, "%s: combined_x (%p) is not 16-byte aligned", fn, a->combined_x);
  if (ep_misaligned16(a->bias0) || ep_misaligned16(a->bias1))
    return FAIL_ARG(group, "%s: a bias is not 16-byte aligned", fn);
  if (a->combined_topk_weights && !a->topk_weights)
    return FAIL_ARG(group, "%s: combined_topk_weights is set but topk_weights is NULL", fn);
  EP_CHECK_ALIGNED(group, fn, {"topk_weights", a->topk_weights, 4},
                   {"combined_topk_weights", a->combined_topk_weights, 4});
  EP_TRY(check_num_sms(group, fn, a->num_sms));
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));

  ep_normal_call_t call = base_call(group, handle, a->num_sms);
  call.hidden = a->hidden;
  call.y = a->x;
  call.y_weights = a->topk_weights;
  call.recv_capacity = handle->recv_rows_limit; /* after an overflowed dispatch, x has only this many rows */
  call.bias0 = a->bias0;
  call.bias1 = a->bias1;
  call.combined_x = a->combined_x;
  call.combined_weights = a->combined_topk_weights;
  if (group->num_nodes > 1) {
    ep_internode_launch_t p = internode_launch(group, handle, &call);
    const int rounds = internode_rounds(group, handle, stream);
    for (p.round = 0; p.round < rounds; ++p.round) EP_CUDA_TRY(group, ep_launch_internode_combine(&p, stream));
  } else {
    const ep_intranode_launch_t p = intranode_launch(group, handle, &call);
    EP_CUDA_TRY(group, ep_launch_intranode_combine(&p, stream));
  }
  EP_CUDA_TRY(group, handle_used(handle, stream));
  return EP_STATUS_SUCCESS;
}
