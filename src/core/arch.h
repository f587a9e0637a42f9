/* arch.h: which GPUs a build of the library can run on, and what each path needs of the GPU; checked when a group
 * is created, so that a device without code or without a feature is EP_STATUS_UNSUPPORTED, never an illegal
 * instruction or "no kernel image" at the first launch. */
#ifndef EP_CORE_ARCH_H
#define EP_CORE_ARCH_H

#include <stddef.h>

#include <cuda_runtime_api.h>

#include "ep.h"

typedef enum {
  EP_ARCH_PATH_NORMAL,    /* intranode dispatch / combine, BF16 or FP8 rows moved as bytes */
  EP_ARCH_PATH_INTERNODE, /* the normal path across nodes */
  EP_ARCH_PATH_LL,        /* low-latency dispatch / combine, BF16 */
  EP_ARCH_PATH_LL_FP8,    /* low-latency dispatch with the in-kernel e4m3 cast */
  EP_ARCH_PATH_COUNT
} ep_arch_path_t;

/* Whether a device of compute capability major.minor runs `path` with a library holding SASS for `sass_archs`
 * (the build's images, e.g. "80 90 100"): EP_STATUS_SUCCESS, or EP_STATUS_UNSUPPORTED with the reason in `why`
 * (the feature or the image that is missing). A pure function, for tests. */
ep_status_t ep_arch_verdict(int major, int minor, ep_arch_path_t path, const char* sass_archs, char* why,
                            size_t why_bytes);

/* The check of group creation: every path on `prop` (device `cuda_device`) with this build's images; the message
 * of a refusal names the call `fn`, the device and what it lacks. */
ep_status_t ep_arch_check_device(const char* fn, int cuda_device, const struct cudaDeviceProp* prop);

#endif
