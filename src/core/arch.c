/* arch.c: the architecture check (arch.h). The kernels need sm_80 at least: BF16 arithmetic, and the system-scope
 * acquire / release loads and stores and release reductions they synchronise with (sm_70). Nothing they use is
 * Hopper-only: the LL dispatch's e4m3 cast is cuda_fp8.h's __nv_cvt_float_to_fp8, one cvt instruction from sm_89
 * and an exact software rounding below it, equal to the reference on every input but NaNs (tests/host/test_arch.c;
 * bench/probes/fp8_cast compares it with the instruction on a GPU).
 * NVSHMEM 3.4.5's device library holds SASS for sm_75, 80, 89, 90, 100 and 120. */
#include "core/arch.h"

#include <stdio.h>
#include <stdlib.h>

#include "core/internal.h"

#ifndef EP_SASS_ARCHS
#error "EP_SASS_ARCHS (the SASS images of the build, e.g. \"80 90 100\") comes from the Makefile's ARCHS"
#endif

typedef struct {
  int min_cc; /* major * 10 + minor */
  const char* need;
} ep_arch_need_t;

static const ep_arch_need_t k_needs[EP_ARCH_PATH_COUNT] = {
    [EP_ARCH_PATH_NORMAL] = {80, "the normal path needs BF16 and system-scope acquire / release (sm_80 or later)"},
    [EP_ARCH_PATH_INTERNODE] = {80, "the internode path needs BF16 and system-scope acquire / release (sm_80 or "
                                    "later)"},
    [EP_ARCH_PATH_LL] = {80, "the low-latency path needs BF16 and system-scope acquire / release (sm_80 or later)"},
    [EP_ARCH_PATH_LL_FP8] = {80, "FP8 low-latency dispatch needs BF16 and system-scope acquire / release (sm_80 or "
                                 "later; the e4m3 cast is exact in software below sm_89)"},
};

static const char* const k_path_names[EP_ARCH_PATH_COUNT] = {"normal", "internode", "low-latency", "FP8 low-latency"};

/* A cubin for sm_XY runs on a device X.Z with Z >= Y: the same major, a minor no lower. */
static int image_runs(int sass, int major, int minor) { return sass / 10 == major && sass % 10 <= minor; }

ep_status_t ep_arch_verdict(int major, int minor, ep_arch_path_t path, const char* sass_archs, char* why,
                            size_t why_bytes) {
  if ((unsigned)path >= EP_ARCH_PATH_COUNT || !sass_archs) {
    snprintf(why, why_bytes, "unknown path %d", (int)path);
    return EP_STATUS_INVALID_ARGUMENT;
  }
  const int cc = major * 10 + minor;
  if (cc < k_needs[path].min_cc) {
    snprintf(why, why_bytes, "%s", k_needs[path].need);
    return EP_STATUS_UNSUPPORTED;
  }
  for (const char* s = sass_archs; *s;) {
    char* end;
    const long sass = strtol(s, &end, 10);
    if (end == s) break;
    if (image_runs((int)sass, major, minor)) return EP_STATUS_SUCCESS;
    s = end;
  }
  snprintf(why, why_bytes,
           "this libep.so has no %s kernels for it (its SASS is for: %s); build it with ARCHS including %d",
           k_path_names[path], sass_archs, cc);
  return EP_STATUS_UNSUPPORTED;
}

ep_status_t ep_arch_check_device(const char* fn, int cuda_device, const struct cudaDeviceProp* prop) {
  char why[256];
  for (int path = 0; path < EP_ARCH_PATH_COUNT; ++path)
    if (ep_arch_verdict(prop->major, prop->minor, (ep_arch_path_t)path, EP_SASS_ARCHS, why, sizeof(why)) !=
        EP_STATUS_SUCCESS)
      return ep_fail(NULL, EP_STATUS_UNSUPPORTED, "%s: %s; device %d is %s (sm_%d%d)", fn, why, cuda_device, prop->name,
                     prop->major, prop->minor);
  return EP_STATUS_SUCCESS;
}
