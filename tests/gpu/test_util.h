/* test_util.h: small helpers the GPU tests share: host and device allocation that fail loudly, checked CUDA and
 * ep calls, copies to and from the device, and the clean-error-word check. Header-only (static functions). */
#ifndef EP_TESTS_GPU_TEST_UTIL_H
#define EP_TESTS_GPU_TEST_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "common/check.h"
#include "ep.h"

/* EP_TEST_LEVEL=full: the GPU tests also run their long tail (bigger, slower cases); anything else (unset) keeps
 * the default set, which every region of the input space reaches with at least one case. */
static inline int test_level_full(void) {
  const char* level = getenv("EP_TEST_LEVEL");
  return level && strcmp(level, "full") == 0;
}

static inline double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Zeroed host memory; running out ends the test as a failure. */
static inline void* xcalloc(size_t count, size_t size) {
  void* p = calloc(count ? count : 1, size ? size : 1);
  if (!p) {
    fprintf(stderr, "FAIL: out of host memory (%zu x %zu bytes)\n", count, size);
    exit(TEST_FAIL);
  }
  return p;
}

static inline void* xmalloc(size_t bytes) { return xcalloc(1, bytes); }

/* Device memory, at least 16 bytes, so that no buffer of an empty case is NULL. */
static inline void* dev_alloc(size_t bytes) {
  void* p = NULL;
  cudaError_t e = cudaMalloc(&p, bytes < 16 ? 16 : bytes);
  if (e != cudaSuccess) {
    fprintf(stderr, "FAIL: cudaMalloc(%zu): %s\n", bytes, cudaGetErrorString(e));
    exit(TEST_FAIL);
  }
  return p;
}

static inline void dev_free(void* p) {
  if (p) cudaFree(p);
}

#define CUDA_CHECK(call)                                                                          \
  do {                                                                                            \
    cudaError_t cuda_check_err_ = (call);                                                         \
    CHECK(cuda_check_err_ == cudaSuccess, "%s: %s", #call, cudaGetErrorString(cuda_check_err_)); \
  } while (0)

/* Every ep_* status is checked and a failure's message printed: EP_CHECK(ctx, call), where ctx->g is the group.
 * Evaluates to 1 on success. */
#define EP_CHECK(c, call) ep_ok((c)->g, (call), #call, __LINE__)
static inline int ep_ok(ep_group_t g, ep_status_t st, const char* what, int line) {
  CHECK(st == EP_STATUS_SUCCESS, "line %d: %s gave %s: %s", line, what, ep_status_string(st), ep_last_error(g));
  return st == EP_STATUS_SUCCESS;
}

/* Copy `bytes` of device memory to a fresh host buffer (the caller frees it); poisoned if the copy failed. */
static inline void* download(const void* dev, size_t bytes) {
  void* host = xmalloc(bytes);
  cudaError_t e = bytes ? cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost) : cudaSuccess;
  CHECK(e == cudaSuccess, "download of %zu bytes: %s", bytes, cudaGetErrorString(e));
  if (e != cudaSuccess) memset(host, 0xEE, bytes);
  return host;
}

static inline void upload(void* dev, const void* host, size_t bytes) {
  if (bytes) CUDA_CHECK(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice));
}

/* The group's device error word must be clean once the stream has drained: CHECK_ASYNC_CLEAN(ctx, "when"). */
#define CHECK_ASYNC_CLEAN(c, when) check_async_clean_impl((c)->g, (c)->s, (when))
static inline void check_async_clean_impl(ep_group_t g, cudaStream_t s, const char* when) {
  CUDA_CHECK(cudaStreamSynchronize(s));
  ep_status_t async = EP_STATUS_INTERNAL_ERROR;
  CHECK(ep_get_async_error(g, &async) == EP_STATUS_SUCCESS && async == EP_STATUS_SUCCESS,
        "ep_get_async_error after %s: %s: %s", when, ep_status_string(async), ep_last_error(g));
}

#endif /* EP_TESTS_GPU_TEST_UTIL_H */
