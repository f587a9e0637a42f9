// normal_rows.cuh: device pieces of the normal (high-throughput) path that do not depend on where the peers are:
// the staged dispatch row, staging my tokens (x_stage) and my expert outputs (y_stage) with one flag per chunk,
// copying a staged row into the dispatch outputs, the graph-safe tail, and the fp32 reduction of bf16 rows that
// combine does. intranode.cu and internode.cu use them; `Launch` is either path's launch struct, both of which carry
// the group view, the handle view and the call under those names. Formats: normal_region.h.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "kernels/common.cuh"
#include "kernels/launch.h"

namespace ep {
namespace rows {

constexpr int kChunk = EP_STAGE_CHUNK_ROWS;

__device__ __forceinline__ uint64_t tag(uint64_t epoch, int value) { return (epoch << 32) | (uint32_t)value; }
__device__ __forceinline__ int untag(uint64_t v) { return (int)(uint32_t)v; }

template <typename T>
__device__ __forceinline__ T* at(char* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

// Where the parts of a staged dispatch row sit, for this call's hidden size and top-k: row | scales [H/128] f32 |
// global expert ids [K] i32 | weights [K] f32. `extent` is the used, 16-byte rounded part of the row.
struct XRow {
  int row_bytes, num_scales, scales_off, topk_off, weights_off, extent;
  __device__ XRow(int hidden, int is_fp8, int num_topk) {
    row_bytes = is_fp8 ? hidden : hidden * 2;
    num_scales = is_fp8 ? hidden / 128 : 0;
    scales_off = (row_bytes + 15) / 16 * 16;
    topk_off = scales_off + num_scales * 4;
    weights_off = topk_off + num_topk * 4;
    extent = (weights_off + num_topk * 4 + 15) / 16 * 16;
  }
};

// Stage my tokens [first, first + count) once into my x_stage (token first + t at row t), a block per chunk of
// kChunk rows, and publish x_staged[c] = epoch.
template <int kWarps, typename Launch>
__device__ __forceinline__ void stage_x(const Launch& p, const XRow& row, uint64_t epoch, int first, int count) {
  const ep_normal_region_t& L = p.group.region;
  char* mine = p.group.normal_base;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, K = p.call.num_topk;
  const int n16 = row.row_bytes / 16;
  const int num_chunks = (count + kChunk - 1) / kChunk;
  for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int end = min(count, (c + 1) * kChunk);
    for (int t = c * kChunk + warp; t < end; t += kWarps) {
      const size_t x = (size_t)first + t;
      char* dst = mine + L.x_stage + (size_t)t * L.x_row_bytes;
      warp_copy<false, 8>(dst, (const char*)p.call.x + x * row.row_bytes, 0, n16, lane);
      for (int i = lane; i < row.num_scales; i += 32)
        reinterpret_cast<float*>(dst + row.scales_off)[i] = p.call.x_scales[x * row.num_scales + i];
      if (lane < K) {
        const int64_t e = p.call.topk_idx ? p.call.topk_idx[x * K + lane] : -1;
        reinterpret_cast<int*>(dst + row.topk_off)[lane] = (e >= 0 && e < p.call.num_experts) ? (int)e : -1;
        reinterpret_cast<float*>(dst + row.weights_off)[lane] =
            p.call.topk_weights ? p.call.topk_weights[x * K + lane] : 0.0f;
      }
    }
    __syncthreads();
    if (tid == 0) {
      __threadfence_system();
      st_release_sys_u64(at<uint64_t>(mine, L.x_staged) + c, epoch);
    }
  }
}

// Every token of the call at once.
template <int kWarps, typename Launch>
__device__ __forceinline__ void stage_x(const Launch& p, const XRow& row, uint64_t epoch) {
  stage_x<kWarps>(p, row, epoch, 0, p.call.num_tokens);
}

// Stage my received expert outputs of a round into my y_stage (bf16 row | weights): y_stage row i, for i in
// [0, num_rows), from y's row y_row(i); publish y_staged[c] = epoch per chunk of kChunk rows. A block takes
// kStageGroup chunks at once, so that one barrier and one system fence serve kStageGroup * kChunk rows (per chunk
// they made staging latency-bound: 171 us at 16 SMs, 2x2). Rows with y_row(i) < 0 are read in place by their only
// reader (me); rows past recv_capacity (after an overflowed dispatch, reported) do not exist in y and are not
// staged.
constexpr int kStageGroup = 4;
template <int kWarps, typename Launch, typename YRow>
__device__ __forceinline__ void stage_y(const Launch& p, uint64_t epoch, int num_rows, YRow y_row) {
  const ep_normal_region_t& L = p.group.region;
  char* mine = p.group.normal_base;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, K = p.call.num_topk, H = p.call.hidden;
  const int n16 = H * 2 / 16;
  const int num_chunks = (num_rows + kChunk - 1) / kChunk;
  for (int c0 = blockIdx.x * kStageGroup; c0 < num_chunks; c0 += gridDim.x * kStageGroup) {
    const int c1 = min(num_chunks, c0 + kStageGroup), end = min(num_rows, c1 * kChunk);
    for (int i = c0 * kChunk + warp; i < end; i += kWarps) {
      const int y = y_row(i);
      if (y < 0 || y >= p.call.recv_capacity) continue;
      char* dst = mine + L.y_stage + (size_t)i * L.y_row_bytes;
      warp_copy<false, 16>(dst, (const char*)p.call.y + (size_t)y * H * 2, 0, n16, lane);
      if (p.call.y_weights && lane < K)
        reinterpret_cast<float*>(dst + H * 2)[lane] = p.call.y_weights[(size_t)y * K + lane];
    }
    __syncthreads();
    if (tid == 0) {
      __threadfence_system();
      for (int c = c0; c < c1; ++c) st_release_sys_u64(at<uint64_t>(mine, L.y_staged) + c, epoch);
    }
  }
}

// One warp copies the staged row `staged` (another GPU's memory, or mine written by another GPU) into output row
// i: the row, its scales, its top-k ids made local to me (others -1) with their weights, and the source token
// first + t (t counts from the first token of the source's round).
template <typename Launch>
__device__ __forceinline__ void pull_x_row(const Launch& p, const XRow& row, const char* staged, int i, int t, int lane,
                                           int first = 0) {
  const int K = p.call.num_topk, E_loc = p.call.num_experts / p.group.num_ranks, me = p.group.rank;
  warp_copy<true, 8>((char*)p.call.recv_x + (size_t)i * row.row_bytes, staged, 0, row.row_bytes / 16, lane);
  for (int c = lane; c < row.num_scales; c += 32)
    p.call.recv_scales[(size_t)i * row.num_scales + c] =
        ld_relaxed_sys_f32(reinterpret_cast<const float*>(staged + row.scales_off) + c);
  if (lane < K && (p.call.recv_topk_idx || p.call.recv_topk_weights)) {
    const int e = ld_relaxed_sys(reinterpret_cast<const int*>(staged + row.topk_off) + lane);
    const int local = (e >= me * E_loc && e < (me + 1) * E_loc) ? e - me * E_loc : -1;
    if (p.call.recv_topk_idx) p.call.recv_topk_idx[(size_t)i * K + lane] = local;
    if (p.call.recv_topk_weights)
      p.call.recv_topk_weights[(size_t)i * K + lane] =
          local >= 0 ? ld_relaxed_sys_f32(reinterpret_cast<const float*>(staged + row.weights_off) + lane) : 0.0f;
  }
  if (lane == 0 && p.call.recv_src_idx) p.call.recv_src_idx[i] = first + t;
}

// One warp marks output row i empty, as the graph-safe tail marks the rows past the count (top-k -1, weights 0,
// source -1); the row itself is not written. A source masked after the prepare leaves its rows so.
template <typename Launch>
__device__ __forceinline__ void empty_x_row(const Launch& p, int i, int lane) {
  const int K = p.call.num_topk;
  if (lane < K && p.call.recv_topk_idx) p.call.recv_topk_idx[(size_t)i * K + lane] = -1;
  if (lane < K && p.call.recv_topk_weights) p.call.recv_topk_weights[(size_t)i * K + lane] = 0.0f;
  if (lane == 0 && p.call.recv_src_idx) p.call.recv_src_idx[i] = -1;
}

// Graph-safe tail: output rows past the received count say "nothing here". Whole grid.
template <typename Launch>
__device__ __forceinline__ void graph_safe_tail(const Launch& p, int num_recv) {
  if (num_recv >= p.call.recv_capacity) return;
  const int K = p.call.num_topk;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (p.call.recv_topk_idx)
    for (size_t x = (size_t)num_recv * K + first; x < (size_t)p.call.recv_capacity * K; x += stride)
      p.call.recv_topk_idx[x] = -1;
  if (p.call.recv_topk_weights)
    for (size_t x = (size_t)num_recv * K + first; x < (size_t)p.call.recv_capacity * K; x += stride)
      p.call.recv_topk_weights[x] = 0.0f;
  if (p.call.recv_src_idx)
    for (size_t x = num_recv + first; x < (size_t)p.call.recv_capacity; x += stride) p.call.recv_src_idx[x] = -1;
}

// ---- combine: fp32 sums of bf16 rows ----

__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const float2 f = __bfloat1622float2(h[u]);
    acc[2 * u] += f.x;
    acc[2 * u + 1] += f.y;
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
  int4 packed;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int u = 0; u < 4; ++u) h[u] = __floats2bfloat162_rn(acc[2 * u], acc[2 * u + 1]);
  return packed;
}

// One pass over a row for at most kSrc sources: each lane issues kUnroll * count loads before its first add, so
// a row costs a few round trips whatever the sources' latency.
template <int kSrc, int kUnroll>
__device__ __forceinline__ void reduce_pass(const char* const* srcs, int count, const int4* bias0, const int4* bias1,
                                            int4* out, int n16, int lane) {
  const int4* src[kSrc];
#pragma unroll
  for (int r = 0; r < kSrc; ++r) src[r] = r < count ? reinterpret_cast<const int4*>(srcs[r]) : nullptr;
  for (int c0 = lane; c0 < n16; c0 += 32 * kUnroll) {
    int4 v[kUnroll][kSrc];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kSrc; ++r)
        if (r < count && c0 + u * 32 < n16) v[u][r] = ld_nc_na(src[r] + c0 + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * 32;
      if (c >= n16) break;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (bias0) add_bf16x8(acc, bias0[c]);
      if (bias1) add_bf16x8(acc, bias1[c]);
#pragma unroll
      for (int r = 0; r < kSrc; ++r)
        if (r < count) add_bf16x8(acc, v[u][r]);
      out[c] = pack_bf16x8(acc);
    }
  }
}

// Any number of sources, 8 loads in flight per lane. Out of line: it keeps the callers' register use down.
static __device__ __noinline__ void reduce_many(const char* const* srcs, int count, const int4* bias0,
                                                const int4* bias1, int4* out, int n16, int lane) {
  for (int c = lane; c < n16; c += 32) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (bias0) add_bf16x8(acc, bias0[c]);
    if (bias1) add_bf16x8(acc, bias1[c]);
    for (int g = 0; g < count; g += 8) {
      int4 v[8];
#pragma unroll
      for (int r = 0; r < 8; ++r)
        if (g + r < count) v[r] = ld_nc_na(reinterpret_cast<const int4*>(srcs[g + r]) + c);
#pragma unroll
      for (int r = 0; r < 8; ++r)
        if (g + r < count) add_bf16x8(acc, v[r]);
    }
    out[c] = pack_bf16x8(acc);
  }
}

// One warp: out = bf16(bias0 + bias1 + srcs[0] + srcs[1] + ...), summed in fp32 in exactly that order whatever
// the count (so the result does not depend on which loop runs), and out_w[k] = sum of wsrcs[r][k] (lane < K).
// `srcs` / `wsrcs` (shared memory, visible to the whole warp) hold `count` bf16 rows of n16 16-byte words.
// Up to kSrc sources take the fast pass (kSrc * kUnroll loads in flight per lane); more take reduce_many. One pass
// variant per kernel: several inlined side by side spill registers at 512 threads.
template <int kSrc, int kUnroll>
__device__ __forceinline__ void reduce_rows(const char* const* srcs, const float* const* wsrcs, int count,
                                            const int4* bias0, const int4* bias1, int4* out, float* out_w, int K,
                                            int n16, int lane) {
  if (count <= kSrc) reduce_pass<kSrc, kUnroll>(srcs, count, bias0, bias1, out, n16, lane);
  else reduce_many(srcs, count, bias0, bias1, out, n16, lane);
  if (out_w && lane < K) {
    float w = 0.0f;
    for (int r = 0; r < count; ++r) w += ld_relaxed_sys_f32(wsrcs[r] + lane);
    out_w[lane] = w;
  }
}

// The handle's round table (normal_region.h, round_rows) after the last round of a prepare, by the whole block: on
// entry, round k's entry R + 1 + s holds source s's rows of that round; on return it holds where they go in my output
// (recv_offset[s] plus s's rows of earlier rounds), and entries [0, R] where each source's rows start among the
// round's rows. `rounds` must be the same in every thread (it is called by all of them).
__device__ inline void build_round_table(int* round_rows, const int* recv_offset, int R, int rounds) {
  const int tid = threadIdx.x;
  __syncthreads();
  if (tid < R) {  // source tid: its rows of each round go after its rows of the rounds before
    int out = recv_offset[tid];
    for (int k = 0; k < rounds; ++k) {
      int* base = round_rows + (size_t)k * (2 * R + 1) + R + 1;
      const int rows = base[tid];
      base[tid] = out;
      out += rows;
    }
  }
  __syncthreads();
  for (int k = tid; k < rounds; k += blockDim.x) {  // where each source's rows start among the round's rows
    int* table = round_rows + (size_t)k * (2 * R + 1);
    const int* next_base = k + 1 < rounds ? table + (2 * R + 1) + R + 1 : recv_offset + 1;
    int offset = 0;
    for (int s = 0; s < R; ++s) {
      table[s] = offset;
      offset += next_base[s] - table[R + 1 + s];
    }
    table[R] = offset;
  }
}

}  // namespace rows
}  // namespace ep
