// ll_dispatch.cuh: the LL dispatch's two phases, as device functions that low_latency.cu's kernels call: the send
// phase (routing prologue, FP8 cast in registers, stores / puts of one message per (token, destination rank),
// counts) and the receive phase (counts, row offsets, the copy of each message into its experts' rows).
#ifndef EP_KERNELS_LL_DISPATCH_CUH
#define EP_KERNELS_LL_DISPATCH_CUH

#include "kernels/ll_common.cuh"

namespace ep {
namespace ll {

// One (token, slot) per lane: a warp sees 32 / kp tokens from `t0` (those below `t_end`) at once, one coalesced
// load per lane, and finds repeated experts and repeated ranks inside each token with two warp matches.
struct SlotInfo {
  int t, k;
  bool in;      // a real (token, slot)
  int64_t e;    // the expert index as given (-1 for none; may be out of range)
  bool first;   // valid, and no earlier slot of the token has the same expert
  bool rfirst;  // valid, and no earlier valid slot of the token has an expert on the same rank
  int first_k;  // for a valid slot: the first slot with the same expert; else -1
  bool dropped;  // an expert in range on a masked rank: treated as -1, but its combine slot says -2 (renormalize)
};

template <bool kMask>
__device__ __forceinline__ SlotInfo slot_info(const ep_ll_launch_t& p, int t0, int t_end, int kp_log2, int lane) {
  const int K = p.call.num_topk, E = p.call.num_experts, kp_mask = (1 << kp_log2) - 1;
  SlotInfo si;
  si.t = t0 + (lane >> kp_log2);
  si.k = lane & kp_mask;
  si.in = si.t < t_end && si.k < K;
  si.e = si.in ? p.call.topk_idx[(size_t)si.t * K + si.k] : -1;
  // An expert on a masked rank is dropped here, as -1: no message, no slot, no combine row.
  const bool in_range = si.in && valid_expert(si.e, E);
  si.dropped = in_range && masked<kMask>(p, rank_of_expert(p, (int)si.e));
  const bool valid = in_range && !si.dropped;
  // Keys: (token, expert) and (token, rank) for valid slots; a value no valid slot has (unique per lane) otherwise.
  // 32-bit keys (a 64-bit match costs twice): the token's place in the warp (< 32) in the top 5 bits, under it the
  // expert or the rank; E + 32 < 2^27, since the send phase's shared histograms (2 * E ints) cap E far below.
  const uint32_t tkey = (uint32_t)(lane >> kp_log2) << 27;
  const uint32_t key_e = tkey | (uint32_t)(valid ? (int)si.e : E + lane);
  const uint32_t key_r = tkey | (uint32_t)(valid ? rank_of_expert(p, (int)si.e) : p.group.num_ranks + lane);
  const unsigned same_e = __match_any_sync(0xffffffffu, key_e);
  const unsigned same_r = __match_any_sync(0xffffffffu, key_r);
  si.first = valid && __ffs(same_e) - 1 == lane;
  si.rfirst = valid && __ffs(same_r) - 1 == lane;
  si.first_k = valid ? (__ffs(same_e) - 1) & kp_mask : -1;
  return si;
}

// One lane's 16 channels (two int4 of bf16) to e4m3, with the scale of its 128-channel group (8 lanes). Every
// lane of the warp calls; lanes of an inactive group pass zeros and their result is ignored. The arithmetic is the
// reference's: amax floored at 1e-4, scale = amax / 448 (optionally 2^ceil(log2)), value * (1 / scale), RN + SATFINITE.
__device__ __forceinline__ int4 cast16(const int4 (&in)[2], int round_scale, float* scale_out) {
  float f[16];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&in[h]);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float2 v = __bfloat1622float2(b[u]);
      f[8 * h + 2 * u] = v.x;
      f[8 * h + 2 * u + 1] = v.y;
    }
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
#pragma unroll
  for (int m = 4; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
  amax = fmaxf(amax, 1e-4f);
  float scale = amax / 448.0f;
  if (round_scale) scale = pow2_ceil(scale);
  const float inv = 1.0f / scale;
  *scale_out = scale;
  uint32_t w[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      packed |= (uint32_t)__nv_cvt_float_to_fp8(f[4 * q + i] * inv, __NV_SATFINITE, __NV_E4M3) << (8 * i);
    w[q] = packed;
  }
  return make_int4((int)w[0], (int)w[1], (int)w[2], (int)w[3]);
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch, send phase. Block b of the phase's grid owns a contiguous range of at most kMaxRange of my tokens.
//  1. It counts, per expert and per rank, my tokens before its range and after it (one thread per (token, slot)),
//     and notes the distinct experts and distinct ranks of its own tokens (threads tid < R meanwhile wait for the
//     acknowledgements of the half's previous call); then, from shared memory only, each token's slot j
//     per expert (its position among my tokens that select the expert) and its message position per destination
//     rank (its position among my tokens that go to that rank). Two block barriers in all, not two per token.
//  2. Its warps split its tokens into (token, part) units of 512-channel steps: a warp loads its channels once
//     (16 per lane, non-coherent loads), casts them to e4m3 in registers (a 128-channel group is 8 lanes; no block
//     barrier) and stores them, 16 bytes per lane, straight into every NVLink destination's receive slot, once
//     per destination rank; part 0 writes the header. Tokens with a destination in another node are also written
//     to the local stage and, after one block barrier, put whole with put-with-signal, one put per (token, rank).
//  3. No grid-wide barrier: every block, after a block barrier behind its stores, adds its own message count to
//     each NVLink destination's count word (one release add per (block, rank)); block r % blocks also writes rank r's
//     dispatch_meta row (my tokens per local expert of r; every block knows all counts from step 1) and the
//     call's shape word, and adds the word's high half, (messages + 2) + 1. Ranks of other nodes count the puts
//     themselves (1 per put).
// ---------------------------------------------------------------------------------------------------------------
constexpr int kMaxRange = 64;   // tokens per send block at most
constexpr int kStep = 512;      // channels per warp step: 16 per lane
constexpr int kStepBatch = 4;   // steps whose loads a lane has in flight at once

// Step s of a token's row x (xrow, H channels of bf16): 16 channels per lane, zeros past H.
__device__ __forceinline__ void load_x_step(const char* xrow, int s, int H, int lane, int4 (&v)[2]) {
  const int c = s * kStep + lane * 16;
  v[0] = v[1] = make_int4(0, 0, 0, 0);
  if (c < H) v[0] = ld_input(xrow + (size_t)c * 2);
  if (c + 8 < H) v[1] = ld_input(xrow + (size_t)(c + 8) * 2);
}

// Calls f(msg) once per copy of a token's message, with msg where the copy starts: each NVLink destination's receive
// slot, then, if the token also goes to a rank of another node (has_remote), the stage copy the puts read. Lane i
// holds slot i of the token: dmask has the lanes of its rank-first slots, ek / posk their expert and their message
// position at that rank. Warp-collective; one call site of f, so that its stores are generated once.
template <typename F>
__device__ __forceinline__ void for_each_copy(const ep_ll_launch_t& p, unsigned dmask, int ek, int posk,
                                              bool has_remote, char* stage_msg, F f) {
  const ep_ll_region_t& L = p.group.region;
  for (unsigned m = dmask;; m &= m - 1) {
    char* msg;
    if (m) {
      const int b = __ffs(m) - 1;
      const int d = rank_of_expert(p, __shfl_sync(0xffffffffu, ek, b)), pos = __shfl_sync(0xffffffffu, posk, b);
      char* peer = nvlink_peer(p, d);
      if (!peer) continue;
      msg = peer + half_offset(p) + L.recv + ((size_t)p.group.rank * L.max_tokens + pos) * L.msg_bytes;
    } else {
      if (!has_remote) return;
      msg = stage_msg;
    }
    f(msg);
    if (!m) return;
  }
}

// One block's send phase of call `op`. False if the block gave up (an acknowledgement timed out; the fault is
// recorded): the caller then stops, with no receive phase.
template <bool kMask>
__device__ __forceinline__ bool dispatch_send(const ep_ll_launch_t& p, Grid grid, uint64_t op) {
  extern __shared__ int s_dyn[];
  const ep_ll_region_t& L = p.group.region;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.group.rank, R = p.group.num_ranks, K = p.call.num_topk, E = p.call.num_experts, E_loc = E / R;
  const int H = p.call.hidden;
  const int N = p.call.num_tokens;
  const size_t half = half_offset(p);
  char* mine = p.group.ll_base + half;
  LL_PROF_STAMP(kProfDispatchSend, grid, 0);
  if (grid.block == 0 && tid == 0) p.handle.ops[0] = op;  // the call number for a later receive kernel (the hook)

  const int per_block = (N + grid.blocks - 1) / grid.blocks;  // <= kMaxRange (the launcher sizes the grid)
  const int begin = min(N, grid.block * per_block), end = min(N, begin + per_block), n_loc = end - begin;
  int* s_hist = s_dyn;                     // [E] my tokens before the range (later: up to its end), per expert
  int* s_rhist = s_hist + E;               // [R] the same per distinct rank
  int* s_ahist = s_rhist + R;              // [E] my tokens after the range, per distinct expert
  int* s_arhist = s_ahist + E;             // [R] the same per distinct rank
  int* s_own = s_arhist + R;               // [R] messages of this block to each rank
  int* s_ent = s_own + R;                  // [per_block * K] expert of (token, slot) if its first slot, else -1
  int* s_rf = s_ent + per_block * K;       // [per_block * K] rank-first bit and first slot of the expert (1a)
  int* s_slot = s_rf + per_block * K;      // [per_block * K] j of a first slot
  int* s_pos = s_slot + per_block * K;     // [per_block * K] message position at its rank, for rank-first slots
  float* s_w = reinterpret_cast<float*>(s_pos + per_block * K);  // [per_block * K] with weights: a first slot's
                                                                 // expert's weight (1c)

  // Step 2's units: (token, part) pairs, a part being a run of 512-channel steps. Known before the prologue.
  const int steps = (H + kStep - 1) / kStep;
  const int parts = n_loc > 0 ? max(1, min(steps, kSendWarps / n_loc)) : 1;

  for (int e = tid; e < E; e += blockDim.x) s_hist[e] = s_ahist[e] = 0;
  for (int r = tid; r < R; r += blockDim.x) s_rhist[r] = s_arhist[r] = s_own[r] = 0;
  __syncthreads();

  // 1a. Earlier and later tokens into the histograms; my tokens' slots noted (s_rf: bit 0 = rank-first, bits 1.. =
  // 1 + the first slot of the same expert, 0 for an invalid slot). Threads tid < R first wait for the acks: the
  // other warps scan meanwhile, and the barrier after the scan joins the result (no store to a peer before it).
  const bool acks_ok = poll_acks<kMask>(p, op, EP_SITE_LL_DISPATCH_ACK);
  const int kp_log2 = topk_lanes_log2(K), tokens_per_warp = 32 >> kp_log2;
  for (int tb = warp * tokens_per_warp; tb < N; tb += kSendWarps * tokens_per_warp) {
    const SlotInfo si = slot_info<kMask>(p, tb, N, kp_log2, lane);
    if (si.t < begin) {
      if (si.first) atomicAdd(&s_hist[si.e], 1);
      if (si.rfirst) atomicAdd(&s_rhist[rank_of_expert(p, (int)si.e)], 1);
    } else if (si.t >= end) {
      if (si.first) atomicAdd(&s_ahist[si.e], 1);
      if (si.rfirst) atomicAdd(&s_arhist[rank_of_expert(p, (int)si.e)], 1);
    } else if (si.in) {
      if (si.e < -1 || si.e >= E) record_fault(p.group.error, EP_FAULT_BAD_EXPERT, me, -1, 0, si.t, si.e);
      const int i = (si.t - begin) * K + si.k;
      s_ent[i] = si.first ? (int)si.e : -1;
      s_rf[i] = si.dropped ? -2 : (si.first_k >= 0 ? (si.first_k + 1) << 1 : 0) | (si.rfirst ? 1 : 0);
    }
  }
  if (__syncthreads_or(!acks_ok)) return false;  // every rank is done with this half's last call (or one timed out)
  LL_PROF_STAMP(kProfDispatchSend, grid, 1);
  // 1b. Slots and message positions inside the range (each earlier token lists an expert / a rank once at most).
  for (int i = tid; i < n_loc * K; i += blockDim.x) {
    const int e = s_ent[i];
    if (e < 0) continue;
    const int lt = i / K, d = rank_of_expert(p, e);
    int j = s_hist[e], pos = s_rhist[d];
    for (int i2 = 0; i2 < lt * K; ++i2) {
      const int e2 = s_ent[i2];
      j += e2 == e;
      pos += ((s_rf[i2] & 1) && rank_of_expert(p, e2) == d) ? 1 : 0;
    }
    s_slot[i] = j;
    s_pos[i] = pos;
  }
  __syncthreads();
  // 1c. Combine's receive row of every (token, slot) (a repeated expert uses its first slot's row); the range
  // joins the histograms (read again only by the last block, after barriers).
  // With weights, also (for a combine with sums on the experts' ranks) each first slot's expert weight, the sum
  // in slot order of the weights of the token's slots with that expert, and the receive row of each rank's sum at
  // the token's first slot on that rank.
  for (int i = tid; i < n_loc * K; i += blockDim.x) {
    const int lt = i / K, k = i % K, first_k = (s_rf[i] >> 1) - 1;
    const size_t at = (size_t)(begin + lt) * L.max_topk + k;
    p.handle.slot_of[at] = first_k >= 0 ? s_ent[lt * K + first_k] * L.max_tokens + s_slot[lt * K + first_k]
                           : kMask      ? max(first_k, -2)
                                        : -1;  // -2: a slot dropped by the mask
    if (s_ent[i] >= 0) atomicAdd(&s_hist[s_ent[i]], 1);
    if (s_rf[i] & 1) {
      atomicAdd(&s_rhist[rank_of_expert(p, s_ent[i])], 1);
      atomicAdd(&s_own[rank_of_expert(p, s_ent[i])], 1);
    }
    if (p.call.dispatch_weights) {
      if (s_ent[i] >= 0) {
        const float* w = p.call.dispatch_weights + (size_t)(begin + lt) * K;
        float sum = 0.0f;
#pragma unroll 1
        for (int k2 = k; k2 < K; ++k2)
          if ((s_rf[lt * K + k2] >> 1) - 1 == k) sum += w[k2];
        s_w[i] = sum;
      }
      p.handle.rank_slot_of[at] = s_rf[i] & 1 ? rank_of_expert(p, s_ent[i]) * L.max_tokens + s_pos[i] : -1;
    }
  }
  __syncthreads();  // s_hist + s_ahist, s_rhist + s_arhist: all my tokens; s_own: this block's messages

  // 2. Data: (token, part) units.
  const size_t hdr = L.hdr_bytes, msg_stride = L.msg_bytes;
  char* stage = mine + L.dispatch_stage;
  for (int u = warp; u < n_loc * parts; u += kSendWarps) {
    const int lt = u / parts, part = u % parts, t = begin + lt;
    const int ek = lane < K ? s_ent[lt * K + lane] : -1;
    const bool rf = lane < K && (s_rf[lt * K + lane] & 1);
    const int posk = rf ? s_pos[lt * K + lane] : 0;
    const unsigned dmask = __ballot_sync(0xffffffffu, rf);
    const bool has_remote = __ballot_sync(0xffffffffu, rf && nvlink_peer(p, rank_of_expert(p, ek)) == nullptr) != 0;
    char* my_msg = stage + (size_t)t * msg_stride;
    if (part == 0) {  // header: (t, npairs, (e << 13 | j, weight) for each distinct valid expert in slot order)
      const int jk = ek >= 0 ? s_slot[lt * K + lane] : 0;
      const unsigned fmask = __ballot_sync(0xffffffffu, ek >= 0);
      const int idx = __popc(fmask & ((1u << lane) - 1u));
      const float wk = p.call.dispatch_weights && ek >= 0 ? s_w[lt * K + lane] : 0.0f;
      for_each_copy(p, dmask, ek, posk, has_remote, my_msg, [&](char* dst) {
        if (lane == 0) *reinterpret_cast<int2*>(dst) = make_int2(t, __popc(fmask));
        if (ek >= 0) *reinterpret_cast<int2*>(dst + 8 + 8 * idx) = make_pair(ek, jk, wk);
      });
    }
    const int2 st = part_range(part, parts, steps);  // steps <= 128, parts <= 16
    const int st0 = st.x, st1 = st.y;
    const char* xrow = reinterpret_cast<const char*>(p.call.x) + (size_t)t * H * 2;
    for (int s0 = st0; s0 < st1; s0 += kStepBatch) {
      int4 in[kStepBatch][2];
#pragma unroll
      for (int b = 0; b < kStepBatch; ++b) {
        if (s0 + b < st1) load_x_step(xrow, s0 + b, H, lane, in[b]);
        else in[b][0] = in[b][1] = make_int4(0, 0, 0, 0);
      }
      int4 out[kStepBatch];
      float scale[kStepBatch];
      if (p.call.fp8) {
#pragma unroll
        for (int b = 0; b < kStepBatch; ++b)
          if (s0 + b < st1) out[b] = cast16(in[b], p.call.round_scale, &scale[b]);  // warp-uniform: only real steps
      }
      // Store the batch to every NVLink destination, then (if any rank is in another node) to the stage.
      for_each_copy(p, dmask, ek, posk, has_remote, my_msg, [&](char* msg) {
        char* dst = msg + hdr;
#pragma unroll
        for (int b = 0; b < kStepBatch; ++b) {
          const int c = (s0 + b) * kStep + lane * 16;
          if (s0 + b >= st1 || c >= H) continue;
          if (p.call.fp8) {
            *reinterpret_cast<int4*>(dst + c) = out[b];
            if ((lane & 7) == 0) reinterpret_cast<float*>(dst + H)[c / 128] = scale[b];
          } else {
            *reinterpret_cast<int4*>(dst + (size_t)c * 2) = in[b][0];
            if (c + 8 < H) *reinterpret_cast<int4*>(dst + (size_t)(c + 8) * 2) = in[b][1];
          }
        }
      });
    }
  }

  // dispatch_meta rows of the ranks this block publishes to: NVLink peers directly, others through the stage. The
  // shape word: this rank's own slot is the source of the puts to other nodes.
  const uint64_t shape = ep_ll_shape_word(p.call.max_tokens, H, E, p.call.fp8);
  uint64_t* shape_word = reinterpret_cast<uint64_t*>(mine + L.dispatch_shape + (size_t)me * 8);  // symmetric
  if (tid == 0) *shape_word = shape;
  int* meta_out = reinterpret_cast<int*>(mine + L.meta_stage);  // [R][E_loc]
  for (int i = tid; i < E; i += blockDim.x) {
    const int d = rank_of_expert(p, i), le = i - d * E_loc;
    if (!publishes_for(d, grid) || masked<kMask>(p, d)) continue;
    char* peer = nvlink_peer(p, d);
    const int n = s_hist[i] + s_ahist[i];
    if (peer) reinterpret_cast<int*>(peer + half + L.dispatch_meta)[(size_t)me * E_loc + le] = n;
    else meta_out[i] = n;
  }
  // The block's stores (peers' receive slots, the stage, meta rows) come before its counts through the barrier: each
  // count is a release add after it (cumulative over what the barrier ordered), and a warp that puts fences first.
  __syncthreads();
  LL_PROF_STAMP(kProfDispatchSend, grid, 2);

  // Tokens going to another node: the whole message (header + payload) from the stage, one put per rank; and the
  // dispatch_meta rows of the other-node ranks this block publishes to.
  const size_t put_bytes = ep_align_up(hdr + (size_t)(p.call.fp8 ? H + H / 128 * 4 : 2 * H), 16);
  uint64_t* count_word = reinterpret_cast<uint64_t*>(mine + L.dispatch_count + (size_t)me * 8);  // symmetric
  for (int lt = warp; lt < n_loc; lt += kSendWarps) {
    const int ek = lane < K ? s_ent[lt * K + lane] : -1;
    const bool remote = lane < K && (s_rf[lt * K + lane] & 1) && nvlink_peer(p, rank_of_expert(p, ek)) == nullptr;
    const int posk = remote ? s_pos[lt * K + lane] : 0;
    if (__any_sync(0xffffffffu, remote)) __threadfence_system();  // the stage rows, for the puts' reads
    for (unsigned m = __ballot_sync(0xffffffffu, remote); m; m &= m - 1) {
      const int b = __ffs(m) - 1;
      const int d = rank_of_expert(p, __shfl_sync(0xffffffffu, ek, b)), pos = __shfl_sync(0xffffffffu, posk, b);
      tp::put_signal_warp(mine + L.recv + ((size_t)me * L.max_tokens + pos) * msg_stride,
                          stage + (size_t)(begin + lt) * msg_stride, put_bytes, count_word, 1, /*add=*/true, d);
    }
  }
  for (int d = warp; d < R; d += kSendWarps)
    if (publishes_for(d, grid) && nvlink_peer(p, d) == nullptr && !masked<kMask>(p, d)) {
      __threadfence_system();  // the meta_out rows
      tp::put_signal_warp(mine + L.dispatch_meta + (size_t)me * E_loc * 4, meta_out + (size_t)d * E_loc,
                          (size_t)E_loc * 4, count_word, 1, /*add=*/true, d);
      tp::put_signal_warp(shape_word, shape_word, 8, count_word, 1, /*add=*/true, d);
    }

  // 3. Counts. NVLink rank d: this block's messages (+ 2 for the meta row and the shape word, and the high half
  // (messages + 3) << 32, if it publishes for d), in one release add after the barrier above (the shape word by the
  // same thread before it). Other nodes: the puts count themselves; the publishing block adds the high half.
  for (int d = tid; d < R; d += blockDim.x) {
    if (masked<kMask>(p, d)) continue;  // nothing for it, and it waits for nothing from this rank
    const bool pub = publishes_for(d, grid);
    const uint64_t hi = (uint64_t)(s_rhist[d] + s_arhist[d] + 3) << 32;  // (n + 1) << 32, n = messages + 2
    char* peer = nvlink_peer(p, d);
    if (peer) {
      if (pub) *reinterpret_cast<uint64_t*>(peer + half + L.dispatch_shape + (size_t)me * 8) = shape;
      const uint64_t v = (uint64_t)s_own[d] + (pub ? hi + 2 : 0);
      if (v) red_add_release_sys_u64(reinterpret_cast<uint64_t*>(peer + half + L.dispatch_count + (size_t)me * 8), v);
    } else if (pub) {
      tp::signal_add(count_word, hi, d);
    }
  }
  LL_PROF_STAMP(kProfDispatchSend, grid, 3);
  LL_PROF_FINISH(kProfDispatchSend, grid, me, 0);
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch, receive phase. In every block, warp 0 waits for every source's final count (one poll per source, in
// parallel) and scans the message offsets. Then one warp per (message, part): each warp issues the loads of its
// first unit (header, pairs, first batch of payload, scales) together with the block's loads of the sources'
// dispatch_meta rows (my local experts' counts per source, into shared memory), so that they cost one round trip;
// each (expert, source) run of rows begins at the sum over earlier sources. The warp keeps the header's pairs of
// my experts and stores its share into each of their rows (row = begin(expert, source) + j): a token that selects
// several of my experts crossed the link once and is copied here from local memory. Part 0 also writes the source
// index and the scales. Block 0 writes layout_range and recv_count. The last block zeroes the count words,
// acknowledges the call to every rank and advances the half's call number (finish_recv).
// ---------------------------------------------------------------------------------------------------------------

// One message unit of a receiving warp: where it is and what the warp loaded of it before placing it.
struct RecvUnit {
  const char* msg;
  int s, part, w0, w1;
  int2 head, pair;     // pair: e << 13 | j, weight
  int4 v[kCopyBatch];  // payload words [w0, w0 + kCopyBatch * 32) (those below w1)
  float sc[2];         // fp32 scales lane and lane + 32 (part 0, FP8, non-UE8M0)
  float4 sq;           // scales 4 * lane .. 4 * lane + 3 (part 0, UE8M0)
};

// Issue every load of unit u at once (header, pairs, the first batch of payload, the scales): one round trip.
__device__ __forceinline__ void recv_unit_load(const ep_ll_launch_t& p, const char* recv, const int* s_moff, int u,
                                               int parts, int words, RecvUnit& r) {
  const ep_ll_region_t& L = p.group.region;
  const int lane = threadIdx.x & 31, R = p.group.num_ranks, H = p.call.hidden, G = H / 128;
  const int m = u / parts;
  r.part = u % parts;
  r.s = last_start_at_most(s_moff, R, m);
  r.msg = recv + ((size_t)r.s * L.max_tokens + (m - s_moff[r.s])) * L.msg_bytes;
  r.head = ld_nc_v2(r.msg);
  r.pair = lane < min(L.max_topk, 32) ? ld_nc_v2(r.msg + 8 + 8 * lane) : make_int2(-1, 0);
  const int2 w = part_range(r.part, parts, words);  // words <= 8192, parts <= 8
  r.w0 = w.x;
  r.w1 = w.y;
  const int4* src = reinterpret_cast<const int4*>(r.msg + L.hdr_bytes);
#pragma unroll
  for (int b = 0; b < kCopyBatch; ++b)
    if (r.w0 + b * 32 + lane < r.w1) r.v[b] = ld_nc_na(src + r.w0 + b * 32 + lane);
  r.sc[0] = r.sc[1] = 0.0f;
  r.sq = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (r.part == 0 && p.call.fp8) {
    const float* scales = reinterpret_cast<const float*>(r.msg + L.hdr_bytes + H);
    if (!p.call.ue8m0) {
      if (lane < G) r.sc[0] = scales[lane];
      if (lane + 32 < G) r.sc[1] = scales[lane + 32];
    } else if (lane < G / 4) {
      r.sq = *reinterpret_cast<const float4*>(scales + 4 * lane);
    }
  }
}

__device__ __forceinline__ uint32_t ue8m0_pack(const float4& f) {
  return ((__float_as_uint(f.x) >> 23) & 0xffu) | (((__float_as_uint(f.y) >> 23) & 0xffu) << 8) |
         (((__float_as_uint(f.z) >> 23) & 0xffu) << 16) | (((__float_as_uint(f.w) >> 23) & 0xffu) << 24);
}

// One block's receive phase, up to finish_recv. False if the block gave up (a count never came; the fault is
// recorded): the caller then stops, without arriving.
template <bool kMask>
__device__ __forceinline__ bool dispatch_recv(const ep_ll_launch_t& p, Grid grid) {
  extern __shared__ int s_dyn[];
  const ep_ll_region_t& L = p.group.region;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.group.rank, R = p.group.num_ranks, E_loc = p.call.num_experts / R, H = p.call.hidden, G = H / 128;
  const size_t RT = (size_t)R * p.call.max_tokens;
  const size_t half = half_offset(p);
  char* mine = p.group.ll_base + half;
  const uint64_t* counts = reinterpret_cast<const uint64_t*>(mine + L.dispatch_count);
  const int* meta = reinterpret_cast<const int*>(mine + L.dispatch_meta);  // [R][E_loc]
  LL_PROF_STAMP(kProfDispatchRecv, grid, 0);
  int* s_row0 = s_dyn;           // [R][E_loc] first row of (source, expert); later the prefix
  int* s_moff = s_row0 + R * E_loc;  // [R + 1] first message index of each source
  __shared__ int s_failed;
  // Warp 0 waits for every source's final count and scans the message offsets; no block barrier in between.
  if (warp == 0) {
    bool ok = true;
    const long long t0 = wait_stats_start(p, grid);
    for (int s = lane; ok && s < R; s += 32) {
      uint64_t v = 0;
      const WaitResult w =
          wait_peer<kMask>([&] { return count_complete(v = ld_acquire_sys_u64(counts + s)); }, p.group.timeout_ns,
                           p.group.error, p.group.mask, me, s, EP_SITE_LL_DISPATCH_RECV);
      ok = w != kWaitFault;
      const bool ready = kMask ? w == kWaitReady : ok;  // without the mask, the same thing
      // n = messages + 2 puts; hi = n + 1. At most T (this rank's): a source of another shape stays in the area.
      // A masked source sent nothing (its count word may hold what it wrote before it was masked).
      if (ok) s_moff[s + 1] = ready ? min((int)(v >> 32) - 3, L.max_tokens) : 0;
      if (ready) wait_stats_add(p, grid, s, t0);
    }
    const bool failed = __any_sync(0xffffffffu, !ok);
    if (lane == 0) s_failed = failed;
    if (!failed) {  // message offsets: an exclusive scan over sources
      __syncwarp();
      int run = 0;
      for (int base = 0; base < R; base += 32) {
        int v = base + lane < R ? s_moff[base + lane + 1] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int n = __shfl_up_sync(0xffffffffu, v, o);
          if (lane >= o) v += n;
        }
        __syncwarp();
        if (base + lane < R) s_moff[base + lane + 1] = run + v;
        run += __shfl_sync(0xffffffffu, v, 31);
      }
      if (lane == 0) s_moff[0] = 0;
    }
  }
  __syncthreads();
  if (s_failed) return false;
  LL_PROF_STAMP(kProfDispatchRecv, grid, 1);

  // Each warp issues the loads of its first message unit now, so that they travel with the dispatch_meta loads.
  const int M = s_moff[R];
  const int total_warps = grid.blocks * kRecvWarps;
  const int parts = parts_per_unit(total_warps, M);
  const int words = p.call.fp8 ? H / 16 : H / 8;  // payload without the scales, in 16-byte words
  const int units = M * parts;
  const int u0 = grid.block * kRecvWarps + warp;
  RecvUnit r;
  if (u0 < units) recv_unit_load(p, mine + L.recv, s_moff, u0, parts, words, r);
  // A source without messages has no tokens for my experts: its row is zeros, and a masked source's is stale.
  for (int i = tid; i < R * E_loc; i += blockDim.x) {
    const int s = i / E_loc;
    s_row0[i] = kMask && s_moff[s + 1] == s_moff[s] ? 0 : ld_relaxed_sys(meta + i);
  }
  // Every source's shape against mine, with the meta loads, before any row is placed (ll_region.h).
  const uint64_t my_shape = ep_ll_shape_word(p.call.max_tokens, H, p.call.num_experts, p.call.fp8);
  const uint64_t* shapes = reinterpret_cast<const uint64_t*>(mine + L.dispatch_shape);
  for (int s = tid; s < R; s += blockDim.x) {
    if (masked<kMask>(p, s)) continue;  // its word is from an earlier call, or never came
    const uint64_t w = ld_relaxed_sys_u64(shapes + s);
    const int field = ep_ll_shape_differs(w, my_shape);
    if (field == EP_LL_SHAPE_AGREES) continue;
    s_failed = 1;
    fail_group(p.group.error, EP_FAULT_SHAPE_MISMATCH, me, s, field, ep_ll_shape_value(w, field),
               ep_ll_shape_value(my_shape, field));
  }
  __syncthreads();
  if (s_failed) return false;
  for (int le = tid; le < E_loc; le += blockDim.x) {  // rows: sources in order, per expert
    int run = 0;
    for (int s = 0; s < R; ++s) {
      const int n = s_row0[s * E_loc + le];
      s_row0[s * E_loc + le] = run;
      if (grid.block == 0) p.handle.layout_range[(size_t)le * R + s] = ((int64_t)run << 32) | (uint32_t)n;
      run += n;
    }
    if (grid.block == 0) p.call.recv_count[le] = run;
  }
  if (grid.block == 0)  // the message offsets, for a combine with sums on this rank (it reads the messages)
    for (int s = tid; s <= R; s += blockDim.x) p.handle.msg_off[s] = s_moff[s];
  __syncthreads();
  LL_PROF_STAMP(kProfDispatchRecv, grid, 2);

  for (int u = u0; u < units; u += total_warps) {
    if (u != u0) recv_unit_load(p, mine + L.recv, s_moff, u, parts, words, r);
    const int s = r.s;
    const int4* src = reinterpret_cast<const int4*>(r.msg + L.hdr_bytes);
    const int e = pair_expert(r.pair);
    const bool mine_pair = lane < r.head.y && r.pair.x >= 0 && rank_of_expert(p, e) == me;
    const unsigned pmask = __ballot_sync(0xffffffffu, mine_pair);
    const int row0 = mine_pair ? s_row0[s * E_loc + (e - me * E_loc)] + pair_slot(r.pair) : 0;
    const int le_l = mine_pair ? e - me * E_loc : 0;
    for (int base = r.w0; base < r.w1; base += kCopyBatch * 32) {
      if (base != r.w0) {
#pragma unroll
        for (int b = 0; b < kCopyBatch; ++b)
          if (base + b * 32 + lane < r.w1) r.v[b] = ld_nc_na(src + base + b * 32 + lane);
      }
      for (unsigned pm = pmask; pm; pm &= pm - 1) {
        const int bit = __ffs(pm) - 1;
        const int le = __shfl_sync(0xffffffffu, le_l, bit), row = __shfl_sync(0xffffffffu, row0, bit);
        int4* dst = reinterpret_cast<int4*>((char*)p.call.recv_x + ((size_t)le * RT + row) * (p.call.fp8 ? H : 2 * H));
#pragma unroll
        for (int b = 0; b < kCopyBatch; ++b)
          if (base + b * 32 + lane < r.w1) dst[base + b * 32 + lane] = r.v[b];
      }
    }
    if (r.part != 0) continue;
    const float* scales = reinterpret_cast<const float*>(r.msg + L.hdr_bytes + H);
    for (unsigned pm = pmask; pm; pm &= pm - 1) {
      const int bit = __ffs(pm) - 1;
      const int le = __shfl_sync(0xffffffffu, le_l, bit), col = __shfl_sync(0xffffffffu, row0, bit);
      if (lane == 0) p.handle.src_info[(size_t)le * RT + col] = r.head.x;
      if (!p.call.fp8) continue;
      if (!p.call.ue8m0) {
        float* out = (float*)p.call.recv_scales + (size_t)le * G * RT;
        for (int g = lane; g < G; g += 32)
          out[(size_t)g * RT + col] = g < 64 ? r.sc[g >> 5] : scales[g];
      } else {
        int* out = (int*)p.call.recv_scales + (size_t)le * (G / 4) * RT;
        for (int q = lane; q < G / 4; q += 32) {
          const float4 f = q < 32 ? r.sq : *reinterpret_cast<const float4*>(scales + 4 * q);
          out[(size_t)q * RT + col] = (int)ue8m0_pack(f);
        }
      }
    }
  }
  LL_PROF_STAMP(kProfDispatchRecv, grid, 3);
  return true;
}

}  // namespace ll
}  // namespace ep

#endif  // EP_KERNELS_LL_DISPATCH_CUH
