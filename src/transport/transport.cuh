// transport.cuh: the device half of the substrate seam. Algorithms call these, never NVSHMEM directly, so a
// second backend (NCCL's device API) can replace this file without touching them.
//
// Two ways to reach a peer:
//  - NVLink peers: plain loads and stores through the peer pointer from ep_tp_peer_ptr() (host) or peer_ptr().
//  - any peer (another node, real or virtual): put / put-with-signal / signal ops, carried by NVSHMEM over
//    IBGDA or its proxy on a real cluster, and over NVLink when the peer shares the host.
#pragma once

#include <stdint.h>

#include <nvshmem.h>
#include <nvshmemx.h>

namespace ep {
namespace tp {

__device__ __forceinline__ void* peer_ptr(void* sym, int pe) { return nvshmem_ptr(sym, pe); }

// Copy `bytes` from local `src` to symmetric `dst` on `pe`, then set (or add to) the 64-bit `signal` there.
// The data is visible on `pe` before the signal. Every thread of the calling warp must call it.
__device__ __forceinline__ void put_signal_warp(void* dst, const void* src, size_t bytes, uint64_t* signal,
                                                uint64_t value, bool add, int pe) {
  nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, signal, value, add ? NVSHMEM_SIGNAL_ADD : NVSHMEM_SIGNAL_SET,
                                  pe);
}

// Same, for a whole thread block.
__device__ __forceinline__ void put_signal_block(void* dst, const void* src, size_t bytes, uint64_t* signal,
                                                 uint64_t value, bool add, int pe) {
  nvshmemx_putmem_signal_nbi_block(dst, src, bytes, signal, value, add ? NVSHMEM_SIGNAL_ADD : NVSHMEM_SIGNAL_SET,
                                   pe);
}

// Copy without a signal (non-blocking; completed by a later quiet() or ordered by fence()).
__device__ __forceinline__ void put_warp(void* dst, const void* src, size_t bytes, int pe) {
  nvshmemx_putmem_nbi_warp(dst, src, bytes, pe);
}

// Atomically add `value` to the 64-bit signal on `pe` (one thread).
__device__ __forceinline__ void signal_add(uint64_t* signal, uint64_t value, int pe) {
  nvshmemx_signal_op(signal, value, NVSHMEM_SIGNAL_ADD, pe);
}

// Atomically set the 64-bit signal on `pe` to `value` (one thread).
__device__ __forceinline__ void signal_set(uint64_t* signal, uint64_t value, int pe) {
  nvshmemx_signal_op(signal, value, NVSHMEM_SIGNAL_SET, pe);
}

// Order earlier puts to each peer before later ones (one thread).
__device__ __forceinline__ void fence() { nvshmem_fence(); }

// Complete every put this thread issued.
__device__ __forceinline__ void quiet() { nvshmem_quiet(); }

// Read a signal word that peers update (acquire: data put before the signal is visible after).
__device__ __forceinline__ uint64_t signal_load(const uint64_t* signal) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(signal) : "memory");
  return v;
}

}  // namespace tp
}  // namespace ep
