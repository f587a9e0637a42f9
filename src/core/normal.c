/* normal.c: the normal (high-throughput) path's public calls: handles, prepare, dispatch, combine.
 * Everything here validates and fills a launch struct; the kernels are in src/kernels/intranode.cu (one NVLink
 * domain) and src/kernels/internode.cu (several nodes). */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

#define FAIL_ARG(g, ...) ep_fail((g), EP_STATUS_INVALID_ARGUMENT, __VA_ARGS__)

/* The handle's arrays, each starting on a 16-byte boundary so that kernels may move them four ints at a time. */
#define EP_HANDLE_ARRAYS 7
static void handle_array_sizes(ep_group_t g, size_t sizes[EP_HANDLE_ARRAYS]) {
  const size_t R = (size_t)g->num_ranks, T = (size_t)g->config.max_tokens_per_rank;
  const size_t E_loc = (size_t)(g->config.num_experts / g->num_ranks);
  const size_t s[EP_HANDLE_ARRAYS] = {T * R, R * R, R, R * T, R + 1, 1, E_loc};
  for (int i = 0; i < EP_HANDLE_ARRAYS; ++i) sizes[i] = (s[i] + 3) / 4 * 4;
}

/* Arrays appended after those when the group has several nodes (none for one node): recv_slot, send_slot,
 * node_tokens, node_count, fwd_count, fwd_row (see ep_internode_launch_t). */
#define EP_HANDLE_INTERNODE_ARRAYS 6
static int handle_internode_array_sizes(ep_group_t g, size_t sizes[EP_HANDLE_INTERNODE_ARRAYS]) {
  if (g->num_nodes <= 1) return 0;
  const size_t R = (size_t)g->num_ranks, T = (size_t)g->config.max_tokens_per_rank;
  const size_t N = (size_t)g->num_nodes, P = (size_t)g->ranks_per_node;
  const size_t s[EP_HANDLE_INTERNODE_ARRAYS] = {R * T, T * N, N * T, N, N, N * T * P};
  for (int i = 0; i < EP_HANDLE_INTERNODE_ARRAYS; ++i) sizes[i] = (s[i] + 3) / 4 * 4;
  return EP_HANDLE_INTERNODE_ARRAYS;
}

static size_t handle_bytes(ep_group_t g) {
  size_t sizes[EP_HANDLE_ARRAYS], ints = 0;
  handle_array_sizes(g, sizes);
  for (int i = 0; i < EP_HANDLE_ARRAYS; ++i) ints += sizes[i];
  size_t extra[EP_HANDLE_INTERNODE_ARRAYS];
  const int num_extra = handle_internode_array_sizes(g, extra);
  for (int i = 0; i < num_extra; ++i) ints += extra[i];
  return ints * sizeof(int);
}

ep_status_t ep_handle_memory_bytes(ep_group_t group, size_t* bytes) {
  EP_TRY(ep_enter(group, "ep_handle_memory_bytes"));
  if (!bytes) return FAIL_ARG(group, "ep_handle_memory_bytes: bytes is NULL");
  *bytes = handle_bytes(group);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_handle_create_in(ep_group_t group, void* memory, size_t bytes, ep_handle_t* handle) {
  const char* fn = "ep_handle_create_in";
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
  size_t sizes[EP_HANDLE_ARRAYS];
  handle_array_sizes(group, sizes);
  int* arrays[EP_HANDLE_ARRAYS];
  int* p = (int*)memory;
  for (int i = 0; i < EP_HANDLE_ARRAYS; ++i) {
    arrays[i] = p;
    p += sizes[i];
  }
  h->memory = memory;
  h->send_pos = arrays[0];
  h->matrix = arrays[1];
  h->num_tokens_of = arrays[2];
  h->recv_src = arrays[3];
  h->recv_offset = arrays[4];
  h->num_recv = arrays[5];
  h->expert_counts = arrays[6];
  size_t extra_sizes[EP_HANDLE_INTERNODE_ARRAYS];
  int* extra[EP_HANDLE_INTERNODE_ARRAYS] = {NULL, NULL, NULL, NULL, NULL, NULL};
  const int num_extra = handle_internode_array_sizes(group, extra_sizes);
  for (int i = 0; i < num_extra; ++i) {
    extra[i] = p;
    p += extra_sizes[i];
  }
  h->recv_slot = extra[0];
  h->send_slot = extra[1];
  h->node_tokens = extra[2];
  h->node_count = extra[3];
  h->fwd_count = extra[4];
  h->fwd_row = extra[5];
  h->group = group;
  h->num_recv_host = -1;
  *handle = h;
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_handle_create(ep_group_t group, ep_handle_t* handle) {
  const char* fn = "ep_handle_create";
  EP_TRY(ep_enter(group, fn));
  if (!handle) return FAIL_ARG(group, "%s: handle is NULL", fn);
  *handle = NULL;
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  void* memory = NULL;
  const size_t bytes = handle_bytes(group);
  cudaError_t ce = cudaMalloc(&memory, bytes);
  if (ce != cudaSuccess) return ep_fail_cuda(group, ce, "cudaMalloc of the handle");
  ep_status_t st = ep_handle_create_in(group, memory, bytes, handle);
  if (st != EP_STATUS_SUCCESS) {
    cudaFree(memory);
    return st;
  }
  (*handle)->owns_memory = true;
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_handle_destroy(ep_handle_t handle) {
  if (!handle) return EP_STATUS_SUCCESS;
  ep_group_t g = handle->group;
  cudaError_t ce = cudaSuccess;
  if (handle->owns_memory) {
    ce = cudaSetDevice(g->cuda_device);
    if (ce == cudaSuccess) ce = cudaDeviceSynchronize();
    cudaFree(handle->memory);
  }
  free(handle);
  if (ce != cudaSuccess) return ep_fail_cuda(g, ce, "ep_handle_destroy: synchronising the device");
  return EP_STATUS_SUCCESS;
}

/* Checks shared by the three calls: a live group the intranode path serves, and a handle of this group. */
static ep_status_t enter_normal(ep_group_t group, ep_handle_t handle, const char* fn, bool need_prepared) {
  EP_TRY(ep_enter(group, fn));
  if (!handle) return FAIL_ARG(group, "%s: handle is NULL", fn);
  if (handle->group != group) return FAIL_ARG(group, "%s: handle belongs to another group", fn);
  if (need_prepared && !handle->prepared)
    return ep_fail(group, EP_STATUS_INVALID_USAGE, "%s: handle has no routing yet; call ep_dispatch_prepare first",
                   fn);
  if (group->num_nodes > 1) {
    if (group->ranks_per_node > EP_MAX_NVLINK_RANKS || group->num_nodes > EP_MAX_INTERNODE_NODES)
      return ep_fail(group, EP_STATUS_UNSUPPORTED,
                     "%s: the group has %d nodes of %d ranks; the internode path serves up to %d nodes of up to %d",
                     fn, group->num_nodes, group->ranks_per_node, EP_MAX_INTERNODE_NODES, EP_MAX_NVLINK_RANKS);
    return EP_STATUS_SUCCESS;
  }
  if (group->num_ranks > EP_MAX_NVLINK_RANKS)
    return ep_fail(group, EP_STATUS_UNSUPPORTED, "%s: %d ranks in one NVLink domain; the intranode path serves up to %d",
                   fn, group->num_ranks, EP_MAX_NVLINK_RANKS);
  return EP_STATUS_SUCCESS;
}

/* The parts of the launch struct that come from the group and the handle. */
static ep_normal_launch_t base_launch(ep_group_t g, ep_handle_t h, int num_sms) {
  ep_normal_launch_t p;
  memset(&p, 0, sizeof(p));
  p.rank = g->rank;
  p.num_ranks = g->num_ranks;
  p.normal_base = (char*)g->workspace + g->normal_offset;
  p.peer_workspace = g->peer_bases_dev;
  p.normal_offset = g->normal_offset;
  p.region = g->normal_region;
  p.state = g->normal_state;
  p.expert_sum = g->expert_sum;
  p.timeout_ns = g->timeout_ns;
  p.error = g->error_word_dev;
  p.num_blocks = num_sms > 0 ? num_sms : g->num_sms;
  if (p.num_blocks > g->device_sms) p.num_blocks = g->device_sms; /* blocks wait on each other: all resident */
  p.send_pos = h->send_pos;
  p.matrix = h->matrix;
  p.num_tokens_of = h->num_tokens_of;
  p.recv_src = h->recv_src;
  p.recv_offset = h->recv_offset;
  p.num_recv = h->num_recv;
  p.expert_counts = h->expert_counts;
  p.num_tokens = h->num_tokens;
  p.num_topk = h->num_topk;
  p.num_experts = h->num_experts;
  return p;
}

/* num_nodes > 1: the intranode launch plus the internode region and handle arrays. `which`: 0 prepare,
 * 1 dispatch, 2 combine. The dispatch and combine grids come clamped to the usable SMs (base_launch): their blocks
 * wait on each other, so all must be resident at once (internode.cu). */
static cudaError_t launch_internode(ep_group_t g, ep_handle_t h, const ep_normal_launch_t* n, int which,
                                    cudaStream_t stream) {
  ep_internode_launch_t p;
  memset(&p, 0, sizeof(p));
  p.n = *n;
  p.ranks_per_node = g->ranks_per_node;
  p.num_nodes = g->num_nodes;
  p.node = g->node;
  p.local_rank = g->local_rank;
  p.inter_base = (char*)g->workspace + g->internode_offset;
  p.inter_offset = g->internode_offset;
  p.il = g->internode_region;
  p.recv_slot = h->recv_slot;
  p.send_slot = h->send_slot;
  p.node_tokens = h->node_tokens;
  p.node_count = h->node_count;
  p.fwd_count = h->fwd_count;
  p.fwd_row = h->fwd_row;
  p.force_put = g->internode_force_put;
  if (which == 0) return ep_launch_internode_prepare(&p, stream);
  if (which == 1) return ep_launch_internode_dispatch(&p, stream);
  return ep_launch_internode_combine(&p, stream);
}

ep_status_t ep_dispatch_prepare(ep_group_t group, ep_handle_t handle, const ep_dispatch_prepare_args_t* args,
                                cudaStream_t stream) {
  const char* fn = "ep_dispatch_prepare";
  EP_TRY(enter_normal(group, handle, fn, false));
  EP_TRY(ep_check_header(group, fn, "ep_dispatch_prepare_args_t", args, args ? args->size : 0,
                         sizeof(ep_dispatch_prepare_args_t), args ? args->magic : 0, EP_DISPATCH_PREPARE_ARGS_MAGIC));
  const ep_dispatch_prepare_args_t* a = args;
  const ep_group_config_t* c = &group->config;
  if (a->num_tokens < 0 || a->num_tokens > c->max_tokens_per_rank)
    return FAIL_ARG(group, "%s: num_tokens is %d; it must be in [0, config.max_tokens_per_rank=%d]", fn, a->num_tokens,
                    c->max_tokens_per_rank);
  EP_TRY(ep_check_topk_and_experts(group, fn, a->num_topk, a->num_experts));
  if (a->expert_alignment < 1 || a->expert_alignment > EP_MAX_EXPERT_ALIGNMENT)
    return FAIL_ARG(group, "%s: expert_alignment is %d; it must be in [1, %d]", fn, a->expert_alignment,
                    EP_MAX_EXPERT_ALIGNMENT);
  if (a->num_tokens > 0 && !a->topk_idx) return FAIL_ARG(group, "%s: topk_idx is NULL with num_tokens=%d", fn, a->num_tokens);
  if (a->num_recv_tokens_per_expert && !a->num_recv_tokens)
    return FAIL_ARG(group, "%s: num_recv_tokens_per_expert (host) needs num_recv_tokens (the eager form)", fn);
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));

  handle->num_tokens = a->num_tokens;
  handle->num_topk = a->num_topk;
  handle->num_experts = a->num_experts;
  handle->num_recv_host = -1;
  handle->recv_rows_limit = INT_MAX;
  ep_normal_launch_t p = base_launch(group, handle, 0);
  p.expert_alignment = a->expert_alignment;
  p.topk_idx = a->topk_idx;
  p.out_num_recv = a->num_recv_tokens_dev;
  p.out_expert_counts = a->num_recv_tokens_per_expert_dev;
  if (group->num_nodes > 1) EP_CUDA_TRY(group, launch_internode(group, handle, &p, 0, stream));
  else EP_CUDA_TRY(group, ep_launch_intranode_prepare(&p, stream));
  handle->prepared = true;
  if (!a->num_recv_tokens) return EP_STATUS_SUCCESS;

  /* Eager form: wait for the kernel (it has its own timeouts, so this wait ends), then read the counts. Only this
   * stream is waited on: a plain cudaMemcpy runs on the legacy default stream and so would also wait for the work
   * of every blocking stream, PyTorch's default stream among them, i.e. for the compute this call overlaps. */
  EP_CUDA_TRY(group, cudaStreamSynchronize(stream));
  EP_TRY(ep_enter(group, fn));
  EP_CUDA_TRY(group, cudaMemcpyAsync(a->num_recv_tokens, handle->num_recv, sizeof(int), cudaMemcpyDeviceToHost,
                                     stream));
  if (a->num_recv_tokens_per_expert)
    EP_CUDA_TRY(group, cudaMemcpyAsync(a->num_recv_tokens_per_expert, handle->expert_counts,
                                       sizeof(int) * (size_t)(a->num_experts / group->num_ranks),
                                       cudaMemcpyDeviceToHost, stream));
  EP_CUDA_TRY(group, cudaStreamSynchronize(stream));
  handle->num_recv_host = *a->num_recv_tokens;
  return EP_STATUS_SUCCESS;
}

static ep_status_t check_num_sms(ep_group_t group, const char* fn, int num_sms) {
  if (num_sms < 0 || num_sms > 1024)
    return FAIL_ARG(group, "%s: num_sms is %d; it must be in [0, 1024] (0 = config.num_sms)", fn, num_sms);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_dispatch(ep_group_t group, ep_handle_t handle, const ep_dispatch_args_t* args, cudaStream_t stream) {
  const char* fn = "ep_dispatch";
  EP_TRY(enter_normal(group, handle, fn, true));
  EP_TRY(ep_check_header(group, fn, "ep_dispatch_args_t", args, args ? args->size : 0, sizeof(ep_dispatch_args_t),
                         args ? args->magic : 0, EP_DISPATCH_ARGS_MAGIC));
  const ep_dispatch_args_t* a = args;
  const int n = handle->num_tokens;
  if (a->x_dtype != EP_BF16 && a->x_dtype != EP_FP8_E4M3)
    return FAIL_ARG(group, "%s: x_dtype is %d; it must be EP_BF16 (%d) or EP_FP8_E4M3 (%d)", fn, (int)a->x_dtype,
                    (int)EP_BF16, (int)EP_FP8_E4M3);
  const bool fp8 = a->x_dtype == EP_FP8_E4M3;
  if (a->hidden <= 0 || a->hidden > group->config.hidden || a->hidden % (fp8 ? 128 : 8) != 0)
    return FAIL_ARG(group, "%s: hidden is %d; it must be a positive multiple of %d, <= config.hidden=%d", fn,
                    a->hidden, fp8 ? 128 : 8, group->config.hidden);
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
  if (a->recv_topk_weights && n > 0 && !a->topk_weights)
    return FAIL_ARG(group, "%s: recv_topk_weights is set but topk_weights is NULL", fn);
  EP_TRY(check_num_sms(group, fn, a->num_sms));
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));

  ep_normal_launch_t p = base_launch(group, handle, a->num_sms);
  p.hidden = a->hidden;
  p.is_fp8 = fp8;
  p.x = a->x;
  p.x_scales = a->x_scales;
  p.topk_idx = a->topk_idx;
  p.topk_weights = a->topk_weights;
  p.recv_capacity = a->recv_capacity;
  handle->recv_rows_limit = a->recv_capacity;
  p.recv_x = a->recv_x;
  p.recv_scales = a->recv_x_scales;
  p.recv_topk_idx = a->recv_topk_idx;
  p.recv_topk_weights = a->recv_topk_weights;
  p.recv_src_idx = a->recv_src_idx;
  if (group->num_nodes > 1) EP_CUDA_TRY(group, launch_internode(group, handle, &p, 1, stream));
  else EP_CUDA_TRY(group, ep_launch_intranode_dispatch(&p, stream));
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_combine(ep_group_t group, ep_handle_t handle, const ep_combine_args_t* args, cudaStream_t stream) {
  const char* fn = "ep_combine";
  EP_TRY(enter_normal(group, handle, fn, true));
  EP_TRY(ep_check_header(group, fn, "ep_combine_args_t", args, args ? args->size : 0, sizeof(ep_combine_args_t),
                         args ? args->magic : 0, EP_COMBINE_ARGS_MAGIC));
  const ep_combine_args_t* a = args;
  if (a->hidden <= 0 || a->hidden > group->config.hidden || a->hidden % 8 != 0)
    return FAIL_ARG(group, "%s: hidden is %d; it must be a positive multiple of 8, <= config.hidden=%d", fn, a->hidden,
                    group->config.hidden);
  if (handle->num_recv_host != 0 && !a->x) return FAIL_ARG(group, "%s: x is NULL", fn);
  if (ep_misaligned16(a->x)) return FAIL_ARG(group, "%s: x (%p) is not 16-byte aligned", fn, a->x);
  if (handle->num_tokens > 0 && !a->combined_x) return FAIL_ARG(group, "%s: combined_x is NULL", fn);
  if (ep_misaligned16(a->combined_x)) return FAIL_ARG(group, "%s: combined_x (%p) is not 16-byte aligned", fn, a->combined_x);
  if (ep_misaligned16(a->bias0) || ep_misaligned16(a->bias1)) return FAIL_ARG(group, "%s: a bias is not 16-byte aligned", fn);
  if (a->combined_topk_weights && !a->topk_weights)
    return FAIL_ARG(group, "%s: combined_topk_weights is set but topk_weights is NULL", fn);
  EP_TRY(check_num_sms(group, fn, a->num_sms));
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));

  ep_normal_launch_t p = base_launch(group, handle, a->num_sms);
  p.hidden = a->hidden;
  p.y = a->x;
  p.y_weights = a->topk_weights;
  p.recv_capacity = handle->recv_rows_limit; /* after an overflowed dispatch, x has only this many rows */
  p.bias0 = a->bias0;
  p.bias1 = a->bias1;
  p.combined_x = a->combined_x;
  p.combined_weights = a->combined_topk_weights;
  if (group->num_nodes > 1) EP_CUDA_TRY(group, launch_internode(group, handle, &p, 2, stream));
  else EP_CUDA_TRY(group, ep_launch_intranode_combine(&p, stream));
  return EP_STATUS_SUCCESS;
}
