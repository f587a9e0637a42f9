/* test_fastdiv: ep_fastdiv (src/kernels/host_device.h), the multiply-shift division the LL kernels use for an expert's
 * rank, against the `/` operator: every divisor a launch can meet and more, dividends at the edges of the range
 * and random ones from a fresh seed. */
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include "common/check.h"
#include "kernels/host_device.h"

static uint64_t next(uint64_t* s) { /* xorshift64 */
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

static void check_divisor(uint32_t d, uint64_t* seed) {
  const ep_fastdiv_t f = ep_fastdiv_make(d);
  const uint32_t edges[] = {0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, 0x7fffffffu, 0x80000000u, 0xfffffffeu,
                            0xffffffffu, 0xffffffffu - d, (0xffffffffu / d) * d, (0xffffffffu / d) * d - 1};
  long bad = 0;
  uint32_t first_n = 0;
  for (size_t i = 0; i < sizeof(edges) / sizeof(edges[0]); ++i)
    if (ep_fastdiv(edges[i], f) != edges[i] / d && bad++ == 0) first_n = edges[i];
  for (uint32_t n = 0; n < 4096; ++n)
    if (ep_fastdiv(n, f) != n / d && bad++ == 0) first_n = n;
  for (int i = 0; i < 20000; ++i) {
    const uint32_t n = (uint32_t)next(seed);
    if (ep_fastdiv(n, f) != n / d && bad++ == 0) first_n = n;
  }
  CHECK(bad == 0, "divisor %u: %ld wrong quotients, first for n = %u (got %u, want %u)", d, bad, first_n,
        ep_fastdiv(first_n, f), first_n / d);
}

int main(void) {
  uint64_t seed = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull | 1;
  printf("test_fastdiv: seed %llu\n", (unsigned long long)seed);
  for (uint32_t d = 1; d <= 1100; ++d) check_divisor(d, &seed); /* experts per rank: 1 .. 1024 and past it */
  const uint32_t big[] = {4095, 4096, 4097, 65535, 65536, 65537, 1u << 20, (1u << 24) + 1, 0x7fffffffu, 0x80000000u};
  for (size_t i = 0; i < sizeof(big) / sizeof(big[0]); ++i) check_divisor(big[i], &seed);
  for (int i = 0; i < 200; ++i) check_divisor(1 + (uint32_t)(next(&seed) % 0x80000000u), &seed);
  return TEST_RESULT();
}
