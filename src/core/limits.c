/* limits.c: ep_get_limits, the library's limits (include/ep.h) for bindings that ask at run time. */
#include "core/internal.h"

ep_status_t ep_get_limits(ep_limits_t* limits) {
  const char* fn = "ep_get_limits";
  if (!limits) return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: limits is NULL", fn);
  if (limits->size != sizeof(ep_limits_t))
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT,
                   "%s: limits.size is %u, want %u (sizeof(ep_limits_t)): initialise it with EP_LIMITS_INIT, or "
                   "header and library versions differ",
                   fn, limits->size, (unsigned)sizeof(ep_limits_t));
  limits->max_ranks = EP_MAX_RANKS;
  limits->max_topk = EP_MAX_TOPK;
  limits->max_hidden = EP_MAX_HIDDEN;
  limits->ll_max_tokens_per_rank = EP_LL_MAX_TOKENS_PER_RANK;
  limits->max_expert_alignment = EP_MAX_EXPERT_ALIGNMENT;
  limits->max_sms = EP_MAX_SMS;
  limits->default_num_sms = EP_DEFAULT_NUM_SMS;
  limits->max_timeout_seconds = EP_MAX_TIMEOUT_SECONDS;
  return EP_STATUS_SUCCESS;
}
