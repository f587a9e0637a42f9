/* nccl_baseline.cu: see nccl_baseline.h. */
#include "nccl_baseline.h"

#include <stdlib.h>

static int grid_for(int items) { return items < 65535 ? items : 65535; }

/* ------------------------------------------------------------------------------------------------------------
 * Plan
 * ------------------------------------------------------------------------------------------------------------ */
void nccl_plan_create(nccl_plan_t* plan, const uint8_t* is_token_in_rank, int num_tokens, int rank, int num_ranks,
                      ncclComm_t comm, cudaStream_t stream) {
  const int R = num_ranks;
  plan->rank = rank;
  plan->num_ranks = R;
  plan->num_tokens = num_tokens;
  plan->send_count = (int*)calloc(R, sizeof(int));
  plan->send_offset = (int*)calloc(R, sizeof(int));
  plan->recv_count = (int*)calloc(R, sizeof(int));
  plan->recv_offset = (int*)calloc(R, sizeof(int));
  int* token_rows = (int*)malloc(((size_t)num_tokens * R + 1) * sizeof(int));
  if (!plan->send_count || !plan->send_offset || !plan->recv_count || !plan->recv_offset || !token_rows)
    bench_die(__FILE__, __LINE__, "malloc", "out of host memory", "");

  for (int t = 0; t < num_tokens; ++t)
    for (int d = 0; d < R; ++d) plan->send_count[d] += is_token_in_rank[(size_t)t * R + d] != 0;
  plan->num_send_rows = 0;
  for (int d = 0; d < R; ++d) {
    plan->send_offset[d] = plan->num_send_rows;
    plan->num_send_rows += plan->send_count[d];
  }
  /* Each destination's segment lists its tokens in ascending order. */
  int* send_token = (int*)malloc(((size_t)plan->num_send_rows + 1) * sizeof(int));
  if (!send_token) bench_die(__FILE__, __LINE__, "malloc", "out of host memory", "");
  for (int d = 0; d < R; ++d) {
    int row = plan->send_offset[d];
    for (int t = 0; t < num_tokens; ++t) {
      const int in_rank = is_token_in_rank[(size_t)t * R + d] != 0;
      token_rows[(size_t)t * R + d] = in_rank ? row : -1;
      if (in_rank) send_token[row++] = t;
    }
  }
  CUDA_OK(cudaMalloc(&plan->d_send_token, ((size_t)plan->num_send_rows + 1) * sizeof(int)));
  CUDA_OK(cudaMalloc(&plan->d_token_rows, ((size_t)num_tokens * R + 1) * sizeof(int)));
  CUDA_OK(cudaMemcpyAsync(plan->d_send_token, send_token, (size_t)plan->num_send_rows * sizeof(int),
                          cudaMemcpyHostToDevice, stream));
  CUDA_OK(cudaMemcpyAsync(plan->d_token_rows, token_rows, (size_t)num_tokens * R * sizeof(int),
                          cudaMemcpyHostToDevice, stream));

  /* The counts exchange a user makes before the data exchange (here once, outside the timing). */
  int *d_send_count, *d_recv_count;
  CUDA_OK(cudaMalloc(&d_send_count, R * sizeof(int)));
  CUDA_OK(cudaMalloc(&d_recv_count, R * sizeof(int)));
  CUDA_OK(cudaMemcpyAsync(d_send_count, plan->send_count, R * sizeof(int), cudaMemcpyHostToDevice, stream));
  NCCL_OK(ncclGroupStart());
  for (int p = 0; p < R; ++p) {
    NCCL_OK(ncclSend(d_send_count + p, 1, ncclInt32, p, comm, stream));
    NCCL_OK(ncclRecv(d_recv_count + p, 1, ncclInt32, p, comm, stream));
  }
  NCCL_OK(ncclGroupEnd());
  CUDA_OK(cudaMemcpyAsync(plan->recv_count, d_recv_count, R * sizeof(int), cudaMemcpyDeviceToHost, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  free(send_token);
  free(token_rows);
  CUDA_OK(cudaFree(d_send_count));
  CUDA_OK(cudaFree(d_recv_count));
  plan->num_recv_rows = 0;
  for (int s = 0; s < R; ++s) {
    plan->recv_offset[s] = plan->num_recv_rows;
    plan->num_recv_rows += plan->recv_count[s];
  }
}

void nccl_plan_destroy(nccl_plan_t* plan) {
  free(plan->send_count);
  free(plan->send_offset);
  free(plan->recv_count);
  free(plan->recv_offset);
  CUDA_OK(cudaFree(plan->d_send_token));
  CUDA_OK(cudaFree(plan->d_token_rows));
}

/* ------------------------------------------------------------------------------------------------------------
 * Permute: one block per row (grid-stride), in the widest unit the row size allows
 * ------------------------------------------------------------------------------------------------------------ */
template <typename Unit>
__global__ void permute_rows(const Unit* __restrict__ rows, Unit* __restrict__ send_rows,
                             const int* __restrict__ send_token, int num_send_rows, int units_per_row) {
  for (int r = blockIdx.x; r < num_send_rows; r += gridDim.x) {
    const Unit* src = rows + (size_t)send_token[r] * units_per_row;
    Unit* dst = send_rows + (size_t)r * units_per_row;
    for (int i = threadIdx.x; i < units_per_row; i += blockDim.x) dst[i] = src[i];
  }
}

void nccl_permute(const nccl_plan_t* plan, const void* rows, void* send_rows, size_t row_bytes, cudaStream_t stream) {
  const int n = plan->num_send_rows;
  if (n == 0) return;
  const int grid = grid_for(n), block = 256;
  const uintptr_t align = (uintptr_t)rows | (uintptr_t)send_rows | (uintptr_t)row_bytes;
  if (align % 16 == 0)
    permute_rows<uint4><<<grid, block, 0, stream>>>((const uint4*)rows, (uint4*)send_rows, plan->d_send_token, n,
                                                    (int)(row_bytes / 16));
  else if (align % 4 == 0)
    permute_rows<uint32_t><<<grid, block, 0, stream>>>((const uint32_t*)rows, (uint32_t*)send_rows,
                                                       plan->d_send_token, n, (int)(row_bytes / 4));
  else
    permute_rows<uint8_t><<<grid, block, 0, stream>>>((const uint8_t*)rows, (uint8_t*)send_rows, plan->d_send_token,
                                                      n, (int)row_bytes);
  LAUNCH_OK();
}

/* ------------------------------------------------------------------------------------------------------------
 * Exchange
 * ------------------------------------------------------------------------------------------------------------ */
void nccl_exchange(const nccl_plan_t* plan, const void* send, void* recv, size_t row_bytes, int inverse,
                   ncclComm_t comm, cudaStream_t stream) {
  /* Forward sends send-layout segments and receives receive-layout ones; inverse swaps the two layouts. */
  const int* out_count = inverse ? plan->recv_count : plan->send_count;
  const int* out_offset = inverse ? plan->recv_offset : plan->send_offset;
  const int* in_count = inverse ? plan->send_count : plan->recv_count;
  const int* in_offset = inverse ? plan->send_offset : plan->recv_offset;
  NCCL_OK(ncclGroupStart());
  for (int p = 0; p < plan->num_ranks; ++p) {
    if (out_count[p] > 0)
      NCCL_OK(ncclSend((const char*)send + (size_t)out_offset[p] * row_bytes, (size_t)out_count[p] * row_bytes,
                       ncclUint8, p, comm, stream));
    if (in_count[p] > 0)
      NCCL_OK(ncclRecv((char*)recv + (size_t)in_offset[p] * row_bytes, (size_t)in_count[p] * row_bytes, ncclUint8, p,
                       comm, stream));
  }
  NCCL_OK(ncclGroupEnd());
}

/* ------------------------------------------------------------------------------------------------------------
 * Combine reduce: one block per token (grid-stride), Vec channels per thread
 * ------------------------------------------------------------------------------------------------------------ */
template <int Vec>
__global__ void reduce_token_rows(const __nv_bfloat16* __restrict__ back_rows, const int* __restrict__ token_rows,
                                  int num_tokens, int num_ranks, int hidden, __nv_bfloat16* __restrict__ out) {
  for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int* rows_of_token = token_rows + (size_t)t * num_ranks;
    for (int c = threadIdx.x * Vec; c < hidden; c += blockDim.x * Vec) {
      float acc[Vec];
      for (int j = 0; j < Vec; ++j) acc[j] = 0.0f;
      for (int d = 0; d < num_ranks; ++d) {
        const int row = rows_of_token[d];
        if (row < 0) continue;
        const __nv_bfloat16* src = back_rows + (size_t)row * hidden + c;
        if (Vec == 8) {
          const uint4 packed = *(const uint4*)src;
          const __nv_bfloat16* v = (const __nv_bfloat16*)&packed;
          for (int j = 0; j < Vec; ++j) acc[j] += __bfloat162float(v[j]);
        } else {
          for (int j = 0; j < Vec; ++j) acc[j] += __bfloat162float(src[j]);
        }
      }
      __nv_bfloat16* dst = out + (size_t)t * hidden + c;
      if (Vec == 8) {
        uint4 packed;
        __nv_bfloat16* v = (__nv_bfloat16*)&packed;
        for (int j = 0; j < Vec; ++j) v[j] = __float2bfloat16_rn(acc[j]);
        *(uint4*)dst = packed;
      } else {
        for (int j = 0; j < Vec; ++j) dst[j] = __float2bfloat16_rn(acc[j]);
      }
    }
  }
}

void nccl_combine_reduce(const nccl_plan_t* plan, const __nv_bfloat16* back_rows, int hidden, __nv_bfloat16* out,
                         cudaStream_t stream) {
  const int n = plan->num_tokens;
  if (n == 0) return;
  const int grid = grid_for(n), block = 256;
  const uintptr_t align = (uintptr_t)back_rows | (uintptr_t)out;
  if (hidden % 8 == 0 && align % 16 == 0)
    reduce_token_rows<8><<<grid, block, 0, stream>>>(back_rows, plan->d_token_rows, n, plan->num_ranks, hidden, out);
  else
    reduce_token_rows<1><<<grid, block, 0, stream>>>(back_rows, plan->d_token_rows, n, plan->num_ranks, hidden, out);
  LAUNCH_OK();
}

/* ------------------------------------------------------------------------------------------------------------
 * The BF16 user path
 * ------------------------------------------------------------------------------------------------------------ */
static __nv_bfloat16* alloc_rows(int rows, int hidden) {
  void* p = NULL;
  CUDA_OK(cudaMalloc(&p, ((size_t)rows + 1) * hidden * sizeof(__nv_bfloat16)));
  return (__nv_bfloat16*)p;
}

void nccl_user_create(nccl_user_t* u, const uint8_t* is_token_in_rank, int num_tokens, int hidden, int rank,
                      int num_ranks, ncclComm_t comm, cudaStream_t stream) {
  nccl_plan_create(&u->plan, is_token_in_rank, num_tokens, rank, num_ranks, comm, stream);
  u->hidden = hidden;
  u->send_rows = alloc_rows(u->plan.num_send_rows, hidden);
  u->recv_rows = alloc_rows(u->plan.num_recv_rows, hidden);
  u->back_rows = alloc_rows(u->plan.num_send_rows, hidden);
  u->out = alloc_rows(num_tokens, hidden);
}

void nccl_user_destroy(nccl_user_t* u) {
  nccl_plan_destroy(&u->plan);
  CUDA_OK(cudaFree(u->send_rows));
  CUDA_OK(cudaFree(u->recv_rows));
  CUDA_OK(cudaFree(u->back_rows));
  CUDA_OK(cudaFree(u->out));
}

void nccl_user_dispatch(nccl_user_t* u, const __nv_bfloat16* x, ncclComm_t comm, cudaStream_t stream) {
  const size_t row_bytes = (size_t)u->hidden * sizeof(__nv_bfloat16);
  nccl_permute(&u->plan, x, u->send_rows, row_bytes, stream);
  nccl_exchange(&u->plan, u->send_rows, u->recv_rows, row_bytes, 0, comm, stream);
}

void nccl_user_combine(nccl_user_t* u, const __nv_bfloat16* y, ncclComm_t comm, cudaStream_t stream) {
  const size_t row_bytes = (size_t)u->hidden * sizeof(__nv_bfloat16);
  nccl_exchange(&u->plan, y, u->back_rows, row_bytes, 1, comm, stream);
  nccl_combine_reduce(&u->plan, u->back_rows, u->hidden, u->out, stream);
}

/* ------------------------------------------------------------------------------------------------------------
 * The FP8 dispatch of the user path
 * ------------------------------------------------------------------------------------------------------------ */
static void* alloc_bytes(int rows, size_t row_bytes) {
  void* p = NULL;
  CUDA_OK(cudaMalloc(&p, ((size_t)rows + 1) * row_bytes));
  return p;
}

void nccl_user_fp8_create(nccl_user_fp8_t* u, const nccl_plan_t* plan, int hidden) {
  const size_t scale_bytes = (size_t)hidden / 128 * sizeof(float);
  u->plan = plan;
  u->hidden = hidden;
  u->send_rows = (uint8_t*)alloc_bytes(plan->num_send_rows, hidden);
  u->recv_rows = (uint8_t*)alloc_bytes(plan->num_recv_rows, hidden);
  u->send_scales = (float*)alloc_bytes(plan->num_send_rows, scale_bytes);
  u->recv_scales = (float*)alloc_bytes(plan->num_recv_rows, scale_bytes);
}

void nccl_user_fp8_destroy(nccl_user_fp8_t* u) {
  CUDA_OK(cudaFree(u->send_rows));
  CUDA_OK(cudaFree(u->recv_rows));
  CUDA_OK(cudaFree(u->send_scales));
  CUDA_OK(cudaFree(u->recv_scales));
}

void nccl_user_fp8_dispatch(nccl_user_fp8_t* u, const uint8_t* x, const float* x_scales, ncclComm_t comm,
                            cudaStream_t stream) {
  const size_t row_bytes = (size_t)u->hidden, scale_bytes = (size_t)u->hidden / 128 * sizeof(float);
  nccl_permute(u->plan, x, u->send_rows, row_bytes, stream);
  nccl_permute(u->plan, x_scales, u->send_scales, scale_bytes, stream);
  nccl_exchange(u->plan, u->send_rows, u->recv_rows, row_bytes, 0, comm, stream);
  nccl_exchange(u->plan, u->send_scales, u->recv_scales, scale_bytes, 0, comm, stream);
}
