/* ep_launch: run one program as N ranks on this host, one process per GPU, and report one verdict.
 *
 *   ep_launch -n NUM_RANKS [-t TIMEOUT_SECONDS] [-l LOG_DIR] [-q] [-k RANK] -- PROGRAM [ARGS...]
 *
 * The launcher never touches CUDA: it forks before any CUDA call, so each rank starts clean. Every rank gets
 * EP_LAUNCH_RANK, EP_LAUNCH_NUM_RANKS and EP_LAUNCH_DIR (a fresh directory the ranks use to swap bootstrap bytes,
 * see tests/gpu/harness.h), with stdout and stderr going to LOG_DIR/rank<N>.log (LOG_DIR and its missing parents
 * are created). Exit codes of the ranks:
 * all 0 -> 0 (pass); any 77 and the rest 0 or 77 -> 77 (skip); otherwise 1 (fail), and every failing rank's
 * log is printed. A run past the timeout is killed and fails. With -q, rank 0's log is printed only on failure;
 * without it, rank 0's log is printed always. With -k RANK (fault injection: that rank kills itself), RANK ending
 * by its own SIGKILL counts as a pass and does not cut the other ranks' time short, so that the survivors finish;
 * RANK ending any other way (or killed by the launcher past the timeout) fails: the fault was not injected. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void print_log(const char* path, int rank) {
  FILE* f = fopen(path, "r");
  if (!f) return;
  printf("----- rank %d: %s -----\n", rank, path);
  char line[4096];
  while (fgets(line, sizeof(line), f)) fputs(line, stdout);
  fclose(f);
}

/* mkdir -p: every missing directory of `path`, mode 0755. Returns 0 when `path` is a directory at the end. */
static int make_dirs(const char* path) {
  char buf[4096];
  if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf)) return -1;
  for (char* p = buf + 1; *p; ++p) {
    if (*p != '/') continue;
    *p = '\0';
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) return -1;
    *p = '/';
  }
  if (mkdir(buf, 0755) != 0 && errno != EEXIST) return -1;
  struct stat st;
  return stat(buf, &st) == 0 && S_ISDIR(st.st_mode) ? 0 : -1;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  int num_ranks = 0, quiet = 0, killed_rank = -1;
  double timeout = 600;
  const char* log_dir = NULL;
  int opt;
  while ((opt = getopt(argc, argv, "+n:t:l:qk:")) != -1) {
    if (opt == 'n') num_ranks = atoi(optarg);
    else if (opt == 't') timeout = atof(optarg);
    else if (opt == 'l') log_dir = optarg;
    else if (opt == 'q') quiet = 1;
    else if (opt == 'k') killed_rank = atoi(optarg);
    else break;
  }
  if (num_ranks < 1 || optind >= argc || killed_rank >= num_ranks) {
    fprintf(stderr, "usage: ep_launch -n NUM_RANKS [-t TIMEOUT_SECONDS] [-l LOG_DIR] [-q] [-k RANK] -- PROGRAM "
                    "[ARGS...]\n");
    return 2;
  }
  char** prog = argv + optind;

  char dir[] = "/tmp/ep_launch.XXXXXX";
  if (!mkdtemp(dir)) {
    perror("ep_launch: mkdtemp");
    return 1;
  }
  if (!log_dir) log_dir = dir;
  if (make_dirs(log_dir) != 0) {
    fprintf(stderr, "ep_launch: cannot create the log directory %s: %s\n", log_dir, strerror(errno));
    return 1;
  }

  pid_t* pids = calloc((size_t)num_ranks, sizeof(pid_t));
  int* codes = calloc((size_t)num_ranks, sizeof(int));
  if (!pids || !codes) return 1;
  char rank_s[16], n_s[16];
  snprintf(n_s, sizeof(n_s), "%d", num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    pid_t pid = fork();
    if (pid < 0) {
      perror("ep_launch: fork");
      return 1;
    }
    if (pid == 0) {
      setpgid(0, 0);
      char log[4096];
      snprintf(log, sizeof(log), "%s/rank%d.log", log_dir, r);
      if (!freopen(log, "w", stdout) || !freopen(log, "a", stderr)) _exit(1);
      setvbuf(stdout, NULL, _IOLBF, 0);
      snprintf(rank_s, sizeof(rank_s), "%d", r);
      setenv("EP_LAUNCH_RANK", rank_s, 1);
      setenv("EP_LAUNCH_NUM_RANKS", n_s, 1);
      setenv("EP_LAUNCH_DIR", dir, 1);
      execvp(prog[0], prog);
      fprintf(stderr, "ep_launch: cannot run %s: %s\n", prog[0], strerror(errno));
      _exit(127);
    }
    pids[r] = pid;
  }

  /* Wait for every rank; past the deadline kill them all. A rank that fails early makes the others' waits on it
   * time out inside the library; give them a few seconds, then end them too. */
  int alive = num_ranks, timed_out = 0, ended_by_launcher = 0;
  double deadline = now_s() + timeout, failed_at = 0;
  while (alive > 0) {
    int status;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < num_ranks; ++r) {
        if (pids[r] != pid) continue;
        codes[r] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (r == killed_rank) { /* its SIGKILL is the injected fault; any other ending means it was not injected */
          const int by_kill = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && !ended_by_launcher;
          if (!by_kill) printf("ep_launch: rank %d was to kill itself but ended with %d\n", r, codes[r]);
          codes[r] = by_kill ? 0 : codes[r] ? codes[r] : 1;
        }
        pids[r] = 0;
        alive--;
        if (codes[r] != 0 && codes[r] != 77 && failed_at == 0) failed_at = now_s();
      }
      continue;
    }
    double t = now_s();
    if (t > deadline || (failed_at > 0 && t > failed_at + 60)) {
      timed_out = t > deadline;
      ended_by_launcher = 1;
      for (int r = 0; r < num_ranks; ++r)
        if (pids[r]) kill(-pids[r], SIGKILL);
    }
    usleep(20000);
  }

  int fails = 0, skips = 0;
  for (int r = 0; r < num_ranks; ++r) {
    if (codes[r] == 77) skips++;
    else if (codes[r] != 0) fails++;
  }
  char path[4096];
  if (!quiet || fails) {
    for (int r = 0; r < num_ranks; ++r) {
      if (r == 0 || (codes[r] != 0 && codes[r] != 77)) {
        snprintf(path, sizeof(path), "%s/rank%d.log", log_dir, r);
        print_log(path, r);
      }
    }
  }
  if (timed_out) printf("ep_launch: killed after %.0f s\n", timeout);
  if (fails) {
    printf("ep_launch: %d of %d ranks failed (exit codes:", fails, num_ranks);
    for (int r = 0; r < num_ranks; ++r) printf(" %d", codes[r]);
    printf(")\n");
    return 1;
  }
  return skips ? 77 : 0;
}
