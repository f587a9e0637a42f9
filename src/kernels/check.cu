// check.cu: the group's control kernels. ep_group_check's kernel: every rank sends a tagged block to every rank
// (itself included) twice, through the transport's put-with-signal and by NVLink stores where the peer is mapped,
// then waits for the blocks addressed to it and verifies every word (block b of the grid talks to rank b). The
// bounded barrier that the host's waits on peers use. The publication of a fatal fault to the group.
#include "kernels/launch.h"
#include "kernels/common.cuh"
#include "transport/transport.cuh"

namespace ep {

constexpr int kCheckInts = 2048;  // 8 KiB per (source, target) block
constexpr int kCheckThreads = 256;

// Per-rank symmetric region, after the control words (EP_CONTROL_BYTES: the group fault word, the barrier's signals):
//   uint64 put_signal[R] | uint64 nvl_signal[R] | int put_block[R][kCheckInts] | int nvl_block[R][kCheckInts]
//   | int staging[R][kCheckInts]
struct CheckRegion {
  uint64_t* put_signal;
  uint64_t* nvl_signal;
  int* put_block;
  int* nvl_block;
  int* staging;
  __host__ __device__ CheckRegion(void* base, int num_ranks) {
    char* p = (char*)base + EP_CONTROL_BYTES(num_ranks);
    put_signal = (uint64_t*)p;
    p += sizeof(uint64_t) * num_ranks;
    nvl_signal = (uint64_t*)p;
    p += sizeof(uint64_t) * num_ranks;
    put_block = (int*)p;
    p += sizeof(int) * (size_t)num_ranks * kCheckInts;
    nvl_block = (int*)p;
    p += sizeof(int) * (size_t)num_ranks * kCheckInts;
    staging = (int*)p;
  }
  static __host__ __device__ size_t bytes(int num_ranks) {
    return EP_CONTROL_BYTES(num_ranks) + 2 * sizeof(uint64_t) * num_ranks +
           3 * sizeof(int) * (size_t)num_ranks * kCheckInts;
  }
};

// Publish a fatal fault to every rank: NVLink peers as publish_fault_nvlink does, the others by a transport signal,
// which may replace a fault that reached them first (either names a rank that failed). Out of line: the kernels of
// this file are not on the hot path.
__device__ __noinline__ void publish_fault_everywhere(const ep_device_error_t* err, unsigned long long word) {
  if (err->group_fault == nullptr) return;
  for (int r = 0; r < err->num_ranks; ++r) {
    void* base = err->peer_bases[r];
    if (base != nullptr) atomicCAS_system((unsigned long long*)base, 0ull, word);
    else tp::signal_set((uint64_t*)err->group_fault, word, r);
  }
  __threadfence_system();
}

__device__ __forceinline__ int check_word(int src, int dst, unsigned long long epoch, int i, int path) {
  return (int)((src * 7919 + dst * 104729 + (int)epoch * 31 + i * 3 + path) ^ 0x5bd1e995);
}

__global__ void __launch_bounds__(kCheckThreads) check_kernel(ep_check_launch_t p) {
  const int peer = blockIdx.x;
  const int me = p.rank;
  CheckRegion mine(p.workspace, p.num_ranks);

  // Send: through the transport...
  int* staged = mine.staging + (size_t)peer * kCheckInts;
  for (int i = threadIdx.x; i < kCheckInts; i += blockDim.x) staged[i] = check_word(me, peer, p.epoch, i, 0);
  __syncthreads();
  tp::put_signal_block(mine.put_block + (size_t)me * kCheckInts, staged, kCheckInts * sizeof(int),
                       mine.put_signal + me, p.epoch, /*add=*/false, peer);
  // ...and by NVLink stores into the peer's mapping, published with a release store of the signal.
  char* peer_base = (char*)p.peer_bases[peer];
  if (peer_base) {
    CheckRegion theirs(peer_base, p.num_ranks);
    int* dst = theirs.nvl_block + (size_t)me * kCheckInts;
    for (int i = threadIdx.x; i < kCheckInts; i += blockDim.x) dst[i] = check_word(me, peer, p.epoch, i, 1);
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence_system();
      st_release_sys_u64(theirs.nvl_signal + me, p.epoch);
    }
  }

  // Receive what `peer` sent to me, then verify it.
  __shared__ bool s_ok;
  if (threadIdx.x == 0) {
    s_ok = wait_until([&] { return ld_acquire_sys_u64(mine.put_signal + peer) >= p.epoch; }, p.timeout_ns,
                      p.error, me, peer, EP_SITE_CHECK_SIGNAL);
    if (s_ok && peer_base)
      s_ok = wait_until([&] { return ld_acquire_sys_u64(mine.nvl_signal + peer) >= p.epoch; }, p.timeout_ns,
                        p.error, me, peer, EP_SITE_CHECK_NVLINK);
    // Blocks that arrived without a wait would not have looked: a check of a group that failed elsewhere fails.
    if (s_ok) s_ok = !has_fault(p.error, me);
  }
  __syncthreads();
  if (!s_ok) return;
  for (int path = 0; path < (peer_base ? 2 : 1); ++path) {
    const int* got = (path == 0 ? mine.put_block : mine.nvl_block) + (size_t)peer * kCheckInts;
    for (int i = threadIdx.x; i < kCheckInts; i += blockDim.x) {
      int want = check_word(peer, me, p.epoch, i, path);
      if (((volatile const int*)got)[i] != want) {
        if (record_fault(p.error, EP_FAULT_BAD_DATA, me, peer, path, i, got[i]))
          publish_fault_everywhere(p.error, EP_GROUP_FAULT_PACK(EP_FAULT_BAD_DATA, path, me, peer));
        break;
      }
    }
  }
  if (threadIdx.x == 0) tp::quiet();
}

__global__ void publish_kernel(const ep_device_error_t* err, unsigned long long word) {
  publish_fault_everywhere(err, word);
}

__global__ void mask_set_kernel(int32_t* mask, int rank, int value) { atomicExch(mask + rank, value); }

constexpr int kBarrierThreads = 128;

// A barrier with the group's time budget: thread t signals rank t (this rank's slot of `signals` there) and waits
// for rank t's signal here. A rank that never arrives becomes a timeout naming it, published like any other; with
// the rank mask, masked ranks are skipped and one that never arrives is masked instead. `signals` is symmetric,
// [num_ranks] words that only grow (the epoch).
__global__ void __launch_bounds__(kBarrierThreads) barrier_kernel(ep_check_launch_t p) {
  uint64_t* signals = (uint64_t*)p.workspace;
  if (threadIdx.x == 0) tp::quiet();  // this rank's earlier puts land before any peer leaves the barrier
  __syncthreads();
  for (int r = threadIdx.x; r < p.num_ranks; r += blockDim.x) {
    if (rank_masked(p.mask, p.rank, r)) continue;
    uint64_t* theirs = (uint64_t*)tp::peer_ptr(signals + p.rank, r);
    if (theirs != nullptr) {
      __threadfence_system();
      st_release_sys_u64(theirs, p.epoch);
    } else {
      tp::signal_set(signals + p.rank, p.epoch, r);
    }
  }
  for (int r = threadIdx.x; r < p.num_ranks; r += blockDim.x)
    if (wait_or_mask([&] { return ld_acquire_sys_u64(signals + r) >= p.epoch; }, p.timeout_ns, p.error, p.mask, p.rank,
                     r, EP_SITE_BARRIER) == kWaitFault)
      return;
  if (threadIdx.x == 0) (void)has_fault(p.error, p.rank);  // every rank came, but one may have failed before
}

}  // namespace ep

extern "C" size_t ep_check_workspace_bytes(int num_ranks) { return ep::CheckRegion::bytes(num_ranks); }

extern "C" cudaError_t ep_launch_check(const ep_check_launch_t* p, cudaStream_t stream) {
  ep::check_kernel<<<p->num_ranks, ep::kCheckThreads, 0, stream>>>(*p);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_barrier(const ep_check_launch_t* p, cudaStream_t stream) {
  ep::barrier_kernel<<<1, ep::kBarrierThreads, 0, stream>>>(*p);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_mask_set(int32_t* mask, int rank, int value, cudaStream_t stream) {
  ep::mask_set_kernel<<<1, 1, 0, stream>>>(mask, rank, value);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_publish(const ep_device_error_t* error, unsigned long long word, cudaStream_t stream) {
  ep::publish_kernel<<<1, 1, 0, stream>>>(error, word);
  return cudaGetLastError();
}
