/* x86 tiles of quant_gemm.c: AVX512-VNNI (64 int8 lanes) and AVX2 (32), each compiled
 * with a function target attribute and chosen at run time.
 *
 * A tile is NR weight rows x MR activation rows. Per SIMD chunk it forms each pair's
 * integer dot products, converts them to float and adds them times s[n,g] * d[m,block]
 * into that pair's float vector; after the last group the bias term (float sums of x
 * times b) is added into the same vector, which is then summed horizontally. Each pair
 * goes through the same operations in every tile shape, so results are batch-invariant. */

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
#define T256 __attribute__((target("avx2,fma,f16c")))

static int has_avx512_vnni(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

static int has_avx2(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

/* A row block's scales and biases as float32, vectorised for half inputs. */
T256 static void row_params_f16c(const struct qjob *j, int n, float *s, float *b) {
    if (!j->f16) {
        row_params(j, n, s, b);
        return;
    }
    size_t at = (size_t)n * j->groups;
    const uint16_t *hs = (const uint16_t *)j->scales + at, *hb = (const uint16_t *)j->biases + at;
    int g = 0;
    for (; g + 8 <= j->groups; g += 8) {
        _mm256_storeu_ps(s + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(hs + g))));
        _mm256_storeu_ps(b + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(hb + g))));
    }
    for (; g < j->groups; g++) {
        s[g] = _cvtsh_ss(hs[g]);
        b[g] = _cvtsh_ss(hb[g]);
    }
}

/* Rows are read a few hundred bytes each, too short a stream for the hardware
 * prefetcher to ramp up on: ask for the same chunk of the rows AHEAD rows on, so a
 * weight matrix larger than the caches (the LM head) streams at memory bandwidth.
 * Prefetches past the last row are harmless (they never fault). */
#ifndef AHEAD
#define AHEAD 16
#endif
#define PREFETCH_AHEAD(j, n, NR, k)                                                          \
    for (int p = 0; p < NR; p++)                                                             \
        __builtin_prefetch((j)->w + (size_t)((n) + AHEAD + p) * (j)->row_bytes + (size_t)(k) * (j)->bits / 8)

/* ---- AVX512-VNNI --------------------------------------------------------------------- */

/* 64 weights (two activation blocks) as unsigned bytes: 8-bit rows are bytes already;
 * 4-bit rows unpack 32 bytes to the 64 low nibbles (even elements), then the high ones
 * (odd elements); the activations are permuted to match (permuted(i, 64)). */
T512 static inline __m512i w64_q8(const uint8_t *row, int k) {
    return _mm512_loadu_si512((const void *)(row + k));
}

T512 static inline __m512i w64_q4(const uint8_t *row, int k) {
    __m256i packed = _mm256_loadu_si256((const __m256i *)(row + k / 2));
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(0x0f));
}

/* The two blocks' scales of a 64-wide chunk, in the lanes each block's sums land in:
 * 8-bit, lanes 0-7 and 8-15; 4-bit (evens then odds), lanes 0-3, 8-11 and 4-7, 12-15. */
T512 static inline __m512 pair512_q8(const float *d) {
    const __m512i lanes = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)d))));
}

T512 static inline __m512 pair512_q4(const float *d) {
    const __m512i lanes = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)d))));
}

T512 static inline float finish512(__m512 acc, const float *b, const float *xs, int groups) {
    for (int g = 0; g < groups; g += 16) {
        __mmask16 mask = groups - g >= 16 ? 0xffff : (__mmask16)((1u << (groups - g)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, b + g), _mm512_maskz_loadu_ps(mask, xs + g),
                              acc);
    }
    return _mm512_reduce_add_ps(acc);
}

#define TILE512(BITS, NR, MR)                                                                 \
    T512 static void tile512_q##BITS##_##NR##_##MR(const struct qjob *j, int n, int m,        \
                                                   const float *s, const float *b) {           \
        __m512 acc[NR][MR];                                                                   \
        for (int r = 0; r < NR; r++)                                                          \
            for (int c = 0; c < MR; c++) acc[r][c] = _mm512_setzero_ps();                     \
        const int G = j->G, groups = j->groups;                                               \
        for (int g = 0; g < groups; g += G < 64 ? 2 : 1) {                                    \
            /* A chunk of 64 spans one group, or two of 32: their scales go in the       */   \
            /* lanes of their activation blocks, as the blocks' scales do.               */   \
            __m512 sv[NR];                                                                    \
            for (int r = 0; r < NR; r++)                                                      \
                sv[r] = G < 64 ? pair512_q##BITS(s + r * MAX_GROUPS + g)                      \
                               : _mm512_set1_ps(s[r * MAX_GROUPS + g]);                       \
            for (int k = g * G; k < (g + 1) * G || k < g * G + 64; k += 64) {                 \
                PREFETCH_AHEAD(j, n, NR, k);                                                  \
                __m512 dv[MR];                                                                \
                for (int c = 0; c < MR; c++)                                                  \
                    dv[c] = pair512_q##BITS(j->xd + (size_t)(m + c) * j->blocks + k / QK);    \
                __m512i wv[NR];                                                               \
                for (int r = 0; r < NR; r++)                                                  \
                    wv[r] = w64_q##BITS(j->w + (size_t)(n + r) * j->row_bytes, k);            \
                for (int c = 0; c < MR; c++) {                                                \
                    __m512i xv = _mm512_loadu_si512((const void *)(j->x8 + (size_t)(m + c) * j->K + k)); \
                    for (int r = 0; r < NR; r++) {                                            \
                        __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], xv);   \
                        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t),                    \
                                                    _mm512_mul_ps(sv[r], dv[c]), acc[r][c]);  \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < NR; r++)                                                          \
            for (int c = 0; c < MR; c++)                                                      \
                j->out[(size_t)(m + c) * j->N + n + r] =                                      \
                    finish512(acc[r][c], b + r * MAX_GROUPS, j->xsum + (size_t)(m + c) * groups, \
                              groups);                                                        \
    }

/* One chunk of 64 per vpdpbusd, converted and scaled on its own (its lanes 0-7 are
 * one activation block, 8-15 the next), so every pair sees the same operations. */
TILE512(8, 4, 4)
TILE512(8, 4, 1)
TILE512(8, 1, 4)
TILE512(8, 1, 1)
TILE512(4, 4, 4)
TILE512(4, 4, 1)
TILE512(4, 1, 4)
TILE512(4, 1, 1)

#define ROWS(ISA, BITS, TARGET_ATTR)                                                         \
    TARGET_ATTR static void qrows_##ISA##_q##BITS(const struct qjob *j, int n0, int n1) {     \
        float s[NB * MAX_GROUPS], b[NB * MAX_GROUPS]; /* 32 KiB of stack */                 \
        int n = n0;                                                                          \
        for (; n + NB <= n1; n += NB) {                                                      \
            size_t ahead = (size_t)(n + AHEAD) * j->groups * (j->f16 ? 2 : 4);               \
            __builtin_prefetch((const char *)j->scales + ahead);                             \
            __builtin_prefetch((const char *)j->biases + ahead);                             \
            for (int r = 0; r < NB; r++)                                                     \
                row_params_f16c(j, n + r, s + r * MAX_GROUPS, b + r * MAX_GROUPS);           \
            int m = 0;                                                                       \
            for (; m + MB <= j->M; m += MB) tile_##ISA##_q##BITS##_4_4(j, n, m, s, b);       \
            for (; m < j->M; m++) tile_##ISA##_q##BITS##_4_1(j, n, m, s, b);                 \
        }                                                                                    \
        for (; n < n1; n++) {                                                                \
            row_params_f16c(j, n, s, b);                                                     \
            int m = 0;                                                                       \
            for (; m + MB <= j->M; m += MB) tile_##ISA##_q##BITS##_1_4(j, n, m, s, b);       \
            for (; m < j->M; m++) tile_##ISA##_q##BITS##_1_1(j, n, m, s, b);                 \
        }                                                                                    \
    }

#define tile_avx512_q8_4_4 tile512_q8_4_4
#define tile_avx512_q8_4_1 tile512_q8_4_1
#define tile_avx512_q8_1_4 tile512_q8_1_4
#define tile_avx512_q8_1_1 tile512_q8_1_1
#define tile_avx512_q4_4_4 tile512_q4_4_4
#define tile_avx512_q4_4_1 tile512_q4_4_1
#define tile_avx512_q4_1_4 tile512_q4_1_4
#define tile_avx512_q4_1_1 tile512_q4_1_1
ROWS(avx512, 8, T512)
ROWS(avx512, 4, T512)

/* ---- AVX2 ----------------------------------------------------------------------------- */

/* 32 weights. 8-bit: q - 128 as signed bytes, so maddubs (u8 x s8, pairs summed in
 * int16) cannot saturate: |q - 128| * 127 * 2 <= 32512; the 128 * sum(x8) is added
 * back per group. 4-bit: nibbles are at most 15, so they go in unsigned as they are. */
T256 static inline __m256i w32_q8(const uint8_t *row, int k) {
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(row + k)), _mm256_set1_epi8((char)0x80));
}

T256 static inline __m256i w32_q4(const uint8_t *row, int k) {
    __m128i packed = _mm_loadu_si128((const __m128i *)(row + k / 2));
    __m128i low = _mm_and_si128(packed, _mm_set1_epi8(0x0f));
    __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0f));
    return _mm256_set_m128i(high, low);
}

T256 static inline __m256i dot32_q8(__m256i w, __m256i x) {
    __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

T256 static inline __m256i dot32_q4(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}

T256 static inline float finish256(__m256 acc, const float *b, const float *xs, int groups) {
    for (int g = 0; g < groups; g += 8) {
        int left = groups - g < 8 ? groups - g : 8;
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        acc = _mm256_fmadd_ps(_mm256_maskload_ps(b + g, mask), _mm256_maskload_ps(xs + g, mask), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* The 8-bit offset (128 * sum of the block's x8) joins lane 0 before conversion. */
#define OFFSET_q8(j, blk) _mm256_setr_epi32(128 * (j)->x8sum[blk], 0, 0, 0, 0, 0, 0, 0)
#define OFFSET_q4(j, blk) _mm256_setzero_si256()

#define TILE256(BITS, NR, MR)                                                                 \
    T256 static void tile256_q##BITS##_##NR##_##MR(const struct qjob *j, int n, int m,        \
                                                   const float *s, const float *b) {           \
        __m256 acc[NR][MR];                                                                   \
        for (int r = 0; r < NR; r++)                                                          \
            for (int c = 0; c < MR; c++) acc[r][c] = _mm256_setzero_ps();                     \
        const int G = j->G, groups = j->groups;                                               \
        for (int g = 0; g < groups; g++) {                                                    \
            __m256 sv[NR];                                                                    \
            for (int r = 0; r < NR; r++) sv[r] = _mm256_set1_ps(s[r * MAX_GROUPS + g]);       \
            for (int k = g * G; k < (g + 1) * G; k += QK) {                                   \
                PREFETCH_AHEAD(j, n, NR, k);                                                  \
                __m256i wv[NR];                                                               \
                for (int r = 0; r < NR; r++)                                                  \
                    wv[r] = w32_q##BITS(j->w + (size_t)(n + r) * j->row_bytes, k);            \
                for (int c = 0; c < MR; c++) {                                                \
                    size_t blk = (size_t)(m + c) * j->blocks + k / QK;                        \
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(j->x8 + (size_t)(m + c) * j->K + k)); \
                    __m256 dv = _mm256_set1_ps(j->xd[blk]);                                   \
                    __m256i offset = OFFSET_q##BITS(j, blk);                                  \
                    for (int r = 0; r < NR; r++) {                                            \
                        __m256i t = _mm256_add_epi32(offset, dot32_q##BITS(wv[r], xv));       \
                        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t),                    \
                                                    _mm256_mul_ps(sv[r], dv), acc[r][c]);     \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < NR; r++)                                                          \
            for (int c = 0; c < MR; c++)                                                      \
                j->out[(size_t)(m + c) * j->N + n + r] =                                      \
                    finish256(acc[r][c], b + r * MAX_GROUPS, j->xsum + (size_t)(m + c) * groups, \
                              groups);                                                        \
    }

TILE256(8, 4, 4)
TILE256(8, 4, 1)
TILE256(8, 1, 4)
TILE256(8, 1, 1)
TILE256(4, 4, 4)
TILE256(4, 4, 1)
TILE256(4, 1, 4)
TILE256(4, 1, 1)

#define tile_avx2_q8_4_4 tile256_q8_4_4
#define tile_avx2_q8_4_1 tile256_q8_4_1
#define tile_avx2_q8_1_4 tile256_q8_1_4
#define tile_avx2_q8_1_1 tile256_q8_1_1
#define tile_avx2_q4_4_4 tile256_q4_4_4
#define tile_avx2_q4_4_1 tile256_q4_4_1
#define tile_avx2_q4_1_4 tile256_q4_1_4
#define tile_avx2_q4_1_1 tile256_q4_1_1
ROWS(avx2, 8, T256)
ROWS(avx2, 4, T256)
