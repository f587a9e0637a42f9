# ep: build libep.so (C11 host code + CUDA kernels for the GPUs of ARCHS, NVSHMEM device-linked inside), the tests,
# the launcher and the benchmark. `make` works without a GPU; `make test` runs what this machine can run.
#
# Finds: CUDA through CUDA_HOME (else nvcc on PATH); NVSHMEM 3.4 through NVSHMEM_HOME (else the nvidia-nvshmem-cu13
# wheel of $(PYTHON): scripts/find_nvshmem.py); NCCL, for the benchmark's baseline only, through NCCL_HOME (else the
# nvidia-nccl-cu13 wheel, else CUDA_HOME, else /usr). The CUDA toolkit alone does not ship NCCL: without it,
# `make all` builds everything but the benchmark.

# Goals that build nothing need none of the toolchain.
BUILDS := $(filter-out clean uninstall,$(or $(MAKECMDGOALS),all))

CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell command -v nvcc 2>/dev/null))
PYTHON ?= python3
NVSHMEM_HOME ?= $(shell $(PYTHON) scripts/find_nvshmem.py 2>/dev/null)
NVSHMEM_FILES := $(addprefix $(NVSHMEM_HOME)/,include/nvshmem.h lib/libnvshmem_host.so.3 lib/libnvshmem_device.a)
ifneq ($(BUILDS),)
ifeq ($(CUDA_HOME),)
$(error CUDA not found: put nvcc on PATH or set CUDA_HOME)
endif
ifeq ($(NVSHMEM_HOME),)
$(error NVSHMEM not found: run scripts/setup.sh (it installs nvidia-nvshmem-cu13==3.4.5), or set NVSHMEM_HOME)
endif
ifneq ($(filter-out $(wildcard $(NVSHMEM_FILES)),$(NVSHMEM_FILES)),)
$(error NVSHMEM_HOME=$(NVSHMEM_HOME) lacks $(filter-out $(wildcard $(NVSHMEM_FILES)),$(NVSHMEM_FILES)))
endif
endif

# NCCL in folder $(1): its libnccl.so.2 where include/nccl.h is beside it, else nothing.
nccl_lib = $(if $(1),$(if $(wildcard $(1)/include/nccl.h),$(firstword \
  $(wildcard $(addprefix $(1)/,lib/libnccl.so.2 lib64/libnccl.so.2 lib/*-linux-gnu/libnccl.so.2)))))
ifeq ($(origin NCCL_HOME),undefined)
NCCL_WHEEL := $(shell $(PYTHON) -c "import nvidia.nccl as m; print(*m.__path__)" 2>/dev/null)
NCCL_HOME := $(firstword $(foreach d,$(NCCL_WHEEL) $(CUDA_HOME) /usr,$(if $(call nccl_lib,$(d)),$(d))))
endif
NCCL_LIB := $(call nccl_lib,$(NCCL_HOME))

# ARCHS: the GPUs the kernels are compiled for, one SASS image each in libep.so. A number N is sm_N's code compiled
# for sm_N (80: A100, 90: H100 / H200, 100: B200 / GB200; a cubin also runs on later minors of its major, e.g. 80 on
# sm_86 / sm_89). N-on-M compiles the compute_N code (__CUDA_ARCH__ == N*10) to sm_M's SASS: `ARCHS=80-on-90` runs
# the Ampere code of the kernels on an H100. No PTX is shipped: NVSHMEM's device code is joined to the kernels by a
# device link (-rdc), which links SASS only, so a GPU outside ARCHS needs a build of its own.
ARCHS ?= 80 90 100
# Each word's virtual and real architecture (80-on-90: 80, 90).
arch_virtual = $(firstword $(subst -on-, ,$(1)))
arch_real = $(lastword $(subst -on-, ,$(1)))
KNOWN_ARCHS := 80 86 87 89 90 100 103 110 120
ifneq ($(BUILDS),)
ifneq ($(filter %-ptx,$(ARCHS)),)
$(error ARCHS="$(ARCHS)": libep.so cannot run from PTX (the device link with NVSHMEM links SASS only); N-on-M \
  compiles the compute_N code to sm_M SASS, e.g. ARCHS=80-on-90 runs the Ampere code on an H100)
endif
ifneq ($(or $(if $(strip $(ARCHS)),,empty),$(filter-out $(KNOWN_ARCHS),$(foreach a,$(ARCHS),$(call arch_virtual,$(a)) \
  $(call arch_real,$(a))))),)
$(error ARCHS="$(ARCHS)": name one or more of N or N-on-M, N and M among $(KNOWN_ARCHS) (sm_N))
endif
endif
GENCODE := $(foreach a,$(ARCHS),-gencode arch=compute_$(call arch_virtual,$(a)),code=sm_$(call arch_real,$(a)))
# The SASS images in the order given, each once, for the check at group creation (src/core/arch.c).
uniq = $(if $(1),$(firstword $(1)) $(call uniq,$(filter-out $(firstword $(1)),$(1))))
SASS_ARCHS := $(strip $(call uniq,$(foreach a,$(ARCHS),$(call arch_real,$(a)))))
BUILD ?= build
NVCC := $(CUDA_HOME)/bin/nvcc
CC ?= gcc
CUDA_LIB := $(CUDA_HOME)/lib64
NVSHMEM_LIB := $(NVSHMEM_HOME)/lib

INCLUDES := -Iinclude -Isrc -I$(CUDA_HOME)/include
WARN := -Wall -Wextra -Werror
CFLAGS_LIB := -std=c11 -O2 -g -fPIC -fvisibility=hidden $(WARN) -D_POSIX_C_SOURCE=200809L $(INCLUDES)
# nvcc compiles a file's images one after the other unless --threads: one thread per image (the kernels' largest
# file dominates a parallel build's time).
NVCC_THREADS ?= $(words $(ARCHS))
NVCCFLAGS := -O3 -g -std=c++17 $(GENCODE) --threads $(NVCC_THREADS) -rdc=true \
             -Xcompiler -fPIC,-Wall,-fvisibility=hidden -Iinclude -Isrc -I$(NVSHMEM_HOME)/include \
             --expt-relaxed-constexpr $(EXTRA_NVCCFLAGS)
SANITIZE ?= -fsanitize=address,undefined -fno-omit-frame-pointer
CFLAGS_TEST := -std=c11 -O1 -g $(WARN) -D_POSIX_C_SOURCE=200809L $(INCLUDES) -Itests -Itests/ref

HEADERS := $(wildcard include/*.h src/*/*.h src/*/*.cuh tests/common/*.h tests/ref/*.h tests/gpu/*.h)
CORE_SRC := $(wildcard src/core/*.c)
CUDA_SRC := $(wildcard src/transport/*.cu src/kernels/*.cu)
CORE_OBJ := $(CORE_SRC:%.c=$(BUILD)/obj/%.o)
CUDA_OBJ := $(CUDA_SRC:%.cu=$(BUILD)/obj/%.o)
# The library's version is the header's; the soname carries the major number (libep.so.0 while the ABI is 0.x).
EP_VERSION := $(shell sed -n 's/^.define EP_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)$$/\2/p' include/ep.h \
  | paste -sd.)
EP_SONAME := libep.so.$(firstword $(subst ., ,$(EP_VERSION)))
LIB := $(BUILD)/lib/libep.so
LIB_FILE := $(BUILD)/lib/libep.so.$(EP_VERSION)
WHEEL_LIB := $(BUILD)/wheel/libep.so

REF_SRC := $(wildcard tests/ref/*.c)
REF_OBJ := $(REF_SRC:tests/ref/%.c=$(BUILD)/obj/ref/%.o)
REF_OBJ_PLAIN := $(REF_SRC:tests/ref/%.c=$(BUILD)/obj/ref_plain/%.o)
HOST_TESTS := $(patsubst tests/host/%.c,$(BUILD)/tests/host/%,$(wildcard tests/host/test_*.c))
GPU_TESTS := $(patsubst tests/gpu/%.c,$(BUILD)/tests/gpu/%,$(wildcard tests/gpu/test_*.c))
GPU_TEST_PARTS := tests/gpu/harness.c tests/gpu/normal_cases.c tests/gpu/normal_runs.c
LAUNCH := $(BUILD)/bin/ep_launch
EXAMPLE := $(BUILD)/bin/example_dispatch_combine
BENCH := $(BUILD)/bin/ep_bench
PROBES := $(patsubst bench/probes/%.cu,$(BUILD)/bin/%,$(wildcard bench/probes/*.cu))

# The reference objects are made through pattern rules only, which would make them intermediate files: make would
# delete them at its end (after `make test`'s summary) and rebuild them next time.
.SECONDARY: $(REF_OBJ) $(REF_OBJ_PLAIN)

.PHONY: all lib wheel-lib tests bench bench-build test test-host test-gpu install uninstall clean
all: lib tests $(if $(NCCL_LIB),bench-build)
lib: $(LIB)
wheel-lib: $(WHEEL_LIB)
tests: $(HOST_TESTS) $(GPU_TESTS) $(LAUNCH) $(EXAMPLE)
bench-build: $(BENCH) $(PROBES) $(LAUNCH)

# `make bench`: the main job: ep_bench on every local GPU with the default (DeepSeek-V3) shape; BENCH_ARGS adds
# options (e.g. BENCH_ARGS="--family intranode --sms 16,24"). The table is also kept in $(BUILD)/bench.log.
# Before anything is built: a GPU, and NCCL for the baseline.
ifneq ($(filter bench,$(MAKECMDGOALS)),)
NUM_GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
ifeq ($(NUM_GPUS),0)
$(error make bench: no GPU on this machine (nvidia-smi lists none); `make bench-build` builds the benchmark only)
endif
endif
ifeq ($(NCCL_LIB),)
ifneq ($(filter bench bench-build $(BENCH),$(MAKECMDGOALS)),)
$(error NCCL not found$(if $(NCCL_HOME), in NCCL_HOME=$(NCCL_HOME)): the benchmark's NCCL baseline needs it, and \
  the CUDA toolkit alone does not ship it. pip install nvidia-nccl-cu13, or set NCCL_HOME to a folder with \
  include/nccl.h and lib/libnccl.so.2. `make all` builds everything else without it)
endif
endif
bench: bench-build
	NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 NVSHMEM_REMOTE_TRANSPORT=$${NVSHMEM_REMOTE_TRANSPORT:-none} \
	  $(LAUNCH) -n $(NUM_GPUS) -t 900 -l $(BUILD)/bench-logs -- $(BENCH) $(BENCH_ARGS) | tee $(BUILD)/bench.log

# A build folder remembers its ARCHS: a change rebuilds the device code (the file changes only when ARCHS does).
ARCHS_STAMP := $(BUILD)/obj/archs
$(ARCHS_STAMP): FORCE
	@mkdir -p $(dir $@)
	@echo '$(ARCHS)' | cmp -s - $@ || echo '$(ARCHS)' > $@
.PHONY: FORCE
$(CUDA_OBJ) $(BUILD)/obj/src/core/arch.o $(BENCH) $(PROBES): $(ARCHS_STAMP)
$(BUILD)/obj/src/core/arch.o: CFLAGS_LIB += -DEP_SASS_ARCHS='"$(SASS_ARCHS)"'

$(BUILD)/obj/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_LIB) -c $< -o $@

$(BUILD)/obj/%.o: %.cu $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

# NVSHMEM's device code joins ours in one device link, so users of libep.so never need -rdc.
$(BUILD)/obj/device_link.o: $(CUDA_OBJ)
	$(NVCC) $(GENCODE) -dlink -Xcompiler -fPIC $(CUDA_OBJ) $(NVSHMEM_LIB)/libnvshmem_device.a -o $@

# What libep.so is made of. The wheel ships only libnvshmem_host.so.3: link by that exact name and find it at run
# time through the rpath. The CPU tests link the same parts rather than libep.so, so that white-box tests can reach
# internal functions (a host-only group object for argument validation).
LIB_PARTS := $(CORE_OBJ) $(CUDA_OBJ) $(BUILD)/obj/device_link.o $(NVSHMEM_LIB)/libnvshmem_device.a \
  $(NVSHMEM_LIB)/libnvshmem_host.so.3 -L$(CUDA_LIB) -lcudart -lstdc++ -lpthread -ldl -lrt
LINK_LIB := -shared -Wl,-soname,$(EP_SONAME) -Wl,--version-script=src/libep.map -Wl,--no-undefined
BUILD_RPATH := -Wl,-rpath,$(NVSHMEM_LIB) -Wl,-rpath,$(CUDA_LIB)

# The file is libep.so.X.Y.Z; libep.so.X (the soname) and libep.so (the link name) point to it. It finds NVSHMEM
# and the CUDA runtime where this build found them.
$(LIB): $(CORE_OBJ) $(CUDA_OBJ) $(BUILD)/obj/device_link.o src/libep.map
	@mkdir -p $(dir $@)
	$(CC) $(LINK_LIB) -o $(LIB_FILE) $(LIB_PARTS) $(BUILD_RPATH)
	ln -sf $(notdir $(LIB_FILE)) $(BUILD)/lib/$(EP_SONAME)
	ln -sf $(EP_SONAME) $@

# The Python wheel's copy (setup.py puts it in the package as ep/_lib/libep.so): the same parts, but it finds
# NVSHMEM and the CUDA runtime in NVIDIA's wheels beside the package (site-packages/nvidia/...), wherever pip
# installs it; the NVSHMEM folder of the build may be pip's temporary build environment, gone after the install.
# The toolkit's folder comes last, for a CUDA runtime installed with the toolkit.
WHEEL_RPATH := '$$ORIGIN/../../nvidia/nvshmem/lib:$$ORIGIN/../../nvidia/cu13/lib:$(CUDA_LIB)'
$(WHEEL_LIB): $(CORE_OBJ) $(CUDA_OBJ) $(BUILD)/obj/device_link.o src/libep.map
	@mkdir -p $(dir $@)
	$(CC) $(LINK_LIB) -o $@ $(LIB_PARTS) -Wl,-rpath,$(WHEEL_RPATH)

$(BUILD)/obj/ref/%.o: tests/ref/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_TEST) $(SANITIZE) -c $< -o $@

$(BUILD)/obj/ref_plain/%.o: tests/ref/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_TEST) -O2 -c $< -o $@

# CPU tests: under ASan and UBSan.
$(BUILD)/tests/host/%: tests/host/%.c $(REF_OBJ) $(LIB) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_TEST) $(SANITIZE) $< $(REF_OBJ) -o $@ $(LIB_PARTS) -lm $(BUILD_RPATH)

# GPU tests: one program, run once per rank by ep_launch; each links the harness and the normal-path cases.
$(BUILD)/tests/gpu/%: tests/gpu/%.c $(GPU_TEST_PARTS) $(REF_OBJ_PLAIN) $(LIB) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_TEST) -O2 $< $(GPU_TEST_PARTS) $(REF_OBJ_PLAIN) -o $@ -L$(BUILD)/lib -lep -L$(CUDA_LIB) -lcudart \
	  -lm -Wl,-rpath,$(abspath $(BUILD)/lib) -Wl,-rpath,$(CUDA_LIB)

# The C example: a program of its own against the public header, libep and the CUDA runtime, as
# `pkg-config --cflags --libs ep` builds it after `make install` (tests/install/test_make_install.sh).
$(EXAMPLE): examples/dispatch_combine.c include/ep.h $(LIB)
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -O2 $(WARN) -Iinclude -I$(CUDA_HOME)/include $< -o $@ -L$(BUILD)/lib -lep -L$(CUDA_LIB) -lcudart \
	  -Wl,-rpath,$(abspath $(BUILD)/lib) -Wl,-rpath,$(CUDA_LIB)

$(LAUNCH): tools/ep_launch.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -O2 $(WARN) -D_GNU_SOURCE $< -o $@

# nvcc compiles .c inputs as C by itself, and takes a versioned .so only through the linker.
$(BENCH): $(wildcard bench/*.cu bench/*.h) tests/gpu/harness.c $(REF_OBJ_PLAIN) $(LIB) $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) -O3 -std=c++17 $(GENCODE) -Xcompiler -Wall,-Wextra -Iinclude -Itests -I$(NCCL_HOME)/include \
	  $(filter %.cu,$^) tests/gpu/harness.c $(REF_OBJ_PLAIN) -o $@ -L$(BUILD)/lib -lep -Xlinker $(NCCL_LIB) \
	  -Xlinker -rpath,$(abspath $(BUILD)/lib) -Xlinker -rpath,$(dir $(NCCL_LIB))

# Diagnostic programs (bench/probes): one file each, run under ep_launch like the benchmark.
$(BUILD)/bin/%: bench/probes/%.cu tests/gpu/harness.c $(LIB) $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) -O3 -std=c++17 $(GENCODE) -Xcompiler -Wall,-Wextra -Iinclude -Itests $< tests/gpu/harness.c \
	  -o $@ -L$(BUILD)/lib -lep -Xlinker -rpath,$(abspath $(BUILD)/lib)

# `make test`: CPU tests always, GPU tests on 2, 4 and 8 GPUs where there are GPUs; one summary line at the end.
test: all
	@bash tests/run_tests.sh $(BUILD)

test-host: tests
	@bash tests/run_tests.sh $(BUILD) host

test-gpu: tests
	@bash tests/run_tests.sh $(BUILD) gpu

# `make install [PREFIX=/usr/local] [DESTDIR=...]`: the header, the library with its soname and link name, and a
# pkg-config file (`pkg-config --cflags --libs ep`, which also names the CUDA runtime that ep.h's users call). The
# installed library still finds NVSHMEM and the CUDA runtime where it was built (its rpath). The Python package
# installs with pip instead (pyproject.toml).
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
install: lib
	install -d $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PKGCONFIGDIR)
	install -m 644 include/ep.h $(DESTDIR)$(INCLUDEDIR)/ep.h
	install -m 755 $(LIB_FILE) $(DESTDIR)$(LIBDIR)/
	ln -sf $(notdir $(LIB_FILE)) $(DESTDIR)$(LIBDIR)/$(EP_SONAME)
	ln -sf $(EP_SONAME) $(DESTDIR)$(LIBDIR)/libep.so
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(patsubst $(PREFIX)/%,$${prefix}/%,$(LIBDIR))|' \
	    -e 's|@INCLUDEDIR@|$(patsubst $(PREFIX)/%,$${prefix}/%,$(INCLUDEDIR))|' \
	    -e 's|@CUDA_INCLUDEDIR@|$(CUDA_HOME)/include|' -e 's|@CUDA_LIBDIR@|$(CUDA_LIB)|' \
	    -e 's|@VERSION@|$(EP_VERSION)|' src/ep.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/ep.pc

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/ep.h $(DESTDIR)$(LIBDIR)/$(notdir $(LIB_FILE)) $(DESTDIR)$(LIBDIR)/$(EP_SONAME) \
	  $(DESTDIR)$(LIBDIR)/libep.so $(DESTDIR)$(PKGCONFIGDIR)/ep.pc

clean:
	rm -rf $(BUILD)
