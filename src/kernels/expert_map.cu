// expert_map.cu: ep_map_experts' kernel: each logical top-k pick becomes one physical slot among the live copies of
// its expert (include/ep.h, "Redundant experts").
//
// One thread per (token, slot): a pick reads its expert's row of the map twice (count the live copies, then take
// the j-th); rows are a few int32 and shared by many picks, so they stay in L1/L2. The rank mask is read once per
// block into shared memory, so that every pick of a block sees the same mask even while another stream's
// low-latency wait masks a peer.
#include "kernels/launch.h"
#include "kernels/common.cuh"

namespace ep {

constexpr int kExpertMapThreads = 256;
constexpr int kExpertMapMaxBlocks = 1024;

// Which side of the map a bad value came from (the fault's site).
enum ExpertMapFault { kBadLogicalIndex = 0, kBadSlot = 1 };

__global__ void __launch_bounds__(kExpertMapThreads) expert_map_kernel(ep_expert_map_launch_t p) {
  extern __shared__ uint8_t s_live[];  // [num_ranks] 1: this rank exchanges with rank r
  for (int r = threadIdx.x; r < p.num_ranks; r += blockDim.x) s_live[r] = !rank_masked(p.mask, p.rank, r);
  __syncthreads();
  const int experts_per_rank = p.num_experts / p.num_ranks;
  const long long pairs = (long long)p.num_tokens * p.num_topk;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < pairs; i += stride) {
    const int t = (int)(i / p.num_topk);
    const int64_t l = p.logical_topk[i];
    int64_t out = -1;
    if (l < -1 || l >= p.num_logical) {
      record_fault(p.error, EP_FAULT_BAD_EXPERT_MAP, p.rank, -1, kBadLogicalIndex, t, l);
    } else if (l >= 0) {
      const int32_t* row = p.slots + (size_t)l * p.max_copies;
      int live = 0;
      for (int c = 0; c < p.max_copies; ++c) {
        const int32_t s = row[c];
        if (s < -1 || s >= p.num_experts) {
          record_fault(p.error, EP_FAULT_BAD_EXPERT_MAP, p.rank, -1, kBadSlot, l, s);
        } else if (s >= 0) {
          live += s_live[s / experts_per_rank];
        }
      }
      if (live > 0) {
        int j = (int)(((long long)t + p.rank) % live);
        for (int c = 0; c < p.max_copies; ++c) {
          const int32_t s = row[c];
          if (s < 0 || s >= p.num_experts || !s_live[s / experts_per_rank]) continue;
          if (j-- == 0) {
            out = s;
            break;
          }
        }
      }
    }
    p.physical_topk[i] = out;
  }
}

}  // namespace ep

extern "C" cudaError_t ep_launch_expert_map(const ep_expert_map_launch_t* p, cudaStream_t stream) {
  const long long pairs = (long long)p->num_tokens * p->num_topk;
  long long blocks = (pairs + ep::kExpertMapThreads - 1) / ep::kExpertMapThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > ep::kExpertMapMaxBlocks) blocks = ep::kExpertMapMaxBlocks;
  ep::expert_map_kernel<<<(int)blocks, ep::kExpertMapThreads, (size_t)p->num_ranks, stream>>>(*p);
  return cudaGetLastError();
}
