/* fp8_cast: is the e4m3 cast of an sm_80 build bit-identical to the sm_89+ instruction, on every float? The LL
 * dispatch casts with cuda_fp8.h's __nv_cvt_float_to_fp8 (RN, satfinite): from sm_89 one cvt.rn.satfinite.e4m3x2
 * instruction, below it a software rounding (NaN made canonical, then __nv_cvt_double_to_fp8). This probe runs both
 * on the GPU for all 2^32 inputs and counts the inputs where they differ, NaNs and non-NaNs apart. It needs an
 * sm_89+ image (e.g. the default ARCHS); in a build without one (ARCHS=80-on-90) it says so and exits 77.
 *
 *   build/bin/fp8_cast        (one GPU; no ep_launch needed)
 *
 * Last line: `fp8_cast: N of 4294967296 inputs differ (N NaNs, N others)`; exit 0 when none differ. */
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

#define CUDA_OK(x)                                                                                    \
  do {                                                                                                \
    cudaError_t e_ = (x);                                                                             \
    if (e_ != cudaSuccess) {                                                                          \
      fprintf(stderr, "fp8_cast: %s at %s:%d: %s\n", #x, __FILE__, __LINE__, cudaGetErrorString(e_)); \
      return 1;                                                                                       \
    }                                                                                                 \
  } while (0)

/* The steps of cuda_fp8.h below sm_89: a NaN becomes the canonical NaN, the rest rounds exactly
 * through double. */
__device__ unsigned char software_e4m3(float x) {
  unsigned int bits = __float_as_uint(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) bits = 0x7fffffffu;
  return __nv_cvt_double_to_fp8((double)__uint_as_float(bits), __NV_SATFINITE, __NV_E4M3);
}

/* counts[0]: NaN inputs that differ, counts[1]: others; first[1]: the first other (by bits), for the message. */
__global__ void compare(unsigned long long* counts, unsigned int* first, int* has_instruction) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if (blockIdx.x == 0 && threadIdx.x == 0) *has_instruction = 1;
  unsigned long long local[2] = {0, 0};
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32);
       i += stride) {
    const float x = __uint_as_float((unsigned int)i);
    unsigned short pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(x));
    if ((unsigned char)(pair & 0xff) != software_e4m3(x)) {
      const int nan = x != x;
      local[nan ? 0 : 1]++;
      if (!nan) atomicMin(first, (unsigned int)i);
    }
  }
  if (local[0]) atomicAdd(&counts[0], local[0]);
  if (local[1]) atomicAdd(&counts[1], local[1]);
#else
  (void)counts, (void)first, (void)has_instruction;
#endif
}

int main(void) {
  unsigned long long* counts;
  unsigned int* first;
  int* has_instruction;
  CUDA_OK(cudaMalloc(&counts, 2 * sizeof(*counts)));
  CUDA_OK(cudaMalloc(&first, sizeof(*first)));
  CUDA_OK(cudaMalloc(&has_instruction, sizeof(*has_instruction)));
  CUDA_OK(cudaMemset(counts, 0, 2 * sizeof(*counts)));
  CUDA_OK(cudaMemset(first, 0xff, sizeof(*first)));
  CUDA_OK(cudaMemset(has_instruction, 0, sizeof(*has_instruction)));
  compare<<<1024, 256>>>(counts, first, has_instruction);
  CUDA_OK(cudaGetLastError());
  unsigned long long c[2];
  unsigned int f;
  int has;
  CUDA_OK(cudaMemcpy(c, counts, sizeof(c), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(&f, first, sizeof(f), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(&has, has_instruction, sizeof(has), cudaMemcpyDeviceToHost));
  if (!has) {
    printf("fp8_cast: skipped: this build's image for the GPU has no cvt e4m3 instruction (compute capability < 8.9 "
           "code)\n");
    return 77;
  }
  if (c[1]) printf("fp8_cast: first non-NaN input that differs: 0x%08x\n", f);
  printf("fp8_cast: %llu of 4294967296 inputs differ (%llu NaNs, %llu others)\n", c[0] + c[1], c[0], c[1]);
  return c[0] + c[1] ? 1 : 0;
}
