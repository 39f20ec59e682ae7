/* x86 tiles of quant_gemm.c for the packed layout (quant_gemm.h): a SIMD lane per
 * weight row. One load holds a word (4 8-bit or 8 4-bit weights) of each of 16 rows;
 * it is multiplied by the same 4 activations in every lane (vpdpbusd with a broadcast),
 * so a lane's int32 sum is its row's block dot product. Per activation block of 32 the
 * sums are converted once and added times s[n,g] * d[m,block]; the bias term (b times
 * the float sums of x) follows the last group. No horizontal sum: 16 outputs per store.
 *
 * Against the row-major tiles (quant_gemm_x86.h) this does one float step per 32
 * weights instead of per 2, and a block of 16 rows is one contiguous stream, which the
 * hardware prefetcher follows where four interleaved short rows defeated it. The first
 * pass over a tile (m == 0) also prefetches the next tile's blocks into L2, one line per
 * line read: streams that restart every tile otherwise wait on memory at each start
 * (benchmarks/NOTES.md, "Prefetching the tile after next"). Prefetches never fault, so
 * the last tile's run past the end of the weights is harmless.
 *
 * A tile is R blocks of 16 rows x C activation rows; each (row, activation row) pair
 * goes through the same operations in every tile shape, so results are batch-invariant.
 * 4-bit words hold elements 0..7 of a span as nibbles: low nibbles are elements 0,2,4,6,
 * high ones 1,3,5,7, and the activations are permuted to match (permuted(i, 8)). */

enum { LANES = 16, WORD_BYTES = 4 };

/* Bytes of one word of all 16 rows of a block: 64. A block's weights: words * 64. */
#define BLOCK_WORD_BYTES (LANES * WORD_BYTES)

/* ---- AVX512-VNNI --------------------------------------------------------------------- */

T512 static inline __m512 lanes512(const struct qjob *j, const void *p, size_t at) {
    if (j->f16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + at)));
    return _mm512_loadu_ps((const float *)p + at);
}

T512 static inline __m512i broadcast4(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, sizeof v);
    return _mm512_set1_epi32(v);
}

/* One word of 16 rows against activation row c's matching elements. */
#define DOT512_q8(isum, wv, xp) isum = _mm512_dpbusd_epi32(isum, wv, broadcast4(xp))
#define DOT512_q4(isum, wv, xp)                                                               \
    isum = _mm512_dpbusd_epi32(                                                               \
        _mm512_dpbusd_epi32(isum, _mm512_and_si512(wv, nibble), broadcast4(xp)),              \
        _mm512_and_si512(_mm512_srli_epi16(wv, 4), nibble), broadcast4((xp) + 4))

#define PTILE512(BITS, R, C)                                                                  \
    T512 static void ptile512_q##BITS##_##R##_##C(const struct qjob *j, int blk0, int m) {    \
        const int per_word = 32 / BITS, words = j->K / per_word;                              \
        const int groups = j->groups, per_group = j->G / QK;                                  \
        const __m512i nibble = _mm512_set1_epi8(0x0f);                                        \
        (void)nibble;                                                                         \
        const uint8_t *wb[R];                                                                 \
        for (int r = 0; r < R; r++) wb[r] = j->w + (size_t)(blk0 + r) * words * BLOCK_WORD_BYTES; \
        const size_t ahead = (size_t)R * words * BLOCK_WORD_BYTES; /* the next tile's blocks */ \
        __m512 acc[R][C];                                                                     \
        for (int r = 0; r < R; r++)                                                           \
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();                      \
        for (int g = 0; g < groups; g++) {                                                    \
            __m512 sv[R];                                                                     \
            for (int r = 0; r < R; r++)                                                       \
                sv[r] = lanes512(j, j->scales, ((size_t)(blk0 + r) * groups + g) * LANES);    \
            for (int blk = g * per_group; blk < (g + 1) * per_group; blk++) {                 \
                __m512i isum[R][C];                                                           \
                for (int r = 0; r < R; r++)                                                   \
                    for (int c = 0; c < C; c++) isum[r][c] = _mm512_setzero_si512();          \
                for (int i = blk * QK / per_word; i < (blk + 1) * QK / per_word; i++) {       \
                    __m512i wv[R];                                                            \
                    for (int r = 0; r < R; r++) {                                             \
                        const uint8_t *at = wb[r] + (size_t)i * BLOCK_WORD_BYTES;             \
                        if (m == 0) _mm_prefetch((const char *)(at + ahead), _MM_HINT_T1);   \
                        wv[r] = _mm512_loadu_si512((const void *)at);                         \
                    }                                                                         \
                    for (int c = 0; c < C; c++) {                                             \
                        const int8_t *xp = j->x8 + (size_t)(m + c) * j->K + (size_t)i * per_word; \
                        for (int r = 0; r < R; r++) DOT512_q##BITS(isum[r][c], wv[r], xp);   \
                    }                                                                         \
                }                                                                             \
                for (int c = 0; c < C; c++) {                                                 \
                    __m512 dv = _mm512_set1_ps(j->xd[(size_t)(m + c) * j->blocks + blk]);     \
                    for (int r = 0; r < R; r++)                                               \
                        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r][c]),           \
                                                    _mm512_mul_ps(sv[r], dv), acc[r][c]);     \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        for (int g = 0; g < groups; g++)                                                      \
            for (int r = 0; r < R; r++) {                                                     \
                __m512 bv = lanes512(j, j->biases, ((size_t)(blk0 + r) * groups + g) * LANES); \
                for (int c = 0; c < C; c++)                                                   \
                    acc[r][c] = _mm512_fmadd_ps(                                              \
                        bv, _mm512_set1_ps(j->xsum[(size_t)(m + c) * groups + g]), acc[r][c]); \
            }                                                                                 \
        for (int r = 0; r < R; r++) {                                                         \
            int n = (blk0 + r) * LANES, left = j->N - n;                                      \
            __mmask16 mask = left >= LANES ? 0xffff : (__mmask16)((1u << left) - 1);          \
            for (int c = 0; c < C; c++)                                                       \
                _mm512_mask_storeu_ps(j->out + (size_t)(m + c) * j->N + n, mask, acc[r][c]);  \
        }                                                                                     \
    }

PTILE512(8, 2, 4)
PTILE512(8, 2, 1)
PTILE512(8, 1, 4)
PTILE512(8, 1, 1)
PTILE512(4, 2, 4)
PTILE512(4, 2, 1)
PTILE512(4, 1, 4)
PTILE512(4, 1, 1)

/* Rows n0..n1 (n0 a multiple of 16): pairs of blocks, then a last single block. A
 * product of fewer rows than a column tile (decode at batch 1-3) is a pure read of the
 * weights and takes one block at a time: one sequential stream per thread, which reads
 * faster than the two or four interleaved streams of wider tiles (benchmarks/NOTES.md,
 * "One stream per thread"). */
#define PROWS(ISA, BITS, TARGET_ATTR, CW)                                                    \
    TARGET_ATTR static void prows_##ISA##_q##BITS(const struct qjob *j, int n0, int n1) {     \
        int blk = n0 / LANES, end = (n1 + LANES - 1) / LANES;                                \
        if (j->M < CW)                                                                       \
            for (; blk < end; blk++)                                                         \
                for (int m = 0; m < j->M; m++) ptile_##ISA##_q##BITS##_1_1(j, blk, m);       \
        for (; blk + 2 <= end; blk += 2) {                                                   \
            int m = 0;                                                                       \
            for (; m + CW <= j->M; m += CW) ptile_##ISA##_q##BITS##_2_##CW(j, blk, m);       \
            for (; m < j->M; m++) ptile_##ISA##_q##BITS##_2_1(j, blk, m);                    \
        }                                                                                    \
        for (; blk < end; blk++) {                                                           \
            int m = 0;                                                                       \
            for (; m + CW <= j->M; m += CW) ptile_##ISA##_q##BITS##_1_##CW(j, blk, m);       \
            for (; m < j->M; m++) ptile_##ISA##_q##BITS##_1_1(j, blk, m);                    \
        }                                                                                    \
    }

#define ptile_avx512_q8_2_4 ptile512_q8_2_4
#define ptile_avx512_q8_2_1 ptile512_q8_2_1
#define ptile_avx512_q8_1_4 ptile512_q8_1_4
#define ptile_avx512_q8_1_1 ptile512_q8_1_1
#define ptile_avx512_q4_2_4 ptile512_q4_2_4
#define ptile_avx512_q4_2_1 ptile512_q4_2_1
#define ptile_avx512_q4_1_4 ptile512_q4_1_4
#define ptile_avx512_q4_1_1 ptile512_q4_1_1
PROWS(avx512, 8, T512, 4)
PROWS(avx512, 4, T512, 4)

/* ---- AVX2 ------------------------------------------------------------------------------ */

/* 8 lanes: a block's 16 rows are two halves of 8 (R below counts halves, always 2).
 * 8-bit: q - 128 as signed bytes so maddubs cannot saturate (see quant_gemm_x86.h); the
 * block's 128 * sum(x8) is added back to every lane before conversion. */

T256 static inline __m256 lanes256(const struct qjob *j, const void *p, size_t at) {
    if (j->f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + at)));
    return _mm256_loadu_ps((const float *)p + at);
}

T256 static inline __m256i broadcast4_256(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, sizeof v);
    return _mm256_set1_epi32(v);
}

#define DOT256_q8(isum, wv, xp)                                                               \
    do {                                                                                      \
        __m256i ws = _mm256_xor_si256(wv, _mm256_set1_epi8((char)0x80));                     \
        __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(broadcast4_256(xp), ws)); \
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));           \
    } while (0)
#define DOT256_q4(isum, wv, xp)                                                               \
    do {                                                                                      \
        __m256i lo = _mm256_and_si256(wv, _mm256_set1_epi8(0x0f));                           \
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), _mm256_set1_epi8(0x0f));     \
        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4_256(xp)),           \
                                     _mm256_maddubs_epi16(hi, broadcast4_256((xp) + 4)));    \
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));           \
    } while (0)
#define OFFSET256_q8(j, m, blk) _mm256_set1_epi32(128 * (j)->x8sum[(size_t)(m) * (j)->blocks + (blk)])
#define OFFSET256_q4(j, m, blk) _mm256_setzero_si256()

#define PTILE256(BITS, C)                                                                     \
    T256 static void ptile256_q##BITS##_##C(const struct qjob *j, int blk0, int m) {          \
        const int per_word = 32 / BITS, words = j->K / per_word;                              \
        const int groups = j->groups, per_group = j->G / QK;                                  \
        const uint8_t *wb = j->w + (size_t)blk0 * words * BLOCK_WORD_BYTES;                   \
        const size_t ahead = (size_t)words * BLOCK_WORD_BYTES; /* the next block */           \
        __m256 acc[2][C];                                                                     \
        for (int h = 0; h < 2; h++)                                                           \
            for (int c = 0; c < C; c++) acc[h][c] = _mm256_setzero_ps();                      \
        for (int g = 0; g < groups; g++) {                                                    \
            __m256 sv[2];                                                                     \
            for (int h = 0; h < 2; h++)                                                       \
                sv[h] = lanes256(j, j->scales, ((size_t)blk0 * groups + g) * LANES + 8 * h);  \
            for (int blk = g * per_group; blk < (g + 1) * per_group; blk++) {                 \
                __m256i isum[2][C];                                                           \
                for (int h = 0; h < 2; h++)                                                   \
                    for (int c = 0; c < C; c++) isum[h][c] = OFFSET256_q##BITS(j, m + c, blk); \
                for (int i = blk * QK / per_word; i < (blk + 1) * QK / per_word; i++)         \
                    for (int h = 0; h < 2; h++) {                                             \
                        const uint8_t *at = wb + (size_t)i * BLOCK_WORD_BYTES + 32 * h;       \
                        if (m == 0 && h == 0) _mm_prefetch((const char *)(at + ahead), _MM_HINT_T1); \
                        __m256i wv = _mm256_loadu_si256((const __m256i *)at);                 \
                        for (int c = 0; c < C; c++)                                           \
                            DOT256_q##BITS(isum[h][c], wv,                                    \
                                           j->x8 + (size_t)(m + c) * j->K + (size_t)i * per_word); \
                    }                                                                         \
                for (int c = 0; c < C; c++) {                                                 \
                    __m256 dv = _mm256_set1_ps(j->xd[(size_t)(m + c) * j->blocks + blk]);     \
                    for (int h = 0; h < 2; h++)                                               \
                        acc[h][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[h][c]),           \
                                                    _mm256_mul_ps(sv[h], dv), acc[h][c]);     \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        for (int g = 0; g < groups; g++)                                                      \
            for (int h = 0; h < 2; h++) {                                                     \
                __m256 bv = lanes256(j, j->biases, ((size_t)blk0 * groups + g) * LANES + 8 * h); \
                for (int c = 0; c < C; c++)                                                   \
                    acc[h][c] = _mm256_fmadd_ps(                                              \
                        bv, _mm256_set1_ps(j->xsum[(size_t)(m + c) * groups + g]), acc[h][c]); \
            }                                                                                 \
        for (int h = 0; h < 2; h++) {                                                         \
            int n = blk0 * LANES + 8 * h, left = j->N - n;                                    \
            if (left <= 0) break;                                                             \
            __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left),                        \
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));     \
            for (int c = 0; c < C; c++)                                                       \
                _mm256_maskstore_ps(j->out + (size_t)(m + c) * j->N + n, mask, acc[h][c]);    \
        }                                                                                     \
    }

PTILE256(8, 2)
PTILE256(8, 1)
PTILE256(4, 2)
PTILE256(4, 1)

/* One block at a time (a "pair" of blocks is two calls: the same operations per pair). */
#define ptile_avx2_q8_2_2(j, blk, m) (ptile256_q8_2(j, blk, m), ptile256_q8_2(j, (blk) + 1, m))
#define ptile_avx2_q8_2_1(j, blk, m) (ptile256_q8_1(j, blk, m), ptile256_q8_1(j, (blk) + 1, m))
#define ptile_avx2_q8_1_2 ptile256_q8_2
#define ptile_avx2_q8_1_1 ptile256_q8_1
#define ptile_avx2_q4_2_2(j, blk, m) (ptile256_q4_2(j, blk, m), ptile256_q4_2(j, (blk) + 1, m))
#define ptile_avx2_q4_2_1(j, blk, m) (ptile256_q4_1(j, blk, m), ptile256_q4_1(j, (blk) + 1, m))
#define ptile_avx2_q4_1_2 ptile256_q4_2
#define ptile_avx2_q4_1_1 ptile256_q4_1
PROWS(avx2, 8, T256, 2)
PROWS(avx2, 4, T256, 2)
