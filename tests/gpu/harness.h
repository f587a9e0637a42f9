/* harness.h: what a GPU test (or the benchmark) needs to run as one rank of ep_launch.
 *
 * ep_launch (tools/ep_launch.c) starts the same program once per rank with EP_LAUNCH_RANK,
 * EP_LAUNCH_NUM_RANKS and EP_LAUNCH_DIR set. Ranks swap small blobs (unique ids, seeds) through files in that
 * directory: the root writes NAME atomically, the others wait for it. */
#ifndef EP_TESTS_HARNESS_H
#define EP_TESTS_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "ep.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct harness {
  int rank, num_ranks;
  int cuda_device;      /* rank % number of visible devices */
  int num_devices;
  const char* dir;      /* EP_LAUNCH_DIR */
} harness_t;

/* Read the launcher's environment, pick this rank's GPU. Returns 0; or 77 when no GPU is visible or there are
 * fewer GPUs than ranks (the test should exit with it: a skip; one line says which); or 1 on a bad environment.
 * With EP_TEST_SHARE_GPU=1, ranks share GPUs (rank % devices) instead of skipping: for correctness runs under CUDA
 * MPS only (scripts/shared_gpu.sh), where the ranks' kernels run side by side; without MPS, kernels that wait for
 * each other would time out. */
int harness_init(harness_t* h);

/* Whether ranks share a GPU (more ranks than visible GPUs: CUDA MPS, EP_TEST_SHARE_GPU=1). */
int harness_shares_gpu(const harness_t* h);

/* 77 (a skip, with a line saying why) when the run has fewer than `min_ranks` ranks, else 0. */
int harness_need_ranks(const harness_t* h, int min_ranks);

/* `root` publishes `bytes`; every other rank waits (up to 120 s) and reads them. Returns 0 on success. */
int harness_share(const harness_t* h, const char* name, void* bytes, size_t len, int root);

/* All ranks arrive before any leaves (file based, slow: for setup only). Returns 0 on success. */
int harness_barrier(const harness_t* h, const char* name);

/* Run this program again as `PROGRAM CASE` in a fresh process on every rank (their files in the launch folder's
 * subfolder CASE) and return its exit status (128 + the signal if a signal ended it). For a case that leaves the
 * group torn down on its rank alone (a fatal fault, ep_group_abort): NVSHMEM stays initialised until the process
 * exits, and NVSHMEM 3.4.5 registers an exit handler at each initialisation, so a process that made a group
 * before would run two; the second calls into the bootstrap plugin the first unloaded, and the process dies by
 * SIGSEGV at exit (seen on H100, a test of 3 groups). A fresh process has one handler and exits cleanly. */
int harness_run_case(const harness_t* h, const char* case_name);

/* Rank 0 makes a unique id, shares it, and every rank creates the group on its GPU. */
ep_status_t harness_group_create(const harness_t* h, const ep_group_config_t* config, ep_group_t* group);

/* A fresh seed for this run, the same on every rank: EP_TEST_SEED if set, else from the clock on rank 0. Printed
 * so a failure can be replayed. */
uint64_t harness_seed(const harness_t* h, const char* name);

/* Deterministic random numbers (splitmix64), the same on every rank for the same state. */
uint64_t harness_rand(uint64_t* state);
double harness_uniform(uint64_t* state); /* [0, 1) */

#ifdef __cplusplus
}
#endif

#endif /* EP_TESTS_HARNESS_H */
