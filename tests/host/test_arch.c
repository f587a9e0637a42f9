/* test_arch: the architecture check of group creation (src/core/arch.c) as a table of (compute capability, path,
 * build's images) -> verdict, and the e4m3 cast the sm_80 build of the LL dispatch runs: cuda_fp8.h's
 * __nv_cvt_float_to_fp8 below sm_89 is the software rounding this host code runs, which must equal the reference
 * (tests/ref: the rounding the sm_90 cvt instruction does) for every input that is not a NaN. */
#include <cuda_fp8.h>
#include <stdint.h>
#include <string.h>

#include "common/check.h"
#include "core/arch.h"
#include "ep_ref.h"

typedef struct {
  int major, minor;
  ep_arch_path_t path;
  const char* built;
  ep_status_t want;
  const char* why_has; /* a word the refusal's reason must contain */
} verdict_case_t;

static void check_verdicts(void) {
  const verdict_case_t cases[] = {
      {8, 0, EP_ARCH_PATH_NORMAL, "80 90 100", EP_STATUS_SUCCESS, NULL}, /* A100 */
      {8, 0, EP_ARCH_PATH_INTERNODE, "80 90 100", EP_STATUS_SUCCESS, NULL},
      {8, 0, EP_ARCH_PATH_LL, "80 90 100", EP_STATUS_SUCCESS, NULL},
      {8, 0, EP_ARCH_PATH_LL_FP8, "80 90 100", EP_STATUS_SUCCESS, NULL},       /* the cast is software below 8.9 */
      {8, 6, EP_ARCH_PATH_LL_FP8, "80 90 100", EP_STATUS_SUCCESS, NULL},       /* A40: sm_80's cubin runs on 8.6 */
      {8, 9, EP_ARCH_PATH_NORMAL, "80 90 100", EP_STATUS_SUCCESS, NULL},       /* L40S */
      {9, 0, EP_ARCH_PATH_LL_FP8, "80 90 100", EP_STATUS_SUCCESS, NULL},       /* H100 */
      {10, 0, EP_ARCH_PATH_LL_FP8, "80 90 100", EP_STATUS_SUCCESS, NULL},      /* B200 */
      {10, 3, EP_ARCH_PATH_NORMAL, "80 90 100", EP_STATUS_SUCCESS, NULL},      /* B300: sm_100's cubin runs on 10.3 */
      {12, 0, EP_ARCH_PATH_NORMAL, "80 90 100", EP_STATUS_UNSUPPORTED, "120"}, /* no image of major 12 */
      {11, 0, EP_ARCH_PATH_LL, "80 90 100", EP_STATUS_UNSUPPORTED, "110"},
      {7, 5, EP_ARCH_PATH_NORMAL, "80 90 100", EP_STATUS_UNSUPPORTED, "sm_80"}, /* T4: a feature, not an image */
      {7, 0, EP_ARCH_PATH_LL_FP8, "80 90 100", EP_STATUS_UNSUPPORTED, "FP8"},
      {8, 0, EP_ARCH_PATH_NORMAL, "90", EP_STATUS_UNSUPPORTED, "for: 90"}, /* A100, Hopper-only build */
      {9, 0, EP_ARCH_PATH_NORMAL, "80", EP_STATUS_UNSUPPORTED, "90"},      /* an sm_80 cubin never runs on 9.0 */
      {9, 0, EP_ARCH_PATH_LL_FP8, "90", EP_STATUS_SUCCESS, NULL},          /* ARCHS=80-on-90's image */
      {8, 9, EP_ARCH_PATH_NORMAL, "86", EP_STATUS_SUCCESS, NULL},
      {8, 0, EP_ARCH_PATH_NORMAL, "86", EP_STATUS_UNSUPPORTED, "80"}, /* a minor below the image's */
      {10, 0, EP_ARCH_PATH_NORMAL, "", EP_STATUS_UNSUPPORTED, "100"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); ++i) {
    const verdict_case_t* c = &cases[i];
    char why[256] = "";
    const ep_status_t st = ep_arch_verdict(c->major, c->minor, c->path, c->built, why, sizeof(why));
    CHECK(st == c->want, "sm_%d%d path %d built \"%s\": %s, want %s (%s)", c->major, c->minor, (int)c->path, c->built,
          ep_status_string(st), ep_status_string(c->want), why);
    if (c->why_has)
      CHECK(strstr(why, c->why_has), "sm_%d%d path %d: \"%s\" lacks \"%s\"", c->major, c->minor, (int)c->path, why,
            c->why_has);
  }
  char why[64];
  CHECK_EQ_INT(ep_arch_verdict(9, 0, EP_ARCH_PATH_COUNT, "90", why, sizeof(why)), EP_STATUS_INVALID_ARGUMENT,
               "an unknown path");
}

/* Every rounding position of e4m3 (normal and subnormal) lies in a float's upper 21 bits: all of those, with the
 * lower 11 bits (below every rounding position: the sticky bits) 0, 1, a middle value and all ones. */
static void check_e4m3_cast(void) {
  const uint32_t lows[] = {0, 1, 0x400, 0x7ff};
  long bad = 0, nans = 0;
  for (uint32_t high = 0; high < (1u << 21); ++high)
    for (size_t l = 0; l < sizeof(lows) / sizeof(lows[0]); ++l) {
      const uint32_t bits = high << 11 | lows[l];
      float x;
      memcpy(&x, &bits, sizeof(x));
      const uint8_t have = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
      if (x != x) { /* NaN: one canonical NaN, whatever its sign */
        nans++;
        if (have != 0x7f && bad++ < 5) fprintf(stderr, "FAIL e4m3(NaN 0x%08x) = 0x%02x, want 0x7f\n", bits, have);
        continue;
      }
      const uint8_t want = ep_ref_f32_to_e4m3(x);
      if (have != want && bad++ < 5)
        fprintf(stderr, "FAIL e4m3(%a = 0x%08x): software 0x%02x, reference 0x%02x\n", x, bits, have, want);
    }
  CHECK(nans > 0, "the inputs include NaNs");
  CHECK_EQ_INT(bad, 0, "e4m3 casts that differ");
}

int main(void) {
  check_verdicts();
  check_e4m3_cast();
  return TEST_RESULT();
}
