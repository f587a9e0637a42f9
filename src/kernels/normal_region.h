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
 * T = config.max_tokens_per_rank, H = config.hidden, K = config.max_topk. */
#ifndef EP_KERNELS_NORMAL_REGION_H
#define EP_KERNELS_NORMAL_REGION_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/host_device.h"

#define EP_STAGE_CHUNK_ROWS 32 /* rows per staged-chunk flag */

typedef struct ep_normal_region {
  int num_ranks, max_tokens, hidden, max_topk, num_local_experts;
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

#endif /* EP_KERNELS_NORMAL_REGION_H */
