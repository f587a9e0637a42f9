/* tuning.h: every compile-time knob of the kernels, with its default and why. A knob is set for a whole build:
 * `make EXTRA_NVCCFLAGS=-D<KNOB>=<value>` (a library built so is a build of its own; there is no run-time switch).
 * Included by the kernel sources that read one. */
#ifndef EP_KERNELS_TUNING_H
#define EP_KERNELS_TUNING_H

/* Low-latency calls without the receive hook: 1 runs both phases in one cooperative kernel per call (where the
 * launcher can; else two kernels), 0 always launches the send kernel and then the receive kernel, as the hook does.
 * One kernel saves the launch gap between the phases. 4 x H200, ep_bench's ll row (128 tokens per rank, hidden
 * 7168, CUDA events): one node, dispatch 43.7 -> 41.8 us and combine 60.0 -> 56.8 us; two nodes of two ranks,
 * 51.3 -> 48.6 and 63.8 -> 62.3 us. */
#ifndef EP_LL_FUSED
#define EP_LL_FUSED 1
#endif

/* Intranode combine: warps of each 16-warp block that push expert outputs over NVLink to their tokens' source ranks;
 * the others sum the copies that have arrived, so that the sums run under the transfer. */
#ifndef EP_COMBINE_PUSH_WARPS
#define EP_COMBINE_PUSH_WARPS 8
#endif

/* Profile builds (kernels/profile.cuh): per-phase %globaltimer stamps of block 0 and of the last block, printed with
 * device printf every EP_*_PROFILE_EVERY-th call. EP_LL_PROFILE=1: the low-latency phases; EP_NORMAL_PROFILE=1: the
 * normal path's dispatch and combine, both topologies. Off by default: a library built without them never prints. */
#ifndef EP_LL_PROFILE
#define EP_LL_PROFILE 0
#endif
#ifndef EP_LL_PROFILE_EVERY
#define EP_LL_PROFILE_EVERY 30
#endif
#ifndef EP_NORMAL_PROFILE
#define EP_NORMAL_PROFILE 0
#endif
#ifndef EP_NORMAL_PROFILE_EVERY
#define EP_NORMAL_PROFILE_EVERY 30
#endif
#if (EP_LL_PROFILE != 0 && EP_LL_PROFILE != 1) || (EP_NORMAL_PROFILE != 0 && EP_NORMAL_PROFILE != 1)
#error "EP_LL_PROFILE and EP_NORMAL_PROFILE are 0 or 1"
#endif

#endif /* EP_KERNELS_TUNING_H */
