/* Pure-C reference model of the expert-parallel library.
 *
 * It simulates every rank in one process and computes exactly what the GPU library must return, so
 * GPU tests can compare against it. No dependency beyond libc/libm.
 *
 * Conventions used throughout:
 *  - Arrays are plain row-major host arrays; shapes are written [rows, cols].
 *  - R = num_ranks, E = num_experts, E_loc = E / R (experts per rank), K = num_topk,
 *    N_r = number of tokens on rank r, T = max_tokens_per_rank (low-latency mode).
 *  - topk_idx entries are int64_t; -1 means "no expert". Expert e lives on rank e / E_loc with local id
 *    e % E_loc. Rank r is on node r / ranks_per_node.
 *  - Per-rank inputs are arrays of R pointers ("[R] -> [N_r, K]" = R pointers, each to an [N_r, K]
 *    array). In C a `T* a[R]` does not convert implicitly to `const T* const*`: declare the array as
 *    `const T* a[R]` or cast. A rank with N_r == 0 may have a NULL pointer.
 *  - A token that lists the same expert twice in its top-k counts once for every per-expert count
 *    (layout, normal dispatch, low-latency dispatch); each of its top-k slots is still mapped
 *    separately (recv_topk_idx, low-latency combine weights).
 *  - Functions returning int return 0 on success and -1 on bad arguments or allocation failure.
 */
#ifndef EP_REF_H
#define EP_REF_H

#include <stddef.h>
#include <stdint.h>

#define EP_REF_FP8_GROUP 128      /* channels sharing one FP8 scale */
#define EP_REF_FP8_MAX 448.0f     /* largest finite E4M3FN value */
#define EP_REF_FP8_AMAX_MIN 1e-4f /* floor on a group's amax, so an all-zero group gets a finite scale */

/* ------------------------------------------------------------------------------------------------
 * 1. Number helpers
 * ---------------------------------------------------------------------------------------------- */

/* float -> bf16 bits, round to nearest even; a NaN stays a (quiet) NaN with its sign. */
uint16_t ep_ref_f32_to_bf16(float x);
/* bf16 bits -> float (exact). */
float ep_ref_bf16_to_f32(uint16_t b);
/* float -> OCP FP8 E4M3FN bits: bias 7, round to nearest even, subnormals kept, |x| >= 448 and
 * infinities saturate to +-448 (0x7e/0xfe), NaN -> 0x7f (0xff if the sign bit is set). */
uint8_t ep_ref_f32_to_e4m3(float x);
/* E4M3FN bits -> float (exact); 0x7f/0xff -> NaN. */
float ep_ref_e4m3_to_f32(uint8_t b);

/* ------------------------------------------------------------------------------------------------
 * 2. FP8 per-token cast (as the low-latency dispatch does it)
 *
 * For each group g of 128 channels:
 *   amax      = max(max_c |x[c]|, 1e-4f)            (in float)
 *   scale     = amax / 448.0f                         (the stored dequantisation multiplier)
 *   if round_scale: scale = 2^ceil(log2(scale))       (computed exactly with frexpf/ldexpf)
 *   inv_scale = 1.0f / scale
 *   q[c]      = ep_ref_f32_to_e4m3(x[c] * inv_scale)  (one float multiply, then the conversion)
 * so x[c] ~= e4m3_to_f32(q[c]) * scale.
 * ---------------------------------------------------------------------------------------------- */

/* x_bf16: [hidden] bf16 bits, hidden % 128 == 0. q: [hidden] E4M3 bits. scales: [hidden / 128]. */
void ep_ref_cast_row_fp8(const uint16_t* x_bf16, int hidden, int round_scale, uint8_t* q, float* scales);

/* scales4: [4] power-of-two scales 2^k. Returns the UE8M0 bytes (k + 127, i.e. the float's biased
 * exponent field) packed little-endian: scales4[0] in bits 0..7, scales4[3] in bits 24..31. */
uint32_t ep_ref_pack_ue8m0(const float* scales4);

/* ------------------------------------------------------------------------------------------------
 * 3. Layout of one rank's tokens
 * ---------------------------------------------------------------------------------------------- */

/* topk_idx: [num_tokens, num_topk]. Outputs (each may be NULL; all are overwritten, zeroed first):
 *   num_tokens_per_rank [R]: tokens with at least one expert on that rank (once per rank),
 *   num_tokens_per_node [R / ranks_per_node]: likewise per node,
 *   num_tokens_per_expert [E]: tokens selecting that expert (a repeated expert counts once),
 *   is_token_in_rank [num_tokens, R]: 1 if the token goes to that rank, else 0.
 * Entries equal to -1 are skipped. An entry outside [-1, num_experts) makes it return -1 and store
 * in *bad_token the TOKEN (row) index of the first offending entry; *bad_token is -1 otherwise,
 * including when -1 is returned for a bad shape. */
int ep_ref_layout(int num_ranks, int ranks_per_node, int num_experts, int num_tokens, int num_topk,
                  const int64_t* topk_idx, int* num_tokens_per_rank, int* num_tokens_per_node,
                  int* num_tokens_per_expert, uint8_t* is_token_in_rank, int* bad_token);

/* ------------------------------------------------------------------------------------------------
 * 4. Normal (high-throughput) dispatch, all ranks at once
 * ---------------------------------------------------------------------------------------------- */

/* All ranks' inputs. Routing comes from is_token_in_rank when given, else from topk_idx (through
 * ep_ref_layout); at least one of the two is required. Optional arrays may be NULL. */
typedef struct {
  int num_ranks;                          /* R >= 1 */
  int ranks_per_node;                     /* divides R; set it to R for a single node */
  int num_experts;                        /* E, a multiple of R */
  int num_topk;                           /* K (may be 0 when topk_idx is NULL) */
  const int* num_tokens;                  /* [R]: N_r */
  const void* const* x;                   /* [R] -> [N_r, row_bytes] opaque rows (bf16, fp8, ..) */
  size_t row_bytes;                       /* bytes per row of x; 0 or x == NULL: no payload */
  const float* const* x_scales;           /* [R] -> [N_r, num_scales], or NULL */
  int num_scales;                         /* scales per row; 0 when x_scales is NULL */
  const int64_t* const* topk_idx;         /* [R] -> [N_r, K] global expert ids, or NULL */
  const float* const* topk_weights;       /* [R] -> [N_r, K], or NULL */
  const uint8_t* const* is_token_in_rank; /* [R] -> [N_r, R] routing override, or NULL */
  const int* const* num_tokens_per_expert; /* [R] -> [E] each source's tokens per expert, or NULL; without
                                            * topk_idx, summed over sources into the per-expert counts */
} ep_ref_world_t;

/* What one destination rank d receives. Rows are ordered by source rank ascending, then source token
 * ascending. Arrays whose input was absent are NULL. */
typedef struct {
  int num_recv;                    /* rows received */
  uint8_t* x;                      /* [num_recv, row_bytes] copied bytes */
  float* x_scales;                 /* [num_recv, num_scales] */
  int* src_rank;                   /* [num_recv] source rank of each row */
  int* src_idx;                    /* [num_recv] source token index of each row */
  int64_t* topk_idx;               /* [num_recv, K] local expert id (e - d*E_loc) if e lives on d, else -1 */
  float* topk_weights;             /* [num_recv, K] the weight where topk_idx is valid, else 0.0f */
  int* num_recv_tokens_per_expert; /* [E_loc] rows carrying each local expert (once per row),
                                    * rounded up to a multiple of expert_alignment; without topk_idx,
                                    * the sum of the sources' num_tokens_per_expert (zeros without it) */
} ep_ref_recv_t;

typedef struct {
  int num_ranks;           /* R */
  int num_topk;            /* K */
  int num_local_experts;   /* E_loc */
  size_t row_bytes;        /* copied from the world */
  int num_scales;          /* copied from the world */
  int* num_tokens;         /* [R] senders' token counts (copy of the world's) */
  ep_ref_recv_t* recv;     /* [R] indexed by destination rank */
  int* rank_prefix_matrix; /* [R, R]: [s][d] = rows rank d receives from ranks 0..s (inclusive) */
  int** recv_row;          /* [R] -> [N_s, R]: [s][t*R + d] = row of token (s, t) in d's recv, or -1 */
} ep_ref_dispatch_t;

/* Simulates dispatch on every rank. expert_alignment >= 1. On success *out owns its memory (free
 * with ep_ref_dispatch_free); on failure *out is left empty. */
int ep_ref_dispatch(const ep_ref_world_t* world, int expert_alignment, ep_ref_dispatch_t* out);
void ep_ref_dispatch_free(ep_ref_dispatch_t* d);
/* Row of source token t of rank s in destination rank d's receive output, or -1 if not sent there. */
int ep_ref_dispatch_row(const ep_ref_dispatch_t* disp, int src_rank, int src_token, int dst_rank);

/* ------------------------------------------------------------------------------------------------
 * 5. Normal combine, all ranks at once (the reverse of a dispatch)
 *
 * For source rank s, token t, channel c (fp32 accumulation, exactly this order, NULL bias skipped):
 *   acc = 0; acc += bias0[t][c]; acc += bias1[t][c];
 *   for d = 0..R-1 with row = recv_row(s, t, d) >= 0: acc += y_d[row][c]
 *   out[t][c] = bf16(acc)
 *   out_weights[t][k] = 0 + sum over the same d, ascending, of recv_weights_d[row][k]
 * ---------------------------------------------------------------------------------------------- */

/* disp: the dispatch whose routing is reversed. y: [R] -> [num_recv_d, hidden] bf16 expert outputs
 * in d's receive order. recv_weights: [R] -> [num_recv_d, K], or NULL. bias0, bias1: [R] ->
 * [N_s, hidden] bf16, or NULL. out: [R] -> [N_s, hidden] bf16. out_weights: [R] -> [N_s, K];
 * written only when recv_weights is given (may be NULL otherwise). */
int ep_ref_combine(const ep_ref_dispatch_t* disp, int hidden, const uint16_t* const* y,
                   const float* const* recv_weights, const uint16_t* const* bias0,
                   const uint16_t* const* bias1, uint16_t* const* out, float* const* out_weights);

/* ------------------------------------------------------------------------------------------------
 * 6. Low-latency dispatch, all ranks at once
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
  int num_ranks;                    /* R */
  int num_experts;                  /* E, a multiple of R */
  int num_topk;                     /* K */
  int hidden;                       /* channels per row */
  int max_tokens_per_rank;          /* T; every N_r <= T */
  const int* num_tokens;            /* [R]: N_r */
  const uint16_t* const* x;         /* [R] -> [N_r, hidden] bf16, or NULL (routing only) */
  const int64_t* const* topk_idx;   /* [R] -> [N_r, K] global expert ids, -1 allowed */
  const float* const* topk_weights; /* [R] -> [N_r, K]; needed by the combines only */
} ep_ref_ll_world_t;

/* What one rank d receives, stored compactly: the rows of local expert e are
 * [expert_offset[e], expert_offset[e] + count[e]) of the per-row arrays; row i of expert e (the
 * GPU's packed_recv_x[e][i]) is compact row expert_offset[e] + i. Within an expert, rows are ordered
 * by source rank ascending, then source token ascending; a token selecting the expert several times
 * appears once. */
typedef struct {
  int num_rows;           /* total over the local experts */
  int* count;             /* [E_loc] rows per local expert (DeepEP's packed_recv_count) */
  int* expert_offset;     /* [E_loc + 1] first compact row of each expert; [E_loc] = num_rows */
  int* range_begin;       /* [E_loc, R] first row (position within the expert) from source rank s */
  int* range_count;       /* [E_loc, R] rows from source rank s (DeepEP's layout_range) */
  int* src_rank;          /* [num_rows] */
  int* src_idx;           /* [num_rows] source token index (DeepEP's packed_recv_src_info) */
  uint16_t* x;            /* [num_rows, hidden] bf16 when !use_fp8 and x given, else NULL */
  uint8_t* x_fp8;         /* [num_rows, hidden] E4M3 when use_fp8 and x given, else NULL */
  float* scales;          /* [num_rows, hidden / 128] when use_fp8 and x given, else NULL */
  uint32_t* scales_ue8m0; /* [num_rows, hidden / 512] when use_ue8m0 and x given, else NULL */
} ep_ref_ll_recv_t;

typedef struct {
  int num_ranks;         /* R */
  int num_local_experts; /* E_loc */
  int num_topk;          /* K */
  int hidden;
  int max_tokens_per_rank; /* T */
  int* num_tokens;         /* [R] copy of the world's */
  ep_ref_ll_recv_t* recv;  /* [R] indexed by destination rank */
  int** token_row;         /* [R] -> [N_s, K]: [s][t*K + k] = position of token (s, t) within the
                            * list of expert topk_idx[s][t][k] on its rank, or -1 for a -1 slot */
} ep_ref_ll_dispatch_t;

/* use_fp8: cast rows with ep_ref_cast_row_fp8 (hidden % 128 == 0). round_scale: power-of-two
 * scales. use_ue8m0: also pack the scales as UE8M0 (needs round_scale, hidden % 512 == 0). */
int ep_ref_ll_dispatch(const ep_ref_ll_world_t* world, int use_fp8, int round_scale, int use_ue8m0,
                       ep_ref_ll_dispatch_t* out);
/* ep_ref_ll_dispatch with only dst_rank's receive lists built: recv[d] of every other rank is empty (all NULL)
 * and token_row holds dst_rank's positions only (-1 elsewhere). What one rank checks, in 1/R of the time. */
int ep_ref_ll_dispatch_to(const ep_ref_ll_world_t* world, int dst_rank, int use_fp8, int round_scale, int use_ue8m0,
                          ep_ref_ll_dispatch_t* out);
void ep_ref_ll_dispatch_free(ep_ref_ll_dispatch_t* d);

/* ------------------------------------------------------------------------------------------------
 * 7. Low-latency combine
 *
 * For source rank s, token t, channel c:
 *   acc = 0
 *   for k = 0..K-1 with e = topk_idx[t][k] != -1:
 *     acc = fmaf(w[t][k], Y(e, s, t)[c], acc)   -- one rounding per term, which is what nvcc emits
 *                                                  for `acc += w * y` (its default -fmad=true)
 *   out[t][c] = bf16(acc)
 * where Y(e, s, t) is the expert output row of token (s, t) for global expert e. A token listing an
 * expert twice adds that expert's row twice, once per weight.
 * ---------------------------------------------------------------------------------------------- */

/* y: [R] -> [E_loc, R*T, hidden] bf16, rank d's expert outputs in the layout of its ll dispatch
 * (row i of local expert e = the i-th row received by e). out: [R] -> [N_s, hidden] bf16. */
int ep_ref_ll_combine(const ep_ref_ll_world_t* world, const ep_ref_ll_dispatch_t* disp,
                      const uint16_t* const* y, uint16_t* const* out);

/* Expert output for token (src_rank, src_token) handled by local expert local_expert of dst_rank:
 * write y_row [hidden] bf16. */
typedef void (*ep_ref_expert_fn)(void* ctx, int dst_rank, int local_expert, int src_rank, int src_token,
                                 int hidden, uint16_t* y_row);

/* Same result as ep_ref_ll_combine, with Y given by a function instead of arrays; needs no
 * dispatch. out: [R] -> [N_s, hidden] bf16; out[s] NULL skips source rank s (a rank checking its own output
 * computes 1/R of the world). The same holds for the sums and LogFMT forms below. */
int ep_ref_ll_combine_fn(const ep_ref_ll_world_t* world, ep_ref_expert_fn fn, void* ctx,
                         uint16_t* const* out);

/* The combine with sums on the experts' ranks (ep_ll_combine_args_t.sum_on_expert_ranks), with Y from fn. For
 * source rank s, token t, channel c:
 *   acc = 0
 *   for each rank d of the token's valid experts, in the order of its first slot:
 *     partial = 0
 *     for each distinct expert e of rank d, in the order of its first slot:
 *       W = 0; for k = 0..K-1 with topk_idx[t][k] == e: W += w[t][k]
 *       partial = fmaf(W, Y(e, s, t)[c], partial)
 *     acc = fmaf(1, bf16(partial), acc)         -- each rank's sum crosses the link as bf16
 *   out[t][c] = bf16(acc) */
int ep_ref_ll_combine_sums_fn(const ep_ref_ll_world_t* world, ep_ref_expert_fn fn, void* ctx,
                              uint16_t* const* out);

/* ------------------------------------------------------------------------------------------------
 * 7b. LogFMT-10: the combine payload of use_logfmt (ep's format; DeepEP's byte count per row)
 *
 * A row of hidden H (a multiple of 128) is H / 128 groups of 128 channels: first G = H / 128 uint32 words,
 * word g = bf16(amax_g) | bf16(amin_g) << 16 (the largest |x| of group g and the smallest normal nonzero one, 0 if
 * none: zeros are code 0 and do not widen the range as in DeepEP's), then
 * G blocks of 160 bytes. In block g, value j (0..127) is a 10-bit field v = sign << 9 | code: its low 8 bits at
 * byte j, its high 2 bits at bits 2 * (j % 4) of byte 128 + j / 4. H * 10 / 8 + H / 128 * 4 bytes in all.
 *   L(v) = log2 of a positive normal bf16 v = (exponent - 127) + LT[mantissa], LT[m] = (float)log2(1 + m / 128)
 *   la = L(amax), lb = max(L(amin), la - 32) (la - 32 when amin is 0 or subnormal), step = (la - lb) / 510
 *   code = 0 for a zero or subnormal |x|, and for every value when amax is 0 (its sign bit then 0); else 1 when
 *   step is 0; else clamp(floor(fmaf(L(|x|) - lb, 1 / step, 1.5)), 0, 511)  -- nearest in log2, 1.5 = 1 + 0.5
 *   decode: code 0 -> +0; else sign * E2(fmaf(code - 1, step, lb)), E2(y) = ldexpf(P(y - floor(y)), floor(y)),
 *   P(f) = 2^f by Horner (fmaf) over the Taylor coefficients ln2^i / i!, i = 7 .. 0, as floats.
 * Relative error of a decoded value: at most 2^(step / 2) - 1 (step <= 32 / 510: 2.2 %) plus P's 2e-6.
 * ---------------------------------------------------------------------------------------------- */
size_t ep_ref_logfmt_row_bytes(int hidden);
float ep_ref_logfmt_log2(uint16_t bf16); /* L(v) above; -INFINITY for zero and subnormals */
void ep_ref_logfmt_encode(const uint16_t* x, int hidden, uint8_t* row);
void ep_ref_logfmt_decode(const uint8_t* row, int hidden, float* out);

/* ep_ref_ll_combine_fn with each expert row crossing as LogFMT-10: the rule of section 7 over the decoded values
 * (acc = fmaf(w, decode(encode(Y))[c], acc)). */
int ep_ref_ll_combine_logfmt_fn(const ep_ref_ll_world_t* world, ep_ref_expert_fn fn, void* ctx, uint16_t* const* out);

/* Fills y: [R] -> [E_loc, R*T, hidden] bf16 with fn's rows in disp's layout (unused rows zeroed),
 * i.e. the input ep_ref_ll_combine expects. */
int ep_ref_ll_fill_expert_outputs(const ep_ref_ll_dispatch_t* disp, ep_ref_expert_fn fn, void* ctx,
                                  uint16_t* const* y);

/* ------------------------------------------------------------------------------------------------
 * 8. Internode routing counts (what DeepEP's internode bench turns into bytes)
 * ---------------------------------------------------------------------------------------------- */

/* Routing as in ep_ref_dispatch. Outputs (each may be NULL):
 *   is_token_in_node: [R] -> [N_s, num_nodes], 1 if token (s, t) goes to some rank of that node,
 *   num_node_sends [R]: (token, destination node) pairs of each source rank, own node included
 *                       ("RDMA" traffic; = sum of its num_tokens_per_node),
 *   num_recv_rows [R]: rows each rank receives ("NVL" traffic; = its dispatch num_recv). */
int ep_ref_internode_counts(const ep_ref_world_t* world, uint8_t* const* is_token_in_node,
                            int* num_node_sends, int* num_recv_rows);

#endif /* EP_REF_H */
