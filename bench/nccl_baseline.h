/* nccl_baseline.h: the path a user takes without an EP library, on NCCL, timed next to each ep family.
 *
 * Dispatch: a local permute gathers the rows of x into per-destination order, then grouped ncclSend/ncclRecv
 * move one contiguous segment per peer (the receive buffer ends up ordered by source rank, then source token,
 * as ep's dispatch orders it). Combine: the inverse exchange brings each received row back to its source, and a
 * per-token reduce sums a token's returned rows in fp32 into [tokens, hidden] bf16.
 *
 * The plan (counts, offsets, gather indices) is built once before timing, with one real NCCL exchange of the
 * counts. That favours the baseline: a user pays for the counts exchange and the index computation on every
 * call; ep pays for its own inside the timed calls. */
#ifndef EP_BENCH_NCCL_BASELINE_H
#define EP_BENCH_NCCL_BASELINE_H

#include "bench.h"

typedef struct nccl_plan {
  int rank, num_ranks, num_tokens;
  int num_send_rows;   /* sum of send_count */
  int num_recv_rows;   /* sum of recv_count */
  int* send_count;     /* [R] host: rows this rank sends to each rank (its own share included) */
  int* send_offset;    /* [R] host: first row of each destination's segment in the send buffer */
  int* recv_count;     /* [R] host: rows this rank receives from each rank */
  int* recv_offset;    /* [R] host: first row of each source's segment in the receive buffer */
  int* d_send_token;   /* [num_send_rows] device: the token each send-buffer row holds (the permute's index) */
  int* d_token_rows;   /* [num_tokens, R] device: send-buffer row of token t's copy for rank d, or -1 */
} nccl_plan_t;

/* Builds the plan from this rank's is_token_in_rank ([num_tokens, R] host) and exchanges the counts with every
 * peer through `comm`. Collective. */
void nccl_plan_create(nccl_plan_t* plan, const uint8_t* is_token_in_rank, int num_tokens, int rank, int num_ranks,
                      ncclComm_t comm, cudaStream_t stream);
void nccl_plan_destroy(nccl_plan_t* plan);

/* send_rows[i] = rows[plan->d_send_token[i]], row_bytes per row. */
void nccl_permute(const nccl_plan_t* plan, const void* rows, void* send_rows, size_t row_bytes, cudaStream_t stream);

/* Grouped ncclSend/ncclRecv of contiguous segments, row_bytes per row. Forward (dispatch): per-destination
 * segments of `send` (send layout) into per-source segments of `recv` (receive layout). inverse (combine): the
 * other way, from a buffer in receive layout into one in send layout. Collective. */
void nccl_exchange(const nccl_plan_t* plan, const void* send, void* recv, size_t row_bytes, int inverse,
                   ncclComm_t comm, cudaStream_t stream);

/* out[t] = bf16(sum over d = 0..R-1 with a copy of t on d, in that order, of back_rows[row(t, d)]) in fp32:
 * the same order as the reference combine, so the result matches it bit for bit. */
void nccl_combine_reduce(const nccl_plan_t* plan, const __nv_bfloat16* back_rows, int hidden, __nv_bfloat16* out,
                         cudaStream_t stream);

/* The BF16 user path with its buffers, for one shape. */
typedef struct nccl_user {
  nccl_plan_t plan;
  int hidden;
  __nv_bfloat16* send_rows;   /* [num_send_rows, hidden] x permuted into per-destination order */
  __nv_bfloat16* recv_rows;   /* [num_recv_rows, hidden] dispatch output */
  __nv_bfloat16* back_rows;   /* [num_send_rows, hidden] combine: rows returned to this rank */
  __nv_bfloat16* out;         /* [num_tokens, hidden] combine output */
} nccl_user_t;

void nccl_user_create(nccl_user_t* u, const uint8_t* is_token_in_rank, int num_tokens, int hidden, int rank,
                      int num_ranks, ncclComm_t comm, cudaStream_t stream);
void nccl_user_destroy(nccl_user_t* u);
/* Permute + exchange: x [num_tokens, hidden] -> u->recv_rows. Collective. */
void nccl_user_dispatch(nccl_user_t* u, const __nv_bfloat16* x, ncclComm_t comm, cudaStream_t stream);
/* Inverse exchange + reduce: y [num_recv_rows, hidden] (expert outputs in receive order) -> u->out. Collective. */
void nccl_user_combine(nccl_user_t* u, const __nv_bfloat16* y, ncclComm_t comm, cudaStream_t stream);

/* The FP8 dispatch of the user path on the plan of a BF16 one: e4m3 rows [num_tokens, hidden] and their fp32 scales
 * [num_tokens, hidden / 128] are each permuted and exchanged (two tensors, as a user sends them). The combine stays
 * BF16 (nccl_user_combine). */
typedef struct nccl_user_fp8 {
  const nccl_plan_t* plan;    /* borrowed from the BF16 path */
  int hidden;
  uint8_t* send_rows;         /* [num_send_rows, hidden] */
  uint8_t* recv_rows;         /* [num_recv_rows, hidden] dispatch output */
  float* send_scales;         /* [num_send_rows, hidden / 128] */
  float* recv_scales;         /* [num_recv_rows, hidden / 128] dispatch output */
} nccl_user_fp8_t;

void nccl_user_fp8_create(nccl_user_fp8_t* u, const nccl_plan_t* plan, int hidden);
void nccl_user_fp8_destroy(nccl_user_fp8_t* u);
/* Permute + exchange of the rows, then of the scales. Collective. */
void nccl_user_fp8_dispatch(nccl_user_fp8_t* u, const uint8_t* x, const float* x_scales, ncclComm_t comm,
                            cudaStream_t stream);

#endif /* EP_BENCH_NCCL_BASELINE_H */
