/* status.c: status names, the library's version, error messages (per group and per thread), and the entry checks
 * every call makes. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "core/internal.h"

static _Thread_local char t_last_error[EP_ERROR_MESSAGE_BYTES];

const char* ep_status_string(ep_status_t status) {
  switch (status) {
    case EP_STATUS_SUCCESS: return "EP_STATUS_SUCCESS";
    case EP_STATUS_INVALID_ARGUMENT: return "EP_STATUS_INVALID_ARGUMENT";
    case EP_STATUS_INVALID_USAGE: return "EP_STATUS_INVALID_USAGE";
    case EP_STATUS_UNSUPPORTED: return "EP_STATUS_UNSUPPORTED";
    case EP_STATUS_OUT_OF_MEMORY: return "EP_STATUS_OUT_OF_MEMORY";
    case EP_STATUS_CUDA_ERROR: return "EP_STATUS_CUDA_ERROR";
    case EP_STATUS_SUBSTRATE_ERROR: return "EP_STATUS_SUBSTRATE_ERROR";
    case EP_STATUS_DEVICE_ERROR: return "EP_STATUS_DEVICE_ERROR";
    case EP_STATUS_TIMEOUT: return "EP_STATUS_TIMEOUT";
    case EP_STATUS_INTERNAL_ERROR: return "EP_STATUS_INTERNAL_ERROR";
    case EP_STATUS_PEER_FAILED: return "EP_STATUS_PEER_FAILED";
    case EP_STATUS_COUNT: break;
  }
  return "EP_STATUS_<unknown>";
}

ep_status_t ep_get_version(int* version) {
  if (!version) return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "ep_get_version: version is NULL");
  *version = EP_VERSION_CODE;
  return EP_STATUS_SUCCESS;
}

const char* ep_fault_site_name(int site) {
  switch (site) {
    case EP_SITE_CHECK_SIGNAL: return "group check, waiting for a put-with-signal";
    case EP_SITE_CHECK_NVLINK: return "group check, waiting for NVLink stores";
    case EP_SITE_BARRIER: return "the group's barrier (create, destroy, low-latency clean)";
    case EP_SITE_PREPARE_ACK: return "dispatch prepare, waiting for the peer to release our previous send lists";
    case EP_SITE_PREPARE_COUNTS: return "dispatch prepare, waiting for the peer's counts";
    case EP_SITE_DISPATCH_ACK: return "dispatch, waiting for the peer to release our previous staged rows";
    case EP_SITE_DISPATCH_STAGED: return "dispatch, waiting for the peer's staged rows";
    case EP_SITE_COMBINE_ACK: return "combine, waiting for the peer to finish reading the previous combine's rows";
    case EP_SITE_COMBINE_STAGED: return "combine, waiting for the peer's expert outputs";
    case EP_SITE_LL_DISPATCH_ACK:
      return "low-latency dispatch send, waiting for the peer to finish receiving the last call on this buffer half";
    case EP_SITE_LL_DISPATCH_RECV: return "low-latency dispatch receive, waiting for the peer's tokens";
    case EP_SITE_LL_COMBINE_ACK:
      return "low-latency combine send, waiting for the peer to finish receiving the last call on this buffer half";
    case EP_SITE_LL_COMBINE_RECV: return "low-latency combine receive, waiting for the peer's expert outputs";
    case EP_SITE_PREPARE_META: return "internode prepare, waiting for the rail peer's metadata (RDMA)";
    case EP_SITE_PREPARE_RELAY:
      return "internode prepare, waiting for the forwarder to relay a remote source's metadata";
    case EP_SITE_META_FREE: return "internode prepare, waiting for the rail peer to release our previous metadata";
    case EP_SITE_DISPATCH_RDMA: return "internode dispatch, waiting for the rail peer's rows (RDMA)";
    case EP_SITE_DISPATCH_RELAY: return "internode dispatch, waiting for the forwarder to relay a remote chunk";
    case EP_SITE_RDMA_FREE: return "internode dispatch, waiting for the rail peer to release its receive region";
    case EP_SITE_FWD_ACK: return "internode dispatch, waiting for a local rank to finish pulling relayed rows";
    case EP_SITE_COMBINE_PARTIAL: return "internode combine, waiting for the forwarder's partial sums (RDMA)";
    case EP_SITE_PARTIAL_FREE: return "internode combine, waiting for the rail peer to release our previous partials";
    default: return "device wait";
  }
}

/* A group that is not live has no message of its own: its calls wrote theirs to the thread's. */
const char* ep_last_error(ep_group_t group) {
  return group && ep_live_is(group, EP_OBJECT_GROUP) ? group->last_error : t_last_error;
}

ep_status_t ep_fail(ep_group_t group, ep_status_t status, const char* fmt, ...) {
  char* buf = group ? group->last_error : t_last_error;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, EP_ERROR_MESSAGE_BYTES, fmt, ap);
  va_end(ap);
  if (group) memcpy(t_last_error, buf, EP_ERROR_MESSAGE_BYTES);  // the thread sees it too
  return status;
}

ep_status_t ep_fail_cuda(ep_group_t group, cudaError_t err, const char* what) {
  ep_status_t st = err == cudaErrorMemoryAllocation ? EP_STATUS_OUT_OF_MEMORY : EP_STATUS_CUDA_ERROR;
  return ep_fail(group, st, "%s failed: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
}

/* Turn a recorded device fault into a status and message. Data faults are cleared once reported; timeouts and
 * corrupted transfers leave the group failed (peers may be mid-protocol), so only destroy is allowed after. */
static bool is_data_fault(int code) {
  return code == EP_FAULT_BAD_EXPERT || code == EP_FAULT_RECV_OVERFLOW || code == EP_FAULT_BAD_EXPERT_MAP;
}

/* A reported data fault leaves the word clean; where faults are published stays. */
static void clear_fault(ep_device_error_t* w) { memset(w, 0, offsetof(ep_device_error_t, group_fault)); }

/* What the origin of a published fault met, in words ("timed out waiting for rank 3 (node 0, local 3) in ..."). */
static void describe_published(ep_group_t group, int code, int site, int peer, char* out, size_t bytes) {
  switch (code) {
    case EP_FAULT_TIMEOUT:
      snprintf(out, bytes, "timed out waiting for rank %d (node %d, local %d) in %s", peer,
               peer / group->ranks_per_node, peer % group->ranks_per_node, ep_fault_site_name(site));
      break;
    case EP_FAULT_BAD_DATA:
      snprintf(out, bytes, "received wrong data from rank %d over the %s path", peer,
               site == 0 ? "transport put" : "NVLink store");
      break;
    case EP_FAULT_ABORTED: snprintf(out, bytes, "aborted the group (ep_group_abort)"); break;
    case EP_FAULT_SHAPE_MISMATCH:
      snprintf(out, bytes, "found that rank %d passed ep_ll_dispatch another %s", peer, ep_ll_shape_field_name(site));
      break;
    default: snprintf(out, bytes, "met device fault %d", code); break;
  }
}

static ep_status_t take_device_fault(ep_group_t group, bool take_data_faults) {
  volatile ep_device_error_t* w = group->error_word;
  int code = w->code;
  if (code == EP_FAULT_NONE || code == -1) return EP_STATUS_SUCCESS;
  if (!take_data_faults && is_data_fault(code)) return EP_STATUS_SUCCESS;
  ep_status_t st;
  switch (code) {
    case EP_FAULT_BAD_EXPERT:
      st = ep_fail(group, EP_STATUS_DEVICE_ERROR,
                   "rank %d: topk_idx of token %lld holds expert %lld, outside [-1, num_experts); the token was not "
                   "counted",
                   w->rank, w->value0, w->value1);
      clear_fault(group->error_word);
      return st;
    case EP_FAULT_RECV_OVERFLOW:
      st = ep_fail(group, EP_STATUS_DEVICE_ERROR,
                   "rank %d: dispatch received %lld rows but recv_capacity is %lld; the rows past it were dropped",
                   w->rank, w->value0, w->value1);
      clear_fault(group->error_word);
      return st;
    case EP_FAULT_BAD_EXPERT_MAP:
      if (w->site == 0)
        st = ep_fail(group, EP_STATUS_DEVICE_ERROR,
                     "rank %d: ep_map_experts: logical_topk of token %lld holds logical expert %lld, outside [-1, "
                     "num_logical_experts); it was mapped to -1",
                     w->rank, w->value0, w->value1);
      else
        st = ep_fail(group, EP_STATUS_DEVICE_ERROR,
                     "rank %d: ep_map_experts: the map's row of logical expert %lld holds slot %lld, outside [-1, "
                     "num_experts); that copy was skipped",
                     w->rank, w->value0, w->value1);
      clear_fault(group->error_word);
      return st;
    case EP_FAULT_TIMEOUT:
      st = ep_fail(group, EP_STATUS_TIMEOUT,
                   "rank %d timed out after %.3f s waiting for rank %d (node %d, local %d) in %s; the group must be "
                   "destroyed",
                   w->rank, (double)w->value0 * 1e-9, w->peer, w->peer / group->ranks_per_node,
                   w->peer % group->ranks_per_node,
                   ep_fault_site_name(w->site));
      break;
    case EP_FAULT_BAD_DATA:
      st = ep_fail(group, EP_STATUS_INTERNAL_ERROR,
                   "rank %d received wrong data from rank %d over the %s path (word %lld = %lld); the group must be "
                   "destroyed",
                   w->rank, w->peer, w->site == 0 ? "transport put" : "NVLink store", w->value0, w->value1);
      break;
    case EP_FAULT_SHAPE_MISMATCH:
      st = ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "rank %d dispatched with %s %lld, this rank (%d) with %lld: every rank must pass ep_ll_dispatch "
                   "the same max_tokens_per_rank, hidden, num_experts and recv_dtype; no row was placed, and the "
                   "group must be destroyed",
                   w->peer, ep_ll_shape_field_name(w->site), w->value0, w->rank, w->value1);
      break;
    case EP_FAULT_PEER_FAILED: {
      char cause[256];
      describe_published(group, (int)w->value0, w->site, (int)w->value1, cause, sizeof(cause));
      st = ep_fail(group, EP_STATUS_PEER_FAILED,
                   "rank %d failed: %s; rank %d stopped its waits when the fault was published; the group must be "
                   "destroyed",
                   w->peer, cause, w->rank);
      break;
    }
    default:
      st = ep_fail(group, EP_STATUS_INTERNAL_ERROR, "rank %d: unknown device fault code %d", w->rank, code);
      break;
  }
  /* This rank's own fatal fault reaches the peers without NVLink from here (its kernels reached the others). */
  if (ep_fault_is_fatal(code) && code != EP_FAULT_PEER_FAILED)
    ep_publish_fault_remote(group, EP_GROUP_FAULT_PACK(code, w->site, w->rank, w->peer));
  ep_mark_failed(group);
  return st;
}

ep_status_t ep_take_fatal_fault(ep_group_t group) { return take_device_fault(group, false); }

void ep_mark_failed(ep_group_t group) {
  group->failed = true;
  if (group->fatal_error[0] == '\0') /* the first fatal fault is the one kept */
    memcpy(group->fatal_error, group->last_error, EP_ERROR_MESSAGE_BYTES);
}

/* A failed group refuses every call but destroy; the message repeats the fault that failed it, which stays in
 * fatal_error for the group's life whatever later calls write. */
static ep_status_t refuse_failed(ep_group_t group, const char* fn) {
  return ep_fail(group, EP_STATUS_INVALID_USAGE, "%s: the group failed earlier: %s", fn, group->fatal_error);
}

ep_status_t ep_check_live_group(ep_group_t group, const char* fn) {
  if (!group) return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: group is NULL", fn);
  if (!ep_live_is(group, EP_OBJECT_GROUP))
    return ep_fail(NULL, EP_STATUS_INVALID_USAGE,
                   "%s: group %p is not a live group (destroyed already, or never created)", fn, (void*)group);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_enter(ep_group_t group, const char* fn) {
  EP_TRY(ep_check_live_group(group, fn));
  EP_TRY(ep_take_group(group, fn));
  if (group->failed) return refuse_failed(group, fn);
  return take_device_fault(group, true);
}

ep_status_t ep_enter_collective(ep_group_t group, const char* fn) {
  EP_TRY(ep_check_live_group(group, fn));
  EP_TRY(ep_take_group(group, fn));
  if (group->failed) return refuse_failed(group, fn);
  return take_device_fault(group, false);
}

ep_status_t ep_get_async_error(ep_group_t group, ep_status_t* async_status) {
  const char* fn = "ep_get_async_error";
  EP_CALL_SCOPE();
  EP_TRY(ep_check_live_group(group, fn));
  EP_TRY(ep_take_group(group, fn));
  if (!async_status) return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: async_status is NULL", fn);
  *async_status = group->failed ? refuse_failed(group, fn) : take_device_fault(group, true);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_check_header(ep_group_t group, const char* fn, const char* type_name, const void* args,
                            uint32_t size, uint32_t want_size, uint32_t magic, uint32_t want_magic) {
  if (!args) return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: args is NULL", fn);
  if (magic != want_magic)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "%s: args.magic is 0x%08x, want 0x%08x: initialise %s with its _INIT macro", fn, magic,
                   want_magic, type_name);
  if (size != want_size)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "%s: args.size is %u, want %u (sizeof(%s)): header and library versions differ", fn, size,
                   want_size, type_name);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_check_hidden(ep_group_t group, const char* fn, const char* name, int hidden, ep_row_format_t format) {
  const int multiple = format == EP_ROWS_BF16 ? 8 : format == EP_ROWS_FP8 ? 128 : 512;
  const char* rows = format == EP_ROWS_BF16  ? "BF16 rows"
                     : format == EP_ROWS_FP8 ? "FP8 rows, a scale per 128 channels"
                                             : "FP8 rows with UE8M0 scales, four to an int";
  const int most = group ? group->config.hidden : EP_MAX_HIDDEN;
  if (hidden > 0 && hidden % multiple == 0 && hidden <= most) return EP_STATUS_SUCCESS;
  char bound[40];
  if (group) snprintf(bound, sizeof(bound), "config.hidden=%d", most);
  else snprintf(bound, sizeof(bound), "%d", most);
  return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                 "%s: %s is %d; it must be a positive multiple of %d (%s) and at most %s", fn, name, hidden, multiple,
                 rows, bound);
}

ep_status_t ep_check_natural_alignment(ep_group_t group, const char* fn, const ep_typed_ptr_t* ptrs, int count) {
  for (int i = 0; i < count; ++i)
    if ((uintptr_t)ptrs[i].ptr % ptrs[i].align != 0)
      return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: %s (%p) is not %u-byte aligned", fn, ptrs[i].name,
                     ptrs[i].ptr, ptrs[i].align);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_check_topk_and_experts(ep_group_t group, const char* fn, int num_topk, int num_experts) {
  const ep_group_config_t* c = &group->config;
  if (num_topk < 1 || num_topk > c->max_topk)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "%s: num_topk is %d; it must be in [1, config.max_topk=%d]", fn,
                   num_topk, c->max_topk);
  if (num_experts <= 0 || num_experts % group->num_ranks != 0 || num_experts > c->num_experts)
    return ep_fail(group, EP_STATUS_INVALID_ARGUMENT,
                   "%s: num_experts is %d; it must be a positive multiple of num_ranks (%d) and <= "
                   "config.num_experts=%d",
                   fn, num_experts, group->num_ranks, c->num_experts);
  return EP_STATUS_SUCCESS;
}
