/* normal_cases.h: what the normal-path tests (test_intranode, test_internode) share -- one case's world (every
 * rank's inputs, generated identically on every rank from one seed), what this rank expects from the pure-C
 * reference run over the whole world, the device buffers, their poisoning, and the dispatch / combine checks.
 *
 * Linked into every GPU test (the Makefile's $(BUILD)/tests/gpu/% rule); only these two include it. Its checks
 * count into the program's one g_check_failures (common/check.h). The case table, the context of a group and
 * the runs built from these pieces are in normal_runs.{h,c}. */
#ifndef EP_TESTS_GPU_NORMAL_CASES_H
#define EP_TESTS_GPU_NORMAL_CASES_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "ep.h"
#include "ref/ep_ref.h"

#define MAX_RANKS 64
#define MAX_REPORTS 4 /* mismatches printed per buffer */
#define REF_BYTES_BUDGET ((size_t)1 << 30) /* per-process reference receive bytes; big worlds get fewer tokens */

/* Random: distinct experts per token (repeats only where top-k exceeds the experts there are), ~10% of the slots
 * -1. Skewed: every token to experts of one rank, no -1. Repeat: random, and every third token names one expert
 * twice (tests/ref/ep_ref.h: it counts once per expert, each slot is still mapped on its own). */
enum routing { ROUTE_RANDOM, ROUTE_SKEWED, ROUTE_REPEAT };
/* Which ranks have no tokens (`vary`; the others draw 1..tokens): none, the last, rank 0, the middle one (R / 2),
 * every odd one, the first half (with two virtual nodes: a whole node). Never the only rank of a group. VARY_PEAK:
 * rank R / 2 - 1 has all `tokens`, every other rank one (with two virtual nodes: the last rank of node 0, whose rail
 * peer on node 1 is rank R - 1). */
enum vary { VARY_NONE, VARY_LAST, VARY_FIRST, VARY_MIDDLE, VARY_SEVERAL, VARY_NODE, VARY_PEAK };
enum topk_out { TOPK_NONE, TOPK_IDX, TOPK_IDX_WEIGHTS }; /* what dispatch delivers besides rows */
enum { BIAS0 = 1, BIAS1 = 2 };

typedef struct {
  int tokens;      /* per rank; with `vary`, the most any rank has */
  int vary;        /* enum vary: counts differ between ranks, some have 0 */
  int hidden;
  int topk;
  int fp8;         /* x is FP8 E4M3 with fp32 scales, else BF16 */
  int topk_out;    /* enum topk_out */
  int routing;     /* enum routing */
  int few_experts; /* num_experts = 8 * num_ranks instead of the group's config.num_experts */
  int sms;         /* num_sms of dispatch and combine; 0 = the group default */
  int alignment;   /* expert_alignment */
  int bias;        /* BIAS0 | BIAS1 for the combine */
  int cached;      /* a second dispatch of new x through the handle, without prepare */
} case_t;

/* ------------------------------------------------------------------------------------------------------------
 * The world: every rank's inputs, generated identically on every rank
 * ------------------------------------------------------------------------------------------------------------ */

typedef struct {
  int R, hidden, topk, num_experts;
  int fp8, deliver_idx, with_weights;
  int exact;        /* small-integer payload: every (partial) combine sum is exact in bf16, on both paths */
  size_t row_bytes; /* bytes of one x row */
  int num_scales;   /* hidden / 128 with FP8, else 0 */
  int num_tokens[MAX_RANKS];
  uint8_t* x[MAX_RANKS];      /* [N_r, row_bytes] */
  float* scales[MAX_RANKS];   /* [N_r, num_scales], FP8 only */
  int64_t* idx[MAX_RANKS];    /* [N_r, topk] global expert ids, -1 = none */
  float* weights[MAX_RANKS];  /* [N_r, topk] */
} world_t;

/* Shape and routing from `count_seed` / `data_seed`; payload from `data_seed`. `num_ranks` ranks; `max_experts`:
 * the group's config.num_experts; `exact`: the small-integer payload instead of the random one. */
void world_build(world_t* w, const case_t* k, int num_ranks, int max_experts, uint64_t count_seed,
                 uint64_t data_seed, int exact);
/* x, scales and weights of every rank, from stream `salt` (world_build uses 1; a cached dispatch another). */
void world_payload(world_t* w, uint64_t seed, uint64_t salt);
void world_free(world_t* w);
int max_tokens_of(const world_t* w);

/* This rank's biases: small integers in [-8, 8] as bf16. */
uint16_t* make_bias(uint64_t seed, int me, int which, size_t count);

/* ------------------------------------------------------------------------------------------------------------
 * What this rank expects, from the reference run over the whole world
 * ------------------------------------------------------------------------------------------------------------ */

typedef struct {
  ep_ref_dispatch_t disp;
  const uint16_t* y[MAX_RANKS];  /* rank d's combine input as the reference sees it */
  uint16_t* y_owned[MAX_RANKS];  /* FP8: widened copies (rows of other ranks' tokens elsewhere stay 0) */
  uint16_t* combined_x;          /* this rank's [num_tokens, hidden] */
  uint16_t* abs_x;               /* with_abs_sums: the same combine over absolute values: sum|terms| per element
                                  * (bf16); else NULL */
  float* combined_w;             /* this rank's [num_tokens, topk] */
} expect_t;

/* The reference rejecting inputs this test made is a bug of the test: every rank stops the same way.
 * `with_abs_sums`: also e->abs_x (one more reference combine). */
void expect_build(expect_t* e, const world_t* w, int alignment, int me, const uint16_t* bias0,
                  const uint16_t* bias1, int with_abs_sums);
void expect_free(expect_t* e);

/* ------------------------------------------------------------------------------------------------------------
 * Device buffers of one case
 * ------------------------------------------------------------------------------------------------------------ */

typedef struct {
  /* inputs: this rank's tokens */
  void* x;
  float* scales;
  int64_t* idx;
  float* weights;
  uint16_t *bias0, *bias1;
  int* num_recv;      /* prepare's device outputs */
  int* expert_counts;
  /* dispatch outputs and the combine's input, `capacity` rows */
  int capacity;
  void* recv_x;
  float* recv_scales;
  int64_t* recv_idx;
  float* recv_w;
  int* recv_src;
  uint16_t* y; /* FP8 only: the received rows widened to bf16 */
  /* combine outputs, this rank's tokens */
  uint16_t* comb_x;
  float* comb_w;
} bufs_t;

void bufs_alloc_inputs(bufs_t* b, const world_t* w, int me);
/* Copies this rank's inputs (synchronous: also orders them before a later graph launch). */
void bufs_upload_inputs(bufs_t* b, const world_t* w, int me, const uint16_t* bias0, const uint16_t* bias1);
/* (Re)allocates the dispatch outputs and y with `capacity` rows. */
void bufs_alloc_outputs(bufs_t* b, const world_t* w, int capacity);
void bufs_free(bufs_t* b);
/* Poison prepare's device counts (0xA5A5A5A5), before a prepare. */
void bufs_poison_counts(const bufs_t* b, const world_t* w, cudaStream_t s);
/* Poison the dispatch and combine outputs: integers 0xA5A5..., fp32 and bf16 NaN, so an unwritten one fails. */
void bufs_poison(const bufs_t* b, const world_t* w, int me, cudaStream_t s);
/* Poison only the combine outputs (combined_x NaN, combined weights NaN): a combine after a checked one. */
void bufs_poison_combine(const bufs_t* b, const world_t* w, int me, cudaStream_t s);

/* ------------------------------------------------------------------------------------------------------------
 * Library calls
 * ------------------------------------------------------------------------------------------------------------ */

/* Graph-safe when host_num_recv is NULL; the device counts are asked for when `dev_counts`. */
ep_dispatch_prepare_args_t prepare_args(const world_t* w, int me, const bufs_t* b, int alignment,
                                        int* host_num_recv, int* host_counts, int dev_counts);
ep_dispatch_args_t dispatch_args(const world_t* w, const bufs_t* b, int sms);
/* y = the received rows (BF16: recv_x itself; FP8: b->y, filled by the caller), with the received weights. */
ep_combine_args_t combine_args(const world_t* w, const bufs_t* b, int bias, int sms);
/* FP8: the combine input, the reference's received rows of this rank widened to bf16. */
void upload_y(const bufs_t* b, const world_t* w, const expect_t* e, int me);

/* ------------------------------------------------------------------------------------------------------------
 * Checks
 * ------------------------------------------------------------------------------------------------------------ */

/* This rank's dispatch outputs against the reference, bit for bit. `got_num_recv` / `got_counts` are what prepare
 * reported (NULL: not checked here); `tail`: check the rows past the count (graph-safe outputs). */
void check_dispatch(const char* path, const world_t* w, const ep_ref_recv_t* want, const bufs_t* b,
                    const int* got_num_recv, const int* got_counts, int tail);
/* The prepare's device counts (graph-safe form, or eager with the device outputs asked for). */
void check_dev_counts(const char* path, const world_t* w, const ep_ref_recv_t* want, const bufs_t* b);

/* A test's tolerance for a combined_x value that is not bit-identical to the reference: `accept` says whether
 * `got` may stand for `want` (element i of this rank's combined_x, as floats); a value it rejects fails. The
 * accepted ones are counted and, when there are any, printed as "  note: PATH combined_x: COUNT NOTE". */
typedef struct {
  int (*accept)(const world_t* w, const expect_t* e, size_t i, float got, float want);
  const char* note;
} combine_rule_t;

/* combined_x bit-identical to the reference or accepted by `rule`; weights within 1e-6 relative. */
void check_combine(const char* path, const world_t* w, int me, const expect_t* e, const bufs_t* b,
                   const combine_rule_t* rule);

#endif /* EP_TESTS_GPU_NORMAL_CASES_H */
