/* ll_layout.h: where everything of the low-latency (LL) path lives in a rank's symmetric memory. One function
 * computes it, for the host (to size the heap) and for the kernels (to find a peer's regions).
 *
 * The LL region is two identical halves. A dispatch takes the next half (the host alternates them) and its
 * handle's combine uses the same half. Inside one half (T = config.ll_max_tokens_per_rank, H = config.hidden,
 * E = config.num_experts, E_loc = E / R):
 *
 *   uint64 dispatch_count[E_loc][R]  from source s for my local expert e: how many messages s sent (see below)
 *   uint64 combine_signal[R]         from rank r: how many combine rows r sent me
 *   uint64 ack[R]                    from rank r: the last call number on this half whose receive phase r finished
 *   bytes  dispatch_stage[T][msg]    my tokens as messages (header + payload), the source of every send
 *   bytes  combine_stage[E_loc*R*T][2H]  expert outputs on their way back; the zero-copy buffer
 *   bytes  recv                      the receive area, used by one call at a time:
 *            dispatch: [E_loc][R][T] messages, slot j of (e, s) = the j-th token of s that selects e
 *            combine:  [E][T] rows of 2H, row (e, j) = the output of global expert e for my j-th token that selects it
 *
 * A message is a 16-byte header (int32 source token index, 3 spare) and the payload: FP8 e4m3 [H] then fp32
 * scales [H / 128], or BF16 [H]; its stride `msg_bytes` = align16(16 + max(2H, H + H / 32)).
 *
 * Counts and signals need no reset between calls: a sender adds 1 per message put (put-with-signal, ADD) and,
 * once all are issued, adds (n + 1) << 32; over NVLink it stores that final value ((n + 1) << 32 | n) once,
 * with release semantics, after its stores. A receiver waits for hi >= 1 and lo == hi - 1, reads n = hi - 1,
 * and zeroes the word when the call's receive phase is done, before it acknowledges: no sender writes the word
 * again before that acknowledgement. Call numbers (acks) grow for ever (device counters, so graph replays count). */
#ifndef EP_KERNELS_LL_LAYOUT_H
#define EP_KERNELS_LL_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/normal_layout.h" /* EP_HD, ep_align_up */

typedef struct ep_ll_layout {
  int num_ranks, max_tokens, hidden, num_experts, num_local_experts, max_topk;
  size_t msg_bytes;      /* stride of a dispatch message */
  size_t row_bytes;      /* stride of a combine row: 2 * hidden */
  /* offsets inside one half */
  size_t dispatch_count, combine_signal, ack, signal_bytes; /* signal_bytes: the words above, zeroed by a clean */
  size_t dispatch_stage, combine_stage, recv;
  size_t half_bytes;     /* one half, 128-aligned */
  size_t total_bytes;    /* both halves */
} ep_ll_layout_t;

static inline EP_HD ep_ll_layout_t ep_ll_layout(int num_ranks, int num_experts, int max_tokens, int hidden,
                                                int max_topk) {
  ep_ll_layout_t l;
  const size_t R = (size_t)num_ranks, T = (size_t)max_tokens, H = (size_t)hidden, E = (size_t)num_experts;
  const size_t fp8_payload = H + H / 128 * 4, bf16_payload = 2 * H;
  l.num_ranks = num_ranks;
  l.max_tokens = max_tokens;
  l.hidden = hidden;
  l.num_experts = num_experts;
  l.num_local_experts = num_experts / num_ranks;
  l.max_topk = max_topk;
  l.msg_bytes = ep_align_up(16 + (fp8_payload > bf16_payload ? fp8_payload : bf16_payload), 16);
  l.row_bytes = 2 * H;
  size_t off = 0;
  l.dispatch_count = off; off += (size_t)l.num_local_experts * R * 8;
  l.combine_signal = off; off += R * 8;
  l.ack = off;            off += R * 8;
  l.signal_bytes = off;
  off = ep_align_up(off, 128);
  l.dispatch_stage = off; off += T * l.msg_bytes;
  off = ep_align_up(off, 128);
  l.combine_stage = off;  off += (size_t)l.num_local_experts * R * T * l.row_bytes;
  off = ep_align_up(off, 128);
  l.recv = off;
  {
    const size_t dispatch_recv = (size_t)l.num_local_experts * R * T * l.msg_bytes;
    const size_t combine_recv = E * T * l.row_bytes;
    off += dispatch_recv > combine_recv ? dispatch_recv : combine_recv;
  }
  l.half_bytes = ep_align_up(off, 128);
  l.total_bytes = 2 * l.half_bytes;
  return l;
}

#endif /* EP_KERNELS_LL_LAYOUT_H */
