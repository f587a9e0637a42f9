// low_latency.cu: the low-latency (LL) path: dispatch and combine, each a send phase and a receive phase. With the
// receive hook the phases are two kernels (the hook launches the receive kernel later); without it one fused,
// cooperative kernel per call runs the send phase and then the receive phase in the same blocks (see "Kernels" at
// the end; EP_LL_FUSED=0 keeps two kernels there too). Each phase's code exists once, as a device function that
// both kinds of kernel call with the phase's own grid (Grid). The buffer layout and the signal protocol are drawn
// in ll_layout.h. The send phases have no grid-wide barrier: each block publishes its own part of the counts; the
// receive phase's last block acknowledges the call and advances the half's call number. Peers of this node are
// written with NVLink stores; others through the transport's put-with-signal. Data is placed by data, never by
// atomics whose order varies (the count words are sums, whatever the order of their adds): slots come from a
// counting pass over topk_idx, rows of an expert are packed by source rank then token, and combine sums in top-k
// order.
#include "kernels/api.h"
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "kernels/common.cuh"
#include "kernels/profile.cuh"
#include "transport/transport.cuh"

// 1 (default): a call without the receive hook launches one fused kernel; 0: the send kernel and the receive
// kernel, as with the hook (for A/B timing: make EXTRA_NVCCFLAGS=-DEP_LL_FUSED=0).
#ifndef EP_LL_FUSED
#define EP_LL_FUSED 1
#endif

namespace ep {
namespace ll {

// ---------------------------------------------------------------------------------------------------------------
// A phase's grid: this block's index among the blocks that run the phase, and their number. A phase's own kernel
// passes (blockIdx.x, gridDim.x); a fused kernel runs a phase in its blocks [0, blocks), which may be fewer than
// the kernel's grid. Phase code (token ranges, publishing blocks, unit striding, block-0 duties, profile stamps)
// uses this, never blockIdx.x / gridDim.x. Only arrive_last counts the kernel's grid: every block of a kernel
// arrives at the end of its receive phase, including the blocks that had no receive work.
// ---------------------------------------------------------------------------------------------------------------
struct Grid {
  int block, blocks;
};

__device__ __forceinline__ Grid kernel_grid() { return Grid{(int)blockIdx.x, (int)gridDim.x}; }

enum class Call { kDispatch, kCombine };  // which call a kernel runs (the kernels are templates over it)

// ---------------------------------------------------------------------------------------------------------------
// Profiling (off by default; build with EP_LL_PROFILE=1; kernels/profile.cuh). Thread 0 of block 0 and of the last
// block of a phase's grid stamp %globaltimer at the phase's boundaries; every EP_LL_PROFILE_EVERY-th call of a
// phase prints one line (device printf) with, for both blocks, the time of each stage since the previous stamp, in
// us. Records are per phase ("kernel" below), whether the phase runs in its own kernel or in a fused one.
// ---------------------------------------------------------------------------------------------------------------
enum { kProfDispatchSend = 0, kProfDispatchRecv = 1, kProfCombineSend = 2, kProfCombineRecv = 3 };
#if EP_LL_PROFILE
constexpr int kProfStamps = 5;  // stamp 0 = block start
static_assert(kProfStamps <= prof::kMaxStamps, "LL stamps fit a profile record");
__device__ prof::Record g_prof[4];  // [kernel]

__device__ __forceinline__ void prof_stamp(int kernel, Grid grid, int i) {
  if (threadIdx.x == 0) prof::stamp(g_prof[kernel], i, grid.block, grid.blocks);
}

// Called by every block when it is done with the phase (tail_ns: a stamp after the block's end, e.g. the
// acknowledgements of the block that finished the call; 0 if none); thread 0 of block 0 and of the phase's last
// block arrive. The second of the two prints.
__device__ void prof_finish(int kernel, Grid grid, int rank, unsigned long long tail_ns) {
  if (threadIdx.x != 0 || (grid.block != 0 && grid.block != grid.blocks - 1)) return;
  prof::Call c;
  if (!prof::arrive(g_prof[kernel], tail_ns ? tail_ns : global_timer_ns(), grid.blocks == 1 ? 1u : 2u,
                    EP_LL_PROFILE_EVERY, c))
    return;
  static const char* const names[4] = {"dispatch-send", "dispatch-recv", "combine-send", "combine-recv"};
  static const char* const labels[4][kProfStamps - 1] = {
      {"prologue+acks", "data", "signal", "-"},
      {"counts-seen", "meta", "copy", "arrive"},
      {"prologue+acks", "data", "signal", "-"},
      {"counts-seen", "sum", "arrive", "-"}};
  const unsigned long long(*s)[prof::kMaxStamps] = g_prof[kernel].t;
  float d[2][kProfStamps - 1];
  for (int b = 0; b < 2; ++b) {
    unsigned long long prev = s[b][0];
    for (int i = 1; i < kProfStamps; ++i) {
      const bool used = labels[kernel][i - 1][0] != '-' && s[b][i] >= prev;
      d[b][i - 1] = used ? (float)(s[b][i] - prev) * 1e-3f : 0.0f;
      if (used) prev = s[b][i];
    }
  }
  const float last_start = (float)((long long)(s[1][0] - s[0][0])) * 1e-3f;
  const float total = (float)((long long)(c.end - s[0][0])) * 1e-3f;
  const unsigned long long send_start = kernel & 1 ? g_prof[kernel - 1].t[0][0] : 0ull;
  const float since_prev = kernel & 1 && send_start ? (float)((long long)(s[0][0] - send_start)) * 1e-3f : 0.0f;
  printf("ep_ll_prof rank %d %s call %u grid %d | b0: %s %.2f %s %.2f %s %.2f %s %.2f | last@%+.2f: %.2f %.2f %.2f "
         "%.2f | end %.2f us after b0 start%s%.2f\n",
         rank, names[kernel], c.number, grid.blocks, labels[kernel][0], d[0][0], labels[kernel][1], d[0][1],
         labels[kernel][2], d[0][2], labels[kernel][3], d[0][3], last_start, d[1][0], d[1][1], d[1][2], d[1][3],
         total, kernel & 1 ? "; b0 start after the send's b0 start: " : "", since_prev);
}
#define LL_PROF_STAMP(kernel, grid, i) ::ep::ll::prof_stamp((kernel), (grid), (i))
#define LL_PROF_FINISH(kernel, grid, rank, tail) ::ep::ll::prof_finish((kernel), (grid), (rank), (tail))
#define LL_PROF_NOW() ::ep::global_timer_ns()
#else
#define LL_PROF_STAMP(kernel, grid, i) ((void)0)
#define LL_PROF_FINISH(kernel, grid, rank, tail) ((void)0)
#define LL_PROF_NOW() 0ull
#endif

constexpr int kRecvThreads = 512;
constexpr int kRecvWarps = kRecvThreads / 32;
constexpr int kChunk = 256;  // channels one warp combines per unit (8 per lane)

__device__ __forceinline__ size_t half_offset(const ep_ll_launch_t& p) { return (size_t)p.half * p.layout.half_bytes; }

// Rank r's mapping of the LL region, when r is a peer of this node reached by loads/stores; else NULL.
__device__ __forceinline__ char* nvlink_peer(const ep_ll_launch_t& p, int r) {
  if (r / p.ranks_per_node != p.rank / p.ranks_per_node) return nullptr;
  char* base = (char*)p.peer_workspace[r];
  return base ? base + p.ll_offset : nullptr;
}

// A count word is complete when its high half hi >= 1 and its low half is hi - 1 (see ll_layout.h).
__device__ __forceinline__ bool count_complete(uint64_t v) {
  const uint32_t hi = (uint32_t)(v >> 32), lo = (uint32_t)v;
  return hi != 0 && lo == hi - 1;
}

// Add v to a 64-bit word of a peer's memory (an NVLink mapping), released after this thread's earlier writes.
__device__ __forceinline__ void red_add_release_sys_u64(uint64_t* ptr, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

// The block of the send phase's grid that publishes the final count word (and, for dispatch, the dispatch_meta row)
// to rank r.
__device__ __forceinline__ bool publishes_for(int r, Grid grid) {
  return (unsigned)r % (unsigned)grid.blocks == (unsigned)grid.block;
}

// The number of the call starting on the current half: one more than the half's last call. Only a receive phase's
// last block advances seq[half], once every block of its kernel has arrived there, so every block of a kernel
// reads the same value (in a fused kernel, at its start).
__device__ __forceinline__ uint64_t next_call(const ep_ll_launch_t& p) { return p.state->seq[p.half] + 1; }

// Tell rank r that this rank finished receiving call `op` on the current half.
__device__ __forceinline__ void send_ack(const ep_ll_launch_t& p, int r, uint64_t op) {
  const size_t offset = half_offset(p) + p.layout.ack + (size_t)p.rank * 8;
  char* peer = nvlink_peer(p, r);
  if (peer) st_release_sys_u64(reinterpret_cast<uint64_t*>(peer + offset), op);
  else tp::signal_set(reinterpret_cast<uint64_t*>(p.ll_base + offset), op, r);
}

// Every rank must have finished receiving the previous call on this half before we write into its half. Threads
// tid < R poll (no barrier: the caller overlaps this with other work and joins the result with __syncthreads_or).
__device__ __forceinline__ bool poll_acks(const ep_ll_launch_t& p, uint64_t op, int site) {
  const uint64_t* acks = reinterpret_cast<const uint64_t*>(p.ll_base + half_offset(p) + p.layout.ack);
  bool ok = true;
  for (int r = threadIdx.x; ok && r < p.num_ranks; r += blockDim.x)
    ok = wait_until([&] { return ld_acquire_sys_u64(acks + r) + 1 >= op; }, p.timeout_ns, p.error, p.rank, r, site);
  return ok;
}

// Is expert index e valid? (bad ones were reported where the token is sent and count as -1)
__device__ __forceinline__ bool valid_expert(int64_t e, int E) { return e >= 0 && e < E; }

// 2^ceil(log2(s)) for a positive normal float, exactly (s itself when it is a power of two).
__device__ __forceinline__ float pow2_ceil(float s) {
  const uint32_t bits = __float_as_uint(s);
  if ((bits & 0x7fffffu) == 0) return s;
  return __uint_as_float((bits & 0x7f800000u) + 0x00800000u);
}

// Read-only inputs of the call (x, the expert outputs): through the non-coherent path, not kept in L1.
__device__ __forceinline__ int4 ld_input(const void* p) { return ld_nc_na(reinterpret_cast<const int4*>(p)); }

// Two int32 of a received message (written by a peer before the count we acquired): around L1, as ld_nc_na.
__device__ __forceinline__ int2 ld_nc_v2(const void* ptr) {
  int2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.s32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(ptr));
  return v;
}

// Lanes per token when a warp looks at top-k rows: the power of two >= K (K <= 32).
__device__ __forceinline__ int topk_lanes(int K) {
  int kp = 1;
  while (kp < K) kp <<= 1;
  return kp;
}

// One (token, slot) per lane: a warp sees 32 / kp tokens from `t0` (those below `t_end`) at once, one coalesced
// load per lane, and finds repeated experts and repeated ranks inside each token with two warp matches.
struct SlotInfo {
  int t, k;
  bool in;      // a real (token, slot)
  int64_t e;    // the expert index as given (-1 for none; may be out of range)
  bool first;   // valid, and no earlier slot of the token has the same expert
  bool rfirst;  // valid, and no earlier valid slot of the token has an expert on the same rank
  int first_k;  // for a valid slot: the first slot with the same expert; else -1
};

__device__ __forceinline__ SlotInfo slot_info(const ep_ll_launch_t& p, int t0, int t_end, int kp, int lane) {
  const int K = p.num_topk, E = p.num_experts, E_loc = E / p.num_ranks;
  SlotInfo si;
  si.t = t0 + lane / kp;
  si.k = lane % kp;
  si.in = si.t < t_end && si.k < K;
  si.e = si.in ? p.topk_idx[(size_t)si.t * K + si.k] : -1;
  const bool valid = si.in && valid_expert(si.e, E);
  // Keys: (token, expert) and (token, rank) for valid slots; a value no valid slot has (unique per lane) otherwise.
  const unsigned long long tkey = (unsigned long long)(uint32_t)si.t << 32;
  const unsigned long long key_e = tkey | (uint32_t)(valid ? (int)si.e : E + lane);
  const unsigned long long key_r = tkey | (uint32_t)(valid ? (int)si.e / E_loc : p.num_ranks + lane);
  const unsigned same_e = __match_any_sync(0xffffffffu, key_e);
  const unsigned same_r = __match_any_sync(0xffffffffu, key_r);
  si.first = valid && __ffs(same_e) - 1 == lane;
  si.rfirst = valid && __ffs(same_r) - 1 == lane;
  si.first_k = valid ? (__ffs(same_e) - 1) % kp : -1;
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
//  3. No grid-wide barrier: every block, once its stores are fenced, adds its own message count to each NVLink
//     destination's count word (one release add per (block, rank)); block r % blocks also writes rank r's
//     dispatch_meta row (my tokens per local expert of r; every block knows all counts from step 1) and adds
//     the word's high half, (messages + 1) + 1. Ranks of other nodes count the puts themselves (1 per put).
// ---------------------------------------------------------------------------------------------------------------
constexpr int kSendThreads = 512;
constexpr int kSendWarps = kSendThreads / 32;
constexpr int kMaxRange = 64;   // tokens per send block at most
constexpr int kStep = 512;      // channels per warp step: 16 per lane
constexpr int kStepBatch = 4;   // steps whose loads a lane has in flight at once

// One block's send phase of call `op`. False if the block gave up (an acknowledgement timed out; the fault is
// recorded): the caller then stops, with no receive phase.
__device__ __forceinline__ bool dispatch_send(const ep_ll_launch_t& p, Grid grid, uint64_t op) {
  extern __shared__ int s_dyn[];
  const ep_ll_layout_t& L = p.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.rank, R = p.num_ranks, K = p.num_topk, E = p.num_experts, E_loc = E / R, H = p.hidden;
  const int N = p.num_tokens;
  const size_t half = half_offset(p);
  char* mine = p.ll_base + half;
  LL_PROF_STAMP(kProfDispatchSend, grid, 0);
  if (grid.block == 0 && tid == 0) p.ops[0] = op;  // the call number for a later receive kernel (the hook)

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

  for (int e = tid; e < E; e += blockDim.x) s_hist[e] = s_ahist[e] = 0;
  for (int r = tid; r < R; r += blockDim.x) s_rhist[r] = s_arhist[r] = s_own[r] = 0;
  __syncthreads();

  // 1a. Earlier and later tokens into the histograms; my tokens' slots noted (s_rf: bit 0 = rank-first, bits 1.. =
  // 1 + the first slot of the same expert, 0 for an invalid slot). Threads tid < R first wait for the acks: the
  // other warps scan meanwhile, and the barrier after the scan joins the result (no store to a peer before it).
  const bool acks_ok = poll_acks(p, op, EP_SITE_LL_DISPATCH_ACK);
  const int kp = topk_lanes(K), tokens_per_warp = 32 / kp;
  for (int tb = warp * tokens_per_warp; tb < N; tb += kSendWarps * tokens_per_warp) {
    const SlotInfo si = slot_info(p, tb, N, kp, lane);
    if (si.t < begin) {
      if (si.first) atomicAdd(&s_hist[si.e], 1);
      if (si.rfirst) atomicAdd(&s_rhist[si.e / E_loc], 1);
    } else if (si.t >= end) {
      if (si.first) atomicAdd(&s_ahist[si.e], 1);
      if (si.rfirst) atomicAdd(&s_arhist[si.e / E_loc], 1);
    } else if (si.in) {
      if (si.e < -1 || si.e >= E) record_fault(p.error, EP_FAULT_BAD_EXPERT, me, -1, 0, si.t, si.e);
      const int i = (si.t - begin) * K + si.k;
      s_ent[i] = si.first ? (int)si.e : -1;
      s_rf[i] = (si.first_k >= 0 ? (si.first_k + 1) << 1 : 0) | (si.rfirst ? 1 : 0);
    }
  }
  if (__syncthreads_or(!acks_ok)) return false;  // every rank is done with this half's last call (or one timed out)
  LL_PROF_STAMP(kProfDispatchSend, grid, 1);
  // 1b. Slots and message positions inside the range (each earlier token lists an expert / a rank once at most).
  for (int i = tid; i < n_loc * K; i += blockDim.x) {
    const int e = s_ent[i];
    if (e < 0) continue;
    const int lt = i / K, d = e / E_loc;
    int j = s_hist[e], pos = s_rhist[d];
    for (int i2 = 0; i2 < lt * K; ++i2) {
      const int e2 = s_ent[i2];
      j += e2 == e;
      pos += ((s_rf[i2] & 1) && e2 / E_loc == d) ? 1 : 0;
    }
    s_slot[i] = j;
    s_pos[i] = pos;
  }
  __syncthreads();
  // 1c. Combine's receive row of every (token, slot) (a repeated expert uses its first slot's row); the range
  // joins the histograms (read again only by the last block, after barriers).
  for (int i = tid; i < n_loc * K; i += blockDim.x) {
    const int lt = i / K, k = i % K, first_k = (s_rf[i] >> 1) - 1;
    p.slot_of[(size_t)(begin + lt) * L.max_topk + k] =
        first_k >= 0 ? s_ent[lt * K + first_k] * L.max_tokens + s_slot[lt * K + first_k] : -1;
    if (s_ent[i] >= 0) atomicAdd(&s_hist[s_ent[i]], 1);
    if (s_rf[i] & 1) {
      atomicAdd(&s_rhist[s_ent[i] / E_loc], 1);
      atomicAdd(&s_own[s_ent[i] / E_loc], 1);
    }
  }
  __syncthreads();  // s_hist + s_ahist, s_rhist + s_arhist: all my tokens; s_own: this block's messages

  // 2. Data: (token, part) units.
  const size_t hdr = L.hdr_bytes, msg_stride = L.msg_bytes;
  const int steps = (H + kStep - 1) / kStep;
  const int parts = n_loc > 0 ? max(1, min(steps, kSendWarps / n_loc)) : 1;
  char* stage = mine + L.dispatch_stage;
  for (int u = warp; u < n_loc * parts; u += kSendWarps) {
    const int lt = u / parts, part = u % parts, t = begin + lt;
    const int ek = lane < K ? s_ent[lt * K + lane] : -1;
    const bool rf = lane < K && (s_rf[lt * K + lane] & 1);
    const int posk = rf ? s_pos[lt * K + lane] : 0;
    const unsigned dmask = __ballot_sync(0xffffffffu, rf);
    const bool has_remote = __ballot_sync(0xffffffffu, rf && nvlink_peer(p, ek / E_loc) == nullptr) != 0;
    char* my_msg = stage + (size_t)t * msg_stride;
    if (part == 0) {  // header: (t, npairs, (e, j) for each distinct valid expert in slot order)
      const int jk = ek >= 0 ? s_slot[lt * K + lane] : 0;
      const unsigned fmask = __ballot_sync(0xffffffffu, ek >= 0);
      const int idx = __popc(fmask & ((1u << lane) - 1u));
      for (unsigned m = dmask;; m &= m - 1) {
        char* dst;
        if (m) {
          const int b = __ffs(m) - 1;
          const int d = __shfl_sync(0xffffffffu, ek, b) / E_loc, pos = __shfl_sync(0xffffffffu, posk, b);
          char* peer = nvlink_peer(p, d);
          if (!peer) continue;
          dst = peer + half + L.recv + ((size_t)me * L.max_tokens + pos) * msg_stride;
        } else {
          if (!has_remote) break;
          dst = my_msg;
        }
        if (lane == 0) *reinterpret_cast<int2*>(dst) = make_int2(t, __popc(fmask));
        if (ek >= 0) *reinterpret_cast<int2*>(dst + 8 + 8 * idx) = make_int2(ek, jk);
        if (!m) break;
      }
    }
    const int st0 = (int)((long long)steps * part / parts), st1 = (int)((long long)steps * (part + 1) / parts);
    const char* xrow = reinterpret_cast<const char*>(p.x) + (size_t)t * H * 2;
    for (int s0 = st0; s0 < st1; s0 += kStepBatch) {
      int4 in[kStepBatch][2];
#pragma unroll
      for (int b = 0; b < kStepBatch; ++b) {
        const int c = (s0 + b) * kStep + lane * 16;
        in[b][0] = in[b][1] = make_int4(0, 0, 0, 0);
        if (s0 + b < st1 && c < H) in[b][0] = ld_input(xrow + (size_t)c * 2);
        if (s0 + b < st1 && c + 8 < H) in[b][1] = ld_input(xrow + (size_t)(c + 8) * 2);
      }
      int4 out[kStepBatch];
      float scale[kStepBatch];
      if (p.fp8) {
#pragma unroll
        for (int b = 0; b < kStepBatch; ++b) out[b] = cast16(in[b], p.round_scale, &scale[b]);
      }
      // Store the batch to every NVLink destination, then (if any rank is in another node) to the stage.
      for (unsigned m = dmask;; m &= m - 1) {
        char* dst;
        if (m) {
          const int bit = __ffs(m) - 1;
          const int d = __shfl_sync(0xffffffffu, ek, bit) / E_loc, pos = __shfl_sync(0xffffffffu, posk, bit);
          char* peer = nvlink_peer(p, d);
          if (!peer) continue;
          dst = peer + half + L.recv + ((size_t)me * L.max_tokens + pos) * msg_stride + hdr;
        } else {
          if (!has_remote) break;
          dst = my_msg + hdr;
        }
#pragma unroll
        for (int b = 0; b < kStepBatch; ++b) {
          const int c = (s0 + b) * kStep + lane * 16;
          if (s0 + b >= st1 || c >= H) continue;
          if (p.fp8) {
            *reinterpret_cast<int4*>(dst + c) = out[b];
            if ((lane & 7) == 0) reinterpret_cast<float*>(dst + H)[c / 128] = scale[b];
          } else {
            *reinterpret_cast<int4*>(dst + (size_t)c * 2) = in[b][0];
            if (c + 8 < H) *reinterpret_cast<int4*>(dst + (size_t)(c + 8) * 2) = in[b][1];
          }
        }
        if (!m) break;
      }
    }
  }

  // dispatch_meta rows of the ranks this block publishes to: NVLink peers directly, others through the stage.
  int* meta_out = reinterpret_cast<int*>(mine + L.meta_stage);  // [R][E_loc]
  for (int i = tid; i < E; i += blockDim.x) {
    const int d = i / E_loc, le = i % E_loc;
    if (!publishes_for(d, grid)) continue;
    char* peer = nvlink_peer(p, d);
    const int n = s_hist[i] + s_ahist[i];
    if (peer) reinterpret_cast<int*>(peer + half + L.dispatch_meta)[(size_t)me * E_loc + le] = n;
    else meta_out[i] = n;
  }
  // Every thread's stores (peers' receive slots, the stage, meta rows) are complete before the block's counts.
  __threadfence_system();
  __syncthreads();
  LL_PROF_STAMP(kProfDispatchSend, grid, 2);

  // Tokens going to another node: the whole message (header + payload) from the stage, one put per rank; and the
  // dispatch_meta rows of the other-node ranks this block publishes to.
  const size_t put_bytes = ep_align_up(hdr + (size_t)(p.fp8 ? H + H / 128 * 4 : 2 * H), 16);
  uint64_t* count_word = reinterpret_cast<uint64_t*>(mine + L.dispatch_count + (size_t)me * 8);  // symmetric
  for (int lt = warp; lt < n_loc; lt += kSendWarps) {
    const int ek = lane < K ? s_ent[lt * K + lane] : -1;
    const bool remote = lane < K && (s_rf[lt * K + lane] & 1) && nvlink_peer(p, ek / E_loc) == nullptr;
    const int posk = remote ? s_pos[lt * K + lane] : 0;
    for (unsigned m = __ballot_sync(0xffffffffu, remote); m; m &= m - 1) {
      const int b = __ffs(m) - 1;
      const int d = __shfl_sync(0xffffffffu, ek, b) / E_loc, pos = __shfl_sync(0xffffffffu, posk, b);
      tp::put_signal_warp(mine + L.recv + ((size_t)me * L.max_tokens + pos) * msg_stride,
                          stage + (size_t)(begin + lt) * msg_stride, put_bytes, count_word, 1, /*add=*/true, d);
    }
  }
  for (int d = warp; d < R; d += kSendWarps)
    if (publishes_for(d, grid) && nvlink_peer(p, d) == nullptr)
      tp::put_signal_warp(mine + L.dispatch_meta + (size_t)me * E_loc * 4, meta_out + (size_t)d * E_loc,
                          (size_t)E_loc * 4, count_word, 1, /*add=*/true, d);

  // 3. Counts. NVLink rank d: this block's messages (+ 1 for the meta row and the high half (messages + 2) << 32
  // if it publishes for d), in one release add after the fence above. Other nodes: the puts count themselves; the
  // publishing block adds the high half.
  for (int d = tid; d < R; d += blockDim.x) {
    const bool pub = publishes_for(d, grid);
    const uint64_t hi = (uint64_t)(s_rhist[d] + s_arhist[d] + 2) << 32;  // (n + 1) << 32, n = messages + 1
    char* peer = nvlink_peer(p, d);
    if (peer) {
      const uint64_t v = (uint64_t)s_own[d] + (pub ? hi + 1 : 0);
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
// The end of a receive phase of call kCall, in EVERY block of the kernel: in a fused kernel the blocks past the
// receive phase's grid arrive too, so that the half's call number, which every block read at its start, advances
// only after all of them. The last block to arrive zeroes the call's count words (each before the acknowledgement
// to the same rank, by the same thread), acknowledges call `op` to every rank and advances the half's call number
// (read by the next send on this half). A block that gave up never gets here: the call is then never acknowledged
// (a timeout fails the group), in a fused kernel as with two kernels.
// ---------------------------------------------------------------------------------------------------------------
template <Call kCall>
__device__ __forceinline__ void finish_recv(const ep_ll_launch_t& p, Grid grid, uint64_t op) {
  constexpr bool kDispatch = kCall == Call::kDispatch;
  [[maybe_unused]] constexpr int phase = kDispatch ? kProfDispatchRecv : kProfCombineRecv;  // profile builds
  unsigned int* done = kDispatch ? &p.state->dispatch_done : &p.state->combine_done;
  const bool last = arrive_last(done);
  LL_PROF_STAMP(phase, grid, kDispatch ? 4 : 3);  // "arrive" (prof_finish's labels)
  if (!last) {
    LL_PROF_FINISH(phase, grid, p.rank, 0);
    return;
  }
  uint64_t* word = reinterpret_cast<uint64_t*>(p.ll_base + half_offset(p) +
                                               (kDispatch ? p.layout.dispatch_count : p.layout.combine_signal));
  for (int r = threadIdx.x; r < p.num_ranks; r += blockDim.x) {
    word[r] = 0;
    __threadfence_system();
    send_ack(p, r, op);
  }
  if (threadIdx.x == 0) {
    *done = 0;
    p.state->seq[p.half] = op;
  }
  LL_PROF_FINISH(phase, grid, p.rank, LL_PROF_NOW());
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
constexpr int kCopyBatch = 8;  // 16-byte words a lane has in flight per batch

// One message unit of a receiving warp: where it is and what the warp loaded of it before placing it.
struct RecvUnit {
  const char* msg;
  int s, part, w0, w1;
  int2 head, pair;
  int4 v[kCopyBatch];  // payload words [w0, w0 + kCopyBatch * 32) (those below w1)
  float sc[2];         // fp32 scales lane and lane + 32 (part 0, FP8, non-UE8M0)
  float4 sq;           // scales 4 * lane .. 4 * lane + 3 (part 0, UE8M0)
};

// Issue every load of unit u at once (header, pairs, the first batch of payload, the scales): one round trip.
__device__ __forceinline__ void recv_unit_load(const ep_ll_launch_t& p, const char* recv, const int* s_moff, int u,
                                               int parts, int words, RecvUnit& r) {
  const ep_ll_layout_t& L = p.layout;
  const int lane = threadIdx.x & 31, R = p.num_ranks, H = p.hidden, G = H / 128;
  const int m = u / parts;
  r.part = u % parts;
  int lo = 0, hi = R - 1;  // the last source whose first message is <= m
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (s_moff[mid] <= m) lo = mid;
    else hi = mid - 1;
  }
  r.s = lo;
  r.msg = recv + ((size_t)r.s * L.max_tokens + (m - s_moff[r.s])) * L.msg_bytes;
  r.head = ld_nc_v2(r.msg);
  r.pair = lane < min(L.max_topk, 32) ? ld_nc_v2(r.msg + 8 + 8 * lane) : make_int2(-1, 0);
  r.w0 = (int)((long long)words * r.part / parts);
  r.w1 = (int)((long long)words * (r.part + 1) / parts);
  const int4* src = reinterpret_cast<const int4*>(r.msg + L.hdr_bytes);
#pragma unroll
  for (int b = 0; b < kCopyBatch; ++b)
    if (r.w0 + b * 32 + lane < r.w1) r.v[b] = ld_nc_na(src + r.w0 + b * 32 + lane);
  r.sc[0] = r.sc[1] = 0.0f;
  r.sq = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (r.part == 0 && p.fp8) {
    const float* scales = reinterpret_cast<const float*>(r.msg + L.hdr_bytes + H);
    if (!p.ue8m0) {
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
__device__ __forceinline__ bool dispatch_recv(const ep_ll_launch_t& p, Grid grid) {
  extern __shared__ int s_dyn[];
  const ep_ll_layout_t& L = p.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.rank, R = p.num_ranks, E_loc = p.num_experts / R, H = p.hidden, G = H / 128;
  const size_t RT = (size_t)R * p.max_tokens;
  const size_t half = half_offset(p);
  char* mine = p.ll_base + half;
  const uint64_t* counts = reinterpret_cast<const uint64_t*>(mine + L.dispatch_count);
  const int* meta = reinterpret_cast<const int*>(mine + L.dispatch_meta);  // [R][E_loc]
  LL_PROF_STAMP(kProfDispatchRecv, grid, 0);
  int* s_row0 = s_dyn;           // [R][E_loc] first row of (source, expert); later the prefix
  int* s_moff = s_row0 + R * E_loc;  // [R + 1] first message index of each source
  __shared__ int s_failed;
  // Warp 0 waits for every source's final count and scans the message offsets; no block barrier in between.
  if (warp == 0) {
    bool ok = true;
    for (int s = lane; ok && s < R; s += 32) {
      uint64_t v = 0;
      ok = wait_until([&] { return count_complete(v = ld_acquire_sys_u64(counts + s)); }, p.timeout_ns, p.error, me,
                      s, EP_SITE_LL_DISPATCH_RECV);
      if (ok) s_moff[s + 1] = (int)(v >> 32) - 2;  // n = messages + 1 puts; hi = n + 1
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
  const int parts = max(1, min(8, total_warps / max(M, 1)));
  const int words = p.fp8 ? H / 16 : H / 8;  // payload without the scales, in 16-byte words
  const int units = M * parts;
  const int u0 = grid.block * kRecvWarps + warp;
  RecvUnit r;
  if (u0 < units) recv_unit_load(p, mine + L.recv, s_moff, u0, parts, words, r);
  for (int i = tid; i < R * E_loc; i += blockDim.x) s_row0[i] = ld_relaxed_sys(meta + i);
  __syncthreads();
  for (int le = tid; le < E_loc; le += blockDim.x) {  // rows: sources in order, per expert
    int run = 0;
    for (int s = 0; s < R; ++s) {
      const int n = s_row0[s * E_loc + le];
      s_row0[s * E_loc + le] = run;
      if (grid.block == 0) p.layout_range[(size_t)le * R + s] = ((int64_t)run << 32) | (uint32_t)n;
      run += n;
    }
    if (grid.block == 0) p.recv_count[le] = run;
  }
  __syncthreads();
  LL_PROF_STAMP(kProfDispatchRecv, grid, 2);

  for (int u = u0; u < units; u += total_warps) {
    if (u != u0) recv_unit_load(p, mine + L.recv, s_moff, u, parts, words, r);
    const int s = r.s;
    const int4* src = reinterpret_cast<const int4*>(r.msg + L.hdr_bytes);
    const bool mine_pair = lane < r.head.y && r.pair.x / E_loc == me && r.pair.x >= 0;
    const unsigned pmask = __ballot_sync(0xffffffffu, mine_pair);
    const int row0 = mine_pair ? s_row0[s * E_loc + (r.pair.x - me * E_loc)] + r.pair.y : 0;
    const int le_l = mine_pair ? r.pair.x - me * E_loc : 0;
    for (int base = r.w0; base < r.w1; base += kCopyBatch * 32) {
      if (base != r.w0) {
#pragma unroll
        for (int b = 0; b < kCopyBatch; ++b)
          if (base + b * 32 + lane < r.w1) r.v[b] = ld_nc_na(src + base + b * 32 + lane);
      }
      for (unsigned pm = pmask; pm; pm &= pm - 1) {
        const int bit = __ffs(pm) - 1;
        const int le = __shfl_sync(0xffffffffu, le_l, bit), row = __shfl_sync(0xffffffffu, row0, bit);
        int4* dst = reinterpret_cast<int4*>((char*)p.recv_x + ((size_t)le * RT + row) * (p.fp8 ? H : 2 * H));
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
      if (lane == 0) p.src_info[(size_t)le * RT + col] = r.head.x;
      if (!p.fp8) continue;
      if (!p.ue8m0) {
        float* out = (float*)p.recv_scales + (size_t)le * G * RT;
        for (int g = lane; g < G; g += 32)
          out[(size_t)g * RT + col] = g < 64 ? r.sc[g >> 5] : scales[g];
      } else {
        int* out = (int*)p.recv_scales + (size_t)le * (G / 4) * RT;
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

// ---------------------------------------------------------------------------------------------------------------
// Combine, send phase. All received rows of all local experts form one flat list (experts in order, rows in
// order), split over every warp of the phase's grid in (row, part) units: a warp loads its part of the expert
// output with non-coherent loads, kCopyBatch 16-byte words per lane in flight, and stores it into its source rank's
// combine receive row (expert, position of the token among that rank's tokens for the expert). Rows for another
// node go whole, through the stage, by put-with-signal. No grid-wide barrier: each block, once its stores are
// fenced, adds its number of units to each NVLink rank's signal word; block r % blocks adds the high half
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
      const int w0 = (int)((long long)row_words * part / parts), w1 = (int)((long long)row_words * (part + 1) / parts);
      const int4* sv = reinterpret_cast<const int4*>(src);
      int4* dv = reinterpret_cast<int4*>(peer + offset);
      for (int base = w0; base < w1; base += kCopyBatch * 32) {
        int4 v[kCopyBatch];
#pragma unroll
        for (int b = 0; b < kCopyBatch; ++b)
          if (base + b * 32 + lane < w1) v[b] = ld_input(sv + base + b * 32 + lane);
#pragma unroll
        for (int b = 0; b < kCopyBatch; ++b)
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
  // Every thread's stores are complete before the block's counts.
  __threadfence_system();
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

// ---------------------------------------------------------------------------------------------------------------
// Kernels. With the receive hook each phase is a kernel of its own: the hook launches the receive kernel later, and
// it takes the call number from the handle (p.ops, written by the send phase's block 0). Without the hook one fused
// kernel runs, in each block, the send phase (blocks [0, send_blocks)) and then the receive phase (blocks
// [0, recv_blocks)); its grid is max(send_blocks, recv_blocks) <= the SM count and it is launched cooperatively, so
// that all its blocks are resident at once: a block's receive phase spins on counts that the send phases of other
// blocks, of this rank and of its peers, publish. Running both phases in one kernel, the fused kernel
//  - reads the call number itself in every block (seq[half] + 1, as the send phase does), rather than p.ops, which
//    send block 0 may not have written yet; finish_recv, in every block, advances seq only once all have arrived;
//  - stops a block whose send phase gave up before its receive phase: it never arrives, the other blocks' waits
//    time out (each fault names a peer) and the call is not acknowledged, as with two kernels;
//  - separates the phases with a block barrier: both use the dynamic shared memory from its start.
// Each kind of kernel is one template over the call (dispatch or combine), which picks the phases' code.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kThreads = kSendThreads;  // every LL kernel's block size
static_assert(kSendThreads == kRecvThreads, "a fused kernel runs both phases with one block size");

template <Call kCall>
__device__ __forceinline__ bool send_phase(const ep_ll_launch_t& p, Grid grid, uint64_t op) {
  if constexpr (kCall == Call::kDispatch) return dispatch_send(p, grid, op);
  else return combine_send(p, grid, op);
}

template <Call kCall>
__device__ __forceinline__ bool recv_phase(const ep_ll_launch_t& p, Grid grid) {
  if constexpr (kCall == Call::kDispatch) return dispatch_recv(p, grid);
  else return combine_recv(p, grid);
}

template <Call kCall>
__global__ void __launch_bounds__(kThreads, 1) send_kernel(ep_ll_launch_t p) {
  send_phase<kCall>(p, kernel_grid(), next_call(p));
}

// The call number comes from the handle: p.ops[0] (dispatch) or [1] (combine), written by the send phase.
template <Call kCall>
__global__ void __launch_bounds__(kThreads) recv_kernel(ep_ll_launch_t p) {
  const uint64_t op = p.ops[kCall == Call::kDispatch ? 0 : 1];
  if (recv_phase<kCall>(p, kernel_grid())) finish_recv<kCall>(p, kernel_grid(), op);
}

template <Call kCall>
__global__ void __launch_bounds__(kThreads, 1) fused_kernel(ep_ll_launch_t p, int send_blocks, int recv_blocks) {
  const uint64_t op = next_call(p);
  const int b = blockIdx.x;
  if (b < send_blocks && !send_phase<kCall>(p, Grid{b, send_blocks}, op)) return;
  __syncthreads();  // the receive phase reuses the send phase's shared memory
  const Grid recv{b, recv_blocks};
  if (b < recv_blocks && !recv_phase<kCall>(p, recv)) return;
  finish_recv<kCall>(p, recv, op);
}

}  // namespace ll
}  // namespace ep

static int ll_grid(int sms, int work) { return work < 1 ? 1 : (work < sms ? work : sms); }

static cudaError_t ll_smem(const void* fn, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
}

namespace {
struct Shape {  // of one phase's launch
  int grid;
  size_t smem;  // dynamic shared memory
};
}  // namespace

static Shape dispatch_send_shape(const ep_ll_launch_t* p) {
  /* One block per token up to the SM count; more blocks when a block would own more than kMaxRange tokens. */
  int grid = ll_grid(p->num_sms, p->num_tokens);
  const int min_grid = (p->num_tokens + ep::ll::kMaxRange - 1) / ep::ll::kMaxRange;
  if (grid < min_grid) grid = min_grid;
  const int per_block = (p->num_tokens + grid - 1) / grid;
  return {grid,
          sizeof(int) * (2 * (size_t)p->num_experts + 3 * (size_t)p->num_ranks + 4 * (size_t)per_block * p->num_topk)};
}

static Shape dispatch_recv_shape(const ep_ll_launch_t* p) {
  return {p->num_sms, sizeof(int) * ((size_t)p->num_experts + (size_t)p->num_ranks + 1)};
}

static Shape combine_send_shape(const ep_ll_launch_t* p) {
  const size_t E_loc = (size_t)(p->num_experts / p->num_ranks), R = (size_t)p->num_ranks;
  return {p->num_sms, 2 * sizeof(int) * E_loc * R + sizeof(int) * (E_loc + 1 + 2 * R)};
}

static Shape combine_recv_shape(const ep_ll_launch_t* p) {
  const int chunks = (p->hidden + ep::ll::kChunk - 1) / ep::ll::kChunk;
  const int warps = p->num_tokens * chunks;
  return {ll_grid(p->num_sms, (warps + ep::ll::kRecvWarps - 1) / ep::ll::kRecvWarps), 0};
}

/* One phase's kernel (kKernel: ep::ll::send_kernel or recv_kernel of a call) over shape s. */
template <void (*kKernel)(ep_ll_launch_t)>
static cudaError_t launch_phase(const ep_ll_launch_t* p, Shape s, cudaStream_t stream) {
  cudaError_t e = ll_smem((const void*)kKernel, s.smem);
  if (e != cudaSuccess) return e;
  kKernel<<<s.grid, ep::ll::kThreads, s.smem, stream>>>(*p);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_ll_dispatch_send(const ep_ll_launch_t* p, cudaStream_t stream) {
  return launch_phase<ep::ll::send_kernel<ep::ll::Call::kDispatch>>(p, dispatch_send_shape(p), stream);
}

extern "C" cudaError_t ep_launch_ll_dispatch_recv(const ep_ll_launch_t* p, cudaStream_t stream) {
  return launch_phase<ep::ll::recv_kernel<ep::ll::Call::kDispatch>>(p, dispatch_recv_shape(p), stream);
}

extern "C" cudaError_t ep_launch_ll_combine_send(const ep_ll_launch_t* p, cudaStream_t stream) {
  return launch_phase<ep::ll::send_kernel<ep::ll::Call::kCombine>>(p, combine_send_shape(p), stream);
}

extern "C" cudaError_t ep_launch_ll_combine_recv(const ep_ll_launch_t* p, cudaStream_t stream) {
  return launch_phase<ep::ll::recv_kernel<ep::ll::Call::kCombine>>(p, combine_recv_shape(p), stream);
}

/* Blocks of a fused kernel that can be resident on one SM (threads and registers; a call's dynamic shared memory
 * cannot bring a launchable kernel below 1, and the fused grid never passes the SM count), or 0 where the device
 * has no cooperative launch. A failed query leaves no error behind for the next launch's cudaGetLastError(). */
static int fused_blocks_per_sm(const void* kernel) {
  int dev = 0, coop = 0, blocks = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, ep::ll::kThreads, 0) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return coop ? blocks : 0;
}

/* Launch fused kernel kKernel cooperatively over max(send, receive grid) blocks, if that is at most the SM count and
 * that many blocks can be resident at once (computed once per kernel, per process: every GPU of a job is taken to
 * be the same model); else launch nothing and leave *launched 0. Capturable: the cooperative attribute is valid for
 * launches and for graph kernel nodes (driver_types.h, cudaLaunchAttributeCooperative). */
template <void (*kKernel)(ep_ll_launch_t, int, int)>
static cudaError_t launch_fused(const ep_ll_launch_t* p, Shape send, Shape recv, cudaStream_t stream, int* launched) {
  *launched = 0;
  const int grid = send.grid > recv.grid ? send.grid : recv.grid;
  if (!EP_LL_FUSED || grid > p->num_sms) return cudaSuccess;
  static const int per_sm = fused_blocks_per_sm((const void*)kKernel);
  if (grid > per_sm * p->num_sms) return cudaSuccess;
  const size_t smem = send.smem > recv.smem ? send.smem : recv.smem;
  cudaError_t e = ll_smem((const void*)kKernel, smem);
  if (e != cudaSuccess) return e;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)grid);
  cfg.blockDim = dim3((unsigned)ep::ll::kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  e = cudaLaunchKernelEx(&cfg, kKernel, *p, send.grid, recv.grid);
  const cudaError_t last = cudaGetLastError();  // clear it, as the <<<>>> launches' checks do
  if (e == cudaSuccess) e = last;
  if (e == cudaSuccess) *launched = 1;
  return e;
}

extern "C" cudaError_t ep_launch_ll_dispatch_fused(const ep_ll_launch_t* p, cudaStream_t stream, int* launched) {
  return launch_fused<ep::ll::fused_kernel<ep::ll::Call::kDispatch>>(p, dispatch_send_shape(p), dispatch_recv_shape(p), stream,
                                                     launched);
}

extern "C" cudaError_t ep_launch_ll_combine_fused(const ep_ll_launch_t* p, cudaStream_t stream, int* launched) {
  return launch_fused<ep::ll::fused_kernel<ep::ll::Call::kCombine>>(p, combine_send_shape(p), combine_recv_shape(p), stream,
                                                    launched);
}
