/* families.cu: the rows of the table, one function per family.
 *
 * To add a dispatch/combine family (intranode, low-latency): write family_<name>(bench_t*) (here, or in a bench/
 * file of its own, declared in bench.h) and list it in kFamilies (ep_bench.cu). It times ep's calls with
 * bench_time_phases, validates their outputs, times the NCCL user path on the same shape with time_nccl_user
 * for the baseline columns, and ends with bench_report_row. */
#include <vector>

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
