// layout.cu: from `topk_idx`, count tokens per rank, node and expert, and mark which ranks each token goes to.
//
// One launch, no memset: every block counts its slice of tokens into shared-memory histograms, one thread per
// (token, top-k slot) so that loads are coalesced and no thread walks a chain of dependent loads; it writes the
// histograms to its own row of a scratch matrix, and the last block to finish sums the rows in block order
// (deterministic), writes the outputs and resets the arrival counter for the next call.
#include "kernels/launch.h"
#include "kernels/common.cuh"

namespace ep {

constexpr int kLayoutThreads = 512;
constexpr int kLayoutMaxBlocks = 64;

// Scratch: [0] arrival counter | [1..] per block: experts, ranks, nodes.
static inline __host__ __device__ size_t layout_row_ints(int num_experts, int num_ranks) {
  return (size_t)num_experts + 2 * (size_t)num_ranks;
}

__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(ep_layout_launch_t p) {
  extern __shared__ int smem[];
  const int num_nodes = p.num_ranks / p.ranks_per_node;
  const int experts_per_rank = p.num_experts / p.num_ranks;
  int* s_expert = smem;
  int* s_rank = s_expert + p.num_experts;
  int* s_node = s_rank + p.num_ranks;
  const int row_ints = (int)layout_row_ints(p.num_experts, p.num_ranks);
  for (int i = threadIdx.x; i < row_ints; i += blockDim.x) smem[i] = 0;

  // This block's tokens.
  const int per_block = (p.num_tokens + gridDim.x - 1) / gridDim.x;
  const int t_begin = min(p.num_tokens, (int)blockIdx.x * per_block);
  const int t_end = min(p.num_tokens, t_begin + per_block);

  // Zero this block's rows of is_token_in_rank with wide stores (the region may be unaligned at its ends).
  {
    uint8_t* base = p.is_token_in_rank + (size_t)t_begin * p.num_ranks;
    size_t bytes = (size_t)(t_end - t_begin) * p.num_ranks;
    size_t head = (16 - ((uintptr_t)base & 15)) & 15;
    if (head > bytes) head = bytes;
    for (size_t i = threadIdx.x; i < head; i += blockDim.x) base[i] = 0;
    size_t n16 = (bytes - head) / 16;
    uint4* body = (uint4*)(base + head);
    for (size_t i = threadIdx.x; i < n16; i += blockDim.x) body[i] = make_uint4(0, 0, 0, 0);
    for (size_t i = head + n16 * 16 + threadIdx.x; i < bytes; i += blockDim.x) base[i] = 0;
  }
  __syncthreads();

  // One thread per (token, slot). A token counts once per expert, rank and node: only the first slot that names
  // an expert (rank, node) counts it, and every slot of a rank marks is_token_in_rank (the same byte, 1).
  const int K = p.num_topk;
  for (int i = t_begin * K + threadIdx.x; i < t_end * K; i += blockDim.x) {
    const int t = i / K, k = i - t * K;
    const int64_t* row = p.topk_idx + (size_t)t * K;
    const int64_t e = row[k];
    if (e == -1) continue;
    if (e < -1 || e >= p.num_experts) {
      record_fault(p.error, EP_FAULT_BAD_EXPERT, p.rank, -1, 0, t, e);
      continue;
    }
    const int r = (int)(e / experts_per_rank), n = r / p.ranks_per_node;
    bool first_expert = true, first_rank = true, first_node = true;
    for (int j = 0; j < k; ++j) {  // earlier slots of the same token: L1 hits
      const int64_t f = row[j];
      if (f < 0 || f >= p.num_experts) continue;
      const int fr = (int)(f / experts_per_rank);
      first_expert &= f != e;
      first_rank &= fr != r;
      first_node &= fr / p.ranks_per_node != n;
    }
    if (first_expert) atomicAdd(&s_expert[e], 1);
    if (first_rank) {
      atomicAdd(&s_rank[r], 1);
      p.is_token_in_rank[(size_t)t * p.num_ranks + r] = 1;
    }
    if (first_node) atomicAdd(&s_node[n], 1);
  }
  __syncthreads();

  // Publish this block's histograms, then let the last block reduce them.
  int* rows = p.scratch + 1;
  for (int i = threadIdx.x; i < row_ints; i += blockDim.x) rows[(size_t)blockIdx.x * row_ints + i] = smem[i];
  __threadfence();
  __shared__ bool s_is_last;
  __syncthreads();
  if (threadIdx.x == 0) s_is_last = atomicAdd(&p.scratch[0], 1) == (int)gridDim.x - 1;
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < row_ints; i += blockDim.x) {
    int sum = 0;
    for (int b = 0; b < (int)gridDim.x; ++b) sum += ((volatile int*)rows)[(size_t)b * row_ints + i];
    if (i < p.num_experts) {
      p.num_tokens_per_expert[i] = sum;
    } else if (i < p.num_experts + p.num_ranks) {
      p.num_tokens_per_rank[i - p.num_experts] = sum;
    } else if (i < p.num_experts + p.num_ranks + num_nodes && p.num_tokens_per_node) {
      p.num_tokens_per_node[i - p.num_experts - p.num_ranks] = sum;
    }
  }
  if (threadIdx.x == 0) p.scratch[0] = 0;
}

}  // namespace ep

extern "C" size_t ep_layout_scratch_ints(int num_experts, int num_ranks) {
  return 1 + (size_t)ep::kLayoutMaxBlocks * ep::layout_row_ints(num_experts, num_ranks);
}

extern "C" size_t ep_layout_smem_bytes(int num_experts, int num_ranks) {
  return ep::layout_row_ints(num_experts, num_ranks) * sizeof(int);
}

extern "C" cudaError_t ep_launch_layout(const ep_layout_launch_t* p, cudaStream_t stream) {
  // About one (token, slot) pair per thread.
  int blocks = (int)(((long long)p->num_tokens * p->num_topk + ep::kLayoutThreads - 1) / ep::kLayoutThreads);
  if (blocks < 1) blocks = 1;
  if (blocks > ep::kLayoutMaxBlocks) blocks = ep::kLayoutMaxBlocks;
  size_t smem = ep_layout_smem_bytes(p->num_experts, p->num_ranks);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(ep::layout_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  ep::layout_kernel<<<blocks, ep::kLayoutThreads, smem, stream>>>(*p);
  return cudaGetLastError();
}
