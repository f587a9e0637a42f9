#!/usr/bin/env bash
# test_setup (CPU): scripts/setup.sh takes NVSHMEM as installed only where its header and libraries are, installs
# with pip without root or version warnings, and says where NVSHMEM is. Runs against a Python that sees only a
# staged site folder (python -S) and a pip that records its arguments and lays out the wheel's files; no network.
#   tests/tooling/test_setup.sh BUILD_DIR
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
real_python=$(command -v "${PYTHON:-python3}")
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
failed=0
check() { # description command...
  local what=$1; shift
  if "$@"; then echo "PASS $what"; else echo "FAIL $what"; failed=$((failed + 1)); fi
}

# The fake Python: `-m pip` appends its arguments to pip.log and, for the NVSHMEM wheel, writes the files the wheel
# has; anything else runs the real interpreter without site-packages.
cat > "$stage/python" <<SH
#!/usr/bin/env bash
if [[ \$1 == -m && \$2 == pip ]]; then
  echo "\$*" >> "$stage/pip.log"
  if [[ \$* == *nvidia-nvshmem-cu13* ]]; then
    d=$stage/site/nvidia/nvshmem; mkdir -p "\$d/include" "\$d/lib"
    touch "\$d/include/nvshmem.h" "\$d/lib/libnvshmem_host.so.3" "\$d/lib/libnvshmem_device.a"
  fi
  exit 0
fi
exec "$real_python" -S "\$@"
SH
chmod +x "$stage/python"
setup() { (cd "$stage" && PYTHON="$stage/python" PYTHONPATH="$stage/site" bash "$repo/scripts/setup.sh" 2>&1); }

# 1. What an uninstalled wheel leaves behind: the namespace folders, empty. setup.sh must install.
mkdir -p "$stage/site/nvidia/nvshmem/lib"
out=$(setup); rc=$?
check "setup.sh passes (exit $rc)" test "$rc" -eq 0
check "an empty nvidia/nvshmem folder is not taken as installed: pip installs nvidia-nvshmem-cu13==3.4.5" \
  grep -q "install.*nvidia-nvshmem-cu13==3.4.5" "$stage/pip.log"
check "every pip install runs with --root-user-action=ignore and --disable-pip-version-check" \
  test -z "$(grep -v -e '--root-user-action=ignore' "$stage/pip.log"; grep -v -e '--disable-pip-version-check' \
    "$stage/pip.log")"
check "it says where NVSHMEM is" grep -q "NVSHMEM.* $stage/site/nvidia/nvshmem\$" <<< "$out"
[[ $failed -eq 0 ]] || { echo "$out"; cat "$stage/pip.log"; }

# 2. A complete NVSHMEM: nothing to install.
rm -f "$stage/pip.log"
out=$(setup); rc=$?
check "setup.sh with NVSHMEM in place passes (exit $rc)" test "$rc" -eq 0
check "it installs no NVSHMEM again" test -z "$(grep -s nvshmem "$stage/pip.log")"
check "it says where NVSHMEM is" grep -q "NVSHMEM.* $stage/site/nvidia/nvshmem\$" <<< "$out"

# 3. One library missing and a pip that does not bring it: setup.sh fails and names the missing file.
rm "$stage/site/nvidia/nvshmem/lib/libnvshmem_device.a"
sed -i 's/^    touch .*/    :/' "$stage/python"
out=$(setup); rc=$?
check "setup.sh fails when pip leaves NVSHMEM incomplete (exit $rc)" test "$rc" -ne 0
check "it names the missing file" grep -q "libnvshmem_device.a" <<< "$out"
[[ $failed -eq 0 ]] || echo "$out"

echo "test_setup: $failed failed"
[[ $failed -eq 0 ]]
