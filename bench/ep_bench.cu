/* ep_bench: the benchmark of ep, run as one process per GPU:
 *
 *   build/bin/ep_launch -n NUM_GPUS build/bin/ep_bench [--tokens N] [--hidden N] [--topk N] [--experts N]
 *                                                      [--iters N] [--warmup N] [--family LIST] [--seed N]
 *                                                      [--sms LIST] [--ranks-per-node N | --shapes LIST]
 *                                                      [--no-l2-flush]
 *
 * Rank 0 prints one fixed-width table (see bench/README.md). Exits 0 when every row ran and validated, 1 on any
 * error or failed check, 77 when there are fewer GPUs than ranks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "bench.h"
#include "timing.h"

extern "C" {
#include "ref/ep_ref.h"
}

static const struct {
  const char* name;
  bench_family_fn run;
} kFamilies[] = {
    {"layout", family_layout},       /* ep_get_dispatch_layout */
    {"nccl", family_nccl},           /* rows nccl-a2a and nccl-user: the baseline alone */
    {"intranode", family_intranode}, /* rows prepare and intranode: the normal path, next to nccl-user */
    {"ll", family_ll},               /* rows ll and ll-send: the low-latency path, next to nccl-user */
    {"ll-mask", family_ll_mask},     /* ll calls with no rank masked, then with the last one masked: the ratio */
};

static int g_rank = -1; /* for bench_die's message */

void bench_die(const char* file, int line, const char* call, const char* why, const char* detail) {
  fprintf(stderr, "ep_bench rank %d: %s:%d: %s failed: %s%s%s\n", g_rank, file, line, call, why,
          detail && *detail ? ": " : "", detail ? detail : "");
  exit(1);
}

/* ------------------------------------------------------------------------------------------------------------
 * Options
 * ------------------------------------------------------------------------------------------------------------ */
static void usage(FILE* f) {
  fprintf(f, "usage: ep_launch -n NUM_GPUS ep_bench [options]\n"
             "  --tokens N    tokens per rank (4096)\n"
             "  --hidden N    channels per token (7168)\n"
             "  --topk N      experts per token (8)\n"
             "  --experts N   experts in all, a multiple of the number of ranks (256)\n"
             "  --iters N     timed iterations (50)\n"
             "  --warmup N    untimed iterations before them (10)\n"
             "  --family L    comma list of: layout, intranode, ll, ll-mask, nccl (layout,intranode,ll)\n"
             "  --ll-tokens N tokens per rank of the ll family, at most --tokens (128)\n"
             "  --seed N      routing seed (default: EP_TEST_SEED, else from the clock)\n"
             "  --sms L       comma list of SMs per dispatch/combine call, one intranode row each (8,16,24,32);\n"
             "                --num-sms-list L is the same option\n"
             "  --ranks-per-node N  ranks per (virtual) node of the group: 0 = all ranks in one NVLink domain (0);\n"
             "                a divisor of the rank count smaller than it makes virtual nodes: internode rows\n"
             "  --shapes L    comma list of ranks-per-node values, one group each, created and destroyed in turn\n"
             "                (e.g. 0,2 on 4 GPUs: intranode EP4 rows, then 2x2 internode rows, then the ratios)\n"
             "  --pool-mib N  the normal path's symmetric regions as a pool of N MiB (config.normal_region_bytes;\n"
             "                0 = sized for --tokens): a call of more tokens than the pool holds runs in rounds (0)\n"
             "  --no-l2-flush do not empty L2 before each timed operation (warm-cache timings, for diagnosis: the\n"
             "                published figures of the field, ours included, are taken with the flush)\n");
}

static long parse_int(const char* name, const char* value, long min, long max) {
  char* end = NULL;
  long v = value ? strtol(value, &end, 0) : 0;
  if (!value || *value == '\0' || *end != '\0' || v < min || v > max) {
    fprintf(stderr, "ep_bench: %s needs an integer in [%ld, %ld], got '%s'\n", name, min, max, value ? value : "");
    exit(1);
  }
  return v;
}

/* "0,2" -> o->shapes: ranks_per_node values, each >= 0 (checked against the rank count once it is known). */
static void parse_shapes(const char* name, const char* value, bench_options_t* o) {
  if (!value || *value == '\0') {
    fprintf(stderr, "ep_bench: %s needs a comma list of ranks-per-node values\n", name);
    exit(1);
  }
  std::vector<char> list(value, value + strlen(value) + 1);
  o->num_shapes = 0;
  for (char *save = NULL, *item = strtok_r(list.data(), ",", &save); item; item = strtok_r(NULL, ",", &save)) {
    if (o->num_shapes == BENCH_MAX_SHAPES) {
      fprintf(stderr, "ep_bench: %s takes at most %d entries\n", name, BENCH_MAX_SHAPES);
      exit(1);
    }
    o->shapes[o->num_shapes++] = (int)parse_int(name, item, 0, 1 << 16);
  }
  if (o->num_shapes == 0) {
    fprintf(stderr, "ep_bench: %s needs a comma list of ranks-per-node values, got '%s'\n", name, value);
    exit(1);
  }
}

/* Every entry of --shapes / --ranks-per-node must be 0 (one domain) or divide the rank count. */
static void check_shapes(const bench_options_t* o, int num_ranks) {
  for (int i = 0; i < o->num_shapes; ++i) {
    const int rpn = o->shapes[i];
    if (rpn == 0 || (rpn <= num_ranks && num_ranks % rpn == 0)) continue;
    char divisors[256] = "";
    size_t len = 0;
    for (int d = 1; d <= num_ranks && len + 16 < sizeof(divisors); ++d)
      if (num_ranks % d == 0) len += (size_t)snprintf(divisors + len, sizeof(divisors) - len, "%s%d", len ? ", " : "", d);
    fprintf(stderr,
            "ep_bench: --ranks-per-node %d does not divide the %d ranks: use 0 (all ranks in one NVLink domain) "
            "or one of %s\n",
            rpn, num_ranks, divisors);
    exit(1);
  }
}

/* "8,16,24,32" -> o->sms; each entry in [1, 1024] (the group's limit), at most BENCH_MAX_SMS_LIST of them. */
static void parse_sms_list(const char* name, const char* value, bench_options_t* o) {
  if (!value || *value == '\0') {
    fprintf(stderr, "ep_bench: %s needs a comma list of SM counts\n", name);
    exit(1);
  }
  std::vector<char> list(value, value + strlen(value) + 1);
  o->num_sms_list = 0;
  for (char *save = NULL, *item = strtok_r(list.data(), ",", &save); item; item = strtok_r(NULL, ",", &save)) {
    if (o->num_sms_list == BENCH_MAX_SMS_LIST) {
      fprintf(stderr, "ep_bench: %s takes at most %d entries\n", name, BENCH_MAX_SMS_LIST);
      exit(1);
    }
    o->sms[o->num_sms_list++] = (int)parse_int(name, item, 1, 1024);
  }
  if (o->num_sms_list == 0) {
    fprintf(stderr, "ep_bench: %s needs a comma list of SM counts, got '%s'\n", name, value);
    exit(1);
  }
}

static bench_options_t parse_options(int argc, char** argv) {
  bench_options_t o;
  memset(&o, 0, sizeof(o));
  o.tokens = 4096;
  o.hidden = 7168;
  o.topk = 8;
  o.experts = 256;
  o.iters = 50;
  o.warmup = 10;
  o.family = "layout,intranode,ll";
  o.ll_tokens = 128;
  parse_sms_list("--sms", "8,16,24,32", &o);
  o.num_shapes = 1; /* shapes[0] = 0: one NVLink domain */
  o.l2_flush = 1;
  for (int i = 1; i < argc; ++i) {
    const char* arg = argv[i];
    if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
      usage(stdout);
      exit(0);
    }
    if (!strcmp(arg, "--no-l2-flush")) {
      o.l2_flush = 0;
      continue;
    }
    /* Both "--name value" and "--name=value". */
    char name[64];
    const char* value;
    const char* eq = strchr(arg, '=');
    if (eq && (size_t)(eq - arg) < sizeof(name)) {
      memcpy(name, arg, eq - arg);
      name[eq - arg] = '\0';
      value = eq + 1;
    } else {
      snprintf(name, sizeof(name), "%s", arg);
      value = i + 1 < argc ? argv[++i] : NULL;
    }
    if (!strcmp(name, "--tokens")) o.tokens = (int)parse_int(name, value, 0, 1 << 20);
    else if (!strcmp(name, "--hidden")) o.hidden = (int)parse_int(name, value, 1, 1 << 16);
    else if (!strcmp(name, "--topk")) o.topk = (int)parse_int(name, value, 1, 32);
    else if (!strcmp(name, "--experts")) o.experts = (int)parse_int(name, value, 1, 1 << 16);
    else if (!strcmp(name, "--iters")) o.iters = (int)parse_int(name, value, 1, 100000);
    else if (!strcmp(name, "--warmup")) o.warmup = (int)parse_int(name, value, 0, 100000);
    else if (!strcmp(name, "--family") && value) o.family = value;
    else if (!strcmp(name, "--pool-mib")) o.pool_bytes = (size_t)parse_int(name, value, 0, 1 << 20) << 20;
    else if (!strcmp(name, "--ll-tokens")) o.ll_tokens = (int)parse_int(name, value, 1, 8192);
    else if (!strcmp(name, "--sms") || !strcmp(name, "--num-sms-list")) parse_sms_list(name, value, &o);
    else if (!strcmp(name, "--ranks-per-node")) {
      o.shapes[0] = (int)parse_int(name, value, 0, 1 << 16);
      o.num_shapes = 1;
    } else if (!strcmp(name, "--shapes")) parse_shapes(name, value, &o);
    else if (!strcmp(name, "--seed") && value) {
      char* end = NULL;
      o.seed = strtoull(value, &end, 0);
      if (*value == '\0' || *end != '\0') {
        fprintf(stderr, "ep_bench: --seed needs an integer, got '%s'\n", value);
        exit(1);
      }
      o.seed_given = 1;
    } else {
      fprintf(stderr, "ep_bench: unknown option or missing value: %s\n", arg);
      usage(stderr);
      exit(1);
    }
  }
  o.max_sms = 0;
  for (int i = 0; i < o.num_sms_list; ++i)
    if (o.sms[i] > o.max_sms) o.max_sms = o.sms[i];
  if (o.topk > o.experts) {
    fprintf(stderr, "ep_bench: --topk %d exceeds --experts %d\n", o.topk, o.experts);
    exit(1);
  }
  return o;
}

/* ------------------------------------------------------------------------------------------------------------
 * Routing, as DeepEP's tests draw it: scores = |randn| + 1 per (token, expert), the top-k distinct experts of
 * each token. Rank r's routing comes from its own stream of the shared seed, so every rank can draw all of them.
 * ------------------------------------------------------------------------------------------------------------ */
static void draw_routing(uint64_t seed, int rank, int tokens, int experts, int topk, int64_t* topk_idx) {
  uint64_t start = seed + 0x632be59bd9b4e019ull * (uint64_t)(rank + 1);
  uint64_t state = harness_rand(&start);
  std::vector<double> score(experts + 1), best_score(topk);
  std::vector<int> best(topk);
  for (int t = 0; t < tokens; ++t) {
    for (int e = 0; e < experts; e += 2) { /* Box-Muller: two normals per pair of uniforms */
      const double radius = sqrt(-2.0 * log(1.0 - harness_uniform(&state)));
      const double angle = 6.283185307179586 * harness_uniform(&state);
      score[e] = fabs(radius * cos(angle)) + 1.0;
      score[e + 1] = fabs(radius * sin(angle)) + 1.0;
    }
    int n = 0; /* best[0..n) sorted by descending score */
    for (int e = 0; e < experts; ++e) {
      if (n == topk && score[e] <= best_score[n - 1]) continue;
      int i = n < topk ? n++ : n - 1;
      for (; i > 0 && best_score[i - 1] < score[e]; --i) {
        best_score[i] = best_score[i - 1];
        best[i] = best[i - 1];
      }
      best_score[i] = score[e];
      best[i] = e;
    }
    for (int k = 0; k < topk; ++k) topk_idx[(size_t)t * topk + k] = best[k];
  }
}

__global__ void fill_tokens(__nv_bfloat16* x, int rank, int tokens, int hidden) {
  const size_t n = (size_t)tokens * hidden;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    x[i] = __float2bfloat16_rn(bench_value(rank, (int)(i / hidden), (int)(i % hidden)));
}

/* ------------------------------------------------------------------------------------------------------------
 * Setup and teardown
 * ------------------------------------------------------------------------------------------------------------ */
/* What every group of the run shares: the seed, the NCCL communicator, the stream, the timing buffers and the
 * routing of every rank (none of which depends on the group's shape). */
static void setup_common(bench_t* b) {
  const bench_options_t* o = &b->opt;
  if (o->experts % b->num_ranks != 0) {
    fprintf(stderr, "ep_bench: --experts %d is not a multiple of the %d ranks\n", o->experts, b->num_ranks);
    exit(1);
  }
  if (!o->seed_given) b->opt.seed = harness_seed(&b->h, "bench");

  if (harness_shares_gpu(&b->h)) {
    /* NCCL refuses two ranks on one GPU: no baseline columns, and the ranks line up on the host. */
    b->comm = NULL;
    bench_line_up_init(b);
  } else {
    ncclUniqueId nccl_id;
    memset(&nccl_id, 0, sizeof(nccl_id));
    if (b->rank == 0) NCCL_OK(ncclGetUniqueId(&nccl_id));
    if (harness_share(&b->h, "nccl_id", &nccl_id, sizeof(nccl_id), 0) != 0)
      bench_die(__FILE__, __LINE__, "harness_share(nccl_id)", "no NCCL id from rank 0", "");
    NCCL_OK(ncclCommInitRank(&b->comm, b->num_ranks, nccl_id, b->rank));
  }

  CUDA_OK(cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking));
  CUDA_OK(cudaMalloc(&b->flush_buf, BENCH_FLUSH_BYTES));
  CUDA_OK(cudaMalloc(&b->barrier_buf, sizeof(float)));
  CUDA_OK(cudaMemsetAsync(b->barrier_buf, 0, sizeof(float), b->stream));

  /* is_token_in_rank does not depend on how ranks form nodes: the layout is drawn with one node. */
  const int R = b->num_ranks, T = o->tokens;
  b->topk_idx = (int64_t**)calloc(R, sizeof(int64_t*));
  b->is_token_in_rank = (uint8_t**)calloc(R, sizeof(uint8_t*));
  if (!b->topk_idx || !b->is_token_in_rank) bench_die(__FILE__, __LINE__, "calloc", "out of host memory", "");
  for (int r = 0; r < R; ++r) {
    b->topk_idx[r] = (int64_t*)malloc(((size_t)T * o->topk + 1) * sizeof(int64_t));
    b->is_token_in_rank[r] = (uint8_t*)malloc((size_t)T * R + 1);
    if (!b->topk_idx[r] || !b->is_token_in_rank[r]) bench_die(__FILE__, __LINE__, "malloc", "out of host memory", "");
    draw_routing(b->opt.seed, r, T, o->experts, o->topk, b->topk_idx[r]);
    int bad_token = -1;
    if (ep_ref_layout(R, R, o->experts, T, o->topk, b->topk_idx[r], NULL, NULL, NULL, b->is_token_in_rank[r],
                      &bad_token) != 0)
      bench_die(__FILE__, __LINE__, "ep_ref_layout", "the reference rejected the routing", "");
  }
  CUDA_OK(cudaMalloc(&b->d_topk_idx, ((size_t)T * o->topk + 1) * sizeof(int64_t)));
  CUDA_OK(cudaMemcpyAsync(b->d_topk_idx, b->topk_idx[b->rank], (size_t)T * o->topk * sizeof(int64_t),
                          cudaMemcpyHostToDevice, b->stream));
  CUDA_OK(cudaMalloc(&b->d_x, ((size_t)T + 1) * o->hidden * sizeof(__nv_bfloat16)));
  if (T > 0) {
    fill_tokens<<<1024, 256, 0, b->stream>>>(b->d_x, b->rank, T, o->hidden);
    LAUNCH_OK();
  }
  CUDA_OK(cudaStreamSynchronize(b->stream));

  if (b->rank == 0) {
    cudaDeviceProp prop;
    CUDA_OK(cudaGetDeviceProperties(&prop, b->h.cuda_device));
    int nccl_version = 0;
    NCCL_OK(ncclGetVersion(&nccl_version));
    char nccl[96];
    if (b->comm) snprintf(nccl, sizeof(nccl), "NCCL %d", nccl_version);
    else snprintf(nccl, sizeof(nccl), "ranks share %d GPU(s): no NCCL baseline", b->h.num_devices);
    printf("ep_bench: %d ranks on %s, %s, seed 0x%016llx, %d warm-up + %d timed iterations (median), "
           "slowest rank shown%s\n",
           R, prop.name, nccl, (unsigned long long)b->opt.seed, o->warmup, o->iters,
           o->l2_flush ? "" : "; L2 NOT flushed (--no-l2-flush): warm-cache timings");
  }
}

/* The group of shape opt.shapes[index] (its ranks_per_node). One group at a time: NVSHMEM allows one per
 * process, so each is destroyed (teardown_group) before the next is created. */
static void setup_group(bench_t* b, int index) {
  const bench_options_t* o = &b->opt;
  ep_group_config_t config = EP_GROUP_CONFIG_INIT;
  config.ranks_per_node = o->shapes[index];
  config.num_experts = o->experts;
  config.hidden = o->hidden;
  config.max_tokens_per_rank = o->tokens > 0 ? o->tokens : 1;
  config.max_topk = o->topk;
  config.normal_region_bytes = o->pool_bytes;
  /* The group's num_sms bounds what one call may ask for (each call passes its own num_sms): cover the largest
   * entry of --sms. */
  config.num_sms = o->max_sms;
  /* The low-latency buffer only when the ll family runs (it is large: see ep_ll_buffer_size_hint). */
  if (strstr(o->family, "ll")) config.ll_max_tokens_per_rank = o->ll_tokens < o->tokens ? o->ll_tokens : o->tokens;
  /* The rank mask only when ll-mask runs: every family of the run then shares the masking group. */
  if (strstr(o->family, "ll-mask")) config.mask_failed_ranks = 1;
  EP_OK(NULL, harness_group_create(&b->h, &config, &b->group));
  EP_OK(b->group, ep_group_get_info(b->group, &b->info));
  b->shape_index = index;
  b->ranks_per_node = b->info.ranks_per_node > 0 ? b->info.ranks_per_node : b->num_ranks;
  b->num_nodes = b->num_ranks / b->ranks_per_node;
  b->header_printed = 0;
  if (b->rank == 0) {
    printf("\nshape %dx%d (nodes x ranks per node; --ranks-per-node %d): %s\n", b->num_nodes, b->ranks_per_node,
           o->shapes[index],
           b->num_nodes > 1 ? "virtual nodes, the normal path runs internode (rows `internode`)"
                            : "one NVLink domain, the normal path runs intranode (rows `intranode`)");
    if (o->pool_bytes)
      printf("normal regions: a pool of %zu MiB (--pool-mib), calls of more tokens than it holds run in rounds; "
             "symmetric heap %.1f MiB\n", o->pool_bytes >> 20, b->info.symmetric_heap_bytes / 1048576.0);
    else
      printf("normal regions: sized for %d tokens a rank; symmetric heap %.1f MiB\n", config.max_tokens_per_rank,
             b->info.symmetric_heap_bytes / 1048576.0);
    fflush(stdout);
  }
}

static void teardown_group(bench_t* b) {
  CUDA_OK(cudaStreamSynchronize(b->stream));
  EP_OK(b->group, ep_group_destroy(b->group));
  b->group = NULL;
}

static void teardown_common(bench_t* b) {
  CUDA_OK(cudaStreamSynchronize(b->stream));
  for (int r = 0; r < b->num_ranks; ++r) {
    free(b->topk_idx[r]);
    free(b->is_token_in_rank[r]);
  }
  free(b->topk_idx);
  free(b->is_token_in_rank);
  CUDA_OK(cudaFree(b->d_topk_idx));
  CUDA_OK(cudaFree(b->d_x));
  CUDA_OK(cudaFree(b->flush_buf));
  CUDA_OK(cudaFree(b->barrier_buf));
  CUDA_OK(cudaStreamDestroy(b->stream));
  if (b->comm) NCCL_OK(ncclCommDestroy(b->comm));
  bench_line_up_fini(b);
}

/* ------------------------------------------------------------------------------------------------------------
 * The table
 * ------------------------------------------------------------------------------------------------------------ */
bench_row_t bench_row_make(const char* family, const char* dtype) {
  bench_row_t row;
  memset(&row, 0, sizeof(row));
  row.family = family;
  row.dtype = dtype;
  row.sms = -1;
  row.dispatch_us = row.combine_us = -1;
  row.baseline_dispatch_us = row.baseline_combine_us = -1;
  return row;
}

/* "-", "a" or "a/b" with `decimals` digits: the dispatch value, then the combine one where the row has it. */
static const char* pair(char* buf, size_t len, int decimals, double a, double b) {
  if (a < 0 && b < 0) snprintf(buf, len, "-");
  else if (b < 0) snprintf(buf, len, "%.*f", decimals, a);
  else if (a < 0) snprintf(buf, len, "-/%.*f", decimals, b);
  else snprintf(buf, len, "%.*f/%.*f", decimals, a, decimals, b);
  return buf;
}

/* The fields of a row that the ranks swap. */
enum {
  F_DISPATCH, F_COMBINE, F_BYTES, F_BASE_DISPATCH, F_BASE_COMBINE, F_VALIDATED, F_MISMATCHES, F_COMBINE_BYTES,
  F_RDMA_BYTES, F_RDMA_COMBINE_BYTES, F_COUNT
};

/* Sums up every rank's row (`all`: [R][F_COUNT]) into one line, printed by rank 0. */
static void print_row(bench_t* b, const bench_row_t* row, const double* all) {
  const int R = b->num_ranks;
  /* The slowest rank's median of each time; GB/s are that rank's bytes over that rank's time. */
  int slow[F_COUNT] = {0};
  int validated = 1;
  double mismatches = 0;
  for (int r = 0; r < R; ++r) {
    const double* v = &all[(size_t)r * F_COUNT];
    for (int f = F_DISPATCH; f <= F_BASE_COMBINE; ++f)
      if (v[f] > all[(size_t)slow[f] * F_COUNT + f]) slow[f] = r;
    validated &= v[F_VALIDATED] != 0;
    mismatches += v[F_MISMATCHES];
  }
  const double* slowest_dispatch = &all[(size_t)slow[F_DISPATCH] * F_COUNT];
  const double* slowest_combine = &all[(size_t)slow[F_COMBINE] * F_COUNT];
  const double dispatch_us = slowest_dispatch[F_DISPATCH], combine_us = slowest_combine[F_COMBINE];
  const double base_dispatch_us = all[(size_t)slow[F_BASE_DISPATCH] * F_COUNT + F_BASE_DISPATCH];
  const double base_combine_us = all[(size_t)slow[F_BASE_COMBINE] * F_COUNT + F_BASE_COMBINE];
  const double dispatch_gbs = dispatch_us > 0 && slowest_dispatch[F_BYTES] > 0
                                  ? slowest_dispatch[F_BYTES] / (dispatch_us * 1e3) : -1;
  const double combine_gbs = combine_us > 0 && slowest_combine[F_COMBINE_BYTES] > 0
                                 ? slowest_combine[F_COMBINE_BYTES] / (combine_us * 1e3) : -1;
  /* Internode rows: DeepEP's "RDMA" count of the same rank over the same time. */
  const double rdma_dispatch_gbs = dispatch_us > 0 && slowest_dispatch[F_RDMA_BYTES] > 0
                                       ? slowest_dispatch[F_RDMA_BYTES] / (dispatch_us * 1e3) : -1;
  const double rdma_combine_gbs = combine_us > 0 && slowest_combine[F_RDMA_COMBINE_BYTES] > 0
                                      ? slowest_combine[F_RDMA_COMBINE_BYTES] / (combine_us * 1e3) : -1;
  const double speedup_dispatch = dispatch_us > 0 && base_dispatch_us > 0 ? base_dispatch_us / dispatch_us : -1;
  const double speedup_combine = combine_us > 0 && base_combine_us > 0 ? base_combine_us / combine_us : -1;
  const char* check = mismatches > 0 ? "FAIL" : validated ? "ok" : "-";
  if (mismatches > 0 || !validated) b->failed_rows++;
  b->last_dispatch_us = dispatch_us;
  b->last_combine_us = combine_us;
  if (b->rank != 0) return;

  /* The normal path's rows, for the ratio lines at the end (internode against one domain, same dtype and SMs). */
  if (row->sms >= 0 && (!strcmp(row->family, "intranode") || !strcmp(row->family, "internode")) &&
      b->num_records < BENCH_MAX_RECORDS) {
    bench_record_t* rec = &b->records[b->num_records++];
    rec->num_nodes = b->num_nodes;
    rec->ranks_per_node = b->ranks_per_node;
    rec->dtype = row->dtype;
    rec->sms = row->sms;
    rec->dispatch_gbs = dispatch_gbs;
    rec->combine_gbs = combine_gbs;
    rec->ok = mismatches == 0 && validated;
  }

  const char* format = "%-10s %5s %5s %6s %6s %4s %7s %-5s %4s %11s %10s %11s %11s %15s %11s %-5s %s\n";
  if (!b->header_printed) {
    printf(format, "family", "ranks", "shape", "tokens", "hidden", "topk", "experts", "dtype", "SMs", "dispatch_us",
           "combine_us", "GB/s", "rdma_GB/s", "baseline_us", "speedup", "check", "slowest");
    if (b->num_nodes > 1) {
      if (b->info.num_nvlink_peers >= R)
        printf("NVLink-emulated: this host has no NIC; the RDMA leg runs over NVLink through NVSHMEM "
               "(internode rows: GB/s = DeepEP's NVL count, rdma_GB/s = its RDMA count, over the same times)\n");
      else
        printf("internode: %d of %d ranks are NVLink peers; the RDMA leg runs over NVSHMEM's network transport "
               "(GB/s = DeepEP's NVL count, rdma_GB/s = its RDMA count)\n",
               b->info.num_nvlink_peers, R);
    }
    b->header_printed = 1;
  }
  char ranks[16], shape[32], tokens[16], hidden[16], topk[16], experts[16], sms[16] = "-";
  char disp[32], comb[32], gbs[64], rdma_gbs[64], base[64], speed[64], slowest[32];
  snprintf(ranks, sizeof(ranks), "%d", R);
  snprintf(shape, sizeof(shape), "%dx%d", b->num_nodes, b->ranks_per_node);
  snprintf(tokens, sizeof(tokens), "%d", row->tokens > 0 ? row->tokens : b->opt.tokens);
  snprintf(hidden, sizeof(hidden), "%d", b->opt.hidden);
  snprintf(topk, sizeof(topk), "%d", b->opt.topk);
  snprintf(experts, sizeof(experts), "%d", b->opt.experts);
  if (row->sms >= 0) snprintf(sms, sizeof(sms), "%d", row->sms);
  pair(disp, sizeof(disp), 1, dispatch_us, -1);
  pair(comb, sizeof(comb), 1, combine_us, -1);
  pair(gbs, sizeof(gbs), 1, dispatch_gbs, combine_gbs);
  pair(rdma_gbs, sizeof(rdma_gbs), 1, rdma_dispatch_gbs, rdma_combine_gbs);
  pair(base, sizeof(base), 1, base_dispatch_us, base_combine_us);
  pair(speed, sizeof(speed), 2, speedup_dispatch, speedup_combine);
  if (dispatch_us >= 0 && combine_us >= 0) snprintf(slowest, sizeof(slowest), "r%d/r%d", slow[F_DISPATCH], slow[F_COMBINE]);
  else if (combine_us >= 0) snprintf(slowest, sizeof(slowest), "-/r%d", slow[F_COMBINE]);
  else if (dispatch_us >= 0) snprintf(slowest, sizeof(slowest), "r%d", slow[F_DISPATCH]);
  else snprintf(slowest, sizeof(slowest), "-");
  printf(format, row->family, ranks, shape, tokens, hidden, topk, experts, row->dtype, sms, disp, comb, gbs, rdma_gbs,
         base, speed, check, slowest);
  fflush(stdout);
}

void bench_report_row(bench_t* b, const bench_row_t* row) {
  const double mine[F_COUNT] = {row->dispatch_us, row->combine_us, row->bytes, row->baseline_dispatch_us,
                                row->baseline_combine_us, (double)row->validated, (double)row->mismatches,
                                row->combine_bytes > 0 ? row->combine_bytes : row->bytes, row->rdma_bytes,
                                row->rdma_combine_bytes > 0 ? row->rdma_combine_bytes : row->rdma_bytes};
  std::vector<double> all((size_t)b->num_ranks * F_COUNT);
  const int report = b->reports++;
  if (!b->comm) { /* each rank's figures through a file of the launch folder */
    for (int r = 0; r < b->num_ranks; ++r) {
      char name[64];
      snprintf(name, sizeof(name), "row.%d.%d", report, r);
      double* theirs = &all[(size_t)r * F_COUNT];
      if (r == b->rank) memcpy(theirs, mine, sizeof(mine));
      if (harness_share(&b->h, name, theirs, sizeof(mine), r) != 0)
        bench_die(__FILE__, __LINE__, "harness_share", "a rank's row figures did not arrive", name);
    }
    print_row(b, row, all.data());
    return;
  }
  double *d_mine, *d_all;
  CUDA_OK(cudaMalloc(&d_mine, sizeof(mine)));
  CUDA_OK(cudaMalloc(&d_all, all.size() * sizeof(double)));
  CUDA_OK(cudaMemcpyAsync(d_mine, mine, sizeof(mine), cudaMemcpyHostToDevice, b->stream));
  NCCL_OK(ncclAllGather(d_mine, d_all, F_COUNT, ncclDouble, b->comm, b->stream));
  CUDA_OK(cudaMemcpyAsync(all.data(), d_all, all.size() * sizeof(double), cudaMemcpyDeviceToHost, b->stream));
  CUDA_OK(cudaStreamSynchronize(b->stream));
  CUDA_OK(cudaFree(d_mine));
  CUDA_OK(cudaFree(d_all));
  print_row(b, row, all.data());
}

/* Rank 0: for every internode row, the ratio of its GB/s to that of the one-domain row of the same dtype and SM
 * count from the first one-domain shape of the run (the internode path aims at >= 0.70). The NVL byte count is the
 * same for both paths (the same rows are received), so each ratio is the one-domain time over the internode time. */
static void print_ratios(const bench_t* b) {
  if (b->rank != 0) return;
  int base_rpn = -1;
  for (int i = 0; i < b->num_records && base_rpn < 0; ++i)
    if (b->records[i].num_nodes == 1) base_rpn = b->records[i].ranks_per_node;
  int printed = 0;
  for (int i = 0; i < b->num_records; ++i) {
    const bench_record_t* in = &b->records[i];
    if (in->num_nodes == 1) continue;
    const bench_record_t* one = NULL;
    for (int j = 0; j < b->num_records && !one; ++j) {
      const bench_record_t* r = &b->records[j];
      if (r->num_nodes == 1 && r->ranks_per_node == base_rpn && r->sms == in->sms && !strcmp(r->dtype, in->dtype))
        one = r;
    }
    if (!one) continue;
    if (!printed) printf("\n");
    printed = 1;
    const double rd = in->dispatch_gbs > 0 && one->dispatch_gbs > 0 ? in->dispatch_gbs / one->dispatch_gbs : -1;
    const double rc = in->combine_gbs > 0 && one->combine_gbs > 0 ? in->combine_gbs / one->combine_gbs : -1;
    printf("ratio internode %dx%d / intranode %dx%d, %-4s %3d SMs: dispatch %5.3f, combine %5.3f "
           "(GB/s, NVL count; goal >= 0.70)%s\n",
           in->num_nodes, in->ranks_per_node, one->num_nodes, one->ranks_per_node, in->dtype, in->sms, rd, rc,
           in->ok && one->ok ? "" : " [a row failed its check]");
  }
  if (printed) fflush(stdout);
}

/* ------------------------------------------------------------------------------------------------------------
 * main
 * ------------------------------------------------------------------------------------------------------------ */
int main(int argc, char** argv) {
  static bench_t bench;
  bench_t* b = &bench;
  b->opt = parse_options(argc, argv);

  /* Check the family list before any GPU work. */
  std::vector<bench_family_fn> families;
  std::vector<char> list(b->opt.family, b->opt.family + strlen(b->opt.family) + 1);
  for (char *save = NULL, *name = strtok_r(list.data(), ",", &save); name; name = strtok_r(NULL, ",", &save)) {
    size_t f = 0;
    while (f < sizeof(kFamilies) / sizeof(kFamilies[0]) && strcmp(kFamilies[f].name, name)) ++f;
    if (f == sizeof(kFamilies) / sizeof(kFamilies[0])) {
      fprintf(stderr, "ep_bench: unknown family '%s'\n", name);
      usage(stderr);
      return 1;
    }
    families.push_back(kFamilies[f].run);
  }

  const int init = harness_init(&b->h);
  if (init != 0) return init; /* 77: too few GPUs (a skip) */
  b->rank = g_rank = b->h.rank;
  b->num_ranks = b->h.num_ranks;

  check_shapes(&b->opt, b->num_ranks);

  setup_common(b);
  for (int shape = 0; shape < b->opt.num_shapes; ++shape) {
    setup_group(b, shape);
    for (bench_family_fn run : families) {
      /* The NCCL rows do not depend on the group's shape: with the first group only. */
      if (run == family_nccl && shape > 0) continue;
      run(b);
    }
    teardown_group(b);
  }
  print_ratios(b);
  teardown_common(b);
  return b->failed_rows ? 1 : 0;
}
