"""The Arm DSP extension's side of the C export (``c_code``'s kernels under ``LQ_DSP``).

What export decides for the Cortex-M4/M7/M33 kernels, per layer, from the program's integers:
the weight layouts the assembly reads (``dsp_weight_layout``, ``pack_weight_layout``), which
packed kernel and chunk length a layer takes and the bound that makes it exact (``PACKINGS``,
``pack_plan``), the assembly of the packed inner loops (``packed_dot_asm``), the 32-bit
requantize and add constants with the conditions that keep them exact (``requant_table``,
``add_table``), the clamps (``saturation``) and the tables that replace narrow adds and affine
ops (``add_lut``, ``affine_lut``); and the C text of those kernels (``DSP_KERNELS``). Each rule
is proven in the comment of its C kernel and tested against Python integers on qemu's Cortex-M4.
"""

from __future__ import annotations

import numpy as np

from ..intprog.ops import OPS
from ..intprog.program import Node, TensorSpec

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


# The DSP kernels' C, emitted like c_code's _KERNELS ({X}, {C}, {Y}, ... filled per use).
DSP_KERNELS = {
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
 * results of both are not stored. Each stored value is LQ_E(LQ_V(acc), i): the fused
 * requantize, then the fused add's epilogue if any (c_code's _EPILOGUES), reading element i of
 * the add's other input just before writing element i. */
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
                int32_t i0 = (int32_t)oa * P + p; /* the element index (LQ_E) */
                {OUT_T} *ya = y + i0, v0, v1;
                s[0] = s[1] = bias[oa];
                s[2] = s[3] = pair ? bias[oa + 1] : 0;
                lq_dot2x2(w + ((int32_t)g * og2 + o) * Kp, col0, c1, s);
                /* both values before the stores (a {Y} store may alias the constants); the
                 * second pixel's first, so that without one the first overwrites it */
                v0 = LQ_E(LQ_V(s[0], oa), i0), v1 = LQ_E(LQ_V(s[1], oa), i0 + two);
                ya[two] = v1, ya[0] = v0;
                if (pair) {
                    v0 = LQ_E(LQ_V(s[2], oa + 1), i0 + P);
                    v1 = LQ_E(LQ_V(s[3], oa + 1), i0 + P + two);
                    ya[P + two] = v1, ya[P] = v0;
                }
            }
        }
    }
}
#undef LQ_V
#undef LQ_E
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
 * layer's, within its acc_bound). Stored values as in lq_conv_dsp (LQ_E of LQ_V). */
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
                int32_t i0 = (int32_t)oa * P + p; /* the element index (LQ_E) */
                {OUT_T} *ya = y + i0, v0, v1;
                dot(u + ((int32_t)g * og2 + o) * words, mixed, s, passes);
                /* as in lq_conv_dsp: values first, the second pixel's store first */
                v0 = LQ_E(LQ_V(bias[oa] + (s[0] + sx0), oa), i0);
                v1 = LQ_E(LQ_V(bias[oa] + (s[1] + sx1), oa), i0 + two);
                ya[two] = v1, ya[0] = v0;
                if (pair) {
                    v0 = LQ_E(LQ_V(bias[oa + 1] + (s[2] + sx0), oa + 1), i0 + P);
                    v1 = LQ_E(LQ_V(bias[oa + 1] + (s[3] + sx1), oa + 1), i0 + P + two);
                    ya[P + two] = v1, ya[P] = v0;
                }
            }
        }
    }
}
#undef LQ_V
#undef LQ_E
#endif
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
}
