/* internode_region.h: the extra symmetric region of the normal path when the group has more than one node
 * (docs/internode.md). One function computes it, for the host (to size the heap) and for the kernels.
 *
 * The internode path also uses the intranode region (normal_region.h) with global rank indices, but only for
 * same-node peers: count_matrix / expert_counts / send_list / *_ack entries of ranks of my node, x_stage (every
 * token staged once) and y_stage (every received row staged once). Everything that crosses nodes lives here.
 * Rank r = (node r / P, local index r % P); traffic between nodes stays on one rail: local index l talks only
 * to local index l of other nodes. Arrays indexed by another node use the node distance
 * dist(n) = (n - my_node + N) mod N - 1, so they have N-1 entries ("[N-1]" below). T is the tokens of one round
 * (ep_internode_regions below); slots and tokens here count from the start of their round.
 *
 *   uint64 meta_arrived[N-1]        signal, set by the rail peer's metadata put: prepare epoch
 *   uint64 meta_ready[N-1]          set by me (forwarder) after meta_arrived: my node's ranks may read meta_recv
 *   uint64 meta_free[N-1]           signal, set by the rail peer of that node: its meta_recv from me is free
 *   uint64 meta_ack[N-1][P]         from local rank i: epoch whose meta_recv[n] it has finished reading
 *   uint64 rdma_free[N-1]           signal, from the rail peer of that node: its rdma_recv from me is free
 *   uint64 fwd_ack[N-1][P]          from local rank i: dispatch epoch whose rdma_recv[n] rows it has pulled
 *   uint64 partial_free[N-1]        signal, from the rail peer (source) of that node: its partial_recv is free
 *   uint64 rdma_arrived[N-1][T/C]   signal per chunk of C slots, set by the source's put: dispatch epoch
 *   uint64 fwd_ready[N-1][T/C]      set by me (forwarder) after rdma_arrived: local ranks may pull the chunk
 *   uint64 partial_arrived[N-1][T/C] signal per chunk, set by the forwarder's partial put: combine epoch
 *   int32  meta_send[N-1][M]        my metadata block for each remote node (the put source)
 *   int32  meta_recv[N-1][M]        the metadata block of the rail peer of each remote node
 *            M = 2 + P + E/N + T words: num_tokens, num_slots, count[P] (tokens to each rank of the node),
 *            expert_counts[E/N] (for the node's experts), slot[T] = token << 8 | mask of the node's local ranks
 *   bytes  rdma_recv[N-1][T][x_row_bytes]     rows put by the rail peer of each remote node, by slot
 *   bytes  partial_stage[N-1][T][y_row_bytes] my bf16 partial sums for the rail peer of each remote node (the put
 *                                             source; unused when that peer is NVLink-mapped: the partials are
 *                                             then stored straight into its partial_recv)
 *   bytes  partial_recv[N-1][T][y_row_bytes]  partials put by the rail peer of each remote node, by slot
 * Row formats are those of normal_region.h (x: row | scales | topk ids | weights; y: bf16 row | weights).
 * partial_stage is a full-size put source (simplest correct choice; the doc's ring of [B][2][C] rows would
 * save (N-1) * T * y_row_bytes and is left for tuning). */
#ifndef EP_KERNELS_INTERNODE_REGION_H
#define EP_KERNELS_INTERNODE_REGION_H

#include "kernels/device_abi.h"
#include "kernels/normal_region.h"

typedef struct ep_internode_region {
  int num_nodes, ranks_per_node, max_tokens, num_chunks; /* num_chunks = ceil(T / C) */
  int meta_words;                                         /* M */
  size_t meta_bytes;                                      /* stride of one metadata block: 4 M, 16-aligned */
  size_t x_row_bytes, y_row_bytes;
  size_t meta_arrived, meta_ready, meta_free, meta_ack, rdma_free, fwd_ack, partial_free;
  size_t rdma_arrived, fwd_ready, partial_arrived;
  size_t meta_send, meta_recv, rdma_recv, partial_stage, partial_recv;
  size_t total_bytes;
} ep_internode_region_t;

static inline EP_HD ep_internode_region_t ep_internode_region(int num_ranks, int ranks_per_node, int num_experts,
                                                              int max_tokens, int hidden, int max_topk) {
  ep_internode_region_t l;
  const ep_normal_region_t n = ep_normal_region(num_ranks, num_experts, max_tokens, hidden, max_topk);
  const int N = num_ranks / ranks_per_node;
  const size_t Nm = (size_t)(N - 1), P = (size_t)ranks_per_node, T = (size_t)max_tokens;
  l.num_nodes = N;
  l.ranks_per_node = ranks_per_node;
  l.max_tokens = max_tokens;
  l.num_chunks = (max_tokens + EP_STAGE_CHUNK_ROWS - 1) / EP_STAGE_CHUNK_ROWS;
  l.meta_words = 2 + ranks_per_node + num_experts / N + max_tokens;
  l.x_row_bytes = n.x_row_bytes;
  l.y_row_bytes = n.y_row_bytes;
  const size_t C = (size_t)l.num_chunks, M = ep_align_up((size_t)l.meta_words * 4, 16);
  l.meta_bytes = M;
  size_t off = 0;
  l.meta_arrived = off;    off += Nm * 8;
  l.meta_ready = off;      off += Nm * 8;
  l.meta_free = off;       off += Nm * 8;
  l.meta_ack = off;        off += Nm * P * 8;
  l.rdma_free = off;       off += Nm * 8;
  l.fwd_ack = off;         off += Nm * P * 8;
  l.partial_free = off;    off += Nm * 8;
  l.rdma_arrived = off;    off += Nm * C * 8;
  l.fwd_ready = off;       off += Nm * C * 8;
  l.partial_arrived = off; off += Nm * C * 8;
  off = ep_align_up(off, 128);
  l.meta_send = off;       off += Nm * M;
  off = ep_align_up(off, 128);
  l.meta_recv = off;       off += Nm * M;
  off = ep_align_up(off, 128);
  l.rdma_recv = off;       off += Nm * T * l.x_row_bytes;
  off = ep_align_up(off, 128);
  l.partial_stage = off;   off += Nm * T * l.y_row_bytes;
  off = ep_align_up(off, 128);
  l.partial_recv = off;    off += Nm * T * l.y_row_bytes;
  l.total_bytes = ep_align_up(off, 128);
  return l;
}

/* Both regions of the normal path in a group of several nodes (the intranode one and this one), for rounds of T
 * tokens (normal_region.h, "Rounds"). pool_bytes 0: T is call_tokens; else the largest T whose two regions fit in
 * pool_bytes together (config.normal_region_bytes), T = 0 if not even one token fits. T is at most
 * EP_INTERNODE_MAX_TOKENS_PER_RANK, whatever the pool: a slot word packs a token index within its round with an
 * 8-bit rank mask. Calls of up to call_tokens tokens run in normal.max_rounds rounds or fewer. */
typedef struct ep_internode_regions {
  ep_normal_region_t normal;
  ep_internode_region_t inter;
} ep_internode_regions_t;

static inline EP_HD ep_internode_regions_t ep_internode_regions(int num_ranks, int ranks_per_node, int num_experts,
                                                                size_t pool_bytes, int call_tokens, int hidden,
                                                                int max_topk) {
  const int most = call_tokens < EP_INTERNODE_MAX_TOKENS_PER_RANK ? call_tokens : EP_INTERNODE_MAX_TOKENS_PER_RANK;
  int lo = most;
  if (pool_bytes > 0) { /* both regions grow with T: the largest T whose regions fit */
    lo = 0;
    int hi = most;
    while (lo < hi) {
      const int mid = lo + (hi - lo + 1) / 2;
      const size_t bytes =
          ep_normal_region(num_ranks, num_experts, mid, hidden, max_topk).total_bytes +
          ep_internode_region(num_ranks, ranks_per_node, num_experts, mid, hidden, max_topk).total_bytes;
      if (bytes <= pool_bytes) lo = mid;
      else hi = mid - 1;
    }
  }
  ep_internode_regions_t r;
  r.normal = ep_normal_region(num_ranks, num_experts, lo, hidden, max_topk);
  r.normal.call_tokens = call_tokens;
  r.normal.max_rounds = lo > 0 ? (call_tokens + lo - 1) / lo : 0;
  r.inter = ep_internode_region(num_ranks, ranks_per_node, num_experts, lo, hidden, max_topk);
  return r;
}

#endif /* EP_KERNELS_INTERNODE_REGION_H */
