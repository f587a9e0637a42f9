/* group.c: group lifecycle (create, destroy, info) and the end-to-end self-check. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda.h> /* cuCtxGetExecAffinity's types only: it is called through the runtime's driver entry point */

#include "core/arch.h"
#include "core/internal.h"
#include "transport/transport.h"

/* SMs that kernels of this process can occupy on the current device at once: all of them, or fewer when CUDA MPS
 * caps the context (the runtime then reports the capped count; an execution-affinity SM count is honoured too).
 * Grids whose blocks wait for each other are sized from it: a block that never becomes resident would leave the
 * others waiting until their time budget ran out. */
static int usable_sms(int reported_sms) {
  int sms = reported_sms;
  typedef CUresult (*get_exec_affinity_fn)(CUexecAffinityParam*, CUexecAffinityType);
  void* fn = NULL;
  enum cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  if (cudaFree(0) == cudaSuccess &&  /* the context exists */
      cudaGetDriverEntryPointByVersion("cuCtxGetExecAffinity", &fn, 11040, cudaEnableDefault, &found) ==
          cudaSuccess &&
      found == cudaDriverEntryPointSuccess && fn) {
    CUexecAffinityParam affinity;
    memset(&affinity, 0, sizeof(affinity));
    if (((get_exec_affinity_fn)fn)(&affinity, CU_EXEC_AFFINITY_TYPE_SM_COUNT) == CUDA_SUCCESS &&
        affinity.param.smCount.val > 0 && (int)affinity.param.smCount.val < sms)
      sms = (int)affinity.param.smCount.val;
  }
  (void)cudaGetLastError(); /* a context without affinity support is not an error for the next call */
  return sms;
}

/* Room NVSHMEM needs in the heap beyond what the group asks for (its own signals and teams). */
#define EP_HEAP_SLACK_BYTES ((size_t)64 << 20)

ep_status_t ep_get_unique_id(ep_unique_id_t* unique_id) {
  if (!unique_id) return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "ep_get_unique_id: unique_id is NULL");
  char err[256];
  if (ep_tp_get_unique_id(unique_id->bytes, err, sizeof(err)) != 0)
    return ep_fail(NULL, EP_STATUS_SUBSTRATE_ERROR, "ep_get_unique_id: %s", err);
  return EP_STATUS_SUCCESS;
}

/* Validate a config and fill its defaults. Shared with the CPU tests through ep_group_create's early exits. */
static ep_status_t check_config(const ep_group_config_t* c, int num_ranks) {
  const char* fn = "ep_group_create";
  EP_TRY(ep_check_header(NULL, fn, "ep_group_config_t", c, c->size, sizeof(ep_group_config_t), c->magic,
                         EP_GROUP_CONFIG_MAGIC));
  if (c->ranks_per_node < 0 || (c->ranks_per_node > 0 && num_ranks % c->ranks_per_node != 0))
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT,
                   "%s: config.ranks_per_node is %d; it must be 0 or divide num_ranks (%d)", fn, c->ranks_per_node,
                   num_ranks);
  if (c->num_experts <= 0 || c->num_experts % num_ranks != 0)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT,
                   "%s: config.num_experts is %d; it must be a positive multiple of num_ranks (%d)", fn,
                   c->num_experts, num_ranks);
  EP_TRY(ep_check_hidden(NULL, fn, "config.hidden", c->hidden, EP_ROWS_FP8)); /* the buffers hold FP8 rows too */
  if (c->max_tokens_per_rank <= 0)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: config.max_tokens_per_rank is %d; it must be > 0", fn,
                   c->max_tokens_per_rank);
  if ((int64_t)c->max_tokens_per_rank * num_ranks > INT32_MAX)  /* rows one rank may receive, counted in int */
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT,
                   "%s: config.max_tokens_per_rank is %d; times num_ranks (%d) it must stay below 2^31", fn,
                   c->max_tokens_per_rank, num_ranks);
  if (c->max_topk < 1 || c->max_topk > EP_MAX_TOPK)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: config.max_topk is %d; it must be in [1, %d]", fn,
                   c->max_topk, EP_MAX_TOPK);
  if (c->ll_max_tokens_per_rank < 0 || c->ll_max_tokens_per_rank > EP_LL_MAX_TOKENS_PER_RANK)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: config.ll_max_tokens_per_rank is %d; it must be in [0, %d]",
                   fn, c->ll_max_tokens_per_rank, EP_LL_MAX_TOKENS_PER_RANK);
  EP_TRY(ep_ll_check_config(c, num_ranks, fn));
  if (c->num_sms < 0 || c->num_sms > EP_MAX_SMS)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: config.num_sms is %d; it must be in [0, %d]", fn,
                   c->num_sms, EP_MAX_SMS);
  if (c->max_sms < 0 || c->max_sms > EP_MAX_SMS)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: config.max_sms is %d; it must be in [0, %d]", fn,
                   c->max_sms, EP_MAX_SMS);
  if (c->mask_failed_ranks != 0 && c->mask_failed_ranks != 1)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: config.mask_failed_ranks is %d; it must be 0 or 1", fn,
                   c->mask_failed_ranks);
  if (!(c->timeout_seconds >= EP_MIN_TIMEOUT_SECONDS) || c->timeout_seconds > EP_MAX_TIMEOUT_SECONDS)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: config.timeout_seconds is %g; it must be in [%g, %d]", fn,
                   c->timeout_seconds, EP_MIN_TIMEOUT_SECONDS, EP_MAX_TIMEOUT_SECONDS);
  const int num_nodes = c->ranks_per_node > 0 ? num_ranks / c->ranks_per_node : 1;
  if (c->normal_region_bytes > 0) {
    size_t need = 0; /* one token a round (on several nodes the pool holds both regions); the arguments are checked */
    EP_TRY(ep_normal_region_size_hint(1, c->hidden, num_ranks, c->ranks_per_node, c->num_experts, c->max_topk, &need));
    if (c->normal_region_bytes < need)
      return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT,
                     "%s: config.normal_region_bytes is %zu; one token of hidden %d and top-k %d among %d ranks%s "
                     "needs %zu (0 = sized from the hints)",
                     fn, c->normal_region_bytes, c->hidden, c->max_topk, num_ranks,
                     num_nodes > 1 ? " (both regions of several nodes)" : "", need);
  }
  return EP_STATUS_SUCCESS;
}

/* The normal path's regions (the internode one only on several nodes): from the hints, or the pool of
 * config.normal_region_bytes (check_config made it hold a token). */
static ep_internode_regions_t normal_regions_of(const ep_group_config_t* c, int num_ranks, int ranks_per_node) {
  if (ranks_per_node < num_ranks)
    return ep_internode_regions(num_ranks, ranks_per_node, c->num_experts, c->normal_region_bytes,
                                c->max_tokens_per_rank, c->hidden, c->max_topk);
  ep_internode_regions_t r;
  memset(&r, 0, sizeof(r));
  r.normal = c->normal_region_bytes == 0
                 ? ep_normal_region(num_ranks, c->num_experts, c->max_tokens_per_rank, c->hidden, c->max_topk)
                 : ep_normal_region_pool(num_ranks, c->num_experts, c->normal_region_bytes, c->max_tokens_per_rank,
                                         c->hidden, c->max_topk);
  return r;
}

static const char* const k_agreed_fields[EP_CONFIG_RECORD_FIELDS] = {
    "config.ranks_per_node",      "config.num_experts",      "config.hidden",
    "config.max_tokens_per_rank", "config.max_topk",         "config.ll_max_tokens_per_rank",
    "symmetric workspace bytes",  "config.mask_failed_ranks"};

/* num_sms, max_sms and timeout_seconds stay each rank's own: they size nothing another rank reads. */
ep_config_record_t ep_config_record(ep_group_t g) {
  const ep_group_config_t* c = &g->config;
  ep_config_record_t r = {{g->ranks_per_node, c->num_experts, c->hidden, c->max_tokens_per_rank, c->max_topk,
                           c->ll_max_tokens_per_rank, (int64_t)g->workspace_bytes, c->mask_failed_ranks}};
  return r;
}

bool ep_config_agreement(const ep_config_record_t* records, int num_ranks, char* message, size_t message_bytes) {
  for (int r = 1; r < num_ranks; ++r)
    for (int f = 0; f < EP_CONFIG_RECORD_FIELDS; ++f)
      if (records[r].value[f] != records[0].value[f]) {
        snprintf(message, message_bytes,
                 "the ranks disagree on the group config: rank %d has %s = %lld but rank 0 has %lld; every rank "
                 "must pass the same shape hints",
                 r, k_agreed_fields[f], (long long)records[r].value[f], (long long)records[0].value[f]);
        return false;
      }
  return true;
}

/* The bounded barrier over `signals` (symmetric, [num_ranks] words), with the group's budget: see ep_group_barrier. */
static ep_status_t bounded_barrier(ep_group_t g, void* signals, unsigned long long epoch, cudaStream_t stream) {
  ep_check_launch_t p;
  memset(&p, 0, sizeof(p));
  p.workspace = signals;
  p.rank = g->rank;
  p.num_ranks = g->num_ranks;
  p.epoch = epoch;
  p.timeout_ns = g->timeout_ns;
  p.error = g->error_word_dev;
  p.mask = g->rank_mask;
  ep_tp_quiet(); /* host-initiated puts land before a peer leaves the barrier */
  cudaError_t ce = ep_launch_barrier(&p, stream);
  if (ce == cudaSuccess) ce = cudaStreamSynchronize(stream); /* bounded: the kernel's waits are */
  if (ce != cudaSuccess) return ep_fail_cuda(g, ce, "the group's barrier");
  return ep_take_fatal_fault(g);
}

ep_status_t ep_group_barrier(ep_group_t g, cudaStream_t stream) {
  return bounded_barrier(g, (char*)g->workspace + EP_BARRIER_SIGNALS_OFFSET, ++g->barrier_epoch, stream);
}

void ep_publish_fault_remote(ep_group_t g, unsigned long long word) {
  if (!g->workspace || !g->peer_bases || g->num_nvlink_peers == g->num_ranks) return;
  for (int r = 0; r < g->num_ranks; ++r)
    if (!g->peer_bases[r]) ep_tp_put_u64(g->workspace, word, r);
  ep_tp_quiet();
}

/* A fatal fault reported on this rank, or recorded in its error word and not yet reported. */
static bool fatal_fault_recorded(ep_group_t g) {
  const int code = g->error_word ? ((volatile ep_device_error_t*)g->error_word)->code : EP_FAULT_NONE;
  return g->failed || ep_fault_is_fatal(code);
}

/* ...or published by a peer into this rank's group fault word: the group's collective teardown would wait for a
 * rank that may be gone. */
static bool group_failed_anywhere(ep_group_t g) {
  if (fatal_fault_recorded(g)) return true;
  unsigned long long word = 0;
  return cudaMemcpy(&word, g->workspace, sizeof(word), cudaMemcpyDeviceToHost) != cudaSuccess || word != 0;
}

/* Every rank puts its record into slot [rank] of a small symmetric table on every rank, so that after the barrier
 * each holds the same table and reaches the same verdict: on a mismatch every rank fails create, naming the first
 * rank and field that differ from rank 0's, before the workspace (whose size would differ) is allocated. */
static ep_status_t check_config_agreement(ep_group_t g) {
  const char* fn = "ep_group_create";
  const size_t bytes = sizeof(ep_config_record_t) * (size_t)g->num_ranks;
  /* The records, then the barrier's signals. */
  ep_config_record_t* table = (ep_config_record_t*)ep_tp_calloc(bytes + sizeof(uint64_t) * (size_t)g->num_ranks);
  ep_config_record_t* host = (ep_config_record_t*)malloc(bytes);
  if (!table || !host) {
    ep_tp_free(table);
    free(host);
    return ep_fail(NULL, EP_STATUS_OUT_OF_MEMORY, "%s: allocating the config agreement table failed", fn);
  }
  const ep_config_record_t mine = ep_config_record(g);
  cudaError_t ce = cudaMemcpy(&table[g->rank], &mine, sizeof(mine), cudaMemcpyHostToDevice);
  if (ce == cudaSuccess)
    for (int pe = 0; pe < g->num_ranks; ++pe)
      if (pe != g->rank) ep_tp_put(&table[g->rank], &table[g->rank], sizeof(mine), pe);
  /* Every rank arrives, failed copy or not: the others wait here, up to the time budget. */
  ep_status_t st = bounded_barrier(g, (char*)table + bytes, 1, g->control_stream);
  if (st != EP_STATUS_SUCCESS) {
    free(host); /* the table stays: freeing it is collective, and a rank did not come */
    return st;
  }
  if (ce == cudaSuccess) ce = cudaMemcpy(host, table, bytes, cudaMemcpyDeviceToHost);
  ep_tp_free(table);
  char message[EP_ERROR_MESSAGE_BYTES - 32];
  if (ce != cudaSuccess) st = ep_fail_cuda(NULL, ce, "ep_group_create: exchanging the config");
  else if (!ep_config_agreement(host, g->num_ranks, message, sizeof(message)))
    st = ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: %s", fn, message);
  free(host);
  return st;
}

ep_status_t ep_check_launchable(ep_group_t g, size_t smem_per_block) {
  const char* fn = "ep_group_create";
  const ep_group_config_t* c = &g->config;
  const size_t layout = ep_layout_smem_bytes(c->num_experts, g->num_ranks);
  if (layout > smem_per_block)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT,
                   "%s: config.num_experts is %d: the layout kernel would need %zu bytes of shared memory per block "
                   "and the device allows %zu; lower config.num_experts",
                   fn, c->num_experts, layout, smem_per_block);
  if (c->ll_max_tokens_per_rank > 0) {
    ep_ll_launch_t worst;
    memset(&worst, 0, sizeof(worst));
    worst.group.num_ranks = g->num_ranks;
    worst.group.num_sms = g->device_sms > 0 ? g->device_sms : 1;
    worst.call.num_tokens = worst.call.max_tokens = c->ll_max_tokens_per_rank;
    worst.call.num_experts = c->num_experts;
    worst.call.num_topk = c->max_topk;
    worst.call.hidden = c->hidden;
    const size_t ll = ep_ll_smem_bytes(&worst);
    if (ll > smem_per_block)
      return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT,
                     "%s: config.num_experts %d, ll_max_tokens_per_rank %d and max_topk %d: the low-latency kernels "
                     "would need %zu bytes of shared memory per block and the device allows %zu; lower them",
                     fn, c->num_experts, c->ll_max_tokens_per_rank, c->max_topk, ll, smem_per_block);
  }
  return EP_STATUS_SUCCESS;
}

/* An aborted group left NVSHMEM initialised: its free and finalize are collective, and abort waits for no peer. */
static bool g_substrate_abandoned;

/* Free the group. `collective`: every rank is here, so NVSHMEM's collective free and shutdown may run; otherwise
 * (a rank failed or did not come) the symmetric memory and NVSHMEM are left as they are, as ep_group_abort does. */
static void free_group(ep_group_t g, bool collective) {
  if (!g) return;
  if (g->peer_bases_dev) cudaFree(g->peer_bases_dev);
  if (g->layout_scratch) cudaFree(g->layout_scratch);
  if (g->layout_done) cudaEventDestroy(g->layout_done);
  if (g->normal_state) cudaFree(g->normal_state);
  if (g->expert_sum) cudaFree(g->expert_sum);
  if (g->ll_state) cudaFree(g->ll_state);
  if (g->rank_mask) cudaFree(g->rank_mask);
  if (g->error_word) cudaFreeHost(g->error_word);
  if (g->control_stream) cudaStreamDestroy(g->control_stream);
  if (g->handle_stream) cudaStreamDestroy(g->handle_stream); /* frees queued on it still run */
  if (ep_tp_is_initialized()) {
    if (collective) {
      if (g->workspace) ep_tp_free(g->workspace);
      ep_tp_finalize();
    } else {
      g_substrate_abandoned = true;
    }
  }
  free(g->peer_bases);
  free(g);
}

ep_status_t ep_group_create(ep_group_t* group, const ep_unique_id_t* unique_id, int rank, int num_ranks,
                            int cuda_device, const ep_group_config_t* config) {
  const char* fn = "ep_group_create";
  if (!group) return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: group is NULL", fn);
  *group = NULL;
  if (!unique_id) return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: unique_id is NULL", fn);
  if (num_ranks < 1 || num_ranks > EP_MAX_RANKS)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: num_ranks is %d; it must be in [1, %d]", fn, num_ranks,
                   EP_MAX_RANKS);
  if (rank < 0 || rank >= num_ranks)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: rank is %d; it must be in [0, num_ranks=%d)", fn, rank,
                   num_ranks);
  if (cuda_device < 0)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: cuda_device is %d; it must be >= 0", fn, cuda_device);
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  if (config) cfg = *config;
  EP_TRY(check_config(&cfg, num_ranks));
  if (g_substrate_abandoned)
    return ep_fail(NULL, EP_STATUS_INVALID_USAGE,
                   "%s: a group of this process was aborted (ep_group_abort) and NVSHMEM, whose shutdown needs every "
                   "peer, is still initialised; a new group needs a new process",
                   fn);
  if (ep_tp_is_initialized())
    return ep_fail(NULL, EP_STATUS_INVALID_USAGE, "%s: a group already exists in this process; destroy it first",
                   fn);

  /* What can be checked before NVSHMEM starts (it may end the process on some failures). */
  int num_devices = 0;
  cudaError_t ce = cudaGetDeviceCount(&num_devices);
  if (ce != cudaSuccess || num_devices == 0)
    return ep_fail(NULL, EP_STATUS_UNSUPPORTED, "%s: no usable CUDA device on this machine (%s)", fn,
                   ce != cudaSuccess ? cudaGetErrorString(ce) : "device count is 0");
  if (cuda_device >= num_devices)
    return ep_fail(NULL, EP_STATUS_INVALID_ARGUMENT, "%s: cuda_device is %d but this machine has %d devices", fn,
                   cuda_device, num_devices);
  EP_CUDA_TRY(NULL, cudaSetDevice(cuda_device));
  struct cudaDeviceProp prop;
  EP_CUDA_TRY(NULL, cudaGetDeviceProperties(&prop, cuda_device));
  EP_TRY(ep_arch_check_device(fn, cuda_device, &prop));

  ep_group_t g = (ep_group_t)calloc(1, sizeof(*g));
  if (!g) return ep_fail(NULL, EP_STATUS_OUT_OF_MEMORY, "%s: host allocation of the group failed", fn);
  g->rank = rank;
  g->num_ranks = num_ranks;
  g->ranks_per_node = cfg.ranks_per_node ? cfg.ranks_per_node : num_ranks;
  g->num_nodes = num_ranks / g->ranks_per_node;
  g->node = rank / g->ranks_per_node;
  g->local_rank = rank % g->ranks_per_node;
  g->cuda_device = cuda_device;
  g->config = cfg;
  g->device_sms = usable_sms(prop.multiProcessorCount);
  if (cfg.max_sms > 0 && cfg.max_sms < g->device_sms) g->device_sms = cfg.max_sms;
  g->num_sms = cfg.num_sms ? cfg.num_sms : EP_DEFAULT_NUM_SMS;
  if (g->num_sms > g->device_sms) g->num_sms = g->device_sms;
  g->timeout_ns = (unsigned long long)(cfg.timeout_seconds * 1e9);
  g->normal_offset = ep_align_up(ep_check_workspace_bytes(num_ranks), 128);
  const ep_internode_regions_t regions = normal_regions_of(&cfg, num_ranks, g->ranks_per_node);
  g->normal_region = regions.normal;
  g->workspace_bytes = g->normal_offset + g->normal_region.total_bytes;
  if (cfg.ll_max_tokens_per_rank > 0) {
    g->ll_offset = ep_align_up(g->workspace_bytes, 128);
    g->ll_region = ep_ll_group_region(&cfg, num_ranks);
    g->workspace_bytes = g->ll_offset + g->ll_region.total_bytes;
  }
  if (g->num_nodes > 1) { /* one-node groups keep exactly the heap and offsets they had before */
    g->internode_offset = ep_align_up(g->workspace_bytes, 128);
    g->internode_region = regions.inter;
    g->workspace_bytes = g->internode_offset + g->internode_region.total_bytes;
    /* Test/debug knob, read once here: EP_INTERNODE_FORCE_PUT set to anything but "" or "0" sends every
     * cross-node transfer through NVSHMEM's put / put-with-signal calls (the NIC branch of internode.cu) even
     * when the rail peer is NVLink-mapped, so that branch runs on one host (NVSHMEM carries the puts over
     * NVLink itself). Slower; results are the same. */
    const char* force_put = getenv("EP_INTERNODE_FORCE_PUT");
    g->internode_force_put = force_put && force_put[0] && strcmp(force_put, "0") != 0;
  }
  g->heap_bytes = g->workspace_bytes + EP_HEAP_SLACK_BYTES;
  ep_status_t launchable = ep_check_launchable(g, prop.sharedMemPerBlockOptin);
  if (launchable != EP_STATUS_SUCCESS) {
    free_group(g, true);
    return launchable;
  }

  size_t free_bytes = 0, total_bytes = 0;
  ce = cudaMemGetInfo(&free_bytes, &total_bytes);
  /* The error word and the control stream come first: the config exchange's barrier uses them. */
  if (ce == cudaSuccess) ce = cudaStreamCreateWithFlags(&g->control_stream, cudaStreamNonBlocking);
  if (ce == cudaSuccess) ce = cudaHostAlloc((void**)&g->error_word, sizeof(ep_device_error_t), cudaHostAllocMapped);
  if (ce == cudaSuccess) {
    memset(g->error_word, 0, sizeof(ep_device_error_t));
    ce = cudaHostGetDevicePointer((void**)&g->error_word_dev, g->error_word, 0);
  }
  if (ce != cudaSuccess) {
    free_group(g, true);
    return ep_fail_cuda(NULL, ce, "ep_group_create: device memory info, error word, stream");
  }
  if (free_bytes < g->heap_bytes) {
    free_group(g, true);
    return ep_fail(NULL, EP_STATUS_OUT_OF_MEMORY,
                   "%s: the group needs a %zu-byte symmetric heap but device %d has %zu bytes free; lower the shape "
                   "hints in the config",
                   fn, g->heap_bytes, cuda_device, free_bytes);
  }

  char err[EP_ERROR_MESSAGE_BYTES];
  if (ep_tp_init(rank, num_ranks, unique_id->bytes, g->heap_bytes, err, sizeof(err)) != 0) {
    free_group(g, true);
    return ep_fail(NULL, EP_STATUS_SUBSTRATE_ERROR, "%s: %s", fn, err);
  }
  bool collective = true; /* false once a barrier timed out: a rank may be gone */
  ep_status_t st = check_config_agreement(g);
  if (st != EP_STATUS_SUCCESS) {
    collective = !g->failed;
    goto fail;
  }
  g->workspace = ep_tp_calloc(g->workspace_bytes);
  if (!g->workspace) {
    st = ep_fail(NULL, EP_STATUS_OUT_OF_MEMORY, "%s: symmetric allocation of %zu bytes failed", fn,
                 g->workspace_bytes);
    goto fail;
  }

  /* NVLink reachability: every rank of this node must be mapped, or the node is not one NVLink domain. */
  g->peer_bases = (void**)calloc((size_t)num_ranks, sizeof(void*));
  if (!g->peer_bases) {
    st = ep_fail(NULL, EP_STATUS_OUT_OF_MEMORY, "%s: host allocation failed", fn);
    goto fail;
  }
  for (int r = 0; r < num_ranks; ++r) {
    g->peer_bases[r] = ep_tp_peer_ptr(g->workspace, r);
    g->num_nvlink_peers += g->peer_bases[r] != NULL;
    if (!g->peer_bases[r] && r / g->ranks_per_node == g->node) {
      st = ep_fail(NULL, EP_STATUS_UNSUPPORTED,
                   "%s: rank %d and rank %d are in the same node (ranks_per_node=%d) but rank %d cannot reach rank "
                   "%d's memory over NVLink; lower config.ranks_per_node",
                   fn, rank, r, g->ranks_per_node, rank, r);
      goto fail;
    }
  }
  ce = cudaMalloc((void**)&g->peer_bases_dev, sizeof(void*) * (size_t)num_ranks);
  if (ce == cudaSuccess)
    ce = cudaMemcpy(g->peer_bases_dev, g->peer_bases, sizeof(void*) * (size_t)num_ranks, cudaMemcpyHostToDevice);
  if (ce == cudaSuccess) {
    /* From here fatal faults are published through the workspace's group fault word, and watched there. */
    g->error_word->group_fault = (unsigned long long*)g->workspace;
    g->error_word->peer_bases = g->peer_bases_dev;
    g->error_word->num_ranks = num_ranks;
    size_t scratch = ep_layout_scratch_ints(cfg.num_experts, num_ranks) * sizeof(int);
    ce = cudaMalloc((void**)&g->layout_scratch, scratch);
    if (ce == cudaSuccess) ce = cudaMemset(g->layout_scratch, 0, scratch);
    if (ce == cudaSuccess) ce = cudaEventCreateWithFlags(&g->layout_done, cudaEventDisableTiming);
  }
  if (ce == cudaSuccess) ce = cudaMalloc((void**)&g->normal_state, sizeof(ep_normal_state_t));
  if (ce == cudaSuccess) ce = cudaMemset(g->normal_state, 0, sizeof(ep_normal_state_t));
  if (ce == cudaSuccess) ce = cudaMalloc((void**)&g->expert_sum, sizeof(int) * (size_t)(cfg.num_experts / num_ranks));
  if (ce == cudaSuccess) ce = cudaMemset(g->expert_sum, 0, sizeof(int) * (size_t)(cfg.num_experts / num_ranks));
  if (ce == cudaSuccess) ce = cudaMalloc((void**)&g->ll_state, sizeof(ep_ll_state_t));
  if (ce == cudaSuccess) ce = cudaMemset(g->ll_state, 0, sizeof(ep_ll_state_t));
  if (ce == cudaSuccess) ce = cudaDeviceSynchronize();
  if (ce != cudaSuccess) {
    st = ep_fail_cuda(NULL, ce, "group buffer setup");
    goto fail;
  }
  st = ep_group_barrier(g, g->control_stream);
  if (st != EP_STATUS_SUCCESS) {
    collective = false;
    goto fail;
  }
  /* The mask comes after the barrier above: a rank that never comes to create fails it, it is not masked. */
  if (cfg.mask_failed_ranks) {
    ce = cudaMalloc((void**)&g->rank_mask, sizeof(int32_t) * (size_t)num_ranks);
    if (ce == cudaSuccess) ce = cudaMemset(g->rank_mask, 0, sizeof(int32_t) * (size_t)num_ranks);
    if (ce == cudaSuccess) ce = cudaDeviceSynchronize();
    if (ce != cudaSuccess) {
      st = ep_fail_cuda(NULL, ce, "ep_group_create: the rank mask");
      goto fail;
    }
  }
  if (!ep_live_add(g, EP_OBJECT_GROUP)) {
    st = ep_fail(NULL, EP_STATUS_OUT_OF_MEMORY, "%s: host allocation failed", fn);
    goto fail;
  }
  *group = g;
  return EP_STATUS_SUCCESS;

fail:
  free_group(g, collective);
  return st;
}

ep_status_t ep_group_destroy(ep_group_t group) {
  const char* fn = "ep_group_destroy";
  if (!group) return EP_STATUS_SUCCESS;
  EP_CALL_SCOPE();
  EP_TRY(ep_check_live_group(group, fn));
  EP_TRY(ep_take_group(group, fn)); /* not while another thread is inside a call on it */
  /* From here the group is gone for every caller: its handles are orphaned (they can still be destroyed). */
  ep_call_scope_release(group);
  ep_live_remove(group);
  ep_live_orphan_handles(group);
  cudaError_t ce = cudaSetDevice(group->cuda_device);
  if (ce == cudaSuccess) ce = cudaDeviceSynchronize(); /* bounded: every kernel's waits are */
  /* Peers may still read our buffers until everyone arrives at the barrier; NVSHMEM's free and shutdown after it
   * are collective. A group that failed anywhere skips both and is torn down here alone (as ep_group_abort): a
   * failed peer may never come. So does one whose barrier ran out of time. */
  ep_status_t st = EP_STATUS_SUCCESS;
  /* So does a group with a masked rank, masked before or by the barrier (it skips and masks ranks as LL calls do). */
  bool collective = ce == cudaSuccess && !group_failed_anywhere(group) && !ep_group_has_masked_rank(group);
  if (collective) {
    st = ep_group_barrier(group, group->control_stream);
    collective = st == EP_STATUS_SUCCESS && !ep_group_has_masked_rank(group);
  }
  char message[EP_ERROR_MESSAGE_BYTES];
  memcpy(message, group->last_error, sizeof(message));
  free_group(group, collective);
  if (ce != cudaSuccess) return ep_fail_cuda(NULL, ce, "ep_group_destroy: synchronising the device");
  if (st != EP_STATUS_SUCCESS)
    return ep_fail(NULL, st, "%s: %s (the group was freed on this rank alone; a new group needs a new process)", fn,
                   message);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_group_abort(ep_group_t group) {
  const char* fn = "ep_group_abort";
  if (!group) return EP_STATUS_SUCCESS;
  EP_CALL_SCOPE();
  EP_TRY(ep_check_live_group(group, fn));
  EP_TRY(ep_take_group(group, fn));
  ep_call_scope_release(group);
  ep_live_remove(group);
  ep_live_orphan_handles(group);
  /* The peers learn of it at once: a one-thread kernel on the group's own stream writes the abort into every
   * rank's group fault word, unless a fatal fault is there already (published by whoever met it). */
  if (group->error_word && group->error_word->group_fault && !fatal_fault_recorded(group) &&
      cudaSetDevice(group->cuda_device) == cudaSuccess)
    (void)ep_launch_publish(group->error_word_dev, EP_GROUP_FAULT_PACK(EP_FAULT_ABORTED, 0, group->rank, -1),
                            group->control_stream);
  (void)cudaGetLastError();
  /* Nothing here waits, for a peer or for the device: a kernel still waiting on a peer ends within the time budget
   * and may write the error word and the group's buffers until then. So device memory, the pinned error word and
   * NVSHMEM are left as they are (the process gets them back when it exits); only host memory is freed. */
  g_substrate_abandoned = true;
  free(group->peer_bases);
  free(group);
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_group_get_info(ep_group_t group, ep_group_info_t* info) {
  EP_TRY(ep_check_live_group(group, "ep_group_get_info"));
  if (!info) return ep_fail(group, EP_STATUS_INVALID_ARGUMENT, "ep_group_get_info: info is NULL");
  info->rank = group->rank;
  info->num_ranks = group->num_ranks;
  info->ranks_per_node = group->ranks_per_node;
  info->num_nodes = group->num_nodes;
  info->node = group->node;
  info->local_rank = group->local_rank;
  info->cuda_device = group->cuda_device;
  info->num_nvlink_peers = group->num_nvlink_peers;
  info->num_sms = group->num_sms;
  info->device_sms = group->device_sms;
  info->symmetric_heap_bytes = group->heap_bytes;
  return EP_STATUS_SUCCESS;
}

ep_status_t ep_group_check(ep_group_t group, cudaStream_t stream) {
  EP_CALL_SCOPE();
  EP_TRY(ep_enter_collective(group, "ep_group_check"));
  EP_CUDA_TRY(group, cudaSetDevice(group->cuda_device));
  ep_check_launch_t p;
  p.workspace = group->workspace;
  p.peer_bases = group->peer_bases_dev;
  p.rank = group->rank;
  p.num_ranks = group->num_ranks;
  p.epoch = ++group->check_epoch;
  p.timeout_ns = group->timeout_ns;
  p.error = group->error_word_dev;
  p.mask = NULL; /* the check is of every rank: a masked one times out there, a fatal fault */
  EP_CUDA_TRY(group, ep_launch_check(&p, stream));
  EP_CUDA_TRY(group, cudaStreamSynchronize(stream));
  EP_TRY(ep_enter_collective(group, "ep_group_check"));
  return EP_STATUS_SUCCESS;
}
