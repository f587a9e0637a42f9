/* ll_logfmt.h: LogFMT-10, the combine payload of use_logfmt (DeepEP's bytes per row: H * 10 / 8 + H / 128 * 4).
 * The format and its arithmetic are the reference's (tests/ref/ep_ref.h, section 7b), which the GPU test matches bit
 * for bit: a row is G = H / 128 uint32 words (bf16 amax | bf16 amin << 16 of each 128-channel group, amin over the
 * normal nonzero magnitudes, 0 if none), then G blocks of 160 bytes: the 10-bit field of value j (sign << 9 | code)
 * has its low 8 bits at byte j and its high 2 bits at bits 2 * (j % 4) of byte 128 + j / 4, so that a lane holding
 * 4 consecutive values stores one uint32 and one byte. Every step is fmaf, floor, ldexp or one IEEE operation, so
 * the kernel and the C reference round alike (nvcc contracts a * b + c into fmaf by itself: none is written). */
#ifndef EP_KERNELS_LL_LOGFMT_H
#define EP_KERNELS_LL_LOGFMT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/host_device.h"

/* The helpers below run in the kernels (device) and in the host tests (C); the table lives on the side that uses
 * it. */
#ifdef __CUDACC__
#define EP_LOGFMT_FN static __device__ __forceinline__
#define EP_LOGFMT_TABLE static __device__ const float
#else
#define EP_LOGFMT_FN static inline
#define EP_LOGFMT_TABLE static const float
#endif

static inline EP_HD size_t ep_logfmt_row_bytes(int hidden) {
  return (size_t)hidden * 10 / 8 + (size_t)hidden / 128 * 4;
}

/* log2(1 + m / 128) for the 128 bf16 mantissas, as floats (the reference computes (float)log2(1.0 + m / 128.0);
 * tests/host/test_api.c checks that they agree). */
EP_LOGFMT_TABLE ep_logfmt_log2_mantissa[128] = {
    0.0f,          0.0112272557f, 0.0223678127f, 0.0334230028f, 0.0443941206f, 0.0552824363f, 0.0660891905f,
    0.0768155977f, 0.0874628425f, 0.0980320796f, 0.108524457f,  0.118941076f,  0.129283011f,  0.139551356f,
    0.149747118f,  0.15987134f,   0.169925004f,  0.179909095f,  0.189824566f,  0.199672341f,  0.209453359f,
    0.219168514f,  0.228818685f,  0.238404736f,  0.247927517f,  0.257387847f,  0.266786546f,  0.276124418f,
    0.285402209f,  0.294620752f,  0.303780735f,  0.31288296f,   0.321928084f,  0.330916882f,  0.339850008f,
    0.34872815f,   0.357551992f,  0.366322219f,  0.375039428f,  0.383704305f,  0.392317414f,  0.400879443f,
    0.409390926f,  0.417852521f,  0.426264763f,  0.434628218f,  0.442943484f,  0.451211125f,  0.459431618f,
    0.467605561f,  0.475733429f,  0.483815789f,  0.491853088f,  0.499845892f,  0.507794619f,  0.515699863f,
    0.523561954f,  0.531381488f,  0.539158821f,  0.546894431f,  0.554588854f,  0.562242448f,  0.56985563f,
    0.577428818f,  0.584962487f,  0.592457056f,  0.599912822f,  0.607330322f,  0.614709854f,  0.622051835f,
    0.629356623f,  0.636624634f,  0.643856168f,  0.6510517f,    0.65821147f,   0.665335894f,  0.67242533f,
    0.679480076f,  0.686500549f,  0.693486929f,  0.700439692f,  0.707359135f,  0.714245498f,  0.721099198f,
    0.727920473f,  0.73470962f,   0.741466999f,  0.748192847f,  0.754887521f,  0.761551261f,  0.768184304f,
    0.774787068f,  0.781359732f,  0.787902534f,  0.794415891f,  0.800899923f,  0.807354927f,  0.813781202f,
    0.820178986f,  0.826548517f,  0.832890034f,  0.839203775f,  0.845490038f,  0.851749063f,  0.857980967f,
    0.864186168f,  0.870364726f,  0.876516938f,  0.882643044f,  0.888743222f,  0.89481777f,   0.900866807f,
    0.906890571f,  0.912889361f,  0.918863237f,  0.924812496f,  0.930737317f,  0.936637938f,  0.942514479f,
    0.948367238f,  0.954196334f,  0.960001945f,  0.965784311f,  0.97154355f,   0.977279902f,  0.982993603f,
    0.988684714f,  0.994353414f};

/* log2 of a bf16 magnitude (sign bit clear): exponent + the mantissa's table entry; -INFINITY for 0 and subnormals. */
EP_LOGFMT_FN float ep_logfmt_log2(uint32_t bits) {
  const int e = (int)(bits >> 7) & 0xff;
  return e == 0 ? -INFINITY : (float)(e - 127) + ep_logfmt_log2_mantissa[bits & 0x7f];
}

/* 2^y: a degree-7 Taylor polynomial of 2^f on f = y - floor(y) (fmaf, float coefficients), scaled exactly. */
EP_LOGFMT_FN float ep_logfmt_exp2(float y) {
  const float n = floorf(y), f = y - n;
  float p = 0.0000152527338040598f;
  p = fmaf(p, f, 0.000154035303933816f);
  p = fmaf(p, f, 0.00133335581464284f);
  p = fmaf(p, f, 0.00961812910762848f);
  p = fmaf(p, f, 0.0555041086648216f);
  p = fmaf(p, f, 0.240226506959101f);
  p = fmaf(p, f, 0.693147180559945f);
  p = fmaf(p, f, 1.0f);
  return ldexpf(p, (int)n);
}

/* A group's grid from its meta word: lowest log2 lb and step (0: one magnitude); both 0 for an all-zero group. */
EP_LOGFMT_FN void ep_logfmt_grid(uint32_t meta, float* lb, float* step) {
  const float la = ep_logfmt_log2(meta & 0xffffu), lo = ep_logfmt_log2(meta >> 16);
  if (la == -INFINITY) {
    *lb = *step = 0.0f;
    return;
  }
  *lb = lo > la - 32.0f ? lo : la - 32.0f;
  *step = (la - *lb) / 510.0f;
}

/* The 10-bit field of bf16 value v in a group with grid (lb, step, inv = 1 / step). */
EP_LOGFMT_FN uint32_t ep_logfmt_field(uint32_t v, float lb, float step, float inv) {
  const float l = ep_logfmt_log2(v & 0x7fffu);
  if (l == -INFINITY) return 0;
  int code = 1;
  if (step != 0.0f) {
    const float t = floorf(fmaf(l - lb, inv, 1.5f));
    code = t < 0.0f ? 0 : t > 511.0f ? 511 : (int)t;
  }
  return code ? (v >> 15 & 1u) << 9 | (uint32_t)code : 0u;
}

/* The value of a 10-bit field. */
EP_LOGFMT_FN float ep_logfmt_value(uint32_t field, float lb, float step) {
  const uint32_t code = field & 511u;
  const float mag = code ? ep_logfmt_exp2(fmaf((float)(code - 1), step, lb)) : 0.0f;
  return field >> 9 ? -mag : mag;
}

#endif /* EP_KERNELS_LL_LOGFMT_H */
