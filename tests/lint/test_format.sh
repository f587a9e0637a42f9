#!/usr/bin/env bash
# test_format (CPU): the C/CUDA lines a change wrote follow .clang-format (tests/lint/format_changed.py: lines
# moved unchanged from elsewhere keep their layout, as do lines no change touched). The change is the working tree
# against EP_FORMAT_BASE (default HEAD^: what the last commit changed, or for a merge everything the merge brought
# in, plus what is not committed yet). Skips outside a git checkout, without clang-format, or in a clone too
# shallow to hold the base (e.g. --depth 1).
#   tests/lint/test_format.sh BUILD_DIR
# Fix what it reports with: python3 tests/lint/format_changed.py --fix BASE
set -u
cd "$(dirname "$0")/../.." || exit 1
base=${EP_FORMAT_BASE:-HEAD^}
python=${PYTHON:-python3}
skip() { echo "SKIP test_format: $*"; exit 77; }
git rev-parse --git-dir > /dev/null 2>&1 || skip "not a git checkout"
command -v clang-format > /dev/null || skip "clang-format not found (apt-get install clang-format)"
git rev-parse --verify -q "$base^{commit}" > /dev/null || skip "no commit $base in this clone (a shallow clone?)"

if out=$("$python" tests/lint/format_changed.py "$base" 2>&1); then
  echo "PASS the C/CUDA lines written since $base ($(git rev-parse --short "$base")) follow .clang-format"
else
  echo "$out"
  echo "FAIL the C/CUDA lines written since $base do not follow .clang-format (above);" \
    "python3 tests/lint/format_changed.py --fix $base formats them"
  exit 1
fi
