// internode.cu: the normal (high-throughput) path when the group spans several nodes (num_nodes > 1): prepare,
// dispatch, combine. Design: docs/internode.md; symmetric region: internode_region.h (and normal_region.h for the
// same-node part). A token crosses between nodes at most once per destination node, on its rail: source (n, l)
// puts it into forwarder (m, l)'s receive region, the forwarder relays the chunk flag, and every rank of node m
// pulls the rows it needs from there over NVLink, exactly as it pulls same-node rows from a source's stage.
// Combine mirrors it: the forwarder sums its node's copies of a remote token in fp32, rounds once to bf16 and puts
// that partial back; the source adds its own node's copies and the remote partials in a fixed order.
//
// The inter-node leg, per (remote node, chunk of kChunk slots), one thread block per chunk:
//  - the remote region is NVLink-mapped (tp::peer_ptr != NULL: virtual nodes on one host, or a multi-node NVLink
//    domain): the block's warps write the rows straight into it with wide stores (many loads in flight per lane),
//    then one thread fences (system scope) and sets the chunk's signal through the seam. That is what NVSHMEM's
//    own put-with-signal does for such a peer, minus its one-load-at-a-time copy loop.
//  - otherwise (a NIC): one warp posts the chunk as puts from symmetric memory, consecutive rows merged into one
//    put, then fence and a put-with-signal for the last run. Puts are completed (quiet) before the kernel ends.
// Both ways the data is visible at the target before the signal, and only the target reads the signal.
//
// Rounds (docs/internode.md 1.5.1): a call of more tokens than the regions hold runs in rounds of T tokens, one
// launch of each kernel per round (p.round); every launch is one step of the protocol with its own epoch, over
// tokens [k*T, k*T + T) of every rank, and a launch past the call's rounds (decided by round 0 of the prepare)
// returns at once. Slots, lists and staged rows count from the start of their round; the handle's round tables
// place each round's rows in the output of one big call.
//
// Progress assumption: inside one kernel, blocks wait on flags that other blocks of the same kernel set (a puller
// on the stage flags of another block, the forwarder's last block on its local peers). Every block of a grid must
// therefore be resident at once: the host clamps the dispatch and combine grids to the SMs this process can use
// (the device's, or an MPS cap) and these kernels use one block per SM (__launch_bounds__(..., 1)); prepare uses
// num_ranks blocks (<= 2 per SM).
//
// One file of ~800 lines on purpose: the three kernels are one protocol (prepare's slots are what dispatch relays
// and combine sums back) and share the chunk, relay and signal helpers at the top; split, each reader would need
// the other two files open.
#include "kernels/launch.h"

#include "kernels/common.cuh"
#include "kernels/normal_rows.cuh"
#include "kernels/profile.cuh"
#include "transport/transport.cuh"

namespace ep {
namespace {

constexpr int kMaxLocal = EP_MAX_NVLINK_RANKS;     // ranks per node this path serves
constexpr int kMaxNodes = EP_MAX_INTERNODE_NODES;  // lanes kMaxLocal.. of a warp carry one node each in the combine
constexpr int kMaxSources = 32;      // kMaxLocal + kMaxNodes
static_assert(kMaxLocal + kMaxNodes == kMaxSources && kMaxSources == 32, "one lane per source in the combine");
constexpr int kPrepThreads = 1024;
constexpr int kDispThreads = 768;    // as intranode dispatch: 24 warps, 8 loads in flight per lane
constexpr int kDispWarps = kDispThreads / 32;
constexpr int kCombThreads = 512;    // as intranode combine: 16 warps
constexpr int kCombWarps = kCombThreads / 32;
constexpr int kChunk = EP_STAGE_CHUNK_ROWS;
constexpr int kMaxRanksShared = 1024;  // recv offsets kept in shared memory

using rows::at;
using rows::tag;
using rows::untag;

__device__ __forceinline__ char* peer_normal(const ep_internode_launch_t& p, int rank) {
  return (char*)p.group.peer_workspace[rank] + p.group.normal_offset;
}
__device__ __forceinline__ char* peer_inter(const ep_internode_launch_t& p, int rank) {
  return (char*)p.group.peer_workspace[rank] + p.inter.inter_offset;
}
#if EP_NORMAL_PROFILE  // phase stamps of dispatch and combine (kernels/profile.cuh)
__device__ prof::Record g_inter_prof_dispatch, g_inter_prof_combine;
__device__ const char* const kInterProfDispatch[] = {"inter-dispatch", "acks", "stage", "send", "relay", "pull"};
__device__ const char* const kInterProfCombine[] = {"inter-combine", "acks", "stage", "forward", "reduce", "-"};
#endif

// Index of node `other` in the node-indexed arrays of a rank on node `self`.
__device__ __forceinline__ int node_dist(int self, int other, int N) { return (other - self + N) % N - 1; }
// The node at distance index `d` from `self` (inverse of node_dist).
__device__ __forceinline__ int node_at(int self, int d, int N) { return (self + 1 + d) % N; }

// One thread waits for a 64-bit flag to reach `epoch`; false (fault recorded) on timeout.
__device__ __forceinline__ bool wait_flag(const ep_internode_launch_t& p, const uint64_t* flag, uint64_t epoch,
                                          int peer, int site) {
  return wait_until([&] { return ld_acquire_sys_u64(flag) >= epoch; }, p.group.timeout_ns, p.group.error, p.group.rank,
                    peer, site);
}

// ---- The rank mask (kMask: the kernels' form for a group with one; p.group.mask is this rank's view) ----
// A rank reaches a remote source only through its forwarder, so it cannot see that source stop. The forwarder,
// which waits on the source itself, says so: when it finds the source masked it publishes the flag my node's ranks
// wait on (meta_ready, fwd_ready) as the call's epoch with kSourceMasked set, and they take the source as having
// sent nothing and mask it in their own view. Only the kMask kernels write or read the bit; a group runs one form.
constexpr uint64_t kSourceMasked = 1ull << 63;
__device__ __forceinline__ uint64_t flag_epoch(uint64_t v) { return v & ~kSourceMasked; }

// Whether rank r's own word is set in the mask: r is masked, not only this rank masked by hand (rank_masked is
// then true of every peer). A forwarder marks a source masked only so, lest its node's ranks mask live sources.
__device__ __forceinline__ bool word_masked(const int32_t* mask, int r) {
  return *(volatile const int32_t*)(mask + r) != 0;
}

// wait_flag in a kernel compiled both ways: with kMask a wait on `peer` that the mask may end (wait_or_mask).
template <bool kMask>
__device__ __forceinline__ WaitResult wait_flag_peer(const ep_internode_launch_t& p, const uint64_t* flag,
                                                     uint64_t epoch, int peer, int site) {
  return wait_peer<kMask>([&] { return ld_acquire_sys_u64(flag) >= epoch; }, p.group.timeout_ns, p.group.error,
                          p.group.mask, p.group.rank, peer, site);
}

// kMask, lane 0 of a pulling warp: wait for a chunk of source s's rows, whose `flag` `peer` sets (s itself on my
// node, else s's forwarder). kWaitMasked: the rows are empty (s or the forwarder is masked, or the forwarder marked
// the chunk kSourceMasked, which masks s here too). A wait on my own flag (I forward for s) is no wait on s: my
// relay's lane waits on s itself (bounded, and it then publishes the chunk or its mark), and may reach this chunk
// only after a budget spent on a dead source of another node, so my own budget would mask a live s. It follows the
// relay, ending early only on a fault or once s is masked.
__device__ __forceinline__ WaitResult wait_chunk_masked(const ep_internode_launch_t& p, const uint64_t* flag,
                                                        uint64_t epoch, int s, int peer, int site) {
  int32_t* mask = p.group.mask;
  const int me = p.group.rank;
  if (rank_masked(mask, me, s)) return kWaitMasked;
  uint64_t v = 0;
  WaitResult w = kWaitReady;
  if (peer == me) {
    uint32_t spins = 0;
    while (flag_epoch(v = ld_acquire_sys_u64(flag)) < epoch) {
      if ((++spins & 1023u) == 0) {
        if (has_fault(p.group.error, me)) return kWaitFault;
        if (rank_masked(mask, me, s)) return kWaitMasked;
      }
    }
  } else {
    w = wait_or_mask([&] { return flag_epoch(v = ld_acquire_sys_u64(flag)) >= epoch; }, p.group.timeout_ns,
                     p.group.error, mask, me, peer, site);
  }
  if (w != kWaitReady || !(v & kSourceMasked)) return w;
  atomicExch(mask + s, 1);
  return kWaitMasked;
}

// The last block of a call, once my node's ranks have all acknowledged (acks[(N-1)*P], one per (remote node,
// local rank), set to `epoch`): tell the rail peer of every remote node that its region here is free again
// (signal_set(free_flags[distance], epoch)). Returns false if an ack never came (a fault is recorded). kMask: a
// masked rail peer gets nothing freed and its readers are not waited for; a masked reader is not waited for.
template <bool kMask>
__device__ __forceinline__ bool release_remote_sources(const ep_internode_launch_t& p, const uint64_t* acks,
                                                       uint64_t* free_flags, uint64_t epoch, int site) {
  const int tid = threadIdx.x, P = p.inter.ranks_per_node, N = p.inter.num_nodes, my_node = p.inter.node;
  const int my_local = p.inter.local_rank;
  bool acked = tid >= (N - 1) * P;
  if constexpr (kMask) {
    if (!acked && !rank_masked(p.group.mask, p.group.rank, node_at(my_node, tid / P, N) * P + my_local))
      acked = wait_flag_peer<true>(p, acks + tid, epoch, my_node * P + tid % P, site) != kWaitFault;
    else acked = true;
  } else {
    acked = acked || wait_flag(p, acks + tid, epoch, my_node * P + tid % P, site);
  }
  if (__syncthreads_or(!acked)) return false;
  if (tid < N - 1) {
    const int n = node_at(my_node, tid, N);
    if (!peer_masked<kMask>(p.group.mask, p.group.rank, n * P + my_local))
      tp::signal_set(free_flags + node_dist(n, my_node, N), epoch, n * P + my_local);
  }
  __syncthreads();
  return true;
}

// The start of a dispatch or combine (call `epoch`): the last call is done with what this one overwrites. Threads
// tid < P wait for my node's ranks' acknowledgements (acks[my_node * P + tid] >= epoch - 1: they have read my
// stage), threads P .. P + N - 2 for every other node's rail peer (free_flags[distance] >= epoch - 1: it has taken
// my last sends out of its receive region). Every thread of the block calls; false if one wait timed out (the
// fault, recorded, names the peer). kMask: a masked rank is not waited for (it reads nothing of mine).
template <bool kMask>
__device__ __forceinline__ bool wait_last_call_released(const ep_internode_launch_t& p, const uint64_t* acks,
                                                        const uint64_t* free_flags, uint64_t epoch, int ack_site,
                                                        int free_site) {
  const int tid = threadIdx.x, P = p.inter.ranks_per_node, N = p.inter.num_nodes, my_node = p.inter.node;
  bool ok = true;
  if (tid < P) {
    ok = wait_flag_peer<kMask>(p, acks + my_node * P + tid, epoch - 1, my_node * P + tid, ack_site) != kWaitFault;
  } else if (tid - P < N - 1) {
    const uint64_t* flag = free_flags + (tid - P);
    ok = wait_peer<kMask>([&] { return tp::signal_load(flag) >= epoch - 1; }, p.group.timeout_ns, p.group.error,
                          p.group.mask, p.group.rank, node_at(my_node, tid - P, N) * P + p.inter.local_rank,
                          free_site) != kWaitFault;
  }
  return !__syncthreads_or(!ok);
}

// Block-wide exclusive scan of one flag per thread, for one pass of blockDim.x items. Returns the position of
// this thread's item (if `goes`) and adds the pass total to `count`. All threads must call it.
__device__ __forceinline__ int block_compact(bool goes, int* s_warp_count, int& count) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, goes);
  if (lane == 0) s_warp_count[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, total = 0;
  for (int w = 0; w < warps; ++w) {
    before += w < warp ? s_warp_count[w] : 0;
    total += s_warp_count[w];
  }
  const int pos = goes ? count + before + __popc(ballot & ((1u << lane) - 1)) : -1;
  count += total;
  __syncthreads();
  return pos;
}

// Counts a token once per expert for the experts [first, first + span) (a top-k may repeat an expert).
__device__ __forceinline__ void count_experts(const int64_t* row, int K, int64_t first, int span, int* s_expert) {
  for (int k = 0; k < K; ++k) {
    const int64_t e = row[k];
    if (e < first || e >= first + span) continue;
    bool repeat = false;
    for (int j = 0; j < k; ++j) repeat |= row[j] == e;
    if (!repeat) atomicAdd(&s_expert[e - first], 1);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// prepare: block b deals with global rank b.
//   b on my node:        intranode prepare restricted to the node (my list for b; b's list for me).
//   b my rail peer:      my node_list for b's node goes to b as one metadata put; as b's forwarder I relay the
//                        metadata b put to me (meta_ready), then read it like any other remote source.
//   b other remote rank: read b's metadata from its forwarder on my node (same local index as b), after the relay.
// The last block computes the offsets and, as forwarder, where each relayed slot lands on each local rank.
// kMask (the group's rank mask): block b drops b (its verdict, recv_taken[b] = -1, for the last block) when b is
// masked, when its wait on b runs out of the budget (which masks b), and for a remote b when b's forwarder on my
// node is masked or marked b masked (kSourceMasked): a token reaches another node only through its rail peer there.
// A dropped b gets no list, counts or acknowledgement from me and I wait for nothing from it; the last block zeroes
// its row and column of the counts. My tokens lose the experts of masked ranks, and every expert of a node whose
// rail peer of mine is masked. Acknowledgements still go to every unmasked forwarder (it may not have dropped b).
// ---------------------------------------------------------------------------------------------------------------
template <bool kMask>
__global__ void __launch_bounds__(kPrepThreads) inter_prepare_kernel(ep_internode_launch_t p) {
  extern __shared__ int s_expert[];  // [E / N]
  __shared__ int s_warp_count[kPrepThreads / 32];
  __shared__ int s_count[kMaxLocal];
  __shared__ int s_drop;       // kMask: b is dropped (the block's verdict)
  __shared__ unsigned s_gone;  // kMask, rail block: local ranks of b's node my tokens do not go to, a bit each
  __shared__ int s_rounds;
  const ep_normal_region_t& L = p.group.region;
  const ep_internode_region_t& IL = p.inter.region;
  const int b = blockIdx.x, R = p.group.num_ranks, me = p.group.rank, tid = threadIdx.x;
  const int P = p.inter.ranks_per_node, N = p.inter.num_nodes, my_node = p.inter.node, my_local = p.inter.local_rank;
  const int E = p.call.num_experts, E_loc = E / R, E_node = E / N, K = p.call.num_topk, T = L.max_tokens;
  const int b_node = b / P, b_local = b % P;
  const int k = p.round, CT = L.call_tokens;
  if (k > 0 && k >= *p.handle.num_rounds) return;  // the call takes fewer rounds (round 0 decided)
  const int first = k * T, n = max(0, min(T, p.call.num_tokens - first));  // my tokens [first, first + n)
  const uint64_t epoch = p.group.state->prepare_epoch + 1;
  char* mine = p.group.normal_base;
  char* imine = p.inter.inter_base;
  int32_t* const rmask = p.group.mask;
  int* const round_counts = p.handle.round_counts;  // [R][P]: this round's rows from rank s to my node's rank i
  int* const round_drop = p.handle.round_drop;      // kMask: 1 once dropped, in this round or an earlier one
  const bool dropped_before = kMask && k > 0 && round_drop[b] != 0;
  // Rank-mask form: the caller counted my tokens per expert (once, in round 0); s_expert holds b's experts (same
  // node) or those of b's node (rail peer).
  const int* given_counts = k == 0 ? p.call.num_tokens_per_expert : nullptr;
  const int first_expert = b_node == my_node ? b * E_loc : b_node * E_node;
  const int num_counted = b_node == my_node ? E_loc : E_node;
  for (int e = tid; e < E_node; e += blockDim.x)
    s_expert[e] = given_counts && e < num_counted ? given_counts[first_expert + e] : 0;
  if (tid < kMaxLocal) s_count[tid] = 0;
  __syncthreads();

  if (b_node == my_node) {
    // ---- Same node: as intranode, over the P ranks of my node only.
    bool acked = true;
    if (tid < P)
      acked = wait_flag_peer<kMask>(p, at<uint64_t>(mine, L.prepare_ack) + my_node * P + tid, epoch - 1,
                                    my_node * P + tid, EP_SITE_PREPARE_ACK) != kWaitFault;
    if (__syncthreads_or(!acked)) return;
    if constexpr (kMask) {
      if (tid == 0) s_drop = dropped_before || rank_masked(rmask, me, b);
      __syncthreads();
    }
    int* send_list = at<int>(mine, L.send_list) + (size_t)b * T;
    int count = 0;
    for (int base = 0; base < n; base += blockDim.x) {
      const int t = base + tid;  // within the round: token first + t
      bool goes = false;
      if (t < n && p.call.is_token_in_rank) {
        goes = p.call.is_token_in_rank[(size_t)(first + t) * R + b] != 0;
      } else if (t < n) {
        const int64_t* row = p.call.topk_idx + (size_t)(first + t) * K;
        for (int j = 0; j < K; ++j) {
          const int64_t e = row[j];
          if (e < -1 || e >= E) {
            if (b == me) record_fault(p.group.error, EP_FAULT_BAD_EXPERT, me, -1, 0, first + t, e);
            continue;
          }
          goes |= e >= 0 && e / E_loc == b;
        }
        if (goes && !(kMask && s_drop)) count_experts(row, K, (int64_t)b * E_loc, E_loc, s_expert);
      }
      if (kMask && s_drop) goes = false;  // its experts are dropped (the loop above still checks the ids)
      const int pos = block_compact(goes, s_warp_count, count);
      if (t < n) {
        if (goes) send_list[pos] = t;
        p.handle.send_pos[(size_t)(first + t) * R + b] = pos;
      }
    }
    // Publish my count for b into every rank of my node, my per-expert counts for b's experts to b.
    __threadfence_system();
    __syncthreads();
    char* peer_b = peer_normal(p, b);
    if (tid < P && !peer_masked<kMask>(rmask, me, my_node * P + tid)) {
      uint64_t* row = at<uint64_t>(peer_normal(p, my_node * P + tid), L.count_matrix) + (size_t)me * (R + 1);
      st_release_sys_u64(row + b, tag(epoch, count));
      if (b == me) st_release_sys_u64(row + R, tag(epoch, p.call.num_tokens));
    }
    for (int e = tid; e < E_loc && !(kMask && s_drop); e += blockDim.x)
      st_release_sys_u64(at<uint64_t>(peer_b, L.expert_counts) + (size_t)me * E_loc + e, tag(epoch, s_expert[e]));

    // Source role: b's counts for the ranks of my node and its num_tokens, its expert counts and list for me.
    // kMask: b's expert counts wait in s_expert (this thread's entries, published above) for the block's verdict.
    const uint64_t* their_row = at<uint64_t>(mine, L.count_matrix) + (size_t)b * (R + 1);
    bool ok = true;
    if constexpr (kMask) {
      if (tid <= P && !s_drop) {
        const int col = tid < P ? my_node * P + tid : R;
        uint64_t v = 0;
        const WaitResult w = wait_or_mask([&] { return ((v = ld_acquire_sys_u64(their_row + col)) >> 32) >= epoch; },
                                          p.group.timeout_ns, p.group.error, rmask, me, b, EP_SITE_PREPARE_COUNTS);
        ok = w != kWaitFault;
        if (w == kWaitMasked) s_drop = 1;
        else if (ok && col < R) round_counts[b * P + tid] = untag(v);
        else if (ok) p.handle.num_tokens_of[b] = untag(v);
      }
      for (int e = tid; ok && e < E_loc && !s_drop; e += blockDim.x) {
        uint64_t v = 0;
        const uint64_t* slot = at<uint64_t>(mine, L.expert_counts) + (size_t)b * E_loc + e;
        const WaitResult w = wait_or_mask([&] { return ((v = ld_acquire_sys_u64(slot)) >> 32) >= epoch; },
                                          p.group.timeout_ns, p.group.error, rmask, me, b, EP_SITE_PREPARE_COUNTS);
        ok = w != kWaitFault;
        if (w == kWaitMasked) s_drop = 1;
        else if (ok) s_expert[e] = untag(v);
      }
    } else {
      if (tid <= P) {
        const int col = tid < P ? my_node * P + tid : R;
        uint64_t v = 0;
        ok = wait_until([&] { return ((v = ld_acquire_sys_u64(their_row + col)) >> 32) >= epoch; }, p.group.timeout_ns,
                        p.group.error, me, b, EP_SITE_PREPARE_COUNTS);
        if (ok && col < R) round_counts[b * P + tid] = untag(v);
        else if (ok) p.handle.num_tokens_of[b] = untag(v);
      }
      for (int e = tid; ok && e < E_loc; e += blockDim.x) {
        uint64_t v = 0;
        const uint64_t* slot = at<uint64_t>(mine, L.expert_counts) + (size_t)b * E_loc + e;
        ok = wait_until([&] { return ((v = ld_acquire_sys_u64(slot)) >> 32) >= epoch; }, p.group.timeout_ns,
                        p.group.error, me, b, EP_SITE_PREPARE_COUNTS);
        if (ok) atomicAdd(&p.group.expert_sum[e], untag(v));
      }
    }
    if (__syncthreads_or(!ok)) return;
    const int taken = k > 0 ? p.handle.recv_taken[b] : 0;  // rows from b of earlier rounds
    if (kMask && s_drop) {  // none of my tokens go to b, nothing comes from it
      for (int t = tid; t < n; t += blockDim.x) p.handle.send_pos[(size_t)(first + t) * R + b] = -1;
      if (tid == 0) {
        p.handle.recv_taken[b] = taken;
        round_drop[b] = 1;
      }
    } else {
      for (int e = tid; kMask && e < E_loc; e += blockDim.x)
        if (s_expert[e] != 0) atomicAdd(&p.group.expert_sum[e], s_expert[e]);
      const int from_b = round_counts[b * P + my_local];
      const int* their_list = at<int>(peer_b, L.send_list) + (size_t)me * T;
      int* my_copy = p.handle.recv_src + (size_t)b * CT + taken;
      for (int j = tid; j < from_b; j += blockDim.x) my_copy[j] = ld_relaxed_sys(their_list + j);
      __syncthreads();
      if (tid == 0) {
        p.handle.recv_taken[b] = taken + from_b;
        if (kMask) round_drop[b] = 0;
        st_release_sys_u64(at<uint64_t>(peer_b, L.prepare_ack) + me, epoch);
      }
    }
  } else {
    const int dn = node_dist(my_node, b_node, N);       // b's node in my arrays (and in my node's ranks' arrays)
    const int back = node_dist(b_node, my_node, N);     // my node in the arrays of b's node
    // kMask: b reaches nothing on my node when b, or its forwarder here, is masked.
    if constexpr (kMask) {
      if (tid == 0)
        s_drop = dropped_before || rank_masked(rmask, me, b) || rank_masked(rmask, me, my_node * P + b_local);
      __syncthreads();
    }
    if (b_local == my_local) {
      // ---- Rail peer: my node_list for b's node, sent as one metadata block.
      bool freed = true;
      if (tid == 0 && !(kMask && s_drop)) {
        const WaitResult w =
            wait_flag_peer<kMask>(p, at<uint64_t>(imine, IL.meta_free) + dn, epoch - 1, b, EP_SITE_META_FREE);
        freed = w != kWaitFault;
        if (kMask && w == kWaitMasked) s_drop = 1;
      }
      if (__syncthreads_or(!freed)) return;
      if constexpr (kMask) {  // b dropped: all of its node; else the masked ranks there
        if (tid == 0) {
          unsigned gone = 0;
          for (int i = 0; i < P; ++i) gone |= (unsigned)(s_drop || rank_masked(rmask, me, b_node * P + i)) << i;
          s_gone = gone;
        }
        __syncthreads();
      }
      int* meta = reinterpret_cast<int*>(imine + IL.meta_send + (size_t)dn * IL.meta_bytes);
      const int hdr = 2 + P + E_node;
      int* node_counts = p.handle.node_count + (size_t)k * 2 * N;  // this round's [N] counts, then [N] starts
      const int node_first = k > 0 ? node_counts[-N + b_node] + node_counts[-2 * N + b_node] : 0;
      int* node_list = p.handle.node_tokens + (size_t)b_node * CT + node_first;
      int count = 0;
      for (int base = 0; base < n; base += blockDim.x) {
        const int t = base + tid;  // within the round: token first + t
        int mask = 0;
        if (t < n && p.call.is_token_in_rank) {
          const uint8_t* in_rank = p.call.is_token_in_rank + (size_t)(first + t) * R + (size_t)b_node * P;
          for (int i = 0; i < P; ++i) mask |= (in_rank[i] != 0) << i;
          if constexpr (kMask) mask &= ~(int)s_gone;
        } else if (t < n) {
          const int64_t* row = p.call.topk_idx + (size_t)(first + t) * K;
          for (int j = 0; j < K; ++j) {
            const int64_t e = row[j];
            if (e >= 0 && e < E && e / E_node == b_node) mask |= 1 << ((int)(e / E_loc) % P);
          }
          if constexpr (kMask) mask &= ~(int)s_gone;
          if (mask) count_experts(row, K, (int64_t)b_node * E_node, E_node, s_expert);
        }
        for (int i = 0; i < P; ++i)
          if (mask >> i & 1) atomicAdd(&s_count[i], 1);
        const int pos = block_compact(mask != 0, s_warp_count, count);
        if (t < n) {
          if (mask) {
            meta[hdr + pos] = t << 8 | mask;
            node_list[pos] = t;
          }
          p.handle.send_slot[(size_t)(first + t) * N + b_node] = pos;
        }
      }
      if (tid == 0) {
        meta[0] = p.call.num_tokens;
        meta[1] = count;
        node_counts[b_node] = count;
        node_counts[N + b_node] = node_first;
      }
      if (tid < P) meta[2 + tid] = s_count[tid];
      for (int e = tid; e < E_node; e += blockDim.x) meta[2 + P + e] = s_expert[e];
      __threadfence_system();  // a NIC reads `meta`: every writer's stores first, then the whole block posts
      __syncthreads();
      if (!(kMask && s_drop))
        tp::put_signal_block(imine + IL.meta_recv + (size_t)back * IL.meta_bytes, meta, (size_t)(hdr + count) * 4,
                             at<uint64_t>(imine, IL.meta_arrived) + back, epoch, false, b);
      // ---- As b's forwarder: b's metadata to me arrived; let my node read it (kMask: or say that b is masked).
      bool relayed = true;
      if (tid == 0) {
        const uint64_t* arrived = at<uint64_t>(imine, IL.meta_arrived) + dn;
        if constexpr (kMask) {
          const WaitResult w = s_drop
                                   ? kWaitMasked
                                   : wait_or_mask([&] { return tp::signal_load(arrived) >= epoch; }, p.group.timeout_ns,
                                                  p.group.error, rmask, me, b, EP_SITE_PREPARE_META);
          relayed = w != kWaitFault;
          if (w == kWaitReady) st_release_sys_u64(at<uint64_t>(imine, IL.meta_ready) + dn, epoch);
          if (w == kWaitMasked) {
            s_drop = 1;
            if (word_masked(rmask, b))
              st_release_sys_u64(at<uint64_t>(imine, IL.meta_ready) + dn, epoch | kSourceMasked);
          }
        } else {
          relayed = wait_until([&] { return tp::signal_load(arrived) >= epoch; }, p.group.timeout_ns, p.group.error, me,
                               b, EP_SITE_PREPARE_META);
          if (relayed) st_release_sys_u64(at<uint64_t>(imine, IL.meta_ready) + dn, epoch);
        }
      }
      if (__syncthreads_or(!relayed)) return;
    }
    // ---- Remote source b: its metadata, from its forwarder f on my node.
    const int f = my_node * P + b_local;
    char* fbase = peer_inter(p, f);
    bool ready = true;
    if (tid == 0 && !(kMask && s_drop)) {
      const uint64_t* flag = at<uint64_t>(fbase, IL.meta_ready) + dn;
      uint64_t v = 0;
      const WaitResult w = wait_peer<kMask>(
          [&] {
            v = ld_acquire_sys_u64(flag);
            return (kMask ? flag_epoch(v) : v) >= epoch;
          },
          p.group.timeout_ns, p.group.error, rmask, me, f, EP_SITE_PREPARE_RELAY);
      ready = w != kWaitFault;
      if (kMask && w == kWaitMasked) s_drop = 1;
      if (kMask && w == kWaitReady && (v & kSourceMasked)) {  // f masked b: so do I
        atomicExch(rmask + b, 1);
        s_drop = 1;
      }
    }
    if (__syncthreads_or(!ready)) return;
    const int taken = k > 0 ? p.handle.recv_taken[b] : 0;  // rows from b of earlier rounds
    if (kMask && s_drop) {
      if (tid == 0) {
        p.handle.recv_taken[b] = taken;
        round_drop[b] = 1;
        if (!rank_masked(rmask, me, f))
          st_release_sys_u64(at<uint64_t>(fbase, IL.meta_ack) + (size_t)dn * P + my_local, epoch);
      }
    } else {
      const int* meta = reinterpret_cast<const int*>(fbase + IL.meta_recv + (size_t)dn * IL.meta_bytes);
      const int hdr = 2 + P + E_node;
      const int num_slots = ld_relaxed_sys(meta + 1);
      if (tid < P) round_counts[b * P + tid] = ld_relaxed_sys(meta + 2 + tid);
      if (tid == 0) p.handle.num_tokens_of[b] = ld_relaxed_sys(meta);
      for (int e = tid; e < E_loc; e += blockDim.x)
        atomicAdd(&p.group.expert_sum[e], ld_relaxed_sys(meta + 2 + P + my_local * E_loc + e));
      int count = 0;
      for (int base = 0; base < num_slots; base += blockDim.x) {
        const int j = base + tid;
        const int word = j < num_slots ? ld_relaxed_sys(meta + hdr + j) : 0;
        const bool goes = (word >> my_local) & 1;
        const int pos = block_compact(goes, s_warp_count, count);
        if (goes) {
          p.handle.recv_src[(size_t)b * CT + taken + pos] = word >> 8;
          p.handle.recv_slot[(size_t)b * CT + taken + pos] = j;
        }
      }
      __syncthreads();
      if (tid == 0) {
        p.handle.recv_taken[b] = taken + count;
        if (kMask) round_drop[b] = 0;
        st_release_sys_u64(at<uint64_t>(fbase, IL.meta_ack) + (size_t)dn * P + my_local, epoch);
      }
    }
  }

  // The last block: the round's counts into the call's; as forwarder, where each relayed slot of the round lands on
  // each local rank; after round 0, the call's rounds; after the last round, offsets, totals and the round table.
  if (!arrive_last(&p.group.state->prepare_done)) return;
  const int* drop = round_drop;
  if constexpr (kMask) {  // a dropped rank sends and receives nothing from its round on: its counts are 0
    for (int s = tid; s < R; s += blockDim.x) {
      const bool gone = drop[s] != 0;
      for (int i = 0; i < P; ++i)
        if (gone || drop[my_node * P + i]) round_counts[s * P + i] = 0;
      if (gone) p.handle.num_tokens_of[s] = 0;
    }
    __syncthreads();
  }
  int* round_rows = p.handle.round_rows;
  for (int x = tid; x < R * P; x += blockDim.x) {
    int* m = p.handle.matrix + (size_t)(x / P) * R + my_node * P + x % P;
    *m = (k > 0 ? *m : 0) + round_counts[x];
  }
  for (int s = tid; s < R; s += blockDim.x)  // rows from s in this round
    round_rows[(size_t)k * (2 * R + 1) + R + 1 + s] = round_counts[s * P + my_local];
  if (tid < P) {  // where my rows start among local rank tid's rows of this round
    int base = 0;
    for (int s = 0; s < me; ++s) base += round_counts[s * P + tid];
    p.handle.send_base[(size_t)k * P + tid] = base;
  }
  // The call takes as many rounds as the rank with the most tokens needs (at least one). kMask: every round the
  // group allows. A rank I dropped has no count here (it is 0), but a rank that did not drop it took its count:
  // a remote source whose forwarder on my node is masked is dropped by my node alone, and a rank dying during the
  // prepare reaches some ranks' counts and not others'. Every rank must run the same rounds (each launch moves the
  // epochs on, and round k meets round k of the other ranks); only the group's limit is the same on every rank.
  if (k == 0) {
    if (tid == 0) s_rounds = kMask ? L.max_rounds : 1;
    __syncthreads();
    for (int s = tid; s < R && !kMask; s += blockDim.x) atomicMax(&s_rounds, (p.handle.num_tokens_of[s] + T - 1) / T);
    __syncthreads();
    if (tid == 0) *p.handle.num_rounds = s_rounds;
  } else if (tid == 0) {
    s_rounds = *p.handle.num_rounds;
  }
  __syncthreads();
  const int rounds = s_rounds;
  const bool last_round = k + 1 == rounds;
  for (int e = tid; e < E_loc; e += blockDim.x) {  // expert counts summed over the rounds, aligned at the end
    const int sum = (k > 0 ? p.handle.expert_counts[e] : 0) + p.group.expert_sum[e];
    const int a = p.call.expert_alignment;
    const int c = last_round ? (sum + a - 1) / a * a : sum;
    p.handle.expert_counts[e] = c;
    if (last_round && p.call.out_expert_counts) p.call.out_expert_counts[e] = c;
    p.group.expert_sum[e] = 0;
  }
  if (last_round && tid == 0) {
    int offset = 0;
    for (int s = 0; s < R; ++s) {
      p.handle.recv_offset[s] = offset;
      if (rounds == 1) round_rows[s] = round_rows[R + 1 + s] = offset;  // one round: the table is the offsets
      offset += p.handle.matrix[(size_t)s * R + me];
    }
    p.handle.recv_offset[R] = offset;
    if (rounds == 1) round_rows[R] = offset;
    *p.handle.num_recv = offset;
    if (p.call.out_num_recv) *p.call.out_num_recv = offset;
  }
  if (last_round && rounds > 1) rows::build_round_table(round_rows, p.handle.recv_offset, R, rounds);
  // As forwarder: where slot j of each remote source node lands on each local rank i (its row among i's rows of
  // the round, or -1), by a block-wide scan per local rank over the slots. kMask: a dropped source relayed nothing
  // (its meta_recv is stale), and a dropped local rank gets no slot.
  int keep = -1;  // local ranks that take slots, a bit each
  if constexpr (kMask) {
    keep = 0;
    for (int i = 0; i < P; ++i) keep |= (drop[my_node * P + i] == 0) << i;
  }
  int* fwd_counts = p.handle.fwd_count + (size_t)k * 2 * N;  // this round's [N] counts, then [N] starts
  for (int dn = 0; dn < N - 1; ++dn) {
    const int m = node_at(my_node, dn, N), s = m * P + my_local;
    const int* meta = reinterpret_cast<const int*>(imine + IL.meta_recv + (size_t)dn * IL.meta_bytes);
    const int hdr = 2 + P + E_node;
    const int num_slots = kMask && drop[s] ? 0 : ld_relaxed_sys(meta + 1);
    const int fwd_first = k > 0 ? fwd_counts[-N + m] + fwd_counts[-2 * N + m] : 0;
    if (tid < P) {
      int row = 0;  // rows of sources before s on local rank tid in this round
      for (int s2 = 0; s2 < s; ++s2) row += round_counts[s2 * P + tid];
      s_count[tid] = row;
    }
    __syncthreads();
    int next[kMaxLocal];
#pragma unroll
    for (int i = 0; i < kMaxLocal; ++i) next[i] = i < P ? s_count[i] : 0;
    __syncthreads();
    int* out = p.handle.fwd_row + ((size_t)m * CT + fwd_first) * P;
    for (int base = 0; base < num_slots; base += blockDim.x) {
      const int j = base + tid;
      const int word = j < num_slots ? ld_relaxed_sys(meta + hdr + j) & keep : 0;
#pragma unroll
      for (int i = 0; i < kMaxLocal; ++i) {
        if (i >= P) break;
        const int pos = block_compact((word >> i) & 1, s_warp_count, next[i]);
        if (j < num_slots) out[(size_t)j * P + i] = pos;
      }
    }
    if (tid == 0) {
      fwd_counts[m] = num_slots;
      fwd_counts[N + m] = fwd_first;
    }
  }
  __syncthreads();
  // My node's ranks have read my meta_recv: the sources may overwrite it.
  if (!release_remote_sources<kMask>(p, at<uint64_t>(imine, IL.meta_ack), at<uint64_t>(imine, IL.meta_free), epoch,
                                     EP_SITE_PREPARE_RELAY))
    return;
  if (tid == 0) {
    p.group.state->prepare_done = 0;
    p.group.state->prepare_epoch = epoch;
  }
}

// The (remote node, chunk) units of a node-indexed list of counts, flattened: unit u -> (dn, c). False if none.
__device__ __forceinline__ bool unit_of(const int* counts_by_node, int my_node, int N, int u, int& dn, int& c) {
  for (dn = 0; dn < N - 1; ++dn) {
    const int chunks = (counts_by_node[node_at(my_node, dn, N)] + kChunk - 1) / kChunk;
    if (u < chunks) {
      c = u;
      return true;
    }
    u -= chunks;
  }
  return false;
}

__device__ __forceinline__ int num_units(const int* counts_by_node, int my_node, int N) {
  int total = 0;
  for (int dn = 0; dn < N - 1; ++dn) total += (counts_by_node[node_at(my_node, dn, N)] + kChunk - 1) / kChunk;
  return total;
}

// Source s of output row i: the largest s with offset[s] <= i (offset[R] > i).
__device__ __forceinline__ int source_of(const int* offset, int R, int i) {
  int lo = 0, hi = R - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offset[mid] <= i) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------------------------
// dispatch: stage, put my rows to the rail forwarders, relay what arrived for my node, pull my rows.
// ---------------------------------------------------------------------------------------------------------------

// Lane 0 waits for x_staged[chunk] (my stage, written by another block) unless `ready` already is that chunk;
// false on timeout. Warp-uniform.
__device__ __forceinline__ bool wait_staged(const ep_internode_launch_t& p, uint64_t epoch, int chunk, int& ready,
                                            int lane) {
  if (chunk == ready) return true;
  bool w = true;
  if (lane == 0)
    w = wait_flag(p, at<uint64_t>(p.group.normal_base, p.group.region.x_staged) + chunk, epoch, p.group.rank,
                  EP_SITE_DISPATCH_STAGED);
  w = __shfl_sync(0xffffffffu, w, 0);
  if (w) ready = chunk;
  return w;
}

// The relay warp: lane i walks units i, i + 32, ... of the chunks my rail peers put to me (chunks arrive roughly in
// order, so the lanes wait side by side) and republishes each as fwd_ready once its signal arrived. Warp-uniform
// result: false after a timeout.
__device__ __noinline__ bool relay(char* arrived_base, char* ready_base, const int* fwd_count, int my_node, int N,
                                   int NC, uint64_t epoch, unsigned long long timeout_ns, ep_device_error_t* err,
                                   int me, int P, int my_local, int lane) {
  const int relay_units = num_units(fwd_count, my_node, N);
  bool w = true;
  for (int u = lane; u < relay_units && w; u += 32) {
    int dn, c;
    unit_of(fwd_count, my_node, N, u, dn, c);
    const uint64_t* arrived = reinterpret_cast<const uint64_t*>(arrived_base) + (size_t)dn * NC + c;
    w = wait_until([&] { return tp::signal_load(arrived) >= epoch; }, timeout_ns, err, me,
                   node_at(my_node, dn, N) * P + my_local, EP_SITE_DISPATCH_RDMA);
    if (w) st_release_sys_u64(reinterpret_cast<uint64_t*>(ready_base) + (size_t)dn * NC + c, epoch);
  }
  return __all_sync(0xffffffffu, w);
}

// relay with the rank mask: a source that is masked, or whose wait runs out of the budget (which masks it), has its
// chunks published as kSourceMasked, so that my node's ranks leave its rows empty instead of waiting for them.
__device__ __noinline__ bool relay_masked(char* arrived_base, char* ready_base, const int* fwd_count, int my_node,
                                          int N, int NC, uint64_t epoch, unsigned long long timeout_ns,
                                          ep_device_error_t* err, int32_t* mask, int me, int P, int my_local,
                                          int lane) {
  const int relay_units = num_units(fwd_count, my_node, N);
  bool w = true;
  for (int u = lane; u < relay_units && w; u += 32) {
    int dn, c;
    unit_of(fwd_count, my_node, N, u, dn, c);
    const int source = node_at(my_node, dn, N) * P + my_local;
    const uint64_t* arrived = reinterpret_cast<const uint64_t*>(arrived_base) + (size_t)dn * NC + c;
    uint64_t* ready = reinterpret_cast<uint64_t*>(ready_base) + (size_t)dn * NC + c;
    const WaitResult r = wait_or_mask([&] { return tp::signal_load(arrived) >= epoch; }, timeout_ns, err, mask, me,
                                      source, EP_SITE_DISPATCH_RDMA);
    w = r != kWaitFault;
    if (r == kWaitReady) st_release_sys_u64(ready, epoch);
    else if (r == kWaitMasked && word_masked(mask, source)) st_release_sys_u64(ready, epoch | kSourceMasked);
  }
  return __all_sync(0xffffffffu, w);
}

// One warp posts slots [first, end) of a chunk to `region` (symmetric, on pe) as puts from my x_stage, row j
// being token tokens[j]'s staged row: consecutive tokens are consecutive in both, so each run is one put, and the
// last run carries the chunk's signal after a fence. The rows must be staged. Out of line: a NIC-only path.
__device__ __noinline__ void post_rows(char* region, const char* stage, const int* tokens, int first, int end,
                                       size_t stride, int extent, uint64_t* signal, uint64_t epoch, int pe,
                                       int lane) {
  const int j = first + lane;
  const int t = j < end ? tokens[j] : -1;
  const int prev = __shfl_up_sync(0xffffffffu, t, 1);
  unsigned starts = __ballot_sync(0xffffffffu, t >= 0 && (lane == 0 || prev + 1 != t));
  while (starts) {
    const int a = __ffs(starts) - 1;
    starts &= starts - 1;
    const int b = starts ? __ffs(starts) - 1 : end - first;  // the run is slots first + [a, b)
    const int t0 = __shfl_sync(0xffffffffu, t, a);
    const char* src = stage + (size_t)t0 * stride;
    char* dst = region + (size_t)(first + a) * stride;
    const size_t bytes = (size_t)(b - a - 1) * stride + extent;
    if (starts) {
      tp::put_warp(dst, src, bytes, pe);
    } else {
      tp::fence();  // the earlier runs of the chunk land before the signalled last one
      tp::put_signal_warp(dst, src, bytes, signal, epoch, false, pe);
    }
  }
}

// kMask: nothing is sent to a masked forwarder, a masked source's rows (there are none unless it was masked after the
// prepare, or by a wait of this call) are left empty, as past the received count, and a masked rank is neither
// waited for nor acknowledged. Waits on my own stage stay fatal: only this rank writes it.
template <bool kMask>
__global__ void __launch_bounds__(kDispThreads, 1) inter_dispatch_kernel(ep_internode_launch_t p) {
  __shared__ int s_offset[kMaxRanksShared + 1];  // the round's rows from source s start at s_offset[s] among them,
  __shared__ int s_base[kMaxRanksShared];        // at s_base[s] in my output,
  __shared__ int s_taken[kMaxRanksShared];       // at s_taken[s] in my copy of s's lists (recv_src, recv_slot)
  const ep_normal_region_t& L = p.group.region;
  const ep_internode_region_t& IL = p.inter.region;
  const int R = p.group.num_ranks, me = p.group.rank, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int P = p.inter.ranks_per_node, N = p.inter.num_nodes, my_node = p.inter.node, my_local = p.inter.local_rank;
  const int T = L.max_tokens, NC = IL.num_chunks;
  const size_t xr = IL.x_row_bytes;
  const int k = p.round, CT = L.call_tokens;
  if (k > 0 && k >= *p.handle.num_rounds) return;  // the call takes fewer rounds
  const bool last_round = k + 1 == *p.handle.num_rounds;
  const int first_token = k * T;  // my tokens of the round: [first_token, first_token + T) within num_tokens
  const uint64_t epoch = p.group.state->dispatch_epoch + 1;
  char* mine = p.group.normal_base;
  char* imine = p.inter.inter_base;
  const rows::XRow row(p.call.hidden, p.call.is_fp8, p.call.num_topk);
  NORMAL_PROF_STAMP(g_inter_prof_dispatch, 0);

  // Readers of my stage (my node) and the forwarders' receive regions (other nodes) are done with the last call.
  if (!wait_last_call_released<kMask>(p, at<uint64_t>(mine, L.dispatch_ack), at<uint64_t>(imine, IL.rdma_free), epoch,
                                      EP_SITE_DISPATCH_ACK, EP_SITE_RDMA_FREE))
    return;
  NORMAL_PROF_STAMP(g_inter_prof_dispatch, 1);

  // 1. Stage every token once (as intranode).
  rows::stage_x<kDispWarps>(p, row, epoch, first_token, max(0, min(T, p.call.num_tokens - first_token)));
  NORMAL_PROF_STAMP(g_inter_prof_dispatch, 2);

  // 2. Send: a block per (remote node m, chunk c of node_list[m]); each row once, then one signal per chunk.
  bool ok = true, posted = false;  // posted: this warp issued NIC puts (completed by quiet before the end)
  const int* node_counts = p.handle.node_count + (size_t)k * 2 * N;  // this round's [N] counts, then [N] starts
  const int send_units = num_units(node_counts, my_node, N);
  for (int u = blockIdx.x; u < send_units; u += gridDim.x) {
    int dn, c;
    unit_of(node_counts, my_node, N, u, dn, c);
    const int m = node_at(my_node, dn, N), pe = m * P + my_local, back = node_dist(m, my_node, N);
    if constexpr (kMask) {  // one answer for the block: its warps meet at barriers below
      if (__syncthreads_or(tid == 0 && rank_masked(p.group.mask, me, pe))) continue;
    }
    const int first = c * kChunk, end = min(node_counts[m], first + kChunk);
    const int* tokens = p.handle.node_tokens + (size_t)m * CT + node_counts[N + m];  // within the round
    char* region = imine + IL.rdma_recv + (size_t)back * T * xr;  // my rows' region on pe (symmetric address)
    uint64_t* signal = at<uint64_t>(imine, IL.rdma_arrived) + (size_t)back * NC + c;
    char* mapped = p.inter.force_put ? nullptr : (char*)tp::peer_ptr(region, pe);
    if (mapped) {
      int ready = -1;
      for (int j = first + warp; j < end && ok; j += kDispWarps) {
        const int t = tokens[j];
        ok = wait_staged(p, epoch, t / kChunk, ready, lane);
        if (ok) warp_copy<false, 8>(mapped + (size_t)j * xr, mine + L.x_stage + (size_t)t * L.x_row_bytes, 0,
                                    row.extent / 16, lane);
      }
    } else if (warp == 0) {
      // Lane i: slot first + i. Runs of consecutive tokens are consecutive in both x_stage and the region.
      const int j = first + lane;
      const int t = j < end ? tokens[j] : -1;
      bool w = true;
      if (t >= 0) w = wait_flag(p, at<uint64_t>(mine, L.x_staged) + t / kChunk, epoch, me, EP_SITE_DISPATCH_STAGED);
      ok = __all_sync(0xffffffffu, w);
      if (ok) {
        post_rows(region, mine + L.x_stage, tokens, first, end, xr, row.extent, signal, epoch, pe, lane);
        posted = true;
      }
    }
    if (__syncthreads_or(!ok)) {
      ok = false;
      break;
    }
    if (mapped && tid == 0) {
      __threadfence_system();  // every warp's stores to pe, ordered by the barrier, before the signal
      tp::signal_set(signal, epoch, pe);
    }
  }
  NORMAL_PROF_STAMP(g_inter_prof_dispatch, 3);

  // 3. Relay (forwarder role), one warp: a chunk that arrived from the rail peer of node n may be pulled by my
  //    node.
  const int* fwd_counts = p.handle.fwd_count + (size_t)k * 2 * N;  // this round's [N] counts, then [N] starts
  if (ok && blockIdx.x == gridDim.x - 1 && warp == kDispWarps - 1) {
    if constexpr (kMask)
      ok = relay_masked(imine + IL.rdma_arrived, imine + IL.fwd_ready, fwd_counts, my_node, N, NC, epoch,
                        p.group.timeout_ns, p.group.error, p.group.mask, me, P, my_local, lane);
    else
      ok = relay(imine + IL.rdma_arrived, imine + IL.fwd_ready, fwd_counts, my_node, N, NC, epoch, p.group.timeout_ns,
                 p.group.error, me, P, my_local, lane);
  }

  // 4. Pull this block's share of my output rows, in output order (source rank, then token).
  //    Round row i comes from source s, as its j-th row for me in the round.
  const int* table = p.handle.round_rows + (size_t)k * (2 * R + 1);
  if (tid <= R) s_offset[tid] = table[tid];
  if (tid < R) {
    s_base[tid] = table[R + 1 + tid];
    s_taken[tid] = s_base[tid] - p.handle.recv_offset[tid];
  }
  __syncthreads();
  NORMAL_PROF_STAMP(g_inter_prof_dispatch, 4);
  const int num_recv = p.handle.recv_offset[R];  // an overflow is reported at the end (a fault ends every wait)
  const int num_rows = s_offset[R];
  const int per_block = (num_rows + gridDim.x - 1) / gridDim.x;
  const int begin = blockIdx.x * per_block, end = min(num_rows, begin + per_block);
  int ready_src = -1, ready_chunk = -1;
  for (int i = begin + warp; i < end && ok; i += kDispWarps) {
    const int s = source_of(s_offset, R, i), j = i - s_offset[s], out = s_base[s] + j;
    const size_t entry = (size_t)s * CT + s_taken[s] + j;
    const int t = p.handle.recv_src[entry];  // within the round
    const int s_node = s / P;
    const char* staged;
    const uint64_t* flag;
    int chunk, peer, site;
    if (s_node == my_node) {
      char* src = peer_normal(p, s);
      staged = src + L.x_stage + (size_t)t * L.x_row_bytes;
      chunk = t / kChunk;
      flag = at<uint64_t>(src, L.x_staged) + chunk;
      peer = s;
      site = EP_SITE_DISPATCH_STAGED;
    } else {
      const int f = my_node * P + s % P, dn = node_dist(my_node, s_node, N), slot = p.handle.recv_slot[entry];
      char* fb = peer_inter(p, f);
      staged = fb + IL.rdma_recv + ((size_t)dn * T + slot) * xr;
      chunk = slot / kChunk;
      flag = at<uint64_t>(fb, IL.fwd_ready) + (size_t)dn * NC + chunk;
      peer = f;
      site = EP_SITE_DISPATCH_RELAY;
    }
    if (s != ready_src || chunk != ready_chunk) {
      if constexpr (kMask) {
        int w = kWaitReady;
        if (lane == 0) w = wait_chunk_masked(p, flag, epoch, s, peer, site);
        w = __shfl_sync(0xffffffffu, w, 0);
        if (w == kWaitFault) {
          ok = false;
          break;
        }
        if (w == kWaitMasked) {  // asked again for its next row: a masked source answers at once
          if (out < p.call.recv_capacity) rows::empty_x_row(p, out, lane);
          continue;
        }
      } else {
        bool w = true;
        if (lane == 0) w = wait_flag(p, flag, epoch, peer, site);
        if (!__shfl_sync(0xffffffffu, w, 0)) {
          ok = false;
          break;
        }
      }
      ready_src = s;
      ready_chunk = chunk;
    }
    if (out < p.call.recv_capacity) rows::pull_x_row(p, row, staged, out, t, lane, first_token);
  }
  if (posted) tp::quiet();  // x_stage is rewritten next round or call: our puts from it are complete
  if (last_round) rows::graph_safe_tail(p, num_recv);
  if (__syncthreads_or(!ok)) return;
  NORMAL_PROF_DONE(g_inter_prof_dispatch, 5);

  // 5. Release: my node's stages (dispatch_ack), the forwarders' receive regions (fwd_ack), and as forwarder,
  //    once my whole node has pulled, tell each remote source its region here is free (rdma_free).
  if (!arrive_last(&p.group.state->dispatch_done)) {
    NORMAL_PROF_END(g_inter_prof_dispatch, me, kInterProfDispatch);
    return;
  }
  if (tid < P && !peer_masked<kMask>(p.group.mask, me, my_node * P + tid))
    st_release_sys_u64(at<uint64_t>(peer_normal(p, my_node * P + tid), L.dispatch_ack) + me, epoch);
  if (tid < (N - 1) * P && !peer_masked<kMask>(p.group.mask, me, my_node * P + tid % P)) {
    const int dn = tid / P, l = tid % P;
    st_release_sys_u64(at<uint64_t>(peer_inter(p, my_node * P + l), IL.fwd_ack) + (size_t)dn * P + my_local, epoch);
  }
  __syncthreads();
  if (!release_remote_sources<kMask>(p, at<uint64_t>(imine, IL.fwd_ack), at<uint64_t>(imine, IL.rdma_free), epoch,
                                     EP_SITE_FWD_ACK))
    return;
  if (tid == 0) {
    p.group.state->dispatch_done = 0;
    p.group.state->dispatch_epoch = epoch;
    if (last_round && num_recv > p.call.recv_capacity)
      record_fault(p.group.error, EP_FAULT_RECV_OVERFLOW, me, -1, 0, num_recv, p.call.recv_capacity);
  }
  NORMAL_PROF_END(g_inter_prof_dispatch, me, kInterProfDispatch);
}

// ---------------------------------------------------------------------------------------------------------------
// combine: stage, forward (partial sums of my node's copies of remote tokens, put back once per (token, node)),
// finalise my tokens.
// ---------------------------------------------------------------------------------------------------------------
// kSrc: the most sources a reduction may have here (P local copies, and N - 1 partials at the source), rounded up
// to 2, 4 or 8; each lane keeps 16 loads in flight up to that many (more go through rows::reduce_many).
// kMask: a masked rank's copies are left out of the sums (a masked forwarder's partial: every copy on its node), no
// partial goes to a masked source, and a masked rank is neither waited for nor acknowledged.
template <int kSrc, bool kMask>
__global__ void __launch_bounds__(kCombThreads, 1) inter_combine_kernel(ep_internode_launch_t p) {
  constexpr int kUnroll = 16 / kSrc;
  __shared__ const char* s_src[kCombWarps][kMaxSources];
  __shared__ const float* s_wsrc[kCombWarps][kMaxSources];
  __shared__ int s_offset[kMaxRanksShared + 1];  // the round's rows from source s start at s_offset[s] among them,
  __shared__ int s_out[kMaxRanksShared];         // at s_out[s] in y
  __shared__ int s_base[kMaxLocal];              // my rows start at s_base[i] among local rank i's rows of the round
  const ep_normal_region_t& L = p.group.region;
  const ep_internode_region_t& IL = p.inter.region;
  const int R = p.group.num_ranks, me = p.group.rank, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int P = p.inter.ranks_per_node, N = p.inter.num_nodes, my_node = p.inter.node, my_local = p.inter.local_rank;
  const int K = p.call.num_topk, H = p.call.hidden, T = L.max_tokens, NC = IL.num_chunks;
  const size_t yr = L.y_row_bytes;
  const int k = p.round, CT = L.call_tokens;
  if (k > 0 && k >= *p.handle.num_rounds) return;  // the call takes fewer rounds
  // My tokens of the round: [first_token, end_token).
  const int first_token = k * T, end_token = min(p.call.num_tokens, first_token + T);
  const uint64_t epoch = p.group.state->combine_epoch + 1;
  char* mine = p.group.normal_base;
  char* imine = p.inter.inter_base;
  const int n16 = H * 2 / 16;
  const bool with_weights = p.call.y_weights != nullptr;
  const size_t part_bytes = ((size_t)H * 2 + (with_weights ? (size_t)K * 4 : 0) + 15) / 16 * 16;
  NORMAL_PROF_STAMP(g_inter_prof_combine, 0);

  // Readers of my y_stage (my node) are done with the last call, and so are the sources of my last partials.
  const int* table = p.handle.round_rows + (size_t)k * (2 * R + 1);  // visible after the waits' block barrier
  if (tid <= R) s_offset[tid] = table[tid];
  if (tid < R) s_out[tid] = table[R + 1 + tid];
  if (tid < P) s_base[tid] = p.handle.send_base[(size_t)k * P + tid];
  if (!wait_last_call_released<kMask>(p, at<uint64_t>(mine, L.combine_ack), at<uint64_t>(imine, IL.partial_free), epoch,
                                      EP_SITE_COMBINE_ACK, EP_SITE_PARTIAL_FREE))
    return;
  NORMAL_PROF_STAMP(g_inter_prof_combine, 1);

  // 1. Stage the rows of the round that another rank of my node reads. Row i from source s is read by s's forwarder
  //    on my node, local index s % P: when that is me (my own rows, and remote sources on my rail) it is read in
  //    place.
  rows::stage_y<kCombWarps>(p, epoch, s_offset[R], [&](int i) {
    const int s = source_of(s_offset, R, i);
    return s % P == my_local ? -1 : s_out[s] + i - s_offset[s];
  });
  __syncthreads();
  NORMAL_PROF_STAMP(g_inter_prof_combine, 2);

  bool ok = true, posted = false;
  // Pointer to the copy of local rank i's row `row` of the round (own rows in place: source s's), and its weights.
  auto local_copy = [&](int i, int row, int s, const float** w) -> const char* {
    if (i == my_local) {
      const int y = s_out[s] + row - s_offset[s];
      if (y >= p.call.recv_capacity) {  // past an overflowed dispatch's rows y ends (reported): read stale stage
        const char* stale = mine + L.y_stage + (size_t)row * yr;
        *w = reinterpret_cast<const float*>(stale + H * 2);
        return stale;
      }
      *w = with_weights ? p.call.y_weights + (size_t)y * K : nullptr;
      return (const char*)p.call.y + (size_t)y * H * 2;
    }
    const char* r = peer_normal(p, my_node * P + i) + L.y_stage + (size_t)row * yr;
    *w = reinterpret_cast<const float*>(r + H * 2);
    return r;
  };

  // 2. Forwarder: a block per (remote source node n, chunk c of its slots). Slot j's partial is the sum of my
  //    node's copies in ascending local rank, rounded once to bf16; one signal per chunk.
  const int* fwd_counts = p.handle.fwd_count + (size_t)k * 2 * N;  // this round's [N] counts, then [N] starts
  const int fwd_units = num_units(fwd_counts, my_node, N);
  for (int u = blockIdx.x; u < fwd_units; u += gridDim.x) {
    int dn, c;
    unit_of(fwd_counts, my_node, N, u, dn, c);
    const int n = node_at(my_node, dn, N), pe = n * P + my_local, back = node_dist(n, my_node, N);
    if constexpr (kMask) {  // one answer for the block: its warps meet at barriers below
      if (__syncthreads_or(tid == 0 && rank_masked(p.group.mask, me, pe))) continue;
    }
    const int first = c * kChunk, end = min(fwd_counts[n], first + kChunk);
    const int* rows_of_slot = p.handle.fwd_row + ((size_t)n * CT + fwd_counts[N + n]) * P;
    char* region = imine + IL.partial_recv + (size_t)back * T * yr;  // the partials for node n on pe (symmetric)
    uint64_t* signal = at<uint64_t>(imine, IL.partial_arrived) + (size_t)back * NC + c;
    char* mapped = p.inter.force_put ? nullptr : (char*)tp::peer_ptr(region, pe);
    // Mapped: write the partials straight into pe's region. Otherwise into my partial_stage, then one put.
    char* out_base = mapped ? mapped : imine + IL.partial_stage + (size_t)dn * T * yr;
    for (int j = first + warp; j < end && ok; j += kCombWarps) {
      int my_row = lane < P ? rows_of_slot[(size_t)j * P + lane] : -1;
      bool w = true;
      if (my_row >= 0 && lane != my_local) {
        const uint64_t* flag = at<uint64_t>(peer_normal(p, my_node * P + lane), L.y_staged) + my_row / kChunk;
        const WaitResult r = wait_flag_peer<kMask>(p, flag, epoch, my_node * P + lane, EP_SITE_COMBINE_STAGED);
        w = r != kWaitFault;
        if (kMask && r == kWaitMasked) my_row = -1;  // its copy is left out of the partial
      }
      ok = __all_sync(0xffffffffu, w);
      if (!ok) break;
      const unsigned have = __ballot_sync(0xffffffffu, my_row >= 0);
      if (my_row >= 0) {
        const int slot = __popc(have & ((1u << lane) - 1));
        const float* wp = nullptr;
        s_src[warp][slot] = local_copy(lane, my_row, pe, &wp);
        s_wsrc[warp][slot] = wp;
      }
      __syncwarp();
      char* part = out_base + (size_t)j * yr;
      rows::reduce_rows<kSrc, kUnroll>(s_src[warp], s_wsrc[warp], __popc(have), nullptr, nullptr,
                                       reinterpret_cast<int4*>(part),
                                       with_weights ? reinterpret_cast<float*>(part + H * 2) : nullptr, K, n16, lane);
      __syncwarp();
    }
    if (__syncthreads_or(!ok)) {
      ok = false;
      break;
    }
    if (mapped) {
      if (tid == 0) {
        __threadfence_system();  // every warp's stores to pe, ordered by the barrier, before the signal
        tp::signal_set(signal, epoch, pe);
      }
    } else if (warp == 0) {
      __threadfence_system();  // the NIC reads partial_stage
      __syncwarp();
      tp::put_signal_warp(region + (size_t)first * yr, out_base + (size_t)first * yr,
                          (size_t)(end - first - 1) * yr + part_bytes, signal, epoch, false, pe);
      posted = true;
    }
  }
  NORMAL_PROF_STAMP(g_inter_prof_combine, 3);

  // 3. Source: each of my tokens = biases + my node's copies (ascending local rank) + the remote partials
  //    (ascending node), in fp32, rounded once.
  const int gwarp = blockIdx.x * kCombWarps + warp, nwarps = gridDim.x * kCombWarps;
  for (int t = first_token + gwarp; t < end_token && ok; t += nwarps) {
    int ref = -1;  // lanes [0, P): row on local rank `lane`; lanes [kMaxLocal, kMaxLocal + N): slot on node
    bool w = true;
    if (lane < P) {
      const int pos = p.handle.send_pos[(size_t)t * R + my_node * P + lane];
      ref = pos >= 0 ? s_base[lane] + pos : -1;
      if (ref >= 0 && lane != my_local) {
        const WaitResult r =
            wait_flag_peer<kMask>(p, at<uint64_t>(peer_normal(p, my_node * P + lane), L.y_staged) + ref / kChunk, epoch,
                                  my_node * P + lane, EP_SITE_COMBINE_STAGED);
        w = r != kWaitFault;
        if (kMask && r == kWaitMasked) ref = -1;  // its copy is left out of the sum
      }
    } else if (lane >= kMaxLocal && lane - kMaxLocal < N && lane - kMaxLocal != my_node) {
      const int n = lane - kMaxLocal, dn = node_dist(my_node, n, N);
      ref = p.handle.send_slot[(size_t)t * N + n];
      if (ref >= 0) {
        const WaitResult r = wait_peer<kMask>(
            [&] {
              return tp::signal_load(at<uint64_t>(imine, IL.partial_arrived) + (size_t)dn * NC + ref / kChunk) >= epoch;
            },
            p.group.timeout_ns, p.group.error, p.group.mask, me, n * P + my_local, EP_SITE_COMBINE_PARTIAL);
        w = r != kWaitFault;
        if (kMask && r == kWaitMasked) ref = -1;  // a masked forwarder: none of node n's copies
      }
    }
    ok = __all_sync(0xffffffffu, w);
    if (!ok) break;
    const unsigned have = __ballot_sync(0xffffffffu, ref >= 0);
    if (ref >= 0) {
      const int slot = __popc(have & ((1u << lane) - 1));
      const float* wp = nullptr;
      const char* src;
      if (lane < kMaxLocal) {
        src = local_copy(lane, ref, me, &wp);
      } else {
        const int dn = node_dist(my_node, lane - kMaxLocal, N);
        src = imine + IL.partial_recv + ((size_t)dn * T + ref) * yr;
        wp = reinterpret_cast<const float*>(src + H * 2);
      }
      s_src[warp][slot] = src;
      s_wsrc[warp][slot] = wp;
    }
    __syncwarp();
    const char* b0 = (const char*)p.call.bias0;
    const char* b1 = (const char*)p.call.bias1;
    const int4* bias0 = b0 ? reinterpret_cast<const int4*>(b0 + (size_t)t * H * 2) : nullptr;
    const int4* bias1 = b1 ? reinterpret_cast<const int4*>(b1 + (size_t)t * H * 2) : nullptr;
    rows::reduce_rows<kSrc, kUnroll>(s_src[warp], s_wsrc[warp], __popc(have), bias0, bias1,
                                     reinterpret_cast<int4*>((char*)p.call.combined_x + (size_t)t * H * 2),
                                     p.call.combined_weights ? p.call.combined_weights + (size_t)t * K : nullptr, K,
                                     n16, lane);
    __syncwarp();
  }
  if (posted) tp::quiet();  // partial_stage is rewritten next call: our puts from it are complete
  if (__syncthreads_or(!ok)) return;
  NORMAL_PROF_DONE(g_inter_prof_combine, 4);

  // 4. Release my node's stages and, at each forwarder, my partial receive region.
  if (!arrive_last(&p.group.state->combine_done)) {
    NORMAL_PROF_END(g_inter_prof_combine, me, kInterProfCombine);
    return;
  }
  if (tid < P && !peer_masked<kMask>(p.group.mask, me, my_node * P + tid))
    st_release_sys_u64(at<uint64_t>(peer_normal(p, my_node * P + tid), L.combine_ack) + me, epoch);
  if (tid < N - 1) {
    const int n = node_at(my_node, tid, N);
    if (!peer_masked<kMask>(p.group.mask, me, n * P + my_local))
      tp::signal_set(at<uint64_t>(imine, IL.partial_free) + node_dist(n, my_node, N), epoch, n * P + my_local);
  }
  __syncthreads();
  if (tid == 0) {
    p.group.state->combine_done = 0;
    p.group.state->combine_epoch = epoch;
  }
  NORMAL_PROF_END(g_inter_prof_combine, me, kInterProfCombine);
}

}  // namespace
}  // namespace ep

// Each kernel comes in two forms: with the group's rank mask (kMask) and without, whose code is the path's before
// the mask existed: a group without the mask pays nothing for it.
extern "C" cudaError_t ep_launch_internode_prepare(const ep_internode_launch_t* p, cudaStream_t stream) {
  const size_t smem = sizeof(int) * (size_t)(p->call.num_experts / p->inter.num_nodes);
  auto kernel = p->group.mask ? ep::inter_prepare_kernel<true> : ep::inter_prepare_kernel<false>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<p->group.num_ranks, ep::kPrepThreads, smem, stream>>>(*p);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_internode_dispatch(const ep_internode_launch_t* p, cudaStream_t stream) {
  auto kernel = p->group.mask ? ep::inter_dispatch_kernel<true> : ep::inter_dispatch_kernel<false>;
  kernel<<<p->call.num_blocks, ep::kDispThreads, 0, stream>>>(*p);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_internode_combine(const ep_internode_launch_t* p, cudaStream_t stream) {
  const int max_sources = p->inter.ranks_per_node + p->inter.num_nodes - 1;
  const bool mask = p->group.mask != nullptr;
  void (*kernel)(ep_internode_launch_t) = nullptr;
  if (max_sources <= 2) kernel = mask ? ep::inter_combine_kernel<2, true> : ep::inter_combine_kernel<2, false>;
  else if (max_sources <= 4) kernel = mask ? ep::inter_combine_kernel<4, true> : ep::inter_combine_kernel<4, false>;
  else kernel = mask ? ep::inter_combine_kernel<8, true> : ep::inter_combine_kernel<8, false>;
  kernel<<<p->call.num_blocks, ep::kCombThreads, 0, stream>>>(*p);
  return cudaGetLastError();
}
