// ll_combine.cuh: the LL combine's two phases, as device functions that low_latency.cu's kernels call: the send
// phase (each expert output row back to its source rank's receive row, counts) and the receive phase (the weighted
// sum over top-k in a fixed order).
#ifndef EP_KERNELS_LL_COMBINE_CUH
#define EP_KERNELS_LL_COMBINE_CUH

#include "kernels/ll_common.cuh"
#include "kernels/ll_logfmt.h"

namespace ep {
namespace ll {

constexpr int kChunk = 256;  // channels one warp combines per unit (8 per lane)
// 16-byte words a lane of the send phase loads before it stores them. Fewer than kCopyBatch: a warp's stores then
// start after a part of its loads, not after all of them. One rank of an H200, 128 tokens of hidden 7168 (a unit is
// 448 words): combine 27.1 us with 8 words, 26.1 with 4, 26.8 with 2; 16 words cost 5 us more than 8.
constexpr int kCombineBatch = 4;

// ---------------------------------------------------------------------------------------------------------------
// Combine, send phase, in one of two forms:
//  - rows (the default): all received rows of all local experts form one flat list (experts in order, rows in
//    order), split over every warp of the phase's grid in (row, part) units: a warp loads its part of the expert
//    output with non-coherent loads, kCombineBatch 16-byte words per lane in flight, and stores it into its source
//    rank's combine receive row (expert, position of the token among that rank's tokens for the expert);
//  - sums on the experts' ranks (sum_on_expert_ranks, the dispatch carried weights): all received messages
//    (tokens) in receive order, split in (message, part) units: a warp reads the message's pairs (still in the
//    receive area), sums, in fp32 and in the pairs' order, the weighted rows of the token's experts on this rank
//    and stores the bf16 sum into the source's sums row (this rank, the token's message slot here). A token with
//    several experts here crosses the link once.
// Rows for another node go whole, through the stage, by put-with-signal. No grid-wide barrier: each block, after a
// block barrier behind its stores, adds its number of units to each NVLink rank's signal word; block r % blocks
// adds the high half ((units to r) + 1) << 32 (for another node: (rows to r) + 1, the puts counting themselves).
// ---------------------------------------------------------------------------------------------------------------

// Words [w0, w1) of a row, loaded with kCombineBatch words per lane in flight and stored to dst.
__device__ __forceinline__ void copy_words(int4* dst, const int4* src, int w0, int w1, int lane) {
  for (int base = w0; base < w1; base += kCombineBatch * 32) {
    int4 v[kCombineBatch];
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b)
      if (base + b * 32 + lane < w1) v[b] = ld_input(src + base + b * 32 + lane);
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b)
      if (base + b * 32 + lane < w1) dst[base + b * 32 + lane] = v[b];
  }
}

__device__ __forceinline__ void fma_bf16x8(float (&acc)[8], float w, const int4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const float2 f = __bfloat1622float2(h[u]);
    acc[2 * u] = fmaf(w, f.x, acc[2 * u]);
    acc[2 * u + 1] = fmaf(w, f.y, acc[2 * u + 1]);
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
  int4 packed;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
  return packed;
}

// Words [w0, w1) of a token's sum over the rows of y named by the lanes in `lanes` (lane order): each such lane holds
// its row as (flat row of y, weight); sum_i fmaf(w_i, row_i, acc) from 0, rounded to bf16 once, into dst. dst may be
// one of the rows itself: a lane reads each of its words from every row before it writes that word.
__device__ __forceinline__ void sum_words(int4* dst, const char* y, size_t row_bytes, unsigned lanes, int flat,
                                          float weight, int w0, int w1, int lane) {
  for (int base = w0; base < w1; base += kCombineBatch * 32) {
    float acc[kCombineBatch][8];
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b)
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[b][c] = 0.0f;
    for (unsigned m = lanes; m; m &= m - 1) {
      const int from = __ffs(m) - 1;
      const int4* src =
          reinterpret_cast<const int4*>(y + (size_t)__shfl_sync(0xffffffffu, flat, from) * row_bytes);
      const float w = __shfl_sync(0xffffffffu, weight, from);
      int4 v[kCombineBatch];
#pragma unroll
      for (int b = 0; b < kCombineBatch; ++b)
        if (base + b * 32 + lane < w1) v[b] = ld_input(src + base + b * 32 + lane);
#pragma unroll
      for (int b = 0; b < kCombineBatch; ++b)
        if (base + b * 32 + lane < w1) fma_bf16x8(acc[b], w, v[b]);
    }
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b)
      if (base + b * 32 + lane < w1) dst[base + b * 32 + lane] = pack_bf16x8(acc[b]);
  }
}

// LogFMT-10 (ll_logfmt.h): groups [g0, g1) of a bf16 row of H channels, encoded into the row `dst`. A warp takes a
// group at a time, 4 channels per lane, kGroupBatch groups' loads in flight; the group's largest and smallest normal
// magnitudes are two warp reductions of bf16 bits (magnitudes order as integers).
constexpr int kGroupBatch = 4;

__device__ __forceinline__ void encode_groups(char* dst, const char* src, int H, int g0, int g1, int lane) {
  const int G = H / 128;
  for (int base = g0; base < g1; base += kGroupBatch) {
    int2 raw[kGroupBatch];
#pragma unroll
    for (int b = 0; b < kGroupBatch; ++b)
      if (base + b < g1) raw[b] = ld_nc_v2(src + ((size_t)(base + b) * 128 + lane * 4) * 2);
#pragma unroll
    for (int b = 0; b < kGroupBatch; ++b) {
      const int g = base + b;
      if (g >= g1) break;
      const uint32_t v[4] = {(uint32_t)raw[b].x & 0xffffu, (uint32_t)raw[b].x >> 16, (uint32_t)raw[b].y & 0xffffu,
                             (uint32_t)raw[b].y >> 16};
      uint32_t hi = 0, lo = 0x7f80u;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint32_t a = v[q] & 0x7fffu;
        hi = max(hi, a);
        if (a >= 0x0080u) lo = min(lo, a);
      }
      hi = __reduce_max_sync(0xffffffffu, hi);
      lo = __reduce_min_sync(0xffffffffu, lo);
      const uint32_t meta = hi | (lo == 0x7f80u ? 0u : lo) << 16;
      float lb, step;
      ep_logfmt_grid(meta, &lb, &step);
      const float inv = 1.0f / step;
      uint32_t low = 0, high = 0;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint32_t f = ep_logfmt_field(v[q], lb, step, inv);
        low |= (f & 255u) << (8 * q);
        high |= (f >> 8) << (2 * q);
      }
      char* block = dst + (size_t)G * 4 + (size_t)g * 160;
      *reinterpret_cast<uint32_t*>(block + lane * 4) = low;
      block[128 + lane] = (char)high;
      if (lane == 0) *reinterpret_cast<uint32_t*>(dst + (size_t)g * 4) = meta;
    }
  }
}

// The rows form's units. s_range [E_loc][R], s_first [E_loc + 1] (filled by the caller). Returns its parts per row.
// With kLogfmt a unit's part is a run of 128-channel groups, encoded on the way (ll_logfmt.h).
template <bool kLogfmt, bool kMask>
__device__ __forceinline__ int send_rows(const ep_ll_launch_t& p, Grid grid, const int2* s_range, const int* s_first,
                                         int* s_units) {
  const ep_ll_region_t& L = p.group.region;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int me = p.group.rank, R = p.group.num_ranks, E_loc = p.call.num_experts / R;
  const size_t RT = (size_t)R * p.call.max_tokens, row_bytes = (size_t)p.call.hidden * 2;
  const int row_words = p.call.hidden * 2 / 16;
  const int row_parts = kLogfmt ? p.call.hidden / 128 : row_words;  // what a unit's parts split
  const size_t half = half_offset(p);
  char* stage = p.group.ll_base + half + L.combine_stage;  // [E_loc][RT][H] bf16: the zero-copy buffer
  const int total = s_first[E_loc];
  const int total_warps = grid.blocks * kSendWarps;
  const int parts = parts_per_unit(total_warps, total);
  for (int u = grid.block * kSendWarps + warp; u < total * parts; u += total_warps) {
    const int flat = u / parts, part = u % parts;
    const int le = last_start_at_most(s_first, E_loc, flat), row = flat - s_first[le];
    const int2* range = s_range + (size_t)le * R;
    int slo = 0, shi = R - 1;  // the last source whose first row is <= row
    while (slo < shi) {
      const int mid = (slo + shi + 1) >> 1;
      if (range[mid].x <= row) slo = mid;
      else shi = mid - 1;
    }
    const int s = slo;
    if (masked<kMask>(p, s)) continue;  // masked after its tokens came: it waits for nothing from this rank
    const int j = row - range[s].x;
    const size_t src_off = ((size_t)le * RT + row) * row_bytes;
    const char* src = p.call.zero_copy ? stage + src_off : (const char*)p.call.y + src_off;
    const size_t offset = half + L.recv + ((size_t)(me * E_loc + le) * L.max_tokens + j) * L.row_bytes;
    char* peer = nvlink_peer(p, s);
    if (peer) {
      const int2 w = part_range(part, parts, row_parts);  // row_parts <= 8192
      if constexpr (kLogfmt) encode_groups(peer + offset, src, p.call.hidden, w.x, w.y, lane);
      else copy_words(reinterpret_cast<int4*>(peer + offset), reinterpret_cast<const int4*>(src), w.x, w.y, lane);
      if (lane == 0) atomicAdd(&s_units[s], 1);
    } else if (part == 0) {
      size_t bytes = row_bytes;
      if constexpr (kLogfmt) {  // encoded into the row's place in the stage (no zero-copy with LogFMT)
        encode_groups(stage + src_off, src, p.call.hidden, 0, row_parts, lane);
        bytes = ep_align_up(ep_logfmt_row_bytes(p.call.hidden), 16);
        __syncwarp();
      } else if (!p.call.zero_copy) {
        warp_copy<false, kCopyBatch>(stage + src_off, src, 0, row_words, lane);
        __syncwarp();
      }
      uint64_t* signal = reinterpret_cast<uint64_t*>(p.group.ll_base + half + L.combine_signal + (size_t)me * 8);
      tp::put_signal_warp(p.group.ll_base + offset, stage + src_off, bytes, signal, 1, /*add=*/true, s);
    }
  }
  return parts;
}

// The sums form's units. s_range as for the rows; s_moff [R + 1]: the dispatch's message offsets per source. The
// dispatch's messages are still in the receive area (the sums go after them, ep_ll_recv_sums): each unit reads its
// message's pairs. Returns its parts per message.
template <bool kMask>
__device__ __forceinline__ int send_sums(const ep_ll_launch_t& p, Grid grid, const int2* s_range, const int* s_moff,
                                         int* s_units) {
  const ep_ll_region_t& L = p.group.region;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int me = p.group.rank, R = p.group.num_ranks, E_loc = p.call.num_experts / R;
  const size_t RT = (size_t)R * p.call.max_tokens, row_bytes = (size_t)p.call.hidden * 2;
  const int row_words = p.call.hidden * 2 / 16;
  const size_t half = half_offset(p);
  const char* msgs = p.group.ll_base + half + L.recv;
  char* stage = p.group.ll_base + half + L.combine_stage;
  const char* y = p.call.zero_copy ? stage : (const char*)p.call.y;
  const int total = s_moff[R];
  const int total_warps = grid.blocks * kSendWarps;
  const int parts = parts_per_unit(total_warps, total);
  for (int u = grid.block * kSendWarps + warp; u < total * parts; u += total_warps) {
    const int m = u / parts, part = u % parts;
    const int s = last_start_at_most(s_moff, R, m), slot = m - s_moff[s];
    if (masked<kMask>(p, s)) continue;
    const char* msg = msgs + ((size_t)s * L.max_tokens + slot) * L.msg_bytes;
    const int2 head = ld_nc_v2(msg);  // (token, npairs): loaded with the pairs, as the dispatch's receive does
    const int2 pair = lane < min(L.max_topk, 32) ? ld_nc_v2(msg + 8 + 8 * lane) : make_int2(-1, 0);
    const int le = pair_expert(pair) - me * E_loc;
    const bool mine = lane < head.y && pair.x >= 0 && (unsigned)le < (unsigned)E_loc;
    const unsigned lanes = __ballot_sync(0xffffffffu, mine);
    const int flat = mine ? (int)(le * RT) + s_range[le * R + s].x + pair_slot(pair) : 0;
    const float weight = pair_weight(pair);
    const size_t offset = half + ep_ll_recv_sums(&L) + ((size_t)me * L.max_tokens + slot) * L.row_bytes;
    char* peer = nvlink_peer(p, s);
    if (peer) {
      const int2 w = part_range(part, parts, row_words);
      sum_words(reinterpret_cast<int4*>(peer + offset), y, row_bytes, lanes, flat, weight, w.x, w.y, lane);
      if (lane == 0) atomicAdd(&s_units[s], 1);
    } else if (part == 0) {  // the sum into the stage, over the message's first row here, then one put
      char* staged = stage + (size_t)__shfl_sync(0xffffffffu, flat, __ffs(lanes) - 1) * row_bytes;
      sum_words(reinterpret_cast<int4*>(staged), y, row_bytes, lanes, flat, weight, 0, row_words, lane);
      __syncwarp();
      uint64_t* signal = reinterpret_cast<uint64_t*>(p.group.ll_base + half + L.combine_signal + (size_t)me * 8);
      tp::put_signal_warp(p.group.ll_base + offset, staged, row_bytes, signal, 1, /*add=*/true, s);
    }
  }
  return parts;
}

// One block's send phase of call `op`, in the form of kCall (rows, sums, LogFMT rows). False if the block gave up
// (an acknowledgement timed out; the fault is recorded): the caller then stops, with no receive phase.
template <Call kCall, bool kMask>
__device__ __forceinline__ bool combine_send(const ep_ll_launch_t& p, Grid grid, uint64_t op) {
  constexpr bool kSums = kCall == Call::kCombineSums;
  extern __shared__ int s_dyn[];
  const ep_ll_region_t& L = p.group.region;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int R = p.group.num_ranks, E_loc = p.call.num_experts / R;
  const size_t half = half_offset(p);
  LL_PROF_STAMP(kProfCombineSend, grid, 0);
  if (grid.block == 0 && tid == 0) p.handle.ops[1] = op;        // the call number for a later receive kernel (the hook)
  int* s_rows = s_dyn;                                          // [R] rows (or messages) to each rank
  int* s_units = s_rows + R;                                    // [R] units of this block to each NVLink rank
  int2* s_range = reinterpret_cast<int2*>(s_units + R);         // [E_loc][R] (begin, count) of layout_range
  int* s_first = reinterpret_cast<int*>(s_range + E_loc * R);   // rows: [E_loc + 1] first flat row of each expert
  int* s_moff = s_first;                                        // sums: [R + 1] the dispatch's message offsets
  for (int r = tid; r < R; r += blockDim.x) s_rows[r] = s_units[r] = 0;
  for (int i = tid; i < E_loc * R; i += blockDim.x) {
    const int64_t v = p.handle.layout_range[i];
    s_range[i] = make_int2((int)(v >> 32), (int)(uint32_t)v);
  }
  if constexpr (kSums)
    for (int i = tid; i <= R; i += blockDim.x) s_moff[i] = p.handle.msg_off[i];
  const bool acks_ok = poll_acks<kMask>(p, op, EP_SITE_LL_COMBINE_ACK);  // overlaps the loads above
  if (__syncthreads_or(!acks_ok)) return false;
  LL_PROF_STAMP(kProfCombineSend, grid, 1);
  if constexpr (kSums) {
    for (int r = tid; r < R; r += blockDim.x)
      if (publishes_for(r, grid)) s_rows[r] = s_moff[r + 1] - s_moff[r];
  } else {
    if (warp == 0) {  // rows per expert (begin + count of the last source), exclusive scan
      int run = 0;
      for (int base = 0; base < E_loc; base += 32) {
        int v = 0;
        if (base + lane < E_loc) {
          const int2 last = s_range[(base + lane) * R + R - 1];
          v = last.x + last.y;
        }
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int n = __shfl_up_sync(0xffffffffu, v, o);
          if (lane >= o) v += n;
        }
        if (base + lane < E_loc) s_first[base + lane + 1] = run + v;
        run += __shfl_sync(0xffffffffu, v, 31);
      }
      if (lane == 0) s_first[0] = 0;
    }
    for (int i = tid; i < E_loc * R; i += blockDim.x)
      if (publishes_for(i % R, grid) && s_range[i].y) atomicAdd(&s_rows[i % R], s_range[i].y);
  }
  __syncthreads();

  int parts;
  if constexpr (kSums) parts = send_sums<kMask>(p, grid, s_range, s_moff, s_units);
  else parts = send_rows<kCall == Call::kCombineLogfmt, kMask>(p, grid, s_range, s_first, s_units);
  // The block's stores come before its counts through the barrier: each count is a release add after it (cumulative
  // over what the barrier ordered); the puts to other nodes count themselves.
  __syncthreads();
  LL_PROF_STAMP(kProfCombineSend, grid, 2);

  // NVLink rank r: lo counts (row, part) units, rows * parts in all; another node: lo counts rows (one per put).
  for (int r = tid; r < R; r += blockDim.x) {
    if (masked<kMask>(p, r)) continue;
    const bool pub = publishes_for(r, grid);
    const size_t offset = half + L.combine_signal + (size_t)p.group.rank * 8;
    char* peer = nvlink_peer(p, r);
    if (peer) {
      const uint64_t v = (uint64_t)s_units[r] + (pub ? (uint64_t)((long long)s_rows[r] * parts + 1) << 32 : 0);
      if (v) red_add_release_sys_u64(reinterpret_cast<uint64_t*>(peer + offset), v);
    } else if (pub) {
      tp::signal_add(reinterpret_cast<uint64_t*>(p.group.ll_base + offset), (uint64_t)(s_rows[r] + 1) << 32, r);
    }
  }
  LL_PROF_STAMP(kProfCombineSend, grid, 3);
  LL_PROF_FINISH(kProfCombineSend, grid, p.group.rank, 0);
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Combine, receive phase. Wait for every rank's rows (the warps' first slots and weights load meanwhile), then one
// warp per (token, 256 channels): out = bf16(sum over k in order of fmaf(w[t][k], row_k, acc)), skipping -1 slots;
// with sums on the experts' ranks, the same over the token's first slot on each rank, with the rank's sum as the row
// and weight 1 (an exact add).
// The last block zeroes the signals, acknowledges the call and advances the half's call number (finish_recv).
// ---------------------------------------------------------------------------------------------------------------
// The 8 values of channels [c, c + 8) of a LogFMT row (c % 8 == 0), weighted by w, into acc (fmaf each).
__device__ __forceinline__ void fma_logfmt8(float (&acc)[8], float w, const char* row, int H, int c) {
  const int G = H / 128, g = c / 128, j = c % 128;
  const uint32_t meta = *reinterpret_cast<const uint32_t*>(row + (size_t)g * 4);
  const char* block = row + (size_t)G * 4 + (size_t)g * 160;
  const uint32_t low[2] = {*reinterpret_cast<const uint32_t*>(block + j),
                           *reinterpret_cast<const uint32_t*>(block + j + 4)};
  const uint32_t high = *reinterpret_cast<const uint16_t*>(block + 128 + j / 4);
  float lb, step;
  ep_logfmt_grid(meta, &lb, &step);
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const uint32_t field = (low[q / 4] >> (8 * (q % 4)) & 255u) | (high >> (2 * q) & 3u) << 8;
    acc[q] = fmaf(w, ep_logfmt_value(field, lb, step), acc[q]);
  }
}

// A (token, 256 channels) unit's slots: lane k < K holds slot k's receive row (or -1) and weight. With the rank
// mask (kMask), a slot whose rows come from a masked rank is dropped, and with renormalize the kept weights are
// rescaled to the sum of the valid ones. A valid slot is one the dispatch routed (>= 0) or dropped because its expert's
// rank was masked then (-2); the rows form's slot names its expert (e * T + j), the sums form's its rank (d * T + p).
template <Call kCall, bool kMask>
__device__ __forceinline__ void mask_slot(const ep_ll_launch_t& p, int& slot, float& w) {
  if constexpr (kMask) {
    const int T = p.group.region.max_tokens;
    const bool valid = slot != -1;
    if (slot >= 0 && masked<kMask>(p, kCall == Call::kCombineSums ? slot / T : rank_of_expert(p, slot / T))) slot = -2;
    if (p.call.renormalize) {
      float all = valid ? w : 0.0f, kept = slot >= 0 ? w : 0.0f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        all += __shfl_xor_sync(0xffffffffu, all, o);
        kept += __shfl_xor_sync(0xffffffffu, kept, o);
      }
      w = kept != 0.0f ? w * (all / kept) : 0.0f;
    }
  }
}

// One block's receive phase, up to finish_recv, in the form of kCall. False if the block gave up (rows never came;
// the fault is recorded): the caller then stops, without arriving.
template <Call kCall, bool kMask>
__device__ __forceinline__ bool combine_recv(const ep_ll_launch_t& p, Grid grid) {
  constexpr bool kSums = kCall == Call::kCombineSums;
  const ep_ll_region_t& L = p.group.region;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.group.rank, R = p.group.num_ranks, K = p.call.num_topk, H = p.call.hidden;
  const size_t half = half_offset(p);
  char* mine = p.group.ll_base + half;
  const uint64_t* signals = reinterpret_cast<const uint64_t*>(mine + L.combine_signal);
  LL_PROF_STAMP(kProfCombineRecv, grid, 0);
  const char* rows = mine + (kSums ? ep_ll_recv_sums(&L) : L.recv);
  const int* slot_of = kSums ? p.handle.rank_slot_of : p.handle.slot_of;
  const int chunks = (H + kChunk - 1) / kChunk;
  const int units = p.call.num_tokens * chunks;
  const int u0 = grid.block * kRecvWarps + warp;
  // The first unit's slots and weights (this rank's own data) are loaded while the signals are awaited.
  int pre_slot = -1;
  float pre_w = 0.0f;
  if (u0 < units && lane < K) {
    const int t = u0 / chunks;
    pre_slot = slot_of[(size_t)t * L.max_topk + lane];
    pre_w = kSums ? 1.0f : p.call.topk_weights[(size_t)t * K + lane];
  }
  bool ok = true;
  const long long t0 = wait_stats_start(p, grid);
  for (int r = tid; ok && r < R; r += blockDim.x) {
    const WaitResult w =
        wait_peer<kMask>([&] { return count_complete(ld_acquire_sys_u64(signals + r)); }, p.group.timeout_ns,
                         p.group.error, p.group.mask, me, r, EP_SITE_LL_COMBINE_RECV);
    ok = w != kWaitFault;
    if (kMask ? w == kWaitReady : ok) wait_stats_add(p, grid, r, t0);
  }
  if (__syncthreads_or(!ok)) return false;
  LL_PROF_STAMP(kProfCombineRecv, grid, 1);

  for (int u = u0; u < units; u += grid.blocks * kRecvWarps) {
    const int t = u / chunks;
    const int c = (u % chunks) * kChunk + lane * 8;  // first channel of this lane
    const bool active = c < H;
    int my_slot = pre_slot;
    float my_w = pre_w;
    if (u != u0 && lane < K) {
      my_slot = slot_of[(size_t)t * L.max_topk + lane];
      my_w = kSums ? 1.0f : p.call.topk_weights[(size_t)t * K + lane];
    }
    // With a mask, every wait above is over: a rank masked by now sent no rows, and no block waits for it.
    mask_slot<kCall, kMask>(p, my_slot, my_w);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if constexpr (kCall == Call::kCombineLogfmt) {
      for (int k = 0; k < K; ++k) {  // in top-k order; decoding is the work, not the loads
        const int sl = __shfl_sync(0xffffffffu, my_slot, k & 31);
        const float w = __shfl_sync(0xffffffffu, my_w, k & 31);
        if (sl >= 0 && active) fma_logfmt8(acc, w, rows + (size_t)sl * L.row_bytes, H, c);
      }
    } else {
      for (int k0 = 0; k0 < K; k0 += 8) {
        int4 v[8];
        int slot[8];
        float w[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int k = k0 + i;
          const int sl = __shfl_sync(0xffffffffu, my_slot, k & 31);
          w[i] = __shfl_sync(0xffffffffu, my_w, k & 31);
          slot[i] = (k < K && active) ? sl : -1;
          if (slot[i] >= 0)
            v[i] = ld_nc_na(reinterpret_cast<const int4*>(rows + (size_t)slot[i] * L.row_bytes + c * 2));
        }
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (slot[i] >= 0) fma_bf16x8(acc, w[i], v[i]);
      }
    }
    if (active) *reinterpret_cast<int4*>((char*)p.call.out + ((size_t)t * H + c) * 2) = pack_bf16x8(acc);
  }
  LL_PROF_STAMP(kProfCombineRecv, grid, 2);
  return true;
}

}  // namespace ll
}  // namespace ep

#endif  // EP_KERNELS_LL_COMBINE_CUH
