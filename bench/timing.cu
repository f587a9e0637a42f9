/* timing.cu: see timing.h. */
#include "timing.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

static double median_us(std::vector<float>& ms) {
  std::sort(ms.begin(), ms.end());
  size_t n = ms.size();
  double mid = n % 2 ? ms[n / 2] : 0.5 * ((double)ms[n / 2 - 1] + ms[n / 2]);
  return mid * 1e3;
}

void bench_line_up_init(bench_t* b) {
  char path[4200];
  snprintf(path, sizeof(path), "%s/line_up", b->h.dir);
  /* Rank 0 makes it afresh (a counter of zero), the others open it once it is there. */
  int fd = b->rank == 0 ? open(path, O_RDWR | O_CREAT | O_TRUNC, 0644) : -1;
  if (b->rank == 0 && (fd < 0 || ftruncate(fd, 64) != 0))
    bench_die(__FILE__, __LINE__, "open(line_up)", "cannot make the file", path);
  if (harness_barrier(&b->h, "line_up_made") != 0)
    bench_die(__FILE__, __LINE__, "harness_barrier", "a rank did not reach the line-up's setup", "");
  if (b->rank != 0) fd = open(path, O_RDWR);
  if (fd < 0) bench_die(__FILE__, __LINE__, "open(line_up)", "cannot open the file", path);
  void* p = mmap(NULL, 64, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) bench_die(__FILE__, __LINE__, "mmap(line_up)", "cannot map the file", path);
  b->line_up_word = (int*)p;
  b->line_ups = 0;
}

void bench_line_up_fini(bench_t* b) {
  if (b->line_up_word) munmap(b->line_up_word, 64);
  b->line_up_word = NULL;
}

/* Every rank adds one to the counter and spins until all have: they leave within microseconds of each other, where
 * a sleeping barrier would let them start milliseconds apart, longer than the calls timed. */
static void host_line_up(bench_t* b) {
  CUDA_OK(cudaStreamSynchronize(b->stream));
  const int target = ++b->line_ups * b->num_ranks;
  __atomic_fetch_add(b->line_up_word, 1, __ATOMIC_ACQ_REL);
  const time_t deadline = time(NULL) + 120;
  for (unsigned spins = 0; __atomic_load_n(b->line_up_word, __ATOMIC_ACQUIRE) < target; ++spins)
    if ((spins & 0xFFFFF) == 0 && time(NULL) > deadline)
      bench_die(__FILE__, __LINE__, "line-up", "a rank did not arrive in 120 s", "");
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
      if (b->comm) NCCL_OK(ncclAllReduce(b->barrier_buf, b->barrier_buf, 1, ncclFloat, ncclSum, b->comm, b->stream));
      else host_line_up(b);
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
