/* layout.c: ep_get_dispatch_layout, the public face of the layout kernel. */
#include "core/internal.h"

/* (token, slot) pairs of one call: the kernel indexes them in int, with a block's stride of headroom. */
#define EP_LAYOUT_MAX_PAIRS (1 << 30)

ep_status_t ep_get_dispatch_layout(ep_group_t group, const ep_layout_args_t* args, cudaStream_t stream) {
  const char* fn = "ep_get_dispatch_layout";
  EP_CALL_SCOPE();
  EP_TRY(ep_enter(group, fn));
  EP_TRY(ep_check_header(group, fn, "ep_layout_args_t", args, args ? args->size : 0, sizeof(ep_layout_args_t),
                         args ? args->magic : 0, EP_LAYOUT_ARGS_MAGIC));
  const ep_layout_args_t* a = args;
  if (a->num_tokens < 0)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: num_tokens is %d; it must be >= 0", fn, a->num_tokens);
  if (a->num_topk < 1 || a->num_topk > EP_MAX_TOPK)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: num_topk is %d; it must be in [1, %d]", fn, a->num_topk,
                   EP_MAX_TOPK);
  if (a->num_experts <= 0 || a->num_experts % group->num_ranks != 0)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "%s: num_experts is %d; it must be a positive multiple of num_ranks (%d)", fn, a->num_experts,
                   group->num_ranks);
  if (a->num_experts > group->config.num_experts)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "%s: num_experts is %d but the group was sized for config.num_experts=%d; raise the hint", fn,
                   a->num_experts, group->config.num_experts);
  if (a->num_tokens > 0 && !a->topk_idx)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: topk_idx is NULL with num_tokens=%d", fn, a->num_tokens);
  if (!a->num_tokens_per_rank)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: num_tokens_per_rank is NULL", fn);
  if (!a->num_tokens_per_expert)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: num_tokens_per_expert is NULL", fn);
  if ((int64_t)a->num_tokens * a->num_topk > EP_LAYOUT_MAX_PAIRS)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "%s: num_tokens is %d; times num_topk (%d) it must stay at most 2^30 (the kernel counts "
                   "(token, slot) pairs in an int)",
                   fn, a->num_tokens, a->num_topk);
  EP_CHECK_ALIGNED(group, fn, {"topk_idx", a->topk_idx, 8}, {"num_tokens_per_rank", a->num_tokens_per_rank, 4},
                   {"num_tokens_per_node", a->num_tokens_per_node, 4},
                   {"num_tokens_per_expert", a->num_tokens_per_expert, 4});
  if (a->num_tokens > 0 && !a->is_token_in_rank)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: is_token_in_rank is NULL with num_tokens=%d", fn,
                   a->num_tokens);
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  /* The group's scratch (histograms and the last block's arrival counter) serves one call at a time: a layout
   * still running on another stream would share it and both would count wrong. Checked for eager calls (a
   * captured call runs when its graph is replayed, ordered by the caller). */
  enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  EP_CUDA_TRY(group, cudaStreamIsCapturing(stream, &capture));
  const bool eager = capture == cudaStreamCaptureStatusNone;
  if (eager && group->layout_recorded && group->layout_stream != stream) {
    cudaError_t q = cudaEventQuery(group->layout_done);
    if (q == cudaErrorNotReady)
      return ep_fail(group, EP_STATUS_INVALID_USAGE,
                     "%s: the previous layout call, on another stream, is still running and the two would share "
                     "the group's scratch; order them (one stream, or an event between the streams)",
                     fn);
    if (q != cudaSuccess) return ep_fail_cuda(group, q, "cudaEventQuery of the previous layout call");
  }

  ep_layout_launch_t p;
  p.topk_idx = a->topk_idx;
  p.num_tokens = a->num_tokens;
  p.num_topk = a->num_topk;
  p.num_experts = a->num_experts;
  p.num_ranks = group->num_ranks;
  p.ranks_per_node = group->ranks_per_node;
  p.num_tokens_per_rank = a->num_tokens_per_rank;
  p.num_tokens_per_node = a->num_tokens_per_node;
  p.num_tokens_per_expert = a->num_tokens_per_expert;
  p.is_token_in_rank = a->is_token_in_rank;
  p.scratch = group->layout_scratch;
  p.error = group->error_word_dev;
  p.rank = group->rank;
  EP_CUDA_TRY(group, ep_launch_layout(&p, stream));
  if (eager) {
    EP_CUDA_TRY(group, cudaEventRecord(group->layout_done, stream));
    group->layout_stream = stream;
    group->layout_recorded = true;
  }
  return EP_STATUS_SUCCESS;
}
