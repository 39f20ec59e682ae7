/* One instruction-set variant of the small-M tiles, included once per variant by
 * small_gemm.c with these defined:
 *   VARIANT  name suffix (avx512, avx2, neon, generic)
 *   TARGET   function attribute list for that ISA (empty for the baseline)
 *   VW       floats per vector
 *   FMADD(a, b, c)  a * b + c for that ISA's vector type (fused where the ISA has it)
 *   KEEP_IN_REGISTER(v)  an empty asm that makes v opaque (or nothing): one load per
 *                   activation vector, which the compiler would otherwise fold into each
 *                   of the multiply-adds that use it (NB loads instead of one)
 *
 * Every output is one accumulator summed over k in order, then the same horizontal
 * sum and scalar tail: identical arithmetic whichever tile computes it, so a row's
 * result does not depend on how many rows are batched with it. */

#define CAT2_(a, b) a##_##b
#define CAT2(a, b) CAT2_(a, b)
#define FN(name) CAT2(name, VARIANT)

typedef float FN(vec) __attribute__((vector_size(VW * 4), aligned(4), may_alias));

/* Halves added pairwise down to one lane: t[i] += t[i + w] for w = VW/2, ..., 1, in
 * registers (a store to the stack and scalar adds cost a quarter of a K = 896 tile). */
typedef float FN(v4) __attribute__((vector_size(16)));
typedef float FN(v2) __attribute__((vector_size(8)));
TARGET static inline float FN(hsum)(FN(vec) s) {
#if VW == 16
    typedef float v8 __attribute__((vector_size(32)));
    v8 a = __builtin_shufflevector(s, s, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(s, s, 8, 9, 10, 11, 12, 13, 14, 15);
    FN(v4) b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
#elif VW == 8
    FN(v4) b = __builtin_shufflevector(s, s, 0, 1, 2, 3) + __builtin_shufflevector(s, s, 4, 5, 6, 7);
#elif VW == 4
    FN(v4) b = s;
#else
#error "hsum: VW must be 4, 8 or 16"
#endif
    FN(v2) c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
    return c[0] + c[1];
}

/* NB weight rows x MB activation rows. With `ahead`, each k step also prefetches (to L2)
 * the same column of the rows 2 * NB further on: the weights of the tile after next, so a
 * tile's rows arrive while the one before is computed. The hardware prefetcher alone
 * leaves streams that restart every tile waiting on memory at each start (benchmarks/
 * NOTES.md, "Prefetching the tile after next"). A prefetch past the end never faults. */
#define TILE(NB, MB)                                                                   \
    TARGET static void FN(tile_##NB##_##MB)(const struct job *j, int n, int m, int ahead) { \
        const float *A = j->A + (size_t)m * j->lda, *W = j->B + (size_t)n * j->ldb;    \
        FN(vec) s[NB][MB];                                                             \
        for (int r = 0; r < NB; r++)                                                   \
            for (int c = 0; c < MB; c++) s[r][c] = (FN(vec)){0};                       \
        int k = 0;                                                                     \
        for (; k + VW <= j->K; k += VW) {                                              \
            FN(vec) w[NB]; /* the weights held, one activation row at a time: NB x MB  \
                              accumulators + NB + 1 registers, no spill at 3 x 8 */    \
            for (int r = 0; r < NB; r++) {                                             \
                const float *w_row = W + (size_t)r * j->ldb + k;                       \
                if (ahead) __builtin_prefetch(w_row + (size_t)(2 * NB) * j->ldb, 0, 2); \
                w[r] = *(const FN(vec) *)w_row;                                        \
            }                                                                          \
            for (int c = 0; c < MB; c++) {                                             \
                FN(vec) a = *(const FN(vec) *)(A + (size_t)c * j->lda + k);            \
                KEEP_IN_REGISTER(a);                                                   \
                for (int r = 0; r < NB; r++) s[r][c] = FMADD(a, w[r], s[r][c]);        \
            }                                                                          \
        }                                                                              \
        for (int r = 0; r < NB; r++)                                                   \
            for (int c = 0; c < MB; c++) {                                             \
                float t = FN(hsum)(s[r][c]);                                           \
                for (int i = k; i < j->K; i++)                                         \
                    t += A[(size_t)c * j->lda + i] * W[(size_t)r * j->ldb + i];        \
                store(j, n + r, m + c, t);                                             \
            }                                                                          \
    }

/* Weight rows per tile from 4 activation rows: as many as the accumulators
 * (TILE_ROWS x 8) and loads leave registers for (32 zmm; 16 ymm or xmm otherwise). */
#if VW == 16
#define TILE_ROWS 3
TILE(3, 8)
TILE(3, 4)
TILE(3, 1)
#else
#define TILE_ROWS 2
TILE(2, 8)
TILE(2, 4)
TILE(2, 1)
#endif
TILE(1, 4)
TILE(1, 1)

#define WIDE_TILE_(rows, cols) FN(tile_##rows##_##cols)
#define WIDE_TILE(rows, cols) WIDE_TILE_(rows, cols)

/* Weight rows [n0, n1) against all M activation rows. From 4 activation rows, tiles of
 * TILE_ROWS weight rows reuse every weight load for up to 8 rows; the first pass over a
 * tile's rows (m = 0) streams them from memory and prefetches ahead, later passes find
 * them in cache. Below 4 rows, a weight row serves 1-3 outputs and the product is a pure
 * read of the weights: rows one after another are one sequential stream (benchmarks/
 * NOTES.md, "One stream per thread"), prefetched two rows ahead as well. */
TARGET static void FN(run_rows)(const struct job *j, int n0, int n1) {
    int n = n0;
    for (; j->M >= 4 && n + TILE_ROWS <= n1; n += TILE_ROWS) {
        int m = 0;
        for (; m + 8 <= j->M; m += 8) WIDE_TILE(TILE_ROWS, 8)(j, n, m, m == 0);
        for (; m + 4 <= j->M; m += 4) WIDE_TILE(TILE_ROWS, 4)(j, n, m, m == 0);
        for (; m < j->M; m++) WIDE_TILE(TILE_ROWS, 1)(j, n, m, m == 0);
    }
    for (; n < n1; n++) {
        int m = 0;
        for (; m + 4 <= j->M; m += 4) FN(tile_1_4)(j, n, m, m == 0);
        for (; m < j->M; m++) FN(tile_1_1)(j, n, m, m == 0);
    }
}

#undef TILE
#undef TILE_ROWS
#undef WIDE_TILE
#undef WIDE_TILE_
#undef FN
#undef CAT2
#undef CAT2_
