/* Pure-C reference model of the expert-parallel library. See ep_ref.h for the contract. */
#include "ep_ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ================================================================================================
 * Small helpers
 * ============================================================================================== */

/* calloc that never asks for 0 bytes, so "nothing to store" still gives a freeable non-NULL pointer
 * and NULL always means failure. */
static void* zalloc(size_t count, size_t size) { return calloc(count ? count : 1, size ? size : 1); }

static int shape_ok(int num_ranks, int ranks_per_node, int num_experts) {
  return num_ranks >= 1 && ranks_per_node >= 1 && num_ranks % ranks_per_node == 0 &&
         num_experts >= num_ranks && num_experts % num_ranks == 0;
}

/* True when slot k of a top-k row repeats an expert already listed in slots 0..k-1. */
static int is_repeat(const int64_t* row, int k) {
  for (int j = 0; j < k; ++j)
    if (row[j] == row[k]) return 1;
  return 0;
}

static uint32_t f32_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}

static float bits_f32(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

/* ================================================================================================
 * 1. Number helpers
 * ============================================================================================== */

uint16_t ep_ref_f32_to_bf16(float x) {
  uint32_t u = f32_bits(x);
  if (isnan(x))
    return (uint16_t)((u >> 16) | 0x0040u); /* set the quiet bit: truncation alone
                                               could turn a NaN into an infinity */
  /* Round to nearest even: add just under half an ulp, plus one when the kept lsb is odd. */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

float ep_ref_bf16_to_f32(uint16_t b) { return bits_f32((uint32_t)b << 16); }

uint8_t ep_ref_f32_to_e4m3(float x) {
  uint8_t sign = signbit(x) ? 0x80 : 0x00;
  if (isnan(x)) return (uint8_t)(sign | 0x7f);
  float a = fabsf(x);
  if (a >= EP_REF_FP8_MAX) return (uint8_t)(sign | 0x7e); /* saturate; infinities too */
  if (a < 0x1p-6f) {
    /* Subnormal range: value = m * 2^-9. The scaling is exact; rintf rounds to nearest even.
     * m == 8 is the smallest normal, whose code is also 8. */
    return (uint8_t)(sign | (uint8_t)rintf(a * 0x1p9f));
  }
  int e2;
  float f = frexpf(a, &e2);                       /* a = f * 2^e2, f in [0.5, 1) */
  int exp = e2 - 1;                               /* a = (2f) * 2^exp, 2f in [1, 2) */
  int man = (int)rintf((2.0f * f - 1.0f) * 8.0f); /* exact before rounding: 2f has 24 bits */
  if (man == 8) {                                 /* rounded up into the next binade */
    man = 0;
    ++exp;
  }
  /* a < 448 rounds to at most 448 = 1.75 * 2^8, so exp <= 8 and (exp, man) != (8, 7) (NaN). */
  return (uint8_t)(sign | (uint8_t)((exp + 7) << 3) | (uint8_t)man);
}

float ep_ref_e4m3_to_f32(uint8_t b) {
  int exp = (b >> 3) & 0xf, man = b & 7;
  float mag;
  if (exp == 15 && man == 7)
    mag = NAN;
  else if (exp == 0)
    mag = ldexpf((float)man, -9);
  else
    mag = ldexpf((float)(8 + man), exp - 7 - 3);
  return (b & 0x80) ? -mag : mag;
}

/* ================================================================================================
 * 2. FP8 per-token cast
 * ============================================================================================== */

/* 2^ceil(log2(s)) for a positive normal float, exactly. */
static float pow2_ceil(float s) {
  int e;
  float f = frexpf(s, &e); /* s = f * 2^e, f in [0.5, 1) */
  return f == 0.5f ? s : ldexpf(1.0f, e);
}

void ep_ref_cast_row_fp8(const uint16_t* x_bf16, int hidden, int round_scale, uint8_t* q, float* scales) {
  for (int g = 0; g < hidden / EP_REF_FP8_GROUP; ++g) {
    const uint16_t* xg = x_bf16 + (size_t)g * EP_REF_FP8_GROUP;
    float amax = EP_REF_FP8_AMAX_MIN;
    for (int c = 0; c < EP_REF_FP8_GROUP; ++c) amax = fmaxf(amax, fabsf(ep_ref_bf16_to_f32(xg[c])));
    float scale = amax / EP_REF_FP8_MAX;
    if (round_scale) scale = pow2_ceil(scale);
    float inv_scale = 1.0f / scale;
    for (int c = 0; c < EP_REF_FP8_GROUP; ++c)
      q[(size_t)g * EP_REF_FP8_GROUP + c] = ep_ref_f32_to_e4m3(ep_ref_bf16_to_f32(xg[c]) * inv_scale);
    scales[g] = scale;
  }
}

uint32_t ep_ref_pack_ue8m0(const float* scales4) {
  uint32_t packed = 0;
  for (int i = 0; i < 4; ++i) packed |= ((f32_bits(scales4[i]) >> 23) & 0xffu) << (8 * i);
  return packed;
}

/* ================================================================================================
 * 3. Layout
 * ============================================================================================== */

int ep_ref_layout(int num_ranks, int ranks_per_node, int num_experts, int num_tokens, int num_topk,
                  const int64_t* topk_idx, int* num_tokens_per_rank, int* num_tokens_per_node,
                  int* num_tokens_per_expert, uint8_t* is_token_in_rank, int* bad_token) {
  if (bad_token) *bad_token = -1;
  if (!shape_ok(num_ranks, ranks_per_node, num_experts) || num_tokens < 0 || num_topk < 0 ||
      (num_tokens > 0 && num_topk > 0 && !topk_idx))
    return -1;
  const int num_nodes = num_ranks / ranks_per_node;
  const int experts_per_rank = num_experts / num_ranks;

  /* Validate everything first so that an error leaves no half-filled outputs behind. */
  for (int t = 0; t < num_tokens; ++t)
    for (int k = 0; k < num_topk; ++k) {
      int64_t e = topk_idx[(size_t)t * num_topk + k];
      if (e < -1 || e >= num_experts) {
        if (bad_token) *bad_token = t;
        return -1;
      }
    }

  uint8_t* in_rank = zalloc((size_t)num_ranks, 1);
  uint8_t* in_node = zalloc((size_t)num_nodes, 1);
  if (!in_rank || !in_node) {
    free(in_rank);
    free(in_node);
    return -1;
  }
  if (num_tokens_per_rank) memset(num_tokens_per_rank, 0, sizeof(int) * (size_t)num_ranks);
  if (num_tokens_per_node) memset(num_tokens_per_node, 0, sizeof(int) * (size_t)num_nodes);
  if (num_tokens_per_expert) memset(num_tokens_per_expert, 0, sizeof(int) * (size_t)num_experts);

  for (int t = 0; t < num_tokens; ++t) {
    const int64_t* row = topk_idx ? topk_idx + (size_t)t * num_topk : NULL;
    memset(in_rank, 0, (size_t)num_ranks);
    memset(in_node, 0, (size_t)num_nodes);
    for (int k = 0; k < num_topk; ++k) {
      if (row[k] < 0) continue;
      int e = (int)row[k], r = e / experts_per_rank;
      if (num_tokens_per_expert && !is_repeat(row, k)) num_tokens_per_expert[e]++;
      in_rank[r] = 1;
      in_node[r / ranks_per_node] = 1;
    }
    for (int r = 0; r < num_ranks; ++r) {
      if (num_tokens_per_rank) num_tokens_per_rank[r] += in_rank[r];
      if (is_token_in_rank) is_token_in_rank[(size_t)t * num_ranks + r] = in_rank[r];
    }
    if (num_tokens_per_node)
      for (int n = 0; n < num_nodes; ++n) num_tokens_per_node[n] += in_node[n];
  }
  free(in_rank);
  free(in_node);
  return 0;
}

/* ================================================================================================
 * 4. Normal dispatch
 * ============================================================================================== */

static int world_ok(const ep_ref_world_t* w) {
  if (!w || !shape_ok(w->num_ranks, w->ranks_per_node, w->num_experts) || w->num_topk < 0 || !w->num_tokens ||
      w->num_scales < 0 || (w->num_scales > 0 && !w->x_scales))
    return 0;
  if (!w->is_token_in_rank && !w->topk_idx) return 0; /* no routing */
  if ((w->topk_idx || w->topk_weights) && w->num_topk == 0) return 0;
  if (w->topk_weights && !w->topk_idx) return 0; /* weights are mapped through the indices */
  if (w->num_tokens_per_expert && w->topk_idx) return 0; /* one source of per-expert counts */
  for (int r = 0; r < w->num_ranks; ++r) {
    int n = w->num_tokens[r];
    if (n < 0) return 0;
    if (n == 0) continue;
    if ((w->x && w->row_bytes && !w->x[r]) || (w->num_scales && !w->x_scales[r]) ||
        (w->topk_idx && !w->topk_idx[r]) || (w->topk_weights && !w->topk_weights[r]) ||
        (w->is_token_in_rank && !w->is_token_in_rank[r]))
      return 0;
  }
  for (int r = 0; w->num_tokens_per_expert && r < w->num_ranks; ++r)
    if (!w->num_tokens_per_expert[r]) return 0;
  return 1;
}

/* Fills in_rank [N_s, R] for source rank s from the override or from topk_idx. */
static int world_routing(const ep_ref_world_t* w, int s, uint8_t* in_rank) {
  int n = w->num_tokens[s];
  if (w->is_token_in_rank) {
    if (n > 0) memcpy(in_rank, w->is_token_in_rank[s], (size_t)n * (size_t)w->num_ranks);
    return 0;
  }
  return ep_ref_layout(w->num_ranks, w->ranks_per_node, w->num_experts, n, w->num_topk, w->topk_idx[s], NULL,
                       NULL, NULL, in_rank, NULL);
}

/* Routing of every source rank: [R] -> [N_s, R]. NULL on failure. */
static uint8_t** world_routing_all(const ep_ref_world_t* w) {
  const int R = w->num_ranks;
  uint8_t** in_rank = zalloc((size_t)R, sizeof *in_rank);
  if (!in_rank) return NULL;
  for (int s = 0; s < R; ++s) {
    in_rank[s] = zalloc((size_t)w->num_tokens[s] * (size_t)R, 1);
    if (!in_rank[s] || world_routing(w, s, in_rank[s]) != 0) {
      for (int i = 0; i <= s; ++i) free(in_rank[i]);
      free(in_rank);
      return NULL;
    }
  }
  return in_rank;
}

static void free_routing(uint8_t** in_rank, int num_ranks) {
  if (!in_rank) return;
  for (int s = 0; s < num_ranks; ++s) free(in_rank[s]);
  free(in_rank);
}

static void recv_free(ep_ref_recv_t* r) {
  free(r->x);
  free(r->x_scales);
  free(r->src_rank);
  free(r->src_idx);
  free(r->topk_idx);
  free(r->topk_weights);
  free(r->num_recv_tokens_per_expert);
}

void ep_ref_dispatch_free(ep_ref_dispatch_t* d) {
  if (!d) return;
  for (int r = 0; r < d->num_ranks; ++r) {
    if (d->recv) recv_free(&d->recv[r]);
    if (d->recv_row) free(d->recv_row[r]);
  }
  free(d->recv);
  free(d->recv_row);
  free(d->num_tokens);
  free(d->rank_prefix_matrix);
  memset(d, 0, sizeof *d);
}

int ep_ref_dispatch_row(const ep_ref_dispatch_t* disp, int src_rank, int src_token, int dst_rank) {
  return disp->recv_row[src_rank][(size_t)src_token * disp->num_ranks + dst_rank];
}

/* Allocates rank d's receive arrays for n rows. */
static int recv_alloc(const ep_ref_world_t* w, int n, ep_ref_recv_t* r) {
  const size_t rows = (size_t)n, K = (size_t)w->num_topk;
  r->num_recv = n;
  r->src_rank = zalloc(rows, sizeof(int));
  r->src_idx = zalloc(rows, sizeof(int));
  r->num_recv_tokens_per_expert = zalloc((size_t)(w->num_experts / w->num_ranks), sizeof(int));
  if (!r->src_rank || !r->src_idx || !r->num_recv_tokens_per_expert) return -1;
  if (w->x && w->row_bytes && !(r->x = zalloc(rows, w->row_bytes))) return -1;
  if (w->num_scales && !(r->x_scales = zalloc(rows * (size_t)w->num_scales, sizeof(float)))) return -1;
  if (w->topk_idx && !(r->topk_idx = zalloc(rows * K, sizeof(int64_t)))) return -1;
  if (w->topk_weights && !(r->topk_weights = zalloc(rows * K, sizeof(float)))) return -1;
  return 0;
}

/* Copies token (s, t) into row `row` of rank d's receive output. */
static void recv_fill_row(const ep_ref_world_t* w, int d, int s, int t, int row, ep_ref_recv_t* r) {
  const int K = w->num_topk, E_loc = w->num_experts / w->num_ranks;
  r->src_rank[row] = s;
  r->src_idx[row] = t;
  if (r->x)
    memcpy(r->x + (size_t)row * w->row_bytes, (const uint8_t*)w->x[s] + (size_t)t * w->row_bytes,
           w->row_bytes);
  if (r->x_scales)
    memcpy(r->x_scales + (size_t)row * w->num_scales, w->x_scales[s] + (size_t)t * w->num_scales,
           sizeof(float) * (size_t)w->num_scales);
  if (!w->topk_idx) return;
  const int64_t* idx = w->topk_idx[s] + (size_t)t * K;
  int64_t* local = r->topk_idx + (size_t)row * K;
  for (int k = 0; k < K; ++k) {
    int64_t e = idx[k];
    local[k] = (e >= 0 && e / E_loc == d) ? e - (int64_t)d * E_loc : -1;
    if (r->topk_weights)
      r->topk_weights[(size_t)row * K + k] = local[k] >= 0 ? w->topk_weights[s][(size_t)t * K + k] : 0.0f;
    if (local[k] >= 0 && !is_repeat(local, k)) r->num_recv_tokens_per_expert[local[k]]++;
  }
}

int ep_ref_dispatch(const ep_ref_world_t* w, int expert_alignment, ep_ref_dispatch_t* out) {
  if (!out) return -1;
  memset(out, 0, sizeof *out);
  if (!world_ok(w) || expert_alignment < 1) return -1;
  /* Reject bad expert ids even when routing comes from the override. */
  if (w->topk_idx)
    for (int s = 0; s < w->num_ranks; ++s)
      if (ep_ref_layout(w->num_ranks, w->ranks_per_node, w->num_experts, w->num_tokens[s], w->num_topk,
                        w->topk_idx[s], NULL, NULL, NULL, NULL, NULL) != 0)
        return -1;

  const int R = w->num_ranks, E_loc = w->num_experts / R;
  out->num_ranks = R;
  out->num_topk = w->num_topk;
  out->num_local_experts = E_loc;
  out->row_bytes = (w->x && w->row_bytes) ? w->row_bytes : 0;
  out->num_scales = w->num_scales;
  out->num_tokens = zalloc((size_t)R, sizeof(int));
  out->recv = zalloc((size_t)R, sizeof(ep_ref_recv_t));
  out->recv_row = zalloc((size_t)R, sizeof(int*));
  out->rank_prefix_matrix = zalloc((size_t)R * (size_t)R, sizeof(int));
  uint8_t** in_rank = world_routing_all(w);
  if (!out->num_tokens || !out->recv || !out->recv_row || !out->rank_prefix_matrix || !in_rank) goto fail;
  memcpy(out->num_tokens, w->num_tokens, sizeof(int) * (size_t)R);

  /* Rows per (source, destination), accumulated into the inclusive prefix over sources. */
  for (int s = 0; s < R; ++s) {
    out->recv_row[s] = zalloc((size_t)w->num_tokens[s] * (size_t)R, sizeof(int));
    if (!out->recv_row[s]) goto fail;
    for (int d = 0; d < R; ++d) {
      int prev = s > 0 ? out->rank_prefix_matrix[(size_t)(s - 1) * R + d] : 0, n = 0;
      for (int t = 0; t < w->num_tokens[s]; ++t) n += in_rank[s][(size_t)t * R + d] != 0;
      out->rank_prefix_matrix[(size_t)s * R + d] = prev + n;
    }
  }

  for (int d = 0; d < R; ++d) {
    ep_ref_recv_t* r = &out->recv[d];
    if (recv_alloc(w, out->rank_prefix_matrix[(size_t)(R - 1) * R + d], r) != 0) goto fail;
    int row = 0;
    for (int s = 0; s < R; ++s)
      for (int t = 0; t < w->num_tokens[s]; ++t) {
        int sent = in_rank[s][(size_t)t * R + d] != 0;
        out->recv_row[s][(size_t)t * R + d] = sent ? row : -1;
        if (sent) recv_fill_row(w, d, s, t, row++, r);
      }
    for (int s = 0; w->num_tokens_per_expert && s < R; ++s)
      for (int e = 0; e < E_loc; ++e) r->num_recv_tokens_per_expert[e] += w->num_tokens_per_expert[s][d * E_loc + e];
    for (int e = 0; e < E_loc; ++e) {
      int n = r->num_recv_tokens_per_expert[e];
      r->num_recv_tokens_per_expert[e] = (n + expert_alignment - 1) / expert_alignment * expert_alignment;
    }
  }
  free_routing(in_rank, R);
  return 0;

fail:
  free_routing(in_rank, R);
  ep_ref_dispatch_free(out);
  return -1;
}

/* ================================================================================================
 * 5. Normal combine
 * ============================================================================================== */

int ep_ref_combine(const ep_ref_dispatch_t* disp, int hidden, const uint16_t* const* y,
                   const float* const* recv_weights, const uint16_t* const* bias0,
                   const uint16_t* const* bias1, uint16_t* const* out, float* const* out_weights) {
  if (!disp || !disp->recv_row || hidden < 0 || !out || (hidden > 0 && !y) || (recv_weights && !out_weights))
    return -1;
  const int R = disp->num_ranks, K = disp->num_topk;
  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < disp->num_tokens[s]; ++t) {
      const size_t tok = (size_t)t * hidden;
      for (int c = 0; c < hidden; ++c) {
        float acc = 0.0f;
        if (bias0) acc += ep_ref_bf16_to_f32(bias0[s][tok + c]);
        if (bias1) acc += ep_ref_bf16_to_f32(bias1[s][tok + c]);
        for (int d = 0; d < R; ++d) {
          int row = ep_ref_dispatch_row(disp, s, t, d);
          if (row >= 0) acc += ep_ref_bf16_to_f32(y[d][(size_t)row * hidden + c]);
        }
        out[s][tok + c] = ep_ref_f32_to_bf16(acc);
      }
      if (!recv_weights) continue;
      for (int k = 0; k < K; ++k) {
        float acc = 0.0f;
        for (int d = 0; d < R; ++d) {
          int row = ep_ref_dispatch_row(disp, s, t, d);
          if (row >= 0) acc += recv_weights[d][(size_t)row * K + k];
        }
        out_weights[s][(size_t)t * K + k] = acc;
      }
    }
  }
  return 0;
}

/* ================================================================================================
 * 6. Low-latency dispatch
 * ============================================================================================== */

static int ll_world_ok(const ep_ref_ll_world_t* w) {
  if (!w || !shape_ok(w->num_ranks, 1, w->num_experts) || w->num_topk < 1 || w->hidden < 1 ||
      w->max_tokens_per_rank < 0 || !w->num_tokens || !w->topk_idx)
    return 0;
  for (int r = 0; r < w->num_ranks; ++r) {
    int n = w->num_tokens[r];
    if (n < 0 || n > w->max_tokens_per_rank) return 0;
    if (n > 0 && (!w->topk_idx[r] || (w->x && !w->x[r]))) return 0;
    if (ep_ref_layout(w->num_ranks, 1, w->num_experts, n, w->num_topk, w->topk_idx[r], NULL, NULL, NULL, NULL,
                      NULL) != 0)
      return 0;
  }
  return 1;
}

/* Does token (s, t) select global expert e in any slot? */
static int ll_selects(const ep_ref_ll_world_t* w, int s, int t, int64_t e) {
  const int64_t* row = w->topk_idx[s] + (size_t)t * w->num_topk;
  for (int k = 0; k < w->num_topk; ++k)
    if (row[k] == e) return 1;
  return 0;
}

static void ll_recv_free(ep_ref_ll_recv_t* r) {
  free(r->count);
  free(r->expert_offset);
  free(r->range_begin);
  free(r->range_count);
  free(r->src_rank);
  free(r->src_idx);
  free(r->x);
  free(r->x_fp8);
  free(r->scales);
  free(r->scales_ue8m0);
}

void ep_ref_ll_dispatch_free(ep_ref_ll_dispatch_t* d) {
  if (!d) return;
  for (int r = 0; r < d->num_ranks; ++r) {
    if (d->recv) ll_recv_free(&d->recv[r]);
    if (d->token_row) free(d->token_row[r]);
  }
  free(d->recv);
  free(d->token_row);
  free(d->num_tokens);
  memset(d, 0, sizeof *d);
}

/* Builds rank d's receive lists; token_row entries of tokens it receives are filled in. */
static int ll_recv_build(const ep_ref_ll_world_t* w, int d, int use_fp8, int round_scale, int use_ue8m0,
                         ep_ref_ll_dispatch_t* out) {
  const int R = w->num_ranks, E_loc = w->num_experts / R, K = w->num_topk, H = w->hidden;
  ep_ref_ll_recv_t* r = &out->recv[d];
  r->count = zalloc((size_t)E_loc, sizeof(int));
  r->expert_offset = zalloc((size_t)E_loc + 1, sizeof(int));
  r->range_begin = zalloc((size_t)E_loc * R, sizeof(int));
  r->range_count = zalloc((size_t)E_loc * R, sizeof(int));
  if (!r->count || !r->expert_offset || !r->range_begin || !r->range_count) return -1;

  /* Pass 1: counts and ranges. */
  for (int e = 0; e < E_loc; ++e) {
    const int64_t global = (int64_t)d * E_loc + e;
    for (int s = 0; s < R; ++s) {
      r->range_begin[(size_t)e * R + s] = r->count[e];
      for (int t = 0; t < w->num_tokens[s]; ++t)
        r->range_count[(size_t)e * R + s] += ll_selects(w, s, t, global);
      r->count[e] += r->range_count[(size_t)e * R + s];
    }
    r->expert_offset[e + 1] = r->expert_offset[e] + r->count[e];
  }
  r->num_rows = r->expert_offset[E_loc];

  /* Pass 2: rows. */
  const size_t rows = (size_t)r->num_rows;
  r->src_rank = zalloc(rows, sizeof(int));
  r->src_idx = zalloc(rows, sizeof(int));
  if (!r->src_rank || !r->src_idx) return -1;
  if (w->x) {
    if (!use_fp8 && !(r->x = zalloc(rows * H, sizeof(uint16_t)))) return -1;
    if (use_fp8 && (!(r->x_fp8 = zalloc(rows * H, 1)) ||
                    !(r->scales = zalloc(rows * (H / EP_REF_FP8_GROUP), sizeof(float)))))
      return -1;
    if (use_ue8m0 && !(r->scales_ue8m0 = zalloc(rows * (H / (4 * EP_REF_FP8_GROUP)), sizeof(uint32_t))))
      return -1;
  }
  for (int e = 0; e < E_loc; ++e) {
    const int64_t global = (int64_t)d * E_loc + e;
    int pos = 0; /* position within expert e's list */
    for (int s = 0; s < R; ++s)
      for (int t = 0; t < w->num_tokens[s]; ++t) {
        if (!ll_selects(w, s, t, global)) continue;
        const size_t row = (size_t)r->expert_offset[e] + pos;
        r->src_rank[row] = s;
        r->src_idx[row] = t;
        for (int k = 0; k < K; ++k)
          if (w->topk_idx[s][(size_t)t * K + k] == global) out->token_row[s][(size_t)t * K + k] = pos;
        const uint16_t* xs = w->x ? w->x[s] + (size_t)t * H : NULL;
        if (r->x) memcpy(r->x + row * H, xs, sizeof(uint16_t) * (size_t)H);
        if (r->x_fp8) {
          const int groups = H / EP_REF_FP8_GROUP;
          float* sc = r->scales + row * groups;
          ep_ref_cast_row_fp8(xs, H, round_scale, r->x_fp8 + row * H, sc);
          if (r->scales_ue8m0)
            for (int j = 0; j < groups / 4; ++j)
              r->scales_ue8m0[row * (groups / 4) + j] = ep_ref_pack_ue8m0(sc + 4 * j);
        }
        ++pos;
      }
  }
  return 0;
}

/* Destination ranks [d_first, d_last] get their receive lists; the others stay empty. */
static int ll_dispatch(const ep_ref_ll_world_t* w, int d_first, int d_last, int use_fp8, int round_scale, int use_ue8m0,
                       ep_ref_ll_dispatch_t* out) {
  if (!out) return -1;
  memset(out, 0, sizeof *out);
  if (!ll_world_ok(w)) return -1;
  if (use_fp8 && w->hidden % EP_REF_FP8_GROUP != 0) return -1;
  if (use_ue8m0 && (!use_fp8 || !round_scale || w->hidden % (4 * EP_REF_FP8_GROUP) != 0)) return -1;

  const int R = w->num_ranks, K = w->num_topk;
  if (d_first < 0 || d_last >= R || d_first > d_last) return -1;
  out->num_ranks = R;
  out->num_local_experts = w->num_experts / R;
  out->num_topk = K;
  out->hidden = w->hidden;
  out->max_tokens_per_rank = w->max_tokens_per_rank;
  out->num_tokens = zalloc((size_t)R, sizeof(int));
  out->recv = zalloc((size_t)R, sizeof(ep_ref_ll_recv_t));
  out->token_row = zalloc((size_t)R, sizeof(int*));
  if (!out->num_tokens || !out->recv || !out->token_row) goto fail;
  memcpy(out->num_tokens, w->num_tokens, sizeof(int) * (size_t)R);
  for (int s = 0; s < R; ++s) {
    const size_t slots = (size_t)w->num_tokens[s] * K;
    if (!(out->token_row[s] = zalloc(slots, sizeof(int)))) goto fail;
    for (size_t i = 0; i < slots; ++i) out->token_row[s][i] = -1;
  }
  for (int d = d_first; d <= d_last; ++d)
    if (ll_recv_build(w, d, use_fp8, round_scale, use_ue8m0, out) != 0) goto fail;
  return 0;

fail:
  ep_ref_ll_dispatch_free(out);
  return -1;
}

int ep_ref_ll_dispatch(const ep_ref_ll_world_t* w, int use_fp8, int round_scale, int use_ue8m0,
                       ep_ref_ll_dispatch_t* out) {
  return ll_dispatch(w, 0, w ? w->num_ranks - 1 : 0, use_fp8, round_scale, use_ue8m0, out);
}

int ep_ref_ll_dispatch_to(const ep_ref_ll_world_t* w, int dst_rank, int use_fp8, int round_scale, int use_ue8m0,
                          ep_ref_ll_dispatch_t* out) {
  return ll_dispatch(w, dst_rank, dst_rank, use_fp8, round_scale, use_ue8m0, out);
}

/* ================================================================================================
 * 7. Low-latency combine
 * ============================================================================================== */

/* The one accumulation rule both combine forms share; y_rows[k] is slot k's expert row or NULL. */
static void ll_combine_token(const ep_ref_ll_world_t* w, int s, int t, const uint16_t* const* y_rows,
                             uint16_t* out_row) {
  const int K = w->num_topk;
  const float* wt = w->topk_weights[s] + (size_t)t * K;
  for (int c = 0; c < w->hidden; ++c) {
    float acc = 0.0f;
    for (int k = 0; k < K; ++k)
      if (y_rows[k]) acc = fmaf(wt[k], ep_ref_bf16_to_f32(y_rows[k][c]), acc);
    out_row[c] = ep_ref_f32_to_bf16(acc);
  }
}

int ep_ref_ll_combine(const ep_ref_ll_world_t* w, const ep_ref_ll_dispatch_t* disp, const uint16_t* const* y,
                      uint16_t* const* out) {
  if (!ll_world_ok(w) || !w->topk_weights || !disp || !disp->token_row || !y || !out ||
      disp->num_ranks != w->num_ranks || disp->num_topk != w->num_topk || disp->hidden != w->hidden)
    return -1;
  const int R = w->num_ranks, E_loc = w->num_experts / R, K = w->num_topk, H = w->hidden;
  const size_t expert_rows = (size_t)R * w->max_tokens_per_rank;
  const uint16_t** y_rows = zalloc((size_t)K, sizeof *y_rows);
  if (!y_rows) return -1;
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < w->num_tokens[s] && out[s]; ++t) {
      for (int k = 0; k < K; ++k) {
        int64_t e = w->topk_idx[s][(size_t)t * K + k];
        int pos = disp->token_row[s][(size_t)t * K + k];
        y_rows[k] = e < 0 ? NULL : y[e / E_loc] + ((size_t)(e % E_loc) * expert_rows + (size_t)pos) * H;
      }
      ll_combine_token(w, s, t, y_rows, out[s] + (size_t)t * H);
    }
  free(y_rows);
  return 0;
}

/* The sums form's rule (ep_ref.h 7): slot k's expert row y_rows[k] (NULL for -1). */
static void ll_combine_token_sums(const ep_ref_ll_world_t* w, int s, int t, const uint16_t* const* y_rows,
                                  uint16_t* out_row) {
  const int K = w->num_topk, E_loc = w->num_experts / w->num_ranks;
  const int64_t* idx = w->topk_idx[s] + (size_t)t * K;
  const float* wt = w->topk_weights[s] + (size_t)t * K;
  for (int c = 0; c < w->hidden; ++c) {
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) {
      if (!y_rows[k]) continue;
      const int64_t rank = idx[k] / E_loc;
      int rank_first = 1; /* no earlier valid slot on the same rank */
      for (int q = 0; q < k; ++q) rank_first &= !(y_rows[q] && idx[q] / E_loc == rank);
      if (!rank_first) continue;
      float partial = 0.0f;
      for (int k2 = k; k2 < K; ++k2) {
        if (!y_rows[k2] || idx[k2] / E_loc != rank) continue;
        int expert_first = 1;
        for (int q = 0; q < k2; ++q) expert_first &= idx[q] != idx[k2];
        if (!expert_first) continue;
        float weight = 0.0f; /* the expert's weights, in slot order */
        for (int q = k2; q < K; ++q)
          if (idx[q] == idx[k2]) weight += wt[q];
        partial = fmaf(weight, ep_ref_bf16_to_f32(y_rows[k2][c]), partial);
      }
      acc = fmaf(1.0f, ep_ref_bf16_to_f32(ep_ref_f32_to_bf16(partial)), acc);
    }
    out_row[c] = ep_ref_f32_to_bf16(acc);
  }
}

/* ---- LogFMT-10 (ep_ref.h 7b) ---- */
size_t ep_ref_logfmt_row_bytes(int hidden) { return (size_t)hidden * 10 / 8 + (size_t)hidden / 128 * 4; }

float ep_ref_logfmt_log2(uint16_t v) {
  const int e = (v >> 7) & 0xff, m = v & 0x7f;
  if (e == 0) return -INFINITY; /* zero or subnormal */
  return (float)(e - 127) + (float)log2(1.0 + m / 128.0);
}

/* 2^y: 2^frac by a degree-7 Taylor polynomial (fmaf, float coefficients), scaled by 2^floor exactly. */
static float logfmt_exp2(float y) {
  static const float c[8] = {1.0f,
                             0.693147180559945f,
                             0.240226506959101f,
                             0.0555041086648216f,
                             0.00961812910762848f,
                             0.00133335581464284f,
                             0.000154035303933816f,
                             0.0000152527338040598f};
  const float n = floorf(y), f = y - n;
  float p = c[7];
  for (int i = 6; i >= 0; --i) p = fmaf(p, f, c[i]);
  return ldexpf(p, (int)n);
}

static void logfmt_group_params(uint16_t amax, uint16_t amin, float* lb, float* step) {
  const float la = ep_ref_logfmt_log2(amax), lo = ep_ref_logfmt_log2(amin);
  *lb = lo > la - 32.0f ? lo : la - 32.0f;
  *step = (la - *lb) / 510.0f;
}

void ep_ref_logfmt_encode(const uint16_t* x, int hidden, uint8_t* row) {
  const int G = hidden / 128;
  memset(row, 0, ep_ref_logfmt_row_bytes(hidden));
  for (int g = 0; g < G; ++g) {
    const uint16_t* v = x + (size_t)g * 128;
    uint16_t amax = 0, amin = 0x7f80; /* magnitudes compare as integers; amin over the normal ones */
    for (int j = 0; j < 128; ++j) {
      const uint16_t a = v[j] & 0x7fff;
      if (a > amax) amax = a;
      if (a >= 0x0080 && a < amin) amin = a;
    }
    if (amin == 0x7f80) amin = 0;
    const uint32_t meta = (uint32_t)amax | (uint32_t)amin << 16;
    memcpy(row + (size_t)g * 4, &meta, 4);
    uint8_t* block = row + (size_t)G * 4 + (size_t)g * 160;
    if (ep_ref_logfmt_log2(amax) == -INFINITY) continue; /* all zero (or subnormal): codes 0 */
    float lb, step;
    logfmt_group_params(amax, amin, &lb, &step);
    const float inv = 1.0f / step;
    for (int j = 0; j < 128; ++j) {
      const float l = ep_ref_logfmt_log2(v[j] & 0x7fff);
      int code = 0;
      if (l != -INFINITY) {
        if (step == 0.0f) {
          code = 1;
        } else {
          const float t = floorf(fmaf(l - lb, inv, 1.5f));
          code = t < 0.0f ? 0 : t > 511.0f ? 511 : (int)t;
        }
      }
      const unsigned field = code ? (unsigned)(v[j] >> 15) << 9 | (unsigned)code : 0u;
      block[j] = (uint8_t)field;
      block[128 + j / 4] |= (uint8_t)((field >> 8) << (2 * (j % 4)));
    }
  }
}

void ep_ref_logfmt_decode(const uint8_t* row, int hidden, float* out) {
  const int G = hidden / 128;
  for (int g = 0; g < G; ++g) {
    uint32_t meta;
    memcpy(&meta, row + (size_t)g * 4, 4);
    const uint8_t* block = row + (size_t)G * 4 + (size_t)g * 160;
    float lb = 0.0f, step = 0.0f;
    if (ep_ref_logfmt_log2((uint16_t)meta) != -INFINITY)
      logfmt_group_params((uint16_t)meta, (uint16_t)(meta >> 16), &lb, &step);
    for (int j = 0; j < 128; ++j) {
      const unsigned field = block[j] | ((block[128 + j / 4] >> (2 * (j % 4))) & 3u) << 8;
      const unsigned code = field & 511u;
      const float mag = code ? logfmt_exp2(fmaf((float)(code - 1), step, lb)) : 0.0f;
      out[(size_t)g * 128 + j] = field >> 9 ? -mag : mag;
    }
  }
}

/* The LogFMT form of section 7: each slot's row decoded from its encoding, then the same sum. */
static void ll_combine_token_logfmt(const ep_ref_ll_world_t* w, int s, int t, const uint16_t* const* y_rows,
                                    uint8_t* wire, float* decoded, uint16_t* out_row) {
  const int K = w->num_topk, H = w->hidden;
  const float* wt = w->topk_weights[s] + (size_t)t * K;
  for (int k = 0; k < K; ++k)
    if (y_rows[k]) {
      ep_ref_logfmt_encode(y_rows[k], H, wire);
      ep_ref_logfmt_decode(wire, H, decoded + (size_t)k * H);
    }
  for (int c = 0; c < H; ++c) {
    float acc = 0.0f;
    for (int k = 0; k < K; ++k)
      if (y_rows[k]) acc = fmaf(wt[k], decoded[(size_t)k * H + c], acc);
    out_row[c] = ep_ref_f32_to_bf16(acc);
  }
}

/* The combine forms with Y from fn (0 rows, 1 sums, 2 LogFMT rows): each token's slot rows, then its rule. */
static int ll_combine_fn(const ep_ref_ll_world_t* w, ep_ref_expert_fn fn, void* ctx, uint16_t* const* out, int form) {
  if (!ll_world_ok(w) || !w->topk_weights || !fn || !out) return -1;
  const int R = w->num_ranks, E_loc = w->num_experts / R, K = w->num_topk, H = w->hidden;
  uint16_t* rows = zalloc((size_t)K * H, sizeof(uint16_t));
  const uint16_t** y_rows = zalloc((size_t)K, sizeof *y_rows);
  uint8_t* wire = form == 2 ? zalloc(ep_ref_logfmt_row_bytes(H) + 1, 1) : NULL;
  float* decoded = form == 2 ? zalloc((size_t)K * H + 1, sizeof(float)) : NULL;
  if (!rows || !y_rows || (form == 2 && (!wire || !decoded))) {
    free(rows);
    free(y_rows);
    free(wire);
    free(decoded);
    return -1;
  }
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < w->num_tokens[s] && out[s]; ++t) {
      for (int k = 0; k < K; ++k) {
        int64_t e = w->topk_idx[s][(size_t)t * K + k];
        y_rows[k] = NULL;
        if (e < 0) continue;
        fn(ctx, (int)(e / E_loc), (int)(e % E_loc), s, t, H, rows + (size_t)k * H);
        y_rows[k] = rows + (size_t)k * H;
      }
      if (form == 1) ll_combine_token_sums(w, s, t, y_rows, out[s] + (size_t)t * H);
      else if (form == 2) ll_combine_token_logfmt(w, s, t, y_rows, wire, decoded, out[s] + (size_t)t * H);
      else ll_combine_token(w, s, t, y_rows, out[s] + (size_t)t * H);
    }
  free(rows);
  free(y_rows);
  free(wire);
  free(decoded);
  return 0;
}

int ep_ref_ll_combine_fn(const ep_ref_ll_world_t* w, ep_ref_expert_fn fn, void* ctx, uint16_t* const* out) {
  return ll_combine_fn(w, fn, ctx, out, 0);
}

int ep_ref_ll_combine_sums_fn(const ep_ref_ll_world_t* w, ep_ref_expert_fn fn, void* ctx, uint16_t* const* out) {
  return ll_combine_fn(w, fn, ctx, out, 1);
}

int ep_ref_ll_combine_logfmt_fn(const ep_ref_ll_world_t* w, ep_ref_expert_fn fn, void* ctx, uint16_t* const* out) {
  return ll_combine_fn(w, fn, ctx, out, 2);
}

int ep_ref_ll_fill_expert_outputs(const ep_ref_ll_dispatch_t* disp, ep_ref_expert_fn fn, void* ctx,
                                  uint16_t* const* y) {
  if (!disp || !disp->recv || !fn || !y) return -1;
  const int R = disp->num_ranks, E_loc = disp->num_local_experts, H = disp->hidden;
  const size_t expert_rows = (size_t)R * disp->max_tokens_per_rank;
  for (int d = 0; d < R; ++d) {
    const ep_ref_ll_recv_t* r = &disp->recv[d];
    const size_t elems = (size_t)E_loc * expert_rows * H;
    if (elems) memset(y[d], 0, sizeof(uint16_t) * elems);
    for (int e = 0; e < E_loc; ++e)
      for (int i = 0; i < r->count[e]; ++i) {
        const int row = r->expert_offset[e] + i;
        fn(ctx, d, e, r->src_rank[row], r->src_idx[row], H, y[d] + ((size_t)e * expert_rows + (size_t)i) * H);
      }
  }
  return 0;
}

/* ================================================================================================
 * 8. Internode routing counts
 * ============================================================================================== */

int ep_ref_internode_counts(const ep_ref_world_t* w, uint8_t* const* is_token_in_node, int* num_node_sends,
                            int* num_recv_rows) {
  if (!world_ok(w)) return -1;
  const int R = w->num_ranks, rpn = w->ranks_per_node, num_nodes = R / rpn;
  uint8_t** in_rank = world_routing_all(w);
  if (!in_rank) return -1;
  if (num_node_sends) memset(num_node_sends, 0, sizeof(int) * (size_t)R);
  if (num_recv_rows) memset(num_recv_rows, 0, sizeof(int) * (size_t)R);
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < w->num_tokens[s]; ++t) {
      const uint8_t* to = in_rank[s] + (size_t)t * R;
      for (int n = 0; n < num_nodes; ++n) {
        int hit = 0;
        for (int r = n * rpn; r < (n + 1) * rpn; ++r) hit |= to[r] != 0;
        if (is_token_in_node) is_token_in_node[s][(size_t)t * num_nodes + n] = (uint8_t)hit;
        if (num_node_sends) num_node_sends[s] += hit;
      }
      if (num_recv_rows)
        for (int d = 0; d < R; ++d) num_recv_rows[d] += to[d] != 0;
    }
  free_routing(in_rank, R);
  return 0;
}
