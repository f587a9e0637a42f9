// ll_common.cuh: what the low-latency (LL) phases share: a phase's grid, the call a kernel runs, the profiling
// stamps, the block shapes, the peer / count-word / acknowledgement helpers and the end of a receive phase
// (finish_recv). The phases themselves are in ll_dispatch.cuh and ll_combine.cuh; the kernels and their launches
// in low_latency.cu, the only file that includes these. The LL region and signal protocol: ll_region.h.
#ifndef EP_KERNELS_LL_COMMON_CUH
#define EP_KERNELS_LL_COMMON_CUH

#include "kernels/launch.h"
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "kernels/common.cuh"
#include "kernels/profile.cuh"
#include "transport/transport.cuh"

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

// Which call a kernel runs (the kernels are templates over it). The combine with sums on the experts' ranks is a
// kernel of its own, so that the default combine kernel does not carry its code: the fused dispatch and combine
// kernels run one after the other on every SM and share its instruction cache (one rank, H200: +0.5 us of dispatch
// kernel time while both forms were one kernel; docs/low-latency.md section 6). The LogFMT combine likewise.
enum class Call { kDispatch, kCombine, kCombineSums, kCombineLogfmt };

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

// Block shapes: threads of a send phase's and of a receive phase's block (equal: a fused kernel runs both).
constexpr int kSendThreads = 512;
constexpr int kSendWarps = kSendThreads / 32;
constexpr int kRecvThreads = 512;
constexpr int kRecvWarps = kRecvThreads / 32;
constexpr int kCopyBatch = 8;  // 16-byte words a lane has in flight per batch (dispatch receive, combine stage copy)

__device__ __forceinline__ size_t half_offset(const ep_ll_launch_t& p) {
  return (size_t)p.half * p.group.region.half_bytes;
}

// Rank r's mapping of the LL region, when r is a peer of this node reached by loads/stores; else NULL.
__device__ __forceinline__ char* nvlink_peer(const ep_ll_launch_t& p, int r) {
  const unsigned local = (unsigned)(r - p.group.node_first_rank);
  if (local >= (unsigned)p.group.ranks_per_node) return nullptr;
  char* base = (char*)p.group.peer_workspace[r];
  return base ? base + p.group.ll_offset : nullptr;
}

// A count word is complete when its high half hi >= 1 and its low half is hi - 1 (see ll_region.h).
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
__device__ __forceinline__ uint64_t next_call(const ep_ll_launch_t& p) { return p.group.state->seq[p.half] + 1; }

// Tell rank r that this rank finished receiving call `op` on the current half.
__device__ __forceinline__ void send_ack(const ep_ll_launch_t& p, int r, uint64_t op) {
  const size_t offset = half_offset(p) + p.group.region.ack + (size_t)p.group.rank * 8;
  char* peer = nvlink_peer(p, r);
  if (peer) st_release_sys_u64(reinterpret_cast<uint64_t*>(peer + offset), op);
  else tp::signal_set(reinterpret_cast<uint64_t*>(p.group.ll_base + offset), op, r);
}

// Whether this rank exchanges nothing with rank r in this call (the group's rank mask). Every LL kernel is compiled
// twice: kMask for a group with a mask, and without it, where this is false and the code is that of a group that
// never had a mask.
template <bool kMask>
__device__ __forceinline__ bool masked(const ep_ll_launch_t& p, int r) {
  return peer_masked<kMask>(p.group.mask, p.group.rank, r);
}

// Every rank must have finished receiving the previous call on this half before we write into its half. Threads
// tid < R poll (no barrier: the caller overlaps this with other work and joins the result with __syncthreads_or).
// A masked rank is not waited for (nothing is written to it).
template <bool kMask>
__device__ __forceinline__ bool poll_acks(const ep_ll_launch_t& p, uint64_t op, int site) {
  const uint64_t* acks = reinterpret_cast<const uint64_t*>(p.group.ll_base + half_offset(p) + p.group.region.ack);
  bool ok = true;
  for (int r = threadIdx.x; ok && r < p.group.num_ranks; r += blockDim.x)
    ok = wait_peer<kMask>([&] { return ld_acquire_sys_u64(acks + r) + 1 >= op; }, p.group.timeout_ns, p.group.error,
                          p.group.mask, p.group.rank, r, site) != kWaitFault;
  return ok;
}

// Wait-cost stats (p.call.wait_stats, DeepEP's dispatch / combine_wait_recv_cost_stats): block 0 of a receive phase
// adds, per source rank, the clock64 cycles from the start of its waits to the arrival of that rank's data. Every
// block waits for every rank; one block counting keeps one sample per (call, rank), and one thread per rank adds (no
// atomics). Nothing runs without the array.
__device__ __forceinline__ long long wait_stats_start(const ep_ll_launch_t& p, Grid grid) {
  return p.call.wait_stats && grid.block == 0 ? clock64() : 0;
}
__device__ __forceinline__ void wait_stats_add(const ep_ll_launch_t& p, Grid grid, int r, long long t0) {
  if (p.call.wait_stats && grid.block == 0) p.call.wait_stats[r] += clock64() - t0;
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

// A 64-bit word a peer wrote before the count this block's warp 0 acquired (ordered by the block barrier after it).
__device__ __forceinline__ uint64_t ld_relaxed_sys_u64(const uint64_t* ptr) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(ptr) : "memory");
  return v;
}

// A message header's pair (ll_region.h): expert e and slot j in one int32, then the weight's bits.
constexpr int kPairSlotBits = EP_LL_PAIR_SLOT_BITS;
__device__ __forceinline__ int2 make_pair(int e, int j, float weight) {
  return make_int2(e << kPairSlotBits | j, __float_as_int(weight));
}
__device__ __forceinline__ int pair_expert(int2 pair) { return pair.x >> kPairSlotBits; }
__device__ __forceinline__ int pair_slot(int2 pair) { return pair.x & ((1 << kPairSlotBits) - 1); }
__device__ __forceinline__ float pair_weight(int2 pair) { return __int_as_float(pair.y); }

// Warps per unit (message or row) when `total_warps` share `units` of them: at small counts every warp gets a part
// of a unit, at most 8 parts per unit.
__device__ __forceinline__ int parts_per_unit(int total_warps, int units) {
  return max(1, min(8, total_warps / max(units, 1)));
}

// [begin, end) of part `part` of n items split in `parts` parts (32-bit: n * parts < 2^31 for every caller).
__device__ __forceinline__ int2 part_range(int part, int parts, int n) {
  return make_int2(n * part / parts, n * (part + 1) / parts);
}

// The last i in [0, n) with starts[i] <= v, for ascending starts with starts[0] <= v: which run (source, expert) a
// flat index falls in, empty runs skipped.
__device__ __forceinline__ int last_start_at_most(const int* starts, int n, int v) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= v) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// The rank holding valid expert e.
__device__ __forceinline__ int rank_of_expert(const ep_ll_launch_t& p, int e) {
  return (int)ep_fastdiv((uint32_t)e, p.call.by_local_experts);
}

// Lanes per token when a warp looks at top-k rows: the power of two >= K (K <= 32), as its log2.
__device__ __forceinline__ int topk_lanes_log2(int K) {
  int lg = 0;
  while ((1 << lg) < K) ++lg;
  return lg;
}

// ---------------------------------------------------------------------------------------------------------------
// The end of a receive phase of call kCall, in EVERY block of the kernel: in a fused kernel the blocks past the
// receive phase's grid arrive too, so that the half's call number, which every block read at its start, advances
// only after all of them. The last block to arrive zeroes the call's count words (each before the acknowledgement
// to the same rank, by the same thread), acknowledges call `op` to every rank and advances the half's call number
// (read by the next send on this half). A block that gave up never gets here: the call is then never acknowledged
// (a timeout fails the group), in a fused kernel as with two kernels. Masked ranks get no acknowledgement.
// ---------------------------------------------------------------------------------------------------------------
template <Call kCall, bool kMask>
__device__ __forceinline__ void finish_recv(const ep_ll_launch_t& p, Grid grid, uint64_t op) {
  constexpr bool kDispatch = kCall == Call::kDispatch;
  [[maybe_unused]] constexpr int phase = kDispatch ? kProfDispatchRecv : kProfCombineRecv;  // profile builds
  unsigned int* done = kDispatch ? &p.group.state->dispatch_done : &p.group.state->combine_done;
  const bool last = arrive_last(done);
  LL_PROF_STAMP(phase, grid, kDispatch ? 4 : 3);  // "arrive" (prof_finish's labels)
  if (!last) {
    LL_PROF_FINISH(phase, grid, p.group.rank, 0);
    return;
  }
  const ep_ll_region_t& L = p.group.region;
  uint64_t* word =
      reinterpret_cast<uint64_t*>(p.group.ll_base + half_offset(p) + (kDispatch ? L.dispatch_count : L.combine_signal));
  for (int r = threadIdx.x; r < p.group.num_ranks; r += blockDim.x) {
    word[r] = 0;
    __threadfence_system();
    if (!masked<kMask>(p, r)) send_ack(p, r, op);
  }
  if (threadIdx.x == 0) {
    *done = 0;
    p.group.state->seq[p.half] = op;
  }
  LL_PROF_FINISH(phase, grid, p.group.rank, LL_PROF_NOW());
}

}  // namespace ll
}  // namespace ep

#endif  // EP_KERNELS_LL_COMMON_CUH
