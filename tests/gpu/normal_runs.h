/* normal_runs.h: the runs test_intranode and test_internode share (normal_runs.c): the case table, the context
 * of one group, and one procedure per kind of run. Each run returns 1 when a check failed (the failures also
 * count into g_check_failures) and makes the same collective calls on every rank whatever its checks find. */
#ifndef EP_TESTS_GPU_NORMAL_RUNS_H
#define EP_TESTS_GPU_NORMAL_RUNS_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "ep.h"
#include "gpu/harness.h"
#include "gpu/normal_cases.h"

#define MAX_TOKENS 4096 /* config hints: the largest case */
#define MAX_HIDDEN 7168 /* the default level's; EP_TEST_LEVEL=full creates its groups with FULL_MAX_HIDDEN */
#define FULL_MAX_HIDDEN 16384
#define MAX_TOPK 32 /* EP_MAX_TOPK */

/* Short names for the table: top-k outputs none / ids / ids and weights; random / skewed / repeating routing;
 * which ranks have no tokens. */
enum {
  NO = TOPK_NONE,
  IDX = TOPK_IDX,
  IDW = TOPK_IDX_WEIGHTS,
  RND = ROUTE_RANDOM,
  SKW = ROUTE_SKEWED,
  RPT = ROUTE_REPEAT
};
enum { LST = VARY_LAST, FST = VARY_FIRST, MID = VARY_MIDDLE, SEV = VARY_SEVERAL, NOD = VARY_NODE };

/* Every case both tests run: awkward token counts (0, 1, 7, 4096, differing per rank, none on rank 0, a middle
 * rank, several ranks, a whole virtual node), hidden sizes (2688 is a multiple of 128 and of no power of two; BF16
 * 8, 72 and 1000 are multiples of 8 only), top-k 1..32, an expert twice in one top-k, BF16 and FP8, skewed
 * routing, num_sms 1, odd, 8..32 and 1000 (more than any device has: the library clamps it). */
extern const case_t normal_case_table[];
extern const int normal_num_cases;
/* EP_TEST_LEVEL=full adds these: the same regions with 4096 tokens, top-k up to 32, one SM, hidden 8192 and
 * 16384. A group that runs them is created with config.hidden = FULL_MAX_HIDDEN. */
extern const case_t normal_full_table[];
extern const int normal_num_full_cases;
/* config.hidden of a group that runs the cases of this level. */
int normal_config_hidden(void);

typedef struct {
  ep_group_t g;
  ep_handle_t handle;
  cudaStream_t s;
  int R, me;
  int rpn;         /* ranks per (virtual) node of the group; 0 = one NVLink domain (the intranode path) */
  int forced;      /* the group was created with EP_INTERNODE_FORCE_PUT=1 */
  int max_experts; /* config.num_experts */
  uint64_t seed;   /* this run's seed */
} normal_ctx_t;

/* One case: eager (plus a second combine with another num_sms, which must give the same bytes), cached, and
 * graph-safe, each against the reference; `index` names it in a failure report and seeds it. */
int normal_run_case(const normal_ctx_t* c, const case_t* k, int index);
/* The rank mask (config.mask_failed_ranks): drop from w->idx what a mask `masked[R]` drops (a masked rank keeps only
 * its own experts, every other rank loses the experts of masked ranks), keeping the original top-k in orig[r] (the
 * caller frees them). The reference run over the dropped world is what the masked calls must give. */
void world_drop_masked(world_t* w, const int* masked, int64_t** orig);
/* normal_run_case under the group's mask `masked` (the same on every rank): the calls get each rank's unmasked
 * top-k, the checks the reference with the masked experts dropped (eager, cached, graph-safe). */
int normal_run_masked_case(const normal_ctx_t* c, const case_t* k, int index, const int* masked);
/* Rejected calls name the bad argument; the handle still works after them. */
int normal_run_validation(const normal_ctx_t* c);
/* More rows than recv_capacity in the graph-safe path: EP_STATUS_DEVICE_ERROR; a combine along that handle reads
 * no row past the capacity. Run it last: the group is expected to keep working (the caller checks a case). */
int normal_run_overflow(const normal_ctx_t* c);
/* prepare + dispatch + combine captured in a CUDA graph, replayed with new data and new routing. `variant` 0:
 * BF16 top-4; 1: FP8 top-8 with repeated experts and both biases, an eager case between the replays. */
int normal_run_cuda_graph(const normal_ctx_t* c, int variant);

/* Rounds: a group whose config.normal_region_bytes holds ROUND_TOKENS tokens per round (one node; rpn = 0) or
 * INTER_ROUND_TOKENS (virtual nodes of rpn ranks, both regions in the pool; `forced`: cross-node transfers as puts)
 * runs calls of more tokens in rounds; its cases (no tokens, one token short of a round, exactly one, three rounds
 * and five tokens, last rounds of one token, ranks or a whole node with no tokens, BF16 and FP8, with and without
 * top-k weights, eager and cached) and the BF16 CUDA graph (on several nodes also the FP8 one, with eager calls on
 * its handle between the replays) must match the reference as with one round. Creates and destroys its own group
 * (the caller holds none); returns 1 when a check failed. */
#define ROUND_TOKENS 40
#define INTER_ROUND_TOKENS 64
int normal_run_rounds(const harness_t* h, uint64_t seed, int rpn, int forced);

#endif /* EP_TESTS_GPU_NORMAL_RUNS_H */
