// nvshmem_host.cu: the host half of the transport seam, on NVSHMEM 3.4.
//
// NOTES: NVSHMEM's public init wrapper exits the process on failure; we call the status-returning
// `nvshmemi_init_thread` (the same function the wrapper calls, from libnvshmem_device.a) so that a failed init
// becomes an error message instead.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nvshmem.h>
#include <nvshmemx.h>

#include "transport/transport.h"

static_assert(sizeof(nvshmemx_uniqueid_t) == EP_TP_UNIQUE_ID_BYTES, "unique id size changed in NVSHMEM");

static int g_initialized = 0;

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
