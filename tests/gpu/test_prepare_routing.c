/* test_prepare_routing: ep_dispatch_prepare's rank-mask form (DeepEP's dispatch without top-k: is_token_in_rank and
 * num_tokens_per_expert, num_topk 0) and ep_handle_get_rank_prefix, against the pure-C reference.
 *
 *   every rank:  all ranks' routing, from one shared seed ──> ep_ref_dispatch (whole world)
 *                its own mask and counts ──> prepare (eager, expert_alignment 2) ──> dispatch ──> combine
 * Checked per case:
 *   prepare:   the received count and the per-expert counts (the sources' num_tokens_per_expert summed, aligned)
 *   dispatch:  recv_x bit-identical to the reference rows (source rank, then token), recv_src_idx
 *   query:     rank_prefix_matrix == the reference's (one node) or EP_STATUS_UNSUPPORTED (several nodes);
 *              recv_rank_prefix_sum == the reference matrix's column of this rank; both again from a CUDA graph
 *              that captured the query, after a second prepare (new routing) into the same handle
 *   combine:   each token's copies summed: x times the ranks it went to (small integers, exact in bf16)
 * Groups: one NVLink domain; with two ranks or more also R virtual nodes of one rank (the internode prepare); last,
 * one NVLink domain whose config.normal_region_bytes holds 37 tokens a round (calls of up to 96 tokens in rounds:
 * the mask is read at each round's tokens, the caller's per-expert counts count once), and with two ranks or more
 * the R virtual nodes with a pool of 37 tokens a round in both regions (the internode prepare in rounds).
 * Cases: 0, 1 and random token counts up to 96 per rank, with empty ranks and tokens sent nowhere.
 * A failure prints the group, the case and the seed; EP_TEST_SEED=<seed> replays it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "ep_ref.h"
#include "gpu/harness.h"
#include "gpu/test_util.h"
#include "kernels/internode_region.h"
#include "kernels/normal_region.h"

/* ROUND_TOKENS_HERE: tokens a round of the pooled group; not a multiple of 4, so that prepare copies each source's
 * list for me a token at a time, and 96 tokens take three rounds. */
enum { MAX_RANKS_HERE = 8, MAX_TOKENS_HERE = 96, HIDDEN = 256, ALIGNMENT = 2, ROUND_TOKENS_HERE = 37 };

typedef struct {
  int R, me, E;
  int num_tokens[MAX_RANKS_HERE];
  uint8_t* in_rank[MAX_RANKS_HERE]; /* [N_s, R] */
  int* per_expert[MAX_RANKS_HERE];  /* [E] */
  uint16_t* x[MAX_RANKS_HERE];      /* [N_s, HIDDEN] bf16 small integers */
} world_t;

static void world_make(world_t* w, int R, int me, int E, uint64_t* rng, int case_index) {
  memset(w, 0, sizeof *w);
  w->R = R;
  w->me = me;
  w->E = E;
  for (int s = 0; s < R; ++s) {
    int n = case_index == 0 ? 0 : case_index == 1 ? 1 : (int)(harness_rand(rng) % (MAX_TOKENS_HERE + 1));
    if (case_index >= 2 && s == 0 && R > 1) n = 0; /* an empty source beside full ones */
    w->num_tokens[s] = n;
    w->in_rank[s] = xcalloc((size_t)n * R, 1);
    w->per_expert[s] = xcalloc((size_t)E, sizeof(int));
    w->x[s] = xcalloc((size_t)n * HIDDEN, sizeof(uint16_t));
    for (int t = 0; t < n; ++t) {
      const uint64_t bits = harness_rand(rng);
      for (int d = 0; d < R; ++d) w->in_rank[s][(size_t)t * R + d] = (bits >> d & 1) && (bits >> 60) != 0;
      for (int c = 0; c < HIDDEN; ++c)
        w->x[s][(size_t)t * HIDDEN + c] = ep_ref_f32_to_bf16((float)((s * 7 + t * 3 + c) % 17 - 8));
    }
    for (int e = 0; e < E; ++e) w->per_expert[s][e] = (int)(harness_rand(rng) % 5);
  }
}

static void world_free(world_t* w) {
  for (int s = 0; s < w->R; ++s) {
    free(w->in_rank[s]);
    free(w->per_expert[s]);
    free(w->x[s]);
  }
}

static int reference(const world_t* w, ep_ref_dispatch_t* out) {
  ep_ref_world_t rw;
  memset(&rw, 0, sizeof rw);
  rw.num_ranks = w->R;
  rw.ranks_per_node = w->R;
  rw.num_experts = w->E;
  rw.num_tokens = w->num_tokens;
  rw.x = (const void* const*)w->x;
  rw.row_bytes = HIDDEN * sizeof(uint16_t);
  rw.is_token_in_rank = (const uint8_t* const*)w->in_rank;
  rw.num_tokens_per_expert = (const int* const*)w->per_expert;
  return ep_ref_dispatch(&rw, ALIGNMENT, out);
}

typedef struct {
  ep_group_t g;
  cudaStream_t s;
  int num_nodes;
  const char* name;
} ctx_t;

/* The library's prefix arrays against the reference's; `matrix` is NULL on several nodes. */
static int check_prefix(const ctx_t* c, const world_t* w, const ep_ref_dispatch_t* ref, const int32_t* matrix_dev,
                        const int32_t* prefix_dev, const char* what, int case_index) {
  const int R = w->R;
  int bad = 0;
  int32_t* prefix = download(prefix_dev, sizeof(int32_t) * R);
  for (int s = 0; s < R; ++s)
    if (prefix[s] != ref->rank_prefix_matrix[s * R + w->me]) {
      CHECK(0, "%s case %d (%s): recv_rank_prefix_sum[%d] = %d, reference %d", c->name, case_index, what, s, prefix[s],
            ref->rank_prefix_matrix[s * R + w->me]);
      ++bad;
      break;
    }
  free(prefix);
  if (!matrix_dev) return bad;
  int32_t* matrix = download(matrix_dev, sizeof(int32_t) * R * R);
  for (int i = 0; i < R * R; ++i)
    if (matrix[i] != ref->rank_prefix_matrix[i]) {
      CHECK(0, "%s case %d (%s): rank_prefix_matrix[%d][%d] = %d, reference %d", c->name, case_index, what, i / R,
            i % R, matrix[i], ref->rank_prefix_matrix[i]);
      ++bad;
      break;
    }
  free(matrix);
  return bad;
}

/* Prepare (mask form, eager) for this rank of `w` into `handle`; returns the received count, or -1. */
static int prepare(const ctx_t* c, const world_t* w, ep_handle_t handle, void* in_rank_dev, void* per_expert_dev,
                   int* host_per_expert) {
  const int n = w->num_tokens[w->me];
  upload(in_rank_dev, w->in_rank[w->me], (size_t)n * w->R);
  upload(per_expert_dev, w->per_expert[w->me], sizeof(int) * (size_t)w->E);
  ep_dispatch_prepare_args_t pa = EP_DISPATCH_PREPARE_ARGS_INIT;
  pa.num_tokens = n;
  pa.num_topk = 0;
  pa.num_experts = w->E;
  pa.expert_alignment = ALIGNMENT;
  pa.is_token_in_rank = in_rank_dev;
  pa.num_tokens_per_expert = per_expert_dev;
  int num_recv = -1;
  pa.num_recv_tokens = &num_recv;
  pa.num_recv_tokens_per_expert = host_per_expert;
  return EP_CHECK(c, ep_dispatch_prepare(c->g, handle, &pa, c->s)) ? num_recv : -1;
}

static int run_case(const ctx_t* c, ep_handle_t handle, int R, int me, int E, uint64_t* rng, int case_index) {
  world_t w, w2;
  world_make(&w, R, me, E, rng, case_index);
  world_make(&w2, R, me, E, rng, case_index + 7);
  ep_ref_dispatch_t ref, ref2;
  if (reference(&w, &ref) != 0 || reference(&w2, &ref2) != 0) {
    fprintf(stderr, "FAIL: ep_ref_dispatch rejected the test's world\n");
    exit(TEST_FAIL);
  }
  const int n = w.num_tokens[me], E_loc = E / R;
  const ep_ref_recv_t* mine = &ref.recv[me];
  const int cap = R * MAX_TOKENS_HERE;
  void* in_rank_dev = dev_alloc((size_t)MAX_TOKENS_HERE * R);
  void* per_expert_dev = dev_alloc(sizeof(int) * (size_t)E);
  void* x_dev = dev_alloc((size_t)MAX_TOKENS_HERE * HIDDEN * 2);
  void* recv_x_dev = dev_alloc((size_t)cap * HIDDEN * 2);
  int32_t* src_dev = dev_alloc(sizeof(int32_t) * cap);
  void* out_dev = dev_alloc((size_t)MAX_TOKENS_HERE * HIDDEN * 2);
  int32_t* matrix_dev = dev_alloc(sizeof(int32_t) * R * R);
  int32_t* prefix_dev = dev_alloc(sizeof(int32_t) * R);
  int* host_per_expert = xcalloc((size_t)E_loc, sizeof(int));
  int bad = 0;

  const int num_recv = prepare(c, &w, handle, in_rank_dev, per_expert_dev, host_per_expert);
  if (num_recv != mine->num_recv) {
    CHECK(0, "%s case %d: received count %d, reference %d", c->name, case_index, num_recv, mine->num_recv);
    ++bad;
    goto done;
  }
  for (int e = 0; e < E_loc; ++e)
    if (host_per_expert[e] != mine->num_recv_tokens_per_expert[e]) {
      CHECK(0, "%s case %d: per-expert count [%d] = %d, reference %d", c->name, case_index, e, host_per_expert[e],
            mine->num_recv_tokens_per_expert[e]);
      ++bad;
      break;
    }

  upload(x_dev, w.x[me], (size_t)n * HIDDEN * 2);
  CUDA_CHECK(cudaMemset(recv_x_dev, 0xA5, (size_t)cap * HIDDEN * 2));
  ep_dispatch_args_t da = EP_DISPATCH_ARGS_INIT;
  da.x = x_dev;
  da.x_dtype = EP_BF16;
  da.hidden = HIDDEN;
  da.recv_capacity = cap;
  da.recv_x = recv_x_dev;
  da.recv_src_idx = src_dev;
  bad += !EP_CHECK(c, ep_dispatch(c->g, handle, &da, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  uint16_t* recv_x = download(recv_x_dev, (size_t)num_recv * HIDDEN * 2);
  int32_t* src = download(src_dev, sizeof(int32_t) * (size_t)num_recv);
  if (num_recv && memcmp(recv_x, mine->x, (size_t)num_recv * HIDDEN * 2) != 0) {
    CHECK(0, "%s case %d: recv_x differs from the reference", c->name, case_index);
    ++bad;
  }
  if (num_recv && memcmp(src, mine->src_idx, sizeof(int32_t) * (size_t)num_recv) != 0) {
    CHECK(0, "%s case %d: recv_src_idx differs from the reference", c->name, case_index);
    ++bad;
  }
  free(recv_x);
  free(src);

  /* The query, eager. */
  int32_t* matrix_arg = c->num_nodes == 1 ? matrix_dev : NULL;
  CUDA_CHECK(cudaMemset(matrix_dev, 0xA5, sizeof(int32_t) * R * R));
  CUDA_CHECK(cudaMemset(prefix_dev, 0xA5, sizeof(int32_t) * R));
  if (c->num_nodes > 1) {
    const ep_status_t st = ep_handle_get_rank_prefix(handle, matrix_dev, prefix_dev, c->s);
    CHECK(st == EP_STATUS_UNSUPPORTED, "%s: rank_prefix_matrix on %d nodes gave %s, want EP_STATUS_UNSUPPORTED",
          c->name, c->num_nodes, ep_status_string(st));
    bad += st != EP_STATUS_UNSUPPORTED;
  }
  bad += !EP_CHECK(c, ep_handle_get_rank_prefix(handle, matrix_arg, prefix_dev, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  bad += check_prefix(c, &w, &ref, matrix_arg, prefix_dev, "eager", case_index);

  /* Combine: every copy comes back, so a token sums to x times the ranks it went to. */
  ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
  ca.x = recv_x_dev;
  ca.hidden = HIDDEN;
  ca.combined_x = out_dev;
  CUDA_CHECK(cudaMemset(out_dev, 0xA5, (size_t)MAX_TOKENS_HERE * HIDDEN * 2));
  bad += !EP_CHECK(c, ep_combine(c->g, handle, &ca, c->s));
  CUDA_CHECK(cudaStreamSynchronize(c->s));
  uint16_t* out = download(out_dev, (size_t)n * HIDDEN * 2);
  for (int t = 0; t < n; ++t) {
    int copies = 0;
    for (int d = 0; d < R; ++d) copies += w.in_rank[me][(size_t)t * R + d] != 0;
    for (int col = 0; col < HIDDEN; ++col) {
      const float want = ep_ref_bf16_to_f32(w.x[me][(size_t)t * HIDDEN + col]) * (float)copies;
      const float got = ep_ref_bf16_to_f32(out[(size_t)t * HIDDEN + col]);
      if (got != want) {
        CHECK(0, "%s case %d: combined_x[%d][%d] = %g, want %g (%d copies)", c->name, case_index, t, col, got, want,
              copies);
        ++bad;
        t = n;
        break;
      }
    }
  }
  free(out);

  /* The query captured in a CUDA graph, replayed after a new routing was prepared into the same handle. */
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  CUDA_CHECK(cudaStreamBeginCapture(c->s, cudaStreamCaptureModeThreadLocal));
  const ep_status_t captured = ep_handle_get_rank_prefix(handle, matrix_arg, prefix_dev, c->s);
  CUDA_CHECK(cudaStreamEndCapture(c->s, &graph));
  CHECK(captured == EP_STATUS_SUCCESS, "%s: capturing ep_handle_get_rank_prefix: %s", c->name, ep_last_error(c->g));
  bad += captured != EP_STATUS_SUCCESS;
  if (captured == EP_STATUS_SUCCESS && graph) {
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    const int num_recv2 = prepare(c, &w2, handle, in_rank_dev, per_expert_dev, host_per_expert);
    bad += num_recv2 != ref2.recv[me].num_recv;
    CUDA_CHECK(cudaMemset(matrix_dev, 0xA5, sizeof(int32_t) * R * R));
    CUDA_CHECK(cudaMemset(prefix_dev, 0xA5, sizeof(int32_t) * R));
    CUDA_CHECK(cudaGraphLaunch(exec, c->s));
    CUDA_CHECK(cudaStreamSynchronize(c->s));
    bad += check_prefix(c, &w2, &ref2, matrix_arg, prefix_dev, "graph replay", case_index);
    cudaGraphExecDestroy(exec);
  }
  if (graph) cudaGraphDestroy(graph);
  ep_status_t async = EP_STATUS_SUCCESS;
  bad += !EP_CHECK(c, ep_get_async_error(c->g, &async));
  CHECK(async == EP_STATUS_SUCCESS, "%s case %d: async error %s: %s", c->name, case_index, ep_status_string(async),
        ep_last_error(c->g));
  bad += async != EP_STATUS_SUCCESS;

done:
  free(host_per_expert);
  dev_free(in_rank_dev);
  dev_free(per_expert_dev);
  dev_free(x_dev);
  dev_free(recv_x_dev);
  dev_free(src_dev);
  dev_free(out_dev);
  dev_free(matrix_dev);
  dev_free(prefix_dev);
  ep_ref_dispatch_free(&ref);
  ep_ref_dispatch_free(&ref2);
  world_free(&w);
  world_free(&w2);
  return bad;
}

/* round_tokens > 0: config.normal_region_bytes holds that many tokens a round, so a call runs in rounds. */
static int run_group(const harness_t* h, int ranks_per_node, int round_tokens, uint64_t seed) {
  const int R = h->num_ranks;
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ranks_per_node = ranks_per_node;
  cfg.num_experts = 8 * R;
  cfg.hidden = HIDDEN;
  cfg.max_tokens_per_rank = MAX_TOKENS_HERE;
  cfg.max_topk = 8;
  if (round_tokens > 0)
    cfg.normal_region_bytes = ep_normal_region(R, cfg.num_experts, round_tokens, cfg.hidden, cfg.max_topk).total_bytes;
  if (round_tokens > 0 && ranks_per_node > 0) /* several nodes: the pool holds both regions */
    cfg.normal_region_bytes +=
        ep_internode_region(R, ranks_per_node, cfg.num_experts, round_tokens, cfg.hidden, cfg.max_topk).total_bytes;
  ctx_t c;
  memset(&c, 0, sizeof c);
  c.name = ranks_per_node == 0 ? (round_tokens > 0 ? "one node, in rounds" : "one node")
                               : (round_tokens > 0 ? "R nodes of 1, in rounds" : "R nodes of 1");
  ep_status_t st = harness_group_create(h, &cfg, &c.g);
  CHECK(st == EP_STATUS_SUCCESS, "%s: create: %s: %s", c.name, ep_status_string(st), ep_last_error(NULL));
  if (st != EP_STATUS_SUCCESS) return 1;
  ep_group_info_t info;
  CHECK(ep_group_get_info(c.g, &info) == EP_STATUS_SUCCESS, "get_info: %s", ep_last_error(c.g));
  c.num_nodes = info.num_nodes;
  CUDA_CHECK(cudaStreamCreate(&c.s));
  ep_handle_t handle = NULL;
  int bad = !EP_CHECK(&c, ep_handle_create(c.g, &handle));
  uint64_t rng = seed;
  const int num_cases = 6;
  for (int i = 0; i < num_cases && !bad; ++i) bad += run_case(&c, handle, R, h->rank, cfg.num_experts, &rng, i);
  printf("rank %d: %s (%d node(s)): %d mask-form cases: %s\n", h->rank, c.name, c.num_nodes, num_cases,
         bad ? "FAILED" : "ok");
  CHECK(ep_handle_destroy(handle) == EP_STATUS_SUCCESS, "handle destroy: %s", ep_last_error(c.g));
  cudaStreamDestroy(c.s);
  CHECK(ep_group_destroy(c.g) == EP_STATUS_SUCCESS, "destroy: %s", ep_last_error(NULL));
  return bad;
}

int main(void) {
  harness_t h;
  int rc = harness_init(&h);
  if (rc) return rc;
  if (h.num_ranks > MAX_RANKS_HERE) {
    printf("SKIP: more than %d ranks\n", MAX_RANKS_HERE);
    return TEST_SKIP;
  }
  const uint64_t seed = harness_seed(&h, "prepare_routing");
  run_group(&h, 0, 0, seed);
  if (h.num_ranks >= 2) run_group(&h, 1, 0, seed + 1);
  run_group(&h, 0, ROUND_TOKENS_HERE, seed + 2);
  if (h.num_ranks >= 2) run_group(&h, 1, ROUND_TOKENS_HERE, seed + 3);
  return TEST_RESULT();
}
