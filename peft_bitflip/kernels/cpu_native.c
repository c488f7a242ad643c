/* The flip kernel on the CPU, in one pass per tensor (peft_bitflip).
 *
 * Bit-identical to peft_bitflip/kernels/reference.py (see sampling.py for the scheme): per
 * group of 128 data bits, the dense fields' bit-sliced comparison (one Philox4x32-10 draw per
 * digit of P, vectorised over a block of groups: 32x32->64 products), the first draw of the
 * sparse fields, the gap-sampling loop only for the sparse fields that hold a flip, the flips
 * XORed into the element bits, then the zero-out (an integer compare of the magnitude bits)
 * and its packed mask (one byte per group, bit j = element j zeroed).
 * Built by cpu_native.py with the system C compiler and called through ctypes. */

#include <stdint.h>
#include <string.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define ROUNDS 10
#define BLOCK 64 /* groups per vectorised block of draws */
#define DENSE_ITERATION 0x80000000u /* dense digit k draws at Philox iteration 2^31 + k */

#if defined(PBF_AVX2)
#include <immintrin.h>
#endif

/* Words of the draw of counter (c0, c1, c2, c3) under key (k0, k1). */
static inline void philox(uint32_t w[4], uint32_t k0, uint32_t k1) {
    uint32_t c0 = w[0], c1 = w[1], c2 = w[2], c3 = w[3];
    for (int r = 0; r < ROUNDS; r++) {
        uint64_t p0 = (uint64_t)c0 * PHILOX_M0;
        uint64_t p1 = (uint64_t)c2 * PHILOX_M1;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    w[0] = c0, w[1] = c1, w[2] = c2, w[3] = c3;
}

/* The 63-bit uniform of field `word` (0: exp, 1: frac) of `group` at `iteration`. */
static inline int64_t uniform(uint64_t group, uint32_t iteration, uint32_t call, uint32_t k0,
                              uint32_t k1, int word) {
    uint32_t w[4] = {(uint32_t)group, (uint32_t)(group >> 32), iteration, call};
    philox(w, k0, k1);
    return (int64_t)((((uint64_t)(w[2 * word] >> 1)) << 32) | w[2 * word + 1]);
}

/* The four words of the draws of groups g0 .. g0 + BLOCK - 1 at `iteration` (portable
 * version: the compiler may vectorise the lane loop). */
static void draws_c(uint64_t g0, uint32_t iteration, uint32_t call, uint32_t k0, uint32_t k1,
                    uint32_t a[BLOCK], uint32_t b[BLOCK], uint32_t c[BLOCK], uint32_t d[BLOCK]) {
    for (int i = 0; i < BLOCK; i++) {
        uint64_t g = g0 + (uint64_t)i;
        a[i] = (uint32_t)g;
        b[i] = (uint32_t)(g >> 32);
        c[i] = iteration;
        d[i] = call;
    }
    for (int r = 0; r < ROUNDS; r++) {
        uint32_t ka = k0 + (uint32_t)r * PHILOX_W0, kb = k1 + (uint32_t)r * PHILOX_W1;
        for (int i = 0; i < BLOCK; i++) {
            uint64_t p0 = (uint64_t)a[i] * PHILOX_M0;
            uint64_t p1 = (uint64_t)c[i] * PHILOX_M1;
            uint32_t na = (uint32_t)(p1 >> 32) ^ b[i] ^ ka;
            uint32_t nc = (uint32_t)(p0 >> 32) ^ d[i] ^ kb;
            b[i] = (uint32_t)p1;
            d[i] = (uint32_t)p0;
            a[i] = na;
            c[i] = nc;
        }
    }
}

#if defined(PBF_AVX2)
/* (high, low) words of the 32x32->64 products of the 8 lanes of v with m. */
__attribute__((target("avx2"))) static inline void mulhilo8(__m256i v, __m256i m, __m256i *hi,
                                                            __m256i *lo) {
    __m256i even = _mm256_mul_epu32(v, m);                        /* lanes 0, 2, 4, 6 */
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(v, 32), m); /* lanes 1, 3, 5, 7 */
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

/* draws_c with AVX2: 8 groups per vector, VECS independent vectors in flight (the rounds
 * are a dependent chain of multiplies). */
#define VECS 4
__attribute__((target("avx2"))) static void draws_avx2(uint64_t g0, uint32_t iteration,
                                                        uint32_t call, uint32_t k0, uint32_t k1,
                                                        uint32_t wa[BLOCK], uint32_t wb[BLOCK],
                                                        uint32_t wc[BLOCK], uint32_t wd[BLOCK]) {
    const __m256i m0 = _mm256_set1_epi64x(PHILOX_M0), m1 = _mm256_set1_epi64x(PHILOX_M1);
    for (int i = 0; i < BLOCK; i += 8 * VECS) {
        __m256i a[VECS], b[VECS], c[VECS], d[VECS];
        for (int v = 0; v < VECS; v++) {
            uint32_t lo[8], hi[8];
            for (int j = 0; j < 8; j++) {
                uint64_t g = g0 + (uint64_t)(i + 8 * v + j);
                lo[j] = (uint32_t)g;
                hi[j] = (uint32_t)(g >> 32);
            }
            a[v] = _mm256_loadu_si256((const __m256i *)lo);
            b[v] = _mm256_loadu_si256((const __m256i *)hi);
            c[v] = _mm256_set1_epi32((int)iteration);
            d[v] = _mm256_set1_epi32((int)call);
        }
        uint32_t ka = k0, kb = k1;
        for (int r = 0; r < ROUNDS; r++) {
            const __m256i ka8 = _mm256_set1_epi32((int)ka), kb8 = _mm256_set1_epi32((int)kb);
            for (int v = 0; v < VECS; v++) {
                __m256i hi0, lo0, hi1, lo1;
                mulhilo8(a[v], m0, &hi0, &lo0);
                mulhilo8(c[v], m1, &hi1, &lo1);
                a[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, b[v]), ka8);
                c[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, d[v]), kb8);
                b[v] = lo1;
                d[v] = lo0;
            }
            ka += PHILOX_W0;
            kb += PHILOX_W1;
        }
        for (int v = 0; v < VECS; v++) {
            _mm256_storeu_si256((__m256i *)(wa + i + 8 * v), a[v]);
            _mm256_storeu_si256((__m256i *)(wb + i + 8 * v), b[v]);
            _mm256_storeu_si256((__m256i *)(wc + i + 8 * v), c[v]);
            _mm256_storeu_si256((__m256i *)(wd + i + 8 * v), d[v]);
        }
    }
}
#endif

static void draws(uint64_t g0, uint32_t iteration, uint32_t call, uint32_t k0, uint32_t k1,
                  uint32_t a[BLOCK], uint32_t b[BLOCK], uint32_t c[BLOCK], uint32_t d[BLOCK]) {
#if defined(PBF_AVX2)
    if (__builtin_cpu_supports("avx2")) {
        draws_avx2(g0, iteration, call, k0, k1, a, b, c, d);
        return;
    }
#endif
    draws_c(g0, iteration, call, k0, k1, a, b, c, d);
}

/* hits[i]: bit 0 when the exp field of group g0 + i holds a flip, bit 1 the frac field. */
static void first_draws(uint64_t g0, uint32_t call, uint32_t k0, uint32_t k1, int64_t last_e,
                        int64_t last_f, uint8_t *hits) {
    uint32_t a[BLOCK], b[BLOCK], c[BLOCK], d[BLOCK];
    draws(g0, 0, call, k0, k1, a, b, c, d);
    for (int i = 0; i < BLOCK; i++) {
        int64_t ue = (int64_t)((((uint64_t)(a[i] >> 1)) << 32) | b[i]);
        int64_t uf = (int64_t)((((uint64_t)(c[i] >> 1)) << 32) | d[i]);
        hits[i] = (uint8_t)((ue <= last_e) | ((uf <= last_f) << 1));
    }
}

/* Binary digits of P / 2^64 up to its last 1 (0 for P = 0). */
static inline int digits_of(uint64_t p) { return p ? 64 - __builtin_ctzll(p) : 0; }

/* The dense fields of groups g0 .. g0 + nb - 1: their four lane words (word w: elements
 * 2w, 2w + 1 of a 16-bit group, low half first; element w of a float32 group) get bit j set
 * where lane j flips: its uniform (digit k: bit j of word w of the draw at iteration
 * DENSE_ITERATION + k) is below P / 2^64 of its field (p_e, p_f: 0 for a sparse field).
 * exp_lanes / frac_lanes: the lane bits of each field in a word. */
static void dense_block(uint64_t g0, int nb, uint32_t call, uint32_t k0, uint32_t k1,
                        uint64_t p_e, uint64_t p_f, uint32_t exp_lanes, uint32_t frac_lanes,
                        uint32_t less[BLOCK][4]) {
    uint32_t und[BLOCK][4], r[4][BLOCK];
    const int d_e = digits_of(p_e), d_f = digits_of(p_f);
    const uint32_t lanes = (p_e ? exp_lanes : 0) | (p_f ? frac_lanes : 0);
    for (int i = 0; i < BLOCK; i++)
        for (int w = 0; w < 4; w++) und[i][w] = lanes, less[i][w] = 0;
    for (int k = 0; k < (d_e > d_f ? d_e : d_f); k++) {
        /* lanes past their P's last 1 cannot flip: stop once no other lane is undecided */
        const uint32_t live = (d_e > k ? exp_lanes : 0) | (d_f > k ? frac_lanes : 0);
        uint32_t any = 0;
        for (int i = 0; i < nb; i++) any |= (und[i][0] | und[i][1] | und[i][2] | und[i][3]) & live;
        if (!any) break;
        const uint32_t digit = ((p_e >> (63 - k)) & 1 ? exp_lanes : 0) |
                               ((p_f >> (63 - k)) & 1 ? frac_lanes : 0);
        draws(g0, DENSE_ITERATION + (uint32_t)k, call, k0, k1, r[0], r[1], r[2], r[3]);
        for (int i = 0; i < BLOCK; i++)
            for (int w = 0; w < 4; w++) {
                less[i][w] |= und[i][w] & ~r[w][i] & digit;
                und[i][w] &= ~(r[w][i] ^ digit);
            }
    }
}

/* Number of table entries below u (the table is sorted). */
static inline int64_t count_below(const int64_t *t, int64_t n, int64_t u) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        if (t[mid] < u)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Flip the bits of one field of `group` (elements `elems`, `valid` of them in the tensor),
 * gap sampling from its first uniform `u`. */
static void field_flips(uint64_t group, int word, int64_t u, const int64_t *t, int64_t n_field,
                        int per_elem, int shift, int elem_bits, void *elems, int valid,
                        uint32_t call, uint32_t k0, uint32_t k1) {
    int64_t pos = 0;
    uint32_t it = 0;
    for (;;) {
        int64_t q = pos + count_below(t, n_field, u);
        if (q >= n_field) return;
        int e = (int)(q / per_elem);
        if (e < valid) {
            uint32_t bit = 1u << (q % per_elem + shift);
            if (elem_bits == 16)
                ((uint16_t *)elems)[e] ^= (uint16_t)bit;
            else
                ((uint32_t *)elems)[e] ^= bit;
        }
        pos = q + 1;
        if (pos >= n_field) return;
        it++;
        u = uniform(group, it, call, k0, k1, word);
    }
}

/* Zero the `ne` elements at yb whose magnitude bits are >= keep_below (NaN and Inf among
 * them); mask: NULL or one byte per group of G for the nb groups (bit j = element j zeroed).
 * Returns the number of elements zeroed. */
static int64_t zero_out(void *yb, int64_t ne, int elem_bits, int G, uint32_t keep_below,
                        uint8_t *mask, int nb) {
    uint8_t zeroed[BLOCK * 8];
    int64_t n_zeroed = 0;
    if (elem_bits == 16) {
        uint16_t *v = (uint16_t *)yb;
        for (int64_t j = 0; j < ne; j++) {
            uint16_t out = (uint16_t)(0 - ((uint32_t)(v[j] & 0x7FFFu) >= keep_below));
            zeroed[j] = (uint8_t)out;
            n_zeroed += out & 1;
            v[j] &= (uint16_t)~out;
        }
    } else {
        uint32_t *v = (uint32_t *)yb;
        for (int64_t j = 0; j < ne; j++) {
            uint32_t out = 0u - ((v[j] & 0x7FFFFFFFu) >= keep_below);
            zeroed[j] = (uint8_t)out;
            n_zeroed += out & 1;
            v[j] &= ~out;
        }
    }
    if (mask) {
        for (int i = 0; i < nb; i++) {
            uint8_t m = 0;
            for (int j = 0; j < G && i * G + j < ne; j++) m |= (uint8_t)((zeroed[i * G + j] & 1) << j);
            mask[i] = m;
        }
    }
    return n_zeroed;
}

/* c[0] += sign/exponent bits, c[1] += mantissa bits (the low n_frac) that differ between the
 * `ne` elements at a and at b. */
static void count_diff(const void *a, const void *b, int64_t ne, int elem_bits, int n_frac,
                       int64_t c[2]) {
    const uint32_t frac = (1u << n_frac) - 1u;
    for (int64_t j = 0; j < ne; j++) {
        uint32_t d = elem_bits == 16 ? (uint32_t)(((const uint16_t *)a)[j] ^ ((const uint16_t *)b)[j])
                                     : ((const uint32_t *)a)[j] ^ ((const uint32_t *)b)[j];
        c[0] += __builtin_popcount(d >> n_frac);
        c[1] += __builtin_popcount(d & frac);
    }
}

/* y[g_begin * G .. g_end * G) (clipped to n elements) = flip(x) then zero-out.
 *  x, y: elements (may be the same buffer); elem_bits 16 or 32; n_exp / n_frac: bits per
 *  element of each field; t_e (n_e entries), t_f (n_f): the gap tables (T - 1), a field whose
 *  last entry is < 0 never flips there; p_e, p_f: P of a dense field (0: sparse); flips: 0 to
 *  skip the sampling; keep_below: with zero != 0, an element is kept iff its magnitude bits
 *  are < keep_below; mask: NULL or one byte per group (bit j = element j zeroed); counts:
 *  NULL or int64 [sign/exponent bits flipped, mantissa bits flipped, elements zeroed] that
 *  this call adds to (atomically, once per call: calls on disjoint ranges may run at once). */
int pbf_flip(const void *x, void *y, int64_t n, int elem_bits, int n_exp, int n_frac,
             const int64_t *t_e, int64_t n_e, const int64_t *t_f, int64_t n_f, uint64_t p_e,
             uint64_t p_f, int flips, int64_t g_begin, int64_t g_end, uint32_t call,
             uint32_t k0, uint32_t k1, int zero, uint32_t keep_below, uint8_t *mask,
             int64_t *counts) {
    const int G = 128 / elem_bits;
    const size_t es = (size_t)elem_bits / 8;
    const int64_t last_e = t_e[n_e - 1], last_f = t_f[n_f - 1];
    int64_t c[3] = {0, 0, 0};
    uint32_t before[BLOCK * 4]; /* the block's bits before its flips (counts only) */
    const uint32_t frac_lanes = ((1u << n_frac) - 1u) * (elem_bits == 16 ? 0x10001u : 1u);
    uint8_t hits[BLOCK];
    uint32_t less[BLOCK][4];
    const int dense = flips && (p_e != 0 || p_f != 0);
    flips = flips && (last_e >= 0 || last_f >= 0);
    for (int64_t g0 = g_begin; g0 < g_end; g0 += BLOCK) {
        int nb = (int)(g_end - g0 < BLOCK ? g_end - g0 : BLOCK);
        int64_t e0 = g0 * G, e1 = (g0 + nb) * G;
        if (e1 > n) e1 = n;
        char *yb = (char *)y + (size_t)e0 * es;
        if (x != y) memcpy(yb, (const char *)x + (size_t)e0 * es, (size_t)(e1 - e0) * es);
        if (counts && dense) memcpy(before, yb, (size_t)(e1 - e0) * es);
        if (dense) {
            dense_block((uint64_t)g0, nb, call, k0, k1, p_e, p_f, ~frac_lanes, frac_lanes, less);
            for (int i = 0; i < nb; i++) {
                int64_t first = (g0 + i) * G;
                int valid = (int)(n - first < G ? n - first : G);
                for (int e = 0; e < valid; e++) {
                    if (elem_bits == 16)
                        ((uint16_t *)yb)[i * G + e] ^= (uint16_t)(less[i][e >> 1] >> ((e & 1) * 16));
                    else
                        ((uint32_t *)yb)[i * G + e] ^= less[i][e];
                }
            }
        }
        if (flips) {
            first_draws((uint64_t)g0, call, k0, k1, last_e, last_f, hits);
            for (int i = 0; i < nb; i++) {
                if (!hits[i]) continue;
                uint64_t g = (uint64_t)(g0 + i);
                int64_t first = (g0 + i) * G;
                int valid = (int)(n - first < G ? n - first : G);
                char *elems = (char *)y + (size_t)first * es;
                if (counts && !dense) memcpy(before + i * 4, elems, (size_t)valid * es);
                if (hits[i] & 1)
                    field_flips(g, 0, uniform(g, 0, call, k0, k1, 0), t_e, n_e, n_exp,
                                elem_bits - n_exp, elem_bits, elems, valid, call, k0, k1);
                if (hits[i] & 2)
                    field_flips(g, 1, uniform(g, 0, call, k0, k1, 1), t_f, n_f, n_frac, 0,
                                elem_bits, elems, valid, call, k0, k1);
                if (counts && !dense) count_diff(before + i * 4, elems, valid, elem_bits, n_frac, c);
            }
        }
        if (counts && dense) count_diff(before, yb, e1 - e0, elem_bits, n_frac, c);
        if (zero) c[2] += zero_out(yb, e1 - e0, elem_bits, G, keep_below, mask ? mask + g0 : 0, nb);
    }
    if (counts)
        for (int k = 0; k < 3; k++) __atomic_fetch_add(counts + k, c[k], __ATOMIC_RELAXED);
    return 0;
}

/* y[g_begin * G .. g_end * G) (clipped to n elements) = x with its burst events, then the
 * zero-out (burst_sampling.py): gaps (G entries, T - 1 of the gap table at the event rate; a
 * last entry < 0: no event), thr (n_len length thresholds), k_min, the field's lowest bit
 * `shift` and `width`; zero, keep_below as in pbf_flip (no mask). */
int pbf_burst(const void *x, void *y, int64_t n, int elem_bits, const int64_t *gaps,
              const int64_t *thr, int k_min, int n_len, int shift, int width, int64_t g_begin,
              int64_t g_end, uint32_t call, uint32_t k0, uint32_t k1, int zero,
              uint32_t keep_below) {
    const int G = 128 / elem_bits;
    const size_t es = (size_t)elem_bits / 8;
    const int64_t last = gaps[G - 1];
    uint8_t hits[BLOCK];
    for (int64_t g0 = g_begin; g0 < g_end; g0 += BLOCK) {
        int nb = (int)(g_end - g0 < BLOCK ? g_end - g0 : BLOCK);
        int64_t e0 = g0 * G, e1 = (g0 + nb) * G;
        if (e1 > n) e1 = n;
        char *yb = (char *)y + (size_t)e0 * es;
        if (x != y) memcpy(yb, (const char *)x + (size_t)e0 * es, (size_t)(e1 - e0) * es);
        if (last >= 0) {
            first_draws((uint64_t)g0, call, k0, k1, last, -1, hits);
            for (int i = 0; i < nb; i++) {
                if (!hits[i]) continue;
                uint64_t g = (uint64_t)(g0 + i);
                int64_t pos = 0;
                for (uint32_t it = 0;; it++) {
                    uint32_t w[4] = {(uint32_t)g, (uint32_t)(g >> 32), it, call};
                    philox(w, k0, k1);
                    int64_t u = (int64_t)((((uint64_t)(w[0] >> 1)) << 32) | w[1]);
                    int64_t q = pos + count_below(gaps, G, u);
                    if (q >= G) break;
                    int k = k_min;
                    for (int j = 0; j < n_len; j++) k += thr[j] <= (int64_t)w[3];
                    int start = shift + (int)(((uint64_t)w[2] * (uint64_t)(width + 1 - k)) >> 32);
                    uint64_t m = ((((uint64_t)1) << k) - 1) << start;
                    if ((int64_t)g * G + q < n) {
                        if (elem_bits == 16)
                            ((uint16_t *)yb)[i * G + q] ^= (uint16_t)m;
                        else
                            ((uint32_t *)yb)[i * G + q] ^= (uint32_t)m;
                    }
                    pos = q + 1;
                    if (pos >= G) break;
                }
            }
        }
        if (zero) zero_out(yb, e1 - e0, elem_bits, G, keep_below, 0, nb);
    }
    return 0;
}
