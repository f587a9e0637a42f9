/* device_abi.h: what kernels and host code agree on outside a launch: the device error word (the fault codes, the
 * wait sites and the word itself) and the limits the kernels are built for, which the host checks calls against. */
#ifndef EP_KERNELS_DEVICE_ABI_H
#define EP_KERNELS_DEVICE_ABI_H

#include <stdbool.h>

#include "kernels/host_device.h"

/* Ranks of one NVLink domain: the intranode path's group, the internode path's ranks per node (per-rank arrays in
 * registers and shared memory are sized by it). */
#define EP_MAX_NVLINK_RANKS 8
/* Nodes of the internode path: its combine gives each source a lane of a warp, EP_MAX_NVLINK_RANKS local ranks and
 * EP_MAX_INTERNODE_NODES nodes, 32 in all. */
#define EP_MAX_INTERNODE_NODES 24
/* Tokens per rank of one round of a group of several nodes: the internode metadata packs token << 8 | rank mask in
 * an int, the token counted within its round. Calls of more run in rounds (internode_region.h). */
#define EP_INTERNODE_MAX_TOKENS_PER_RANK (1 << 23)

#ifdef __cplusplus
extern "C" {
#endif

/* ---- The device error word: pinned host memory that kernels write when they must stop. ---- */
typedef enum ep_device_fault {
  EP_FAULT_NONE = 0,
  EP_FAULT_BAD_EXPERT = 1,     /* value0 = token, value1 = the bad expert index */
  EP_FAULT_TIMEOUT = 2,        /* peer = the rank waited on, site = which wait */
  EP_FAULT_BAD_DATA = 3,       /* a self-check found wrong bytes: peer = source rank, value0 = offset */
  EP_FAULT_RECV_OVERFLOW = 4,  /* value0 = rows received, value1 = recv_capacity */
  EP_FAULT_PEER_FAILED = 5,    /* a peer published a fatal fault: peer = the origin rank, site = its wait site,
                                  value0 = its fault code, value1 = the rank it waited on (or -1) */
  EP_FAULT_ABORTED = 6,        /* published only: the origin aborted the group (ep_group_abort) */
  EP_FAULT_SHAPE_MISMATCH = 7, /* an LL dispatch whose shape differs between ranks: peer = the source rank, site =
                                  the field (ep_ll_shape_field_t, ll_region.h), value0 = the peer's value, value1 =
                                  this rank's */
  EP_FAULT_BAD_EXPERT_MAP = 8, /* ep_map_experts: site 0: value0 = token, value1 = its logical index outside
                                  [-1, L); site 1: value0 = logical expert, value1 = its slot outside [-1, E) */
} ep_device_fault_t;

/* A fault after which the group is failed: every wait of its kernels gives up at once and the host marks it failed.
 * The others (a bad expert index, a receive overflow, a bad expert map) are data faults, reported to the rank that
 * made them. */
static inline EP_HD bool ep_fault_is_fatal(int code) {
  return code == EP_FAULT_TIMEOUT || code == EP_FAULT_BAD_DATA || code == EP_FAULT_PEER_FAILED ||
         code == EP_FAULT_SHAPE_MISMATCH;
}

/* Where a device wait happens; ep_fault_site_name() gives the words used in messages. */
typedef enum ep_wait_site {
  EP_SITE_NONE = 0,
  EP_SITE_CHECK_SIGNAL = 1,  /* ep_group_check: waiting for a peer's put-with-signal */
  EP_SITE_CHECK_NVLINK = 2,  /* ep_group_check: waiting for a peer's NVLink stores */
  EP_SITE_BARRIER = 3,       /* device barrier across the group */
  EP_SITE_PREPARE_ACK = 4,   /* prepare: waiting for a peer to release our previous send lists */
  EP_SITE_PREPARE_COUNTS = 5, /* prepare: waiting for a peer's counts */
  EP_SITE_DISPATCH_ACK = 6,  /* dispatch: waiting for a peer to release our previous staged rows */
  EP_SITE_DISPATCH_STAGED = 7, /* dispatch: waiting for a peer's staged rows */
  EP_SITE_COMBINE_ACK = 8,   /* combine: waiting for a peer to finish reading the previous combine's rows */
  EP_SITE_COMBINE_STAGED = 9, /* combine: waiting for a peer's expert outputs */
  EP_SITE_LL_DISPATCH_ACK = 10,  /* LL dispatch send: waiting for a peer to finish receiving the half's last call */
  EP_SITE_LL_DISPATCH_RECV = 11, /* LL dispatch receive: waiting for a peer's token count */
  EP_SITE_LL_COMBINE_ACK = 12,   /* LL combine send: waiting for a peer to finish receiving the half's last call */
  EP_SITE_LL_COMBINE_RECV = 13,  /* LL combine receive: waiting for a peer's expert outputs */
  EP_SITE_PREPARE_META = 14,     /* internode prepare: metadata of the rail peer (source) never arrived */
  EP_SITE_PREPARE_RELAY = 15,    /* internode prepare: the forwarder (peer) never relayed a remote source's metadata */
  EP_SITE_META_FREE = 16,        /* internode prepare: the rail peer never released our previous metadata */
  EP_SITE_DISPATCH_RDMA = 17,    /* internode dispatch: rows of the rail peer (source) never arrived at me */
  EP_SITE_DISPATCH_RELAY = 18,   /* internode dispatch: the forwarder (peer) never relayed a remote chunk */
  EP_SITE_RDMA_FREE = 19,        /* internode dispatch: the rail peer never released its receive region */
  EP_SITE_FWD_ACK = 20,          /* internode dispatch: a local rank never finished pulling relayed rows */
  EP_SITE_COMBINE_PARTIAL = 21,  /* internode combine: a partial from the forwarder (peer) never arrived */
  EP_SITE_PARTIAL_FREE = 22,     /* internode combine: the rail peer (source) never released its partials */
  EP_SITE_COUNT
} ep_wait_site_t;

typedef struct ep_device_error {
  int code;          /* ep_device_fault_t; 0 while nothing went wrong */
  int peer;          /* rank involved, or -1 */
  int site;          /* ep_wait_site_t for timeouts */
  int rank;          /* the rank whose kernel recorded it */
  long long value0;  /* fault-specific, see ep_device_fault_t */
  long long value1;
  /* Where a fatal fault is published, set once the group's workspace exists and kept for the group's life
   * (clearing a reported data fault clears the fields above only). */
  unsigned long long* group_fault; /* this rank's group fault word (symmetric, at the workspace's start); NULL:
                                      nothing is published or watched */
  void** peer_bases;               /* device table: each rank's workspace mapped here, NULL where not NVLink */
  int num_ranks;
} ep_device_error_t;

/* ---- The group fault word: one 64-bit word per rank, at offset 0 of the group's symmetric workspace. ----
 * A rank whose kernel records a fatal fault writes it into every rank's word (NVLink peers by a store through
 * their mapping, others by a transport put), and every bounded device wait watches its own rank's word beside
 * its error word, so that one rank's failure ends every peer's waits at once. The word is zeroed only when a
 * group is made (the workspace is allocated zeroed): a failed group stays failed everywhere. Packing: the
 * origin's fault code (8 bits), its wait site (8 bits), the origin rank (16 bits), the rank it waited on + 1
 * (16 bits); 0 means healthy. */
#define EP_GROUP_FAULT_PACK(code, site, origin, peer)                                   \
  (((unsigned long long)(code)&0xffull) | (((unsigned long long)(site)&0xffull) << 8) | \
   (((unsigned long long)(origin)&0xffffull) << 16) | (((unsigned long long)((peer) + 1) & 0xffffull) << 32))
/* The group's control words at the start of its workspace: the group fault word, then the signals of the bounded
 * barrier (ep_launch_barrier) [num_ranks], then the rank's heartbeat (a 64-bit word that its waits on the rank mask
 * keep moving, so that a peer tells a rank that waits from a dead one: wait_or_mask, common.cuh); ep_group_check's
 * blocks follow. */
#define EP_BARRIER_SIGNALS_OFFSET 8
#define EP_HEARTBEAT_OFFSET(num_ranks) (EP_BARRIER_SIGNALS_OFFSET + 8 * (size_t)(num_ranks))
#define EP_CONTROL_BYTES(num_ranks) (128 * ((EP_HEARTBEAT_OFFSET(num_ranks) + 8 + 127) / 128))
#define EP_GROUP_FAULT_CODE(word) ((int)((word)&0xff))
#define EP_GROUP_FAULT_SITE(word) ((int)(((word) >> 8) & 0xff))
#define EP_GROUP_FAULT_ORIGIN(word) ((int)(((word) >> 16) & 0xffff))
#define EP_GROUP_FAULT_PEER(word) ((int)(((word) >> 32) & 0xffff) - 1)

const char* ep_fault_site_name(int site);

#ifdef __cplusplus
}
#endif

#endif /* EP_KERNELS_DEVICE_ABI_H */
