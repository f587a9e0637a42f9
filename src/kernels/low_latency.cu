// low_latency.cu: the low-latency (LL) path: dispatch and combine, each as a send kernel and a receive kernel
// (the receive hook launches the second one later). The buffer layout and the signal protocol are drawn in
// ll_layout.h. Peers of this node are written with NVLink stores; others through the transport's
// put-with-signal. Everything is ordered by data, never by atomics whose order varies: slots come from a
// counting pass over topk_idx, rows of an expert are packed by source rank then token, and combine sums in top-k
// order.
#include "kernels/api.h"
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "kernels/common.cuh"
#include "transport/transport.cuh"

namespace ep {
namespace ll {

constexpr int kSendThreads = 1024;
constexpr int kSendWarps = kSendThreads / 32;
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

// The final value of a count word: (n + 1) << 32 | n (see ll_layout.h).
__device__ __forceinline__ uint64_t final_count(int n) { return ((uint64_t)(n + 1) << 32) | (uint32_t)n; }
__device__ __forceinline__ bool count_complete(uint64_t v) {
  const uint32_t hi = (uint32_t)(v >> 32), lo = (uint32_t)v;
  return hi != 0 && lo == hi - 1;
}

// Publish to rank r, at `offset` inside the LL region, that n messages were sent (after all of them were issued).
__device__ __forceinline__ void publish_count(const ep_ll_launch_t& p, int r, size_t offset, int n) {
  char* peer = nvlink_peer(p, r);
  if (peer) st_release_sys_u64(reinterpret_cast<uint64_t*>(peer + offset), final_count(n));
  else tp::signal_add(reinterpret_cast<uint64_t*>(p.ll_base + offset), (uint64_t)(n + 1) << 32, r);
}

// Tell rank r that this rank finished receiving call `op` on the current half.
__device__ __forceinline__ void send_ack(const ep_ll_launch_t& p, int r, uint64_t op) {
  const size_t offset = half_offset(p) + p.layout.ack + (size_t)p.rank * 8;
  char* peer = nvlink_peer(p, r);
  if (peer) st_release_sys_u64(reinterpret_cast<uint64_t*>(peer + offset), op);
  else tp::signal_set(reinterpret_cast<uint64_t*>(p.ll_base + offset), op, r);
}

// Every rank must have finished receiving the previous call on this half before we write into its half.
__device__ __forceinline__ bool wait_acks(const ep_ll_launch_t& p, uint64_t op, int site) {
  __shared__ int s_failed;
  if (threadIdx.x == 0) s_failed = 0;
  __syncthreads();
  const uint64_t* acks = reinterpret_cast<const uint64_t*>(p.ll_base + half_offset(p) + p.layout.ack);
  for (int r = threadIdx.x; r < p.num_ranks; r += blockDim.x)
    if (!wait_until([&] { return ld_acquire_sys_u64(acks + r) + 1 >= op; }, p.timeout_ns, p.error, p.rank, r, site))
      s_failed = 1;
  __syncthreads();
  return !s_failed;
}

// Is expert index e valid? (bad ones were reported where the token is sent and count as -1)
__device__ __forceinline__ bool valid_expert(int64_t e, int E) { return e >= 0 && e < E; }

// Slot k of a top-k row repeats an expert of an earlier slot.
__device__ __forceinline__ int first_slot(const int64_t* row, int k) {
  for (int j = 0; j < k; ++j)
    if (row[j] == row[k]) return j;
  return k;
}

// Tokens [begin, end) of this rank, counted once per distinct valid expert, into the block's histogram.
__device__ __forceinline__ void count_tokens(const ep_ll_launch_t& p, int begin, int end, int* hist) {
  const int K = p.num_topk;
  for (int i = begin * K + threadIdx.x; i < end * K; i += blockDim.x) {
    const int64_t* row = p.topk_idx + (size_t)(i / K) * K;
    const int k = i % K;
    if (valid_expert(row[k], p.num_experts) && first_slot(row, k) == k) atomicAdd(&hist[row[k]], 1);
  }
}

// 2^ceil(log2(s)) for a positive normal float, exactly (s itself when it is a power of two).
__device__ __forceinline__ float pow2_ceil(float s) {
  const uint32_t bits = __float_as_uint(s);
  if ((bits & 0x7fffffu) == 0) return s;
  return __uint_as_float((bits & 0x7f800000u) + 0x00800000u);
}

// One warp casts 128 channels (4 per lane) of a bf16 row to e4m3 and returns the group's scale. Every lane calls.
__device__ __forceinline__ float cast_group(const __nv_bfloat16* src, uint8_t* dst, int lane, int round_scale) {
  const uint2 raw = *reinterpret_cast<const uint2*>(src + lane * 4);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
  float amax = fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(b.x), fabsf(b.y)));
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
  amax = fmaxf(amax, 1e-4f);
  float scale = amax / 448.0f;
  if (round_scale) scale = pow2_ceil(scale);
  const float inv = 1.0f / scale;
  const float v[4] = {a.x * inv, a.y * inv, b.x * inv, b.y * inv};
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    packed |= (uint32_t)__nv_cvt_float_to_fp8(v[i], __NV_SATFINITE, __NV_E4M3) << (8 * i);
  *reinterpret_cast<uint32_t*>(dst + lane * 4) = packed;
  return scale;
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch, send phase. Block b owns a contiguous range of my tokens. It first counts, per expert, the tokens
// before its range (so the slot of token t for expert e is the number of my earlier tokens that select e), then
// for each of its tokens: builds the message in the stage (FP8 cast or copy), and sends one copy per distinct
// expert to its rank's receive slot. The last block to finish publishes every (expert, me) count.
// ---------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kSendThreads, 1) dispatch_send_kernel(ep_ll_launch_t p) {
  extern __shared__ int s_hist[];  // [num_experts]
  __shared__ int s_slot[kMaxTopk];
  const ep_ll_layout_t& L = p.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.rank, R = p.num_ranks, K = p.num_topk, E = p.num_experts, E_loc = E / R, H = p.hidden;
  const int N = p.num_tokens;
  const size_t half = half_offset(p);
  char* mine = p.ll_base + half;
  const uint64_t op = p.state->seq[p.half] + 1;
  if (blockIdx.x == 0 && tid == 0) p.ops[0] = op;

  for (int e = tid; e < E; e += blockDim.x) s_hist[e] = 0;
  if (!wait_acks(p, op, EP_SITE_LL_DISPATCH_ACK)) return;  // (its __syncthreads also orders the zeroing)

  const int per_block = (N + gridDim.x - 1) / gridDim.x;
  const int begin = min(N, (int)blockIdx.x * per_block), end = min(N, begin + per_block);
  count_tokens(p, 0, begin, s_hist);
  __syncthreads();

  const int payload = p.fp8 ? H + H / 128 * 4 : 2 * H;
  const int msg_words = (16 + payload + 15) / 16;
  const int parts = max(1, min(8, kSendWarps / K));  // warps per NVLink message copy
  for (int t = begin; t < end; ++t) {
    char* msg = mine + L.dispatch_stage + (size_t)t * L.msg_bytes;
    const __nv_bfloat16* x = reinterpret_cast<const __nv_bfloat16*>(p.x) + (size_t)t * H;
    if (tid == 0) *reinterpret_cast<int4*>(msg) = make_int4(t, 0, 0, 0);
    if (p.fp8) {
      float* scales = reinterpret_cast<float*>(msg + 16 + H);
      for (int g = warp; g < H / 128; g += kSendWarps) {
        const float scale = cast_group(x + g * 128, reinterpret_cast<uint8_t*>(msg + 16 + g * 128), lane,
                                       p.round_scale);
        if (lane == 0) scales[g] = scale;
      }
    } else {
      const int4* src = reinterpret_cast<const int4*>(x);
      int4* dst = reinterpret_cast<int4*>(msg + 16);
      for (int i = tid; i < 2 * H / 16; i += blockDim.x) dst[i] = src[i];
    }
    // Slots of this token: its position among my tokens that select each of its experts.
    if (tid < K) {
      const int64_t* row = p.topk_idx + (size_t)t * K;
      const int64_t e = row[tid];
      if (e < -1 || e >= E) record_fault(p.error, EP_FAULT_BAD_EXPERT, me, -1, 0, t, e);
      s_slot[tid] = valid_expert(e, E) && first_slot(row, tid) == tid ? s_hist[e] : -1;
    }
    __syncthreads();
    if (tid < K) {
      const int64_t* row = p.topk_idx + (size_t)t * K;
      const int64_t e = row[tid];
      const int first = valid_expert(e, E) ? first_slot(row, tid) : -1;
      p.slot_of[(size_t)t * L.max_topk + tid] = first >= 0 ? (int)e * L.max_tokens + s_slot[first] : -1;
      if (first == tid) s_hist[e] += 1;  // distinct experts within the token: no two threads share e
    }
    // Send: `parts` warps per copy over NVLink; one warp per put through the transport.
    for (int u = warp; u < K * parts; u += kSendWarps) {
      const int k = u / parts, part = u % parts;
      const int slot = s_slot[k];
      if (slot < 0) continue;
      const int e = (int)p.topk_idx[(size_t)t * K + k];
      const int d = e / E_loc, le = e % E_loc;
      const size_t offset = half + L.recv + ((size_t)(le * R + me) * L.max_tokens + slot) * L.msg_bytes;
      char* peer = nvlink_peer(p, d);
      if (peer) {
        const int w0 = (int)((long long)msg_words * part / parts), w1 = (int)((long long)msg_words * (part + 1) / parts);
        warp_copy<false, 4>(peer + offset, msg, w0, w1, lane);
      } else if (part == 0) {
        uint64_t* count = reinterpret_cast<uint64_t*>(p.ll_base + half + L.dispatch_count + (size_t)(le * R + me) * 8);
        tp::put_signal_warp(p.ll_base + offset, msg, (size_t)msg_words * 16, count, 1, /*add=*/true, d);
      }
    }
    __syncthreads();  // s_slot and the stage row are reused by the next token
  }

  // The last block publishes the counts: the histogram of all my tokens, per expert, to the expert's rank.
  if (!arrive_last(&p.state->done[0])) return;
  count_tokens(p, end, N, s_hist);
  __syncthreads();
  for (int e = tid; e < E; e += blockDim.x) {
    const int d = e / E_loc, le = e % E_loc;
    publish_count(p, d, half + L.dispatch_count + (size_t)(le * R + me) * 8, s_hist[e]);
  }
  __syncthreads();
  if (tid == 0) {
    p.state->done[0] = 0;
    p.state->seq[p.half] = op;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch, receive phase. A block per (local expert, source) pair: wait for the counts of sources 0..s of the
// expert (their sum places this source's rows), then one warp per row copies payload, scales and source index.
// The last block zeroes the counts and acknowledges the call to every rank.
// ---------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kRecvThreads) dispatch_recv_kernel(ep_ll_launch_t p) {
  const ep_ll_layout_t& L = p.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.rank, R = p.num_ranks, E_loc = p.num_experts / R, H = p.hidden, G = H / 128;
  const size_t RT = (size_t)R * p.max_tokens;
  const size_t half = half_offset(p);
  char* mine = p.ll_base + half;
  uint64_t* counts = reinterpret_cast<uint64_t*>(mine + L.dispatch_count);
  const uint64_t op = p.ops[0];
  __shared__ int s_begin, s_count, s_failed;

  for (int pair = blockIdx.x; pair < E_loc * R; pair += gridDim.x) {
    const int le = pair / R, s = pair % R;
    if (tid == 0) {
      s_begin = 0;
      s_count = 0;
      s_failed = 0;
    }
    __syncthreads();
    int before = 0;
    for (int src = tid; src <= s; src += blockDim.x) {
      uint64_t v = 0;
      const uint64_t* word = counts + (size_t)le * R + src;
      if (!wait_until([&] { return count_complete(v = ld_acquire_sys_u64(word)); }, p.timeout_ns, p.error, me, src,
                      EP_SITE_LL_DISPATCH_RECV)) {
        s_failed = 1;
        break;
      }
      const int n = (int)(v >> 32) - 1;
      if (src < s) before += n;
      else s_count = n;
    }
    if (before) atomicAdd(&s_begin, before);
    __syncthreads();
    if (s_failed) return;
    const int row0 = s_begin, n = s_count;
    if (tid == 0) {
      p.layout_range[(size_t)le * R + s] = ((int64_t)row0 << 32) | (uint32_t)n;
      if (s == R - 1) p.recv_count[le] = row0 + n;
    }
    for (int j = warp; j < n; j += kRecvWarps) {
      const char* msg = mine + L.recv + ((size_t)(le * R + s) * L.max_tokens + j) * L.msg_bytes;
      const size_t row = (size_t)le * RT + row0 + j;
      if (lane == 0) p.src_info[row] = ld_nc_na(reinterpret_cast<const int4*>(msg)).x;
      if (p.fp8) {
        warp_copy<true, 4>((uint8_t*)p.recv_x + row * H, msg + 16, 0, H / 16, lane);
        const float* scales = reinterpret_cast<const float*>(msg + 16 + H);
        const size_t col = (size_t)row0 + j;
        if (!p.ue8m0) {
          float* out = (float*)p.recv_scales + (size_t)le * G * RT;
          for (int g = lane; g < G; g += 32) out[(size_t)g * RT + col] = scales[g];
        } else {
          int* out = (int*)p.recv_scales + (size_t)le * (G / 4) * RT;
          for (int q = lane; q < G / 4; q += 32) {
            uint32_t packed = 0;
#pragma unroll
            for (int i = 0; i < 4; ++i) packed |= ((__float_as_uint(scales[4 * q + i]) >> 23) & 0xffu) << (8 * i);
            out[(size_t)q * RT + col] = (int)packed;
          }
        }
      } else {
        warp_copy<true, 4>((char*)p.recv_x + row * 2 * H, msg + 16, 0, 2 * H / 16, lane);
      }
    }
    __syncthreads();
  }

  if (!arrive_last(&p.state->done[1])) return;
  for (int i = tid; i < E_loc * R; i += blockDim.x) counts[i] = 0;
  __threadfence_system();
  __syncthreads();
  for (int r = tid; r < R; r += blockDim.x) send_ack(p, r, op);
  if (tid == 0) p.state->done[1] = 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Combine, send phase. A block per local expert: one (or a few) warps per received row send it back to its
// source rank's combine receive row (expert, position of the token among that rank's tokens for the expert).
// The last block publishes, per rank, how many rows it was sent.
// ---------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kSendThreads, 1) combine_send_kernel(ep_ll_launch_t p) {
  const ep_ll_layout_t& L = p.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.rank, R = p.num_ranks, E_loc = p.num_experts / R, H = p.hidden;
  const size_t RT = (size_t)R * p.max_tokens, row_bytes = (size_t)H * 2;
  const int row_words = H * 2 / 16;
  const size_t half = half_offset(p);
  char* stage = p.ll_base + half + L.combine_stage;  // [E_loc][RT][H] bf16: the zero-copy buffer
  const uint64_t op = p.state->seq[p.half] + 1;
  if (blockIdx.x == 0 && tid == 0) p.ops[1] = op;
  if (!wait_acks(p, op, EP_SITE_LL_COMBINE_ACK)) return;

  for (int le = blockIdx.x; le < E_loc; le += gridDim.x) {
    const int64_t* range = p.layout_range + (size_t)le * R;
    const int64_t last = range[R - 1];
    const int total = (int)(last >> 32) + (int)(uint32_t)last;
    const int parts = max(1, min(8, kSendWarps / max(total, 1)));
    for (int u = warp; u < total * parts; u += kSendWarps) {
      const int row = u / parts, part = u % parts;
      int s = 0;
      while (s + 1 < R && (int)(range[s + 1] >> 32) <= row) ++s;
      const int j = row - (int)(range[s] >> 32);
      const size_t src_off = ((size_t)le * RT + row) * row_bytes;
      const char* src = p.zero_copy ? stage + src_off : (const char*)p.y + src_off;
      const size_t offset = half + L.recv + ((size_t)(me * E_loc + le) * L.max_tokens + j) * L.row_bytes;
      char* peer = nvlink_peer(p, s);
      if (peer) {
        const int w0 = (int)((long long)row_words * part / parts), w1 = (int)((long long)row_words * (part + 1) / parts);
        warp_copy<false, 4>(peer + offset, src, w0, w1, lane);
      } else if (part == 0) {
        if (!p.zero_copy) {
          warp_copy<false, 4>(stage + src_off, src, 0, row_words, lane);
          __syncwarp();
        }
        uint64_t* signal = reinterpret_cast<uint64_t*>(p.ll_base + half + L.combine_signal + (size_t)me * 8);
        tp::put_signal_warp(p.ll_base + offset, stage + src_off, row_bytes, signal, 1, /*add=*/true, s);
      }
    }
  }

  if (!arrive_last(&p.state->done[2])) return;
  for (int s = tid; s < R; s += blockDim.x) {
    int n = 0;
    for (int le = 0; le < E_loc; ++le) n += (int)(uint32_t)p.layout_range[(size_t)le * R + s];
    publish_count(p, s, half + L.combine_signal + (size_t)me * 8, n);
  }
  __syncthreads();
  if (tid == 0) {
    p.state->done[2] = 0;
    p.state->seq[p.half] = op;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Combine, receive phase. Wait for every rank's rows, then one warp per (token, 256 channels):
// out = bf16(sum over k in order of fmaf(w[t][k], row_k, acc)), skipping -1 slots. The last block zeroes the
// signals and acknowledges the call.
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

__global__ void __launch_bounds__(kRecvThreads) combine_recv_kernel(ep_ll_launch_t p) {
  const ep_ll_layout_t& L = p.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int me = p.rank, R = p.num_ranks, K = p.num_topk, H = p.hidden;
  const size_t half = half_offset(p);
  char* mine = p.ll_base + half;
  uint64_t* signals = reinterpret_cast<uint64_t*>(mine + L.combine_signal);
  const uint64_t op = p.ops[1];
  __shared__ int s_failed;
  if (tid == 0) s_failed = 0;
  __syncthreads();
  for (int r = tid; r < R; r += blockDim.x)
    if (!wait_until([&] { return count_complete(ld_acquire_sys_u64(signals + r)); }, p.timeout_ns, p.error, me, r,
                    EP_SITE_LL_COMBINE_RECV))
      s_failed = 1;
  __syncthreads();
  if (s_failed) return;

  const char* rows = mine + L.recv;
  const int chunks = (H + kChunk - 1) / kChunk;
  const int units = p.num_tokens * chunks;
  for (int u = blockIdx.x * kRecvWarps + warp; u < units; u += gridDim.x * kRecvWarps) {
    const int t = u / chunks;
    const int c = (u % chunks) * kChunk + lane * 8;  // first channel of this lane
    const bool active = c < H;
    int my_slot = -1;
    float my_w = 0.0f;
    if (lane < K) {
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

  if (!arrive_last(&p.state->done[3])) return;
  for (int r = tid; r < R; r += blockDim.x) signals[r] = 0;
  __threadfence_system();
  __syncthreads();
  for (int r = tid; r < R; r += blockDim.x) send_ack(p, r, op);
  if (tid == 0) p.state->done[3] = 0;
}

}  // namespace ll
}  // namespace ep

static int ll_grid(int sms, int work) { return work < 1 ? 1 : (work < sms ? work : sms); }

extern "C" cudaError_t ep_launch_ll_dispatch_send(const ep_ll_launch_t* p, cudaStream_t stream) {
  const size_t smem = sizeof(int) * (size_t)p->num_experts;
  if (smem > 48 * 1024) {
    cudaError_t e =
        cudaFuncSetAttribute(ep::ll::dispatch_send_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  ep::ll::dispatch_send_kernel<<<ll_grid(p->num_sms, p->num_tokens), ep::ll::kSendThreads, smem, stream>>>(*p);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_ll_dispatch_recv(const ep_ll_launch_t* p, cudaStream_t stream) {
  ep::ll::dispatch_recv_kernel<<<ll_grid(p->num_sms, p->num_experts), ep::ll::kRecvThreads, 0, stream>>>(*p);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_ll_combine_send(const ep_ll_launch_t* p, cudaStream_t stream) {
  ep::ll::combine_send_kernel<<<ll_grid(p->num_sms, p->num_experts / p->num_ranks), ep::ll::kSendThreads, 0,
                                 stream>>>(*p);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_ll_combine_recv(const ep_ll_launch_t* p, cudaStream_t stream) {
  const int chunks = (p->hidden + ep::ll::kChunk - 1) / ep::ll::kChunk;
  const int warps = p->num_tokens * chunks;
  ep::ll::combine_recv_kernel<<<ll_grid(p->num_sms, (warps + ep::ll::kRecvWarps - 1) / ep::ll::kRecvWarps),
                                ep::ll::kRecvThreads, 0, stream>>>(*p);
  return cudaGetLastError();
}
