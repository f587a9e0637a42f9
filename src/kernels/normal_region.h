/* normal_region.h: where everything of the normal (high-throughput) path lives in a rank's symmetric memory.
 * One function computes it, for the host (to size the heap) and for the kernels (to find a peer's regions).
 *
 * Protocol in one paragraph: `prepare` compacts each rank's tokens per destination into `send_list` and
 * publishes the counts into every peer's `count_matrix` (entries tagged with the call's epoch, so no reset is
 * needed); each receiver reads its sources' lists over NVLink into the handle and acknowledges (`prepare_ack`).
 * `dispatch` stages the rows a rank sends into `x_stage` (chunk flags `x_staged`), and every receiver pulls the
 * rows it needs straight from its sources' stages into the caller's output, in source-rank order, then
 * acknowledges (`dispatch_ack`) so the source may stage again. `combine` goes the other way by pushes: each rank
 * stores its expert outputs over NVLink into the source rank's `y_stage` (a receive area there: row
 * sender * T + the token's position in the sender's list, one `y_staged` flag per 32 rows and sender), and each
 * source sums its tokens' copies from local memory in rank order, then acknowledges (`combine_ack`) so senders may
 * push again. (The internode path splits `y_stage` into its own push regions: internode_region.h.) The epoch of a
 * call is a device-side counter, the same on every rank because every rank makes the same calls.
 *
 * Rounds: the region holds T tokens per rank (T = config.max_tokens_per_rank, or what config.normal_region_bytes
 * holds). A call of more tokens runs ceil(max over ranks of num_tokens / T) rounds inside each kernel, each round
 * one step of the protocol above with its own epoch, over tokens [k*T, k*T + T) of every rank. Receivers write the
 * rows of source s in round k at s's output offset plus s's rows of earlier rounds (the handle's round table), so
 * the output is in the order of one big call: source-rank major, token order within a source. (Several nodes: one
 * round per launch of each kernel, docs/internode.md 1.5.1.)
 *
 *   uint64 count_matrix[R][R+1]   row s from rank s: (epoch << 32 | tokens s sends to rank d), then s's num_tokens
 *   uint64 expert_counts[R][E_loc] from rank s: (epoch << 32 | s's tokens for each of my local experts)
 *   uint64 prepare_ack[R]         from rank r: epoch whose send_list r has finished reading
 *   uint64 dispatch_ack[R]        from rank r: epoch whose x_stage r has finished reading
 *   uint64 combine_ack[R]         from rank r: epoch whose y_stage r has finished reading
 *   uint64 x_staged[x_chunks]     epoch in which chunk c of x_stage was written
 *   uint64 y_staged[R][y_chunks_per_rank]  epoch in which sender r's chunk c of y_stage arrived
 *   int32  send_list[R][T]        my token indices for each destination, compact, in token order
 *   bytes  x_stage[T][x_row_bytes]  row | scales [H/128] f32 | topk ids [K] i32 | weights [K] f32
 *   bytes  y_stage[R*T][y_row_bytes] row (bf16) | weights [K] f32
 * T = tokens per round, H = config.hidden, K = config.max_topk. */
#ifndef EP_KERNELS_NORMAL_REGION_H
#define EP_KERNELS_NORMAL_REGION_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/host_device.h"

#define EP_STAGE_CHUNK_ROWS 32 /* rows per staged-chunk flag */

typedef struct ep_normal_region {
  int num_ranks, max_tokens, hidden, max_topk, num_local_experts; /* max_tokens: T, the tokens of one round */
  int call_tokens;       /* the most tokens of one call (config.max_tokens_per_rank): the handle holds that many */
  int max_rounds;        /* ceil(call_tokens / max_tokens) */
  int y_chunks_per_rank; /* ceil(T / EP_STAGE_CHUNK_ROWS) */
  size_t x_row_bytes, y_row_bytes; /* stride of one staged row */
  size_t count_matrix, expert_counts, prepare_ack, dispatch_ack, combine_ack, x_staged, y_staged;
  size_t send_list, x_stage, y_stage;
  size_t total_bytes;
} ep_normal_region_t;

static inline EP_HD ep_normal_region_t ep_normal_region(int num_ranks, int num_experts, int max_tokens, int hidden,
                                                        int max_topk) {
  ep_normal_region_t l;
  const size_t R = (size_t)num_ranks, T = (size_t)max_tokens, K = (size_t)max_topk;
  l.num_ranks = num_ranks;
  l.max_tokens = max_tokens;
  l.call_tokens = max_tokens;
  l.max_rounds = 1;
  l.hidden = hidden;
  l.max_topk = max_topk;
  l.num_local_experts = num_experts / num_ranks;
  l.y_chunks_per_rank = (max_tokens + EP_STAGE_CHUNK_ROWS - 1) / EP_STAGE_CHUNK_ROWS;
  l.x_row_bytes = ep_align_up((size_t)hidden * 2 + (size_t)hidden / 128 * 4 + K * 8, 16);
  l.y_row_bytes = ep_align_up((size_t)hidden * 2 + K * 4, 16);
  size_t off = 0;
  l.count_matrix = off;  off += R * (R + 1) * 8;
  l.expert_counts = off; off += R * (size_t)l.num_local_experts * 8;
  l.prepare_ack = off;   off += R * 8;
  l.dispatch_ack = off;  off += R * 8;
  l.combine_ack = off;   off += R * 8;
  l.x_staged = off;      off += (T + EP_STAGE_CHUNK_ROWS - 1) / EP_STAGE_CHUNK_ROWS * 8;
  l.y_staged = off;      off += R * (size_t)l.y_chunks_per_rank * 8;
  off = ep_align_up(off, 16);
  l.send_list = off;     off += ep_align_up(R * T * 4, 16);
  off = ep_align_up(off, 128);
  l.x_stage = off;       off += T * l.x_row_bytes;
  off = ep_align_up(off, 128);
  l.y_stage = off;       off += R * T * l.y_row_bytes;
  l.total_bytes = ep_align_up(off, 128);
  return l;
}

/* The region in a pool of `pool_bytes` (config.normal_region_bytes): the most tokens per round T that fit, at most
 * call_tokens, for rows of `hidden` channels and `max_topk` weights; T = 0 if not even one token fits. Calls of up
 * to call_tokens tokens run in max_rounds rounds or fewer. */
static inline EP_HD ep_normal_region_t ep_normal_region_pool(int num_ranks, int num_experts, size_t pool_bytes,
                                                             int call_tokens, int hidden, int max_topk) {
  int lo = 0, hi = call_tokens; /* the region grows with T: the largest T whose region fits */
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (ep_normal_region(num_ranks, num_experts, mid, hidden, max_topk).total_bytes <= pool_bytes) lo = mid;
    else hi = mid - 1;
  }
  ep_normal_region_t l = ep_normal_region(num_ranks, num_experts, lo, hidden, max_topk);
  l.call_tokens = call_tokens;
  l.max_rounds = lo > 0 ? (call_tokens + lo - 1) / lo : 0;
  return l;
}

/* The normal handle's device arrays (ep_handle_t), in one allocation carved by ep_normal_handle_carve. T is
 * config.max_tokens_per_rank (call_tokens), C the tokens of one round, R the ranks, E_loc the experts per rank;
 * N nodes of P ranks. */
typedef struct ep_normal_handle_view {
  int* send_pos;      /* [T][R]: row of my token t on each rank, counted within its round's list; -1 */
  int* matrix;        /* [R][R]: tokens rank s sends to rank d (all rounds) */
  int* num_tokens_of; /* [R] */
  int* recv_src;      /* [R][T]: token index on source s, within its round, of my j-th row from s */
  int* recv_offset;   /* [R + 1]: where rows from s start in my output */
  int* num_recv;      /* [1] */
  int* expert_counts; /* [E_loc], aligned */
  int* num_rounds;    /* [1]: rounds of the prepared call, the same on every rank */
  int* recv_taken;    /* [R]: rows from s in the rounds prepared so far (prepare's running count); one node with
                         the rank mask: -1 after the prepare when its block dropped source s (several nodes keep
                         that verdict in round_drop) */
  int* round_rows;    /* [max_rounds][2R + 1]: round k: where rows from s start among the round's rows [R + 1],
                         then where they go in my output [R] (recv_offset[s] plus s's rows of earlier rounds) */
  /* With num_nodes > 1 only (NULL otherwise). Slots and rows are counted within their round, as send_pos; the
     arrays of [T] entries hold every round's entries one round after the other. */
  int* recv_slot;   /* [R][T]: remote source s: slot (in the forwarder's rdma_recv) of my j-th row from s */
  int* send_slot;   /* [T][N]: slot of my token t in its round's node_list[m], or -1 */
  int* node_tokens; /* [N][T]: node_list[m], my tokens for node m in token order, round after round */
  int* node_count;  /* [max_rounds][2N]: round k: |node_list[m]| [N], then where it starts in node_tokens[m] [N] */
  int* fwd_count;   /* [max_rounds][2N]: round k: slots the rail peer of node n sent me [N], then where they
                       start in fwd_row[n] [N] */
  int* fwd_row;     /* [N][T][P]: forwarder: row of slot j of source node n among local rank i's rows of the
                       slot's round, or -1 */
  int* send_base;   /* [max_rounds][P]: where my rows start among local rank i's rows of round k */
  int* round_counts; /* [R][P]: the prepare's scratch: rows from rank s to local rank i in the running round */
  int* round_drop;   /* [R]: the prepare's scratch, rank mask only: 1 once this rank dropped rank s */
} ep_normal_handle_view_t;

/* Where each array of a normal handle lives in `memory` (NULL: nowhere, only the size is wanted), for a group of
 * `num_nodes` nodes of `ranks_per_node` ranks; returns the bytes they take. Each array starts on a 16-byte
 * boundary, so that kernels may move them four ints at a time. */
static inline size_t ep_normal_handle_carve(const ep_normal_region_t* l, int num_nodes, int ranks_per_node,
                                            void* memory, ep_normal_handle_view_t* view) {
  const size_t R = (size_t)l->num_ranks, T = (size_t)l->call_tokens, E_loc = (size_t)l->num_local_experts;
  const size_t N = (size_t)num_nodes, P = (size_t)ranks_per_node, rounds = (size_t)l->max_rounds;
  ep_normal_handle_view_t v;
  int** const arrays[] = {&v.send_pos,  &v.matrix,        &v.num_tokens_of, &v.recv_src,   &v.recv_offset,
                          &v.num_recv,  &v.expert_counts, &v.num_rounds,    &v.recv_taken, &v.round_rows,
                          &v.recv_slot, &v.send_slot,     &v.node_tokens,   &v.node_count, &v.fwd_count,
                          &v.fwd_row,   &v.send_base,     &v.round_counts,  &v.round_drop};
  const size_t ints[] = {
      T * R, R * R, R,     R * T,          R + 1,          1,         E_loc,      1,     R, rounds * (2 * R + 1),
      R * T, T * N, N * T, rounds * 2 * N, rounds * 2 * N, N * T * P, rounds * P, R * P, R};
  const int count = (int)(sizeof(ints) / sizeof(ints[0]));
  const int used = num_nodes > 1 ? count : 10; /* the first ten serve one node */
  size_t bytes = 0;
  for (int i = 0; i < count; ++i) {
    *arrays[i] = i < used && memory ? (int*)((char*)memory + bytes) : NULL;
    if (i < used) bytes += ep_align_up(ints[i] * sizeof(int), 16);
  }
  if (view) *view = v;
  return bytes;
}

#endif /* EP_KERNELS_NORMAL_REGION_H */
