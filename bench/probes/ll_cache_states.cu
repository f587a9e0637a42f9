/* ll_cache_states: how much of a low-latency call's time is cold caches. A diagnostic, not a benchmark row: it
 * times the same ep_ll_dispatch / ep_ll_combine (FP8 dispatch, BF16 combine, no hook) after different work, so
 * that the caches the call finds differ: L2 flushed or not (data, and the kernel's code in L2), the previous
 * kernel the same one or another one (the SMs' instruction caches), or a kernel of ~256 KB of straight-line code
 * run on every SM just before (instruction caches emptied). Results are not checked here (ep_bench checks the same
 * calls); every call's status is.
 *
 *   build/bin/ep_launch -n 1 build/bin/ll_cache_states [--iters N] [--tokens N]
 *
 * One rank or more (each rank runs the same sequence: the calls are collective). Each timed call is preceded by
 * its mode's work and then a 40 us one-block spin, so that the host has queued the call before the start event.
 * Prints, per mode, the median, p10 and p90 of the timed call's CUDA-event time on this rank (rank 0 prints). */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

extern "C" {
#include "ep.h"
#include "gpu/harness.h"
}

#define CUDA_OK(x)                                                                                      \
  do {                                                                                                  \
    cudaError_t e_ = (x);                                                                               \
    if (e_ != cudaSuccess) {                                                                            \
      fprintf(stderr, "ll_cache_states: %s at %s:%d: %s\n", #x, __FILE__, __LINE__, cudaGetErrorString(e_)); \
      exit(1);                                                                                          \
    }                                                                                                   \
  } while (0)
#define EP_OK(g, x)                                                                                              \
  do {                                                                                                           \
    ep_status_t s_ = (x);                                                                                        \
    if (s_ != EP_STATUS_SUCCESS) {                                                                               \
      fprintf(stderr, "ll_cache_states: %s at %s:%d: %s: %s\n", #x, __FILE__, __LINE__, ep_status_string(s_), \
              ep_last_error(g));                                                                                 \
      exit(1);                                                                                                   \
    }                                                                                                            \
  } while (0)

/* 16384 dependent FFMAs with distinct immediates: ~256 KB of code that no loop folds. */
#define EV1(x) v = fmaf(v, 1.0001f, (float)(x) + 0.5f);
#define EV2(x) EV1(x) EV1((x) + 1)
#define EV4(x) EV2(x) EV2((x) + 2)
#define EV8(x) EV4(x) EV4((x) + 4)
#define EV16(x) EV8(x) EV8((x) + 8)
#define EV32(x) EV16(x) EV16((x) + 16)
#define EV64(x) EV32(x) EV32((x) + 32)
#define EV128(x) EV64(x) EV64((x) + 64)
#define EV256(x) EV128(x) EV128((x) + 128)
#define EV512(x) EV256(x) EV256((x) + 256)
#define EV1K(x) EV512(x) EV512((x) + 512)
#define EV2K(x) EV1K(x) EV1K((x) + 1024)
#define EV4K(x) EV2K(x) EV2K((x) + 2048)
#define EV8K(x) EV4K(x) EV4K((x) + 4096)
#define EV16K(x) EV8K(x) EV8K((x) + 8192)
__global__ void evict_instructions(float* sink, float v) {
  EV16K(0)
  if (v == 12345.678f) sink[threadIdx.x] = v; /* never: keeps the chain alive */
}

__device__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void spin(unsigned long long ns) {
  const unsigned long long t0 = now_ns();
  while (now_ns() - t0 < ns) {
  }
}

__global__ void empty_kernel() {}

namespace {
enum Before { kCombineFlush, kCombine, kDispatch, kDispatchFlush, kDispatchEvict, kCombineEvict, kNothing };
struct Mode {
  const char* name;
  Before before;      /* the work queued before the timed call */
  bool time_combine;  /* else the dispatch (or, with kNothing, an empty kernel of the dispatch's grid size) */
};
const Mode kModes[] = {
    {"dispatch after combine, L2 flushed (ep_bench's condition)", kCombineFlush, false},
    {"dispatch after combine", kCombine, false},
    {"dispatch after dispatch (warmest)", kDispatch, false},
    {"dispatch after dispatch, L2 flushed", kDispatchFlush, false},
    {"dispatch after dispatch + instruction eviction", kDispatchEvict, false},
    {"dispatch after combine + instruction eviction", kCombineEvict, false},
    {"empty kernel, 128 blocks x 512 threads (floor)", kNothing, false},
    {"combine after dispatch, L2 flushed", kDispatchFlush, true},
    {"combine after dispatch", kDispatch, true},
};
}  // namespace

int main(int argc, char** argv) {
  int iters = 200, T = 128;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--tokens")) T = atoi(argv[i + 1]);
    else {
      fprintf(stderr, "usage: ll_cache_states [--iters N] [--tokens N]\n");
      return 2;
    }
  }
  if (iters < 10 || T < 1) {
    fprintf(stderr, "ll_cache_states: need --iters >= 10 and --tokens >= 1\n");
    return 2;
  }
  const int H = 7168, K = 8, E = 256;
  harness_t h;
  int rc = harness_init(&h);
  if (rc) return rc;
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ll_max_tokens_per_rank = T;
  cfg.max_tokens_per_rank = T;
  ep_group_t g = NULL;
  EP_OK(g, harness_group_create(&h, &cfg, &g));
  const int R = h.num_ranks, E_loc = E / R;
  const size_t RT = (size_t)R * T;
  cudaStream_t st;
  CUDA_OK(cudaStreamCreate(&st));

  /* Routing: K distinct random experts per token; inputs: uniform in [-1, 1). */
  uint64_t seed = harness_seed(&h, "ll_cache_states") + (uint64_t)h.rank;
  std::vector<int64_t> idx((size_t)T * K);
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < K; ++k) {
      int64_t e;
      bool again;
      do {
        e = (int64_t)(harness_rand(&seed) % E);
        again = std::find(&idx[(size_t)t * K], &idx[(size_t)t * K + k], e) != &idx[(size_t)t * K + k];
      } while (again);
      idx[(size_t)t * K + k] = e;
    }
  std::vector<__nv_bfloat16> x((size_t)T * H);
  for (auto& v : x) v = __float2bfloat16((float)(2.0 * harness_uniform(&seed) - 1.0));
  std::vector<float> w((size_t)T * K, 1.0f / K);
  void *d_x, *d_idx, *d_w, *recv_x, *recv_scales, *recv_count, *y, *out, *flush, *sink;
  const size_t kFlushBytes = 256ull << 20;
  CUDA_OK(cudaMalloc(&d_x, x.size() * 2));
  CUDA_OK(cudaMalloc(&d_idx, idx.size() * 8));
  CUDA_OK(cudaMalloc(&d_w, w.size() * 4));
  CUDA_OK(cudaMalloc(&recv_x, (size_t)E_loc * RT * H));
  CUDA_OK(cudaMalloc(&recv_scales, (size_t)E_loc * RT * (H / 128) * 4));
  CUDA_OK(cudaMalloc(&recv_count, (size_t)E_loc * 4));
  CUDA_OK(cudaMalloc(&y, (size_t)E_loc * RT * H * 2));
  CUDA_OK(cudaMalloc(&out, (size_t)T * H * 2));
  CUDA_OK(cudaMalloc(&flush, kFlushBytes));
  CUDA_OK(cudaMalloc(&sink, 4096));
  CUDA_OK(cudaMemcpy(d_x, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_idx, idx.data(), idx.size() * 8, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_w, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(y, 0, (size_t)E_loc * RT * H * 2));

  ep_ll_handle_t handle;
  EP_OK(g, ep_ll_handle_create(g, &handle));
  ep_ll_dispatch_args_t da = EP_LL_DISPATCH_ARGS_INIT;
  da.x = d_x;
  da.num_tokens = T;
  da.hidden = H;
  da.topk_idx = (const int64_t*)d_idx;
  da.num_topk = K;
  da.num_experts = E;
  da.max_tokens_per_rank = T;
  da.recv_dtype = EP_FP8_E4M3;
  da.recv_x = recv_x;
  da.recv_x_scales = recv_scales;
  da.recv_count = (int*)recv_count;
  ep_ll_combine_args_t ca = EP_LL_COMBINE_ARGS_INIT;
  ca.x = y;
  ca.topk_weights = (const float*)d_w;
  ca.out = out;

  auto dispatch = [&] { EP_OK(g, ep_ll_dispatch(g, handle, &da, st)); };
  auto combine = [&] { EP_OK(g, ep_ll_combine(g, handle, &ca, st)); };
  auto flush_l2 = [&] { CUDA_OK(cudaMemsetAsync(flush, 0, kFlushBytes, st)); };
  auto evict = [&] {
    evict_instructions<<<1024, 128, 0, st>>>((float*)sink, 1.0f);
    CUDA_OK(cudaGetLastError());
  };
  std::vector<cudaEvent_t> ev(2 * (size_t)iters);
  for (auto& e : ev) CUDA_OK(cudaEventCreate(&e));
  if (h.rank == 0)
    printf("ll_cache_states: %d rank(s), %d tokens per rank, hidden %d, top-%d, %d experts, FP8 dispatch, BF16 "
           "combine; %d iterations per mode; CUDA-event time of the timed call, us\n",
           R, T, H, K, E, iters);
  for (const Mode& m : kModes) {
    dispatch();  /* the handle holds a dispatch whose combine may run */
    combine();
    CUDA_OK(cudaStreamSynchronize(st));
    for (int it = 0; it < iters; ++it) {
      switch (m.before) {
        case kCombineFlush: combine(); flush_l2(); break;
        case kCombine: combine(); break;
        case kDispatch: dispatch(); break;
        case kDispatchFlush: dispatch(); flush_l2(); break;
        case kDispatchEvict: dispatch(); evict(); break;
        case kCombineEvict: combine(); evict(); break;
        case kNothing: break;
      }
      spin<<<1, 32, 0, st>>>(40000);
      CUDA_OK(cudaEventRecord(ev[2 * (size_t)it], st));
      if (m.time_combine) combine();
      else if (m.before == kNothing) empty_kernel<<<128, 512, 0, st>>>();
      else dispatch();
      CUDA_OK(cudaEventRecord(ev[2 * (size_t)it + 1], st));
    }
    CUDA_OK(cudaStreamSynchronize(st));
    std::vector<float> ms(iters);
    for (int it = 0; it < iters; ++it) CUDA_OK(cudaEventElapsedTime(&ms[it], ev[2 * (size_t)it], ev[2 * (size_t)it + 1]));
    std::sort(ms.begin(), ms.end());
    if (h.rank == 0)
      printf("  %-58s median %6.2f  p10 %6.2f  p90 %6.2f\n", m.name, ms[iters / 2] * 1e3, ms[iters / 10] * 1e3,
             ms[iters * 9 / 10] * 1e3);
  }
  EP_OK(g, ep_ll_handle_destroy(handle));
  EP_OK(NULL, ep_group_destroy(g));
  return 0;
}
