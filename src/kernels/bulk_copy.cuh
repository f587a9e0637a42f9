// bulk_copy.cuh: global -> global copies by one thread through the bulk-copy (TMA) engine, staged in shared
// memory. A lane that drives the engine keeps several kilobytes in flight with a handful of instructions, so a
// copy to a peer over NVLink costs the SM almost no issue slots (warp-wide 16-byte copies cost ~20 GB/s per SM).
#pragma once

#include <stdint.h>

#include "kernels/common.cuh"

namespace ep {

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbarrier_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ bool mbarrier_done(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Load `bytes` (a multiple of 16, 16-byte aligned both ends) from global memory into shared memory; `bar`
// completes its phase when they have landed.
__device__ __forceinline__ void bulk_load(void* smem_dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(smem_dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

// Store `bytes` from shared memory to global memory (a peer's, over NVLink, too), as one bulk group.
__device__ __forceinline__ void bulk_store(void* dst, const void* smem_src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_addr(smem_src)),
               "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// At most N of this thread's bulk stores may still be reading their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Every bulk store of this thread has completed, and its writes are ordered before this thread's later
// (generic-proxy) memory operations, e.g. a release of a flag that tells the peer the data is there.
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

// One thread's pipeline of kStages shared-memory buffers of kStageBytes each. copy_rows() moves rows global ->
// global in pieces of at most kStageBytes, with kStages - 1 loads and any number of stores in flight.
template <int kStages, int kStageBytes>
struct BulkPipe {
  char* stage;      // [kStages][kStageBytes] shared memory
  uint64_t* bar;    // [kStages] mbarriers, one phase per load
  uint32_t parity;  // bit s: the phase stage s completes next
  uint32_t seq;     // pieces moved so far: piece seq + q uses stage (seq + q) % kStages

  __device__ void init(char* stage_smem, uint64_t* bars) {
    stage = stage_smem;
    bar = bars;
    parity = 0;
    seq = 0;
    for (int s = 0; s < kStages; ++s) mbarrier_init(bar + s);
  }

  // Rows r = 0 .. num_rows - 1 of `row_bytes` (a multiple of 16; all addresses 16-byte aligned): src + r *
  // src_stride -> dst + r * dst_stride. Returns false (fault recorded, naming `peer`) if a load never lands.
  __device__ bool copy_rows(char* dst, size_t dst_stride, const char* src, size_t src_stride, int num_rows,
                            uint32_t row_bytes, const ep_normal_launch_t& p, int peer) {
    const uint32_t per_row = (row_bytes + kStageBytes - 1) / kStageBytes;
    const uint32_t n = per_row * (uint32_t)num_rows;
    auto at = [&](uint32_t q, size_t stride, size_t& off) {  // byte offset of piece q; returns its size
      const uint32_t r = q / per_row, k = q % per_row;
      off = r * stride + (size_t)k * kStageBytes;
      return min((uint32_t)kStageBytes, row_bytes - k * kStageBytes);
    };
    auto load = [&](uint32_t q) {
      const int s = (seq + q) % kStages;
      size_t off;
      const uint32_t bytes = at(q, src_stride, off);
      bulk_load(stage + s * kStageBytes, src + off, bytes, bar + s);
    };
    bulk_wait_read<0>();  // the last call's stores have read every stage
    for (uint32_t q = 0; q + 1 < kStages && q < n; ++q) load(q);
    for (uint32_t q = 0; q < n; ++q) {
      const int s = (seq + q) % kStages;
      const uint32_t want = (parity >> s) & 1u;
      if (!wait_until([&] { return mbarrier_done(bar + s, want); }, p.timeout_ns, p.error, p.rank, peer,
                      EP_SITE_COMBINE_STAGED))
        return false;
      parity ^= 1u << s;
      size_t off;
      const uint32_t bytes = at(q, dst_stride, off);
      bulk_store(dst + off, stage + s * kStageBytes, bytes);
      if (q + kStages - 1 < n) {
        bulk_wait_read<1>();  // the store of piece q - 1, whose stage piece q + kStages - 1 reuses, has read it
        load(q + kStages - 1);
      }
    }
    seq += n;
    return true;
  }
};

}  // namespace ep
