"""Integer program -> float-free C99 for microcontrollers (`lsqint export --format c`).

The generated pair ``NAME.h`` / ``NAME.c`` has one entry point,

    int NAME_run(const uint8_t *pixels, int32_t *logits);

for ONE image (C x H x W uint8, channel-major like the program's input) and returns 0. It uses
only ``<stdint.h>`` and ``<string.h>``: no float or double anywhere, no malloc. Weights are
``const`` arrays (flash) in the artifact's packed b-bit form (``artifact.pack_bits``: code +
2^(b-1), least significant bit first), unpacked one output channel at a time into a small scratch
row. Activations live in one static arena whose layout is planned here from tensor lifetimes
(first fit, largest tensor first); ``NAME_ARENA_BYTES`` is the peak RAM besides the stack.

Semantics are the reference runtime's, op by op (``runtime/reference.py``). The integer widths
follow the proofs ``verify`` checks: conv/linear/avgpool accumulators fit int32 (``acc_bound``
< 2^31), so they accumulate in int32; requantize, add and the input affine compute in int64 as
``fixedpoint`` derives. Right shifts are written for non-negative operands only (``lq_shr``), so
the result does not depend on how a compiler shifts negative numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ExportError
from ..intprog.artifact import pack_bits
from ..intprog.ops import OPS, Unsupported
from ..intprog.ops.base import absmax
from ..intprog.program import IntProgram, Node, TensorSpec
from ..intprog.verify import verify

C_TYPES = {"uint8": "uint8_t", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t"}
_ITEM_BYTES = {"uint8": 1, "int8": 1, "int32": 4}
_ALIGN = 4

# The kernels, written once; ``{X}``/``{Y}`` are the input/output element types. Each is emitted
# only for the type combinations the program uses.
_HELPERS = r"""
/* floor(x / 2^t) for any sign, with right shifts of non-negative values only. */
static inline int64_t lq_shr(int64_t x, int t) { return x >= 0 ? x >> t : ~((~x) >> t); }

/* clamp(floor((x + 2^(t-1)) / 2^t), lo, hi): round half up, then saturate. */
static inline int64_t lq_round_clamp(int64_t x, int t, int64_t lo, int64_t hi)
{
    int64_t y = lq_shr(x + ((int64_t)1 << (t - 1)), t);
    return y < lo ? lo : (y > hi ? hi : y);
}

#if LQ_DSP
/* lq_round_clamp(acc * m, t, lo, hi) for an int32 accumulator and a multiplier m < 2^31, in
 * 32-bit steps when t > 32 (the usual case: m in [2^30, 2^31) and a scale ratio under 1/2):
 * with h = floor(acc * m / 2^32), the high word of one SMULL (|h| <= 2^30),
 * floor((acc * m + 2^(t-1)) / 2^t) = floor((h + 2^(t-33)) / 2^(t-32)), because adding a
 * multiple of 2^32 commutes with floor division by 2^32; |h + 2^(t-33)| < 2^31 (t <= 62), and
 * the arithmetic right shift by t - 32 is that floor division. Shifts of negative values are
 * arithmetic in GCC and Clang ("Integers implementation" in GCC's manual), the only compilers
 * of this path (it uses their inline assembly); the portable path keeps lq_round_clamp, which
 * shifts non-negative values only. t <= 32 takes lq_round_clamp here too. */
static inline int32_t lq_requant32(int32_t acc, int32_t m, int t, int32_t lo, int32_t hi)
{
    int32_t h, y;
    if (t <= 32) return (int32_t)lq_round_clamp((int64_t)acc * m, t, lo, hi);
    h = (int32_t)(((int64_t)acc * m) >> 32);
    y = (h + (1 << (t - 33))) >> (t - 32);
    return y < lo ? lo : (y > hi ? hi : y);
}
/* The fused layers' requantize when export found every channel's t + k in [33, 62] and
 * |acc| 2^k < 2^31 (requant_table): floor((acc * m + 2^(t-1)) / 2^t) with acc' = acc 2^k and
 * t' = t + k (the same quotient: numerator and denominator times 2^k), then SMMLA: the high
 * word of rnd 2^32 + acc' m, that is rnd + floor(acc' m / 2^32) exactly (|acc' m| < 2^62;
 * |rnd + h| <= 2^29 + 2^30), and rnd = 2^(t'-33) adds 2^(t'-1) before the floor division by
 * 2^32, which commutes with adding a multiple of 2^32; the arithmetic shift by sh = t' - 32 in
 * [1, 30] is the remaining floor division. Per channel, q holds {m, rnd, sh}; kk = 2^k. */
static inline int32_t lq_smmla(int32_t a, int32_t b, int32_t acc)
{
    int32_t r;
    __asm__("smmla %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}
static inline int32_t lq_clamp32(int32_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}
#define LQ_RQ(acc, q, kk) (lq_smmla((acc) * (kk), (q)[0], (q)[1]) >> (q)[2])
/* The packed kernels' inner loops (lq_packed_dot_V_N_R, written per packing and chunk). */
typedef void (*lq_packed_fn)(const uint32_t *u, const uint32_t *cols, int32_t *s, int32_t n);
/* A fused layer's requantize of accumulator acc (lo, hi: a code range, inside int32). */
#define LQ_REQUANT(acc, m, t, lo, hi) lq_requant32(acc, m, t, (int32_t)(lo), (int32_t)(hi))
#else
#define LQ_REQUANT(acc, m, t, lo, hi) lq_round_clamp((int64_t)(acc) * (m), t, lo, hi)
#endif

#if !LQ_DSP
/* Unpack codes [k0, k0 + n) of a packed b-bit weight stream (code + 2^(b-1), LSB first). */
static void lq_unpack(const uint8_t *packed, int bits, int32_t k0, int32_t n, int16_t *row)
{
    int32_t i;
    if (bits == 8) {
        for (i = 0; i < n; i++) row[i] = (int16_t)((int32_t)packed[k0 + i] - 128);
        return;
    }
    for (i = 0; i < n; i++) {
        uint32_t pos = (uint32_t)(k0 + i) * (uint32_t)bits;
        uint32_t v = (uint32_t)packed[pos >> 3] | ((uint32_t)packed[(pos >> 3) + 1] << 8);
        v = (v >> (pos & 7u)) & ((1u << bits) - 1u);
        row[i] = (int16_t)((int32_t)v - (1 << (bits - 1)));
    }
}
#endif
"""

# The conv2d/linear kernels in two forms: writing the int32 accumulator, or (``_rq``) fused with
# the requantize that is its only reader, writing {Y} codes (``LQ_V``: the reference's rule,
# ``lq_round_clamp``), so no int32 tensor is stored. The portable conv accumulates each output
# channel in an int32 plane (the output itself, or a scratch plane when fused).
_LAYER_FORMS = {
    "acc": {
        "{OUT_NAME}": "",
        "{OUT_PARAMS}": "int32_t *y",
        "{OUT_T}": "int32_t",
        "{LQ_V}": "#define LQ_V(acc, ch) (acc)",
        "{PLANE}": "y + (int32_t)o * OH * OW",
        "{PLANE_PARAM}": "",
        "{EMIT}": "",
    },
    # DSP kernels only: the requantize as LQ_RQ (requant_table) and {SAT}, the clamp as one
    # USAT/SSAT where the code range is a saturation range, else lq_clamp32 of constants.
    "rqs": {
        "{OUT_NAME}": "_rqs_{YN}_{SATN}",
        "{OUT_PARAMS}": "{Y} *y, const int32_t *q, int32_t kk",
        "{OUT_T}": "{Y}",
        "{LQ_V}": "#define LQ_V(acc, ch) (({Y}){SAT})",
    },
    "rq": {
        "{OUT_NAME}": "_rq_{YN}",
        "{OUT_PARAMS}": "{Y} *y, const int32_t *m, const int8_t *t, int pc, int64_t lo, int64_t hi",
        "{OUT_T}": "{Y}",
        "{LQ_V}": "#define LQ_V(acc, ch) \\\n"
        "    (({Y})LQ_REQUANT((acc), m[pc ? (ch) : 0], t[pc ? (ch) : 0], lo, hi))",
        "{PLANE}": "plane",
        "{PLANE_PARAM}": ", int32_t *plane",
        "{EMIT}": "\n        for (oy = 0; oy < OH * OW; oy++)"
        "\n            y[(int32_t)o * OH * OW + oy] = LQ_V(yo[oy], o);",
    },
}

_KERNELS = {
    "im2col": r"""
#if LQ_DSP
/* The receptive field of output pixel (oy, ox) as {C} codes, 0 for padding and for k >= K
 * (im2col of one pixel; k = (c * KH + ky) * KW + kx, the weights' order). A window wholly
 * inside the input with DW == 1 copies rows of KW codes without bounds tests. */
static void lq_im2col_{XN}_{CN}(const {X} *x, int H, int W, int cg, int KH, int KW, int SH, int SW,
                           int PH, int PW, int DH, int DW, int oy, int ox, int Kp, {C} *col)
{
    int c, ky, kx, k = 0;
    int iy0 = oy * SH - PH, ix0 = ox * SW - PW;
    if (DW == 1 && iy0 >= 0 && ix0 >= 0 && iy0 + (KH - 1) * DH < H && ix0 + KW <= W) {
        const {X} *xc = x + (int32_t)iy0 * W + ix0;
        int32_t HW = (int32_t)H * W, R = (int32_t)DH * W;
        if (KH == 3 && KW == 3 && sizeof({C}) == 1 && sizeof({X}) == 1) {
            /* bytes: one unaligned word load and store per row of 3 codes (ARMv7-M allows
             * unaligned LDR/STR unless CCR.UNALIGN_TRP is set; with -mno-unaligned-access gcc
             * copies bytes instead, still correct). The fourth byte read is the next code of
             * the input array (the arena has a spare word at its end); the fourth byte written is
             * overwritten by the next row, or lands at k = K (zeroed below) or just past the
             * column, in scratch written later. */
            for (c = 0; c < cg; c++, xc += HW, k += 9) {
                uint32_t r0, r1, r2;
                memcpy(&r0, xc, 4), memcpy(&r1, xc + R, 4), memcpy(&r2, xc + 2 * R, 4);
                memcpy(col + k, &r0, 4), memcpy(col + k + 3, &r1, 4), memcpy(col + k + 6, &r2, 4);
            }
        } else if (KH == 3 && KW == 3) { /* unrolled: 2 instructions per code (load, store) */
            for (c = 0; c < cg; c++, xc += HW, k += 9) {
                col[k] = ({C})xc[0], col[k + 1] = ({C})xc[1];
                col[k + 2] = ({C})xc[2], col[k + 3] = ({C})xc[R];
                col[k + 4] = ({C})xc[R + 1], col[k + 5] = ({C})xc[R + 2];
                col[k + 6] = ({C})xc[2 * R], col[k + 7] = ({C})xc[2 * R + 1];
                col[k + 8] = ({C})xc[2 * R + 2];
            }
        } else if (KH == 1 && KW == 1) {
            for (c = 0; c < cg; c++, xc += HW) col[k++] = ({C})xc[0];
        } else {
            for (c = 0; c < cg; c++, xc += HW) {
                const {X} *xr = xc;
                for (ky = 0; ky < KH; ky++, xr += R)
                    for (kx = 0; kx < KW; kx++) col[k++] = ({C})xr[kx];
            }
        }
    } else {
        /* A window across the border: zeros, then the taps inside the input, rows
         * ky0 <= ky < ky1 and columns kx0 <= kx < kx1 (the same for every channel); a row of
         * two or three adjacent taps unrolled (3x3 windows: every border row). */
        int kx0 = 0, kx1 = KW, ky0 = 0, ky1 = KH, n;
        while (kx0 < KW && ix0 + kx0 * DW < 0) kx0++;
        while (kx1 > kx0 && ix0 + (kx1 - 1) * DW >= W) kx1--;
        while (ky0 < KH && iy0 + ky0 * DH < 0) ky0++;
        while (ky1 > ky0 && iy0 + (ky1 - 1) * DH >= H) ky1--;
        for (k = 0; k < Kp; k++) col[k] = 0;
        n = kx1 - kx0;
        if (n > 0 && ky1 > ky0) {
            int32_t HW = (int32_t)H * W, R = (int32_t)DH * W;
            const {X} *xc = x + (int32_t)(iy0 + ky0 * DH) * W + ix0 + kx0 * DW;
            for (c = 0; c < cg; c++, xc += HW) {
                const {X} *xr = xc;
                {C} *row = col + (c * KH + ky0) * KW + kx0;
                for (ky = ky0; ky < ky1; ky++, xr += R, row += KW) {
                    if (DW == 1 && n == 3)
                        row[0] = ({C})xr[0], row[1] = ({C})xr[1], row[2] = ({C})xr[2];
                    else if (DW == 1 && n == 2)
                        row[0] = ({C})xr[0], row[1] = ({C})xr[1];
                    else
                        for (kx = 0; kx < n; kx++) row[kx] = ({C})xr[kx * DW];
                }
            }
        }
        k = Kp;
    }
    for (; k < Kp; k++) col[k] = 0;
}

#endif
""",
    "dot2x2": r"""
#if LQ_DSP
/* The DSP kernels' inner loop: s[0..3] += the dot products of two output channels' int8
 * weights (a, b) with two int16 columns (c0, c1) of Kp = s[4] codes (a multiple of 4):
 * s = {a.c0, a.c1, b.c0, b.c1}. Weights as dsp_weight_layout stores them: per group of four
 * codes the word of a then the word of b (one LDRD), each word w0 w2 w1 w3, so SXTB16 gives
 * the pair (w0, w1) and SXTB16 of the word rotated by 8 gives (w2, w3), matching the columns'
 * int16 pairs; SMLAD adds two 16 x 16 products to an int32. 15 instructions per 16 MACs plus
 * the loop's 2 per 32 MACs (two groups per pass; one group first when Kp / 4 is odd).
 * Registers: r4-r7 the sums, r8-r11 the weight pairs, r12/r3 two column words, lr the end of
 * column 0: all 14. Written in assembly because gcc 12 -O2 spilled three of them inside the
 * loop (25 instructions per 16 MACs, measured). Exactness: see lq_conv_dsp. */
__attribute__((naked, noinline)) static void lq_dot2x2(const int8_t *w, const int16_t *c0,
                                                      const int16_t *c1, int32_t *s)
{
    __asm__ volatile(
        ".syntax unified\n"
        "push {r3-r11, lr}\n"
        "ldm r3, {r4-r7}\n"
        "ldr r12, [r3, #16]\n"
        "add lr, r1, r12, lsl #1\n"
        "tst r12, #4\n"
        "beq 2f\n"
{GROUP}
        "cmp r1, lr\n"
        "beq 3f\n"
        "2:\n"
{GROUP}
{GROUP}
        "cmp r1, lr\n"
        "bne 2b\n"
        "3:\n"
        "ldr r3, [sp]\n"
        "stm r3, {r4-r7}\n"
        "pop {r3-r11, pc}\n"
        : : : "memory");
}
#endif
""".replace(
        "{GROUP}",
        """\
        "ldrd r8, r9, [r0], #8\\n"
        "sxtb16 r10, r8, ror #8\\n"
        "sxtb16 r8, r8\\n"
        "sxtb16 r11, r9, ror #8\\n"
        "sxtb16 r9, r9\\n"
        "ldrd r12, r3, [r1], #8\\n"
        "smlad r4, r8, r12, r4\\n"
        "smlad r4, r10, r3, r4\\n"
        "smlad r6, r9, r12, r6\\n"
        "smlad r6, r11, r3, r6\\n"
        "ldrd r12, r3, [r2], #8\\n"
        "smlad r5, r8, r12, r5\\n"
        "smlad r5, r10, r3, r5\\n"
        "smlad r7, r9, r12, r7\\n"
        "smlad r7, r11, r3, r7\\n\"""",
    ),
    "conv2d_dsp": r"""
#if LQ_DSP
{LQ_V}
/* conv2d (and linear, as a 1x1 conv of a (I, 1, 1) input) for the Arm DSP extension
 * (ARMv7E-M: Cortex-M4/M7/M33): the receptive fields of two output pixels copied into int16
 * columns (im2col), then two output channels x two pixels per lq_dot2x2 call.
 * Exact: codes fit int16 ([-128, 255]) and weights int8; every running sum is the bias plus
 * some of the products, so |sum| <= sum|w| max|x| + |bias| = the layer's acc_bound < 2^31
 * (checked by verify), and no SMLAD wraps. A channel without a partner (odd channel count per
 * group) is paired with zero weights, a pixel without one with a copy of its own column; the
 * results of both are not stored. */
static void lq_conv_dsp_{XN}{OUT_NAME}(
    const {X} *x, int C, int H, int W, const int8_t *w, int Kp, const int32_t *bias,
    {OUT_PARAMS}, int O, int OH, int OW, int KH, int KW, int SH, int SW, int PH, int PW, int DH,
    int DW, int groups, int16_t *cols)
{
    int cg = C / groups, og = O / groups, P = OH * OW, g, p, o;
    int og2 = og + (og & 1); /* weight rows per group: padded to pairs */
    int16_t *col0 = cols, *col1 = cols + Kp;
    int32_t s[5];
    s[4] = Kp;
    for (g = 0; g < groups; g++) {
        const {X} *xg = x + (int32_t)g * cg * H * W;
        for (p = 0; p < P; p += 2) {
            int two = p + 1 < P;
            const int16_t *c1 = two ? col1 : col0;
            lq_im2col_{XN}_i16(xg, H, W, cg, KH, KW, SH, SW, PH, PW, DH, DW, p / OW, p % OW, Kp,
                           col0);
            if (two)
                lq_im2col_{XN}_i16(xg, H, W, cg, KH, KW, SH, SW, PH, PW, DH, DW, (p + 1) / OW,
                               (p + 1) % OW, Kp, col1);
            for (o = 0; o < og; o += 2) {
                int oa = g * og + o, pair = o + 1 < og;
                {OUT_T} *ya = y + (int32_t)oa * P + p, v0, v1;
                s[0] = s[1] = bias[oa];
                s[2] = s[3] = pair ? bias[oa + 1] : 0;
                lq_dot2x2(w + ((int32_t)g * og2 + o) * Kp, col0, c1, s);
                /* both values before the stores (a {Y} store may alias the constants); the
                 * second pixel's first, so that without one the first overwrites it */
                v0 = LQ_V(s[0], oa), v1 = LQ_V(s[1], oa);
                ya[two] = v1, ya[0] = v0;
                if (pair) {
                    v0 = LQ_V(s[2], oa + 1), v1 = LQ_V(s[3], oa + 1);
                    ya[P + two] = v1, ya[P] = v0;
                }
            }
        }
    }
}
#undef LQ_V
#endif
""",
    "conv2d_pk": r"""
#if LQ_DSP
{LQ_V}
/* conv2d/linear at low bit widths for the Arm DSP extension: v MACs per MUL/MLA (see
 * lq_packed_dot, whose assembly lsqint writes per packing and chunk length). The receptive
 * fields of two output pixels are copied as bytes (im2col), then packed v codes per word
 * (v = 4: the bytes as they are; v = 3: 11-bit fields), the two pixels' words interleaved,
 * and summed (sx); the weights are u = w - woff >= 0, so acc = bias + sum(u * x) + woff * sx,
 * the exact accumulator (each term inside int32, checked at export; their total is the
 * layer's, within its acc_bound). */
static void lq_conv_pk_{XN}{OUT_NAME}(
    const {X} *x, int C, int H, int W, const uint32_t *u, int Kp, int v, int32_t woff,
    lq_packed_fn dot, int32_t passes, const int32_t *bias, {OUT_PARAMS}, int O, int OH, int OW,
    int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int groups, uint32_t *cols)
{
    int cg = C / groups, og = O / groups, P = OH * OW, g, p, o, i, words = Kp / v;
    int og2 = og + (og & 1); /* weight rows per group: padded to pairs */
    uint8_t *b0 = (uint8_t *)cols, *b1 = b0 + Kp;
    uint32_t *mixed = cols + (2 * Kp + 3) / 4; /* the two columns' packed words interleaved */
    int32_t s[4];
    for (g = 0; g < groups; g++) {
        const {X} *xg = x + (int32_t)g * cg * H * W;
        for (p = 0; p < P; p += 2) {
            int two = p + 1 < P;
            const uint8_t *q0 = b0, *q1 = two ? b1 : b0;
            int32_t sx0 = 0, sx1 = 0;
            lq_im2col_{XN}_u8(xg, H, W, cg, KH, KW, SH, SW, PH, PW, DH, DW, p / OW, p % OW, Kp,
                              b0);
            if (two)
                lq_im2col_{XN}_u8(xg, H, W, cg, KH, KW, SH, SW, PH, PW, DH, DW, (p + 1) / OW,
                                  (p + 1) % OW, Kp, b1);
            if (v == 4) { /* Kp is a multiple of 4: b0, b1 word-aligned; USADA8 sums 4 bytes */
                const uint32_t *v0 = (const uint32_t *)q0, *v1 = (const uint32_t *)q1;
                uint32_t s0 = 0, s1 = 0;
                for (i = 0; i + 1 < words; i += 2) { /* two words a step: LDRD, STRD */
                    uint32_t a0 = v0[i], a1 = v0[i + 1], c0 = v1[i], c1 = v1[i + 1];
                    mixed[2 * i] = a0, mixed[2 * i + 1] = c0;
                    mixed[2 * i + 2] = a1, mixed[2 * i + 3] = c1;
                    s0 = __usada8(a0, 0, s0), s1 = __usada8(c0, 0, s1);
                    s0 = __usada8(a1, 0, s0), s1 = __usada8(c1, 0, s1);
                }
                if (i < words) {
                    mixed[2 * i] = v0[i], mixed[2 * i + 1] = v1[i];
                    s0 = __usada8(v0[i], 0, s0), s1 = __usada8(v1[i], 0, s1);
                }
                sx0 = (int32_t)s0, sx1 = (int32_t)s1;
            } else {
                for (i = 0; i < words; i++, q0 += 3, q1 += 3) {
                    mixed[2 * i] = q0[0] | (uint32_t)q0[1] << 11 | (uint32_t)q0[2] << 22;
                    mixed[2 * i + 1] = q1[0] | (uint32_t)q1[1] << 11 | (uint32_t)q1[2] << 22;
                    sx0 += q0[0] + q0[1] + q0[2], sx1 += q1[0] + q1[1] + q1[2];
                }
            }
            sx0 *= woff, sx1 *= woff;
            for (o = 0; o < og; o += 2) {
                int oa = g * og + o, pair = o + 1 < og;
                {OUT_T} *ya = y + (int32_t)oa * P + p, v0, v1;
                dot(u + ((int32_t)g * og2 + o) * words, mixed, s, passes);
                /* as in lq_conv_dsp: values first, the second pixel's store first */
                v0 = LQ_V(bias[oa] + (s[0] + sx0), oa), v1 = LQ_V(bias[oa] + (s[1] + sx1), oa);
                ya[two] = v1, ya[0] = v0;
                if (pair) {
                    v0 = LQ_V(bias[oa + 1] + (s[2] + sx0), oa + 1);
                    v1 = LQ_V(bias[oa + 1] + (s[3] + sx1), oa + 1);
                    ya[P + two] = v1, ya[P] = v0;
                }
            }
        }
    }
}
#undef LQ_V
#endif
""",
    "conv2d": r"""
#if !LQ_DSP
{LQ_V}
static void lq_conv_{XN}{OUT_NAME}(const {X} *x, int C, int H, int W, const uint8_t *w, int bits,
                         const int32_t *bias, {OUT_PARAMS}, int O, int OH, int OW, int KH,
                         int KW, int SH, int SW, int PH, int PW, int DH, int DW, int groups,
                         int16_t *row{PLANE_PARAM})
{
    int cg = C / groups, og = O / groups, o, c, ky, kx, oy, ox;
    for (o = 0; o < O; o++) {
        int32_t *yo = {PLANE};
        const {X} *xg = x + (int32_t)(o / og) * cg * H * W;
        lq_unpack(w, bits, (int32_t)o * cg * KH * KW, cg * KH * KW, row);
        for (oy = 0; oy < OH * OW; oy++) yo[oy] = bias[o];
        for (c = 0; c < cg; c++)
            for (ky = 0; ky < KH; ky++)
                for (kx = 0; kx < KW; kx++) {
                    int32_t wv = row[(c * KH + ky) * KW + kx];
                    /* Output columns whose input column ox*SW - PW + kx*DW is inside 0..W-1
                     * (the rest read zero padding): ox0 <= ox < ox1, no test in the loop. */
                    int left = PW - kx * DW, right = W - 1 + PW - kx * DW;
                    int ox0 = left <= 0 ? 0 : (left + SW - 1) / SW;
                    int ox1 = right < 0 ? 0 : right / SW + 1;
                    if (ox1 > OW) ox1 = OW;
                    if (wv == 0) continue; /* common at 2-3 bits */
                    for (oy = 0; oy < OH; oy++) {
                        int iy = oy * SH - PH + ky * DH;
                        const {X} *xr;
                        int32_t *yr = yo + oy * OW;
                        if (iy < 0 || iy >= H) continue;
                        xr = xg + ((int32_t)c * H + iy) * W;
                        for (ox = ox0; ox < ox1; ox++) yr[ox] += (int32_t)xr[ox * SW - left] * wv;
                    }
                }{EMIT}
    }
}
#undef LQ_V
#endif
""",
    "linear": r"""
#if !LQ_DSP
{LQ_V}
static void lq_linear_{XN}{OUT_NAME}(const {X} *x, int I, const uint8_t *w, int bits,
                           const int32_t *bias, {OUT_PARAMS}, int O, int16_t *row)
{
    int o, i;
    for (o = 0; o < O; o++) {
        int32_t acc = bias[o];
        lq_unpack(w, bits, (int32_t)o * I, I, row);
        for (i = 0; i < I; i++) acc += (int32_t)x[i] * row[i];
        y[o] = LQ_V(acc, o);
    }
}
#undef LQ_V
#endif
""",
    "requantize": r"""
static void lq_requantize_{YN}(const int32_t *acc, int C, int HW, const int32_t *m,
                               const int8_t *t, int per_channel, int64_t lo, int64_t hi, {Y} *y)
{
    int c, i;
    for (c = 0; c < C; c++) {
        int64_t mc = m[per_channel ? c : 0];
        int tc = t[per_channel ? c : 0];
        for (i = 0; i < HW; i++)
            y[c * HW + i] = ({Y})lq_round_clamp((int64_t)acc[c * HW + i] * mc, tc, lo, hi);
    }
}
""",
    "add": r"""
static void lq_add_{AN}_{BN}_{YN}(const {A} *a, const {B} *b, int32_t n, int64_t ma, int64_t mb,
                                  int shift, int64_t lo, int64_t hi, {Y} *y)
{
    int32_t i;
    for (i = 0; i < n; i++)
        y[i] = ({Y})lq_round_clamp((int64_t)a[i] * ma + (int64_t)b[i] * mb, shift, lo, hi);
}
""",
    "add_hi": r"""
#if LQ_DSP
/* lq_add when export found k >= 0 with t = shift + k in [33, 62], |m_a|, |m_b|, |a| 2^k,
 * |b| 2^k < 2^31 and 2^k (|a| |m_a| + |b| |m_b|) / 2^32 + 1 + 2^(t-33) < 2^31 (add_table): with
 * the codes times
 * kk = 2^k the quotient of (a kk m_a + b kk m_b + 2^(t-1)) / 2^t is the add's (numerator
 * and denominator times 2^k); the high word h of the int64 a kk m_a + b kk m_b (SMULL,
 * SMLAL) plus rnd = 2^(t-33), shifted right by sh = t - 32, is that floor quotient (the
 * addend 2^(t-1) = rnd 2^32 commutes with the floor division by 2^32, as in lq_smmla's
 * comment); then one saturation or clamp. */
static void lq_add_hi_{AN}_{BN}_{YN}_{SATN}(const {A} *a, const {B} *b, int32_t n, int32_t kk,
                                         int32_t ma, int32_t mb, int32_t rnd, int sh, {Y} *y)
{
    int32_t i;
    for (i = 0; i < n; i++) {
        int64_t p = (int64_t)(a[i] * kk) * ma + (int64_t)(b[i] * kk) * mb;
        int32_t h = (int32_t)(p >> 32);
        y[i] = ({Y}){SAT};
    }
}
#endif
""",
    "add_lut": r"""
#if LQ_DSP
/* lq_add of two narrow code tensors as a table of every result: y = table[(a - a_lo) * nb +
 * (b - b_lo)], the table computed at export by the add's reference rule (add_lut). */
static void lq_add_lut_{AN}_{BN}_{YN}(const {A} *a, const {B} *b, int32_t n, const {Y} *table,
                                     int32_t a_lo, int32_t b_lo, int32_t nb, {Y} *y)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = table[(a[i] - a_lo) * nb + (b[i] - b_lo)];
}
#endif
""",
    "concat": r"""
static void lq_concat_{XN}_{YN}(const {X} *x, int32_t n, int64_t m, int shift, int64_t lo,
                                int64_t hi, {Y} *y)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = ({Y})lq_round_clamp((int64_t)x[i] * m, shift, lo, hi);
}
""",
    "adaptive_avgpool2d": r"""
static void lq_adaptive_{XN}(const {X} *x, int C, int H, int W, int32_t *y, int OH, int OW,
                             int32_t lcm)
{
    int c, oy, ox, iy, ix;
    for (c = 0; c < C; c++)
        for (oy = 0; oy < OH; oy++) {
            /* PyTorch's windows: rows floor(oy*H/OH) .. ceil((oy+1)*H/OH) */
            int y0 = oy * H / OH, y1 = ((oy + 1) * H + OH - 1) / OH;
            for (ox = 0; ox < OW; ox++) {
                int x0 = ox * W / OW, x1 = ((ox + 1) * W + OW - 1) / OW;
                int32_t acc = 0;
                for (iy = y0; iy < y1; iy++)
                    for (ix = x0; ix < x1; ix++) acc += x[((int32_t)c * H + iy) * W + ix];
                y[((int32_t)c * OH + oy) * OW + ox] = acc * (lcm / ((y1 - y0) * (x1 - x0)));
            }
        }
}
""",
    "mul": r"""
/* a is (C, H, W); b is the same or (C, 1, 1), (1, H, W), ... (a broadcast dim has size 1). */
static void lq_mul_{AN}_{BN}_{YN}(const {A} *a, const {B} *b, int C, int H, int W, int BC,
                                  int BH, int BW, int64_t m, int shift, int64_t lo, int64_t hi,
                                  {Y} *y)
{
    int c, h, w;
    for (c = 0; c < C; c++)
        for (h = 0; h < H; h++)
            for (w = 0; w < W; w++) {
                int32_t i = ((int32_t)c * H + h) * W + w;
                int32_t j = ((int32_t)(BC > 1 ? c : 0) * BH + (BH > 1 ? h : 0)) * BW
                            + (BW > 1 ? w : 0);
                y[i] = ({Y})lq_round_clamp((int64_t)a[i] * b[j] * m, shift, lo, hi);
            }
}
""",
    "transpose": r"""
/* y = x with its (up to 6) dims permuted: out_stride[k] is x's stride of output dim k. */
static void lq_transpose_{XN}(const {X} *x, {X} *y, int rank, const int32_t *out_dims,
                              const int32_t *src_strides)
{
    int32_t index[6] = {0, 0, 0, 0, 0, 0}, total = 1, i;
    int k;
    for (k = 0; k < rank; k++) total *= out_dims[k];
    for (i = 0; i < total; i++) {
        int32_t source = 0;
        for (k = 0; k < rank; k++) source += index[k] * src_strides[k];
        y[i] = x[source];
        for (k = rank - 1; k >= 0; k--) {
            if (++index[k] < out_dims[k]) break;
            index[k] = 0;
        }
    }
}
""",
    "slice": r"""
/* Elements [start, end) of one axis: outer blocks of (end - start) * inner elements. */
static void lq_slice_{XN}(const {X} *x, {X} *y, int32_t outer, int32_t axis_len, int32_t start,
                          int32_t end, int32_t inner)
{
    int32_t o;
    for (o = 0; o < outer; o++)
        memcpy(y + o * (end - start) * inner, x + (o * axis_len + start) * inner,
               (size_t)((end - start) * inner) * sizeof(*x));
}
""",
    "affine": r"""
static void lq_affine_{XN}_{YN}(const {X} *x, int C, int HW, const int64_t *a, const int64_t *b,
                                int shift, int64_t lo, int64_t hi, {Y} *y)
{
    int c, i;
    for (c = 0; c < C; c++)
        for (i = 0; i < HW; i++)
            y[c * HW + i] =
                ({Y})lq_round_clamp((int64_t)x[c * HW + i] * a[c] + b[c], shift, lo, hi);
}
""",
    "affine_lut": r"""
#if LQ_DSP
/* lq_affine as a table of every result per channel: y = table[c n + (x - x_lo)], computed at
 * export by the op's reference rule (affine_lut). */
static void lq_affine_lut_{XN}_{YN}(const {X} *x, int C, int HW, const {Y} *table, int32_t x_lo,
                                   int32_t n, {Y} *y)
{
    int c, i;
    for (c = 0; c < C; c++, table += n, x += HW, y += HW)
        for (i = 0; i < HW; i++) y[i] = table[x[i] - x_lo];
}
#endif
""",
    "lut": r"""
static void lq_lut_{XN}_{YN}(const {X} *x, int32_t n, const {Y} *table, int offset, {Y} *y)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = table[(int32_t)x[i] - offset];
}
""",
    "maxpool2d": r"""
static void lq_maxpool_{XN}(const {X} *x, int C, int H, int W, {X} *y, int OH, int OW, int KH,
                            int KW, int SH, int SW, int PH, int PW, int DH, int DW)
{
    int c, oy, ox, ky, kx;
    for (c = 0; c < C; c++)
        for (oy = 0; oy < OH; oy++)
            for (ox = 0; ox < OW; ox++) {
                int32_t best = INT32_MIN;
                for (ky = 0; ky < KH; ky++) {
                    int iy = oy * SH - PH + ky * DH;
                    if (iy < 0 || iy >= H) continue;
                    for (kx = 0; kx < KW; kx++) {
                        int ix = ox * SW - PW + kx * DW;
                        int32_t v;
                        if (ix < 0 || ix >= W) continue;
                        v = x[((int32_t)c * H + iy) * W + ix];
                        if (v > best) best = v;
                    }
                }
                y[((int32_t)c * OH + oy) * OW + ox] = ({X})best;
            }
}
""",
    "avgpool2d": r"""
static void lq_avgsum_{XN}(const {X} *x, int C, int H, int W, int32_t *y, int OH, int OW, int KH,
                           int KW, int SH, int SW, int PH, int PW)
{
    int c, oy, ox, ky, kx;
    for (c = 0; c < C; c++)
        for (oy = 0; oy < OH; oy++)
            for (ox = 0; ox < OW; ox++) {
                int32_t acc = 0;
                for (ky = 0; ky < KH; ky++) {
                    int iy = oy * SH - PH + ky;
                    if (iy < 0 || iy >= H) continue;
                    for (kx = 0; kx < KW; kx++) {
                        int ix = ox * SW - PW + kx;
                        if (ix >= 0 && ix < W) acc += x[((int32_t)c * H + iy) * W + ix];
                    }
                }
                y[((int32_t)c * OH + oy) * OW + ox] = acc;
            }
}
""",
}


_ARENA_NOTE = """\
/* The kernels get the arena's address from a volatile pointer, so that no compiler turns their
 * pointer arguments into constant offsets of this array: gcc 12.2 -O2 (x86-64) then dropped
 * whole kernel calls from the entry point (interprocedural constant propagation; -fno-ipa-cp or
 * -fno-delete-null-pointer-checks also avoided it). One load per call, no other cost. */
"""


_PROFILE_HOOK = """
/* -DLQ_PROFILE: call lq_profile(i) after node i (the firmware defines it, e.g. to read a cycle
 * counter: lsqint.export.mcu's per-node instruction counts); otherwise no code. */
#if defined(LQ_PROFILE) && LQ_PROFILE
void lq_profile(int node);
#define LQ_MARK(node) lq_profile(node)
#else
#define LQ_MARK(node) ((void)0)
#endif
"""


class CExportError(ExportError):
    """The program cannot be written as C (an op this generator has no kernel for)."""


@dataclass
class CExport:
    """What ``export_c`` wrote and the memory it needs."""

    header: Path
    source: Path
    name: str
    arena_bytes: int  # activations (static arena), planned from tensor lifetimes
    scratch_bytes: int  # one unpacked weight row (int16) + a fused conv's int32 output plane
    weight_bytes: int  # packed weights + biases + multipliers (const data, flash)
    int8_weight_bytes: int  # the same weights stored one byte each (TFLite Micro's int8 layout)
    # Flash of the weights and the scratch (two pixels' columns) when the Arm DSP kernels are
    # built (__ARM_FEATURE_DSP): int8 (SMLAD layers) or packed words, rows padded.
    dsp_weight_bytes: int = 0
    dsp_scratch_bytes: int = 0
    # The DSP build's kernel of each conv2d/linear: "dsp-smlad" (two MACs per SMLAD) or
    # "dsp-pack4 n=N" (four MACs per MUL/MLA, chunks of N exact products; pack4_plan).
    dsp_kernels: dict[str, str] = field(default_factory=dict)


def c_identifier(name: str) -> str:
    ident = re.sub(r"\W", "_", name)
    if not ident or ident[0].isdigit():
        ident = "m_" + ident
    return ident


def _type_name(dtype: str) -> str:
    return {"uint8": "u8", "int8": "i8", "int16": "i16", "int32": "i32"}[dtype]


def _array(ctype: str, name: str, values, align: int | None = None) -> str:
    """A const C array, wrapped at about 100 columns (``align``: its byte alignment)."""
    items = [str(int(v)) for v in np.asarray(values).ravel()] or ["0"]
    lines, line = [], ""
    for item in items:
        if len(line) + len(item) > 96:
            lines.append(line)
            line = ""
        line += item + ","
    lines.append(line)
    text = "\n  ".join(lines)
    aligned = f" __attribute__((aligned({align})))" if align else ""
    return f"static const {ctype} {name}[{len(items)}]{aligned} = {{\n  {text}\n}};\n"


def _int64_literal(v: int) -> str:
    # INT64_C keeps the literal 64-bit on targets where long is 32 bits (Cortex-M).
    return f"INT64_C({int(v)})"


def fused_requantizes(program: IntProgram) -> dict[str, Node]:
    """conv2d/linear output tensor -> the requantize that is its only reader and writes codes:
    the pairs the C export runs as one kernel, so the int32 accumulator is never stored."""
    readers: dict[str, list[Node]] = {}
    for node in program.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    fused = {}
    for node in program.nodes:
        if node.op not in ("conv2d", "linear"):
            continue
        after = readers.get(node.output, [])
        if len(after) == 1 and after[0].op == "requantize":
            if program.tensors[after[0].output].dtype in ("uint8", "int8"):
                fused[node.output] = after[0]
    return fused


def plan_arena(program: IntProgram) -> tuple[dict[str, int], int]:
    """Byte offset of every activation tensor in one arena, and the arena's size.

    A tensor lives from the node that writes it to the last node that reads it; two tensors
    whose lifetimes overlap get disjoint bytes (an op's output never overlaps its inputs).
    ``flatten`` and ``reshape`` write no bytes: the output is the input's buffer (same C order).
    A conv/linear fused with its requantize (``fused_requantizes``) stores no accumulator: the
    codes are written by the layer, so they live from the layer on."""
    alias: dict[str, str] = {}  # flatten output -> the tensor whose bytes it reuses
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    pixels = program.nodes[0].inputs[0]  # the caller's buffer, not the arena
    fused = fused_requantizes(program)
    fused_outputs = {req.output for req in fused.values()}
    for i, node in enumerate(program.nodes):
        for name in node.inputs:
            if name != pixels and name not in fused:
                root = alias.get(name, name)
                last[root] = max(last[root], i)
        if node.op in ("flatten", "reshape"):
            alias[node.output] = alias.get(node.inputs[0], node.inputs[0])
        elif node.output in fused:  # the layer writes its requantize's codes
            codes = fused[node.output].output
            first[codes] = last[codes] = i
        elif node.op != "output" and node.output not in fused_outputs:
            first[node.output] = last[node.output] = i
    sizes = {}
    for name in first:
        spec = program.tensors[name]
        size = int(np.prod(spec.shape)) * _ITEM_BYTES[spec.dtype]
        sizes[name] = -(-size // _ALIGN) * _ALIGN
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
    offsets: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], first[n])):
        lo, hi = first[name], last[name]
        busy = sorted((o, o + s) for o, s, f, l in placed if not (l < lo or f > hi))
        offset = 0
        for start, end in busy:
            if offset + sizes[name] <= start:
                break
            offset = max(offset, end)
        placed.append((offset, sizes[name], lo, hi))
        offsets[name] = offset
    for name, root in alias.items():
        offsets[name] = offsets[root]
    total = max((o + s for o, s, _, _ in placed), default=0)
    return offsets, total


class _Emitter:
    """What the C lowerings of one program write into: constants, calls in order, the kernels
    they use (each once per type combination) and the sizes the header reports."""

    def __init__(self, program: IntProgram, offsets: dict[str, int]) -> None:
        self.program = program
        self.tensors = program.tensors
        self.offsets = offsets
        self.consts: list[str] = []
        self.calls: list[str] = []
        self.kernels: dict[str, str] = {}
        self.scratch = 1
        self.dsp_scratch = 1
        self.plane = 1  # int32 words: one output plane of a fused portable conv
        self.fused = fused_requantizes(program)
        self.dsp_weight_bytes = 0
        self.weight_bytes = 0
        self.int8_bytes = 0
        self.kernel_choice: dict[str, str] = {}  # layer -> its Cortex-M kernel (DSP builds)

    def ref(self, tensor: str) -> str:
        spec = self.tensors[tensor]
        if tensor == self.program.nodes[0].inputs[0]:
            return "pixels"
        return f"(({C_TYPES[spec.dtype]} *)(lq_arena + {self.offsets[tensor]}))"

    def kernel(
        self,
        op: str,
        form: str | None = None,
        text: str | None = None,
        sat: tuple[str, str] | None = None,
        **types: str,
    ):
        """Emit kernel ``op`` once per type combination (``form``: a layer kernel's form;
        ``text``: a generated kernel instead of one of _KERNELS; ``sat``: the "rqs" form's
        clamp, (name, C expression), from ``saturation``)."""
        text = _KERNELS[op] if text is None else text
        for placeholder, value in _LAYER_FORMS[form].items() if form else ():
            text = text.replace(placeholder, value)
        if sat is not None:
            text = text.replace("{SATN}", sat[0]).replace("{SAT}", sat[1])
        for key, dtype in types.items():
            text = text.replace("{" + key + "N}", _type_name(dtype))
            text = text.replace("{" + key + "}", C_TYPES[dtype])
        key = op + (f"_{form}" if form else "") + "".join(f"_{types[k]}" for k in sorted(types))
        key += f"_{sat[0]}" if sat else ""
        self.kernels.setdefault(key, text)


AFFINE_LUT_MAX = 4096  # table entries (bytes): 16 channels of 8-bit codes


def affine_lut(node: Node, x: TensorSpec, out: TensorSpec) -> np.ndarray | None:
    """Every result of an affine (or the input op) of 8-bit codes onto 8-bit codes, per
    channel, indexed c n + (x - x_lo) (n codes in x's range), computed by the op's reference;
    None when that is more than AFFINE_LUT_MAX entries."""
    n = x.qmax - x.qmin + 1
    if out.dtype not in ("uint8", "int8") or x.dtype not in ("uint8", "int8"):
        return None
    if x.shape[0] * n > AFFINE_LUT_MAX:
        return None
    grid = np.broadcast_to(np.arange(x.qmin, x.qmax + 1), (1, x.shape[0], n))[..., None]
    return OPS[node.op].reference(node, [grid]).ravel()


def _c_affine(e: _Emitter, node: Node, tag: str) -> None:
    a, p, out = node.attrs, node.params, e.tensors.get(node.output)
    x = e.tensors[node.inputs[0]]
    e.consts.append(_int64_array(f"{tag}_a", p["a"]))
    e.consts.append(_int64_array(f"{tag}_b", p["b"]))
    if node.op == "affine":  # a layer's parameters (the input's are the normalization)
        e.weight_bytes += 16 * len(p["a"])
        e.int8_bytes += 16 * len(p["a"])
    e.kernel("affine", X=x.dtype, Y=out.dtype)
    c, h, w = x.shape
    names = f"{_type_name(x.dtype)}_{_type_name(out.dtype)}"
    call = (
        f"lq_affine_{names}({e.ref(node.inputs[0])}, "
        f"{c}, {h * w}, {tag}_a, {tag}_b, {a['shift']}, {_int64_literal(a['lo'])}, "
        f"{_int64_literal(a['hi'])}, {e.ref(node.output)});"
    )
    lut = affine_lut(node, x, out)
    if lut is not None:  # the DSP build: one table load per code
        e.consts.append("#if LQ_DSP\n" + _array(C_TYPES[out.dtype], f"{tag}_lut", lut) + "#endif\n")
        e.dsp_weight_bytes += lut.size
        e.kernel("affine_lut", X=x.dtype, Y=out.dtype)
        fast = (
            f"lq_affine_lut_{names}({e.ref(node.inputs[0])}, {c}, {h * w}, {tag}_lut, "
            f"{x.qmin}, {x.qmax - x.qmin + 1}, {e.ref(node.output)});"
        )
        call = f"#if LQ_DSP\n    {fast}\n#else\n    {call}\n#endif"
    e.calls.append(call)


def dsp_weight_layout(weight: np.ndarray, groups: int = 1) -> tuple[np.ndarray, int]:
    """The DSP kernel's int8 weights (``lq_dot2x2``): per output channel its K codes padded
    with zeros to Kp (a multiple of 4), each group of four stored w0 w2 w1 w3 (so that SXTB16
    pairs them as the kernel's int16 columns); channels in pairs within each conv group (a zero
    channel completes an odd count), a pair's words interleaved: a's first four codes, b's
    first four, a's next four, ... Returns (flat int8 array, Kp)."""
    out = weight.shape[0]
    k = int(np.prod(weight.shape[1:]))
    kp = -(-k // 4) * 4
    og = out // groups
    og2 = og + og % 2
    padded = np.zeros((groups, og2, kp), np.int8)
    padded[:, :og, :k] = weight.reshape(groups, og, k)
    words = padded.reshape(groups, og2 // 2, 2, kp // 4, 4)[..., [0, 2, 1, 3]]
    return words.transpose(0, 1, 3, 2, 4).reshape(-1), kp


# Packed low-bit MACs (lq_packed_dot): one 32-bit word holds v activation codes in fields of
# f bits (x = x0 + x1 2^f + ... + x_{v-1} 2^(f(v-1))) and another v weight codes made
# non-negative (u_i = w_i - woff) in reverse order (u_{v-1} + ... + u0 2^(f(v-1))). In the
# product x * u the coefficient of 2^(f(v-1)) is the dot product x0 u0 + ... + x_{v-1} u_{v-1};
# below it lie C_c (c + 1 products each, c < v - 1); the next coefficient sits at 2^(fv) >= 2^32
# (f v >= 32), so a 32-bit MUL/MLA drops it and everything above. After n such products are
# summed mod 2^32, bits f(v-1)..31 hold exactly the n dot products' sum if (1) the lower part
# L = sum_c C_c 2^(fc) < 2^(f(v-1)) (no carry into the top field) and (2) the top field's sum
# < 2^(32 - f(v-1)) (no wrap). With p = max x * max u: L <= n p sum_c (c + 1) 2^(fc) =
# n p pack_low(v, f) and the top sum <= v n p; pack_plan takes the longest chunk n within both.
# A chunk's sum is added to an int32 total (ADD ..., LSR #f(v-1)) and the next chunk starts
# from a MUL. Two packings: v = 4 codes of 8 bits (the im2col bytes as they are; 2-bit codes,
# 3-bit weights with 2-bit activations) and v = 3 codes of 11 bits (a 10-bit top field: 3- and
# 4-bit codes).
PACKINGS = ((4, 8), (3, 11))  # (codes per word v, field bits f), f v >= 32


def pack_low(v: int, f: int) -> int:
    """sum_c (c + 1) 2^(fc) over the fields below the top one: L <= n p pack_low(v, f)."""
    return sum((c + 1) << (f * c) for c in range(v - 1))


# Instructions per packed word per pair of output pixels outside lq_packed_dot (byte im2col's
# extra over the int16 one, packing, interleaving, summing; ResNet-8 at -O2, measured), and
# per four codes of lq_dot2x2 (the SMLAD kernel): pack_plan's cost model.
PACK_PASS_COST = {4: 20, 3: 38}
SMLAD_COST = 16


def pack_chunk_max(v: int, f: int, p: int) -> int:
    """The most products per exact chunk of packing (v, f) when no code product exceeds p."""
    top = f * (v - 1)
    return min(((1 << (32 - top)) - 1) // (v * p), ((1 << top) - 1) // (pack_low(v, f) * p))


def pack_plan(
    weight: np.ndarray, x_lo: int, x_hi: int, groups: int = 1
) -> tuple[int, int, int, int] | None:
    """(v, n, r, woff) of the packed kernel for a layer whose input codes lie in [x_lo, x_hi]:
    v codes per word (PACKINGS), n products per exact chunk (pack_chunk_max), r chunks per loop
    pass, weight offset: the choice of fewest instructions by the cost model above, or None
    where the SMLAD kernel costs less, no chunk of one product is provably exact (8-bit
    codes, 4-bit weights and activations with 3 codes per word, ...), the input codes may be
    negative, or a total could leave int32."""
    if x_lo < 0:
        return None
    woff = int(weight.min())
    p = max(1, x_hi * (int(weight.max()) - woff))
    k = int(np.prod(weight.shape[1:]))
    if k * p >= 2**31 or abs(woff) * k * x_hi >= 2**31:
        return None
    og = weight.shape[0] // groups
    pairs = (og + og % 2) // 2
    best = (SMLAD_COST * -(-k // 4), None)
    for v, f in PACKINGS:
        words = -(-k // v)
        for n in range(1, min(pack_chunk_max(v, f, p), words) + 1):
            for r in range(1, 5):
                padded = -(-words // (n * r)) * n * r
                # per pair of channels and pixels: 6 per word, 4 per chunk, 4 per pass
                cost = 6 * padded + 4 * padded // n + 4 * padded // (n * r)
                cost += PACK_PASS_COST[v] * padded / pairs
                if cost < best[0]:
                    best = (cost, (v, n, r, woff))
    return best[1]


def pack_weight_layout(weight: np.ndarray, groups: int, woff: int, v: int, kp: int) -> np.ndarray:
    """The packed kernel's weights as uint32 words: u = w - woff, rows padded with u = 0 to kp
    (a multiple of v), channels in pairs per conv group (a zero channel completes an odd
    count), per v codes the word of channel a then of channel b, each word u_{v-1} + ... +
    u0 2^(f(v-1))."""
    f = dict(PACKINGS)[v]
    out = weight.shape[0]
    k = int(np.prod(weight.shape[1:]))
    og = out // groups
    og2 = og + og % 2
    u = np.zeros((groups, og2, kp), np.uint32)
    u[:, :og, :k] = weight.reshape(groups, og, k).astype(np.int64) - woff
    fields = u.reshape(groups, og2 // 2, 2, kp // v, v)
    words = sum(fields[..., v - 1 - i] << np.uint32(f * i) for i in range(v))
    return words.transpose(0, 1, 3, 2).reshape(-1).astype(np.uint32)


def packed_dot_asm(v: int, n: int, r: int) -> str:
    """C text of ``lq_packed_dot_{v}_{n}_{r}(u, cols, s, passes)``: s = {a.x0, a.x1, b.x0,
    b.x1}, the dot products of two channels' packed weights with two pixels' interleaved packed
    columns, in passes of r chunks of n products (MUL/MLA: v MACs each; exact by pack_plan).
    Registers: r2/r3 the weight words, r12/lr the column words, r4-r7 the chunk sums, r8-r11
    the totals; s and the pass count live on the stack."""
    top = dict(PACKINGS)[v] * (v - 1)
    lines = ["push {r2-r11, lr}", "mov r8, #0", "mov r9, #0", "mov r10, #0", "mov r11, #0", "1:"]
    products = (("r4", "r2", "r12"), ("r5", "r2", "lr"), ("r6", "r3", "r12"), ("r7", "r3", "lr"))
    for _ in range(r):
        for i in range(n):
            lines += ["ldrd r2, r3, [r0], #8", "ldrd r12, lr, [r1], #8"]
            for acc, wr, xr in products:
                lines.append(
                    f"mul {acc}, {wr}, {xr}" if i == 0 else f"mla {acc}, {wr}, {xr}, {acc}"
                )
        for total, acc in (("r8", "r4"), ("r9", "r5"), ("r10", "r6"), ("r11", "r7")):
            lines.append(f"add {total}, {total}, {acc}, lsr #{top}")
    lines += ["ldr r2, [sp, #4]", "subs r2, r2, #1", "str r2, [sp, #4]", "bne 1b"]
    lines += ["ldr r2, [sp]", "stm r2, {r8-r11}", "pop {r2-r11, pc}"]
    body = "\n".join(f'        "{line}\\n"' for line in lines)
    return f"""
#if LQ_DSP
__attribute__((naked, noinline)) static void lq_packed_dot_{v}_{n}_{r}(const uint32_t *u,
                                                                       const uint32_t *cols,
                                                                       int32_t *s, int32_t passes)
{{
    __asm__ volatile(
        ".syntax unified\\n"
{body}
        : : : "memory");
}}
#endif
"""


def _c_layer(e: _Emitter, node: Node, tag: str) -> None:
    a, p, out = node.attrs, node.params, e.tensors.get(node.output)
    weight = np.asarray(p["weight"])
    bits = int(a["weight_bits"])
    packed = np.concatenate([pack_bits(weight.ravel().astype(np.int8), bits), [0]])
    x = e.tensors[node.inputs[0]]
    groups = int(a.get("groups", 1))
    plan = pack_plan(weight, x.qmin, x.qmax, groups) if x.dtype == "uint8" else None
    if plan is None:
        dsp_weight, kp = dsp_weight_layout(weight, groups)
        dsp_type = "int8_t"
    else:
        v, n, r, woff = plan
        chunk = v * n * r
        kp = -(-int(np.prod(weight.shape[1:])) // chunk) * chunk
        dsp_weight, dsp_type = pack_weight_layout(weight, groups, woff, v, kp), "uint32_t"
    # Flash holds one layout: the DSP kernel's bytes, else the packed b-bit stream.
    e.consts.append(
        "#if LQ_DSP\n"
        + _array(dsp_type, f"{tag}_w8", dsp_weight, align=4)
        + "#else\n"
        + _array("uint8_t", f"{tag}_w", packed.astype(np.uint8))
        + "#endif\n"
    )
    e.consts.append(_array("int32_t", f"{tag}_bias", p["bias"]))
    e.weight_bytes += packed.size + 4 * p["bias"].size
    e.int8_bytes += weight.size + 4 * p["bias"].size
    e.dsp_weight_bytes += dsp_weight.nbytes + 4 * p["bias"].size
    row = int(np.prod(weight.shape[1:]))
    e.scratch = max(e.scratch, row)
    # int32 words: two int16 columns of kp; packed: two byte columns and their packed words
    packed_words = 0 if plan is None else (2 * kp + 3) // 4 + 2 * (kp // plan[0])
    e.dsp_scratch = max(e.dsp_scratch, kp, packed_words)
    xn, x_ref = _type_name(x.dtype), e.ref(node.inputs[0])
    requantize = e.fused.get(node.output)
    if requantize is None:  # the layer writes its int32 accumulator
        form, types, name, y_ref, out_args = "acc", {"X": x.dtype}, "", e.ref(node.output), ""
    else:  # fused: the layer writes its requantize's codes
        codes = e.tensors[requantize.output]
        m, per_channel = _requantize_consts(e, requantize, tag)
        form, types = "rq", {"X": x.dtype, "Y": codes.dtype}
        name, y_ref = f"_rq_{_type_name(codes.dtype)}", e.ref(requantize.output)
        a_rq = requantize.attrs
        out_args = (
            f", {tag}_m, {tag}_t, {per_channel}, {_int64_literal(a_rq['lo'])}, "
            f"{_int64_literal(a_rq['hi'])}"
        )
    # The DSP build's fused requantize: LQ_RQ and one saturation where the constants allow.
    dsp_form, dsp_name, dsp_out_args, sat = form, name, out_args, None
    table = None
    if requantize is not None:
        channels = int(out.shape[0])
        table = requant_table(m, requantize.params["shift"], channels, int(a["acc_bound"]))
    if table is not None:
        q, kk = table
        sat = saturation(int(a_rq["lo"]), int(a_rq["hi"]))
        dsp_form, dsp_name = "rqs", f"_rqs_{_type_name(codes.dtype)}_{sat[0]}"
        dsp_out_args = f", {tag}_q, {kk}"
        e.consts.append("#if LQ_DSP\n" + _array("int32_t", f"{tag}_q", q) + "#endif\n")
        e.dsp_weight_bytes += q.nbytes - 5 * m.size
    if plan is None:
        e.kernel("im2col", X=x.dtype, C="int16")
        e.kernel("dot2x2")
        e.kernel("conv2d_dsp", dsp_form, sat=sat, **types)
    else:
        e.kernel(f"packed_dot_{v}_{n}_{r}", text=packed_dot_asm(v, n, r))
        e.kernel("im2col", X=x.dtype, C="uint8")
        e.kernel("conv2d_pk", dsp_form, sat=sat, **types)
    if node.op == "conv2d":
        e.kernel("conv2d", form, **types)
        cin, h, w = x.shape
        cout, oh, ow = out.shape
        kh, kw = weight.shape[2:]
        geometry = (
            f"{cout}, {oh}, {ow}, {kh}, {kw}, {a['stride'][0]}, {a['stride'][1]}, "
            f"{a['padding'][0]}, {a['padding'][1]}, {a['dilation'][0]}, {a['dilation'][1]}, "
            f"{a['groups']}"
        )
        plane = ""
        if requantize is not None:
            e.plane = max(e.plane, oh * ow)
            plane = ", lq_plane"
        portable = (
            f"lq_conv_{xn}{name}({x_ref}, {cin}, {h}, {w}, {tag}_w, {bits}, {tag}_bias, "
            f"{y_ref}{out_args}, {geometry}, lq_row{plane});"
        )
    else:
        e.kernel("linear", form, **types)
        cin, h, w = weight.shape[1], 1, 1
        geometry = f"{weight.shape[0]}, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1"
        portable = (
            f"lq_linear_{xn}{name}({x_ref}, {cin}, {tag}_w, {bits}, {tag}_bias, {y_ref}"
            f"{out_args}, {weight.shape[0]}, lq_row);"
        )
    if plan is None:
        dsp = (
            f"lq_conv_dsp_{xn}{dsp_name}({x_ref}, {cin}, {h}, {w}, {tag}_w8, {kp}, {tag}_bias, "
            f"{y_ref}{dsp_out_args}, {geometry}, (int16_t *)lq_cols);"
        )
    else:
        v, n, r, woff = plan
        dsp = (
            f"lq_conv_pk_{xn}{dsp_name}({x_ref}, {cin}, {h}, {w}, {tag}_w8, {kp}, {v}, {woff}, "
            f"lq_packed_dot_{v}_{n}_{r}, {kp // (v * n * r)}, {tag}_bias, {y_ref}{dsp_out_args}, "
            f"{geometry}, (uint32_t *)lq_cols);"
        )
    e.kernel_choice[node.name] = "dsp-smlad" if plan is None else f"dsp-pack{plan[0]} n={plan[1]}"
    e.calls.append(f"#if LQ_DSP\n    {dsp}\n#else\n    {portable}\n#endif")


def requant_table(m: np.ndarray, t: np.ndarray, channels: int, acc_bound: int):
    """The DSP kernels' requantize constants (``LQ_RQ``): per output channel (m, rnd, sh) as
    int32 (channels x 3) and kk = 2^k, or None where the 32-bit rule does not apply. k is the
    smallest that brings every shift to t + k >= 33 (a scale ratio of 1/4 or more has t <= 32);
    it needs acc_bound 2^k < 2^31 (acc 2^k is an SMMLA operand) and t + k <= 62 (|rnd + h| <
    2^31). Exactness: the comment above lq_smmla."""
    m = np.broadcast_to(np.asarray(m, np.int64).ravel(), (channels,))
    t = np.broadcast_to(np.asarray(t, np.int64).ravel(), (channels,))
    k = max(0, 33 - int(t.min()))
    if int(t.max()) + k > 62 or max(acc_bound, 1) << k >= 2**31:
        return None  # (kk = 2^k is an int32 too)
    q = np.stack([m, (1 << (t + k - 33)), t + k - 32], axis=1)
    return q.astype(np.int32), 1 << k


def saturation(lo: int, hi: int, value: str = "LQ_RQ(acc, q + 3 * (ch), kk)") -> tuple[str, str]:
    """The DSP kernels' clamp of the int32 C expression ``value`` (the "rqs" kernels' LQ_RQ)
    to [lo, hi]: (name, C expression). USAT b clamps to [0, 2^b - 1], SSAT b to
    [-2^(b-1), 2^(b-1) - 1] (one instruction each); any other range compares with constants
    (lq_clamp32)."""
    for b in range(1, 32):
        if (lo, hi) == (0, 2**b - 1):
            return f"u{b}", f"__usat({value}, {b})"
        if (lo, hi) == (-(2 ** (b - 1)), 2 ** (b - 1) - 1):
            return f"s{b}", f"__ssat({value}, {b})"
    tag = f"{lo}_{hi}".replace("-", "m")
    return f"c{tag}", f"lq_clamp32({value}, {lo}, {hi})"


def _requantize_consts(e: _Emitter, node: Node, tag: str) -> tuple[np.ndarray, int]:
    """A requantize's multipliers and shifts as C arrays ``{tag}_m``, ``{tag}_t``; returns the
    multipliers and whether they are per channel (1) or one for all (0)."""
    m = np.asarray(node.params["m"]).ravel()
    t = np.asarray(node.params["shift"]).ravel()
    e.consts.append(_array("int32_t", f"{tag}_m", m))
    e.consts.append(_array("int8_t", f"{tag}_t", t))
    e.weight_bytes += 5 * m.size
    e.int8_bytes += 5 * m.size
    e.dsp_weight_bytes += 5 * m.size
    return m, int(m.size > 1)


def _c_requantize(e: _Emitter, node: Node, tag: str) -> None:
    if node.inputs[0] in e.fused:
        e.calls.append(f"/* {node.name}: fused into the layer before it */")
        return
    a, out = node.attrs, e.tensors.get(node.output)
    m, per_channel = _requantize_consts(e, node, tag)
    e.kernel("requantize", Y=out.dtype)
    shape = out.shape
    channels = shape[0]
    plane = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    e.calls.append(
        f"lq_requantize_{_type_name(out.dtype)}({e.ref(node.inputs[0])}, {channels}, "
        f"{plane}, {tag}_m, {tag}_t, {per_channel}, {_int64_literal(a['lo'])}, "
        f"{_int64_literal(a['hi'])}, {e.ref(node.output)});"
    )


def add_table(a: dict, absmax_a: int, absmax_b: int) -> tuple[int, ...] | None:
    """The DSP add's constants (``lq_add_hi``): (kk, m_a, m_b, rnd, sh), or None where its
    32-bit rule does not apply (the conditions in lq_add_hi's comment, checked with Python
    ints)."""
    m_a, m_b, shift = int(a["m_a"]), int(a["m_b"]), int(a["shift"])
    k = max(0, 33 - shift)
    t = shift + k
    if t > 62 or max(abs(m_a), abs(m_b)) >= 2**31 or max(absmax_a, absmax_b) << k >= 2**31:
        return None  # (the codes times 2^k are int32 products too)
    worst = (absmax_a * abs(m_a) + absmax_b * abs(m_b)) << k
    if worst // 2**32 + 1 + (1 << (t - 33)) >= 2**31:
        return None
    return 1 << k, m_a, m_b, 1 << (t - 33), t - 32


ADD_LUT_MAX = 1024  # table entries (bytes): every pair of codes up to 5 bits


def add_lut(node: Node, xa: TensorSpec, xb: TensorSpec) -> np.ndarray | None:
    """Every result of an add of two narrow code tensors, indexed (a - a_lo) * nb + (b - b_lo),
    computed by the op's reference; None when there are more than ADD_LUT_MAX pairs."""
    na, nb = xa.qmax - xa.qmin + 1, xb.qmax - xb.qmin + 1
    if na * nb > ADD_LUT_MAX:
        return None
    a, b = np.meshgrid(
        np.arange(xa.qmin, xa.qmax + 1), np.arange(xb.qmin, xb.qmax + 1), indexing="ij"
    )
    return OPS["add"].reference(node, [a, b]).ravel()


def _c_add(e: _Emitter, node: Node, tag: str) -> None:
    a, out = node.attrs, e.tensors.get(node.output)
    xa, xb = (e.tensors[n] for n in node.inputs)
    names = f"{_type_name(xa.dtype)}_{_type_name(xb.dtype)}_{_type_name(out.dtype)}"
    refs = f"{e.ref(node.inputs[0])}, {e.ref(node.inputs[1])}, {int(np.prod(out.shape))}"
    e.kernel("add", A=xa.dtype, B=xb.dtype, Y=out.dtype)
    call = (
        f"lq_add_{names}({refs}, {_int64_literal(a['m_a'])}, {_int64_literal(a['m_b'])}, "
        f"{a['shift']}, {_int64_literal(a['lo'])}, {_int64_literal(a['hi'])}, "
        f"{e.ref(node.output)});"
    )
    table = add_table(a, absmax(xa), absmax(xb))
    lut = add_lut(node, xa, xb)
    if lut is not None:
        y_type = C_TYPES[out.dtype]
        e.consts.append("#if LQ_DSP\n" + _array(y_type, f"{tag}_lut", lut) + "#endif\n")
        e.dsp_weight_bytes += lut.size
        e.kernel("add_lut", A=xa.dtype, B=xb.dtype, Y=out.dtype)
        fast = (
            f"lq_add_lut_{names}({refs}, {tag}_lut, {xa.qmin}, {xb.qmin}, "
            f"{xb.qmax - xb.qmin + 1}, {e.ref(node.output)});"
        )
        call = f"#if LQ_DSP\n    {fast}\n#else\n    {call}\n#endif"
    elif table is not None:
        sat = saturation(int(a["lo"]), int(a["hi"]), "(h + rnd) >> sh")
        e.kernel("add_hi", sat=sat, A=xa.dtype, B=xb.dtype, Y=out.dtype)
        fast = f"lq_add_hi_{names}_{sat[0]}({refs}, {', '.join(map(str, table))}, "
        call = f"#if LQ_DSP\n    {fast}{e.ref(node.output)});\n#else\n    {call}\n#endif"
    e.calls.append(call)


def _c_concat(e: _Emitter, node: Node, tag: str) -> None:
    a, out = node.attrs, e.tensors.get(node.output)
    # One image is (C, ...) channel-major: input i fills the channel block after the
    # blocks of the inputs before it.
    start = 0
    for part, m in zip(node.inputs, a["m"], strict=True):
        x = e.tensors[part]
        e.kernel("concat", X=x.dtype, Y=out.dtype)
        size = int(np.prod(x.shape))
        e.calls.append(
            f"lq_concat_{_type_name(x.dtype)}_{_type_name(out.dtype)}({e.ref(part)}, "
            f"{size}, {_int64_literal(m)}, {a['shift']}, {_int64_literal(a['lo'])}, "
            f"{_int64_literal(a['hi'])}, {e.ref(node.output)} + {start});"
        )
        start += size


def _c_maxpool(e: _Emitter, node: Node, tag: str) -> None:
    a, out = node.attrs, e.tensors.get(node.output)
    x = e.tensors[node.inputs[0]]
    e.kernel("maxpool2d", X=x.dtype)
    c, h, w = x.shape
    _, oh, ow = out.shape
    e.calls.append(
        f"lq_maxpool_{_type_name(x.dtype)}({e.ref(node.inputs[0])}, {c}, {h}, {w}, "
        f"{e.ref(node.output)}, {oh}, {ow}, {a['kernel'][0]}, {a['kernel'][1]}, "
        f"{a['stride'][0]}, {a['stride'][1]}, {a['padding'][0]}, {a['padding'][1]}, "
        f"{a['dilation'][0]}, {a['dilation'][1]});"
    )


def _c_avgpool(e: _Emitter, node: Node, tag: str) -> None:
    a, out = node.attrs, e.tensors.get(node.output)
    x = e.tensors[node.inputs[0]]
    e.kernel("avgpool2d", X=x.dtype)
    c, h, w = x.shape
    _, oh, ow = out.shape
    e.calls.append(
        f"lq_avgsum_{_type_name(x.dtype)}({e.ref(node.inputs[0])}, {c}, {h}, {w}, "
        f"{e.ref(node.output)}, {oh}, {ow}, {a['kernel'][0]}, {a['kernel'][1]}, "
        f"{a['stride'][0]}, {a['stride'][1]}, {a['padding'][0]}, {a['padding'][1]});"
    )


def _c_mul(e: _Emitter, node: Node, tag: str) -> None:
    a, out = node.attrs, e.tensors.get(node.output)
    xa, xb = (e.tensors[n] for n in node.inputs)
    e.kernel("mul", A=xa.dtype, B=xb.dtype, Y=out.dtype)
    dims_a = (list(xa.shape) + [1, 1])[:3]
    dims_b = (list(xb.shape) + [1, 1])[:3]
    e.calls.append(
        f"lq_mul_{_type_name(xa.dtype)}_{_type_name(xb.dtype)}_{_type_name(out.dtype)}("
        f"{e.ref(node.inputs[0])}, {e.ref(node.inputs[1])}, {dims_a[0]}, {dims_a[1]}, "
        f"{dims_a[2]}, {dims_b[0]}, {dims_b[1]}, {dims_b[2]}, {_int64_literal(a['m'])}, "
        f"{a['shift']}, {_int64_literal(a['lo'])}, {_int64_literal(a['hi'])}, "
        f"{e.ref(node.output)});"
    )


def _c_lut(e: _Emitter, node: Node, tag: str) -> None:
    a, p, out = node.attrs, node.params, e.tensors.get(node.output)
    x = e.tensors[node.inputs[0]]
    table = np.asarray(p["table"])
    e.consts.append(_array(C_TYPES[out.dtype], f"{tag}_table", table))
    e.weight_bytes += table.size
    e.int8_bytes += table.size
    e.kernel("lut", X=x.dtype, Y=out.dtype)
    e.calls.append(
        f"lq_lut_{_type_name(x.dtype)}_{_type_name(out.dtype)}({e.ref(node.inputs[0])}, "
        f"{int(np.prod(x.shape))}, {tag}_table, {a['offset']}, {e.ref(node.output)});"
    )


def _c_adaptive_avgpool(e: _Emitter, node: Node, tag: str) -> None:
    a = node.attrs
    x = e.tensors[node.inputs[0]]
    e.kernel("adaptive_avgpool2d", X=x.dtype)
    c, h, w = x.shape
    e.calls.append(
        f"lq_adaptive_{_type_name(x.dtype)}({e.ref(node.inputs[0])}, {c}, {h}, {w}, "
        f"{e.ref(node.output)}, {a['out_size'][0]}, {a['out_size'][1]}, {a['lcm']});"
    )


def _c_same_bytes(e: _Emitter, node: Node, tag: str) -> None:
    e.calls.append(f"/* {node.op}: the same bytes as its input */")


def _c_transpose(e: _Emitter, node: Node, tag: str) -> None:
    a, out = node.attrs, e.tensors.get(node.output)
    x = e.tensors[node.inputs[0]]
    e.kernel("transpose", X=x.dtype)
    strides = [int(np.prod(x.shape[k + 1 :])) for k in range(len(x.shape))]
    e.consts.append(_array("int32_t", f"{tag}_dims", [out.shape[k] for k in range(len(out.shape))]))
    e.consts.append(_array("int32_t", f"{tag}_strides", [strides[q] for q in a["perm"]]))
    e.calls.append(
        f"lq_transpose_{_type_name(x.dtype)}({e.ref(node.inputs[0])}, {e.ref(node.output)}, "
        f"{len(x.shape)}, {tag}_dims, {tag}_strides);"
    )


def _c_slice(e: _Emitter, node: Node, tag: str) -> None:
    a = node.attrs
    x = e.tensors[node.inputs[0]]
    e.kernel("slice", X=x.dtype)
    axis = a["axis"]
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis + 1 :]))
    e.calls.append(
        f"lq_slice_{_type_name(x.dtype)}({e.ref(node.inputs[0])}, {e.ref(node.output)}, "
        f"{outer}, {x.shape[axis]}, {a['start']}, {a['end']}, {inner});"
    )


def _c_output(e: _Emitter, node: Node, tag: str) -> None:
    src = e.tensors[node.inputs[0]]
    n = int(np.prod(src.shape))
    e.calls.append(f"for (i = 0; i < {n}; i++) logits[i] = (int32_t){e.ref(node.inputs[0])}[i];")


# The C lowering of each op of the registry (intprog.ops), or Unsupported with the reason.
LOWERINGS: dict[str, Callable | Unsupported] = {
    "input": _c_affine,  # the affine rule on pixels: one kernel for both
    "affine": _c_affine,
    "conv2d": _c_layer,
    "linear": _c_layer,
    "requantize": _c_requantize,
    "add": _c_add,
    "concat": _c_concat,
    "mul": _c_mul,
    "lut": _c_lut,
    "maxpool2d": _c_maxpool,
    "avgpool2d": _c_avgpool,
    "adaptive_avgpool2d": _c_adaptive_avgpool,
    "flatten": _c_same_bytes,
    "reshape": _c_same_bytes,
    "transpose": _c_transpose,
    "slice": _c_slice,
    "output": _c_output,
}


def generate_c(program: IntProgram, name: str = "model") -> tuple[str, str, CExport]:
    """(header text, source text, sizes) for ``program``; ``export_c`` writes them."""
    verify(program)
    name = c_identifier(name)
    upper = name.upper()
    offsets, arena = plan_arena(program)
    e = _Emitter(program, offsets)
    for index, node in enumerate(program.nodes):
        lower = LOWERINGS.get(node.op)
        if not callable(lower):
            why = lower.reason if isinstance(lower, Unsupported) else "not in its table"
            raise CExportError(
                f"node {node.name!r}: op {node.op!r} has no C kernel ({why}); export this "
                "program to ONNX instead, or add the op to lsqint.export.c_code"
            )
        lower(e, node, f"n{index}")
        e.calls.append(f"LQ_MARK({index});")
    consts, calls, kernels, scratch = e.consts, e.calls, e.kernels, e.scratch
    portable_scratch = 2 * scratch + (4 * e.plane if e.fused else 0)
    weight_bytes, int8_bytes = e.weight_bytes, e.int8_bytes
    in_c, in_h, in_w = program.input_spec.shape
    classes = program.num_classes()
    header = f"""/* {name}: an lsqint integer program as C99, from `lsqint export --format c`.
 * Integer arithmetic only: uint8 pixels in, int32 logits out. */
#ifndef {upper}_H
#define {upper}_H

#include <stdint.h>

/* The Arm DSP extension's kernels where the compiler targets it (Cortex-M4/M7/M33, ...) unless
 * LQ_PORTABLE is defined; the portable loops everywhere else. */
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP && !defined(LQ_PORTABLE)
#define LQ_DSP 1
#else
#define LQ_DSP 0
#endif

#define {upper}_INPUT_CHANNELS {in_c}
#define {upper}_INPUT_HEIGHT {in_h}
#define {upper}_INPUT_WIDTH {in_w}
#define {upper}_NUM_CLASSES {classes}
/* Static RAM: activation arena + scratch (one unpacked weight row and a fused conv's int32
 * output plane; with the DSP kernels, two pixels' columns: int16, or bytes and packed words). */
#define {upper}_ARENA_BYTES {arena}
#if LQ_DSP
#define {upper}_SCRATCH_BYTES {4 * e.dsp_scratch}
#else
#define {upper}_SCRATCH_BYTES {portable_scratch}
#endif

#ifdef __cplusplus
extern "C" {{
#endif

/* One image: pixels[{in_c} * {in_h} * {in_w}] (channel, row, column) -> logits[{classes}].
 * Returns 0. Not reentrant (one static arena). */
int {name}_run(const uint8_t *pixels, int32_t *logits);

#ifdef __cplusplus
}}
#endif
#endif
"""
    body = re.sub(r"(?m)^ +#", "#", "\n    ".join(calls))  # preprocessor lines at column 0
    source = (
        f"/* Generated by lsqint from an integer program; do not edit. */\n"
        f'#include "{name}.h"\n#include <string.h>\n#if LQ_DSP\n#include <arm_acle.h>\n#endif\n\n'
        f"static uint32_t lq_arena_words[({arena} + 3) / 4 + 1];\n"
        + _ARENA_NOTE
        + "static uint8_t *volatile lq_arena_base = (uint8_t *)lq_arena_words;\n"
        f"#if LQ_DSP\nstatic int32_t lq_cols[{e.dsp_scratch}]; /* im2col columns */\n#else\n"
        f"static int16_t lq_row[{scratch}];\n"
        + (
            f"static int32_t lq_plane[{e.plane}]; /* a fused conv's output plane */\n"
            if e.fused
            else ""
        )
        + "#endif\n"
        + _PROFILE_HOOK
        + _HELPERS
        + "".join(kernels.values())  # in first use order: im2col before the DSP kernels
        + "\n"
        + "".join(consts)
        + f"\nint {name}_run(const uint8_t *pixels, int32_t *logits)\n{{\n"
        "    uint8_t *const lq_arena = lq_arena_base;\n    int i;\n"
        f"    {body}\n    (void)i;\n    return 0;\n}}\n"
    )
    info = CExport(
        header=Path(f"{name}.h"),
        source=Path(f"{name}.c"),
        name=name,
        arena_bytes=arena,
        scratch_bytes=portable_scratch,
        weight_bytes=weight_bytes,
        int8_weight_bytes=int8_bytes,
        dsp_weight_bytes=e.dsp_weight_bytes,
        dsp_scratch_bytes=4 * e.dsp_scratch,
        dsp_kernels=e.kernel_choice,
    )
    return header, source, info


def _int64_array(name: str, values: np.ndarray) -> str:
    flat = [_int64_literal(v) for v in np.asarray(values).ravel()]
    return f"static const int64_t {name}[{len(flat)}] = {{{', '.join(flat)}}};\n"


def export_c(program: IntProgram, out_dir: str | Path, name: str = "model") -> CExport:
    """Write ``NAME.h`` and ``NAME.c`` for ``program`` into ``out_dir``; returns paths and sizes."""
    header, source, info = generate_c(program, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info.header = out / info.header
    info.source = out / info.source
    info.header.write_text(header)
    info.source.write_text(source)
    return info
