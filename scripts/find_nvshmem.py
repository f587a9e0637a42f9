"""Print the folder of the NVSHMEM wheel (nvidia-nvshmem-cu13) that this Python sees, if it is complete.

The build needs the header and both libraries. A wheel that was uninstalled, or installed only in part, can leave
the `nvidia/nvshmem` namespace folders behind, so importing `nvidia.nvshmem` alone proves nothing: each folder of
the namespace is checked for the files. Exit status 0 with the folder on stdout; 1 with what is missing on stderr.
The Makefile (NVSHMEM_HOME) and scripts/setup.sh both ask this script."""

import os
import sys

REQUIRED = ("include/nvshmem.h", "lib/libnvshmem_host.so.3", "lib/libnvshmem_device.a")


def main():
    try:
        import nvidia.nvshmem as package
    except ImportError:
        print("NVSHMEM: no nvidia.nvshmem package for %s" % sys.executable, file=sys.stderr)
        return 1
    for folder in package.__path__:
        missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(folder, f))]
        if not missing:
            print(folder)
            return 0
        print("NVSHMEM: %s lacks %s" % (folder, ", ".join(missing)), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
