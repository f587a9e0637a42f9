/* timing.cu: see timing.h. */
#include "timing.h"

#include <algorithm>
#include <vector>

static double median_us(std::vector<float>& ms) {
  std::sort(ms.begin(), ms.end());
  size_t n = ms.size();
  double mid = n % 2 ? ms[n / 2] : 0.5 * ((double)ms[n / 2 - 1] + ms[n / 2]);
  return mid * 1e3;
}

void bench_time_phases(bench_t* b, int num_phases, const bench_phase_fn* phases, double* median) {
  const int iters = b->opt.iters, total = b->opt.warmup + b->opt.iters;
  std::vector<cudaEvent_t> start((size_t)num_phases * iters), stop((size_t)num_phases * iters);
  for (size_t i = 0; i < start.size(); ++i) {
    CUDA_OK(cudaEventCreate(&start[i]));
    CUDA_OK(cudaEventCreate(&stop[i]));
  }
  for (int it = 0; it < total; ++it) {
    const int timed = it - b->opt.warmup; /* < 0 while warming up */
    for (int p = 0; p < num_phases; ++p) {
      NCCL_OK(ncclAllReduce(b->barrier_buf, b->barrier_buf, 1, ncclFloat, ncclSum, b->comm, b->stream));
      if (b->opt.l2_flush) CUDA_OK(cudaMemsetAsync(b->flush_buf, 0, BENCH_FLUSH_BYTES, b->stream));
      if (timed >= 0) CUDA_OK(cudaEventRecord(start[(size_t)p * iters + timed], b->stream));
      phases[p]();
      if (timed >= 0) CUDA_OK(cudaEventRecord(stop[(size_t)p * iters + timed], b->stream));
    }
  }
  CUDA_OK(cudaStreamSynchronize(b->stream));
  std::vector<float> ms(iters);
  for (int p = 0; p < num_phases; ++p) {
    for (int i = 0; i < iters; ++i)
      CUDA_OK(cudaEventElapsedTime(&ms[i], start[(size_t)p * iters + i], stop[(size_t)p * iters + i]));
    median[p] = median_us(ms);
  }
  for (size_t i = 0; i < start.size(); ++i) {
    CUDA_OK(cudaEventDestroy(start[i]));
    CUDA_OK(cudaEventDestroy(stop[i]));
  }
}
