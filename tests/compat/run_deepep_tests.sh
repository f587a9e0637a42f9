#!/usr/bin/env bash
# Run DeepEP V1's own test scripts, unmodified, on ep: `import deep_ep` resolves to ep through the supported
# mechanism (the sitecustomize.py of python/ep/_deep_ep_site, first on PYTHONPATH, calls ep.install_as_deep_ep() at
# the start of the script's process and of every rank torch.multiprocessing.spawn starts).
#
#   tests/compat/run_deepep_tests.sh [NUM_PROCESSES]      (default 1: one rank on one GPU)
#
# EP_DEEPEP_TESTS: the folder holding DeepEP's tests/ (test_intranode.py, test_low_latency.py, utils.py); default
# ../shared/third_party/deepep-v1-tests beside the repository root. Absent: one SKIP line, exit 77. Nothing is
# fetched. EP_COMPAT_TIMEOUT: seconds per run (default 900). EP_COMPAT_LOG_DIR: where each run's full output goes
# (default a fresh temporary folder). PYTHON: the interpreter (default python3). libep.so is found as the ep package
# finds it (EP_LIBRARY_PATH, else build/lib of this repository). EP_COMPAT_ONLY: an extended regular expression;
# only the runs whose name matches it run (names: intranode, intranode-h4096-e64, low_latency, low_latency-logfmt,
# low_latency-h4096-e32, low_latency-shrink).
# Runs: test_intranode.py with its defaults and with hidden 4096 / 64 experts; test_low_latency.py with its
# defaults, with --use-logfmt, and with hidden 4096 / 32 experts; with 6 or more processes also
# test_low_latency.py --shrink-test (ranks 1, 3 and 5 stop calling at their first dispatch, combine and clean; the
# others mask them and go on: shrink mode, each failure costing the survivors one timeout_seconds, 20 s by default).
# Prints each run's last lines and PASS or FAIL; exits 0 when every run passed, else 1.
set -u
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tests=${EP_DEEPEP_TESTS:-$root/../shared/third_party/deepep-v1-tests}
if [[ ! -f $tests/test_intranode.py || ! -f $tests/test_low_latency.py ]]; then
  echo "SKIP: DeepEP's test scripts are not in $tests (set EP_DEEPEP_TESTS=<folder with test_intranode.py>)"
  exit 77
fi
tests=$(cd "$tests" && pwd)
python=${PYTHON:-python3}
procs=${1:-1}
logs=${EP_COMPAT_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/ep-deepep-tests.XXXXXX")}
mkdir -p "$logs"
site=$root/python/ep/_deep_ep_site
export PYTHONPATH=$site:$root/python${PYTHONPATH:+:$PYTHONPATH}

runs=(
  "intranode|test_intranode.py --num-processes $procs"
  "intranode-h4096-e64|test_intranode.py --num-processes $procs --hidden 4096 --num-experts 64"
  "low_latency|test_low_latency.py --num-processes $procs"
  "low_latency-logfmt|test_low_latency.py --num-processes $procs --use-logfmt"
  "low_latency-h4096-e32|test_low_latency.py --num-processes $procs --hidden 4096 --num-experts 32"
)
[[ $procs -ge 6 ]] && runs+=("low_latency-shrink|test_low_latency.py --num-processes $procs --shrink-test")
port=$((29500 + RANDOM % 2000))
failed=0
selected=()
for run in "${runs[@]}"; do
  [[ ${run%%|*} =~ ${EP_COMPAT_ONLY:-.} ]] && selected+=("$run")
done
if [[ ${#selected[@]} -eq 0 ]]; then
  echo "EP_COMPAT_ONLY='${EP_COMPAT_ONLY}' matches no run" >&2
  exit 2
fi
runs=("${selected[@]}")
for run in "${runs[@]}"; do
  name=${run%%|*}
  args=${run#*|}
  port=$((port + 1))  # a fresh rendezvous port per run: the last one may still be in TIME_WAIT
  start=$SECONDS
  # shellcheck disable=SC2086 # args is a list of words
  (cd "$tests" && MASTER_PORT=$port timeout "${EP_COMPAT_TIMEOUT:-900}" "$python" $args) >"$logs/$name.log" 2>&1
  rc=$?
  echo "==== $name: python $args (${SECONDS}s total, $((SECONDS - start))s this run), exit $rc; last lines:"
  tail -n 12 "$logs/$name.log" | sed 's/^/    /'
  if [[ $rc -eq 0 ]]; then
    echo "PASS $name"
  else
    echo "FAIL $name (full output: $logs/$name.log)"
    failed=$((failed + 1))
  fi
done
echo "DeepEP's tests on ep: $((${#runs[@]} - failed)) of ${#runs[@]} runs passed (logs in $logs)"
[[ $failed -eq 0 ]]
