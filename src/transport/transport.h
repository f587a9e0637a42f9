/* transport.h: the host half of the substrate seam (C linkage). NVSHMEM lives behind it, in nvshmem_host.cu;
 * the device half is transport.cuh. Nothing outside src/transport includes an NVSHMEM header. */
#ifndef EP_TRANSPORT_H
#define EP_TRANSPORT_H

#include <stddef.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EP_TP_UNIQUE_ID_BYTES 128

/* Each returns 0 on success, else non-zero with a message in `err` (err_bytes long). */
int ep_tp_get_unique_id(void* id_bytes, char* err, size_t err_bytes);
int ep_tp_init(int rank, int num_ranks, const void* id_bytes, size_t heap_bytes, char* err, size_t err_bytes);
void ep_tp_finalize(void);
int ep_tp_is_initialized(void);

/* Symmetric allocation: collective, same size on every rank; zeroed. NULL on failure. */
void* ep_tp_calloc(size_t bytes);
void ep_tp_free(void* ptr);

/* This rank's view of `ptr` (symmetric) on `pe` for loads/stores, or NULL when `pe` is not NVLink-reachable. */
void* ep_tp_peer_ptr(void* ptr, int pe);

/* Host-initiated put of `bytes` from symmetric `src` (this rank) to symmetric `dst` on `pe`; complete at the next
 * barrier. */
void ep_tp_put(void* dst, const void* src, size_t bytes, int pe);

/* Host-initiated store of one 64-bit word into symmetric `dst` on `pe` (complete at the next quiet). */
void ep_tp_put_u64(void* dst, unsigned long long value, int pe);

/* Complete this rank's host-initiated puts (before a device barrier makes them visible to peers). */
void ep_tp_quiet(void);

#ifdef __cplusplus
}
#endif

#endif /* EP_TRANSPORT_H */
