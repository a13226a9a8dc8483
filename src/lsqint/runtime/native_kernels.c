/* The torch runtime's CPU rounding steps, as the reference computes them (int64, round half up,
 * clamp), in one pass over memory instead of torch's five. Compiled by runtime/native.py with the
 * machine's C compiler (-O3 -march=native) and called through ctypes on a channels-last slice of
 * a tensor: element i belongs to channel i % channels. With -fopenmp the loops run on the OpenMP
 * runtime torch already loaded (libgomp.so.1, one thread pool: no second set of threads spinning
 * against torch's); without it, on one thread.
 *
 * Exactness: inputs are exact integers (float32 accumulators below 2^24, the caller checks the
 * layer's bound; uint8 codes), converted to int64 without rounding; products and sums are bounded
 * below 2^62 by the caller (bound * max multiplier + 2^(t-1)); the shift is the reference's floor
 * division by 2^t, written so that only non-negative values are ever shifted (C leaves >> of a
 * negative value to the implementation): for v < 0, floor(v / 2^t) == ~((~v) >> t), ~v >= 0. */
#include <stdint.h>

static inline int64_t floor_shift(int64_t v, int64_t t) { return v >= 0 ? v >> t : ~((~v) >> t); }

static inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

/* out[i] = clamp(floor((acc[i] * m[j] + add[j]) / 2^t[j]), lo, hi), j = i % block, with
 * add = 2^(t-1) (requantize) or b + 2^(t-1) (the affine op on codes): the caller tiles the
 * per-channel m, add and t to a block of whole pixels (channels-last:
 * element i is channel i % channels), so the loops run over long contiguous rows. Results go
 * through an int32 row first: compilers vectorize int64 -> int32 and int32 -> uint8 narrowing,
 * not int64 -> uint8 in one step (measured 20x slower). */
#define ROW 1024
#define REQUANTIZE(NAME, IN_T, OUT_T)                                                           \
    void NAME(const IN_T *acc, OUT_T *out, int64_t n, int64_t block, const int64_t *m,          \
              const int64_t *add, const int64_t *t, int64_t lo, int64_t hi) {                   \
        int64_t blocks = (n + block - 1) / block;                                               \
        _Pragma("omp parallel for schedule(static) if (n >= 32768)")                            \
        for (int64_t j = 0; j < blocks; j++) {                                                  \
            int32_t row[ROW];                                                                   \
            int64_t i0 = j * block;                                                             \
            int64_t len = n - i0 < block ? n - i0 : block;                                      \
            for (int64_t c0 = 0; c0 < len; c0 += ROW) {                                         \
                int64_t k = len - c0 < ROW ? len - c0 : ROW;                                    \
                const IN_T *a = acc + i0 + c0;                                                  \
                for (int64_t c = 0; c < k; c++) {                                               \
                    int64_t v = (int64_t)a[c] * m[c0 + c] + add[c0 + c];                        \
                    row[c] = (int32_t)clamp64(floor_shift(v, t[c0 + c]), lo, hi);               \
                }                                                                               \
                for (int64_t c = 0; c < k; c++) out[i0 + c0 + c] = (OUT_T)row[c];               \
            }                                                                                   \
        }                                                                                       \
    }

REQUANTIZE(requantize_f32_f32, float, float)
REQUANTIZE(requantize_f32_u8, float, uint8_t)
REQUANTIZE(requantize_u8_f32, uint8_t, float)
REQUANTIZE(requantize_u8_u8, uint8_t, uint8_t)

/* out[i] = clamp(floor((a[i] * m_a + b[i] * m_b + 2^(t-1)) / 2^t), lo, hi): the add op. */
#define ADD(NAME, A_T, B_T, OUT_T)                                                              \
    void NAME(const A_T *a, const B_T *b, OUT_T *out, int64_t n, int64_t m_a, int64_t m_b,      \
              int64_t t, int64_t lo, int64_t hi) {                                              \
        const int64_t half = (int64_t)1 << (t - 1);                                             \
        _Pragma("omp parallel for schedule(static) if (n >= 32768)")                            \
        for (int64_t i = 0; i < n; i++) {                                                       \
            int64_t v = (int64_t)a[i] * m_a + (int64_t)b[i] * m_b + half;                       \
            out[i] = (OUT_T)clamp64(floor_shift(v, t), lo, hi);                                 \
        }                                                                                       \
    }

ADD(add_f32_f32_f32, float, float, float)
ADD(add_f32_f32_u8, float, float, uint8_t)
ADD(add_f32_u8_f32, float, uint8_t, float)
ADD(add_f32_u8_u8, float, uint8_t, uint8_t)
ADD(add_u8_f32_f32, uint8_t, float, float)
ADD(add_u8_f32_u8, uint8_t, float, uint8_t)
ADD(add_u8_u8_f32, uint8_t, uint8_t, float)
ADD(add_u8_u8_u8, uint8_t, uint8_t, uint8_t)
