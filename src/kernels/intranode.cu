// intranode.cu: the normal (high-throughput) path inside one NVLink domain: prepare, dispatch, combine.
// The protocol and the symmetric region are drawn in normal_region.h. Dispatch moves data by pulls: a receiver
// reads the rows it needs straight from its sources' staged copies over NVLink, so each row crosses the link once
// and lands directly in the caller's output, in a fixed order. Combine moves it by pushes: each expert output is
// stored once over NVLink into its token's source rank, which sums the arrived copies from local memory.
#include "kernels/launch.h"
#include <cuda_bf16.h>

#include "kernels/common.cuh"
#include "kernels/normal_rows.cuh"
#include "kernels/profile.cuh"
#include "kernels/tuning.h"

namespace ep {

constexpr int kMaxNvlRanks = EP_MAX_NVLINK_RANKS;  // ranks of one NVLink domain this path serves
constexpr int kPrepareThreads = 1024;
// Dispatch: 24 warps, 8 loads in flight per lane. 2 x H200, 4096 BF16 tokens of hidden 7168 at 8 SMs: 664 us;
// 512 threads with 16 in flight, 969 us.
constexpr int kDispatchThreads = 768;
constexpr int kDispatchWarps = kDispatchThreads / 32;
constexpr int kCombineThreads = 512;   // 16 warps, 16 loads in flight per lane, more registers per thread
constexpr int kCombinePushWarps = EP_COMBINE_PUSH_WARPS;  // warps that store expert outputs to their token's source
constexpr int kCombineReduceWarps = kCombineThreads / 32 - kCombinePushWarps;  // warps that sum arrived rows

constexpr int kChunk = EP_STAGE_CHUNK_ROWS;

using rows::add_bf16x8;
using rows::at;
using rows::tag;
using rows::untag;

__device__ __forceinline__ char* peer_normal(const ep_intranode_launch_t& p, int rank) {
  return (char*)p.group.peer_workspace[rank] + p.group.normal_offset;
}

#if EP_NORMAL_PROFILE  // phase stamps of dispatch and combine (kernels/profile.cuh)
__device__ prof::Record g_intra_prof_dispatch, g_intra_prof_combine;
__device__ const char* const kIntraProfDispatch[] = {"intra-dispatch", "acks", "stage", "pull", "-", "-"};
__device__ const char* const kIntraProfCombine[] = {"intra-combine", "acks", "push", "reduce", "done", "-"};
#endif

// ---------------------------------------------------------------------------------------------------------------
// prepare: block d compacts my tokens for rank d (destination role) and reads rank d's list for me (source role),
// once per round (normal_region.h); round 0 also tells every block how many rounds the call takes.
// kMask (the group's rank mask): a masked rank d is dropped, as if no token's top-k named its experts and it had no
// tokens: block d lists nothing for it, publishes nothing to it, waits for nothing from it and acknowledges nothing
// to it; the last block zeroes its row and column of the counts. A wait on d that runs out of time masks d (and so
// drops it, the rows listed for it in this round included). Block d alone decides whether d is dropped (it is
// dropped from the round in which block d finds it masked, and then from the whole call); a rank masked by another
// block after block d took all of its counts and lists stays in the counts, as a rank masked after the prepare.
// ---------------------------------------------------------------------------------------------------------------
template <bool kMask>
__global__ void __launch_bounds__(kPrepareThreads) prepare_kernel(ep_intranode_launch_t p) {
  extern __shared__ int s_expert[];  // [E_loc]: my tokens per local expert of rank d; kMask: then [E_loc] s_from
  __shared__ int s_warp_count[kPrepareThreads / 32];
  __shared__ int s_failed, s_rounds;
  __shared__ int s_drop;  // kMask: rank d is masked in this round (one value for the block)
  const int d = blockIdx.x, R = p.group.num_ranks, me = p.group.rank, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int E = p.call.num_experts, E_loc = E / R;
  const ep_normal_region_t& L = p.group.region;
  const int C = L.max_tokens;  // tokens per round
  const uint64_t first_epoch = p.group.state->prepare_epoch + 1;
  char* mine = p.group.normal_base;
  char* peer = peer_normal(p, d);
  int* send_list = at<int>(mine, L.send_list) + (size_t)d * C;
  int* round_rows = p.handle.round_rows;
  // kMask: rank d's tokens per local expert of mine, summed over the rounds, added to expert_sum once the block
  // knows that d is not dropped (so that the expert counts never count rows that the offsets leave out).
  int* s_from = s_expert + E_loc;
  if (tid == 0) s_rounds = 1;
  for (int e = tid; kMask && e < E_loc; e += blockDim.x) s_from[e] = 0;
  __syncthreads();

  for (int k = 0; k < s_rounds; ++k) {
    const uint64_t epoch = first_epoch + k;
    const int first = k * C, n = max(0, min(C, p.call.num_tokens - first));  // my tokens [first, first + n)
    // Every rank must have finished reading what I published last time: this block rewrites the list for rank d
    // and my counts entry d in every rank's matrix, which a slow rank may not have read yet.
    if (tid == 0) s_failed = 0;
    // Rank-mask form: the caller counted my tokens per expert; they count once, in round 0.
    const int* given_counts = k == 0 ? p.call.num_tokens_per_expert : nullptr;
    for (int e = tid; e < E_loc; e += blockDim.x) s_expert[e] = given_counts ? given_counts[d * E_loc + e] : 0;
    __syncthreads();
    if (tid < R) {
      const uint64_t* ack = at<uint64_t>(mine, L.prepare_ack) + tid;
      if (wait_peer<kMask>([&] { return ld_acquire_sys_u64(ack) >= epoch - 1; }, p.group.timeout_ns, p.group.error,
                           p.group.mask, me, tid, EP_SITE_PREPARE_ACK) == kWaitFault)
        s_failed = 1;
    }
    __syncthreads();
    if (s_failed) return;
    if constexpr (kMask) {
      if (tid == 0) s_drop = rank_masked(p.group.mask, me, d);
      __syncthreads();
    }

    // Destination role: my tokens of this round for rank d, in token order (block-wide scan per 1024 tokens).
    int count = 0;
    for (int base = 0; base < n; base += blockDim.x) {
      const int t = base + tid;
      bool goes = false;
      if (t < n && p.call.is_token_in_rank) {
        goes = p.call.is_token_in_rank[(size_t)(first + t) * R + d] != 0;
      } else if (t < n) {
        const int64_t* row = p.call.topk_idx + (size_t)(first + t) * p.call.num_topk;
        for (int j = 0; j < p.call.num_topk; ++j) {
          const int64_t e = row[j];
          if (e < -1 || e >= E) {
            if (d == 0) record_fault(p.group.error, EP_FAULT_BAD_EXPERT, me, -1, 0, first + t, e);
            continue;
          }
          if (e < 0 || e / E_loc != d) continue;
          bool repeat = false;
          for (int i = 0; i < j; ++i) repeat |= row[i] == e;
          if (!repeat) atomicAdd(&s_expert[e - (int64_t)d * E_loc], 1);
          goes = true;
        }
      }
      if (kMask && s_drop) goes = false;  // its experts are dropped (the loop above still checks the ids)
      const unsigned ballot = __ballot_sync(0xffffffffu, goes);
      if (lane == 0) s_warp_count[warp] = __popc(ballot);
      __syncthreads();
      int before = 0, total = 0;
      for (int w = 0; w < kPrepareThreads / 32; ++w) {
        before += w < warp ? s_warp_count[w] : 0;
        total += s_warp_count[w];
      }
      if (t < n) {
        const int pos = goes ? count + before + __popc(ballot & ((1u << lane) - 1)) : -1;
        if (goes) send_list[pos] = t;
        p.handle.send_pos[(size_t)(first + t) * R + d] = pos;
      }
      count += total;
      __syncthreads();
    }

    // Publish, after the list: my count for d into every rank's matrix (and all my tokens, from which every rank
    // learns the rounds), my per-expert counts to rank d.
    if (tid < R || tid < E_loc) __threadfence_system();
    for (int r = tid; r < R; r += blockDim.x) {
      if (peer_masked<kMask>(p.group.mask, me, r)) continue;
      uint64_t* row = at<uint64_t>(peer_normal(p, r), L.count_matrix) + (size_t)me * (R + 1);
      st_release_sys_u64(row + d, tag(epoch, count));
      if (d == 0) st_release_sys_u64(row + R, tag(epoch, p.call.num_tokens));
    }
    for (int e = tid; e < E_loc && !(kMask && s_drop); e += blockDim.x)
      st_release_sys_u64(at<uint64_t>(peer, L.expert_counts) + (size_t)me * E_loc + e, tag(epoch, s_expert[e]));

    // Round 0: the call takes as many rounds as the rank with the most tokens needs (at least one). A region that
    // holds every token of any call (sized from the hints) always takes one, without this wait. With the mask,
    // block 0 alone decides and the others take its answer (state->call_rounds, reset by the last block): blocks
    // that each waited could disagree, one taking a rank's count, one finding the rank masked (by another block's
    // timeout) before it looked, and they would then run different numbers of rounds.
    if (k == 0 && L.max_rounds > 1 && (!kMask || d == 0) && tid < R) {
      const uint64_t* their_tokens = at<uint64_t>(mine, L.count_matrix) + (size_t)tid * (R + 1) + R;
      uint64_t v = 0;
      const WaitResult w =
          wait_peer<kMask>([&] { return ((v = ld_acquire_sys_u64(their_tokens)) >> 32) >= epoch; }, p.group.timeout_ns,
                           p.group.error, p.group.mask, me, tid, EP_SITE_PREPARE_COUNTS);
      if (w == kWaitFault) s_failed = 1;
      else if (!kMask || w == kWaitReady) atomicMax(&s_rounds, (untag(v) + C - 1) / C);  // masked: no tokens
    }
    if (kMask && k == 0 && L.max_rounds > 1 && warp == 0) {  // tid < R <= 8: warp 0 holds the waiters
      __syncwarp();
      volatile unsigned int* decided = &p.group.state->call_rounds;
      if (d == 0 && lane == 0 && !s_failed) {
        __threadfence();
        *decided = (unsigned int)s_rounds;
      } else if (d != 0 && lane == 0) {
        uint32_t spins = 0;
        unsigned int r = 0;
        while ((r = *decided) == 0) {  // block 0's waits are bounded; if it failed, the group has a fatal fault
          if ((++spins & 1023u) == 0 && has_fault(p.group.error, me)) {
            s_failed = 1;
            break;
          }
        }
        if (r != 0) s_rounds = (int)r;
      }
    }

    // Source role: rank d's counts row (summed over the rounds), its list for me, its per-expert counts for me.
    const uint64_t* their_row = at<uint64_t>(mine, L.count_matrix) + (size_t)d * (R + 1);
    // With the mask, a masked d sends nothing: nothing is waited for or taken from it (a dead d publishes nothing
    // of this call, so no wait on it is ready).
    for (int i = tid; i <= R && !(kMask && s_drop); i += blockDim.x) {
      uint64_t v = 0;
      const WaitResult w =
          wait_peer<kMask>([&] { return ((v = ld_acquire_sys_u64(their_row + i)) >> 32) >= epoch; }, p.group.timeout_ns,
                           p.group.error, p.group.mask, me, d, EP_SITE_PREPARE_COUNTS);
      const bool ok = w == kWaitReady;
      if (w == kWaitFault) s_failed = 1;
      else if (kMask && !ok) s_drop = 1;
      else if (i < R) p.handle.matrix[d * R + i] = (k > 0 ? p.handle.matrix[d * R + i] : 0) + untag(v);
      else p.handle.num_tokens_of[d] = untag(v);
      if (ok && i == me) round_rows[(size_t)k * (2 * R + 1) + R + 1 + d] = untag(v);  // rows from d this round
    }
    for (int e = tid; e < E_loc && !(kMask && s_drop); e += blockDim.x) {
      uint64_t v = 0;
      const uint64_t* slot = at<uint64_t>(mine, L.expert_counts) + (size_t)d * E_loc + e;
      const WaitResult w =
          wait_peer<kMask>([&] { return ((v = ld_acquire_sys_u64(slot)) >> 32) >= epoch; }, p.group.timeout_ns,
                           p.group.error, p.group.mask, me, d, EP_SITE_PREPARE_COUNTS);
      if (w == kWaitFault) s_failed = 1;
      else if (kMask && w == kWaitMasked) s_drop = 1;
      else if (kMask) s_from[e] += untag(v);
      else atomicAdd(&p.group.expert_sum[e], untag(v));
    }
    __syncthreads();
    if (s_failed) return;
    if (kMask && s_drop) {  // d is masked: no rows from it this round, and none of my tokens go to it
      for (int t = tid; t < n; t += blockDim.x) p.handle.send_pos[(size_t)(first + t) * R + d] = -1;
      if (tid == 0) {
        round_rows[(size_t)k * (2 * R + 1) + R + 1 + d] = 0;
        p.handle.recv_taken[d] = k > 0 ? p.handle.recv_taken[d] : 0;
      }
      continue;  // every thread: s_drop is the block's
    }
    const int from_d = round_rows[(size_t)k * (2 * R + 1) + R + 1 + d];
    const int taken = k > 0 ? p.handle.recv_taken[d] : 0;  // rows from d of earlier rounds
    const int* their_list = at<int>(peer, L.send_list) + (size_t)me * C;
    int* my_copy = p.handle.recv_src + (size_t)d * L.call_tokens + taken;
    const bool aligned = ((C | L.call_tokens | taken) & 3) == 0;
    for (int j = tid * 4; j < from_d; j += blockDim.x * 4) {  // four per load: one NVLink round trip per 16 KiB
      if (j + 3 < from_d && aligned) {
        *reinterpret_cast<int4*>(my_copy + j) = ld_nc_na(reinterpret_cast<const int4*>(their_list + j));
      } else {
        for (int u = j; u < min(from_d, j + 4); ++u) my_copy[u] = ld_relaxed_sys(their_list + u);
      }
    }
    __syncthreads();
    if (tid == 0) {
      p.handle.recv_taken[d] = taken + from_d;
      st_release_sys_u64(at<uint64_t>(peer, L.prepare_ack) + me, epoch);
    }
  }

  if constexpr (kMask) {  // s_drop: d was dropped (in the last round, so in every round since the first drop)
    for (int e = tid; !s_drop && e < E_loc; e += blockDim.x)
      if (s_from[e] != 0) atomicAdd(&p.group.expert_sum[e], s_from[e]);
    if (tid == 0 && s_drop) p.handle.recv_taken[d] = -1;  // the block's verdict, for the last block
  }

  // The last block turns the counts into offsets and totals, and the per-round counts into the round table.
  if (!arrive_last(&p.group.state->prepare_done)) return;
  const int rounds = s_rounds;
  if constexpr (kMask) {  // a dropped rank m sends and receives nothing: its row and column of the counts are 0
    if (tid < R && p.handle.recv_taken[tid] < 0) {
      for (int s = 0; s < R; ++s) p.handle.matrix[s * R + tid] = p.handle.matrix[tid * R + s] = 0;
      p.handle.num_tokens_of[tid] = 0;
      for (int k = 0; k < rounds; ++k) round_rows[(size_t)k * (2 * R + 1) + R + 1 + tid] = 0;
    }
    __syncthreads();
  }
  if (tid == 0) {
    int offset = 0;
    for (int s = 0; s < R; ++s) {
      p.handle.recv_offset[s] = offset;
      if (rounds == 1) round_rows[s] = round_rows[R + 1 + s] = offset;  // one round: the table is the offsets
      offset += p.handle.matrix[s * R + me];
    }
    p.handle.recv_offset[R] = offset;
    if (rounds == 1) round_rows[R] = offset;
    *p.handle.num_recv = offset;
    *p.handle.num_rounds = rounds;
    if (p.call.out_num_recv) *p.call.out_num_recv = offset;
  }
  if (rounds > 1) rows::build_round_table(round_rows, p.handle.recv_offset, R, rounds);
  for (int e = tid; e < E_loc; e += blockDim.x) {
    const int a = p.call.expert_alignment;
    const int c = (p.group.expert_sum[e] + a - 1) / a * a;
    p.handle.expert_counts[e] = c;
    if (p.call.out_expert_counts) p.call.out_expert_counts[e] = c;
    p.group.expert_sum[e] = 0;
  }
  __syncthreads();
  if (tid == 0) {
    p.group.state->prepare_done = 0;
    if (kMask) p.group.state->call_rounds = 0;
    p.group.state->prepare_epoch = first_epoch + rounds - 1;
  }
}

// Every rank must have released the staging buffer we are about to overwrite (previous call's epoch); a masked
// rank reads nothing of it. With kMask and `skip`, *skip gets the ranks masked by then, a bit each: one snapshot
// for the whole block, so that its warps agree on whom they skip.
template <bool kMask>
__device__ __forceinline__ bool wait_released(const ep_intranode_launch_t& p, const uint64_t* acks, uint64_t epoch,
                                              int site, unsigned* skip = nullptr) {
  __shared__ int s_failed;
  __shared__ unsigned s_skip;
  if (threadIdx.x == 0) s_failed = 0;
  if (kMask && threadIdx.x == 0) s_skip = 0;
  __syncthreads();
  if (threadIdx.x < p.group.num_ranks) {
    const int r = threadIdx.x;
    const WaitResult w = wait_peer<kMask>([&] { return ld_acquire_sys_u64(acks + r) >= epoch - 1; }, p.group.timeout_ns,
                                          p.group.error, p.group.mask, p.group.rank, r, site);
    if (w == kWaitFault) s_failed = 1;
    else if (kMask && w == kWaitMasked) atomicOr(&s_skip, 1u << r);
  }
  __syncthreads();
  if (kMask && skip) *skip = s_skip;
  return !s_failed;
}

// ---------------------------------------------------------------------------------------------------------------
// dispatch: stage my rows, then pull the rows routed to me from every source's stage, in output order.
// kMask: a masked source's rows (there are none unless it was masked after the prepare, or by a wait of this call)
// are left empty, as past the received count (top-k -1, weights 0, source -1; the row itself is not written).
// ---------------------------------------------------------------------------------------------------------------
template <bool kMask>
__global__ void __launch_bounds__(kDispatchThreads, 1) dispatch_kernel(ep_intranode_launch_t p) {
  const int R = p.group.num_ranks, me = p.group.rank, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const ep_normal_region_t& L = p.group.region;
  const int C = L.max_tokens;
  const int* num_rounds = p.handle.num_rounds;  // read after the first round: a call mostly has one
  const uint64_t first_epoch = p.group.state->dispatch_epoch + 1;
  char* mine = p.group.normal_base;
  const rows::XRow row(p.call.hidden, p.call.is_fp8, p.call.num_topk);
  __shared__ int s_offset[kMaxNvlRanks + 1];  // the round's rows from source s start at s_offset[s] among them,
  __shared__ int s_base[kMaxNvlRanks];        // at s_base[s] in my output,
  __shared__ int s_taken[kMaxNvlRanks];       // at s_taken[s] in my copy of s's lists (recv_src)
  __shared__ int s_failed;
  NORMAL_PROF_STAMP(g_intra_prof_dispatch, 0);

  int k = 0;
  do {
    const uint64_t epoch = first_epoch + k;
    const int first = k * C;
    // Stage: chunks of my tokens of the round, row | scales | global expert ids | weights; one flag per chunk.
    if (!wait_released<kMask>(p, at<uint64_t>(mine, L.dispatch_ack), epoch, EP_SITE_DISPATCH_ACK)) return;
    NORMAL_PROF_STAMP(g_intra_prof_dispatch, 1);
    rows::stage_x<kDispatchWarps>(p, row, epoch, first, max(0, min(C, p.call.num_tokens - first)));
    NORMAL_PROF_STAMP(g_intra_prof_dispatch, 2);

    // Pull: this block's share of the round's rows. Round row i comes from source s, as its j-th row for me.
    const int* table = p.handle.round_rows + (size_t)k * (2 * R + 1);
    if (tid <= R) s_offset[tid] = table[tid];
    if (tid < R) {
      s_base[tid] = table[R + 1 + tid];
      s_taken[tid] = s_base[tid] - p.handle.recv_offset[tid];
    }
    if (tid == 0) s_failed = 0;
    __syncthreads();
    const int num_rows = s_offset[R];
    const int per_block = (num_rows + gridDim.x - 1) / gridDim.x;
    const int begin = blockIdx.x * per_block, end = min(num_rows, begin + per_block);
    int ready_src = -1, ready_chunk = -1;  // the last chunk this warp saw staged
    for (int i = begin + warp; i < end; i += kDispatchWarps) {
      int s = 0;
      while (s + 1 < R && s_offset[s + 1] <= i) ++s;
      const int j = i - s_offset[s];
      const int t = p.handle.recv_src[(size_t)s * L.call_tokens + s_taken[s] + j];  // within the round
      char* src = peer_normal(p, s);
      if (s != ready_src || t / kChunk != ready_chunk) {
        int w = kWaitReady;
        if (lane == 0) {
          const uint64_t* flag = at<uint64_t>(src, L.x_staged) + t / kChunk;
          w = wait_peer<kMask>([&] { return ld_acquire_sys_u64(flag) >= epoch; }, p.group.timeout_ns, p.group.error,
                               p.group.mask, me, s, EP_SITE_DISPATCH_STAGED);
        }
        w = __shfl_sync(0xffffffffu, w, 0);
        if (w == kWaitFault) {
          s_failed = 1;
          break;
        }
        if (kMask && w == kWaitMasked) {  // asked again for its next row: a masked source answers at once
          if (s_base[s] + j < p.call.recv_capacity) rows::empty_x_row(p, s_base[s] + j, lane);
          continue;
        }
        ready_src = s;
        ready_chunk = t / kChunk;
      }
      const int out = s_base[s] + j;
      if (out < p.call.recv_capacity)
        rows::pull_x_row(p, row, src + L.x_stage + (size_t)t * L.x_row_bytes, out, t, lane, first);
    }
    __syncthreads();
    if (s_failed) return;
    NORMAL_PROF_DONE(g_intra_prof_dispatch, 3);

    // Once every block has read what it needs, release every source's stage. The counter is reset before the
    // acks (the barrier and the releasing stores order it): a block that sees them may arrive at the next round's
    // counter at once.
    if (arrive_last(&p.group.state->dispatch_done)) {
      if (tid == 0) p.group.state->dispatch_done = 0;
      __syncthreads();
      if (tid < R && !peer_masked<kMask>(p.group.mask, me, tid))
        st_release_sys_u64(at<uint64_t>(peer_normal(p, tid), L.dispatch_ack) + me, epoch);
      if (tid == 0 && k + 1 == *num_rounds) {
        p.group.state->dispatch_epoch = epoch;
        // Reported only now: a fault recorded earlier would make this rank's remaining waits give up, and the
        // protocol (acks, epoch) would fall out of step with its peers. The rows past the capacity were skipped.
        const int num_recv = p.handle.recv_offset[R];
        if (num_recv > p.call.recv_capacity)
          record_fault(p.group.error, EP_FAULT_RECV_OVERFLOW, me, -1, 0, num_recv, p.call.recv_capacity);
      }
    }
  } while (++k < *num_rounds);

  // Graph-safe tail: rows past the received count say "nothing here".
  rows::graph_safe_tail(p, p.handle.recv_offset[R]);
  NORMAL_PROF_END(g_intra_prof_dispatch, me, kIntraProfDispatch);
}

// ---------------------------------------------------------------------------------------------------------------
// combine: push my expert outputs to each token's source rank, which sums its copies in rank order.
// ---------------------------------------------------------------------------------------------------------------

// Push one chunk of my expert outputs for source rank s: rows [first, first + n) of s's list for me, from my
// received order (`recv_row`), into s's receive area at my slot rows; then raise the chunk's flag on s. Run by the
// kCombinePushWarps push warps of a block, which sync on their own named barrier. Warp stores, not the bulk-copy
// engine through shared memory: 4 x H200, EP4, 4096 tokens of hidden 7168, combine 608 / 592 us at 24 / 16 SMs
// against 834 / 885 us with cp.async.bulk through 4 x 8 KB stages.
__device__ __forceinline__ void push_chunk(const ep_intranode_launch_t& p, int s, int chunk, int recv_row, int n,
                                           uint64_t epoch, int push_warp, int lane) {
  const ep_normal_region_t& L = p.group.region;
  const int H = p.call.hidden, K = p.call.num_topk;
  const size_t first_row = (size_t)p.group.rank * L.max_tokens + chunk * kChunk;  // my slot rows at s
  char* dst_base = peer_normal(p, s) + L.y_stage + first_row * L.y_row_bytes;
  n = max(0, min(n, p.call.recv_capacity - recv_row));  // past an overflowed dispatch's rows y ends (reported)
  for (int j = push_warp; j < n; j += kCombinePushWarps)
    warp_copy<true, 16>(dst_base + (size_t)j * L.y_row_bytes, (const char*)p.call.y + (size_t)(recv_row + j) * H * 2, 0,
                        H * 2 / 16, lane);
  if (p.call.y_weights && lane < K)
    for (int j = push_warp; j < n; j += kCombinePushWarps)
      reinterpret_cast<float*>(dst_base + (size_t)j * L.y_row_bytes + H * 2)[lane] =
          p.call.y_weights[(size_t)(recv_row + j) * K + lane];
  named_barrier(1, kCombinePushWarps * 32);
  if (push_warp == 0 && lane == 0) {
    __threadfence_system();
    st_release_sys_u64(at<uint64_t>(peer_normal(p, s), L.y_staged) + (size_t)p.group.rank * L.y_chunks_per_rank + chunk,
                       epoch);
  }
}

// kMaxRanks (2, 4 or 8) bounds the group size at compile time so the per-source arrays stay in registers; each
// lane keeps 16 loads in flight (kUnroll chunks of 8 channels from up to kMaxRanks sources).
//
// Push warps: every block takes chunks of (destination, 32 rows) in turn, destinations interleaved so that every
// peer receives at all times, and stores them over NVLink into the destination's receive area (y_stage row
// sender * T + position), raising one flag per chunk. Reduce warps: every block takes chunks of 32 of my tokens
// in turn and sums each token's copies from local memory (my own copy in place in y) as their chunks arrive.
// Both roles run at once, so the reduction hides under the NVLink transfer.
//
// kMask: nothing is pushed to a masked rank, and a masked rank's copies are left out of the sums (as if the token's
// top-k did not name its experts); a wait on a rank that runs out of time masks it. kRounds: the group's regions may
// take a call in several rounds (region.max_rounds > 1); without it the call is one round and the loop goes.
template <int kMaxRanks, bool kMask, bool kRounds>
__global__ void __launch_bounds__(kCombineThreads, 1) combine_kernel(ep_intranode_launch_t p) {
  constexpr int kUnroll = 16 / kMaxRanks;
  const int R = p.group.num_ranks, me = p.group.rank, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int K = p.call.num_topk, H = p.call.hidden;
  const ep_normal_region_t& L = p.group.region;
  const int C = L.max_tokens;
  const int* num_rounds = p.handle.num_rounds;  // read after the first round: a call mostly has one
  const uint64_t first_epoch = p.group.state->combine_epoch + 1;
  char* mine = p.group.normal_base;
  const int n16 = H * 2 / 16;
  __shared__ int s_offset[kMaxNvlRanks + 1];  // the round's rows from source s start at s_offset[s] among them
  __shared__ int s_base[kMaxNvlRanks];        // and at s_base[s] in y
  __shared__ int s_failed;
  NORMAL_PROF_STAMP(g_intra_prof_combine, 0);

  int k = 0;
  do {
    const uint64_t epoch = first_epoch + k;
    const int first = k * C, num_tokens = max(0, min(C, p.call.num_tokens - first));  // my tokens of the round
    // Every destination has finished reading what I pushed into it last time.
    unsigned skip = 0;  // kMask: the ranks this block pushes nothing to in this round
    if (!wait_released<kMask>(p, at<uint64_t>(mine, L.combine_ack), epoch, EP_SITE_COMBINE_ACK, &skip)) return;
    const int* table = p.handle.round_rows + (size_t)k * (2 * R + 1);
    if (tid <= R) s_offset[tid] = table[tid];
    if (tid < R) s_base[tid] = table[R + 1 + tid];
    if (tid == 0) s_failed = 0;
    __syncthreads();
    NORMAL_PROF_STAMP(g_intra_prof_combine, 1);

    if (warp < kCombinePushWarps) {
      int max_chunks = 0;
      for (int s = 0; s < R; ++s) max_chunks = max(max_chunks, (s_offset[s + 1] - s_offset[s] + kChunk - 1) / kChunk);
      const int num_items = (R - 1) * max_chunks;
      for (int w = blockIdx.x; w < num_items; w += gridDim.x) {
        const int s = (me + 1 + w % (R - 1)) % R, chunk = w / (R - 1);
        const int count = s_offset[s + 1] - s_offset[s];
        if (chunk * kChunk >= count) continue;  // the same for every push warp: no barrier is skipped by some
        if (kMask && (skip >> s & 1u)) continue;  // likewise: `skip` is the block's
        push_chunk(p, s, chunk, s_base[s] + chunk * kChunk, min(kChunk, count - chunk * kChunk), epoch, warp, lane);
      }
      NORMAL_PROF_STAMP_WARPS(g_intra_prof_combine, 2);
    } else {
      const int reduce_warp = warp - kCombinePushWarps;
      const int num_chunks = (num_tokens + kChunk - 1) / kChunk;
      for (int c = blockIdx.x; c < num_chunks && !s_failed; c += gridDim.x) {
        const int end = first + min(num_tokens, (c + 1) * kChunk);
        for (int t = first + c * kChunk + reduce_warp; t < end; t += kCombineReduceWarps) {
          int pos = -1;  // t's row in the round's list for rank `lane`
          if (lane < R) pos = p.handle.send_pos[(size_t)t * R + lane];
          bool ok = true;
          if (pos >= 0 && lane != me) {
            const uint64_t* flag = at<uint64_t>(mine, L.y_staged) + (size_t)lane * L.y_chunks_per_rank + pos / kChunk;
            const WaitResult w = wait_peer<kMask>([&] { return ld_acquire_sys_u64(flag) >= epoch; }, p.group.timeout_ns,
                                                  p.group.error, p.group.mask, me, lane, EP_SITE_COMBINE_STAGED);
            ok = w != kWaitFault;
            if (kMask && w == kWaitMasked) pos = -1;  // its copy is left out of the sum
          }
          if (!__all_sync(0xffffffffu, ok)) {
            s_failed = 1;
            break;
          }
          // One source per rank (NULL where the token did not go); summing r = 0, 1, ... keeps the rank order.
          const char* src[kMaxRanks];
          const float* wsrc[kMaxRanks];
#pragma unroll
          for (int r = 0; r < kMaxRanks; ++r) {
            const int pos_r = __shfl_sync(0xffffffffu, pos, r);
            src[r] = nullptr;
            wsrc[r] = nullptr;
            if (r < R && pos_r >= 0) {
              if (r == me) {
                const size_t row = (size_t)s_base[me] + pos_r;
                if (row >= (size_t)p.call.recv_capacity) continue;  // see push_chunk
                src[r] = (const char*)p.call.y + row * H * 2;
                if (p.call.y_weights) wsrc[r] = p.call.y_weights + row * K;
              } else {
                src[r] = mine + L.y_stage + ((size_t)r * C + pos_r) * L.y_row_bytes;
                wsrc[r] = reinterpret_cast<const float*>(src[r] + H * 2);
              }
            }
          }
          const int4* bias0 = reinterpret_cast<const int4*>((const char*)p.call.bias0 + (size_t)t * H * 2);
          const int4* bias1 = reinterpret_cast<const int4*>((const char*)p.call.bias1 + (size_t)t * H * 2);
          int4* out = reinterpret_cast<int4*>((char*)p.call.combined_x + (size_t)t * H * 2);
          for (int c0 = lane; c0 < n16; c0 += 32 * kUnroll) {
            int4 v[kUnroll][kMaxRanks];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
#pragma unroll
              for (int r = 0; r < kMaxRanks; ++r)
                if (src[r] && c0 + u * 32 < n16)
                  v[u][r] = ld_nc_na(reinterpret_cast<const int4*>(src[r]) + c0 + u * 32);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
              const int ch = c0 + u * 32;
              if (ch >= n16) break;
              float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
              if (p.call.bias0) add_bf16x8(acc, bias0[ch]);
              if (p.call.bias1) add_bf16x8(acc, bias1[ch]);
#pragma unroll
              for (int r = 0; r < kMaxRanks; ++r)
                if (src[r]) add_bf16x8(acc, v[u][r]);
              out[ch] = rows::pack_bf16x8(acc);
            }
          }
          if (p.call.combined_weights && lane < K) {
            float w = 0.0f;
#pragma unroll
            for (int r = 0; r < kMaxRanks; ++r)
              if (wsrc[r]) w += ld_relaxed_sys_f32(wsrc[r] + lane);
            p.call.combined_weights[(size_t)t * K + lane] = w;
          }
        }
      }
      NORMAL_PROF_STAMP_WARPS(g_intra_prof_combine, 3);
    }
    __syncthreads();
    if (s_failed) return;
    NORMAL_PROF_DONE(g_intra_prof_combine, 4);

    // Once every block has read its tokens' rows, every peer may push into my receive area again (the counter is
    // reset first, as in dispatch).
    if (arrive_last(&p.group.state->combine_done)) {
      if (tid == 0) p.group.state->combine_done = 0;
      __syncthreads();
      if (tid < R && !peer_masked<kMask>(p.group.mask, me, tid))
        st_release_sys_u64(at<uint64_t>(peer_normal(p, tid), L.combine_ack) + me, epoch);
      if (tid == 0 && (!kRounds || k + 1 == *num_rounds)) p.group.state->combine_epoch = epoch;
    }
  } while (kRounds && ++k < *num_rounds);
  NORMAL_PROF_END(g_intra_prof_combine, me, kIntraProfCombine);
}

}  // namespace ep

// Each kernel comes in two forms: with the group's rank mask (kMask) and without, whose code is the path's before
// the mask existed: a group without the mask pays nothing for it.
extern "C" cudaError_t ep_launch_intranode_prepare(const ep_intranode_launch_t* p, cudaStream_t stream) {
  const size_t smem = sizeof(int) * (size_t)(p->call.num_experts / p->group.num_ranks) * (p->group.mask ? 2 : 1);
  auto kernel = p->group.mask ? ep::prepare_kernel<true> : ep::prepare_kernel<false>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<p->group.num_ranks, ep::kPrepareThreads, smem, stream>>>(*p);
  return cudaGetLastError();
}

namespace ep {
// A handle's counts in DeepEP's prefix form: thread d runs down column d of the send matrix.
__global__ void rank_prefix_kernel(ep_normal_handle_view_t h, int R, int32_t* matrix, int32_t* recv_prefix) {
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if (recv_prefix) recv_prefix[d] = h.recv_offset[d + 1];
    int sum = 0;
    for (int s = 0; matrix && s < R; ++s) matrix[s * R + d] = sum += h.matrix[s * R + d];
  }
}
}  // namespace ep

extern "C" cudaError_t ep_launch_handle_rank_prefix(const ep_normal_handle_view_t* handle, int num_ranks,
                                                    int32_t* matrix, int32_t* recv_prefix, cudaStream_t stream) {
  ep::rank_prefix_kernel<<<1, 256, 0, stream>>>(*handle, num_ranks, matrix, recv_prefix);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_intranode_dispatch(const ep_intranode_launch_t* p, cudaStream_t stream) {
  auto kernel = p->group.mask ? ep::dispatch_kernel<true> : ep::dispatch_kernel<false>;
  kernel<<<p->call.num_blocks, ep::kDispatchThreads, 0, stream>>>(*p);
  return cudaGetLastError();
}

// The combine also comes in a form for calls of one round (the regions hold config.max_tokens_per_rank tokens, the
// default): the loop over rounds keeps values live through the push and reduce loops, which then spill (sm_90:
// 77 local stores in combine_kernel<2, false, true>, none in the one-round form; one H100, one rank, 8 SMs: 474 us
// against 406 us for the one-round form, bench/RESULTS.md).
using IntranodeKernel = void (*)(ep_intranode_launch_t);

template <int kMaxRanks>
static IntranodeKernel combine_kernel_for(bool mask, bool rounds) {
  if (mask) return rounds ? ep::combine_kernel<kMaxRanks, true, true> : ep::combine_kernel<kMaxRanks, true, false>;
  return rounds ? ep::combine_kernel<kMaxRanks, false, true> : ep::combine_kernel<kMaxRanks, false, false>;
}

extern "C" cudaError_t ep_launch_intranode_combine(const ep_intranode_launch_t* p, cudaStream_t stream) {
  const bool mask = p->group.mask != nullptr, rounds = p->group.region.max_rounds > 1;
  const IntranodeKernel kernel = p->group.num_ranks <= 2   ? combine_kernel_for<2>(mask, rounds)
                                 : p->group.num_ranks <= 4 ? combine_kernel_for<4>(mask, rounds)
                                                           : combine_kernel_for<8>(mask, rounds);
  kernel<<<p->call.num_blocks, ep::kCombineThreads, 0, stream>>>(*p);
  return cudaGetLastError();
}
