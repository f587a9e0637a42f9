#!/usr/bin/env bash
# test_format (CPU): the C/CUDA lines a change touches follow .clang-format. The change is the working tree
# against EP_FORMAT_BASE (default HEAD^: what the last commit changed, or for a merge everything the merge brought
# in, plus what is not committed yet); lines that no change touches keep their hand layout. Skips outside a git
# checkout, without git-clang-format, or in a clone too shallow to hold the base (e.g. --depth 1).
#   tests/lint/test_format.sh BUILD_DIR
# Fix what it reports with: git clang-format --extensions c,h,cu,cuh BASE
set -u
cd "$(dirname "$0")/../.." || exit 1
base=${EP_FORMAT_BASE:-HEAD^}
skip() { echo "SKIP test_format: $*"; exit 77; }
git rev-parse --git-dir > /dev/null 2>&1 || skip "not a git checkout"
command -v git-clang-format > /dev/null || skip "git-clang-format not found (apt-get install clang-format)"
git rev-parse --verify -q "$base^{commit}" > /dev/null || skip "no commit $base in this clone (a shallow clone?)"

out=$(git clang-format --diff --extensions c,h,cu,cuh "$base" 2>&1)
case $out in
  "" | "no modified files to format" | "clang-format did not modify any files")
    echo "PASS the C/CUDA lines changed since $base ($(git rev-parse --short "$base")) follow .clang-format" ;;
  *)
    echo "$out"
    echo "FAIL the C/CUDA lines changed since $base do not follow .clang-format (above);" \
      "git clang-format --extensions c,h,cu,cuh $base formats them"
    exit 1 ;;
esac
