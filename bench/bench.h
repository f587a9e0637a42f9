/* bench.h: what the parts of ep_bench share: the options, the run's context (group, NCCL communicator, stream,
 * routing of every rank), error checks that end the run, the input values, and the table rows. */
#ifndef EP_BENCH_H
#define EP_BENCH_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include "ep.h"
#include "gpu/harness.h"

#define BENCH_MAX_SMS_LIST 32 /* entries of --sms */
#define BENCH_MAX_SHAPES 8     /* entries of --shapes */
#define BENCH_MAX_RECORDS 256  /* normal-path rows kept for the ratio lines at the end */

typedef struct bench_options {
  int tokens;          /* per rank */
  int hidden;
  int topk;
  int experts;
  int iters;           /* timed iterations */
  int warmup;          /* untimed iterations before them */
  const char* family;  /* comma list of families to run */
  uint64_t seed;
  int seed_given;
  int sms[BENCH_MAX_SMS_LIST]; /* per-call num_sms of the dispatch/combine rows, in order */
  int num_sms_list;            /* entries of sms[] */
  int max_sms;                 /* the largest of them: the group's config.num_sms */
  int ll_tokens;               /* tokens per rank of the ll family (its max_tokens_per_rank); <= tokens */
  int shapes[BENCH_MAX_SHAPES]; /* ranks_per_node of each group, in order (0 = all ranks in one NVLink domain);
                                   --ranks-per-node N is --shapes N */
  int num_shapes;
  int l2_flush;                /* 1 (default): empty L2 before each timed operation; 0: --no-l2-flush */
  size_t pool_bytes;           /* config.normal_region_bytes (--pool-mib): 0 = the normal regions sized from the
                                  shape, else a pool whose larger calls run in rounds */
} bench_options_t;

/* GB/s of one normal-path row (intranode or internode), kept by rank 0 for the ratio lines printed at the end. */
typedef struct bench_record {
  int num_nodes, ranks_per_node; /* the group's shape */
  const char* dtype;
  int sms;
  double dispatch_gbs, combine_gbs; /* DeepEP's NVL count (received rows), the same bytes for both paths */
  int ok;                           /* the row's check passed */
} bench_record_t;

typedef struct bench {
  bench_options_t opt;
  harness_t h;
  int rank, num_ranks;
  ep_group_t group;
  ep_group_info_t info;
  int ranks_per_node, num_nodes; /* the current group's shape (ranks_per_node = num_ranks for one domain) */
  int shape_index;               /* entry of opt.shapes the current group comes from */
  ncclComm_t comm;               /* NULL where ranks share a GPU: NCCL takes one rank per GPU (no baseline then) */
  int* line_up_word;             /* without NCCL: a counter in a file every rank maps (bench_time_phases) */
  int line_ups;                  /* line-ups so far (each one adds num_ranks to the counter) */
  int reports;                   /* rows reported so far (names the files of their exchange without NCCL) */
  cudaStream_t stream;
  void* flush_buf;              /* BENCH_FLUSH_BYTES, overwritten before every timed operation to empty L2 */
  float* barrier_buf;           /* one float, all-reduced to line the ranks up before each timed operation */
  /* Routing of every rank (each rank generates all of them from the shared seed). */
  int64_t** topk_idx;           /* [R] -> [tokens, topk] host */
  uint8_t** is_token_in_rank;   /* [R] -> [tokens, R] host, from the reference layout */
  int64_t* d_topk_idx;          /* [tokens, topk] device: this rank's */
  __nv_bfloat16* d_x;           /* [tokens, hidden] device: this rank's tokens, bench_value(rank, t, c) */
  int failed_rows;              /* rows whose check failed */
  double last_dispatch_us, last_combine_us; /* the last reported row's slowest-rank medians, on every rank */
  int header_printed;           /* for the current group: each group's rows get a header of their own */
  bench_record_t records[BENCH_MAX_RECORDS];
  int num_records;
} bench_t;

#define BENCH_FLUSH_BYTES ((size_t)256 << 20)

/* Prints where and why (with the rank), then exit(1). */
void bench_die(const char* file, int line, const char* call, const char* why, const char* detail);

#define CUDA_OK(call)                                                                      \
  do {                                                                                     \
    cudaError_t err_ = (call);                                                             \
    if (err_ != cudaSuccess) bench_die(__FILE__, __LINE__, #call, cudaGetErrorString(err_), ""); \
  } while (0)

#define NCCL_OK(call)                                                                      \
  do {                                                                                     \
    ncclResult_t res_ = (call);                                                            \
    if (res_ != ncclSuccess) bench_die(__FILE__, __LINE__, #call, ncclGetErrorString(res_), ""); \
  } while (0)

#define EP_OK(group, call)                                                                 \
  do {                                                                                     \
    ep_status_t st_ = (call);                                                              \
    if (st_ != EP_STATUS_SUCCESS)                                                          \
      bench_die(__FILE__, __LINE__, #call, ep_status_string(st_), ep_last_error(group));   \
  } while (0)

/* Checks a kernel launch. */
#define LAUNCH_OK() CUDA_OK(cudaGetLastError())

/* The input value of channel `col` of token `token` of rank `rank`: a small integer in [-15, 15], exact in bf16,
 * so that sums of a few copies are exact in fp32 and a misplaced or stale row is caught. */
__host__ __device__ inline float bench_value(int rank, int token, int col) {
  uint32_t h = (uint32_t)rank * 0x9e3779b1u ^ (uint32_t)token * 0x85ebca77u ^ (uint32_t)col * 0xc2b2ae3du;
  h ^= h >> 15;
  h *= 0x2c1b3c6du;
  h ^= h >> 12;
  h *= 0x297a2d39u;
  h ^= h >> 15;
  return (float)((int)(h % 31u) - 15);
}

/* bf16 bits of a float that bf16 holds exactly (a small integer): its top half. */
static inline uint16_t bench_exact_bf16(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return (uint16_t)(bits >> 16);
}

/* The fp32 scale of channel group `group` (128 channels) of token `token` of rank `rank` in the FP8 inputs: a
 * multiple of 1/16 in [1/16, 31/16], exact in fp32, different from group to group so that a misplaced scale is
 * caught. The FP8 payload is e4m3(bench_value(rank, token, col)) (exact: |value| <= 15). */
__host__ __device__ inline float bench_fp8_scale(int rank, int token, int group) {
  return (16.0f + bench_value(rank, token, -1 - group)) / 16.0f;
}

/* One line of the table. Times are this rank's medians in microseconds; < 0 means not measured ("-"). */
typedef struct bench_row {
  const char* family;
  const char* dtype;           /* "-" when the row moves no payload */
  int sms;                     /* SMs the operation uses; < 0 prints "-" */
  double dispatch_us, combine_us;
  double bytes;                /* this rank's bytes for GB/s (see README); 0 = no GB/s */
  double combine_bytes;        /* the combine's bytes when they differ from `bytes` (FP8 dispatch, BF16
                                  combine); 0 = the same as `bytes` */
  double rdma_bytes;           /* internode rows: this rank's DeepEP "RDMA" bytes of the dispatch (its (token,
                                  destination node) pairs, own node included, times the row bytes); 0 = none */
  double rdma_combine_bytes;   /* the same for the combine (BF16); 0 = the same as `rdma_bytes` */
  double baseline_dispatch_us, baseline_combine_us; /* the NCCL user path on the same shape, or < 0 */
  int tokens;                  /* tokens per rank of the row; 0 = opt.tokens */
  int validated;               /* the row's outputs were compared with the expected ones */
  long mismatches;             /* how many compared values differed, on this rank */
} bench_row_t;

/* A row with every field "not measured". */
bench_row_t bench_row_make(const char* family, const char* dtype);

/* Collective: gathers every rank's row, keeps the slowest rank's times, and rank 0 prints the line. A row whose
 * check fails on any rank counts in b->failed_rows. */
void bench_report_row(bench_t* b, const bench_row_t* row);

/* A family: runs its rows (each ends with bench_report_row). */
typedef void (*bench_family_fn)(bench_t* b);

void family_layout(bench_t* b);
void family_nccl(bench_t* b);
void family_intranode(bench_t* b);
void family_ll(bench_t* b);
void family_ll_mask(bench_t* b);

#endif /* EP_BENCH_H */
