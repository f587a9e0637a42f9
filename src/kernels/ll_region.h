/* ll_region.h: where everything of the low-latency (LL) path lives in a rank's symmetric memory. One function
 * computes it, for the host (to size the heap) and for the kernels (to find a peer's regions).
 *
 * The LL region is two identical halves. A dispatch takes the next half (the host alternates them) and its
 * handle's combine uses the same half. Inside one half (T = config.ll_max_tokens_per_rank, H = config.hidden,
 * E = config.num_experts, E_loc = E / R, K = config.max_topk):
 *
 *   uint64 dispatch_count[R]         from source s: how many puts s made for this call's dispatch (see below)
 *   uint64 combine_signal[R]         from rank r: how many combine rows r sent me
 *   uint64 ack[R]                    from rank r: the last call number on this half whose receive phase r finished
 *   uint64 dispatch_shape[R]         from source s: the shape of its dispatch (ep_ll_shape_word), see below
 *   int32  dispatch_meta[R][E_loc]   from source s: how many of its tokens select each of my local experts
 *   bytes  dispatch_stage[T][msg]    my tokens as messages, the source of every put to another node
 *   int32  meta_stage[R][E_loc]      my dispatch_meta rows for ranks of other nodes (source of their puts)
 *   bytes  combine_stage[E_loc*R*T][2H]  expert outputs on their way back; the zero-copy buffer
 *   bytes  recv                      the receive area, used by one call at a time:
 *            dispatch: [R][T] messages; slot p of source s = the p-th token of s that selects any expert of mine
 *                      (a token crosses the link once per destination rank, not once per expert)
 *            combine:  [E][T] rows of 2H, row (e, j) = the output of global expert e for my j-th token that selects it
 *            combine with sums on the experts' ranks: the dispatch's messages stay (the senders read their pairs),
 *                      and after them (ep_ll_recv_sums), [R][T] rows of 2H, row (d, p) = rank d's weighted sum of its
 *                      experts' outputs for my token in message slot p at d (where they fit: ep_ll_sums_fit)
 *
 * A message is a header of `hdr_bytes` = align16(8 + 8K): int32 source token index, int32 npairs, then npairs
 * pairs (int32 e << 13 | j, fp32 weight) for every distinct valid expert e of the token (all ranks' experts: the
 * message is the same for every destination; a receiver keeps the pairs of its own experts), j < 2^13 the token's
 * position among the source's tokens that select e (T <= 8192; e < 2^18), the weight the sum of the token's weights
 * for e when the dispatch was given weights (else 0). Then the payload: FP8 e4m3 [H] then fp32 scales [H / 128], or
 * BF16 [H]; its stride `msg_bytes` = align16(hdr_bytes + max(2H, H + H / 32)).
 *
 * Counts and signals are zeroed by the receiver: the final value of a word is (n + 1) << 32 | n. To another node a
 * sender adds 1 per put (put-with-signal, ADD), and one block of its send phase adds (n + 1) << 32. Over NVLink
 * each block of the send phase adds, with one release add after a block barrier behind its stores (the release is
 * cumulative over the writes the barrier ordered before it), the number of its own units (dispatch: messages;
 * combine: (row, part) pieces), and one block also adds (n + 1) << 32 (+ 1 for dispatch's meta row): every add is
 * positive, so lo reaches n only once all blocks' adds have landed. A receiver waits for
 * hi >= 1 and lo == hi - 1, reads n = hi - 1, and zeroes the word when the call's receive phase is done, before it
 * acknowledges: no sender writes the word again before that acknowledgement. For dispatch, n = messages + 2 (the
 * dispatch_meta row and the shape word are two more puts). Call numbers (acks) grow for ever (device counters, so graph
 * replays count); the receive phase advances the half's call number.
 *
 * Shape agreement: ranks may pass different T, H or E to one dispatch only by mistake, and a receiver that placed a
 * larger sender's rows by its own shape would write past its recv_x. So each source writes its call's shape word to
 * every rank (the publishing block, before its count add: an NVLink store, or one more put-with-signal), and every
 * receiving block compares every source's word with its own before it places a row, loading the words together
 * with the dispatch_meta rows (no extra round trip). A difference is a fatal fault naming the source and the field
 * (EP_FAULT_SHAPE_MISMATCH); no block of that rank places a row, so nothing is written past its buffers. Every rank
 * sees the disagreement (each rank differs from at least one source), so every rank fails the call. A sender needs
 * no check of its own before it writes: all its stores and puts land inside the receiver's half (without
 * config.ll_region_bytes every rank lays out the group's shape, agreed at create; with it each call's layout is
 * checked to fit the agreed half), the words a receiver reads before comparing sit at offsets that depend on R
 * alone, and the message counts it scans are clamped to its own T. */
#ifndef EP_KERNELS_LL_REGION_H
#define EP_KERNELS_LL_REGION_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/host_device.h"

/* A message pair's expert e and slot j share an int32: e << EP_LL_PAIR_SLOT_BITS | j. So a group's
 * ll_max_tokens_per_rank is at most 2^13 = 8192 and an LL call's num_experts below 2^(31 - 13) = 2^18. */
#define EP_LL_PAIR_SLOT_BITS 13

typedef struct ep_ll_region {
  int num_ranks, max_tokens, hidden, num_experts, num_local_experts, max_topk;
  size_t hdr_bytes;      /* header of a dispatch message; the payload starts there */
  size_t msg_bytes;      /* stride of a dispatch message */
  size_t row_bytes;      /* stride of a combine row: 2 * hidden */
  /* offsets inside one half */
  size_t dispatch_count, combine_signal, ack, dispatch_shape, dispatch_meta;
  size_t signal_bytes; /* the words above end here: a clean zeroes them */
  size_t dispatch_stage, meta_stage, combine_stage, recv;
  size_t half_bytes;     /* one half, 128-aligned */
  size_t total_bytes;    /* both halves */
} ep_ll_region_t;

static inline EP_HD ep_ll_region_t ep_ll_region(int num_ranks, int num_experts, int max_tokens, int hidden,
                                                int max_topk) {
  ep_ll_region_t l;
  const size_t R = (size_t)num_ranks, T = (size_t)max_tokens, H = (size_t)hidden, E = (size_t)num_experts;
  const size_t fp8_payload = H + H / 128 * 4, bf16_payload = 2 * H;
  l.num_ranks = num_ranks;
  l.max_tokens = max_tokens;
  l.hidden = hidden;
  l.num_experts = num_experts;
  l.num_local_experts = num_experts / num_ranks;
  l.max_topk = max_topk;
  l.hdr_bytes = ep_align_up(8 + 8 * (size_t)max_topk, 16);
  l.msg_bytes = ep_align_up(l.hdr_bytes + (fp8_payload > bf16_payload ? fp8_payload : bf16_payload), 16);
  l.row_bytes = 2 * H;
  size_t off = 0;
  /* clang-format off */
  l.dispatch_count = off; off += R * 8;
  l.combine_signal = off; off += R * 8;
  l.ack = off;            off += R * 8;
  l.dispatch_shape = off; off += R * 8;
  l.dispatch_meta = off;  off += R * (size_t)l.num_local_experts * 4;
  l.signal_bytes = off;
  off = ep_align_up(off, 128);
  l.dispatch_stage = off; off += T * l.msg_bytes;
  l.meta_stage = off;     off += R * (size_t)l.num_local_experts * 4;
  off = ep_align_up(off, 128);
  l.combine_stage = off;  off += (size_t)l.num_local_experts * R * T * l.row_bytes;
  off = ep_align_up(off, 128);
  l.recv = off;
  /* clang-format on */
  {
    const size_t dispatch_recv = R * T * l.msg_bytes;
    const size_t combine_recv = E * T * l.row_bytes;
    off += dispatch_recv > combine_recv ? dispatch_recv : combine_recv;
  }
  l.half_bytes = ep_align_up(off, 128);
  l.total_bytes = 2 * l.half_bytes;
  return l;
}

/* The fields of an LL dispatch's shape that every rank must pass alike. */
typedef enum ep_ll_shape_field {
  EP_LL_SHAPE_AGREES = 0,
  EP_LL_SHAPE_TOKENS = 1,  /* max_tokens_per_rank (T) */
  EP_LL_SHAPE_HIDDEN = 2,  /* hidden (H) */
  EP_LL_SHAPE_EXPERTS = 3, /* num_experts (E) */
  EP_LL_SHAPE_FP8 = 4,     /* recv_dtype: 1 for EP_FP8_E4M3, 0 for EP_BF16 */
} ep_ll_shape_field_t;

/* A dispatch's shape in one word: T (14 bits, <= 8192), E (18 bits, < 2^18), H (31 bits), FP8 (the top bit). */
static inline EP_HD uint64_t ep_ll_shape_word(int max_tokens, int hidden, int num_experts, int fp8) {
  return (uint64_t)max_tokens | (uint64_t)num_experts << 14 | (uint64_t)hidden << 32 | (uint64_t)(fp8 != 0) << 63;
}

static inline EP_HD long long ep_ll_shape_value(uint64_t word, int field) {
  switch (field) {
    case EP_LL_SHAPE_TOKENS: return (long long)(word & 0x3fffu);
    case EP_LL_SHAPE_EXPERTS: return (long long)(word >> 14 & 0x3ffffu);
    case EP_LL_SHAPE_HIDDEN: return (long long)(word >> 32 & 0x7fffffffu);
    case EP_LL_SHAPE_FP8: return (long long)(word >> 63);
    default: return 0;
  }
}

/* The first field in which two shape words differ, or EP_LL_SHAPE_AGREES. */
static inline EP_HD int ep_ll_shape_differs(uint64_t a, uint64_t b) {
  if (a == b) return EP_LL_SHAPE_AGREES;
  for (int f = EP_LL_SHAPE_TOKENS; f <= EP_LL_SHAPE_FP8; ++f)
    if (ep_ll_shape_value(a, f) != ep_ll_shape_value(b, f)) return f;
  return EP_LL_SHAPE_AGREES;
}

/* The field's name in messages: the argument of ep_ll_dispatch_args_t. */
static inline const char* ep_ll_shape_field_name(int field) {
  switch (field) {
    case EP_LL_SHAPE_TOKENS: return "max_tokens_per_rank";
    case EP_LL_SHAPE_HIDDEN: return "hidden";
    case EP_LL_SHAPE_EXPERTS: return "num_experts";
    case EP_LL_SHAPE_FP8: return "recv_dtype FP8 (1) / BF16 (0)";
    default: return "shape";
  }
}

/* A group sized in bytes (config.ll_region_bytes): each half is bytes / 2, 128-aligned down, whatever the shape. A
 * dispatch lays its half out for its own shape (T, H, E of the call, K = config.max_topk); the words of the signal
 * protocol sit at the same offsets in every layout (they depend on R only), so shapes may change from call to call.
 * Returns the call's layout with the group's halves, or its own halves (which the bytes then do not hold) if it does
 * not fit. */
static inline EP_HD size_t ep_ll_budget_half(size_t bytes) { return bytes / 2 / 128 * 128; }

static inline EP_HD ep_ll_region_t ep_ll_region_in(size_t bytes, int num_ranks, int num_experts, int max_tokens,
                                                   int hidden, int max_topk) {
  ep_ll_region_t l = ep_ll_region(num_ranks, num_experts, max_tokens, hidden, max_topk);
  if (l.half_bytes <= ep_ll_budget_half(bytes)) {
    l.half_bytes = ep_ll_budget_half(bytes);
    l.total_bytes = 2 * l.half_bytes;
  }
  return l;
}

/* The most experts (a multiple of num_ranks, below max_experts) whose shape (T, H, K) fits in `bytes`, or 0: what
 * a group sized in bytes sizes its handles' routing arrays for. */
static inline size_t ep_ll_budget_experts(size_t bytes, int num_ranks, int max_tokens, int hidden, int max_topk,
                                          int max_experts) {
  size_t lo = 0, hi = (size_t)(max_experts - 1) / (size_t)num_ranks; /* experts per rank */
  while (lo < hi) {
    const size_t mid = (lo + hi + 1) / 2;
    if (ep_ll_region(num_ranks, (int)mid * num_ranks, max_tokens, hidden, max_topk).half_bytes <=
        ep_ll_budget_half(bytes))
      lo = mid;
    else hi = mid - 1;
  }
  return lo * (size_t)num_ranks;
}

/* A combine with sums on the experts' ranks: where its rows land, after the dispatch's messages (inside one half). */
static inline EP_HD size_t ep_ll_recv_sums(const ep_ll_region_t* l) {
  return l->recv + (size_t)l->num_ranks * l->max_tokens * l->msg_bytes;
}

/* Whether they fit in the receive area: from 3 experts per rank on. Below that they save little, and the buffer does
 * not grow for them. */
static inline EP_HD int ep_ll_sums_fit(const ep_ll_region_t* l) {
  const size_t RT = (size_t)l->num_ranks * l->max_tokens;
  const size_t combine_recv = (size_t)l->num_experts * l->max_tokens * l->row_bytes;
  const size_t most = RT * l->msg_bytes > combine_recv ? RT * l->msg_bytes : combine_recv;
  return RT * (l->msg_bytes + l->row_bytes) <= most;
}

/* The LL handle's device arrays (ep_ll_handle_t), in one allocation carved by ep_ll_handle_carve; T and K are the
 * group's (config.ll_max_tokens_per_rank, config.max_topk), E_loc its experts per rank. */
typedef struct ep_ll_handle_view {
  int* slot_of;                   /* [T][K]: combine receive row (e * T + j) of my (t, k), or -1 */
  int* rank_slot_of;              /* [T][K]: with dispatch weights, the receive row of a sum (d * T + p: my token's
                                     message slot p at rank d) at the token's first slot on rank d, or -1 */
  int* msg_off;                   /* [R + 1]: first received message of each source (dispatch receive order);
                                     [R] = their number */
  int* src_info;                  /* [E_loc][R * T] */
  int64_t* layout_range;          /* [E_loc][R] (begin << 32) | count */
  unsigned long long* ops;        /* [2] call numbers of the handle's dispatch and combine */
} ep_ll_handle_view_t;

/* Where each array of an LL handle lives in `memory` (NULL: nowhere, only the size is wanted); returns the bytes
 * they take. Arrays start on 16-byte boundaries. */
static inline size_t ep_ll_handle_carve(const ep_ll_region_t* l, void* memory, ep_ll_handle_view_t* view) {
  const size_t R = (size_t)l->num_ranks, T = (size_t)l->max_tokens, E_loc = (size_t)l->num_local_experts;
  const size_t K = (size_t)l->max_topk;
  const size_t slot = ep_align_up(T * K * sizeof(int), 16);
  const size_t msg_off = slot + slot, src_info = msg_off + ep_align_up((R + 1) * sizeof(int), 16);
  const size_t layout_range = src_info + ep_align_up(E_loc * R * T * sizeof(int), 16);
  const size_t ops = layout_range + ep_align_up(E_loc * R * sizeof(int64_t), 16);
  char* m = (char*)memory;
  if (view) {
    view->slot_of = m ? (int*)m : NULL;
    view->rank_slot_of = m ? (int*)(m + slot) : NULL;
    view->msg_off = m ? (int*)(m + msg_off) : NULL;
    view->src_info = m ? (int*)(m + src_info) : NULL;
    view->layout_range = m ? (int64_t*)(m + layout_range) : NULL;
    view->ops = m ? (unsigned long long*)(m + ops) : NULL;
  }
  return ops + 16;
}

#endif /* EP_KERNELS_LL_REGION_H */
