// nvshmem_host.cu: the host half of the transport seam, on NVSHMEM 3.4.
//
// NOTES: NVSHMEM's public init wrapper exits the process on failure; we call the status-returning
// `nvshmemi_init_thread` (the same function the wrapper calls, from libnvshmem_device.a) so that a failed init
// becomes an error message instead.
//
// The exit of a process that initialised NVSHMEM more than once (NVSHMEM 3.4.5's source and binaries, UID
// bootstrap). Each initialisation registers an exit handler, bootstrap_finalize, that acts while the bootstrap is
// marked up; a collective nvshmem_finalize runs it and then marks the bootstrap down, so the handlers of finalised
// initialisations do nothing. A process that ends with NVSHMEM still up (ep_group_abort, the local destroy of a
// failed group or of one with a masked rank: NVSHMEM's finalize waits for every peer) runs its latest handler,
// which calls the UID plugin's finalize and dlclose()s the plugin but leaves the bootstrap marked up; the next
// handler calls the plugin's finalize again through the stale pointer, into unmapped code: SIGSEGV inside exit.
// Keeping the plugin mapped would not help: its finalize frees its state without clearing the pointer (a double
// free), and the loader then dlclose()s a NULL handle (SIGSEGV in glibc). NVSHMEM's non-collective end,
// nvshmem_global_exit, marks the bootstrap down so that no handler finalises it, stops the proxy thread, and calls
// the bootstrap's global exit, which the UID plugin leaves NULL (nothing ends the process). release_at_exit calls
// it. It is registered after each initialisation from the second on (a process with one exits cleanly as it is),
// so it runs before NVSHMEM's handlers (last registered, first run), and only where it is safe: see its comment.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include <nvshmem.h>
#include <nvshmemx.h>

#include "transport/transport.h"

static_assert(sizeof(nvshmemx_uniqueid_t) == EP_TP_UNIQUE_ID_BYTES, "unique id size changed in NVSHMEM");

static int g_initialized = 0;
static int g_init_count = 0;   /* NVSHMEM initialisations in this process: one exit handler of NVSHMEM's each */
static int g_device = -1;      /* the CUDA device of the latest one */
static int g_device_state = 0; /* release_at_exit's device wait: 0 running, 1 idle, -1 a CUDA error */
static int g_nvshmem_ended = 0; /* release_at_exit's nvshmem_global_exit: 1 once it returned */

static void* synchronize_device(void* unused) {
  (void)unused;
  const bool ok = cudaSetDevice(g_device) == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess;
  __atomic_store_n(&g_device_state, ok ? 1 : -1, __ATOMIC_RELEASE);
  return NULL;
}

static void* end_nvshmem(void* unused) {
  (void)unused;
  nvshmem_global_exit(0);
  __atomic_store_n(&g_nvshmem_ended, 1, __ATOMIC_RELEASE);
  return NULL;
}

/* Runs `task` on a thread of its own and waits up to `seconds` for it to set *state non-zero: true if it did. A task
 * that does not end (a kernel that never finishes, a proxy thread that never stops) is left behind, so that it
 * cannot hold the process at exit. */
static bool finished_within(void* (*task)(void*), const int* state, double seconds) {
  pthread_t thread;
  if (pthread_create(&thread, NULL, task, NULL) != 0) return false;
  const struct timespec tick = {0, 10000000};
  for (double waited = 0; waited < seconds; waited += 0.01) {
    if (__atomic_load_n(state, __ATOMIC_ACQUIRE) != 0) {
      pthread_join(thread, NULL);
      return true;
    }
    nanosleep(&tick, NULL);
  }
  pthread_detach(thread);
  return false;
}

/* NVSHMEM_DISABLE_LOCAL_ONLY_PROXY set, unless it reads as false (0, n..., f...): with no remote transport
 * NVSHMEM then starts no proxy thread, and nvshmem_global_exit stops it without checking (a NULL dereference). */
static bool local_only_proxy_may_be_off(void) {
  const char* value = getenv("NVSHMEM_DISABLE_LOCAL_ONLY_PROXY");
  return value && value[0] && !strchr("0nNfF", value[0]);
}

/* At exit, with NVSHMEM still up: end it the non-collective way (see NOTES), once. Skipped, leaving the exit as
 * NVSHMEM makes it, where nvshmem_global_exit would not be safe: no proxy thread to stop (above), NVSHMEM not fully
 * initialised, or a device that is not idle within 5 s or has a CUDA error (the proxy's teardown frees device
 * memory, and NVSHMEM ends the process with exit(-1) on any CUDA error there). ep's kernels are done by then: a
 * local teardown publishes the fault to this rank too, and every wait of theirs is bounded. nvshmem_global_exit
 * marks the bootstrap down first and then joins the proxy thread; it too gets 5 s, so that a proxy that does not
 * stop cannot hang the exit (the bootstrap is marked down by then, so NVSHMEM's handlers do nothing). */
static void release_at_exit(void) {
  static int done = 0;
  if (done || !g_initialized) return;
  done = 1;
  if (local_only_proxy_may_be_off() || nvshmemx_init_status() < NVSHMEM_STATUS_IS_INITIALIZED) return;
  if (!finished_within(synchronize_device, &g_device_state, 5.0) || g_device_state < 0) return;
  (void)finished_within(end_nvshmem, &g_nvshmem_ended, 5.0);
}

/* release_at_exit relies on what NVSHMEM 3.4 does (above); another version's exit handlers are left alone. */
static bool exit_release_applies(void) {
  int major = 0, minor = 0, patch = 0;
  nvshmemx_vendor_get_version_info(&major, &minor, &patch);
  return major == 3 && minor == 4;
}

extern "C" int ep_tp_get_unique_id(void* id_bytes, char* err, size_t err_bytes) {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  int st = nvshmemx_get_uniqueid(&id);
  if (st != 0) {
    snprintf(err, err_bytes, "nvshmemx_get_uniqueid failed with %d", st);
    return st;
  }
  memcpy(id_bytes, &id, sizeof(id));
  return 0;
}

extern "C" int ep_tp_init(int rank, int num_ranks, const void* id_bytes, size_t heap_bytes, char* err,
                          size_t err_bytes) {
  if (g_initialized) {
    snprintf(err, err_bytes, "NVSHMEM is already initialised in this process (one group at a time)");
    return -1;
  }
  // The heap size must be known before init. NVLink multicast stays off unless the user asked otherwise.
  char heap[32];
  snprintf(heap, sizeof(heap), "%zu", heap_bytes);
  setenv("NVSHMEM_SYMMETRIC_SIZE", heap, 1);
  setenv("NVSHMEM_DISABLE_NVLS", "1", 0);

  nvshmemx_uniqueid_t id;
  memcpy(&id, id_bytes, sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int st = nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr);
  if (st != 0) {
    snprintf(err, err_bytes, "nvshmemx_set_attr_uniqueid_args(rank=%d, num_ranks=%d) failed with %d", rank,
             num_ranks, st);
    return st;
  }
  nvshmemx_init_init_attr_ver_only(attr);
  nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                NVSHMEM_VENDOR_PATCH_VERSION};
  int provided = 0;
  st = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
  if (st != 0) {
    snprintf(err, err_bytes,
             "NVSHMEM init by unique id failed with %d (rank %d of %d, heap %zu bytes); NVSHMEM_DEBUG=WARN says "
             "more",
             st, rank, num_ranks, heap_bytes);
    return st;
  }
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks) {
    snprintf(err, err_bytes, "NVSHMEM started as PE %d of %d, but the group asked for rank %d of %d",
             nvshmem_my_pe(), nvshmem_n_pes(), rank, num_ranks);
    nvshmem_finalize();
    return -1;
  }
  g_initialized = 1;
  cudaGetDevice(&g_device);
  if (++g_init_count > 1 && exit_release_applies()) (void)atexit(release_at_exit);
  return 0;
}

extern "C" void ep_tp_finalize(void) {
  if (!g_initialized) return;
  nvshmem_finalize();
  g_initialized = 0;
}

extern "C" int ep_tp_is_initialized(void) { return g_initialized; }

extern "C" void* ep_tp_calloc(size_t bytes) { return nvshmem_calloc(1, bytes); }

extern "C" void ep_tp_free(void* ptr) {
  if (ptr) nvshmem_free(ptr);
}

extern "C" void* ep_tp_peer_ptr(void* ptr, int pe) {
  if (pe == nvshmem_my_pe()) return ptr;
  return nvshmem_ptr(ptr, pe);
}

extern "C" void ep_tp_put(void* dst, const void* src, size_t bytes, int pe) { nvshmem_putmem(dst, src, bytes, pe); }

extern "C" void ep_tp_put_u64(void* dst, unsigned long long value, int pe) {
  nvshmem_uint64_p((uint64_t*)dst, (uint64_t)value, pe);
}

extern "C" void ep_tp_quiet(void) { nvshmem_quiet(); }
