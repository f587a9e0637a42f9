// common.cuh: device helpers every kernel family uses: the error word, bounded waits, PTX loads/stores.
#pragma once

#include <stdint.h>

#include "kernels/device_abi.h"

namespace ep {

// Nanoseconds from the GPU's global timer (same clock on every SM).
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Record a fault in the error word; true when this call's fault is the one recorded. The first fault wins, except
// that a fatal fault replaces an unread data fault: a kernel that gave up must leave the group marked failed even
// when the word already held a bad expert index.
__device__ __forceinline__ bool record_fault(ep_device_error_t* err, int code, int rank, int peer, int site,
                                             long long value0, long long value1) {
  int seen = atomicCAS(&err->code, 0, -1);  // -1 = being written
  if (seen > 0 && ep_fault_is_fatal(code) && !ep_fault_is_fatal(seen) && atomicCAS(&err->code, seen, -1) == seen)
    seen = 0;
  if (seen != 0) return false;
  err->peer = peer;
  err->site = site;
  err->rank = rank;
  err->value0 = value0;
  err->value1 = value1;
  __threadfence_system();
  atomicExch(&err->code, code);
  return true;
}

// Write a fatal fault this rank recorded into the group fault word of every NVLink peer (this rank included) that
// holds none yet, by a compare-and-swap through its mapping: the first fault stays. Inline stores, no call: an
// out-of-line call in the waits (the transport's signal, which peers without NVLink need) cost the intranode combine
// kernel 60 bytes of spill stores and 152 of spill loads, and the internode dispatch 150 more (ptxas, sm_90). Peers
// without NVLink get the fault from this rank's host when it reports it (ep_publish_fault_remote); corrupted data
// found by the group check and an abort reach them from the device (publish_fault_everywhere, check.cu).
__device__ __forceinline__ void publish_fault_nvlink(const ep_device_error_t* err, unsigned long long word) {
  if (err->group_fault == nullptr) return;
  for (int r = 0; r < err->num_ranks; ++r) {
    void* base = err->peer_bases[r];
    if (base != nullptr) atomicCAS_system((unsigned long long*)base, 0ull, word);
  }
  __threadfence_system();
}

// A fatal fault (a timeout, corrupted data): recorded here and, unless the word already held one, published to the
// group so that every peer's waits end at once with this cause.
__device__ __forceinline__ void fail_group(ep_device_error_t* err, int code, int rank, int peer, int site,
                                           long long value0, long long value1) {
  if (record_fault(err, code, rank, peer, site, value0, value1))
    publish_fault_nvlink(err, EP_GROUP_FAULT_PACK(code, site, rank, peer));
}

// A fatal fault on this rank, or one a peer published into this rank's group fault word: every wait gives up at
// once. A published fault is recorded as EP_FAULT_PEER_FAILED (over nothing but a data fault) so that the host
// names its origin. Data faults (a bad expert index, a receive overflow) are reported but do not stop the
// protocol, so the group keeps working after them. The two words are loaded together: one round trip to host
// memory plus a load of device memory, every 1024 spins of a wait.
__device__ __forceinline__ bool has_fault(ep_device_error_t* err, int rank) {
  const int code = *(volatile const int*)&err->code;
  const unsigned long long* group_word = *(unsigned long long* volatile const*)&err->group_fault;
  if (ep_fault_is_fatal(code)) return true;
  if (group_word == nullptr) return false;
  const unsigned long long w = *(volatile const unsigned long long*)group_word;
  if (w == 0) return false;
  record_fault(err, EP_FAULT_PEER_FAILED, rank, EP_GROUP_FAULT_ORIGIN(w), EP_GROUP_FAULT_SITE(w),
               EP_GROUP_FAULT_CODE(w), EP_GROUP_FAULT_PEER(w));
  return true;
}

__device__ __forceinline__ int ld_acquire_sys(const int* p) {
  int v;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t ld_acquire_sys_u64(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(int* p, int v) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void st_release_sys_u64(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Bulk loads of data another GPU wrote before a flag we acquired: skip L1 so nothing stale is reused.
__device__ __forceinline__ int4 ld_nc_na(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ int ld_relaxed_sys(const int* ptr) {
  int v;
  asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

__device__ __forceinline__ float ld_relaxed_sys_f32(const float* ptr) {
  float v;
  asm volatile("ld.relaxed.sys.global.f32 %0, [%1];" : "=f"(v) : "l"(ptr) : "memory");
  return v;
}

// One warp copies the 16-byte words [begin, end); `kRemote` sources are read around L1. Each lane issues kBatch
// loads before its first store, so a row costs a few round trips rather than one per load.
template <bool kRemote, int kBatch>
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int begin, int end, int lane) {
  const int4* s = reinterpret_cast<const int4*>(src);
  int4* d = reinterpret_cast<int4*>(dst);
  for (int base = begin + lane; base < end; base += kBatch * 32) {
    int4 v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (base + u * 32 < end) v[u] = kRemote ? ld_nc_na(s + base + u * 32) : s[base + u * 32];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (base + u * 32 < end) d[base + u * 32] = v[u];
  }
}

// A barrier of `threads` threads of the block (whole warps) on hardware barrier `id` (1..15; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Exactly one block returns true: the last to arrive, once every block's earlier writes, to this GPU or to peers,
// are ordered before whatever it does next (it typically publishes a flag that peers act on). One system fence, by
// thread 0 after the barrier: it is cumulative over the block's accesses that the barrier ordered before it, so a
// fence in every thread would only add waits, as cooperative groups' grid sync does (one rank of an H200, LL calls of
// 128 tokens, hidden 7168: dispatch 24.0 -> 23.4 us, combine 26.4-26.7 -> 26.1 us with the one fence).
__device__ __forceinline__ bool arrive_last(unsigned int* counter) {
  __shared__ bool s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    s_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (s_last) __threadfence();
  return s_last;
}

// A bounded spin: call `poll()` until it returns true. If `timeout_ns` passes first, record a timeout naming `peer`
// and `site` and publish it to the group; if a fatal fault was recorded here or published by a peer first, just
// stop. Either way return false: callers must then stop.
template <typename Poll>
__device__ __forceinline__ bool wait_until(Poll poll, unsigned long long timeout_ns, ep_device_error_t* err,
                                           int rank, int peer, int site) {
  unsigned long long start = global_timer_ns();
  uint32_t spins = 0;
  while (!poll()) {
    if ((++spins & 1023u) == 0) {
      if (has_fault(err, rank)) return false;
      if (global_timer_ns() - start > timeout_ns) {
        fail_group(err, EP_FAULT_TIMEOUT, rank, peer, site, (long long)timeout_ns, 0);
        return false;
      }
    }
  }
  return true;
}

// ---- The group's rank mask (ep_group_config_t.mask_failed_ranks; NULL without it), this rank's view. ----
// Whether this rank exchanges nothing with rank r: r is masked, or this rank masked itself (a rank masked by hand
// exchanges with nobody but itself). Never for r == me. Volatile loads: another block's timeout may set a word.
__device__ __forceinline__ bool rank_masked(const int32_t* mask, int me, int r) {
  if (mask == nullptr || r == me) return false;
  return *(volatile const int32_t*)(mask + r) != 0 || *(volatile const int32_t*)(mask + me) != 0;
}

enum WaitResult { kWaitReady = 0, kWaitMasked = 1, kWaitFault = 2 };

// wait_until, for a wait on `peer` that the rank mask may end: a masked peer is not waited for, another thread's
// mask of it (its own timeout) ends the wait within 1024 spins, and this wait's own timeout masks the peer
// (atomicExch) instead of failing the group. Without a mask it is wait_until. kWaitMasked: take the peer as having
// sent nothing. kWaitFault: a fatal fault (recorded here or published by a peer); the caller stops.
//
// Liveness: a live peer may be late because it waits itself, on a rank that died (a normal call waits on a rank
// only where it exchanges rows with it, so one survivor can be a budget late for another). Masking it would cut the
// group in two. So every check of this wait (each 1024 spins) stores the time into this rank's heartbeat word
// (EP_HEARTBEAT_OFFSET), and a wait whose budget ran out first reads the peer's heartbeat through its NVLink mapping:
// if it moved since the wait's first check, the peer is alive and waiting, and the budget starts again, up to
// num_ranks budgets in all (a chain of waits spans at most num_ranks - 1 ranks; two live ranks that wait on each
// other, which only a misuse makes, still end). A dead rank's heartbeat stands still. A peer without an NVLink
// mapping (or a group without a workspace yet) is masked when the budget runs out, as without the heartbeat.
template <typename Poll>
__device__ __forceinline__ WaitResult wait_or_mask(Poll poll, unsigned long long timeout_ns, ep_device_error_t* err,
                                                   int32_t* mask, int rank, int peer, int site) {
  if (mask == nullptr) return wait_until(poll, timeout_ns, err, rank, peer, site) ? kWaitReady : kWaitFault;
  if (rank_masked(mask, rank, peer)) return kWaitMasked;
  const unsigned long long began = global_timer_ns();
  unsigned long long start = began, budgets = 1;
  volatile unsigned long long* my_beat = nullptr;  // set at the first check: the error word is in host memory
  volatile const unsigned long long* peer_beat = nullptr;
  unsigned long long peer_seen = 0;
  uint32_t spins = 0;
  while (!poll()) {
    if ((++spins & 1023u) == 0) {
      if (has_fault(err, rank)) return kWaitFault;
      if (rank_masked(mask, rank, peer)) return kWaitMasked;
      const unsigned long long now = global_timer_ns();
      if (spins == 1024u) {
        char* mine = *(char* volatile const*)&err->group_fault;
        if (mine != nullptr) {
          const int num_ranks = *(volatile const int*)&err->num_ranks;
          const size_t offset = EP_HEARTBEAT_OFFSET(num_ranks);
          char* theirs = (char*)err->peer_bases[peer];
          my_beat = (volatile unsigned long long*)(mine + offset);
          if (theirs != nullptr) {
            peer_beat = (volatile const unsigned long long*)(theirs + offset);
            peer_seen = *peer_beat;
            budgets = (unsigned long long)num_ranks;
          }
        }
      }
      if (my_beat != nullptr) *my_beat = now;
      if (now - start > timeout_ns) {
        if (peer_beat != nullptr && now - began < budgets * timeout_ns) {
          const unsigned long long beat = *peer_beat;
          if (beat != peer_seen) {  // alive and waiting: another budget
            peer_seen = beat;
            start = now;
            continue;
          }
        }
        atomicExch(mask + peer, 1);
        return kWaitMasked;
      }
    }
  }
  return kWaitReady;
}

// A wait on `peer` in a kernel compiled both ways: wait_or_mask with the mask (kMask), else exactly wait_until, so
// that a kernel without the mask keeps its code. Never kWaitMasked without kMask.
template <bool kMask, typename Poll>
__device__ __forceinline__ WaitResult wait_peer(Poll poll, unsigned long long timeout_ns, ep_device_error_t* err,
                                                int32_t* mask, int rank, int peer, int site) {
  if constexpr (kMask) return wait_or_mask(poll, timeout_ns, err, mask, rank, peer, site);
  else return wait_until(poll, timeout_ns, err, rank, peer, site) ? kWaitReady : kWaitFault;
}

// rank_masked in a kernel compiled both ways: false without kMask.
template <bool kMask>
__device__ __forceinline__ bool peer_masked(const int32_t* mask, int me, int r) {
  return kMask && rank_masked(mask, me, r);
}

}  // namespace ep
