/* low_latency.c: the low-latency path's public calls: size hint, handles, dispatch, combine (each with its
 * receive hook), the zero-copy buffer and the clean. Everything here validates and fills a launch struct; the
 * kernels are in src/kernels/low_latency.cu (phases: ll_dispatch.cuh, ll_combine.cuh) and the LL region in
 * src/kernels/ll_region.h. */
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "transport/transport.h"

#define FAIL_ARG(g, ...) ep_fail((g), EP_STATUS_INVALID_ARGUMENT, __VA_ARGS__)

/* A message pair packs its slot j < max_tokens_per_rank in EP_LL_PAIR_SLOT_BITS bits. */
_Static_assert(EP_LL_MAX_TOKENS_PER_RANK <= 1 << EP_LL_PAIR_SLOT_BITS, "LL slots must fit a message pair");

ep_status_t ep_ll_buffer_size_hint(int max_tokens_per_rank, int hidden, int num_ranks, int num_experts, int max_topk,
                                   size_t* bytes) {
  const char* fn = "ep_ll_buffer_size_hint";
  if (!bytes) return FAIL_ARG(NULL, "%s: bytes is NULL", fn);
  *bytes = 0;
  if (max_tokens_per_rank < 1 || max_tokens_per_rank > EP_LL_MAX_TOKENS_PER_RANK)
    return FAIL_ARG(NULL, "%s: max_tokens_per_rank is %d; it must be in [1, %d]", fn, max_tokens_per_rank,
                    EP_LL_MAX_TOKENS_PER_RANK);
  EP_TRY(ep_check_hidden(NULL, fn, "hidden", hidden, EP_ROWS_FP8));
  if (num_ranks < 1 || num_ranks > EP_MAX_RANKS)
    return FAIL_ARG(NULL, "%s: num_ranks is %d; it must be in [1, %d]", fn, num_ranks, EP_MAX_RANKS);
  if (num_experts <= 0 || num_experts % num_ranks != 0)
    return FAIL_ARG(NULL, "%s: num_experts is %d; it must be a positive multiple of num_ranks (%d)", fn, num_experts,
                    num_ranks);
  if (max_topk < 1 || max_topk > EP_MAX_TOPK)
    return FAIL_ARG(NULL, "%s: max_topk is %d; it must be in [1, %d]", fn, max_topk, EP_MAX_TOPK);
  *bytes = ep_ll_region(num_ranks, num_experts, max_tokens_per_rank, hidden, max_topk).total_bytes;
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_check_config(const ep_group_config_t* c, int num_ranks, const char* fn) {
  if (c->ll_region_bytes == 0) return EP_STATUS_SUCCESS;
  if (c->ll_max_tokens_per_rank == 0)
    return FAIL_ARG(NULL,
                    "%s: config.ll_region_bytes is %zu but config.ll_max_tokens_per_rank is 0; set it to the largest "
                    "max_tokens_per_rank of any ep_ll_dispatch",
                    fn, c->ll_region_bytes);
  const size_t least = ep_ll_region(num_ranks, num_ranks, 1, 128, 1).total_bytes;
  if (c->ll_region_bytes < least)
    return FAIL_ARG(NULL,
                    "%s: config.ll_region_bytes is %zu; it must be at least %zu (one token of hidden 128, one expert "
                    "per rank, top-1, at %d ranks)",
                    fn, c->ll_region_bytes, least, num_ranks);
  return EP_STATUS_SUCCESS;
}

ep_ll_region_t ep_ll_group_region(const ep_group_config_t* c, int num_ranks) {
  const size_t bytes = c->ll_region_bytes;
  const int T = c->ll_max_tokens_per_rank, H = c->hidden, K = c->max_topk;
  if (bytes == 0) return ep_ll_region(num_ranks, c->num_experts, T, H, K);
  /* The handles hold routing for the experts that fit at the hidden hint, and at least num_experts. */
  size_t experts = ep_ll_budget_experts(bytes, num_ranks, T, H, K, EP_LL_MAX_EXPERTS);
  if (experts < (size_t)c->num_experts) experts = (size_t)c->num_experts;
  ep_ll_region_t l = ep_ll_region(num_ranks, (int)experts, T, H, K);
  l.half_bytes = ep_ll_budget_half(bytes);
  l.total_bytes = 2 * l.half_bytes;
  /* ep_ll_clean zeroes the count, signal and acknowledgement words only: they are at the same offsets in every
   * call's layout, and a call's dispatch_meta rows are all written before its counts. */
  l.signal_bytes = l.dispatch_meta;
  return l;
}

/* Every LL call on a group: live, and configured with an LL buffer. */
static ep_status_t enter_ll(ep_group_t group, const char* fn, bool collective) {
  EP_TRY(collective ? ep_enter_collective(group, fn) : ep_enter(group, fn));
  if (group->config.ll_max_tokens_per_rank <= 0)
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: the group has no low-latency buffer (config.ll_max_tokens_per_rank is 0); create it with "
                   "config.ll_max_tokens_per_rank > 0",
                   fn);
  return EP_STATUS_SUCCESS;
}

/* An ep_ll_clean since the handle's last call abandoned its pending receive phases. */
static void forget_cleaned_phases(ep_ll_handle_t handle) {
  if (handle->cleans == handle->group->ll_cleans) return;
  handle->dispatch_recv_pending = handle->combine_recv_pending = false;
  handle->cleans = handle->group->ll_cleans;
}

static ep_status_t check_handle(ep_group_t group, ep_ll_handle_t handle, const char* fn) {
  if (!handle) return FAIL_ARG(group, "%s: handle is NULL", fn);
  if (!ep_live_is(handle, EP_OBJECT_LL_HANDLE))
    return ep_fail(group, EP_STATUS_INVALID_USAGE, "%s: handle %p is not a live LL handle (destroyed already?)", fn,
                   (void*)handle);
  if (handle->group != group) return FAIL_ARG(group, "%s: handle belongs to another group", fn);
  forget_cleaned_phases(handle);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_handle_create(ep_group_t group, ep_ll_handle_t* handle) {
  const char* fn = "ep_ll_handle_create";
  EP_CALL_SCOPE();
  if (handle) *handle = NULL;
  EP_TRY(enter_ll(group, fn, false));
  if (!handle) return FAIL_ARG(group, "%s: handle is NULL", fn);
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  ep_ll_handle_t h = (ep_ll_handle_t)calloc(1, sizeof(*h));
  if (!h) return ep_fail(group, EP_STATUS_OUT_OF_MEMORY, "%s: host allocation failed", fn);
  const size_t bytes = ep_ll_handle_carve(&group->ll_region, NULL, NULL);
  const ep_status_t st = ep_handle_memory_alloc(group, bytes, true, &h->memory);
  if (st != EP_STATUS_SUCCESS) {
    free(h);
    return st;
  }
  ep_ll_handle_carve(&group->ll_region, h->memory.ptr, &h->arrays);
  h->group = group;
  h->cleans = group->ll_cleans;
  if (!ep_live_add(h, EP_OBJECT_LL_HANDLE)) {
    ep_handle_memory_free(group, &h->memory);
    free(h);
    return ep_fail(group, EP_STATUS_OUT_OF_MEMORY, "%s: host allocation failed", fn);
  }
  *handle = h;
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_handle_destroy(ep_ll_handle_t handle) {
  const char* fn = "ep_ll_handle_destroy";
  if (!handle) return EP_STATUS_SUCCESS;
  if (!ep_live_is(handle, EP_OBJECT_LL_HANDLE))
    return ep_fail(NULL, EP_STATUS_INVALID_USAGE,
                   "%s: handle %p is not a live LL handle (destroyed already, or never created)", fn, (void*)handle);
  EP_CALL_SCOPE();
  ep_group_t g = handle->group; /* NULL once the group is destroyed: its destroy synchronised the device */
  if (g) EP_TRY(ep_take_group(g, fn));
  ep_live_remove(handle);
  const cudaError_t ce = ep_handle_memory_free(g, &handle->memory);
  free(handle);
  if (ce != cudaSuccess) return ep_fail_cuda(g, ce, "ep_ll_handle_destroy: freeing the handle's memory");
  return EP_STATUS_SUCCESS;
}

/* A launch: the group's view, the handle's arrays and half, and the handle's call. */
static ep_ll_launch_t base_launch(ep_group_t g, ep_ll_handle_t h) {
  ep_ll_launch_t p;
  memset(&p, 0, sizeof(p));
  ep_ll_group_view_t* v = &p.group;
  v->rank = g->rank;
  v->num_ranks = g->num_ranks;
  v->ranks_per_node = g->ranks_per_node;
  v->node_first_rank = g->rank - g->rank % g->ranks_per_node;
  v->ll_base = (char*)g->workspace + g->ll_offset;
  v->peer_workspace = g->peer_bases_dev;
  v->ll_offset = g->ll_offset;
  v->region = h->region;
  v->state = g->ll_state;
  v->timeout_ns = g->timeout_ns;
  v->error = g->error_word_dev;
  v->num_sms = g->device_sms > 0 ? g->device_sms : 1;
  v->mask = g->rank_mask;
  p.handle = h->arrays;
  p.half = h->half;
  p.call = h->call;
  return p;
}

/* A message pair packs an expert index with a token slot in an int (ll_region.h). */
_Static_assert(EP_LL_MAX_EXPERTS <= 1 << (31 - EP_LL_PAIR_SLOT_BITS), "an expert index fits a message pair");

static ep_status_t check_dispatch_args(ep_group_t group, const ep_ll_dispatch_args_t* a, const char* fn) {
  const ep_group_config_t* c = &group->config;
  if (a->max_tokens_per_rank < 1 || a->max_tokens_per_rank > c->ll_max_tokens_per_rank)
    return FAIL_ARG(group, "%s: max_tokens_per_rank is %d; it must be in [1, config.ll_max_tokens_per_rank=%d]", fn,
                    a->max_tokens_per_rank, c->ll_max_tokens_per_rank);
  if (a->num_tokens < 0 || a->num_tokens > a->max_tokens_per_rank)
    return FAIL_ARG(group, "%s: num_tokens is %d; it must be in [0, max_tokens_per_rank=%d]", fn, a->num_tokens,
                    a->max_tokens_per_rank);
  const size_t budget = c->ll_region_bytes;
  if (!budget) {
    EP_TRY(ep_check_topk_and_experts(group, fn, a->num_topk, a->num_experts));
  } else { /* the bytes bound the shape (below); num_experts only by what the handles hold */
    if (a->num_topk < 1 || a->num_topk > c->max_topk)
      return FAIL_ARG(group, "%s: num_topk is %d; it must be in [1, config.max_topk=%d]", fn, a->num_topk, c->max_topk);
    if (a->num_experts <= 0 || a->num_experts % group->num_ranks != 0 || a->num_experts > group->ll_region.num_experts)
      return FAIL_ARG(group,
                      "%s: num_experts is %d; it must be a positive multiple of num_ranks (%d) and at most %d (the "
                      "experts config.ll_region_bytes=%zu holds at config.hidden=%d, or config.num_experts)",
                      fn, a->num_experts, group->num_ranks, group->ll_region.num_experts, budget, c->hidden);
  }
  if (a->num_experts >= EP_LL_MAX_EXPERTS)
    return FAIL_ARG(group, "%s: num_experts is %d; the low-latency path takes fewer than %d", fn, a->num_experts,
                    EP_LL_MAX_EXPERTS);
  if (a->recv_dtype != EP_FP8_E4M3 && a->recv_dtype != EP_BF16)
    return FAIL_ARG(group, "%s: recv_dtype is %d; it must be EP_FP8_E4M3 (%d) or EP_BF16 (%d)", fn,
                    (int)a->recv_dtype, (int)EP_FP8_E4M3, (int)EP_BF16);
  const bool fp8 = a->recv_dtype == EP_FP8_E4M3;
  if (a->round_scale != 0 && a->round_scale != 1)
    return FAIL_ARG(group, "%s: round_scale is %d; it must be 0 or 1", fn, a->round_scale);
  if (a->use_ue8m0 != 0 && a->use_ue8m0 != 1)
    return FAIL_ARG(group, "%s: use_ue8m0 is %d; it must be 0 or 1", fn, a->use_ue8m0);
  if (a->use_ue8m0 && (!fp8 || !a->round_scale))
    return FAIL_ARG(group, "%s: use_ue8m0 is 1; it needs recv_dtype EP_FP8_E4M3 and round_scale 1 (got %d, %d)", fn,
                    (int)a->recv_dtype, a->round_scale);
  if (!fp8 && a->round_scale)
    return FAIL_ARG(group, "%s: round_scale is 1 but recv_dtype is EP_BF16 (no scales)", fn);
  const ep_row_format_t rows = a->use_ue8m0 ? EP_ROWS_FP8_UE8M0 : fp8 ? EP_ROWS_FP8 : EP_ROWS_BF16;
  if (!budget) {
    EP_TRY(ep_check_hidden(group, fn, "hidden", a->hidden, rows));
  } else { /* no hidden hint: the library's bound, then the bytes */
    const ep_status_t st = ep_check_hidden(NULL, fn, "hidden", a->hidden, rows);
    if (st != EP_STATUS_SUCCESS) return ep_fail(group, st, "%s", ep_last_error(NULL));
    /* Laid out with config.max_topk, not the call's num_topk: ranks may pass different top-k, never layouts. */
    const ep_ll_region_t need =
        ep_ll_region(group->num_ranks, a->num_experts, a->max_tokens_per_rank, a->hidden, c->max_topk);
    if (need.half_bytes > ep_ll_budget_half(budget))
      return FAIL_ARG(group,
                      "%s: max_tokens_per_rank=%d, hidden=%d and num_experts=%d (config.max_topk=%d) need %zu bytes "
                      "of LL buffer at %d ranks; config.ll_region_bytes is %zu",
                      fn, a->max_tokens_per_rank, a->hidden, a->num_experts, c->max_topk, need.total_bytes,
                      group->num_ranks, budget);
  }
  if (a->num_tokens > 0 && !a->x) return FAIL_ARG(group, "%s: x is NULL with num_tokens=%d", fn, a->num_tokens);
  if (ep_misaligned16(a->x)) return FAIL_ARG(group, "%s: x (%p) is not 16-byte aligned", fn, a->x);
  if (a->num_tokens > 0 && !a->topk_idx)
    return FAIL_ARG(group, "%s: topk_idx is NULL with num_tokens=%d", fn, a->num_tokens);
  if (!a->recv_x) return FAIL_ARG(group, "%s: recv_x is NULL", fn);
  if (ep_misaligned16(a->recv_x)) return FAIL_ARG(group, "%s: recv_x (%p) is not 16-byte aligned", fn, a->recv_x);
  if (fp8 && !a->recv_x_scales) return FAIL_ARG(group, "%s: recv_x_scales is NULL with recv_dtype EP_FP8_E4M3", fn);
  if (ep_misaligned16(a->recv_x_scales))
    return FAIL_ARG(group, "%s: recv_x_scales (%p) is not 16-byte aligned", fn, a->recv_x_scales);
  if (!a->recv_count) return FAIL_ARG(group, "%s: recv_count is NULL", fn);
  EP_CHECK_ALIGNED(group, fn, {"topk_idx", a->topk_idx, 8}, {"topk_weights", a->topk_weights, 4},
                   {"recv_count", a->recv_count, 4});
  if (a->return_after_send != 0 && a->return_after_send != 1)
    return FAIL_ARG(group, "%s: return_after_send is %d; it must be 0 or 1", fn, a->return_after_send);
  EP_CHECK_ALIGNED(group, fn, {"wait_recv_cost_stats", a->wait_recv_cost_stats, 8});
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_dispatch(ep_group_t group, ep_ll_handle_t handle, const ep_ll_dispatch_args_t* args,
                           cudaStream_t stream) {
  const char* fn = "ep_ll_dispatch";
  EP_CALL_SCOPE();
  EP_TRY(enter_ll(group, fn, true));
  EP_TRY(check_handle(group, handle, fn));
  EP_TRY(ep_check_header(group, fn, "ep_ll_dispatch_args_t", args, args ? args->size : 0,
                         sizeof(ep_ll_dispatch_args_t), args ? args->magic : 0, EP_LL_DISPATCH_ARGS_MAGIC));
  EP_TRY(check_dispatch_args(group, args, fn));
  if (handle->dispatch_recv_pending || handle->combine_recv_pending)
    return ep_fail(group, EP_STATUS_INVALID_USAGE, "%s: the handle's %s receive phase has not been launched yet", fn,
                   handle->dispatch_recv_pending ? "dispatch" : "combine");
  if (group->ll_clean_needed)
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: a rank was unmasked (ep_group_mask_rank / ep_group_clear_rank_mask); every rank must call "
                   "ep_ll_clean before the next low-latency dispatch",
                   fn);
  const int half = group->ll_next_half;
  if (group->ll_half_pending[half])
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: buffer half %d still waits for the receive phase of an earlier call (two-buffer rule: at most "
                   "two LL calls outstanding)",
                   fn, half);
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));

  const ep_ll_dispatch_args_t* a = args;
  const size_t budget = group->config.ll_region_bytes;
  handle->region = budget ? ep_ll_region_in(budget, group->num_ranks, a->num_experts, a->max_tokens_per_rank, a->hidden,
                                            group->config.max_topk)
                          : group->ll_region;
  handle->half = half;
  handle->serial = group->ll_dispatches + 1;
  ep_ll_call_t* c = &handle->call;
  memset(c, 0, sizeof(*c));
  c->num_tokens = a->num_tokens;
  c->num_topk = a->num_topk;
  c->num_experts = a->num_experts;
  c->hidden = a->hidden;
  c->max_tokens = a->max_tokens_per_rank;
  c->fp8 = a->recv_dtype == EP_FP8_E4M3;
  c->round_scale = a->round_scale;
  c->ue8m0 = a->use_ue8m0;
  c->by_local_experts = ep_fastdiv_make((uint32_t)(a->num_experts / group->num_ranks));
  c->recv_x = a->recv_x;
  c->recv_scales = a->recv_x_scales;
  c->recv_count = a->recv_count;
  c->dispatch_weights = a->num_tokens > 0 ? a->topk_weights : NULL;
  c->wait_stats = (long long*)a->wait_recv_cost_stats;
  ep_ll_launch_t p = base_launch(group, handle);
  p.call.x = a->x;
  p.call.topk_idx = a->topk_idx;
  /* Without the hook, one kernel runs both phases where the launcher can; else the send kernel now and the receive
   * kernel below. */
  int fused = 0;
  if (!a->return_after_send) EP_CUDA_TRY(group, ep_launch_ll_dispatch_fused(&p, stream, &fused));
  if (!fused) EP_CUDA_TRY(group, ep_launch_ll_dispatch_send(&p, stream));
  /* The send is issued: the half now belongs to this dispatch. */
  group->ll_dispatches++;
  group->ll_next_half ^= 1;
  group->ll_half_serial[half] = handle->serial;
  handle->dispatched = true;
  if (a->return_after_send) {
    handle->dispatch_recv_pending = true;
    group->ll_half_pending[half] = true;
  } else if (!fused) {
    EP_CUDA_TRY(group, ep_launch_ll_dispatch_recv(&p, stream));
  }
  EP_CUDA_TRY(group, ep_handle_memory_used(&handle->memory, stream)); /* its destroy waits for this point */
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_dispatch_recv(ep_group_t group, ep_ll_handle_t handle, cudaStream_t stream) {
  const char* fn = "ep_ll_dispatch_recv";
  EP_CALL_SCOPE();
  EP_TRY(enter_ll(group, fn, true));
  EP_TRY(check_handle(group, handle, fn));
  if (!handle->dispatch_recv_pending)
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: the handle has no dispatch waiting for its receive phase (call ep_ll_dispatch with "
                   "return_after_send = 1 first)",
                   fn);
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  ep_ll_launch_t p = base_launch(group, handle);
  EP_CUDA_TRY(group, ep_launch_ll_dispatch_recv(&p, stream));
  EP_CUDA_TRY(group, ep_handle_memory_used(&handle->memory, stream));
  handle->dispatch_recv_pending = false;
  group->ll_half_pending[handle->half] = false;
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_get_routing(ep_ll_handle_t handle, const int** src_info, const int64_t** layout_range) {
  if (!handle) return FAIL_ARG(NULL, "ep_ll_get_routing: handle is NULL");
  if (!ep_live_is(handle, EP_OBJECT_LL_HANDLE))
    return ep_fail(NULL, EP_STATUS_INVALID_USAGE, "ep_ll_get_routing: handle %p is not a live LL handle",
                   (void*)handle);
  if (src_info) *src_info = handle->arrays.src_info;
  if (layout_range) *layout_range = handle->arrays.layout_range;
  return EP_STATUS_SUCCESS;
}

/* A combine needs its handle's dispatch received, and the half not yet taken by a later dispatch. */
static ep_status_t check_combinable(ep_group_t group, ep_ll_handle_t handle, const char* fn) {
  if (!handle->dispatched)
    return ep_fail(group, EP_STATUS_INVALID_USAGE, "%s: the handle has no dispatch yet; call ep_ll_dispatch first",
                   fn);
  if (handle->dispatch_recv_pending)
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: the handle's dispatch waits for its receive phase; call ep_ll_dispatch_recv first", fn);
  if (group->ll_half_serial[handle->half] != handle->serial)
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: the handle's buffer half %d was taken by a later dispatch (two-buffer rule: combine a "
                   "handle before the dispatch after next)",
                   fn, handle->half);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_get_combine_buffer(ep_group_t group, ep_ll_handle_t handle, void** buffer) {
  const char* fn = "ep_ll_get_combine_buffer";
  EP_CALL_SCOPE();
  if (buffer) *buffer = NULL;
  EP_TRY(enter_ll(group, fn, false));
  EP_TRY(check_handle(group, handle, fn));
  if (!buffer) return FAIL_ARG(group, "%s: buffer is NULL", fn);
  if (!handle->dispatched)
    return ep_fail(group, EP_STATUS_INVALID_USAGE, "%s: the handle has no dispatch yet; call ep_ll_dispatch first",
                   fn);
  if (group->ll_half_serial[handle->half] != handle->serial)
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: the handle's buffer half %d was taken by a later dispatch (two-buffer rule)", fn,
                   handle->half);
  const ep_ll_region_t* L = &handle->region;
  *buffer = (char*)group->workspace + group->ll_offset + (size_t)handle->half * L->half_bytes + L->combine_stage;
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_combine(ep_group_t group, ep_ll_handle_t handle, const ep_ll_combine_args_t* args,
                          cudaStream_t stream) {
  const char* fn = "ep_ll_combine";
  EP_CALL_SCOPE();
  EP_TRY(enter_ll(group, fn, true));
  EP_TRY(check_handle(group, handle, fn));
  EP_TRY(ep_check_header(group, fn, "ep_ll_combine_args_t", args, args ? args->size : 0,
                         sizeof(ep_ll_combine_args_t), args ? args->magic : 0, EP_LL_COMBINE_ARGS_MAGIC));
  const ep_ll_combine_args_t* a = args;
  if (a->zero_copy != 0 && a->zero_copy != 1)
    return FAIL_ARG(group, "%s: zero_copy is %d; it must be 0 or 1", fn, a->zero_copy);
  if (a->return_after_send != 0 && a->return_after_send != 1)
    return FAIL_ARG(group, "%s: return_after_send is %d; it must be 0 or 1", fn, a->return_after_send);
  if (!a->zero_copy && !a->x) return FAIL_ARG(group, "%s: x is NULL (and zero_copy is 0)", fn);
  if (!a->zero_copy && ep_misaligned16(a->x)) return FAIL_ARG(group, "%s: x (%p) is not 16-byte aligned", fn, a->x);
  EP_TRY(check_combinable(group, handle, fn));
  if (handle->combine_recv_pending)
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: the handle's previous combine waits for its receive phase; call ep_ll_combine_recv first", fn);
  if (a->sum_on_expert_ranks != 0 && a->sum_on_expert_ranks != 1)
    return FAIL_ARG(group, "%s: sum_on_expert_ranks is %d; it must be 0 or 1", fn, a->sum_on_expert_ranks);
  if (a->use_logfmt != 0 && a->use_logfmt != 1)
    return FAIL_ARG(group, "%s: use_logfmt is %d; it must be 0 or 1", fn, a->use_logfmt);
  if (a->use_logfmt && (a->zero_copy || a->sum_on_expert_ranks))
    return FAIL_ARG(group,
                    "%s: use_logfmt=1 encodes the rows as it sends them, which zero_copy (the rows are already in "
                    "the buffer, bf16) and sum_on_expert_ranks do not allow (got zero_copy=%d, sum_on_expert_ranks=%d)",
                    fn, a->zero_copy, a->sum_on_expert_ranks);
  if (a->use_logfmt && handle->call.hidden % 128 != 0)
    return FAIL_ARG(group, "%s: use_logfmt=1 needs hidden a multiple of 128 (its groups); the dispatch had %d", fn,
                    handle->call.hidden);
  if (a->renormalize_masked != 0 && a->renormalize_masked != 1)
    return FAIL_ARG(group, "%s: renormalize_masked is %d; it must be 0 or 1", fn, a->renormalize_masked);
  if (a->renormalize_masked && a->sum_on_expert_ranks)
    return FAIL_ARG(group,
                    "%s: renormalize_masked=1 rescales the weights where the rows are summed, which "
                    "sum_on_expert_ranks=1 does on the experts' ranks (pass 0 for one of them)",
                    fn);
  if (a->renormalize_masked && !group->rank_mask)
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: renormalize_masked=1 needs the rank mask (config.mask_failed_ranks = 1 at ep_group_create)",
                   fn);
  if (a->sum_on_expert_ranks) {
    if (a->topk_weights)
      return FAIL_ARG(group, "%s: topk_weights is given with sum_on_expert_ranks=1, which uses the dispatch's weights "
                      "(pass NULL)", fn);
    if (!ep_ll_sums_fit(&handle->region))
      return ep_fail(group, EP_STATUS_INVALID_USAGE,
                     "%s: sum_on_expert_ranks=1 needs room for the sums after the dispatch's messages in the LL "
                     "buffer, which config.num_experts / num_ranks = %d experts per rank do not leave (3 or more do)",
                     fn, handle->region.num_local_experts);
    if (handle->call.num_tokens > 0 && !handle->call.dispatch_weights)
      return ep_fail(group, EP_STATUS_INVALID_USAGE,
                     "%s: sum_on_expert_ranks=1 needs the weights on the experts' ranks, but the handle's dispatch "
                     "had no topk_weights (num_tokens=%d)",
                     fn, handle->call.num_tokens);
  } else if (handle->call.num_tokens > 0 && !a->topk_weights) {
    return FAIL_ARG(group, "%s: topk_weights is NULL with num_tokens=%d", fn, handle->call.num_tokens);
  }
  if (handle->call.num_tokens > 0 && !a->out)
    return FAIL_ARG(group, "%s: out is NULL with num_tokens=%d", fn, handle->call.num_tokens);
  if (ep_misaligned16(a->out)) return FAIL_ARG(group, "%s: out (%p) is not 16-byte aligned", fn, a->out);
  EP_CHECK_ALIGNED(group, fn, {"topk_weights", a->topk_weights, 4},
                   {"wait_recv_cost_stats", a->wait_recv_cost_stats, 8});
  if (group->ll_half_pending[handle->half])
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: buffer half %d still waits for the receive phase of an earlier call", fn, handle->half);
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));

  handle->call.topk_weights = a->topk_weights;
  handle->call.sum_on_expert_ranks = a->sum_on_expert_ranks;
  handle->call.out = a->out;
  handle->call.wait_stats = (long long*)a->wait_recv_cost_stats;
  handle->call.logfmt = a->use_logfmt;
  handle->call.renormalize = a->renormalize_masked;
  ep_ll_launch_t p = base_launch(group, handle);
  p.call.y = a->x;
  p.call.zero_copy = a->zero_copy;
  /* As in ep_ll_dispatch: one kernel without the hook where the launcher can, else two. */
  int fused = 0;
  if (!a->return_after_send) EP_CUDA_TRY(group, ep_launch_ll_combine_fused(&p, stream, &fused));
  if (!fused) EP_CUDA_TRY(group, ep_launch_ll_combine_send(&p, stream));
  if (a->return_after_send) {
    handle->combine_recv_pending = true;
    group->ll_half_pending[handle->half] = true;
  } else if (!fused) {
    EP_CUDA_TRY(group, ep_launch_ll_combine_recv(&p, stream));
  }
  EP_CUDA_TRY(group, ep_handle_memory_used(&handle->memory, stream));
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_combine_recv(ep_group_t group, ep_ll_handle_t handle, cudaStream_t stream) {
  const char* fn = "ep_ll_combine_recv";
  EP_CALL_SCOPE();
  EP_TRY(enter_ll(group, fn, true));
  EP_TRY(check_handle(group, handle, fn));
  if (!handle->combine_recv_pending)
    return ep_fail(group, EP_STATUS_INVALID_USAGE,
                   "%s: the handle has no combine waiting for its receive phase (call ep_ll_combine with "
                   "return_after_send = 1 first)",
                   fn);
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  ep_ll_launch_t p = base_launch(group, handle);
  EP_CUDA_TRY(group, ep_launch_ll_combine_recv(&p, stream));
  EP_CUDA_TRY(group, ep_handle_memory_used(&handle->memory, stream));
  handle->combine_recv_pending = false;
  group->ll_half_pending[handle->half] = false;
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_clean(ep_group_t group, cudaStream_t stream) {
  const char* fn = "ep_ll_clean";
  EP_CALL_SCOPE();
  EP_TRY(enter_ll(group, fn, true));
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  const ep_ll_region_t* L = &group->ll_region;
  char* base = (char*)group->workspace + group->ll_offset;
  /* Every rank must be done with the buffer before anyone zeroes theirs, and done zeroing before anyone uses it. */
  EP_CUDA_TRY(group, cudaStreamSynchronize(stream));
  EP_CUDA_TRY(group, cudaDeviceSynchronize());
  EP_TRY(ep_enter_collective(group, fn)); /* a data fault is not a reason to leave the peers at the barrier */
  EP_TRY(ep_group_barrier(group, stream)); /* bounded: a rank that never comes is a timeout naming it */
  for (int h = 0; h < 2; ++h)
    EP_CUDA_TRY(group, cudaMemsetAsync(base + (size_t)h * L->half_bytes, 0, L->signal_bytes, stream));
  EP_CUDA_TRY(group, cudaMemsetAsync(group->ll_state, 0, sizeof(ep_ll_state_t), stream));
  EP_TRY(ep_group_barrier(group, stream)); /* after the zeroing, in stream order */
  group->ll_next_half = 0;
  group->ll_half_serial[0] = group->ll_half_serial[1] = 0;
  /* A receive phase never launched (a dropped or failed hook) is abandoned: its sends have landed (every rank
   * synchronised its device before the barrier) and the signals it would have waited for are zeroed. */
  group->ll_half_pending[0] = group->ll_half_pending[1] = false;
  group->ll_cleans++;
  group->ll_clean_needed = false; /* an unmask takes effect: acknowledgements and call numbers restart everywhere */
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_ll_handle_get_state(ep_ll_handle_t handle, ep_ll_handle_state_t* state) {
  const char* fn = "ep_ll_handle_get_state";
  if (!handle) return FAIL_ARG(NULL, "%s: handle is NULL", fn);
  if (!ep_live_is(handle, EP_OBJECT_LL_HANDLE))
    return ep_fail(NULL, EP_STATUS_INVALID_USAGE, "%s: handle %p is not a live LL handle", fn, (void*)handle);
  if (!handle->group)
    return ep_fail(NULL, EP_STATUS_INVALID_USAGE, "%s: the handle's group was destroyed; only destroy the handle", fn);
  if (!state) return FAIL_ARG(handle->group, "%s: state is NULL", fn);
  forget_cleaned_phases(handle);
  if (state->size != sizeof(ep_ll_handle_state_t))
    return FAIL_ARG(handle->group,
                    "%s: state.size is %u, want %u (sizeof(ep_ll_handle_state_t)): initialise it with "
                    "EP_LL_HANDLE_STATE_INIT, or header and library versions differ",
                    fn, state->size, (unsigned)sizeof(ep_ll_handle_state_t));
  const ep_group_t group = handle->group;
  state->half = handle->dispatched ? handle->half : -1;
  state->serial = handle->dispatched ? handle->serial : 0;
  /* The rule check_combinable applies: the half still belongs to the handle's dispatch (ep_ll_clean zeroes it). */
  state->is_current = handle->dispatched && group->ll_half_serial[handle->half] == handle->serial;
  state->dispatch_recv_pending = handle->dispatch_recv_pending;
  state->combine_recv_pending = handle->combine_recv_pending;
  return EP_STATUS_SUCCESS;
}
