// ll_combine.cuh: the LL combine's two phases, as device functions that low_latency.cu's kernels call: the send
// phase (each expert output row back to its source rank's receive row, counts) and the receive phase (the weighted
// sum over top-k in a fixed order).
#ifndef EP_KERNELS_LL_COMBINE_CUH
#define EP_KERNELS_LL_COMBINE_CUH

#include "kernels/ll_common.cuh"

namespace ep {
namespace ll {

constexpr int kChunk = 256;  // channels one warp combines per unit (8 per lane)
// 16-byte words a lane of the send phase loads before it stores them. Fewer than kCopyBatch: a warp's stores then
// start after a part of its loads, not after all of them (one rank, H200: 4 words -1.0 us against 8, 2 -0.3,
// 16 +5; bench/RESULTS.md session 8).
constexpr int kCombineBatch = 4;

// ---------------------------------------------------------------------------------------------------------------
// Combine, send phase. All received rows of all local experts form one flat list (experts in order, rows in
// order), split over every warp of the phase's grid in (row, part) units: a warp loads its part of the expert
// output with non-coherent loads, kCombineBatch 16-byte words per lane in flight, and stores it into its source rank's
// combine receive row (expert, position of the token among that rank's tokens for the expert). Rows for another
// node go whole, through the stage, by put-with-signal. No grid-wide barrier: each block, after a block barrier
// behind its stores, adds its number of units to each NVLink rank's signal word; block r % blocks adds the high half
// ((units to r) + 1) << 32 (for another node: (rows to r) + 1, the puts counting themselves).
// ---------------------------------------------------------------------------------------------------------------
// One block's send phase of call `op`. False if the block gave up (an acknowledgement timed out; the fault is
// recorded): the caller then stops, with no receive phase.
__device__ __forceinline__ bool combine_send(const ep_ll_launch_t& p, Grid grid, uint64_t op) {
  extern __shared__ int s_dyn[];
  const ep_ll_layout_t& L = p.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.rank, R = p.num_ranks, E_loc = p.num_experts / R, H = p.hidden;
  const size_t RT = (size_t)R * p.max_tokens, row_bytes = (size_t)H * 2;
  const int row_words = H * 2 / 16;
  const size_t half = half_offset(p);
  char* stage = p.ll_base + half + L.combine_stage;  // [E_loc][RT][H] bf16: the zero-copy buffer
  LL_PROF_STAMP(kProfCombineSend, grid, 0);
  if (grid.block == 0 && tid == 0) p.ops[1] = op;  // the call number for a later receive kernel (the hook)
  int2* s_range = reinterpret_cast<int2*>(s_dyn);           // [E_loc][R] (begin, count) of layout_range
  int* s_first = reinterpret_cast<int*>(s_range + E_loc * R);  // [E_loc + 1]: first flat row of each local expert
  int* s_rows = s_first + E_loc + 1;                         // [R] rows to each rank
  int* s_units = s_rows + R;                                 // [R] units of this block to each NVLink rank
  for (int r = tid; r < R; r += blockDim.x) s_rows[r] = s_units[r] = 0;
  for (int i = tid; i < E_loc * R; i += blockDim.x) {
    const int64_t v = p.layout_range[i];
    s_range[i] = make_int2((int)(v >> 32), (int)(uint32_t)v);
  }
  const bool acks_ok = poll_acks(p, op, EP_SITE_LL_COMBINE_ACK);  // overlaps the loads above
  if (__syncthreads_or(!acks_ok)) return false;
  LL_PROF_STAMP(kProfCombineSend, grid, 1);
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
  __syncthreads();

  const int total = s_first[E_loc];
  const int total_warps = grid.blocks * kSendWarps;
  const int parts = max(1, min(8, total_warps / max(total, 1)));
  for (int u = grid.block * kSendWarps + warp; u < total * parts; u += total_warps) {
    const int flat = u / parts, part = u % parts;
    int lo = 0, hi = E_loc - 1;  // the last expert whose first row is <= flat (empty experts are skipped)
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (s_first[mid] <= flat) lo = mid;
      else hi = mid - 1;
    }
    const int le = lo, row = flat - s_first[le];
    const int2* range = s_range + (size_t)le * R;
    int slo = 0, shi = R - 1;  // the last source whose first row is <= row
    while (slo < shi) {
      const int mid = (slo + shi + 1) >> 1;
      if (range[mid].x <= row) slo = mid;
      else shi = mid - 1;
    }
    const int s = slo;
    const int j = row - range[s].x;
    const size_t src_off = ((size_t)le * RT + row) * row_bytes;
    const char* src = p.zero_copy ? stage + src_off : (const char*)p.y + src_off;
    const size_t offset = half + L.recv + ((size_t)(me * E_loc + le) * L.max_tokens + j) * L.row_bytes;
    char* peer = nvlink_peer(p, s);
    if (peer) {
      const int w0 = row_words * part / parts, w1 = row_words * (part + 1) / parts;  // 32-bit: row_words <= 8192
      const int4* sv = reinterpret_cast<const int4*>(src);
      int4* dv = reinterpret_cast<int4*>(peer + offset);
      for (int base = w0; base < w1; base += kCombineBatch * 32) {
        int4 v[kCombineBatch];
#pragma unroll
        for (int b = 0; b < kCombineBatch; ++b)
          if (base + b * 32 + lane < w1) v[b] = ld_input(sv + base + b * 32 + lane);
#pragma unroll
        for (int b = 0; b < kCombineBatch; ++b)
          if (base + b * 32 + lane < w1) dv[base + b * 32 + lane] = v[b];
      }
      if (lane == 0) atomicAdd(&s_units[s], 1);
    } else if (part == 0) {
      if (!p.zero_copy) {
        warp_copy<false, kCopyBatch>(stage + src_off, src, 0, row_words, lane);
        __syncwarp();
      }
      uint64_t* signal = reinterpret_cast<uint64_t*>(p.ll_base + half + L.combine_signal + (size_t)me * 8);
      tp::put_signal_warp(p.ll_base + offset, stage + src_off, row_bytes, signal, 1, /*add=*/true, s);
    }
  }
  // The block's stores come before its counts through the barrier: each count is a release add after it (cumulative
  // over what the barrier ordered); the puts to other nodes count themselves.
  __syncthreads();
  LL_PROF_STAMP(kProfCombineSend, grid, 2);

  // NVLink rank r: lo counts (row, part) units, rows * parts in all; another node: lo counts rows (one per put).
  for (int r = tid; r < R; r += blockDim.x) {
    const bool pub = publishes_for(r, grid);
    const size_t offset = half + L.combine_signal + (size_t)me * 8;
    char* peer = nvlink_peer(p, r);
    if (peer) {
      const uint64_t v = (uint64_t)s_units[r] + (pub ? (uint64_t)((long long)s_rows[r] * parts + 1) << 32 : 0);
      if (v) red_add_release_sys_u64(reinterpret_cast<uint64_t*>(peer + offset), v);
    } else if (pub) {
      tp::signal_add(reinterpret_cast<uint64_t*>(p.ll_base + offset), (uint64_t)(s_rows[r] + 1) << 32, r);
    }
  }
  LL_PROF_STAMP(kProfCombineSend, grid, 3);
  LL_PROF_FINISH(kProfCombineSend, grid, me, 0);
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Combine, receive phase. Wait for every rank's rows (the warps' first slots and weights load meanwhile), then one
// warp per (token, 256 channels): out = bf16(sum over k in order of fmaf(w[t][k], row_k, acc)), skipping -1 slots.
// The last block zeroes the signals, acknowledges the call and advances the half's call number (finish_recv).
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ void fma_bf16x8(float (&acc)[8], float w, const int4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const float2 f = __bfloat1622float2(h[u]);
    acc[2 * u] = fmaf(w, f.x, acc[2 * u]);
    acc[2 * u + 1] = fmaf(w, f.y, acc[2 * u + 1]);
  }
}

// One block's receive phase, up to finish_recv. False if the block gave up (rows never came; the fault is
// recorded): the caller then stops, without arriving.
__device__ __forceinline__ bool combine_recv(const ep_ll_launch_t& p, Grid grid) {
  const ep_ll_layout_t& L = p.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.rank, R = p.num_ranks, K = p.num_topk, H = p.hidden;
  const size_t half = half_offset(p);
  char* mine = p.ll_base + half;
  const uint64_t* signals = reinterpret_cast<const uint64_t*>(mine + L.combine_signal);
  LL_PROF_STAMP(kProfCombineRecv, grid, 0);
  const char* rows = mine + L.recv;
  const int chunks = (H + kChunk - 1) / kChunk;
  const int units = p.num_tokens * chunks;
  const int u0 = grid.block * kRecvWarps + warp;
  // The first unit's slots and weights (this rank's own data) are loaded while the signals are awaited.
  int pre_slot = -1;
  float pre_w = 0.0f;
  if (u0 < units && lane < K) {
    const int t = u0 / chunks;
    pre_slot = p.slot_of[(size_t)t * L.max_topk + lane];
    pre_w = p.topk_weights[(size_t)t * K + lane];
  }
  bool ok = true;
  for (int r = tid; ok && r < R; r += blockDim.x)
    ok = wait_until([&] { return count_complete(ld_acquire_sys_u64(signals + r)); }, p.timeout_ns, p.error, me, r,
                    EP_SITE_LL_COMBINE_RECV);
  if (__syncthreads_or(!ok)) return false;
  LL_PROF_STAMP(kProfCombineRecv, grid, 1);

  for (int u = u0; u < units; u += grid.blocks * kRecvWarps) {
    const int t = u / chunks;
    const int c = (u % chunks) * kChunk + lane * 8;  // first channel of this lane
    const bool active = c < H;
    int my_slot = pre_slot;
    float my_w = pre_w;
    if (u != u0 && lane < K) {
      my_slot = p.slot_of[(size_t)t * L.max_topk + lane];
      my_w = p.topk_weights[(size_t)t * K + lane];
    }
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
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
        if (slot[i] >= 0) v[i] = ld_nc_na(reinterpret_cast<const int4*>(rows + (size_t)slot[i] * L.row_bytes + c * 2));
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (slot[i] >= 0) fma_bf16x8(acc, w[i], v[i]);
    }
    if (active) {
      int4 packed;
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
      for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
      *reinterpret_cast<int4*>((char*)p.out + ((size_t)t * H + c) * 2) = packed;
    }
  }

  LL_PROF_STAMP(kProfCombineRecv, grid, 2);
  return true;
}

}  // namespace ll
}  // namespace ep

#endif  // EP_KERNELS_LL_COMBINE_CUH
