"""Integer program -> float-free C99 for microcontrollers (`lsqint export --format c`).

The generated pair ``NAME.h`` / ``NAME.c`` has one entry point,

    int NAME_run(const uint8_t *pixels, int32_t *logits);

for ONE image (C x H x W uint8, channel-major like the program's input) and returns 0. It uses
only ``<stdint.h>`` and ``<string.h>``: no float or double anywhere, no malloc. Weights are
``const`` arrays (flash) in the artifact's packed b-bit form (``artifact.pack_bits``: code +
2^(b-1), least significant bit first), unpacked one output channel at a time into a small scratch
row. Activations live in one static arena whose layout is planned here from tensor lifetimes
(first fit, largest tensor first); ``NAME_ARENA_BYTES`` is the peak RAM besides the stack. A
conv/linear writes the codes of the requantize that reads it (``fused_requantizes``), and the
output of a residual add that reads those codes (``fused_adds``), in place where it can, so
neither its int32 accumulator nor its codes are stored. On cores with the Arm DSP extension the
kernels and layouts of ``c_dsp`` are compiled instead of the portable loops.

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
from ..intprog.ops import Unsupported
from ..intprog.ops.base import absmax
from ..intprog.program import IntProgram, Node
from ..intprog.verify import verify
from .c_dsp import (
    DSP_KERNELS,
    add_lut,
    add_table,
    affine_lut,
    dsp_weight_layout,
    pack_plan,
    pack_weight_layout,
    packed_dot_asm,
    requant_table,
    saturation,
)

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
        "{OUT_PARAMS}": "{OUT_T} *y, const int32_t *q, int32_t kk",
        "{OUT_T}": "{Y}",
        "{LQ_V}": "#define LQ_V(acc, ch) (({Y}){SAT})",
    },
    "rq": {
        "{OUT_NAME}": "_rq_{YN}",
        "{OUT_PARAMS}": "{OUT_T} *y, const int32_t *m, const int8_t *t, int pc, int64_t lo, "
        "int64_t hi",
        "{OUT_T}": "{Y}",
        "{LQ_V}": "#define LQ_V(acc, ch) \\\n"
        "    (({Y})LQ_REQUANT((acc), m[pc ? (ch) : 0], t[pc ? (ch) : 0], lo, hi))",
        "{PLANE}": "plane",
        "{PLANE_PARAM}": ", int32_t *plane",
        "{EMIT}": "\n        for (oy = 0; oy < OH * OW; oy++)"
        "\n            y[(int32_t)o * OH * OW + oy] ="
        "\n                LQ_E(LQ_V(yo[oy], o), (int32_t)o * OH * OW + oy);",
    },
}

# What a fused layer does with each code before storing it (``LQ_E(v, i)``, i: the element's
# index): nothing, or the residual add whose only other input is ``xo`` (``fused_adds``): the
# add's int64 rule (both builds), or its table of every result (``add_lut``, DSP builds). The
# layer then writes the add's {Z} codes; in place over ``xo`` where nothing else reads it later.
_EPILOGUES = {
    None: {"{EPIN}": "", "{EPI_PARAMS}": "", "{LQ_E}": "#define LQ_E(v, i) (v)"},
    "add64": {
        "{EPIN}": "_a64_{BN}_{ZN}",
        "{EPI_PARAMS}": ", const {B} *xo, int64_t ma, int64_t mb, int ash, int64_t alo, "
        "int64_t ahi",
        "{LQ_E}": "#define LQ_E(v, i) \\\n"
        "    lq_round_clamp((int64_t)(v) * ma + (int64_t)xo[i] * mb, ash, alo, ahi)",
    },
    "addhi": {  # lq_add_hi's rule (add_table) and its saturation {ASAT}
        "{EPIN}": "_ahi_{BN}_{ZN}_{ASATN}",
        "{EPI_PARAMS}": ", const {B} *xo, int32_t akk, int32_t ama, int32_t amb, int32_t arnd, "
        "int ash",
        "{LQ_E}": "#define LQ_E(v, i) ({ASAT})",
    },
    "addlut": {
        "{EPIN}": "_alut_{BN}_{ZN}",
        "{EPI_PARAMS}": ", const {B} *xo, const {Z} *lut, int32_t sa, int32_t sb, int32_t off",
        "{LQ_E}": "#define LQ_E(v, i) lut[(int32_t)(v) * sa + (int32_t)xo[i] * sb + off]",
    },
}

_KERNELS = {
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
#undef LQ_E
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
        y[o] = LQ_E(LQ_V(acc, o), o);
    }
}
#undef LQ_V
#undef LQ_E
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
_KERNELS.update(DSP_KERNELS)  # the Arm DSP extension's (c_dsp)


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


@dataclass
class FusedAdd:
    """A residual add run as the epilogue of the layer that computes one of its inputs."""

    add: Node
    other: str  # the add's other input: read elementwise by the layer
    conv_is_a: bool  # the layer's codes are the add's first input
    in_place: bool  # the add's output overwrites ``other`` (nothing reads it afterwards)


def fused_adds(program: IntProgram) -> dict[str, FusedAdd]:
    """A fused conv/linear's codes (its requantize's output) -> the add that is their only
    reader, when the add's other input is computed before the layer: the C export writes the
    add's codes from the layer, so the layer's codes are never stored. In place over the other
    input when every other reader of it runs before the layer (the layer reads element i of it
    just before writing element i) and it is not the caller's pixels or a view."""
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(program.nodes):
        for name in node.inputs:
            readers.setdefault(name, []).append(i)
    written = {node.output: i for i, node in enumerate(program.nodes)}
    views = {node.inputs[0] for node in program.nodes if node.op in ("flatten", "reshape")}
    out: dict[str, FusedAdd] = {}
    for layer_out, requantize in fused_requantizes(program).items():
        codes, layer = requantize.output, written[layer_out]
        after = readers.get(codes, [])
        if len(after) != 1 or program.nodes[after[0]].op != "add":
            continue
        add = program.nodes[after[0]]
        if add.inputs[0] == add.inputs[1] or program.tensors[add.output].dtype not in C_TYPES:
            continue
        conv_is_a = add.inputs[0] == codes
        other = add.inputs[1] if conv_is_a else add.inputs[0]
        if other not in written or written[other] >= layer:
            continue  # the pixels, or computed after the layer
        in_place = other not in views and all(i < layer for i in readers[other] if i != after[0])
        in_place = in_place and program.tensors[add.output].dtype in ("uint8", "int8")
        out[codes] = FusedAdd(add, other, conv_is_a, in_place)
    return out


def plan_arena(program: IntProgram) -> tuple[dict[str, int], int]:
    """Byte offset of every activation tensor in one arena, and the arena's size.

    A tensor lives from the node that writes it to the last node that reads it; two tensors
    whose lifetimes overlap get disjoint bytes (an op's output never overlaps its inputs).
    ``flatten`` and ``reshape`` write no bytes: the output is the input's buffer (same C order).
    A conv/linear fused with its requantize (``fused_requantizes``) stores no accumulator: the
    codes are written by the layer, so they live from the layer on; fused with an add too
    (``fused_adds``), it stores no codes either but the add's output, in the bytes of the add's
    other input when in place."""
    alias: dict[
        str, str
    ] = {}  # flatten output (or in-place add) -> the tensor whose bytes it reuses
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    pixels = program.nodes[0].inputs[0]  # the caller's buffer, not the arena
    fused = fused_requantizes(program)
    adds = fused_adds(program)
    fused_outputs = {req.output for req in fused.values()}
    add_outputs = {f.add.output for f in adds.values()}
    for i, node in enumerate(program.nodes):
        for name in node.inputs:
            if name != pixels and name not in fused and name not in adds:
                root = alias.get(name, name)
                last[root] = max(last[root], i)
        if node.op in ("flatten", "reshape"):
            alias[node.output] = alias.get(node.inputs[0], node.inputs[0])
        elif node.output in fused:  # the layer writes its requantize's codes
            codes = fused[node.output].output
            if codes in adds:  # ... or the add's codes
                f, y = adds[codes], adds[codes].add.output
                if f.in_place:
                    alias[y] = alias.get(f.other, f.other)
                else:
                    first[y] = last[y] = i
                if f.other != pixels:  # read by the layer
                    root = alias.get(f.other, f.other)
                    last[root] = max(last[root], i)
            else:
                first[codes] = last[codes] = i
        elif node.op != "output" and node.output not in fused_outputs | add_outputs:
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
        self.fused_adds = fused_adds(program)  # a fused layer's codes -> its add epilogue
        self.fused_add_nodes = {f.add.name for f in self.fused_adds.values()}
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
        epi: str | None = None,
        epi_sat: tuple[str, str] | None = None,
        **types: str,
    ):
        """Emit kernel ``op`` once per type combination (``form``: a layer kernel's form;
        ``text``: a generated kernel instead of one of _KERNELS; ``sat``: the "rqs" form's
        clamp, (name, C expression), from ``saturation``; ``epi``: a fused layer's epilogue,
        a key of _EPILOGUES, with the types B (the add's other input) and Z (its output);
        ``epi_sat``: the "addhi" epilogue's saturation)."""
        text = _KERNELS[op] if text is None else text
        forms = dict(_LAYER_FORMS[form]) if form else {}
        if form and epi:
            forms["{OUT_T}"] = "{Z}"
        if form:
            forms["{OUT_NAME}"] += "{EPIN}"
            forms["{OUT_PARAMS}"] += "{EPI_PARAMS}"
            forms["{LQ_V}"] += "\n{LQ_E}"
        for placeholder, value in [*forms.items(), *_EPILOGUES[epi].items()]:
            text = text.replace(placeholder, value)
        if sat is not None:
            text = text.replace("{SATN}", sat[0]).replace("{SAT}", sat[1])
        if epi_sat is not None:
            text = text.replace("{ASATN}", epi_sat[0]).replace("{ASAT}", epi_sat[1])
        for key, dtype in types.items():
            text = text.replace("{" + key + "N}", _type_name(dtype))
            text = text.replace("{" + key + "}", C_TYPES[dtype])
        key = op + (f"_{form}" if form else "") + "".join(f"_{types[k]}" for k in sorted(types))
        key += (f"_{sat[0]}" if sat else "") + (f"_{epi}" if epi else "")
        key += f"_{epi_sat[0]}" if epi_sat else ""
        self.kernels.setdefault(key, text)


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
        name = f"_rq_{_type_name(codes.dtype)}"
        if requantize.output not in e.fused_adds:  # (else the add's output, below)
            y_ref = e.ref(requantize.output)
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
    # A residual add fused as the layer's epilogue: it writes the add's codes.
    epi = dsp_epi = epi_sat = None
    fused = e.fused_adds.get(requantize.output) if requantize is not None else None
    if fused is not None:
        add, z = fused.add, e.tensors[fused.add.output]
        types.update(B=e.tensors[fused.other].dtype, Z=z.dtype)
        y_ref, suffix = e.ref(add.output), f"_{_type_name(types['B'])}_{_type_name(z.dtype)}"
        m_conv, m_other = (add.attrs["m_a"], add.attrs["m_b"])[:: 1 if fused.conv_is_a else -1]
        add64 = (
            f", {e.ref(fused.other)}, {_int64_literal(m_conv)}, {_int64_literal(m_other)}, "
            f"{add.attrs['shift']}, {_int64_literal(add.attrs['lo'])}, "
            f"{_int64_literal(add.attrs['hi'])}"
        )
        epi, name, out_args = "add64", name + "_a64" + suffix, out_args + add64
        xa, xb = (e.tensors[t] for t in add.inputs)
        lut = add_lut(add, xa, xb)
        hi_table = add_table(add.attrs, absmax(xa), absmax(xb))
        if lut is None and hi_table is not None:  # lq_add_hi's rule, the layer's code first
            kk, ma, mb, rnd, sh = hi_table
            ma, mb = (ma, mb)[:: 1 if fused.conv_is_a else -1]
            value = "((int32_t)(((int64_t)((v) * akk) * ama + (int64_t)(xo[i] * akk) * amb) >> 32)"
            lo, hi = int(add.attrs["lo"]), int(add.attrs["hi"])
            epi_sat = saturation(lo, hi, value + " + arnd) >> ash")
            dsp_epi, dsp_name = "addhi", dsp_name + "_ahi" + suffix + f"_{epi_sat[0]}"
            dsp_out_args += f", {e.ref(fused.other)}, {kk}, {ma}, {mb}, {rnd}, {sh}"
        elif lut is None:
            dsp_epi, dsp_name = "add64", dsp_name + "_a64" + suffix
            dsp_out_args += add64
        else:  # index (a - a_lo) nb + (b - b_lo), a or b the layer's code
            nb = xb.qmax - xb.qmin + 1
            sa, sb = (nb, 1) if fused.conv_is_a else (1, nb)
            off = -(xa.qmin * nb + xb.qmin)
            e.consts.append(
                "#if LQ_DSP\n" + _array(C_TYPES[z.dtype], f"{tag}_alut", lut) + "#endif\n"
            )
            e.dsp_weight_bytes += lut.size
            dsp_epi, dsp_name = "addlut", dsp_name + "_alut" + suffix
            dsp_out_args += f", {e.ref(fused.other)}, {tag}_alut, {sa}, {sb}, {off}"
    if plan is None:
        e.kernel("im2col", X=x.dtype, C="int16")
        e.kernel("dot2x2")
        e.kernel("conv2d_dsp", dsp_form, sat=sat, epi=dsp_epi, epi_sat=epi_sat, **types)
    else:
        e.kernel(f"packed_dot_{v}_{n}_{r}", text=packed_dot_asm(v, n, r))
        e.kernel("im2col", X=x.dtype, C="uint8")
        e.kernel("conv2d_pk", dsp_form, sat=sat, epi=dsp_epi, epi_sat=epi_sat, **types)
    if node.op == "conv2d":
        e.kernel("conv2d", form, epi=epi, **types)
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
        e.kernel("linear", form, epi=epi, **types)
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


def _c_add(e: _Emitter, node: Node, tag: str) -> None:
    if node.name in e.fused_add_nodes:
        e.calls.append(f"/* {node.name}: the epilogue of the layer before it */")
        return
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
