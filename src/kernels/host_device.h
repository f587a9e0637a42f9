/* host_device.h: small helpers that host code and kernels share (C11 and CUDA C++ alike). */
#ifndef EP_KERNELS_HOST_DEVICE_H
#define EP_KERNELS_HOST_DEVICE_H

#include <stddef.h>
#include <stdint.h>

/* A function both sides call: the region maps, for example, are computed on the host to size the heap and in the
 * kernels to find a peer's regions. */
#ifdef __CUDACC__
#define EP_HD __host__ __device__
#else
#define EP_HD
#endif

static inline EP_HD size_t ep_align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

#ifdef __cplusplus
extern "C" {
#endif

/* Division by a divisor that is fixed for a launch (e.g. experts per rank), as a multiply and two shifts
 * (Granlund and Montgomery): exact for every uint32 dividend. The GPU has no integer divide: there `/` by a value
 * known only at run time is a dependent chain of some twenty instructions. Made on the host (ep_fastdiv_make),
 * applied in kernels (ep_fastdiv). */
typedef struct ep_fastdiv {
  uint32_t divisor, magic, shift1, shift2;
} ep_fastdiv_t;

static inline ep_fastdiv_t ep_fastdiv_make(uint32_t divisor) { /* 1 <= divisor <= 2^31 */
  uint32_t l = 0;
  while (l < 32 && (1ull << l) < divisor) ++l;
  ep_fastdiv_t f;
  f.divisor = divisor;
  f.magic = (uint32_t)(((1ull << 32) * ((1ull << l) - divisor)) / divisor + 1);
  f.shift1 = l < 1 ? l : 1;
  f.shift2 = l > 0 ? l - 1 : 0;
  return f;
}

/* n / f.divisor. */
static inline EP_HD uint32_t ep_fastdiv(uint32_t n, ep_fastdiv_t f) {
  const uint32_t t = (uint32_t)(((uint64_t)n * f.magic) >> 32);
  return (t + ((n - t) >> f.shift1)) >> f.shift2;
}

#ifdef __cplusplus
}
#endif

#endif /* EP_KERNELS_HOST_DEVICE_H */
