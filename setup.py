"""Build step of the Python package (pyproject.toml holds its metadata): `make wheel-lib`, then that libep.so goes
inside the package as ep/_lib/libep.so, where ep._capi looks for it first. The wheel is therefore platform-specific.
This copy of the library finds NVSHMEM and the CUDA runtime in NVIDIA's wheels beside the package in site-packages
($ORIGIN-relative RUNPATH; the Makefile says why), not in the folders of the build.

Make's BUILD folder (default `build`) is shared with a plain `make`, so an existing build is reused; setuptools'
own files go to BUILD/python so that they never mix with make's."""

import os
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD = os.environ.get("BUILD", "build")


class BuildPyWithLibrary(build_py):
    def run(self):
        super().run()
        # PYTHON: the Makefile finds the NVSHMEM wheel through this interpreter, the one the build runs in.
        make = ["make", f"-j{os.cpu_count() or 1}", "wheel-lib", f"BUILD={BUILD}", f"PYTHON={sys.executable}"]
        subprocess.check_call(make, cwd=ROOT)
        target = os.path.join(self.build_lib, "ep", "_lib")
        os.makedirs(target, exist_ok=True)
        shutil.copyfile(os.path.join(ROOT, BUILD, "wheel", "libep.so"), os.path.join(target, "libep.so"))
        os.chmod(os.path.join(target, "libep.so"), 0o755)


class BinaryDistribution(Distribution):
    """The package carries a shared library: tag the wheel with the platform, not `none-any`."""

    def has_ext_modules(self):
        return True


build_base = os.path.join(BUILD, "python")
os.makedirs(build_base, exist_ok=True)
setup(cmdclass={"build_py": BuildPyWithLibrary}, distclass=BinaryDistribution,
      options={"build": {"build_base": build_base}, "egg_info": {"egg_base": build_base}})
