/* families.cu: the rows of the table, one function per family.
 *
 * To add a dispatch/combine family (intranode, low-latency): write family_<name>(bench_t*) (here, or in a bench/
 * file of its own, declared in bench.h) and list it in kFamilies (ep_bench.cu). It times ep's calls with
 * bench_time_phases, validates their outputs, times the NCCL user path on the same shape with time_nccl_user
 * for the baseline columns, and ends with bench_report_row. */
#include <vector>

#include <cuda_fp8.h>

#include "nccl_baseline.h"
#include "timing.h"

extern "C" {
#include "ref/ep_ref.h"
}

template <typename V>
static std::vector<V> to_host(bench_t* b, const V* device, size_t n) {
  std::vector<V> host(n);
  CUDA_OK(cudaMemcpyAsync(host.data(), device, n * sizeof(V), cudaMemcpyDeviceToHost, b->stream));
  CUDA_OK(cudaStreamSynchronize(b->stream));
  return host;
}

/* Fills with 0xff bytes, so that an unwritten output shows (-1 counts, 2 in a 0/1 flag, NaN in bf16). */
static void poison(bench_t* b, void* device, size_t bytes) {
  CUDA_OK(cudaMemsetAsync(device, 0xff, bytes, b->stream));
}

template <typename V>
static long count_mismatches(const bench_t* b, const char* what, const V* got, const V* want, size_t n) {
  long bad = 0;
  for (size_t i = 0; i < n; ++i)
    if (got[i] != want[i] && bad++ == 0)
      fprintf(stderr, "ep_bench rank %d: %s[%zu] = %lld, want %lld\n", b->rank, what, i, (long long)got[i],
              (long long)want[i]);
  if (bad) fprintf(stderr, "ep_bench rank %d: %s: %ld of %zu differ\n", b->rank, what, bad, n);
  return bad;
}

/* ------------------------------------------------------------------------------------------------------------
 * layout: ep_get_dispatch_layout against the reference layout of this rank's routing
 * ------------------------------------------------------------------------------------------------------------ */
void family_layout(bench_t* b) {
  const int R = b->num_ranks, T = b->opt.tokens, K = b->opt.topk, E = b->opt.experts;
  const int ranks_per_node = b->info.ranks_per_node > 0 ? b->info.ranks_per_node : R;
  const int num_nodes = R / ranks_per_node;
  int *d_per_rank, *d_per_node, *d_per_expert;
  uint8_t* d_in_rank;
  CUDA_OK(cudaMalloc(&d_per_rank, R * sizeof(int)));
  CUDA_OK(cudaMalloc(&d_per_node, num_nodes * sizeof(int)));
  CUDA_OK(cudaMalloc(&d_per_expert, E * sizeof(int)));
  CUDA_OK(cudaMalloc(&d_in_rank, (size_t)T * R + 1));
  poison(b, d_per_rank, R * sizeof(int));
  poison(b, d_per_node, num_nodes * sizeof(int));
  poison(b, d_per_expert, E * sizeof(int));
  poison(b, d_in_rank, (size_t)T * R);

  ep_layout_args_t args = EP_LAYOUT_ARGS_INIT;
  args.topk_idx = b->d_topk_idx;
  args.num_tokens = T;
  args.num_topk = K;
  args.num_experts = E;
  args.num_tokens_per_rank = d_per_rank;
  args.num_tokens_per_node = d_per_node;
  args.num_tokens_per_expert = d_per_expert;
  args.is_token_in_rank = d_in_rank;
  const bench_phase_fn layout = [&] { EP_OK(b->group, ep_get_dispatch_layout(b->group, &args, b->stream)); };
  double layout_us;
  bench_time_phases(b, 1, &layout, &layout_us);
  ep_status_t async_status;
  EP_OK(b->group, ep_get_async_error(b->group, &async_status));
  if (async_status != EP_STATUS_SUCCESS)
    bench_die(__FILE__, __LINE__, "ep_get_dispatch_layout (device)", ep_status_string(async_status),
              ep_last_error(b->group));

  std::vector<int> want_rank(R), want_node(num_nodes), want_expert(E);
  std::vector<uint8_t> want_in_rank((size_t)T * R + 1);
  int bad_token = -1;
  if (ep_ref_layout(R, ranks_per_node, E, T, K, b->topk_idx[b->rank], want_rank.data(), want_node.data(),
                    want_expert.data(), want_in_rank.data(), &bad_token) != 0)
    bench_die(__FILE__, __LINE__, "ep_ref_layout", "the reference rejected the routing", "");
  long mismatches = 0;
  mismatches += count_mismatches(b, "num_tokens_per_rank", to_host(b, d_per_rank, R).data(), want_rank.data(), R);
  mismatches += count_mismatches(b, "num_tokens_per_node", to_host(b, d_per_node, num_nodes).data(),
                                 want_node.data(), num_nodes);
  mismatches += count_mismatches(b, "num_tokens_per_expert", to_host(b, d_per_expert, E).data(),
                                 want_expert.data(), E);
  mismatches += count_mismatches(b, "is_token_in_rank", to_host(b, d_in_rank, (size_t)T * R).data(),
                                 want_in_rank.data(), (size_t)T * R);
  CUDA_OK(cudaFree(d_per_rank));
  CUDA_OK(cudaFree(d_per_node));
  CUDA_OK(cudaFree(d_per_expert));
  CUDA_OK(cudaFree(d_in_rank));

  bench_row_t row = bench_row_make("layout", "-");
  row.dispatch_us = layout_us;
  row.validated = 1;
  row.mismatches = mismatches;
  bench_report_row(b, &row);
}

/* ------------------------------------------------------------------------------------------------------------
 * nccl: the baseline alone (nccl-a2a: the exchange; nccl-user: permute + exchange, inverse exchange + reduce)
 * ------------------------------------------------------------------------------------------------------------ */

/* The NCCL user path's dispatch and combine on b's shape, each rank's median (the baseline columns). */
static void time_nccl_user(bench_t* b, nccl_user_t* u, double* dispatch_us, double* combine_us) {
  const bench_phase_fn phases[2] = {
      [&] { nccl_user_dispatch(u, b->d_x, b->comm, b->stream); },
      /* The experts hand back what they received: the combine's input is the dispatch's output. */
      [&] { nccl_user_combine(u, u->recv_rows, b->comm, b->stream); },
  };
  double us[2];
  bench_time_phases(b, 2, phases, us);
  *dispatch_us = us[0];
  *combine_us = us[1];
}

/* The counts NCCL exchanged against those computed from every rank's routing. */
static long check_recv_counts(const bench_t* b, const nccl_plan_t* plan) {
  const int R = b->num_ranks, T = b->opt.tokens;
  std::vector<int> want(R, 0);
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < T; ++t) want[s] += b->is_token_in_rank[s][(size_t)t * R + b->rank] != 0;
  return count_mismatches(b, "nccl recv_count", plan->recv_count, want.data(), R);
}

/* The same for the first `tokens` tokens of every rank. */
static long check_recv_counts_n(const bench_t* b, const nccl_plan_t* plan, int tokens) {
  const int R = b->num_ranks;
  std::vector<int> want(R, 0);
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < tokens; ++t) want[s] += b->is_token_in_rank[s][(size_t)t * R + b->rank] != 0;
  return count_mismatches(b, "nccl recv_count", plan->recv_count, want.data(), R);
}

/* Received rows: from each source rank s, in s's token order, the tokens t routed here, holding
 * bench_value(s, t, c). */
static long check_dispatched_rows(bench_t* b, const char* what, const nccl_plan_t* plan,
                                  const __nv_bfloat16* d_rows) {
  const int R = b->num_ranks, T = b->opt.tokens, H = b->opt.hidden;
  const std::vector<uint16_t> rows = to_host(b, (const uint16_t*)d_rows, (size_t)plan->num_recv_rows * H);
  long bad = 0;
  for (int s = 0; s < R; ++s) {
    int row = plan->recv_offset[s];
    const int end = row + plan->recv_count[s];
    for (int t = 0; t < T && row < end; ++t) {
      if (!b->is_token_in_rank[s][(size_t)t * R + b->rank]) continue;
      const uint16_t* got = &rows[(size_t)row * H];
      for (int c = 0; c < H; ++c) {
        const uint16_t want = bench_exact_bf16(bench_value(s, t, c));
        if (got[c] != want && bad++ == 0)
          fprintf(stderr, "ep_bench rank %d: %s: row %d (rank %d token %d) channel %d = 0x%04x, want 0x%04x\n",
                  b->rank, what, row, s, t, c, got[c], want);
      }
      ++row;
    }
  }
  if (bad) fprintf(stderr, "ep_bench rank %d: %s: %ld values differ\n", b->rank, what, bad);
  return bad;
}

/* Combine output when every rank sent back the rows it received: x[t][c] times the ranks t went to, summed in
 * fp32 and rounded to bf16 (exact for the small integers of bench_value). */
static long check_combined(bench_t* b, const char* what, const __nv_bfloat16* d_out) {
  const int R = b->num_ranks, T = b->opt.tokens, H = b->opt.hidden;
  const std::vector<uint16_t> out = to_host(b, (const uint16_t*)d_out, (size_t)T * H);
  long bad = 0;
  for (int t = 0; t < T; ++t) {
    int copies = 0;
    for (int d = 0; d < R; ++d) copies += b->is_token_in_rank[b->rank][(size_t)t * R + d] != 0;
    for (int c = 0; c < H; ++c) {
      const uint16_t want = ep_ref_f32_to_bf16(bench_value(b->rank, t, c) * (float)copies);
      const uint16_t got = out[(size_t)t * H + c];
      if (got != want && bad++ == 0)
        fprintf(stderr, "ep_bench rank %d: %s: token %d channel %d = 0x%04x, want 0x%04x\n", b->rank, what, t, c,
                got, want);
    }
  }
  if (bad) fprintf(stderr, "ep_bench rank %d: %s: %ld values differ\n", b->rank, what, bad);
  return bad;
}

void family_nccl(bench_t* b) {
  if (!b->comm) {
    if (b->rank == 0) printf("nccl: no rows (ranks share a GPU, which NCCL refuses)\n");
    return;
  }
  const size_t row_bytes = (size_t)b->opt.hidden * sizeof(__nv_bfloat16);
  nccl_user_t u;
  nccl_user_create(&u, b->is_token_in_rank[b->rank], b->opt.tokens, b->opt.hidden, b->rank, b->num_ranks, b->comm,
                   b->stream);
  const long count_errors = check_recv_counts(b, &u.plan);
  /* DeepEP's count: rows received, the local rank's own share included (combine sends the same rows back). */
  const double bytes = (double)u.plan.num_recv_rows * row_bytes;

  /* nccl-a2a: the rows already sit in per-destination order; only the exchange is timed. */
  nccl_permute(&u.plan, b->d_x, u.send_rows, row_bytes, b->stream);
  poison(b, u.recv_rows, (size_t)u.plan.num_recv_rows * row_bytes);
  const bench_phase_fn exchange = [&] {
    nccl_exchange(&u.plan, u.send_rows, u.recv_rows, row_bytes, 0, b->comm, b->stream);
  };
  bench_row_t a2a = bench_row_make("nccl-a2a", "bf16");
  bench_time_phases(b, 1, &exchange, &a2a.dispatch_us);
  a2a.bytes = bytes;
  a2a.validated = 1;
  a2a.mismatches = count_errors + check_dispatched_rows(b, "nccl-a2a", &u.plan, u.recv_rows);
  bench_report_row(b, &a2a);

  /* nccl-user: the whole path a user writes. */
  poison(b, u.send_rows, (size_t)u.plan.num_send_rows * row_bytes);
  poison(b, u.recv_rows, (size_t)u.plan.num_recv_rows * row_bytes);
  poison(b, u.out, (size_t)b->opt.tokens * row_bytes);
  bench_row_t user = bench_row_make("nccl-user", "bf16");
  time_nccl_user(b, &u, &user.dispatch_us, &user.combine_us);
  user.bytes = bytes;
  user.validated = 1;
  user.mismatches = count_errors + check_dispatched_rows(b, "nccl-user dispatch", &u.plan, u.recv_rows) +
                    check_combined(b, "nccl-user combine", u.out);
  bench_report_row(b, &user);
  nccl_user_destroy(&u);
}

/* ------------------------------------------------------------------------------------------------------------
 * intranode: the normal path (ep_dispatch_prepare, ep_dispatch, ep_combine) in BF16 and FP8, per SM count,
 * (rows `internode`, with DeepEP's RDMA byte count too, when the group has virtual nodes: same calls, same checks)
 * next to the NCCL user path on the same shape
 * ------------------------------------------------------------------------------------------------------------ */

/* Ends the run when a kernel of `what` recorded a device fault (bad data, a peer that timed out). */
static void check_async(bench_t* b, const char* what) {
  CUDA_OK(cudaStreamSynchronize(b->stream));
  ep_status_t async_status;
  EP_OK(b->group, ep_get_async_error(b->group, &async_status));
  if (async_status != EP_STATUS_SUCCESS)
    bench_die(__FILE__, __LINE__, what, ep_status_string(async_status), ep_last_error(b->group));
}

/* This rank's tokens as FP8: e4m3(bench_value(rank, t, c)) and the scales bench_fp8_scale(rank, t, g). */
__global__ void fill_fp8_tokens(uint8_t* x, float* scales, int rank, int tokens, int hidden) {
  const size_t n = (size_t)tokens * hidden;
  const int groups = hidden / 128;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const int t = (int)(i / hidden), c = (int)(i % hidden);
    x[i] = (uint8_t)__nv_cvt_float_to_fp8(bench_value(rank, t, c), __NV_SATFINITE, __NV_E4M3);
    if (c % 128 == 0) scales[(size_t)t * groups + c / 128] = bench_fp8_scale(rank, t, c / 128);
  }
}

/* Where a received row comes from. */
typedef struct src_row {
  int rank, token;
} src_row_t;

/* The rows this rank receives, in dispatch order (source rank, then source token), from every rank's routing. */
static std::vector<src_row_t> expected_recv_rows(const bench_t* b) {
  const int R = b->num_ranks, T = b->opt.tokens;
  std::vector<src_row_t> rows;
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < T; ++t)
      if (b->is_token_in_rank[s][(size_t)t * R + b->rank]) rows.push_back(src_row_t{s, t});
  return rows;
}

/* BF16 rows [rows.size(), hidden]: row i holds bench_value(rows[i].rank, rows[i].token, c). */
static long check_bf16_rows(bench_t* b, const char* what, const std::vector<src_row_t>& rows, const void* d_rows) {
  const int H = b->opt.hidden;
  const std::vector<uint16_t> got = to_host(b, (const uint16_t*)d_rows, rows.size() * H);
  long bad = 0;
  for (size_t i = 0; i < rows.size(); ++i)
    for (int c = 0; c < H; ++c) {
      const uint16_t want = bench_exact_bf16(bench_value(rows[i].rank, rows[i].token, c));
      const uint16_t have = got[i * H + c];
      if (have != want && bad++ == 0)
        fprintf(stderr, "ep_bench rank %d: %s: row %zu (rank %d token %d) channel %d = 0x%04x, want 0x%04x\n",
                b->rank, what, i, rows[i].rank, rows[i].token, c, have, want);
    }
  if (bad) fprintf(stderr, "ep_bench rank %d: %s: %ld values differ\n", b->rank, what, bad);
  return bad;
}

/* FP8 rows [rows.size(), hidden] e4m3 and their scales [rows.size(), hidden / 128], as fill_fp8_tokens made them
 * on the source rank (expected bytes from the reference's conversion). */
static long check_fp8_rows(bench_t* b, const char* what, const std::vector<src_row_t>& rows, const void* d_rows,
                           const float* d_scales) {
  const int H = b->opt.hidden, G = H / 128;
  const std::vector<uint8_t> got = to_host(b, (const uint8_t*)d_rows, rows.size() * H);
  const std::vector<float> got_scales = to_host(b, d_scales, rows.size() * G);
  long bad = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int s = rows[i].rank, t = rows[i].token;
    for (int c = 0; c < H; ++c) {
      const uint8_t want = ep_ref_f32_to_e4m3(bench_value(s, t, c));
      const uint8_t have = got[i * H + c];
      if (have != want && bad++ == 0)
        fprintf(stderr, "ep_bench rank %d: %s: row %zu (rank %d token %d) channel %d = 0x%02x, want 0x%02x\n",
                b->rank, what, i, s, t, c, have, want);
    }
    for (int g = 0; g < G; ++g) {
      const float want = bench_fp8_scale(s, t, g), have = got_scales[i * G + g];
      if (!(have == want) && bad++ == 0)
        fprintf(stderr, "ep_bench rank %d: %s: row %zu (rank %d token %d) scale %d = %g, want %g\n", b->rank, what,
                i, s, t, g, have, want);
    }
  }
  if (bad) fprintf(stderr, "ep_bench rank %d: %s: %ld values differ\n", b->rank, what, bad);
  return bad;
}

/* The prepare's device counts against the reference dispatch of every rank's routing. */
static long check_prepare_counts(bench_t* b, const int* d_num_recv, const int* d_expert_counts,
                                 int expected_num_recv) {
  const int R = b->num_ranks, T = b->opt.tokens, E = b->opt.experts, E_loc = E / R;
  const int ranks_per_node = b->info.ranks_per_node > 0 ? b->info.ranks_per_node : R;
  std::vector<int> num_tokens(R, T);
  ep_ref_world_t world;
  memset(&world, 0, sizeof(world));
  world.num_ranks = R;
  world.ranks_per_node = ranks_per_node;
  world.num_experts = E;
  world.num_topk = b->opt.topk;
  world.num_tokens = num_tokens.data();
  world.topk_idx = (const int64_t* const*)b->topk_idx;
  world.is_token_in_rank = (const uint8_t* const*)b->is_token_in_rank;
  ep_ref_dispatch_t ref;
  if (ep_ref_dispatch(&world, 1, &ref) != 0)
    bench_die(__FILE__, __LINE__, "ep_ref_dispatch", "the reference rejected the routing", "");
  const ep_ref_recv_t* mine = &ref.recv[b->rank];
  long bad = 0;
  if (mine->num_recv != expected_num_recv) { /* the bench's own row list disagrees with the reference */
    fprintf(stderr, "ep_bench rank %d: reference receives %d rows, the row list %d\n", b->rank, mine->num_recv,
            expected_num_recv);
    ++bad;
  }
  bad += count_mismatches(b, "prepare num_recv_tokens_dev", to_host(b, d_num_recv, 1).data(), &mine->num_recv, 1);
  bad += count_mismatches(b, "prepare num_recv_tokens_per_expert_dev", to_host(b, d_expert_counts, E_loc).data(),
                          mine->num_recv_tokens_per_expert, E_loc);
  ep_ref_dispatch_free(&ref);
  return bad;
}

/* This rank's (token, destination node) pairs, its own node included: what DeepEP's internode test counts as
 * RDMA traffic (ep_ref_internode_counts of every rank's routing). */
static int count_node_sends(bench_t* b) {
  const int R = b->num_ranks, T = b->opt.tokens;
  std::vector<int> num_tokens(R, T), node_sends(R, 0), recv(R, 0);
  ep_ref_world_t world;
  memset(&world, 0, sizeof(world));
  world.num_ranks = R;
  world.ranks_per_node = b->ranks_per_node;
  world.num_experts = b->opt.experts;
  world.num_topk = b->opt.topk;
  world.num_tokens = num_tokens.data();
  world.topk_idx = (const int64_t* const*)b->topk_idx;
  world.is_token_in_rank = (const uint8_t* const*)b->is_token_in_rank;
  if (ep_ref_internode_counts(&world, NULL, node_sends.data(), recv.data()) != 0)
    bench_die(__FILE__, __LINE__, "ep_ref_internode_counts", "the reference rejected the routing", "");
  if (b->rank == 0) {
    long sends = 0, rows = 0;
    for (int r = 0; r < R; ++r) {
      sends += node_sends[r];
      rows += recv[r];
    }
    printf("internode %dx%d: per rank on average %.1f (token, node) pairs sent (RDMA count, own node included), "
           "%.1f rows received (NVL count); %.3f nodes and %.3f ranks per token\n",
           b->num_nodes, b->ranks_per_node, (double)sends / R, (double)rows / R,
           T > 0 ? (double)sends / ((double)R * T) : 0.0, T > 0 ? (double)rows / ((double)R * T) : 0.0);
    fflush(stdout);
  }
  return node_sends[b->rank];
}

void family_intranode(bench_t* b) {
  const int R = b->num_ranks, T = b->opt.tokens, H = b->opt.hidden, K = b->opt.topk, E = b->opt.experts;
  const int G = H / 128;
  if (H % 8 != 0)
    bench_die(__FILE__, __LINE__, "family intranode", "--hidden must be a multiple of 8 for BF16 dispatch", "");
  const int with_fp8 = H % 128 == 0;
  if (!with_fp8 && b->rank == 0)
    fprintf(stderr, "ep_bench: intranode fp8 rows skipped: --hidden %d is not a multiple of 128\n", H);
  const std::vector<src_row_t> recv_rows = expected_recv_rows(b);
  const int num_recv = (int)recv_rows.size();
  const size_t bf16_row = (size_t)H * 2, fp8_row = (size_t)H, scale_row = (size_t)G * sizeof(float);
  /* On virtual nodes the same calls run the internode path; the rows say so. Their "RDMA" bytes (DeepEP's count)
   * are this rank's (token, destination node) pairs, own node included, times the row bytes. */
  const int internode = b->num_nodes > 1;
  const char* family = internode ? "internode" : "intranode";
  int node_sends = 0; /* counted after the prepare row, whose line comes first in the table */

  /* FP8 inputs, derived from the same (rank, token, column) as the BF16 ones. */
  uint8_t* d_x_fp8 = NULL;
  float* d_x_scales = NULL;
  if (with_fp8) {
    CUDA_OK(cudaMalloc(&d_x_fp8, ((size_t)T + 1) * fp8_row));
    CUDA_OK(cudaMalloc(&d_x_scales, ((size_t)T + 1) * scale_row));
    if (T > 0) {
      fill_fp8_tokens<<<1024, 256, 0, b->stream>>>(d_x_fp8, d_x_scales, b->rank, T, H);
      LAUNCH_OK();
    }
  }

  /* The baseline first: the NCCL user path on this shape (BF16 dispatch, BF16 combine, FP8 dispatch), validated.
   * Its mismatches count in every row that shows its times. */
  double base_us[3] = {-1, -1, -1}; /* bf16 dispatch, combine, fp8 dispatch */
  long base_bad = 0;
  if (b->comm) {
    nccl_user_t u;
    nccl_user_create(&u, b->is_token_in_rank[b->rank], T, H, b->rank, R, b->comm, b->stream);
    nccl_user_fp8_t u8;
    memset(&u8, 0, sizeof(u8));
    if (with_fp8) nccl_user_fp8_create(&u8, &u.plan, H);
    poison(b, u.recv_rows, (size_t)u.plan.num_recv_rows * bf16_row);
    poison(b, u.out, (size_t)T * bf16_row);
    if (with_fp8) {
      poison(b, u8.recv_rows, (size_t)u.plan.num_recv_rows * fp8_row);
      poison(b, u8.recv_scales, (size_t)u.plan.num_recv_rows * scale_row);
    }
    const bench_phase_fn phases[3] = {
        [&] { nccl_user_dispatch(&u, b->d_x, b->comm, b->stream); },
        [&] { nccl_user_combine(&u, u.recv_rows, b->comm, b->stream); },
        [&] { nccl_user_fp8_dispatch(&u8, d_x_fp8, d_x_scales, b->comm, b->stream); },
    };
    bench_time_phases(b, with_fp8 ? 3 : 2, phases, base_us);
    base_bad = check_recv_counts(b, &u.plan) + check_bf16_rows(b, "nccl-user dispatch", recv_rows, u.recv_rows) +
               check_combined(b, "nccl-user combine", u.out);
    if (with_fp8) {
      base_bad += check_fp8_rows(b, "nccl-user fp8 dispatch", recv_rows, u8.recv_rows, u8.recv_scales);
      nccl_user_fp8_destroy(&u8);
    }
    nccl_user_destroy(&u);
  }

  /* prepare: the graph-safe form (counts in device memory, no host wait), the routing of this run. Every timed
   * call refills the handle with the same routing, so the handle is ready for the dispatch rows below. */
  ep_handle_t handle = NULL;
  EP_OK(b->group, ep_handle_create(b->group, &handle));
  int *d_num_recv, *d_expert_counts;
  CUDA_OK(cudaMalloc(&d_num_recv, sizeof(int)));
  CUDA_OK(cudaMalloc(&d_expert_counts, (size_t)(E / R) * sizeof(int)));
  poison(b, d_num_recv, sizeof(int));
  poison(b, d_expert_counts, (size_t)(E / R) * sizeof(int));
  ep_dispatch_prepare_args_t prep = EP_DISPATCH_PREPARE_ARGS_INIT;
  prep.topk_idx = b->d_topk_idx;
  prep.num_tokens = T;
  prep.num_topk = K;
  prep.num_experts = E;
  prep.expert_alignment = 1;
  prep.num_recv_tokens_dev = d_num_recv;
  prep.num_recv_tokens_per_expert_dev = d_expert_counts;
  const bench_phase_fn prepare = [&] { EP_OK(b->group, ep_dispatch_prepare(b->group, handle, &prep, b->stream)); };
  bench_row_t prep_row = bench_row_make("prepare", "-");
  bench_time_phases(b, 1, &prepare, &prep_row.dispatch_us);
  check_async(b, "ep_dispatch_prepare (device)");
  prep_row.validated = 1;
  prep_row.mismatches = check_prepare_counts(b, d_num_recv, d_expert_counts, num_recv);
  bench_report_row(b, &prep_row);
  if (internode) node_sends = count_node_sends(b);

  /* Outputs sized for the graph-safe form's worst-case bound: every token of every rank. */
  const int capacity = R * T;
  void *recv_bf16, *recv_fp8 = NULL, *combined;
  float* recv_scales = NULL;
  CUDA_OK(cudaMalloc(&recv_bf16, ((size_t)capacity + 1) * bf16_row));
  CUDA_OK(cudaMalloc(&combined, ((size_t)T + 1) * bf16_row));
  if (with_fp8) {
    CUDA_OK(cudaMalloc(&recv_fp8, ((size_t)capacity + 1) * fp8_row));
    CUDA_OK(cudaMalloc(&recv_scales, ((size_t)capacity + 1) * scale_row));
  }

  /* BF16 rows, then FP8 rows; one per SM count. The FP8 rows' combine takes the BF16 rows of the last BF16
   * dispatch (validated) as the experts' outputs: combine is BF16 in both. */
  for (int fp8 = 0; fp8 <= with_fp8; ++fp8) {
    for (int i = 0; i < b->opt.num_sms_list; ++i) {
      const int sms = b->opt.sms[i];
      ep_dispatch_args_t disp = EP_DISPATCH_ARGS_INIT;
      disp.x = fp8 ? (const void*)d_x_fp8 : (const void*)b->d_x;
      disp.x_dtype = fp8 ? EP_FP8_E4M3 : EP_BF16;
      disp.hidden = H;
      disp.x_scales = fp8 ? d_x_scales : NULL;
      disp.recv_capacity = capacity;
      disp.recv_x = fp8 ? recv_fp8 : recv_bf16;
      disp.recv_x_scales = fp8 ? recv_scales : NULL;
      disp.num_sms = sms;
      ep_combine_args_t comb = EP_COMBINE_ARGS_INIT;
      comb.x = recv_bf16;
      comb.hidden = H;
      comb.combined_x = combined;
      comb.num_sms = sms;

      if (fp8) {
        poison(b, recv_fp8, (size_t)capacity * fp8_row);
        poison(b, recv_scales, (size_t)capacity * scale_row);
      } else {
        poison(b, recv_bf16, (size_t)capacity * bf16_row);
      }
      poison(b, combined, (size_t)T * bf16_row);
      const bench_phase_fn phases[2] = {
          [&] { EP_OK(b->group, ep_dispatch(b->group, handle, &disp, b->stream)); },
          [&] { EP_OK(b->group, ep_combine(b->group, handle, &comb, b->stream)); },
      };
      double us[2];
      bench_time_phases(b, 2, phases, us);
      check_async(b, internode ? (fp8 ? "internode fp8 dispatch/combine (device)"
                                      : "internode bf16 dispatch/combine (device)")
                               : (fp8 ? "intranode fp8 dispatch/combine (device)"
                                      : "intranode bf16 dispatch/combine (device)"));

      bench_row_t row = bench_row_make(family, fp8 ? "fp8" : "bf16");
      row.sms = sms;
      row.dispatch_us = us[0];
      row.combine_us = us[1];
      row.bytes = (double)num_recv * (fp8 ? (double)(fp8_row + scale_row) : (double)bf16_row);
      row.combine_bytes = (double)num_recv * (double)bf16_row;
      row.rdma_bytes = (double)node_sends * (fp8 ? (double)(fp8_row + scale_row) : (double)bf16_row);
      row.rdma_combine_bytes = (double)node_sends * (double)bf16_row;
      row.baseline_dispatch_us = fp8 ? base_us[2] : base_us[0];
      row.baseline_combine_us = base_us[1];
      row.validated = 1;
      row.mismatches = base_bad + check_combined(b, internode ? "internode combine" : "intranode combine",
                                                 (const __nv_bfloat16*)combined);
      row.mismatches += fp8 ? check_fp8_rows(b, internode ? "internode fp8 dispatch" : "intranode fp8 dispatch",
                                             recv_rows, recv_fp8, recv_scales)
                            : check_bf16_rows(b, internode ? "internode bf16 dispatch" : "intranode bf16 dispatch",
                                              recv_rows, recv_bf16);
      bench_report_row(b, &row);
    }
  }

  EP_OK(b->group, ep_handle_destroy(handle));
  CUDA_OK(cudaFree(d_num_recv));
  CUDA_OK(cudaFree(d_expert_counts));
  CUDA_OK(cudaFree(recv_bf16));
  CUDA_OK(cudaFree(combined));
  CUDA_OK(cudaFree(recv_fp8));
  CUDA_OK(cudaFree(recv_scales));
  CUDA_OK(cudaFree(d_x_fp8));
  CUDA_OK(cudaFree(d_x_scales));
}

/* ------------------------------------------------------------------------------------------------------------
 * ll: the low-latency path (ep_ll_dispatch FP8, ep_ll_combine BF16) on the first --ll-tokens tokens of each rank,
 * without and with the receive hook, with the combine's sums on the experts' ranks (row ll-sums) and with its rows as
 * LogFMT-10 (row ll-logfmt), next to the NCCL user path on the same tokens. Bytes as DeepEP's LL test
 * counts them, per selected (token, expert) pair of this rank: dispatch hidden + hidden / 128 * 4 + 16, combine
 * 2 * hidden (LogFMT: hidden * 10 / 8 + hidden / 128 * 4).
 * ------------------------------------------------------------------------------------------------------------ */

/* What the LL calls on the first T tokens of every rank give on this rank when every rank has masked rank `masked`
 * (-1: none): the reference dispatch of the routing with the top-k entries that the masked calls drop set to -1
 * (docs/faults.md, "Masking failed ranks": the masked rank keeps only its own experts, the others lose its
 * experts); the experts' outputs in the layout of this rank's receive, y[e][i] = the i-th received token's bf16 row,
 * so that with weights 1 the combined row is x[t] times the token's kept entries, exact. */
typedef struct ll_expect {
  std::vector<std::vector<int64_t>> topk_idx; /* [R] -> [T, K]: the routing as the calls route it */
  ep_ref_ll_dispatch_t ref;
  std::vector<uint16_t> y; /* [E_loc, R * T, hidden] bf16 */
  std::vector<int> kept;   /* [T]: this rank's kept top-k entries per token */
  long selections;         /* their sum: this rank's (token, expert) pairs */
  long all_selections;     /* every rank's */
} ll_expect_t;

/* xs: [R] -> [T, hidden] bf16, every rank's first T tokens. */
static void ll_expect_make(const bench_t* b, int T, const std::vector<std::vector<uint16_t>>& xs, int masked,
                           ll_expect_t* ex) {
  const int R = b->num_ranks, H = b->opt.hidden, K = b->opt.topk, E = b->opt.experts, E_loc = E / R, me = b->rank;
  const size_t RT = (size_t)R * T;
  std::vector<const uint16_t*> x_ptr(R);
  std::vector<const int64_t*> idx_ptr(R);
  std::vector<int> num_tokens(R, T);
  ex->topk_idx.assign(R, std::vector<int64_t>());
  ex->all_selections = 0;
  for (int r = 0; r < R; ++r) {
    ex->topk_idx[r].assign(b->topk_idx[r], b->topk_idx[r] + (size_t)T * K);
    for (int64_t& e : ex->topk_idx[r]) {
      const int owner = e >= 0 ? (int)(e / E_loc) : -1;
      if (masked >= 0 && e >= 0 && (r == masked ? owner != r : owner == masked)) e = -1;
      ex->all_selections += e >= 0;
    }
    x_ptr[r] = xs[r].data();
    idx_ptr[r] = ex->topk_idx[r].data();
  }
  ep_ref_ll_world_t world;
  memset(&world, 0, sizeof(world));
  world.num_ranks = R;
  world.num_experts = E;
  world.num_topk = K;
  world.hidden = H;
  world.max_tokens_per_rank = T;
  world.num_tokens = num_tokens.data();
  world.x = x_ptr.data();
  world.topk_idx = idx_ptr.data();
  if (ep_ref_ll_dispatch(&world, 1, 0, 0, &ex->ref) != 0)
    bench_die(__FILE__, __LINE__, "ep_ref_ll_dispatch", "the reference rejected the routing", "");
  const ep_ref_ll_recv_t* mine = &ex->ref.recv[me];
  ex->y.assign((size_t)E_loc * RT * H, 0);
  for (int e = 0; e < E_loc; ++e)
    for (int i = 0; i < mine->count[e]; ++i) {
      const int row = mine->expert_offset[e] + i;
      memcpy(&ex->y[((size_t)e * RT + i) * H], &xs[mine->src_rank[row]][(size_t)mine->src_idx[row] * H], (size_t)H * 2);
    }
  ex->kept.assign(T, 0);
  ex->selections = 0;
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < K; ++k) ex->kept[t] += ex->topk_idx[me][(size_t)t * K + k] >= 0;
  for (int t = 0; t < T; ++t) ex->selections += ex->kept[t];
}

/* The LL outputs of the last call (recv_count, recv_x e4m3 and its scales, the combine's out [T, hidden] bf16)
 * against `ex`: exact, or (LogFMT, rel_tol > 0) out within rel_tol of it. */
static long check_ll(bench_t* b, const char* what, const ll_expect_t* ex, int T, const int* recv_count,
                     const void* recv_x, const void* recv_scales, const void* out, float rel_tol) {
  const int R = b->num_ranks, H = b->opt.hidden, E_loc = b->opt.experts / R, G = H / 128, me = b->rank;
  const size_t RT = (size_t)R * T;
  const ep_ref_ll_recv_t* mine = &ex->ref.recv[me];
  check_async(b, what);
  long bad = count_mismatches(b, "ll recv_count", to_host(b, recv_count, E_loc).data(), mine->count, E_loc);
  const std::vector<uint8_t> q = to_host(b, (const uint8_t*)recv_x, (size_t)E_loc * RT * H);
  const std::vector<float> sc = to_host(b, (const float*)recv_scales, (size_t)E_loc * RT * G);
  for (int e = 0; e < E_loc; ++e)
    for (int i = 0; i < mine->count[e]; ++i) {
      const size_t row = (size_t)mine->expert_offset[e] + i;
      if (memcmp(&q[((size_t)e * RT + i) * H], mine->x_fp8 + row * H, H) != 0 && bad++ == 0)
        fprintf(stderr, "ep_bench rank %d: %s: fp8 row %d of expert %d differs\n", me, what, i, e);
      for (int g = 0; g < G; ++g)
        if (!(sc[((size_t)e * G + g) * RT + i] == mine->scales[row * G + g]) && bad++ == 0)
          fprintf(stderr, "ep_bench rank %d: %s: scale %d of row %d of expert %d differs\n", me, what, g, i, e);
    }
  const std::vector<uint16_t> got = to_host(b, (const uint16_t*)out, (size_t)T * H);
  for (int t = 0; t < T; ++t) {
    const int copies = ex->kept[t];
    for (int c = 0; c < H; ++c) {
      /* A token with no kept entry gets +0 (a masked call can leave one so). */
      const uint16_t want = ep_ref_f32_to_bf16(copies ? bench_value(me, t, c) * (float)copies : 0.0f);
      const float g = ep_ref_bf16_to_f32(got[(size_t)t * H + c]), w = ep_ref_bf16_to_f32(want);
      const bool ok = rel_tol > 0.0f ? fabsf(g - w) <= rel_tol * fabsf(w) : got[(size_t)t * H + c] == want;
      if (!ok && bad++ == 0)
        fprintf(stderr, "ep_bench rank %d: %s: out[%d][%d] = 0x%04x, want 0x%04x\n", me, what, t, c,
                got[(size_t)t * H + c], want);
    }
  }
  return bad;
}

/* Every rank's first T tokens as bf16 (bench_value rows, exact), the reference's input. */
static std::vector<std::vector<uint16_t>> ll_inputs(const bench_t* b, int T) {
  const int R = b->num_ranks, H = b->opt.hidden;
  std::vector<std::vector<uint16_t>> xs(R, std::vector<uint16_t>((size_t)T * H));
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < H; ++c) xs[r][(size_t)t * H + c] = bench_exact_bf16(bench_value(r, t, c));
  return xs;
}

/* The device buffers of the LL rows, a handle, and the args of their calls: FP8 dispatch of this rank's first T
 * tokens, BF16 combine of y with weights 1. */
typedef struct ll_bufs {
  ep_ll_handle_t handle;
  void *recv_x, *recv_scales, *y, *out;
  int* recv_count;
  float* weights;
  ep_ll_dispatch_args_t da;
  ep_ll_combine_args_t ca;
} ll_bufs_t;

static void ll_bufs_make(bench_t* b, int T, ll_bufs_t* l) {
  const int R = b->num_ranks, H = b->opt.hidden, K = b->opt.topk, E = b->opt.experts, E_loc = E / R;
  const size_t RT = (size_t)R * T;
  l->handle = NULL;
  EP_OK(b->group, ep_ll_handle_create(b->group, &l->handle));
  CUDA_OK(cudaMalloc(&l->recv_x, (size_t)E_loc * RT * H));
  CUDA_OK(cudaMalloc(&l->recv_scales, (size_t)E_loc * RT * (H / 128) * 4));
  CUDA_OK(cudaMalloc(&l->recv_count, (size_t)E_loc * 4));
  CUDA_OK(cudaMalloc(&l->y, (size_t)E_loc * RT * H * 2));
  CUDA_OK(cudaMalloc(&l->out, (size_t)T * H * 2));
  CUDA_OK(cudaMalloc(&l->weights, (size_t)T * K * 4));
  const std::vector<float> ones((size_t)T * K, 1.0f);
  CUDA_OK(cudaMemcpyAsync(l->weights, ones.data(), (size_t)T * K * 4, cudaMemcpyHostToDevice, b->stream));
  CUDA_OK(cudaStreamSynchronize(b->stream)); /* `ones` goes out of scope */
  l->da = EP_LL_DISPATCH_ARGS_INIT;
  l->da.x = b->d_x;
  l->da.num_tokens = T;
  l->da.hidden = H;
  l->da.topk_idx = b->d_topk_idx;
  l->da.num_topk = K;
  l->da.num_experts = E;
  l->da.max_tokens_per_rank = T;
  l->da.recv_dtype = EP_FP8_E4M3;
  l->da.recv_x = l->recv_x;
  l->da.recv_x_scales = l->recv_scales;
  l->da.recv_count = l->recv_count;
  l->ca = EP_LL_COMBINE_ARGS_INIT;
  l->ca.x = l->y;
  l->ca.topk_weights = l->weights;
  l->ca.out = l->out;
}

static void ll_bufs_free(bench_t* b, ll_bufs_t* l) {
  EP_OK(b->group, ep_ll_handle_destroy(l->handle));
  CUDA_OK(cudaFree(l->recv_x));
  CUDA_OK(cudaFree(l->recv_scales));
  CUDA_OK(cudaFree(l->recv_count));
  CUDA_OK(cudaFree(l->y));
  CUDA_OK(cudaFree(l->out));
  CUDA_OK(cudaFree(l->weights));
}

void family_ll(bench_t* b) {
  const int R = b->num_ranks, H = b->opt.hidden, K = b->opt.topk, E = b->opt.experts, me = b->rank;
  const int T = b->opt.ll_tokens < b->opt.tokens ? b->opt.ll_tokens : b->opt.tokens;
  if (T <= 0 || H % 128 != 0) {
    if (me == 0) fprintf(stderr, "ep_bench: ll rows skipped: need --tokens > 0 and --hidden a multiple of 128\n");
    return;
  }
  const int E_loc = E / R;
  const size_t RT = (size_t)R * T;

  /* The reference: every rank's first T tokens through ep_ref_ll_dispatch. */
  ll_expect_t ex;
  ll_expect_make(b, T, ll_inputs(b, T), -1, &ex);
  const long selections = ex.selections;

  /* The baseline on the same tokens: the NCCL user path, BF16 both ways. */
  double base_us[2] = {-1, -1};
  long base_bad = 0;
  if (b->comm) {
    nccl_user_t u;
    nccl_user_create(&u, b->is_token_in_rank[me], T, H, me, R, b->comm, b->stream);
    poison(b, u.recv_rows, (size_t)u.plan.num_recv_rows * H * 2);
    time_nccl_user(b, &u, &base_us[0], &base_us[1]);
    base_bad = check_recv_counts_n(b, &u.plan, T);
    nccl_user_destroy(&u);
  }

  ll_bufs_t l;
  ll_bufs_make(b, T, &l);
  CUDA_OK(cudaMemcpyAsync(l.y, ex.y.data(), ex.y.size() * 2, cudaMemcpyHostToDevice, b->stream));

  auto check = [&](const char* what, float rel_tol = 0.0f) -> long {
    return check_ll(b, what, &ex, T, l.recv_count, l.recv_x, l.recv_scales, l.out, rel_tol);
  };

  size_t footprint = 0;
  EP_OK(b->group, ep_ll_buffer_size_hint(T, H, R, E, K, &footprint));

  /* No hook: each call sends and receives. */
  poison(b, l.recv_x, (size_t)E_loc * RT * H);
  poison(b, l.out, (size_t)T * H * 2);
  {
    const bench_phase_fn phases[2] = {
        [&] { EP_OK(b->group, ep_ll_dispatch(b->group, l.handle, &l.da, b->stream)); },
        [&] { EP_OK(b->group, ep_ll_combine(b->group, l.handle, &l.ca, b->stream)); },
    };
    double us[2];
    bench_time_phases(b, 2, phases, us);
    bench_row_t row = bench_row_make("ll", "fp8");
    row.tokens = T;
    row.dispatch_us = us[0];
    row.combine_us = us[1];
    row.bytes = (double)selections * (H + H / 128 * 4 + 16);
    row.combine_bytes = (double)selections * 2 * H;
    row.baseline_dispatch_us = base_us[0];
    row.baseline_combine_us = base_us[1];
    row.validated = 1;
    row.mismatches = base_bad + check("ll dispatch/combine");
    bench_report_row(b, &row);
  }

  /* Sums on the experts' ranks: the dispatch carries the weights, the combine sends one row per (token, rank).
   * Bytes as in the rows above (DeepEP's count), so that the rates compare as times do. */
  poison(b, l.recv_x, (size_t)E_loc * RT * H);
  poison(b, l.out, (size_t)T * H * 2);
  {
    ep_ll_dispatch_args_t dw = l.da;
    dw.topk_weights = l.weights;
    ep_ll_combine_args_t cs = l.ca;
    cs.topk_weights = NULL;
    cs.sum_on_expert_ranks = 1;
    const bench_phase_fn phases[2] = {
        [&] { EP_OK(b->group, ep_ll_dispatch(b->group, l.handle, &dw, b->stream)); },
        [&] { EP_OK(b->group, ep_ll_combine(b->group, l.handle, &cs, b->stream)); },
    };
    double us[2];
    bench_time_phases(b, 2, phases, us);
    bench_row_t row = bench_row_make("ll-sums", "fp8");
    row.tokens = T;
    row.dispatch_us = us[0];
    row.combine_us = us[1];
    row.bytes = (double)selections * (H + H / 128 * 4 + 16);
    row.combine_bytes = (double)selections * 2 * H;
    row.validated = 1;
    row.mismatches = check("ll dispatch (weights) / combine (sums on the experts' ranks)");
    bench_report_row(b, &row);
  }

  /* LogFMT-10 combine (use_logfmt): DeepEP's bytes, hidden * 10 / 8 + hidden / 32 a row; out within half a step of
   * its 128-channel group (2^(16 / 510) - 1 at most) of the bf16 result, plus the bf16 rounding of the sum. */
  poison(b, l.recv_x, (size_t)E_loc * RT * H);
  poison(b, l.out, (size_t)T * H * 2);
  {
    ep_ll_combine_args_t cl = l.ca;
    cl.use_logfmt = 1;
    const bench_phase_fn phases[2] = {
        [&] { EP_OK(b->group, ep_ll_dispatch(b->group, l.handle, &l.da, b->stream)); },
        [&] { EP_OK(b->group, ep_ll_combine(b->group, l.handle, &cl, b->stream)); },
    };
    double us[2];
    bench_time_phases(b, 2, phases, us);
    bench_row_t row = bench_row_make("ll-logfmt", "fp8");
    row.tokens = T;
    row.dispatch_us = us[0];
    row.combine_us = us[1];
    row.bytes = (double)selections * (H + H / 128 * 4 + 16);
    row.combine_bytes = (double)selections * ((double)H * 10 / 8 + H / 128 * 4);
    row.validated = 1;
    row.mismatches = check("ll dispatch / combine (LogFMT-10)", 0.03f);
    bench_report_row(b, &row);
  }

  /* Hook: the send phases alone (the receive phases run too, timed apart and not shown). */
  poison(b, l.recv_x, (size_t)E_loc * RT * H);
  poison(b, l.out, (size_t)T * H * 2);
  {
    ep_ll_dispatch_args_t dh = l.da;
    dh.return_after_send = 1;
    ep_ll_combine_args_t ch = l.ca;
    ch.return_after_send = 1;
    const bench_phase_fn phases[4] = {
        [&] { EP_OK(b->group, ep_ll_dispatch(b->group, l.handle, &dh, b->stream)); },
        [&] { EP_OK(b->group, ep_ll_dispatch_recv(b->group, l.handle, b->stream)); },
        [&] { EP_OK(b->group, ep_ll_combine(b->group, l.handle, &ch, b->stream)); },
        [&] { EP_OK(b->group, ep_ll_combine_recv(b->group, l.handle, b->stream)); },
    };
    double us[4];
    bench_time_phases(b, 4, phases, us);
    bench_row_t row = bench_row_make("ll-send", "fp8");
    row.tokens = T;
    row.dispatch_us = us[0];
    row.combine_us = us[2];
    row.bytes = (double)selections * (H + H / 128 * 4 + 16);
    row.combine_bytes = (double)selections * 2 * H;
    row.validated = 1;
    row.mismatches = check("ll hook dispatch/combine");
    bench_report_row(b, &row);
    if (me == 0)
      printf("ll %dx%d: receive phases alone %.1f / %.1f us (rank 0); LL buffer %.3f GB for T=%d H=%d E=%d "
             "(%d ranks)\n",
             b->num_nodes, b->ranks_per_node, us[1], us[3], (double)footprint * 1e-9, T, H, E, R);
  }

  ep_ref_ll_dispatch_free(&ex.ref);
  ll_bufs_free(b, &l);
}

/* ------------------------------------------------------------------------------------------------------------
 * ll-mask: the cost of a masked rank (the goal: an LL call with one rank of 4 masked within 10 % of an unmasked
 * one). On a group with config.mask_failed_ranks (ep_bench.cu creates it so when this family runs): the
 * ll and ll-send calls with no rank masked (rows ll-nomask, snd-nomask), then with the last rank masked by hand on
 * every rank, itself included (rows ll-masked, snd-masked), the same routing. The masked calls move less: the
 * masked rank's share of the traffic is gone (it exchanges with nobody but itself), and each row's bytes count the
 * pairs it moves. The goal is per call: the ratio lines after the rows give masked / unmasked time per phase.
 * Then every rank unmasks and cleans (docs/faults.md, "Unmasking"), so the group is whole for what runs next.
 * ------------------------------------------------------------------------------------------------------------ */
void family_ll_mask(bench_t* b) {
  const int R = b->num_ranks, H = b->opt.hidden, E_loc = b->opt.experts / R, me = b->rank, last = R - 1;
  const int T = b->opt.ll_tokens < b->opt.tokens ? b->opt.ll_tokens : b->opt.tokens;
  if (R < 2 || T <= 0 || H % 128 != 0) {
    if (me == 0)
      fprintf(stderr, "ep_bench: ll-mask rows skipped: need at least 2 ranks, --tokens > 0 and --hidden a multiple "
                      "of 128\n");
    return;
  }
  const size_t RT = (size_t)R * T;
  ll_expect_t ex[2]; /* [0]: no rank masked; [1]: rank R-1 masked on every rank */
  {
    const std::vector<std::vector<uint16_t>> xs = ll_inputs(b, T);
    ll_expect_make(b, T, xs, -1, &ex[0]);
    ll_expect_make(b, T, xs, last, &ex[1]);
  }
  ll_bufs_t l;
  ll_bufs_make(b, T, &l);
  ep_ll_dispatch_args_t dh = l.da;
  dh.return_after_send = 1;
  ep_ll_combine_args_t ch = l.ca;
  ch.return_after_send = 1;
  const bench_phase_fn calls[2] = {
      [&] { EP_OK(b->group, ep_ll_dispatch(b->group, l.handle, &l.da, b->stream)); },
      [&] { EP_OK(b->group, ep_ll_combine(b->group, l.handle, &l.ca, b->stream)); },
  };
  const bench_phase_fn hook_calls[4] = {
      [&] { EP_OK(b->group, ep_ll_dispatch(b->group, l.handle, &dh, b->stream)); },
      [&] { EP_OK(b->group, ep_ll_dispatch_recv(b->group, l.handle, b->stream)); },
      [&] { EP_OK(b->group, ep_ll_combine(b->group, l.handle, &ch, b->stream)); },
      [&] { EP_OK(b->group, ep_ll_combine_recv(b->group, l.handle, b->stream)); },
  };
  static const char* const names[2][2] = {{"ll-nomask", "snd-nomask"}, {"ll-masked", "snd-masked"}};
  double slowest[2][2][2]; /* [masked][ll, send][dispatch, combine]: slowest rank's median, every rank */
  int ok[2] = {1, 1};      /* [ll, send]: both rows of the pair validated */
  for (int masked = 0; masked < 2; ++masked) {
    const ll_expect_t* e = &ex[masked];
    /* Every rank's calls before this point have ended (the last row's report synchronised every rank). */
    if (masked) EP_OK(b->group, ep_group_mask_rank(b->group, last, 1, b->stream));
    CUDA_OK(cudaMemcpyAsync(l.y, e->y.data(), e->y.size() * 2, cudaMemcpyHostToDevice, b->stream));
    for (int view = 0; view < 2; ++view) { /* 0: whole calls; 1: send phases (hook), as ll-send */
      poison(b, l.recv_x, (size_t)E_loc * RT * H);
      poison(b, l.out, (size_t)T * H * 2);
      double us[4];
      bench_time_phases(b, view ? 4 : 2, view ? hook_calls : calls, us);
      bench_row_t row = bench_row_make(names[masked][view], "fp8");
      row.tokens = T;
      row.dispatch_us = us[0];
      row.combine_us = us[view ? 2 : 1];
      row.bytes = (double)e->selections * (H + H / 128 * 4 + 16);
      row.combine_bytes = (double)e->selections * 2 * H;
      row.validated = 1;
      row.mismatches = check_ll(b, names[masked][view], e, T, l.recv_count, l.recv_x, l.recv_scales, l.out, 0.0f);
      const int failed_before = b->failed_rows;
      bench_report_row(b, &row);
      ok[view] &= b->failed_rows == failed_before;
      slowest[masked][view][0] = b->last_dispatch_us;
      slowest[masked][view][1] = b->last_combine_us;
    }
  }

  /* The unmask takes effect at ep_ll_clean, which every rank makes with no LL call in flight anywhere. */
  CUDA_OK(cudaStreamSynchronize(b->stream));
  if (harness_barrier(&b->h, "ll-mask unmask") != 0)
    bench_die(__FILE__, __LINE__, "harness_barrier", "a rank did not reach the unmask", "");
  EP_OK(b->group, ep_group_mask_rank(b->group, last, 0, b->stream));
  EP_OK(b->group, ep_ll_clean(b->group, b->stream));

  if (me == 0) {
    for (int view = 0; view < 2; ++view)
      printf("ratio %s / %s %dx%d (rank %d of %d masked on every rank): dispatch %5.3f, combine %5.3f "
             "(slowest-rank median time; goal <= 1.10; pairs moved %ld of %ld)%s\n",
             names[1][view], names[0][view], b->num_nodes, b->ranks_per_node, last, R,
             slowest[1][view][0] / slowest[0][view][0], slowest[1][view][1] / slowest[0][view][1], ex[1].all_selections,
             ex[0].all_selections, ok[view] ? "" : " [a row failed its check]");
    fflush(stdout);
  }
  ll_bufs_free(b, &l);
  ep_ref_ll_dispatch_free(&ex[0].ref);
  ep_ref_ll_dispatch_free(&ex[1].ref);
}
