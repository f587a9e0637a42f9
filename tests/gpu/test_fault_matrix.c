/* test_fault_matrix: every call of a group against every fault one rank can inject, on real groups (issue 21).
 *
 * Rows (calls): layout, prepare (eager; graph-safe), dispatch (BF16; FP8), combine, LL dispatch (one kernel; with
 * the receive hook), LL combine, internode dispatch (virtual nodes of num_ranks / 2), group create, group destroy.
 * Columns (faults, injected from this program by the last rank, the "faulty" one; the library has no hook):
 *   kill        the faulty rank dies by SIGKILL inside the call: an asynchronous call is launched and the process
 *               killed before its kernels can finish (the others enter the call 200 ms later, so its kernels are
 *               still waiting for them); with the hook, the send phase has run and the receive is never called; a
 *               call that waits on the host (eager prepare, create, destroy) is cut by a timer 20 ms (create: 300
 *               ms) into it. Ranks sharing a GPU under MPS: the faulty rank dies just before its call instead (no
 *               kernel of it in flight; create and the hook's receive as above), because killing an MPS client
 *               whose kernel is running makes the next kernel of every other client of the server fail with
 *               cudaErrorIllegalAddress, whatever they share (bench/probes/mps_kill.cu, on one H100): the survivors
 *               would report the server's fault, not how the library meets a dead peer.
 *   stall       the faulty rank sleeps past the time budget (budget + 1 s) before the call, then makes it.
 *   bad-expert  an expert id outside [-1, num_experts) on the faulty rank.
 *   shape       the faulty rank disagrees on a shape: config.hidden at create; T (max_tokens_per_rank) of an LL
 *               dispatch (half the others', every rank's token count within it, so that no write can leave a
 *               buffer).
 *   overflow    a graph-safe receive past recv_capacity on the faulty rank (capacity 1).
 * Cells where a fault cannot apply are n/a (`test_fault_matrix --list` prints every cell with its kind and why).
 *
 * Each cell asserts: every rank that is not killed returns a named status from every call within the time budget
 * plus a slack (a watchdog ends a rank that does not, printing HANG: the cell fails); no crash (ep_launch reports
 * any rank ending by a signal other than the injected SIGKILL). Fatal cells (kill, stall, and the LL shape
 * disagreement): the others' call, or if it succeeded (the dead rank's sends had landed) the ep_group_check after
 * it, returns EP_STATUS_TIMEOUT or EP_STATUS_PEER_FAILED ("a peer failed"; compared by name, so this program
 * builds with or without it); then ep_group_abort returns EP_STATUS_SUCCESS within 0.5 s. A new group needs a new
 * process (ep_group_abort), so each fatal cell is a launch of its own:
 *     ep_launch -n N [-k N-1] -- test_fault_matrix ROW COLUMN
 * (-k: the rank that kills itself passes by dying). Data cells (bad-expert, overflow, the config disagreement)
 * leave the group working and run in one launch, `test_fault_matrix` without arguments (what `make test` runs):
 * the faulty rank alone gets EP_STATUS_DEVICE_ERROR (its call's status or ep_get_async_error), the others
 * EP_STATUS_SUCCESS, and the next dispatch / combine (or LL round) is correct against the reference on every rank.
 * tests/gpu/fault_matrix.sh runs every cell at 2 and 4 ranks and prints the matrix.
 *
 * Every rank prints one line per cell: `cell ROW COLUMN rank R ROLE VERDICT STATUS SECONDS`, ROLE survivor /
 * faulty / abort, SECONDS from the start of the call to its status (survivors: the time to detect the fault). */
#define _DEFAULT_SOURCE /* setitimer */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "common/check.h"
#include "gpu/harness.h"
#include "gpu/ll_round.h"
#include "gpu/normal_runs.h"
#include "gpu/test_util.h"

#define BUDGET_S 1.0  /* config.timeout_seconds of the fatal cells */
#define SLACK_S 2.0   /* a call's status may come this long after the budget */
#define CREATE_S 20.0 /* what a healthy group create may take (NVSHMEM start, ranks sharing a GPU) */
#define STALL_S (BUDGET_S + 1.0)
#define PEER_DELAY_S 0.2 /* kill: the others enter the call this long after the faulty rank */
#define ABORT_S 0.5      /* ep_group_abort returns within this */

enum row {
  ROW_LAYOUT,
  ROW_PREPARE_EAGER,
  ROW_PREPARE_GRAPH,
  ROW_DISPATCH_BF16,
  ROW_DISPATCH_FP8,
  ROW_COMBINE,
  ROW_LL_DISPATCH,
  ROW_LL_HOOK,
  ROW_LL_COMBINE,
  ROW_INTERNODE,
  ROW_CREATE,
  ROW_DESTROY,
  NUM_ROWS
};
enum col { COL_KILL, COL_STALL, COL_BAD_EXPERT, COL_SHAPE, COL_OVERFLOW, NUM_COLS };
static const char* const k_rows[NUM_ROWS] = {"layout",       "prepare-eager", "prepare-graph", "dispatch-bf16",
                                             "dispatch-fp8", "combine",       "ll-dispatch",   "ll-dispatch-hook",
                                             "ll-combine",   "internode",     "group-create",  "group-destroy"};
static const char* const k_cols[NUM_COLS] = {"kill", "stall", "bad-expert", "shape", "overflow"};

/* How a cell runs: not at all (n/a), in the shared data launch, or as a launch of its own. */
enum kind { NA, DATA, OWN };
/* clang-format off */
static const int k_kind[NUM_ROWS][NUM_COLS] = {
  /*                 kill stall bad-expert shape overflow */
  [ROW_LAYOUT]        = {NA,  NA,   DATA,      NA,   NA},
  [ROW_PREPARE_EAGER] = {OWN, OWN,  DATA,      NA,   NA},
  [ROW_PREPARE_GRAPH] = {OWN, OWN,  DATA,      NA,   NA},
  [ROW_DISPATCH_BF16] = {OWN, OWN,  NA,        NA,   DATA},
  [ROW_DISPATCH_FP8]  = {OWN, OWN,  NA,        NA,   DATA},
  [ROW_COMBINE]       = {OWN, OWN,  NA,        NA,   NA},
  [ROW_LL_DISPATCH]   = {OWN, OWN,  DATA,      OWN,  NA},
  [ROW_LL_HOOK]       = {OWN, OWN,  DATA,      NA,   NA},
  [ROW_LL_COMBINE]    = {OWN, OWN,  NA,        NA,   NA},
  [ROW_INTERNODE]     = {OWN, OWN,  DATA,      NA,   DATA},
  [ROW_CREATE]        = {OWN, OWN,  NA,        DATA, NA},
  [ROW_DESTROY]       = {OWN, OWN,  NA,        NA,   NA},
};
/* clang-format on */
/* Why a cell is n/a, by column (rows with an exception say so in --list). */
static const char* na_reason(int row, int col) {
  if (row == ROW_LAYOUT && (col == COL_KILL || col == COL_STALL)) return "local call: no peer waits on it";
  if (col == COL_BAD_EXPERT) return "no expert ids in this call (the routing comes from the prepare / dispatch)";
  if (col == COL_SHAPE) return "shapes of this call come from the config or the handle";
  if (col == COL_OVERFLOW) return "no graph-safe receive in this call";
  return "n/a";
}

/* ------------------------------------------------------------------------------------------------------------
 * Timer: a watchdog for a call that must return (HANG, exit 3), or the faulty rank's kill inside a host wait
 * ------------------------------------------------------------------------------------------------------------ */

static volatile sig_atomic_t g_timer_kills;
static char g_hang_line[256];
static size_t g_hang_len;

static void on_timer(int sig) {
  (void)sig;
  if (g_timer_kills) raise(SIGKILL);
  if (write(STDOUT_FILENO, g_hang_line, g_hang_len) < 0) _exit(4);
  _exit(3);
}

static void timer_set(double seconds) {
  struct itimerval it;
  memset(&it, 0, sizeof(it));
  it.it_value.tv_sec = (time_t)seconds;
  it.it_value.tv_usec = (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6);
  setitimer(ITIMER_REAL, &it, NULL);
}

static void timer_install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_timer;
  sigaction(SIGALRM, &sa, NULL);
}

/* A call of this rank must return within `seconds`, else the rank prints a HANG line for the cell and exits 3. */
static void watchdog_arm(const char* row, const char* col, int rank, const char* role, double seconds) {
  fflush(stdout);
  g_timer_kills = 0;
  g_hang_len = (size_t)snprintf(g_hang_line, sizeof(g_hang_line), "cell %s %s rank %d %s HANG - %.3f\n", row, col, rank,
                                role, seconds);
  if (g_hang_len >= sizeof(g_hang_line)) g_hang_len = sizeof(g_hang_line) - 1;
  timer_set(seconds);
}

static void timer_disarm(void) { timer_set(0); }

/* The faulty rank dies by SIGKILL `seconds` from now (inside the call it makes next). */
static void kill_in(double seconds) {
  fflush(stdout);
  g_timer_kills = 1;
  timer_set(seconds);
}

static void die_now(void) {
  fflush(stdout);
  raise(SIGKILL);
}

static void sleep_s(double s) {
  struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
  while (nanosleep(&ts, &ts) != 0) {
  }
}

/* ------------------------------------------------------------------------------------------------------------
 * Outcomes
 * ------------------------------------------------------------------------------------------------------------ */

/* A status the library names (ep_status_string knows it). */
static int is_named(ep_status_t st) { return strcmp(ep_status_string(st), "EP_STATUS_<unknown>") != 0; }

/* A peer's fatal fault, as a survivor must see it: this rank timed out waiting, or the group's published fault
 * state says a peer failed (EP_STATUS_PEER_FAILED, compared by name: the enum may lack it). */
static int is_peer_fault(ep_status_t st) {
  const char* name = ep_status_string(st);
  return strcmp(name, "EP_STATUS_TIMEOUT") == 0 || strcmp(name, "EP_STATUS_PEER_FAILED") == 0;
}

static void report(int row, int col, int rank, const char* role, int ok, ep_status_t st, double seconds,
                   const char* detail) {
  printf("cell %s %s rank %d %s %s %s %.3f%s%s\n", k_rows[row], k_cols[col], rank, role, ok ? "ok" : "FAIL",
         ep_status_string(st), seconds, detail && detail[0] ? " " : "", detail ? detail : "");
  if (!ok) {
    g_check_failures++;
    fprintf(stderr, "FAIL cell %s %s rank %d (%s): %s: %s\n", k_rows[row], k_cols[col], rank, role,
            ep_status_string(st), detail ? detail : "");
  }
  fflush(stdout);
}

/* The internode row at an odd rank count (virtual nodes of num_ranks / 2 need an even one): a cell with nothing
 * to run. */
static void print_na(int row, int col, int rank) {
  printf("cell %s %s rank %d survivor ok - 0.000 (n/a: virtual nodes of num_ranks / 2 need an even rank count)\n",
         k_rows[row], k_cols[col], rank);
}

/* First failure of a launched call: its own status, else (after the stream drains) the group's async error. */
static ep_status_t settle(ep_group_t g, cudaStream_t s, ep_status_t launched) {
  if (launched != EP_STATUS_SUCCESS) return launched;
  cudaStreamSynchronize(s);
  ep_status_t async = EP_STATUS_SUCCESS;
  const ep_status_t read = ep_get_async_error(g, &async);
  return read != EP_STATUS_SUCCESS ? read : async;
}

/* ------------------------------------------------------------------------------------------------------------
 * One group and the state of one row's call
 * ------------------------------------------------------------------------------------------------------------ */

typedef struct {
  const harness_t* h;
  normal_ctx_t n; /* the group (n.g), its handle and stream, as the normal-path runs take it */
  ll_bufs_t ll;
  ll_shape_t ll_shape;
  int faulty; /* num_ranks - 1 */
  int me_faulty;
} fm_t;

static ep_group_config_t matrix_config(const harness_t* h, int ranks_per_node, double budget) {
  ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
  cfg.ranks_per_node = ranks_per_node;
  cfg.num_experts = 8 * h->num_ranks;
  cfg.hidden = 2048;
  cfg.max_tokens_per_rank = 128;
  cfg.max_topk = 8;
  cfg.ll_max_tokens_per_rank = 32;
  cfg.timeout_seconds = budget;
  return cfg;
}

/* Virtual nodes of num_ranks / 2 (one rank each at 2 ranks); 0 where the rank count is odd (no internode row). */
static int internode_rpn(const harness_t* h) { return h->num_ranks % 2 == 0 ? h->num_ranks / 2 : 0; }

static ep_status_t fm_open(fm_t* f, const harness_t* h, int ranks_per_node, double budget, uint64_t seed) {
  memset(f, 0, sizeof(*f));
  f->h = h;
  f->faulty = h->num_ranks - 1;
  f->me_faulty = h->rank == f->faulty;
  f->n.R = h->num_ranks;
  f->n.me = h->rank;
  f->n.rpn = ranks_per_node;
  f->n.seed = seed;
  ep_group_config_t cfg = matrix_config(h, ranks_per_node, budget);
  f->n.max_experts = cfg.num_experts;
  ep_status_t st = harness_group_create(h, &cfg, &f->n.g);
  if (st != EP_STATUS_SUCCESS) return st;
  CUDA_CHECK(cudaStreamCreate(&f->n.s));
  st = ep_handle_create(f->n.g, &f->n.handle);
  const ll_shape_t shape = {cfg.ll_max_tokens_per_rank, 1024, 4, cfg.num_experts, 0, 0, 10, -1};
  f->ll_shape = shape;
  if (st == EP_STATUS_SUCCESS) st = ll_bufs_alloc(f->n.g, &f->ll, &f->ll_shape, h->num_ranks);
  return st;
}

/* Frees the test's buffers; the group is left to the caller (destroy, abort, or nothing after a destroy). */
static void fm_free_buffers(fm_t* f) {
  if (f->ll.x) ll_bufs_free(&f->ll);
  if (f->n.handle) ep_handle_destroy(f->n.handle);
  f->n.handle = NULL;
  if (f->n.s) cudaStreamDestroy(f->n.s);
  f->n.s = NULL;
}

/* A small normal-path world: `tokens` per rank, top-4 of the group's experts, BF16 or FP8, hidden 2048. */
static void small_world(const fm_t* f, world_t* w, int tokens, int fp8, uint64_t salt) {
  const case_t k = {tokens, 0, 2048, 4, fp8, TOPK_IDX_WEIGHTS, ROUTE_RANDOM, 0, 8, 1, 0, 0};
  world_build(w, &k, f->n.R, f->n.max_experts, f->n.seed ^ salt, f->n.seed ^ salt, 1);
}

/* The next calls after a data fault: one BF16 and one FP8 case (eager, cached, graph-safe), and one LL round (BF16
 * or FP8, with or without the hook, by `index`), against the reference on every rank. Returns 1 when any failed. */
static int works_after(fm_t* f, int index) {
  static const case_t bf16 = {16, LST, 2048, 4, 0, IDW, RND, 0, 8, 1, BIAS0, 1};
  static const case_t fp8 = {16, 0, 2048, 4, 1, IDW, RND, 0, 8, 128, 0, 0};
  int failed = normal_run_case(&f->n, &bf16, 2 * index) | normal_run_case(&f->n, &fp8, 2 * index + 1);
  if (f->n.rpn == 0 && f->ll.x) {
    ll_world_t w;
    ll_shape_t k = f->ll_shape;
    k.zero_rank = index % f->n.R;
    k.fp8 = index % 2;
    k.hook = index / 2 % 2;
    if (ll_world_make(&w, &k, f->n.R, f->n.seed ^ (0x51ull * (uint64_t)(index + 1)))) {
      CHECK(0, "the reference rejected the LL world");
      failed = 1;
    } else {
      failed |= ll_run_round(f->n.g, f->n.s, &f->ll, &w, f->n.me) != 0;
    }
    ll_world_free(&w);
  }
  return failed;
}

/* ------------------------------------------------------------------------------------------------------------
 * Data cells: one launch, one group (and an internode group); the group keeps working after each
 * ------------------------------------------------------------------------------------------------------------ */

/* The data verdict: the faulty rank EP_STATUS_DEVICE_ERROR, the others EP_STATUS_SUCCESS, the call that follows on
 * the same routing (`after`: a combine, or nothing) EP_STATUS_SUCCESS everywhere; then the next calls are correct. */
static void data_verdict(fm_t* f, int row, int col, ep_status_t st, double seconds, ep_status_t after, int index) {
  const ep_status_t want = f->me_faulty ? EP_STATUS_DEVICE_ERROR : EP_STATUS_SUCCESS;
  char detail[200] = "";
  if (st != EP_STATUS_SUCCESS) snprintf(detail, sizeof(detail), "(%.120s)", ep_last_error(f->n.g));
  if (after != EP_STATUS_SUCCESS)
    snprintf(detail, sizeof(detail), "(the combine after it: %s)", ep_status_string(after));
  report(row, col, f->h->rank, f->me_faulty ? "faulty" : "survivor", st == want && after == EP_STATUS_SUCCESS, st,
         seconds, detail);
  const int broken = works_after(f, index);
  report(row, col, f->h->rank, "next-call", !broken, broken ? EP_STATUS_INTERNAL_ERROR : EP_STATUS_SUCCESS, 0.0,
         broken ? "(the next calls differ from the reference)" : "");
}

/* Bad expert id in the faulty rank's layout, eager prepare or graph-safe prepare (row). */
static void cell_bad_expert_normal(fm_t* f, int row, int index) {
  world_t w;
  small_world(f, &w, 8, 0, 0xbad0 + (uint64_t)row);
  if (f->me_faulty && w.num_tokens[f->n.me] > 0) w.idx[f->n.me][1] = w.num_experts + 7;
  bufs_t b;
  bufs_alloc_inputs(&b, &w, f->n.me);
  bufs_upload_inputs(&b, &w, f->n.me, NULL, NULL);
  harness_barrier(f->h, k_rows[row]);
  const double t0 = now_s();
  ep_status_t st;
  if (row == ROW_LAYOUT) {
    int* per_rank = dev_alloc(sizeof(int) * (size_t)w.R);
    int* per_expert = dev_alloc(sizeof(int) * (size_t)w.num_experts);
    uint8_t* in_rank = dev_alloc((size_t)w.num_tokens[f->n.me] * (size_t)w.R);
    ep_layout_args_t la = EP_LAYOUT_ARGS_INIT;
    la.topk_idx = b.idx;
    la.num_tokens = w.num_tokens[f->n.me];
    la.num_topk = w.topk;
    la.num_experts = w.num_experts;
    la.num_tokens_per_rank = per_rank;
    la.num_tokens_per_expert = per_expert;
    la.is_token_in_rank = in_rank;
    st = settle(f->n.g, f->n.s, ep_get_dispatch_layout(f->n.g, &la, f->n.s));
    dev_free(per_rank);
    dev_free(per_expert);
    dev_free(in_rank);
  } else {
    int num_recv = -1;
    ep_dispatch_prepare_args_t p =
        prepare_args(&w, f->n.me, &b, 1, row == ROW_PREPARE_GRAPH ? NULL : &num_recv, NULL, row == ROW_PREPARE_GRAPH);
    st = ep_dispatch_prepare(f->n.g, f->n.handle, &p, f->n.s);
    if (row == ROW_PREPARE_GRAPH) st = settle(f->n.g, f->n.s, st);
  }
  const double seconds = now_s() - t0;
  bufs_free(&b);
  world_free(&w);
  data_verdict(f, row, COL_BAD_EXPERT, st, seconds, EP_STATUS_SUCCESS, index);
}

/* More rows than recv_capacity in the faulty rank's graph-safe dispatch: every rank sends 4 tokens to every rank;
 * the faulty rank offers room for 1 row. Then a combine along that routing on every rank, which must succeed. */
static void cell_overflow(fm_t* f, int row, int fp8, int index) {
  world_t w;
  small_world(f, &w, 4 * f->n.R, fp8, 0x0f10 + (uint64_t)row);
  const int E_loc = w.num_experts / w.R, me = f->n.me;
  for (int t = 0; t < w.num_tokens[me]; ++t)
    for (int j = 0; j < w.topk; ++j) w.idx[me][(size_t)t * w.topk + j] = j == 0 ? (int64_t)(t % w.R) * E_loc : -1;
  bufs_t b;
  bufs_alloc_inputs(&b, &w, me);
  bufs_upload_inputs(&b, &w, me, NULL, NULL);
  bufs_alloc_outputs(&b, &w, 4 * w.R);
  if (f->me_faulty) b.capacity = 1; /* the outputs hold every row; the library is told 1 */
  harness_barrier(f->h, k_rows[row]);
  const double t0 = now_s();
  ep_dispatch_prepare_args_t p = prepare_args(&w, me, &b, 1, NULL, NULL, 1);
  ep_status_t st = ep_dispatch_prepare(f->n.g, f->n.handle, &p, f->n.s);
  ep_dispatch_args_t d = dispatch_args(&w, &b, 8);
  const ep_status_t dst = ep_dispatch(f->n.g, f->n.handle, &d, f->n.s);
  st = settle(f->n.g, f->n.s, st != EP_STATUS_SUCCESS ? st : dst);
  const double seconds = now_s() - t0;
  /* The combine reads at most recv_capacity rows of its input: zero rows, no weights. */
  void* zero_rows = dev_alloc((size_t)4 * w.R * (size_t)w.hidden * 2);
  CUDA_CHECK(cudaMemset(zero_rows, 0, (size_t)4 * w.R * (size_t)w.hidden * 2));
  ep_combine_args_t cb = combine_args(&w, &b, 0, 8);
  cb.x = zero_rows;
  cb.topk_weights = NULL;
  cb.combined_topk_weights = NULL;
  const ep_status_t cst = settle(f->n.g, f->n.s, ep_combine(f->n.g, f->n.handle, &cb, f->n.s));
  dev_free(zero_rows);
  bufs_free(&b);
  world_free(&w);
  data_verdict(f, row, COL_OVERFLOW, st, seconds, cst, index);
}

/* Bad expert id in the faulty rank's LL dispatch (with or without the hook); its combine follows on every rank. */
static void cell_bad_expert_ll(fm_t* f, int row, int index) {
  ll_world_t w;
  ll_shape_t k = f->ll_shape;
  k.hook = row == ROW_LL_HOOK;
  if (ll_world_make(&w, &k, f->n.R, f->n.seed ^ 0xbad11)) CHECK(0, "the reference rejected the LL world");
  if (f->me_faulty) w.idx[f->n.me][0] = k.experts + 3;
  ll_load(&f->ll, &w, f->n.me);
  harness_barrier(f->h, k_rows[row]);
  const double t0 = now_s();
  ep_ll_dispatch_args_t da = ll_dispatch_args(&f->ll, &w, f->n.me);
  ep_status_t st = ep_ll_dispatch(f->n.g, f->ll.h, &da, f->n.s);
  if (st == EP_STATUS_SUCCESS && k.hook) st = ep_ll_dispatch_recv(f->n.g, f->ll.h, f->n.s);
  st = settle(f->n.g, f->n.s, st);
  const double seconds = now_s() - t0;
  ll_upload_y(&f->ll, &w, f->n.me); /* the combine's input: only its status matters here */
  ep_ll_combine_args_t ca = ll_combine_args(&f->ll, &w);
  ep_status_t cst = ep_ll_combine(f->n.g, f->ll.h, &ca, f->n.s);
  if (cst == EP_STATUS_SUCCESS && k.hook) cst = ep_ll_combine_recv(f->n.g, f->ll.h, f->n.s);
  cst = settle(f->n.g, f->n.s, cst);
  ll_world_free(&w);
  data_verdict(f, row, COL_BAD_EXPERT, st, seconds, cst, index);
}

/* Ranks that disagree on config.hidden: every rank's create fails with EP_STATUS_INVALID_ARGUMENT, none hangs. */
static void cell_config_shape(const harness_t* h) {
  ep_group_config_t cfg = matrix_config(h, 0, 5.0);
  const int faulty = h->rank == h->num_ranks - 1;
  if (faulty) cfg.hidden = 4096;
  ep_group_t g = NULL;
  watchdog_arm(k_rows[ROW_CREATE], k_cols[COL_SHAPE], h->rank, faulty ? "faulty" : "survivor", CREATE_S);
  const double t0 = now_s();
  const ep_status_t st = harness_group_create(h, &cfg, &g);
  const double seconds = now_s() - t0;
  timer_disarm();
  char detail[160];
  snprintf(detail, sizeof(detail), "(%.120s)", ep_last_error(NULL));
  report(ROW_CREATE, COL_SHAPE, h->rank, faulty ? "faulty" : "survivor", st == EP_STATUS_INVALID_ARGUMENT && !g, st,
         seconds, detail);
  if (g) ep_group_destroy(g);
  harness_barrier(h, "config_shape");
}

static void run_data_cells(const harness_t* h) {
  const uint64_t seed = harness_seed(h, "fault_matrix");
  cell_config_shape(h);
  fm_t f;
  ep_status_t st = fm_open(&f, h, 0, 5.0, seed);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s: %s", ep_status_string(st), ep_last_error(f.n.g));
  if (st != EP_STATUS_SUCCESS) return;
  int index = 0;
  cell_bad_expert_normal(&f, ROW_LAYOUT, index++);
  cell_bad_expert_normal(&f, ROW_PREPARE_EAGER, index++);
  cell_bad_expert_normal(&f, ROW_PREPARE_GRAPH, index++);
  cell_overflow(&f, ROW_DISPATCH_BF16, 0, index++);
  cell_overflow(&f, ROW_DISPATCH_FP8, 1, index++);
  cell_bad_expert_ll(&f, ROW_LL_DISPATCH, index++);
  cell_bad_expert_ll(&f, ROW_LL_HOOK, index++);
  fm_free_buffers(&f);
  st = ep_group_destroy(f.n.g);
  CHECK(st == EP_STATUS_SUCCESS, "destroy: %s", ep_last_error(NULL));
  const int rpn = internode_rpn(h);
  if (rpn == 0) {
    print_na(ROW_INTERNODE, COL_BAD_EXPERT, h->rank);
    print_na(ROW_INTERNODE, COL_OVERFLOW, h->rank);
    return;
  }
  st = fm_open(&f, h, rpn, 5.0, seed ^ 0x1e);
  CHECK(st == EP_STATUS_SUCCESS, "internode create: %s: %s", ep_status_string(st), ep_last_error(f.n.g));
  if (st != EP_STATUS_SUCCESS) return;
  /* The internode row's prepare is its eager one; its overflow its graph-safe dispatch. */
  world_t w;
  small_world(&f, &w, 8, 0, 0xbad2);
  if (f.me_faulty) w.idx[f.n.me][1] = w.num_experts + 7;
  bufs_t b;
  bufs_alloc_inputs(&b, &w, f.n.me);
  bufs_upload_inputs(&b, &w, f.n.me, NULL, NULL);
  harness_barrier(h, "internode_bad_expert");
  int num_recv = -1;
  ep_dispatch_prepare_args_t p = prepare_args(&w, f.n.me, &b, 1, &num_recv, NULL, 0);
  double t0 = now_s();
  st = ep_dispatch_prepare(f.n.g, f.n.handle, &p, f.n.s);
  const double seconds = now_s() - t0;
  bufs_free(&b);
  world_free(&w);
  data_verdict(&f, ROW_INTERNODE, COL_BAD_EXPERT, st, seconds, EP_STATUS_SUCCESS, index++);
  cell_overflow(&f, ROW_INTERNODE, 0, index++);
  fm_free_buffers(&f);
  st = ep_group_destroy(f.n.g);
  CHECK(st == EP_STATUS_SUCCESS, "internode destroy: %s", ep_last_error(NULL));
}

/* ------------------------------------------------------------------------------------------------------------
 * Fatal cells: one launch each
 * ------------------------------------------------------------------------------------------------------------ */

/* What a row's call needs before the cell's barrier: inputs, and the calls it follows (on every rank). */
typedef struct {
  world_t w;
  bufs_t b;
  ll_world_t lw;
} call_state_t;

static void state_prepare(fm_t* f, call_state_t* cs, int row) {
  memset(cs, 0, sizeof(*cs));
  if (row == ROW_LL_DISPATCH || row == ROW_LL_HOOK || row == ROW_LL_COMBINE) {
    ll_shape_t k = f->ll_shape;
    k.hook = row == ROW_LL_HOOK;
    if (ll_world_make(&cs->lw, &k, f->n.R, f->n.seed ^ 0x11)) CHECK(0, "the reference rejected the LL world");
    ll_load(&f->ll, &cs->lw, f->n.me);
    if (row == ROW_LL_COMBINE) { /* the dispatch the combine follows */
      ep_ll_dispatch_args_t da = ll_dispatch_args(&f->ll, &cs->lw, f->n.me);
      EP_CHECK(&f->n, settle(f->n.g, f->n.s, ep_ll_dispatch(f->n.g, f->ll.h, &da, f->n.s)));
      ll_upload_y(&f->ll, &cs->lw, f->n.me);
    }
    return;
  }
  if (row == ROW_DESTROY) fm_free_buffers(f); /* the destroy alone is the call */
  if (row == ROW_LAYOUT || row == ROW_CREATE || row == ROW_DESTROY) return;
  small_world(f, &cs->w, 16, row == ROW_DISPATCH_FP8, 0xfa7a1);
  bufs_alloc_inputs(&cs->b, &cs->w, f->n.me);
  bufs_upload_inputs(&cs->b, &cs->w, f->n.me, NULL, NULL);
  bufs_alloc_outputs(&cs->b, &cs->w, cs->w.R * 16);
  if (row == ROW_DISPATCH_BF16 || row == ROW_DISPATCH_FP8 || row == ROW_COMBINE || row == ROW_INTERNODE) {
    int num_recv = -1;
    ep_dispatch_prepare_args_t p = prepare_args(&cs->w, f->n.me, &cs->b, 1, &num_recv, NULL, 0);
    EP_CHECK(&f->n, ep_dispatch_prepare(f->n.g, f->n.handle, &p, f->n.s));
  }
  if (row == ROW_COMBINE) { /* the dispatch the combine follows; its rows (BF16) are the combine's input */
    ep_dispatch_args_t d = dispatch_args(&cs->w, &cs->b, 8);
    EP_CHECK(&f->n, settle(f->n.g, f->n.s, ep_dispatch(f->n.g, f->n.handle, &d, f->n.s)));
  }
}

/* The row's call. `kill`: the faulty rank of a kill cell: the process dies once the call's kernels are launched
 * (host-waiting calls: its timer, armed by the caller, ends it inside). Returns the call's settled status. */
static ep_status_t row_call(fm_t* f, call_state_t* cs, int row, int kill) {
  ep_group_t g = f->n.g;
  cudaStream_t s = f->n.s;
  ep_status_t st = EP_STATUS_SUCCESS;
  switch (row) {
    case ROW_PREPARE_EAGER:
    case ROW_PREPARE_GRAPH: {
      int num_recv = -1;
      const int graph = row == ROW_PREPARE_GRAPH;
      ep_dispatch_prepare_args_t p = prepare_args(&cs->w, f->n.me, &cs->b, 1, graph ? NULL : &num_recv, NULL, graph);
      st = ep_dispatch_prepare(g, f->n.handle, &p, s);
      break;
    }
    case ROW_DISPATCH_BF16:
    case ROW_DISPATCH_FP8:
    case ROW_INTERNODE: {
      ep_dispatch_args_t d = dispatch_args(&cs->w, &cs->b, 8);
      st = ep_dispatch(g, f->n.handle, &d, s);
      break;
    }
    case ROW_COMBINE: {
      ep_combine_args_t cb = combine_args(&cs->w, &cs->b, 0, 8);
      st = ep_combine(g, f->n.handle, &cb, s);
      break;
    }
    case ROW_LL_DISPATCH:
    case ROW_LL_HOOK: {
      ep_ll_dispatch_args_t da = ll_dispatch_args(&f->ll, &cs->lw, f->n.me);
      st = ep_ll_dispatch(g, f->ll.h, &da, s);
      if (row == ROW_LL_HOOK && kill) { /* the send phase has run; the receive never will */
        cudaStreamSynchronize(s);
        die_now();
      }
      if (st == EP_STATUS_SUCCESS && row == ROW_LL_HOOK) st = ep_ll_dispatch_recv(g, f->ll.h, s);
      break;
    }
    case ROW_LL_COMBINE: {
      ep_ll_combine_args_t ca = ll_combine_args(&f->ll, &cs->lw);
      st = ep_ll_combine(g, f->ll.h, &ca, s);
      break;
    }
    case ROW_DESTROY:
      st = ep_group_destroy(g);
      f->n.g = NULL;
      return st;
    default: return EP_STATUS_INTERNAL_ERROR;
  }
  if (kill) die_now();
  return settle(g, s, st);
}

/* Abort after a fatal cell: EP_STATUS_SUCCESS within ABORT_S. The handles and the device buffers are left to the
 * process's exit: freeing device memory would wait for kernels still waiting on the faulty peer. */
static void abort_group(fm_t* f, int row, int col) {
  if (!f->n.g) return;
  const double t0 = now_s();
  const ep_status_t st = ep_group_abort(f->n.g);
  const double seconds = now_s() - t0;
  f->n.g = NULL;
  report(row, col, f->h->rank, "abort", st == EP_STATUS_SUCCESS && seconds < ABORT_S, st, seconds,
         st == EP_STATUS_SUCCESS ? "" : ep_last_error(NULL));
}

/* Group create as the fatal cell's call: the faulty rank dies 300 ms into it, or comes STALL_S late. */
static void run_create_cell(const harness_t* h, int col) {
  const int faulty = h->rank == h->num_ranks - 1;
  const char* role = faulty ? "faulty" : "survivor";
  fm_t f;
  memset(&f, 0, sizeof(f));
  if (faulty && col == COL_KILL) kill_in(0.3);
  if (faulty && col == COL_STALL) sleep_s(STALL_S);
  if (!(faulty && col == COL_KILL)) watchdog_arm(k_rows[ROW_CREATE], k_cols[col], h->rank, role, CREATE_S);
  const double t0 = now_s();
  ep_status_t st = fm_open(&f, h, 0, BUDGET_S, 1);
  double seconds = now_s() - t0;
  timer_disarm();
  if (faulty && col == COL_KILL) die_now(); /* create finished within 300 ms: die after it */
  /* The group was made (the faulty rank died after its part, or came late and was waited for): the next
   * collective call must name the fault (kill) or pass (stall). */
  if (st == EP_STATUS_SUCCESS) {
    watchdog_arm(k_rows[ROW_CREATE], k_cols[col], h->rank, role, BUDGET_S + SLACK_S);
    const double t1 = now_s();
    st = ep_group_check(f.n.g, f.n.s);
    seconds = now_s() - t1;
    timer_disarm();
  }
  /* Kill: a named failure (the substrate's own, too) from create or the check after it. Stall: any named status. */
  const int ok = is_named(st) && (col == COL_STALL || st != EP_STATUS_SUCCESS);
  report(ROW_CREATE, col, h->rank, role, ok, st, seconds, st == EP_STATUS_SUCCESS ? "" : ep_last_error(f.n.g));
  abort_group(&f, ROW_CREATE, col);
  if (col == COL_STALL) harness_barrier(h, "cell_done");
}

/* The LL dispatch shape cell: the faulty rank's T is half the others' (every rank's tokens fit in it). Every rank
 * must name the disagreement (a non-success status) within the budget and the slack. */
static void run_ll_shape_cell(fm_t* f) {
  ll_world_t w;
  ll_shape_t k = f->ll_shape;
  k.T /= 2; /* the world's tokens: 1..T/2 per rank */
  if (ll_world_make(&w, &k, f->n.R, f->n.seed ^ 0x5a)) CHECK(0, "the reference rejected the LL world");
  ll_load(&f->ll, &w, f->n.me);
  ep_ll_dispatch_args_t da = ll_dispatch_args(&f->ll, &w, f->n.me);
  da.max_tokens_per_rank = f->me_faulty ? k.T : 2 * k.T;
  harness_barrier(f->h, "cell_ready");
  const char* role = f->me_faulty ? "faulty" : "survivor";
  watchdog_arm(k_rows[ROW_LL_DISPATCH], k_cols[COL_SHAPE], f->h->rank, role, BUDGET_S + SLACK_S);
  const double t0 = now_s();
  const ep_status_t st = settle(f->n.g, f->n.s, ep_ll_dispatch(f->n.g, f->ll.h, &da, f->n.s));
  const double seconds = now_s() - t0;
  timer_disarm();
  report(ROW_LL_DISPATCH, COL_SHAPE, f->h->rank, role, st != EP_STATUS_SUCCESS && is_named(st), st, seconds,
         st == EP_STATUS_SUCCESS ? "(the disagreement went unnoticed)" : ep_last_error(f->n.g));
  ll_world_free(&w);
  abort_group(f, ROW_LL_DISPATCH, COL_SHAPE);
  harness_barrier(f->h, "cell_done");
}

static void run_fatal_cell(const harness_t* h, int row, int col) {
  if (row == ROW_CREATE) {
    run_create_cell(h, col);
    return;
  }
  const int rpn = row == ROW_INTERNODE ? internode_rpn(h) : 0;
  if (row == ROW_INTERNODE && rpn == 0) {
    print_na(row, col, h->rank);
    return;
  }
  fm_t f;
  const uint64_t seed = harness_seed(h, "fault_matrix_cell");
  ep_status_t st = fm_open(&f, h, rpn, BUDGET_S, seed);
  CHECK(st == EP_STATUS_SUCCESS, "create: %s: %s", ep_status_string(st), ep_last_error(f.n.g));
  if (st != EP_STATUS_SUCCESS) return;
  if (row == ROW_LL_DISPATCH && col == COL_SHAPE) {
    run_ll_shape_cell(&f);
    return;
  }
  call_state_t cs;
  harness_barrier(h, "cell_setup"); /* every rank's setup calls start together: none waits past the budget */
  state_prepare(&f, &cs, row);
  harness_barrier(h, "cell_ready");
  const char* role = f.me_faulty ? "faulty" : "survivor";
  if (f.me_faulty && col == COL_KILL) {
    const int host_wait = row == ROW_PREPARE_EAGER || row == ROW_DESTROY;
    printf("cell %s %s rank %d faulty killing - 0.000\n", k_rows[row], k_cols[col], h->rank);
    if (harness_shares_gpu(h) && row != ROW_LL_HOOK) die_now(); /* MPS: no kernel in flight (above) */
    if (host_wait) kill_in(0.02);
    row_call(&f, &cs, row, !host_wait);
    die_now(); /* a host-waiting call that returned within 20 ms: die after it */
  }
  if (f.me_faulty) sleep_s(STALL_S);                          /* stall */
  if (!f.me_faulty && col == COL_KILL) sleep_s(PEER_DELAY_S); /* the faulty rank is inside its call by now */
  /* A destroy waits for a late rank on the host (NVSHMEM's barrier and shutdown) rather than on the device: the
   * stall plus the slack. */
  watchdog_arm(k_rows[row], k_cols[col], h->rank, role,
               (row == ROW_DESTROY && col == COL_STALL && !f.me_faulty ? STALL_S : BUDGET_S) + SLACK_S);
  double t0 = now_s();
  st = row_call(&f, &cs, row, 0);
  double seconds = now_s() - t0;
  /* A call that succeeded (the faulty rank's sends had landed, or it came late and was waited for): the next
   * collective call names the fault. */
  if (st == EP_STATUS_SUCCESS && f.n.g) {
    watchdog_arm(k_rows[row], k_cols[col], h->rank, role, BUDGET_S + SLACK_S);
    t0 = now_s();
    st = ep_group_check(f.n.g, f.n.s);
    seconds += now_s() - t0;
  }
  timer_disarm();
  char detail[200] = "";
  if (st != EP_STATUS_SUCCESS) snprintf(detail, sizeof(detail), "(%.180s)", ep_last_error(f.n.g));
  /* Survivors name the peer's fault; the late rank may get anything named (its peers may have sent before giving
   * up); a destroy may succeed (its barrier may have passed before the peer died). */
  const int ok = is_named(st) && (f.me_faulty || row == ROW_DESTROY || is_peer_fault(st));
  report(row, col, h->rank, role, ok, st, seconds, detail);
  abort_group(&f, row, col);
  if (col == COL_STALL) harness_barrier(h, "cell_done"); /* no rank leaves while another may still reach it */
}

/* ------------------------------------------------------------------------------------------------------------ */

static int find(const char* const* names, int n, const char* name) {
  for (int i = 0; i < n; ++i)
    if (strcmp(names[i], name) == 0) return i;
  return -1;
}

/* Every cell: ROW COLUMN KIND [why n/a], KIND own / data / n/a. No GPU, no launcher. */
static void list_cells(void) {
  for (int r = 0; r < NUM_ROWS; ++r)
    for (int c = 0; c < NUM_COLS; ++c) {
      const int kind = k_kind[r][c];
      if (kind == NA) printf("%s %s n/a %s\n", k_rows[r], k_cols[c], na_reason(r, c));
      else printf("%s %s %s\n", k_rows[r], k_cols[c], kind == OWN ? "own" : "data");
    }
}

int main(int argc, char** argv) {
  if (argc == 2 && strcmp(argv[1], "--list") == 0) {
    list_cells();
    return 0;
  }
  int row = -1, col = -1;
  if (argc == 3) {
    row = find(k_rows, NUM_ROWS, argv[1]);
    col = find(k_cols, NUM_COLS, argv[2]);
  }
  if (argc != 1 && (row < 0 || col < 0 || k_kind[row][col] != OWN)) {
    fprintf(stderr, "usage: test_fault_matrix [--list | ROW COLUMN] (a cell of kind own: see --list)\n");
    return 2;
  }
  harness_t h;
  int rc = harness_init(&h);
  if (!rc) rc = harness_need_ranks(&h, 2);
  if (!rc && h.num_ranks > LL_MAX_RANKS) {
    printf("SKIP: more than %d ranks\n", LL_MAX_RANKS);
    rc = TEST_SKIP;
  }
  if (rc) return rc;
  timer_install();
  if (argc == 1) run_data_cells(&h);
  else run_fatal_cell(&h, row, col);
  return TEST_RESULT();
}
