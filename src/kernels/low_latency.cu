// low_latency.cu: the low-latency (LL) path: dispatch and combine, each a send phase and a receive phase. With the
// receive hook the phases are two kernels (the hook launches the receive kernel later); without it one fused,
// cooperative kernel per call runs the send phase and then the receive phase in the same blocks (see "Kernels"
// below; EP_LL_FUSED=0 keeps two kernels there too). Each phase's code exists once, as a device function that
// both kinds of kernel call with the phase's own grid (Grid). The LL region and the signal protocol are drawn
// in ll_region.h. The send phases have no grid-wide barrier: each block publishes its own part of the counts; the
// receive phase's last block acknowledges the call and advances the half's call number. Peers of this node are
// written with NVLink stores; others through the transport's put-with-signal. Data is placed by data, never by
// atomics whose order varies (the count words are sums, whatever the order of their adds): slots come from a
// counting pass over topk_idx, rows of an expert are packed by source rank then token, and combine sums in top-k
// order.
// Files: ll_common.cuh (what the phases share), ll_dispatch.cuh and ll_combine.cuh (the phases), this file (the
// kernels and their launches).
#include "kernels/ll_combine.cuh"
#include "kernels/ll_dispatch.cuh"
#include "kernels/tuning.h"

#include <atomic>

namespace ep {
namespace ll {

// ---------------------------------------------------------------------------------------------------------------
// Kernels. With the receive hook each phase is a launch of its own: the hook launches the receive phase later, and
// it takes the call number from the handle (p.handle.ops, written by the send phase's block 0). Without the hook one
// fused kernel runs, in each block, the send phase (blocks [0, send_blocks)) and then the receive phase (blocks
// [0, recv_blocks)); its grid is max(send_blocks, recv_blocks) <= the SM count and it is launched cooperatively, so
// that all its blocks are resident at once: a block's receive phase spins on counts that the send phases of other
// blocks, of this rank and of its peers, publish. Running both phases in one kernel, the fused kernel
//  - reads the call number itself in every block (seq[half] + 1, as the send phase does), rather than p.handle.ops,
//    which send block 0 may not have written yet; finish_recv, in every block, advances seq only once all have arrived;
//  - stops a block whose send phase gave up before its receive phase: it never arrives, the other blocks' waits
//    time out (each fault names a peer) and the call is not acknowledged, as with two kernels;
//  - separates the phases with a block barrier: both use the dynamic shared memory from its start.
// The phases' code is picked by the call (dispatch, or combine of rows, of sums or of LogFMT rows), a template
// parameter, and each kernel is compiled twice: with the rank mask (kMask, for a group that has one) and without it,
// the code of a group that never had a mask (ll_common.cuh, masked).
// ---------------------------------------------------------------------------------------------------------------
constexpr int kThreads = kSendThreads;  // every LL kernel's block size
static_assert(kSendThreads == kRecvThreads, "a fused kernel runs both phases with one block size");

template <Call kCall, bool kMask>
__device__ __forceinline__ bool send_phase(const ep_ll_launch_t& p, Grid grid, uint64_t op) {
  if constexpr (kCall == Call::kDispatch) return dispatch_send<kMask>(p, grid, op);
  else return combine_send<kCall, kMask>(p, grid, op);
}

template <Call kCall, bool kMask>
__device__ __forceinline__ bool recv_phase(const ep_ll_launch_t& p, Grid grid) {
  if constexpr (kCall == Call::kDispatch) return dispatch_recv<kMask>(p, grid);
  else return combine_recv<kCall, kMask>(p, grid);
}

// A launch runs the send phase (recv_blocks 0), the receive phase (send_blocks 0) or both, fused.
template <Call kCall, bool kMask>
__device__ __forceinline__ void run_phases(const ep_ll_launch_t& p, int send_blocks, int recv_blocks) {
  if (recv_blocks == 0) {
    send_phase<kCall, kMask>(p, kernel_grid(), next_call(p));
    return;
  }
  if (send_blocks == 0) {  // the call number comes from the handle: ops[0] (dispatch) or [1], written by the send phase
    const uint64_t op = p.handle.ops[kCall == Call::kDispatch ? 0 : 1];
    if (recv_phase<kCall, kMask>(p, kernel_grid())) finish_recv<kCall, kMask>(p, kernel_grid(), op);
    return;
  }
  const uint64_t op = next_call(p);
  const int b = blockIdx.x;
  if (b < send_blocks && !send_phase<kCall, kMask>(p, Grid{b, send_blocks}, op)) return;
  __syncthreads();  // the receive phase reuses the send phase's shared memory
  const Grid recv{b, recv_blocks};
  if (b < recv_blocks && !recv_phase<kCall, kMask>(p, recv)) return;
  finish_recv<kCall, kMask>(p, recv, op);
}

// One kernel symbol per call, whichever phases a launch runs, so that a profile lists an LL dispatch as one kernel
// named "ep::ll::dispatch_kernel" and a combine as "ep::ll::combine_kernel<...>": DeepEP's tests (and users'
// profiling scripts) find the two calls by those words, one row each, two launches per call with a receive hook.
template <bool kMask>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(ep_ll_launch_t p, int send_blocks, int recv_blocks) {
  run_phases<Call::kDispatch, kMask>(p, send_blocks, recv_blocks);
}

template <Call kCall, bool kMask>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(ep_ll_launch_t p, int send_blocks, int recv_blocks) {
  run_phases<kCall, kMask>(p, send_blocks, recv_blocks);
}

}  // namespace ll
}  // namespace ep

static int ll_grid(int sms, int work) { return work < 1 ? 1 : (work < sms ? work : sms); }

static cudaError_t ll_smem(const void* fn, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
}

namespace {
struct Shape {  // of one phase's launch
  int grid;
  size_t smem;  // dynamic shared memory
};
}  // namespace

static Shape dispatch_send_shape(const ep_ll_launch_t* p) {
  /* One block per token up to the SM count; more blocks when a block would own more than kMaxRange tokens. */
  int grid = ll_grid(p->group.num_sms, p->call.num_tokens);
  const int min_grid = (p->call.num_tokens + ep::ll::kMaxRange - 1) / ep::ll::kMaxRange;
  if (grid < min_grid) grid = min_grid;
  const int per_block = (p->call.num_tokens + grid - 1) / grid;
  const size_t E = (size_t)p->call.num_experts, R = (size_t)p->group.num_ranks, K = (size_t)p->call.num_topk;
  return {grid, sizeof(int) * (2 * E + 3 * R + 5 * (size_t)per_block * K)};
}

static Shape dispatch_recv_shape(const ep_ll_launch_t* p) {
  return {p->group.num_sms, sizeof(int) * ((size_t)p->call.num_experts + (size_t)p->group.num_ranks + 1)};
}

static Shape combine_send_shape(const ep_ll_launch_t* p) {
  /* s_rows, s_units, the (begin, count) pairs, then the rows form's first rows or the sums form's message offsets. */
  const size_t E_loc = (size_t)(p->call.num_experts / p->group.num_ranks), R = (size_t)p->group.num_ranks;
  const size_t last = E_loc > R ? E_loc + 1 : R + 1;
  return {p->group.num_sms, sizeof(int) * 2 * R + 2 * sizeof(int) * E_loc * R + sizeof(int) * last};
}

static Shape combine_recv_shape(const ep_ll_launch_t* p) {
  const int chunks = (p->call.hidden + ep::ll::kChunk - 1) / ep::ll::kChunk;
  const int warps = p->call.num_tokens * chunks;
  return {ll_grid(p->group.num_sms, (warps + ep::ll::kRecvWarps - 1) / ep::ll::kRecvWarps), 0};
}

namespace {
/* A call's kernel: the dispatch or one of the three combines, in the form with the rank mask for a group that has
 * one; `index` (2 * call + mask) names it in the per-kernel cache of launch_fused. */
struct CallKernel {
  void (*fn)(ep_ll_launch_t, int, int);
  int index;
};
constexpr int kCallKernels = 8;
}  // namespace

static CallKernel dispatch_kernel_of(const ep_ll_launch_t* p) {
  if (p->group.mask) return {ep::ll::dispatch_kernel<true>, 1};
  return {ep::ll::dispatch_kernel<false>, 0};
}

template <ep::ll::Call kCall>
static CallKernel combine_form(bool mask) {
  if (mask) return {ep::ll::combine_kernel<kCall, true>, 2 * (int)kCall + 1};
  return {ep::ll::combine_kernel<kCall, false>, 2 * (int)kCall};
}

static CallKernel combine_kernel_of(const ep_ll_launch_t* p) {
  const bool mask = p->group.mask != nullptr;
  if (p->call.logfmt) return combine_form<ep::ll::Call::kCombineLogfmt>(mask);
  if (p->call.sum_on_expert_ranks) return combine_form<ep::ll::Call::kCombineSums>(mask);
  return combine_form<ep::ll::Call::kCombine>(mask);
}

/* One phase of a call's kernel over shape s. */
static cudaError_t launch_phase(CallKernel k, const ep_ll_launch_t* p, Shape s, bool send, cudaStream_t stream) {
  cudaError_t e = ll_smem((const void*)k.fn, s.smem);
  if (e != cudaSuccess) return e;
  k.fn<<<s.grid, ep::ll::kThreads, s.smem, stream>>>(*p, send ? s.grid : 0, send ? 0 : s.grid);
  return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_ll_dispatch_send(const ep_ll_launch_t* p, cudaStream_t stream) {
  return launch_phase(dispatch_kernel_of(p), p, dispatch_send_shape(p), true, stream);
}

extern "C" cudaError_t ep_launch_ll_dispatch_recv(const ep_ll_launch_t* p, cudaStream_t stream) {
  return launch_phase(dispatch_kernel_of(p), p, dispatch_recv_shape(p), false, stream);
}

extern "C" cudaError_t ep_launch_ll_combine_send(const ep_ll_launch_t* p, cudaStream_t stream) {
  return launch_phase(combine_kernel_of(p), p, combine_send_shape(p), true, stream);
}

extern "C" cudaError_t ep_launch_ll_combine_recv(const ep_ll_launch_t* p, cudaStream_t stream) {
  return launch_phase(combine_kernel_of(p), p, combine_recv_shape(p), false, stream);
}

/* Blocks of a fused kernel that can be resident on one SM (threads and registers; a call's dynamic shared memory
 * cannot bring a launchable kernel below 1, and the fused grid never passes the SM count), or 0 where the device
 * has no cooperative launch. A failed query leaves no error behind for the next launch's cudaGetLastError(). */
static int fused_blocks_per_sm(const void* kernel) {
  int dev = 0, coop = 0, blocks = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, ep::ll::kThreads, 0) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return coop ? blocks : 0;
}

/* Launch the fused kernel k cooperatively over max(send, receive grid) blocks, if that is at most the SM count and
 * that many blocks can be resident at once (computed once per kernel, per process: every GPU of a job is taken to
 * be the same model); else launch nothing and leave *launched 0. Capturable: the cooperative attribute is valid for
 * launches and for graph kernel nodes (driver_types.h, cudaLaunchAttributeCooperative). */
static cudaError_t launch_fused(CallKernel k, const ep_ll_launch_t* p, Shape send, Shape recv, cudaStream_t stream,
                                int* launched) {
  *launched = 0;
  const int grid = send.grid > recv.grid ? send.grid : recv.grid;
  if (!EP_LL_FUSED || grid > p->group.num_sms) return cudaSuccess;
  static std::atomic<int> per_sm_plus_one[kCallKernels];  // 0: not asked yet
  int per_sm = per_sm_plus_one[k.index].load(std::memory_order_relaxed) - 1;
  if (per_sm < 0) {
    per_sm = fused_blocks_per_sm((const void*)k.fn);
    per_sm_plus_one[k.index].store(per_sm + 1, std::memory_order_relaxed);
  }
  if (grid > per_sm * p->group.num_sms) return cudaSuccess;
  const size_t smem = send.smem > recv.smem ? send.smem : recv.smem;
  cudaError_t e = ll_smem((const void*)k.fn, smem);
  if (e != cudaSuccess) return e;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)grid);
  cfg.blockDim = dim3((unsigned)ep::ll::kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  e = cudaLaunchKernelEx(&cfg, k.fn, *p, send.grid, recv.grid);
  const cudaError_t last = cudaGetLastError();  // clear it, as the <<<>>> launches' checks do
  if (e == cudaSuccess) e = last;
  if (e == cudaSuccess) *launched = 1;
  return e;
}

extern "C" size_t ep_ll_smem_bytes(const ep_ll_launch_t* p) {
  const size_t shapes[3] = {dispatch_send_shape(p).smem, dispatch_recv_shape(p).smem, combine_send_shape(p).smem};
  size_t most = 0;
  for (size_t s : shapes) most = s > most ? s : most;
  return most;
}

extern "C" cudaError_t ep_launch_ll_dispatch_fused(const ep_ll_launch_t* p, cudaStream_t stream, int* launched) {
  return launch_fused(dispatch_kernel_of(p), p, dispatch_send_shape(p), dispatch_recv_shape(p), stream, launched);
}

extern "C" cudaError_t ep_launch_ll_combine_fused(const ep_ll_launch_t* p, cudaStream_t stream, int* launched) {
  return launch_fused(combine_kernel_of(p), p, combine_send_shape(p), combine_recv_shape(p), stream, launched);
}
