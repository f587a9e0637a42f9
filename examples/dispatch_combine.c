/* dispatch_combine.c: the smallest complete use of ep's C API, as a program of its own.
 *
 * Every rank routes its tokens to random experts, dispatches them, applies an "expert" (here: the identity),
 * combines the results back and checks that every channel of every token came back multiplied by the number of
 * ranks the token visited.
 *
 * One process per GPU, all on this host. Rank 0 makes the group's unique id and hands it to the other ranks
 * through a file in a folder they share (a fresh folder for each run):
 *
 *   example_dispatch_combine RANK NUM_RANKS DIR   e.g. d=$(mktemp -d); for r in 0 1; do
 *                                                        example_dispatch_combine $r 2 $d & done; wait
 *   ep_launch -n 2 -- example_dispatch_combine    the launcher sets EP_LAUNCH_RANK, EP_LAUNCH_NUM_RANKS and
 *                                                 EP_LAUNCH_DIR (a fresh folder) for each rank
 *
 * Any other channel works as well (MPI_Bcast, a socket, torch.distributed): the id is EP_UNIQUE_ID_BYTES bytes.
 * Built against an installed ep:  cc -std=c11 dispatch_combine.c $(pkg-config --cflags --libs ep)
 * Exit status: 0 when every token came back right; 1 on a failure; 2 on bad arguments; 77 when no GPU is visible. */
#define _POSIX_C_SOURCE 200809L /* getpid, nanosleep */

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

#include <ep.h>

enum { kTokens = 64, kHidden = 1024, kTopk = 4, kExpertsPerRank = 8, kWaitSeconds = 120 };

#define TRY(call)                                                                                 \
  do {                                                                                            \
    ep_status_t st_ = (call);                                                                     \
    if (st_ != EP_STATUS_SUCCESS) {                                                               \
      fprintf(stderr, "%s failed: %s: %s\n", #call, ep_status_string(st_), ep_last_error(group)); \
      return 1;                                                                                   \
    }                                                                                             \
  } while (0)

#define CUDA_TRY(call)                                                     \
  do {                                                                     \
    cudaError_t err_ = (call);                                             \
    if (err_ != cudaSuccess) {                                             \
      fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(err_)); \
      return 1;                                                            \
    }                                                                      \
  } while (0)

/* Rank 0 writes the id to DIR/ep_unique_id under a temporary name and renames it into place, so that no rank
 * reads half a file; every other rank waits for the file, up to kWaitSeconds. Returns 0 on success. */
static int share_unique_id(const char* dir, int rank, ep_unique_id_t* id) {
  char path[4096], tmp[4200];
  if (snprintf(path, sizeof(path), "%s/ep_unique_id", dir) >= (int)sizeof(path)) {
    fprintf(stderr, "folder name too long: %s\n", dir);
    return 1;
  }
  if (rank == 0) {
    ep_status_t st = ep_get_unique_id(id);
    if (st != EP_STATUS_SUCCESS) {
      fprintf(stderr, "ep_get_unique_id failed: %s: %s\n", ep_status_string(st), ep_last_error(NULL));
      return 1;
    }
    snprintf(tmp, sizeof(tmp), "%s.%ld.tmp", path, (long)getpid());
    FILE* f = fopen(tmp, "wb");
    int ok = f && fwrite(id, sizeof(*id), 1, f) == 1;
    ok = f && fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
      perror(tmp);
      return 1;
    }
    return 0;
  }
  const struct timespec pause = {0, 10 * 1000 * 1000};
  for (int i = 0; i < kWaitSeconds * 100; ++i) {
    FILE* f = fopen(path, "rb");
    if (f) {
      size_t got = fread(id, sizeof(*id), 1, f);
      fclose(f);
      if (got == 1) return 0;
    }
    nanosleep(&pause, NULL);
  }
  fprintf(stderr, "rank %d: no %s after %d s: is rank 0 running with the same folder?\n", rank, path, kWaitSeconds);
  return 1;
}

static int parse_count(const char* s, int* out) {
  char* end = NULL;
  long v = s ? strtol(s, &end, 10) : -1;
  if (!s || !*s || *end || v < 0 || v > INT_MAX) return 1;
  *out = (int)v;
  return 0;
}

/* bf16 of a small integer (exact): the top 16 bits of the float. */
static uint16_t bf16_of(int v) {
  float f = (float)v;
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

/* Channel c of token t on rank r: small integers that differ from channel to channel, so that a row or a channel
 * out of place shows. Sums of up to 8 of them stay exact in bf16. */
static int input_value(int r, int t, int c) { return (5 * r + 3 * t + c) % 16; }

/* Deterministic random numbers (splitmix64). */
static uint64_t next_random(uint64_t* s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

int main(int argc, char** argv) {
  const char *rank_arg = getenv("EP_LAUNCH_RANK"), *ranks_arg = getenv("EP_LAUNCH_NUM_RANKS");
  const char* dir = getenv("EP_LAUNCH_DIR");
  if (argc == 4) {
    rank_arg = argv[1];
    ranks_arg = argv[2];
    dir = argv[3];
  }
  int rank = -1, num_ranks = 0;
  if ((argc != 1 && argc != 4) || parse_count(rank_arg, &rank) || parse_count(ranks_arg, &num_ranks) || !dir ||
      num_ranks < 1 || rank >= num_ranks) {
    fprintf(stderr,
            "usage: %s RANK NUM_RANKS DIR   (0 <= RANK < NUM_RANKS; DIR a folder all ranks share)\n"
            "   or: ep_launch -n NUM_RANKS -- %s\n",
            argv[0], argv[0]);
    return 2;
  }

  /* 1. The group: rank 0's unique id on every rank; then collective, sized for the largest shape we will use. */
  ep_unique_id_t id;
  memset(&id, 0, sizeof(id));
  if (share_unique_id(dir, rank, &id) != 0) return 1;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 1) {
    printf("rank %d: no GPU visible to this process; nothing to run\n", rank);
    return 77;
  }
  const int device = rank % devices;
  ep_group_t group = NULL;
  ep_group_config_t config = EP_GROUP_CONFIG_INIT;
  const int num_experts = kExpertsPerRank * num_ranks;
  config.num_experts = num_experts;
  config.hidden = kHidden;
  config.max_tokens_per_rank = kTokens;
  config.max_topk = kTopk;
  if (num_ranks > devices) {
    /* Ranks share GPUs (under CUDA MPS): a kernel waits for its peers' kernels, so every rank's blocks must be
     * resident at once; each rank keeps to half the SMs the GPU reports to it. */
    int sms = 0;
    CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    config.max_sms = sms / 2 > 0 ? sms / 2 : 1;
  }
  TRY(ep_group_create(&group, &id, rank, num_ranks, device, &config));
  cudaStream_t stream;
  CUDA_TRY(cudaStreamCreate(&stream));

  /* 2. Inputs: kTopk distinct random experts per token; the same routing on every run of this rank. */
  uint64_t seed = 0x5eed0000ull + (uint64_t)rank;
  int64_t idx[kTokens * kTopk];
  uint16_t* x = malloc(sizeof(uint16_t) * kTokens * kHidden);
  uint16_t* out = malloc(sizeof(uint16_t) * kTokens * kHidden);
  if (!x || !out) return 1;
  for (int t = 0; t < kTokens; ++t) {
    for (int k = 0; k < kTopk; ++k) {
      int64_t e;
      int dup;
      do {
        e = (int64_t)(next_random(&seed) % (uint64_t)num_experts);
        dup = 0;
        for (int j = 0; j < k; ++j) dup |= idx[t * kTopk + j] == e;
      } while (dup);
      idx[t * kTopk + k] = e;
    }
    for (int c = 0; c < kHidden; ++c) x[t * kHidden + c] = bf16_of(input_value(rank, t, c));
  }
  int64_t* d_idx;
  void *d_x, *d_out;
  CUDA_TRY(cudaMalloc((void**)&d_idx, sizeof(idx)));
  CUDA_TRY(cudaMalloc(&d_x, sizeof(uint16_t) * kTokens * kHidden));
  CUDA_TRY(cudaMalloc(&d_out, sizeof(uint16_t) * kTokens * kHidden));
  CUDA_TRY(cudaMemcpy(d_idx, idx, sizeof(idx), cudaMemcpyHostToDevice));
  CUDA_TRY(cudaMemcpy(d_x, x, sizeof(uint16_t) * kTokens * kHidden, cudaMemcpyHostToDevice));

  /* 3. Prepare (eager form): agree on the routing; learn how many rows this rank receives. */
  ep_handle_t handle;
  TRY(ep_handle_create(group, &handle));
  int num_recv = 0;
  ep_dispatch_prepare_args_t pa = EP_DISPATCH_PREPARE_ARGS_INIT;
  pa.topk_idx = d_idx;
  pa.num_tokens = kTokens;
  pa.num_topk = kTopk;
  pa.num_experts = num_experts;
  pa.num_recv_tokens = &num_recv;
  TRY(ep_dispatch_prepare(group, handle, &pa, stream));

  /* 4. Dispatch the rows; an identity "expert"; combine them back (fp32 sum in rank order). */
  void* d_recv;
  CUDA_TRY(cudaMalloc(&d_recv, sizeof(uint16_t) * (size_t)(num_recv > 0 ? num_recv : 1) * kHidden));
  ep_dispatch_args_t da = EP_DISPATCH_ARGS_INIT;
  da.x = d_x;
  da.x_dtype = EP_BF16;
  da.hidden = kHidden;
  da.recv_capacity = num_recv;
  da.recv_x = d_recv;
  TRY(ep_dispatch(group, handle, &da, stream));
  ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
  ca.x = d_recv;
  ca.hidden = kHidden;
  ca.combined_x = d_out;
  TRY(ep_combine(group, handle, &ca, stream));
  CUDA_TRY(cudaStreamSynchronize(stream));
  ep_status_t async_status;
  TRY(ep_get_async_error(group, &async_status));
  TRY(async_status);

  /* 5. Check every channel: out[t][c] = x[t][c] * (number of ranks token t went to). */
  CUDA_TRY(cudaMemcpy(out, d_out, sizeof(uint16_t) * kTokens * kHidden, cudaMemcpyDeviceToHost));
  int bad_tokens = 0;
  for (int t = 0; t < kTokens; ++t) {
    int ranks = 0;
    for (int r = 0; r < num_ranks; ++r) {
      int hit = 0;
      for (int k = 0; k < kTopk; ++k) hit |= idx[t * kTopk + k] / kExpertsPerRank == r;
      ranks += hit;
    }
    int bad_channels = 0, first_bad = -1;
    for (int c = 0; c < kHidden; ++c) {
      if (out[t * kHidden + c] != bf16_of(input_value(rank, t, c) * ranks)) {
        if (first_bad < 0) first_bad = c;
        ++bad_channels;
      }
    }
    if (bad_channels) {
      if (bad_tokens == 0) {
        fprintf(stderr, "rank %d: token %d: %d wrong channels, the first %d: bf16 bits 0x%04x, expected 0x%04x\n", rank,
                t, bad_channels, first_bad, out[t * kHidden + first_bad],
                bf16_of(input_value(rank, t, first_bad) * ranks));
      }
      ++bad_tokens;
    }
  }
  printf("rank %d: %d tokens out, %d rows received, %d tokens wrong\n", rank, kTokens, num_recv, bad_tokens);

  ep_handle_destroy(handle);
  cudaFree(d_idx);
  cudaFree(d_x);
  cudaFree(d_out);
  cudaFree(d_recv);
  free(x);
  free(out);
  cudaStreamDestroy(stream);
  TRY(ep_group_destroy(group));
  return bad_tokens ? 1 : 0;
}
