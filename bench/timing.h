/* timing.h: event timing of operations that run once per iteration, as the table reports them. */
#ifndef EP_BENCH_TIMING_H
#define EP_BENCH_TIMING_H

#include <functional>

#include "bench.h"

/* One timed operation: enqueues its work on b->stream (and checks its calls; a failure ends the run). */
typedef std::function<void()> bench_phase_fn;

/* Runs b->opt.warmup + b->opt.iters iterations; an iteration runs the phases in order, each one preceded by a
 * line-up of the ranks (so that no rank starts before the others are there: a late peer is not counted as
 * transfer time: a 1-float NCCL all-reduce, or, where ranks share a GPU and NCCL cannot run, a host spin barrier on
 * a shared counter after the stream drained) and by an L2 flush, and timed by CUDA events around the phase alone.
 * Stores each phase's median over the timed iterations, in microseconds, on this rank. Collective. */
void bench_time_phases(bench_t* b, int num_phases, const bench_phase_fn* phases, double* median_us);

/* Without NCCL: maps the counter of the host line-up (a file in the launch folder). Collective. */
void bench_line_up_init(bench_t* b);
void bench_line_up_fini(bench_t* b);

#endif /* EP_BENCH_TIMING_H */
