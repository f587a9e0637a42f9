// profile.cuh: per-phase %globaltimer stamps for the profile builds of the kernels, off by default:
// EP_LL_PROFILE=1 for the LL kernels (low_latency.cu), EP_NORMAL_PROFILE=1 for the normal path's dispatch and
// combine (intranode.cu, internode.cu); EP_*_PROFILE_EVERY sets how often a kernel prints (tuning.h). A kernel's
// Record keeps, for block 0 and the last block (gridDim.x - 1), the time of each phase boundary they stamp; the
// blocks that take part arrive once when they are done, and the last to arrive, every Nth call, prints one line
// (device printf) from the record. A library built without these switches contains none of it: it does not print.
//
// Normal-path line (NORMAL_PROF_*), its form for the internode dispatch (one line; a, b, ... stand for numbers):
//   ep_normal_prof rank 0 inter-dispatch call 30 grid 24 | b0: acks a1 stage a2 send a3 relay a4 pull a5
//   | last@+s: b1 b2 b3 b4 b5 | slowest done d, end e us after b0 start
// Each number is a time since that block's own start, in us (a phase boundary, not a duration: phases of
// different warps may overlap, as combine's push and reduce warps do); "last@+x" is when the last block started
// after block 0; "slowest done" is the latest block's done stamp; "end" the end of the block that finished the call
// (its releases included). Only good calls are meaningful: a block that gives up after a fault does not arrive.
#pragma once

#include <stdio.h>

#include "kernels/common.cuh"
#include "kernels/tuning.h"

#if EP_LL_PROFILE || EP_NORMAL_PROFILE
namespace ep {
namespace prof {

constexpr int kMaxStamps = 6;  // stamp 0 = block start

// One kernel's stamps: a zero-initialised __device__ variable of the kernel's file.
struct Record {
  unsigned long long t[2][kMaxStamps];  // [block 0, last block][stamp], ns
  unsigned long long end;               // this call: the latest end of an arrived block
  unsigned long long slowest;           // this call: the latest done() stamp of any block
  unsigned int arrived, calls;
};

// Stamp i, if this is block 0 or the last block (of `blocks`, this one being `block`: a phase that runs in part of
// a kernel's grid names its own; the other overload takes the kernel's grid). For one thread of the block.
__device__ __forceinline__ void stamp(Record& r, int i, unsigned block, unsigned blocks) {
  const unsigned long long t = global_timer_ns();
  if (block == 0) r.t[0][i] = t;
  if (block == blocks - 1) r.t[1][i] = t;
}

__device__ __forceinline__ void stamp(Record& r, int i) { stamp(r, i, blockIdx.x, gridDim.x); }

// The same for a phase several warps of the block run side by side (one thread each): the latest of their times
// (a previous call's stamp is always earlier).
__device__ __forceinline__ void stamp_max(Record& r, int i) {
  const unsigned long long t = global_timer_ns();
  if (blockIdx.x == 0) atomicMax(&r.t[0][i], t);
  if (blockIdx.x == gridDim.x - 1) atomicMax(&r.t[1][i], t);
}

// Stamp i as the block's work done; every block's time also enters `slowest`. For one thread of the block.
__device__ __forceinline__ void done(Record& r, int i) {
  const unsigned long long t = global_timer_ns();
  if (blockIdx.x == 0) r.t[0][i] = t;
  if (blockIdx.x == gridDim.x - 1) r.t[1][i] = t;
  atomicMax(&r.slowest, t);
}

struct Call {
  unsigned int number;                // 1, 2, ... per kernel
  unsigned long long end, slowest;    // the record's per-call fields
};

// One thread of each of `want` blocks, once per call, when its block is done (end_ns: its end). True in the last
// arrival when the call's number is a multiple of `every`: that thread then prints from r (every arrival's stamps
// are visible to it) and c. The record's per-call fields are reset for the next call either way.
__device__ inline bool arrive(Record& r, unsigned long long end_ns, unsigned want, unsigned every, Call& c) {
  atomicMax(&r.end, end_ns);
  __threadfence();
  if (atomicAdd(&r.arrived, 1u) + 1u != want) return false;
  r.arrived = 0;
  __threadfence();
  c.number = atomicAdd(&r.calls, 1u) + 1u;
  c.end = atomicExch(&r.end, 0ull);
  c.slowest = atomicExch(&r.slowest, 0ull);
  return c.number % every == 0;
}

#if EP_NORMAL_PROFILE
constexpr int kNormalStages = 5;  // stamps 1..5

// Every block's thread 0, at the block's end: arrive and, every EP_NORMAL_PROFILE_EVERY-th call, print the line
// drawn at the top. names: the kernel's, then stamps 1..kNormalStages' labels ("-" for a stamp the kernel lacks).
__device__ inline void normal_end(Record& r, int rank, const char* const* names) {
  Call c;
  if (!arrive(r, global_timer_ns(), gridDim.x, EP_NORMAL_PROFILE_EVERY, c)) return;
  float at[2][kNormalStages];
  for (int b = 0; b < 2; ++b)
    for (int i = 1; i <= kNormalStages; ++i) {
      const bool used = names[i][0] != '-' && r.t[b][i] >= r.t[b][0];  // else not stamped in this call
      at[b][i - 1] = used ? (float)(r.t[b][i] - r.t[b][0]) * 1e-3f : 0.0f;
    }
  const unsigned long long b0 = r.t[0][0];
  const auto since_b0 = [b0](unsigned long long t) { return (float)(long long)(t - b0) * 1e-3f; };
  printf("ep_normal_prof rank %d %s call %u grid %d | b0: %s %.2f %s %.2f %s %.2f %s %.2f %s %.2f | last@%+.2f: "
         "%.2f %.2f %.2f %.2f %.2f | slowest done %.2f, end %.2f us after b0 start\n",
         rank, names[0], c.number, gridDim.x, names[1], at[0][0], names[2], at[0][1], names[3], at[0][2], names[4],
         at[0][3], names[5], at[0][4], since_b0(r.t[1][0]), at[1][0], at[1][1], at[1][2], at[1][3], at[1][4],
         since_b0(c.slowest), since_b0(c.end));
}
#endif

}  // namespace prof
}  // namespace ep
#endif

// The normal kernels' stamps (no code without EP_NORMAL_PROFILE). rec: the kernel's prof::Record; names: see
// prof::normal_end. STAMP_WARPS: by lane 0 of each calling warp (a phase of several warps).
#if EP_NORMAL_PROFILE
#define NORMAL_PROF_STAMP(rec, i) \
  do { if (threadIdx.x == 0) ::ep::prof::stamp((rec), (i)); } while (0)
#define NORMAL_PROF_STAMP_WARPS(rec, i) \
  do { if ((threadIdx.x & 31) == 0) ::ep::prof::stamp_max((rec), (i)); } while (0)
#define NORMAL_PROF_DONE(rec, i) \
  do { if (threadIdx.x == 0) ::ep::prof::done((rec), (i)); } while (0)
#define NORMAL_PROF_END(rec, rank, names) \
  do { if (threadIdx.x == 0) ::ep::prof::normal_end((rec), (rank), (names)); } while (0)
#else
#define NORMAL_PROF_STAMP(rec, i) ((void)0)
#define NORMAL_PROF_STAMP_WARPS(rec, i) ((void)0)
#define NORMAL_PROF_DONE(rec, i) ((void)0)
#define NORMAL_PROF_END(rec, rank, names) ((void)0)
#endif
