#!/usr/bin/env bash
# test_launcher (CPU): build/bin/ep_launch's verdicts, with shell ranks in place of GPU programs: all ranks exit 0 ->
# pass; one fails -> fail; -k RANK (fault injection) -> that rank's own SIGKILL passes and the others finish their
# work after it; the same SIGKILL without -k fails; a -k rank that does not die, or one killed by the launcher's
# timeout, fails (the fault was not injected).
#   tests/tooling/test_launcher.sh BUILD_DIR
set -u
build=$(cd "${1:-build}" && pwd)
launch=$build/bin/ep_launch
[[ -x $launch ]] || { echo "SKIP test_launcher: no $launch (make tests)"; exit 77; }
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
failed=0
expect() { # description want_exit ep_launch-args...
  local what=$1 want=$2; shift 2
  "$launch" -q -l "$stage/logs" "$@" > "$stage/out" 2>&1
  local rc=$?
  if [[ $rc -eq $want ]]; then echo "PASS $what (exit $rc)"; else
    echo "FAIL $what: exit $rc, want $want"; cat "$stage/out"; failed=$((failed + 1)); fi
}
# The last rank kills itself at once; the others work 1 s past that and leave a mark that they finished.
kill_last='if [ "$EP_LAUNCH_RANK" = 1 ]; then kill -9 $$; fi; sleep 1; touch "'$stage'/done.$EP_LAUNCH_RANK"'

expect "two ranks that exit 0 pass" 0 -n 2 -t 20 -- sh -c 'exit 0'
expect "a rank that exits 1 fails the run" 1 -n 2 -t 20 -- sh -c '[ "$EP_LAUNCH_RANK" = 0 ]'
expect "-k 1: rank 1's own SIGKILL passes" 0 -n 2 -t 20 -k 1 -- sh -c "$kill_last"
if [[ -f $stage/done.0 ]]; then echo "PASS -k 1: rank 0 finished its work after rank 1 died"; else
  echo "FAIL -k 1: rank 0 was cut short"; failed=$((failed + 1)); fi
expect "the same SIGKILL without -k fails" 1 -n 2 -t 20 -- sh -c "$kill_last"
expect "-k 1 with rank 1 exiting 0 fails (no fault injected)" 1 -n 2 -t 20 -k 1 -- sh -c 'exit 0'
expect "-k 1 with rank 1 killed by the timeout fails" 1 -n 2 -t 2 -k 1 -- sh -c '[ "$EP_LAUNCH_RANK" = 0 ] || sleep 30'

echo "test_launcher: $failed failed"
[[ $failed -eq 0 ]]
