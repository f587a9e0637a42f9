#!/usr/bin/env bash
# Run the fault matrix (tests/gpu/test_fault_matrix.c) and print it, one table per rank count.
#   tests/gpu/fault_matrix.sh [BUILD_DIR]       e.g. scripts/shared_gpu.sh tests/gpu/fault_matrix.sh build
# The data cells run in one launch; every fatal cell (kill, stall, the LL shape disagreement) in a launch of its
# own, the killed rank passed to ep_launch -k so that its death is the injected fault and the survivors finish.
# A cell is ok when every line its ranks print says ok and the launch passed; HANG when a rank's watchdog fired
# (no status within the budget and the slack) or ep_launch killed the launch past EP_FM_BOUND seconds (default 60);
# FAIL otherwise (a wrong status, a crash, the next call wrong). Each cell shows the survivors' statuses and the
# longest time to detect (and, for fatal cells, the longest ep_group_abort).
# Environment: EP_FM_RANKS (default "2 4"), EP_FM_CELLS (an extended regex on "ROW COLUMN": only those fatal cells),
# EP_FM_LOG_DIR (default BUILD_DIR/fault-matrix-logs). Exits 0 when every cell that ran is ok.
set -u
build=${1:-build}
prog=$build/tests/gpu/test_fault_matrix
launch=$build/bin/ep_launch
for f in "$prog" "$launch"; do
  [[ -x $f ]] || { echo "fault_matrix: $f is missing (make -j tests)" >&2; exit 2; }
done
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none} NVSHMEM_DISABLE_NVLS=1
num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
bound=${EP_FM_BOUND:-60}
logs=${EP_FM_LOG_DIR:-$build/fault-matrix-logs}
mapfile -t cells < <("$prog" --list)
bad=0

# One cell's verdict from its ranks' lines (cell ROW COLUMN rank R ROLE VERDICT STATUS SECONDS ...):
# "VERDICT STATUSES SECONDS ABORT_SECONDS": the statuses and seconds of the ranks in role `shown` (survivor for a
# fatal cell, faulty for a data cell), ABORT_SECONDS "-" without an abort.
summarize() { # row col log_dir launch_rc launch_output shown
  local verdict
  verdict=$(cat "$3"/rank*.log 2>/dev/null | awk -v row="$1" -v col="$2" -v rc="$4" -v shown="$6" '
    $1 == "cell" && $2 == row && $3 == col {
      n++
      if ($7 == "HANG") hang = 1
      else if ($7 == "FAIL") fail = 1
      if ($6 == shown && $8 != "-") { s = $8; sub(/^EP_STATUS_/, "", s); seen[s] = 1; if ($9 + 0 > sec) sec = $9 + 0 }
      if ($6 == "abort") { aborted = 1; if ($9 + 0 > ab) ab = $9 + 0 }
    }
    END {
      v = hang ? "HANG" : (fail || n == 0 || rc != 0) ? "FAIL" : "ok"
      st = ""; for (s in seen) st = st (st == "" ? "" : "/") s
      printf "%s %s %.2f %s\n", v, (st == "" ? "-" : st), sec, (aborted ? sprintf("%.3f", ab) : "-")
    }')
  [[ $5 == *"killed after"* ]] && verdict="HANG ${verdict#* }"
  echo "$verdict"
}

for n in ${EP_FM_RANKS:-2 4}; do
  share=()
  [[ $n -gt $num_gpus && ${EP_TEST_SHARE_GPU:-0} != 0 ]] &&
    share=(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${CUDA_MPS_ACTIVE_THREAD_PERCENTAGE:-$((100 * num_gpus / n))})
  declare -A table=()
  rm -rf "$logs/$n"
  t0=$(date +%s)
  data_out=$(env "${share[@]}" "$launch" -n "$n" -t "$bound" -q -l "$logs/$n/data" -- "$prog" 2>&1)
  data_rc=$?
  [[ $data_rc -eq 77 ]] && { echo "$data_out" | grep -m1 SKIP; exit 77; }
  if [[ $data_rc -ne 0 ]]; then # the cells' own lines say which failed; a check outside them shows only here
    echo "$data_out" | grep -E "^(FAIL|ep_launch)" | head -20
    echo "fault_matrix: the data launch at $n ranks failed (exit $data_rc)"
    bad=$((bad + 1))
  fi
  for line in "${cells[@]}"; do
    read -r row col kind _ <<< "$line"
    case $kind in
      n/a) table[$row,$col]="n/a" ;;
      data) table[$row,$col]=$(summarize "$row" "$col" "$logs/$n/data" 0 "$data_out" faulty) ;;
      own)
        if [[ -n ${EP_FM_CELLS:-} ]] && ! [[ "$row $col" =~ $EP_FM_CELLS ]]; then
          table[$row,$col]="not run"
          continue
        fi
        kill_flag=(); [[ $col == kill ]] && kill_flag=(-k $((n - 1)))
        out=$(env "${share[@]}" "$launch" -n "$n" -t "$bound" -q "${kill_flag[@]}" -l "$logs/$n/$row-$col" -- \
          "$prog" "$row" "$col" 2>&1)
        rc=$?
        table[$row,$col]=$(summarize "$row" "$col" "$logs/$n/$row-$col" "$rc" "$out" survivor)
        [[ ${table[$row,$col]} != ok* ]] && echo "$out" | grep -E "^(FAIL|cell|ep_launch)" | head -12
        ;;
    esac
  done
  echo
  echo "Fault matrix at $n ranks ($(( $(date +%s) - t0 )) s; logs in $logs/$n). Cell: verdict; status" \
    "(fatal cells: the survivors', data cells: the faulty rank's); seconds to it; seconds of ep_group_abort"
  echo
  echo "| call | kill | stall | bad-expert | shape | overflow |"
  echo "|---|---|---|---|---|---|"
  rows=()
  for line in "${cells[@]}"; do
    read -r row _ <<< "$line"
    [[ " ${rows[*]} " == *" $row "* ]] || rows+=("$row")
  done
  for row in "${rows[@]}"; do
    printf "| %s |" "$row"
    for col in kill stall bad-expert shape overflow; do
      v=${table[$row,$col]:-n/a}
      case $v in
        n/a | "not run") printf " %s |" "$v" ;;
        *)
          read -r verdict st sec ab <<< "$v"
          [[ $verdict != ok ]] && bad=$((bad + 1))
          if [[ $ab != - ]]; then printf " %s %s %ss, abort %ss |" "$verdict" "$st" "$sec" "$ab"
          else printf " %s %s %ss |" "$verdict" "$st" "$sec"; fi
          ;;
      esac
    done
    echo
  done
  unset table
done
echo
echo "fault matrix: $bad cells not ok"
[[ $bad -eq 0 ]]
