/* One instruction-set variant of the small-M tiles, included once per variant by
 * small_gemm.c with these defined:
 *   VARIANT  name suffix (avx512, avx2, neon, generic)
 *   TARGET   function attribute list for that ISA (empty for the baseline)
 *   VW       floats per vector
 *   FMADD(a, b, c)  a * b + c for that ISA's vector type (fused where the ISA has it)
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

#define TILE(NB, MB)                                                                   \
    TARGET static void FN(tile_##NB##_##MB)(const struct job *j, int n, int m) {       \
        const float *A = j->A + (size_t)m * j->lda, *W = j->B + (size_t)n * j->ldb;    \
        FN(vec) s[NB][MB];                                                             \
        for (int r = 0; r < NB; r++)                                                   \
            for (int c = 0; c < MB; c++) s[r][c] = (FN(vec)){0};                       \
        int k = 0;                                                                     \
        for (; k + VW <= j->K; k += VW) {                                              \
            FN(vec) a[MB];                                                             \
            for (int c = 0; c < MB; c++) a[c] = *(const FN(vec) *)(A + (size_t)c * j->lda + k); \
            for (int r = 0; r < NB; r++) {                                             \
                FN(vec) w = *(const FN(vec) *)(W + (size_t)r * j->ldb + k);            \
                for (int c = 0; c < MB; c++) s[r][c] = FMADD(a[c], w, s[r][c]);        \
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

TILE(4, 4)
TILE(4, 1)
TILE(1, 4)
TILE(1, 1)

/* Weight rows [n0, n1) against all M activation rows. From 4 activation rows, tiles of 4
 * weight rows reuse every load 4 times. Below, a weight row serves 1-3 outputs and the
 * product is a pure read of the weights: rows one after another are one sequential stream,
 * which reads faster than 4 interleaved ones; from 4 rows on, one-row tiles were much
 * slower (benchmarks/NOTES.md, "One stream per thread"). */
TARGET static void FN(run_rows)(const struct job *j, int n0, int n1) {
    int n = n0;
    for (; j->M >= 4 && n + 4 <= n1; n += 4) {
        int m = 0;
        for (; m + 4 <= j->M; m += 4) FN(tile_4_4)(j, n, m);
        for (; m < j->M; m++) FN(tile_4_1)(j, n, m);
    }
    for (; n < n1; n++) {
        int m = 0;
        for (; m + 4 <= j->M; m += 4) FN(tile_1_4)(j, n, m);
        for (; m < j->M; m++) FN(tile_1_1)(j, n, m);
    }
}

#undef TILE
#undef FN
#undef CAT2
#undef CAT2_
