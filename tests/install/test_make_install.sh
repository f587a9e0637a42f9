#!/usr/bin/env bash
# test_make_install (CPU): `make install` into a staging folder lays out the header, the library under its full
# version with the soname and link name pointing to it, and a pkg-config file. Built with nothing but
# `pkg-config --cflags --libs ep`: a C program links against libep.so.0 and runs; a program that calls the CUDA
# runtime itself links and runs; examples/dispatch_combine.c builds and starts.
#   tests/install/test_make_install.sh BUILD_DIR
set -u
build=$(cd "${1:-build}" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd)
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
prefix=/opt/ep-test; root=$stage$prefix
failed=0
check() { # description command...; returns the command's verdict
  local what=$1; shift
  if "$@"; then echo "PASS $what"; else echo "FAIL $what"; failed=$((failed + 1)); return 1; fi
}

if ! make -s -C "$repo" install BUILD="$build" DESTDIR="$stage" PREFIX="$prefix" > "$stage/install.log" 2>&1; then
  cat "$stage/install.log"; echo "FAIL make install"; exit 1
fi
version=$(sed -n 's/^.define EP_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)$/\2/p' "$repo/include/ep.h" | paste -sd.)
IFS=. read -r major minor patch <<< "$version"
check "include/ep.h is installed" cmp -s "$repo/include/ep.h" "$root/include/ep.h"
check "lib/libep.so.$version is a file" test -f "$root/lib/libep.so.$version" -a ! -L "$root/lib/libep.so.$version"
check "lib/libep.so.$major -> libep.so.$version" test "$(readlink "$root/lib/libep.so.$major")" = "libep.so.$version"
check "lib/libep.so -> libep.so.$major" test "$(readlink "$root/lib/libep.so")" = "libep.so.$major"
check "the library's soname is libep.so.$major" \
  grep -q "SONAME.*\[libep.so.$major\]" <(readelf -d "$root/lib/libep.so.$version")

export PKG_CONFIG_PATH=$root/lib/pkgconfig
pc() { pkg-config --define-variable=prefix="$root" "$@" ep; }
check "pkg-config --modversion ep is $version" test "$(pc --modversion)" = "$version"
check "pkg-config's paths are under the prefix" grep -q -- "-L$root/lib -lep" <(pc --libs)

cat > "$stage/prog.c" <<'C'
#include <ep.h>
#include <stdio.h>
int main(void) {
  int version = -1;
  if (ep_get_version(&version) != EP_STATUS_SUCCESS) return 1;
  printf("%d %s\n", version, ep_status_string(EP_STATUS_TIMEOUT));
  return version == EP_VERSION_CODE ? 0 : 2;
}
C
# shellcheck disable=SC2046  # pkg-config's words are separate flags
if check "a C99 program builds with pkg-config's flags alone" \
     cc -std=c99 -Wall -Werror "$stage/prog.c" -o "$stage/prog" $(pc --cflags --libs) -Wl,-rpath,"$root/lib"; then
  check "the program needs libep.so.$major" grep -q "NEEDED.*\[libep.so.$major\]" <(readelf -d "$stage/prog")
  check "the program runs against the installed library" \
    test "$("$stage/prog")" = "$((major * 10000 + minor * 100 + patch)) EP_STATUS_TIMEOUT"
fi
# An application calls the CUDA runtime too (ep.h's streams, its own buffers): pkg-config's flags must link it.
cat > "$stage/runtime.c" <<'C'
#include <ep.h>
#include <stdio.h>
int main(void) {
  int devices = -1;
  cudaError_t err = cudaGetDeviceCount(&devices);
  void* p = NULL;
  if (err == cudaSuccess && devices > 0 && cudaMalloc(&p, 256) == cudaSuccess) cudaFree(p);
  printf("%s\n", cudaGetErrorName(err));
  return 0;
}
C
cuda_lib=$(pc --variable=cudalibdir)
# shellcheck disable=SC2046
if check "a program that calls the CUDA runtime builds with pkg-config's flags alone" \
     cc -std=c11 -Wall -Werror "$stage/runtime.c" -o "$stage/runtime" $(pc --cflags --libs) \
     -Wl,-rpath,"$root/lib" -Wl,-rpath,"$cuda_lib"; then
  check "it needs libcudart" grep -q "NEEDED.*\[libcudart.so" <(readelf -d "$stage/runtime")
  check "it runs (cudaGetDeviceCount: $("$stage/runtime"))" grep -q "^cuda" <("$stage/runtime")
fi

# The C example is a program of its own: the installed header and library are all it needs. Its ranks swap the
# unique id through a file before they look for a GPU; with none visible (hidden here) they then exit 77.
# shellcheck disable=SC2046
if check "examples/dispatch_combine.c builds with pkg-config's flags alone" \
     cc -std=c11 -Wall -Wextra -Werror "$repo/examples/dispatch_combine.c" -o "$stage/example" $(pc --cflags --libs) \
     -Wl,-rpath,"$root/lib" -Wl,-rpath,"$cuda_lib"; then
  mkdir "$stage/run"
  CUDA_VISIBLE_DEVICES= timeout 60 "$stage/example" 1 2 "$stage/run" > /dev/null 2>&1 & reader=$!
  sleep 0.2  # rank 1 waits for the id
  CUDA_VISIBLE_DEVICES= timeout 60 "$stage/example" 0 2 "$stage/run" > /dev/null 2>&1; rc0=$?
  wait "$reader"; rc1=$?
  check "the example's rank 0 shares the unique id and, with no GPU visible, exits 77 (exit $rc0)" test $rc0 -eq 77
  check "its rank 1 reads the id and exits 77 (exit $rc1)" test $rc1 -eq 77
  check "the id file holds EP_UNIQUE_ID_BYTES (128) bytes and no temporary file is left" \
    test "$(ls "$stage/run")" = ep_unique_id -a "$(stat -c %s "$stage/run/ep_unique_id")" = 128
  env -u EP_LAUNCH_RANK "$stage/example" > /dev/null 2>&1; rc=$?
  check "the example without a rank or the launcher's environment exits 2 (exit $rc)" test $rc -eq 2
fi

make -s -C "$repo" uninstall DESTDIR="$stage" PREFIX="$prefix" > /dev/null 2>&1
check "make uninstall leaves no file" test -z "$(find "$root" -type f -o -type l)"
echo "test_make_install: $failed failed"
[[ $failed -eq 0 ]]
