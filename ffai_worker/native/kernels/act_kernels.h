/* Row and elementwise kernels of quant_gemm.c's library: silu(g) * u, row softmax,
 * RMSNorm and the row argmax of greedy decoding (MLX's is one scalar loop per row).
 *
 * Why: MLX's CPU exp is a libm call per element (12-57 ns); a 512-token prefill of a
 * 0.5B model spends over a second in the SiLU gate and the attention softmax alone.
 * Here exp is MLX's own Cephes polynomial (the one cpu_ops.fast_exp spells out, within
 * an ulp of MLX's exp) in SIMD lanes, and the rows are split over the same thread pool
 * as the products. Every element goes through the same operations in any split, so the
 * results do not depend on the batch. Included once, by quant_gemm.c. */

#define EXP_LOG2E 1.442695f
#define EXP_HI 88.0f /* above: +inf, below -EXP_HI: 0, as cpu_ops.fast_exp */

static const float exp_poly[7] = {1.535336188319500e-4f, 1.339887440266574e-3f,
                                  9.618437357674640e-3f, 5.550332471162809e-2f,
                                  2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};

static inline float exp_scalar(float x) {
    if (x != x) return x;
    if (x > EXP_HI) return INFINITY;
    if (x < -EXP_HI) return 0.0f;
    float y = x * EXP_LOG2E, whole = nearbyintf(y), frac = y - whole;
    float poly = exp_poly[0] * frac + exp_poly[1];
    for (int i = 2; i < 7; i++) poly = poly * frac + exp_poly[i];
    uint32_t bits = (uint32_t)((int)whole + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return poly * scale;
}

static inline float silu_scalar(float x) {
    float y = 1.0f / (1.0f + exp_scalar(fabsf(x))); /* sigmoid(-|x|), stable either sign */
    return x * (x < 0 ? y : 1.0f - y);
}

#ifdef HAVE_X86
T512 static inline __m512 exp512(__m512 x) {
    __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E));
    __m512 whole = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 frac = _mm512_sub_ps(y, whole);
    __m512 poly = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(exp_poly[0]), frac), _mm512_set1_ps(exp_poly[1]));
    for (int i = 2; i < 7; i++) poly = _mm512_add_ps(_mm512_mul_ps(poly, frac), _mm512_set1_ps(exp_poly[i]));
    whole = _mm512_min_ps(_mm512_max_ps(whole, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(whole), _mm512_set1_epi32(127)), 23);
    __m512 out = _mm512_mul_ps(poly, _mm512_castsi512_ps(bits));
    out = _mm512_mask_mov_ps(out, _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_HI), _CMP_GT_OQ), _mm512_set1_ps(INFINITY));
    out = _mm512_mask_mov_ps(out, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-EXP_HI), _CMP_LT_OQ), _mm512_setzero_ps());
    return _mm512_mask_mov_ps(out, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x); /* NaN stays */
}

T512 static inline __m512 silu512(__m512 x) {
    __m512 a = _mm512_abs_ps(x);
    __m512 y = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(a)));
    __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mul_ps(x, _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), y), negative, y));
}

T512 static void silu_mul_avx512(const float *g, const float *u, float *out, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(silu512(_mm512_loadu_ps(g + i)), _mm512_loadu_ps(u + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        __m512 v = silu512(_mm512_maskz_loadu_ps(m, g + i));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, u + i)));
    }
}

/* One row: exp(x - max) over the first `valid` columns, 0 past them, then / sum. */
T512 static void softmax_row_avx512(const float *x, float *out, int cols, int valid) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 16 <= valid; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + j));
    __mmask16 tail = (__mmask16)((1u << (valid - j)) - 1);
    mv = _mm512_mask_max_ps(mv, tail, mv, _mm512_maskz_loadu_ps(tail, x + j));
    __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mv)), sv = _mm512_setzero_ps();
    for (j = 0; j + 16 <= valid; j += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), top));
        _mm512_storeu_ps(out + j, e);
        sv = _mm512_add_ps(sv, e);
    }
    __m512 e = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + j), top)));
    _mm512_mask_storeu_ps(out + j, tail, e);
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_add_ps(sv, e)));
    for (j = 0; j + 16 <= valid; j += 16) _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_loadu_ps(out + j), inv));
    _mm512_mask_storeu_ps(out + j, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, out + j), inv));
    for (j = valid; j < cols; j++) out[j] = 0.0f;
}
/* x * (1 / sqrt(mean(x^2) + eps)) * w, as MLX's CPU RMSNorm rounds it (products in order). */
T512 static void rms_norm_row_avx512(const float *x, const float *w, float *out, int cols, float eps) {
    __m512 sv = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= cols; j += 16) {
        __m512 v = _mm512_loadu_ps(x + j);
        sv = _mm512_add_ps(sv, _mm512_mul_ps(v, v));
    }
    __mmask16 tail = (__mmask16)((1u << (cols - j)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(tail, x + j);
    float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(_mm512_add_ps(sv, _mm512_mul_ps(v, v))) / (float)cols + eps);
    __m512 sc = _mm512_set1_ps(scale);
    for (j = 0; j + 16 <= cols; j += 16)
        _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), sc), _mm512_loadu_ps(w + j)));
    _mm512_mask_storeu_ps(out + j, tail,
                          _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, x + j), sc),
                                        _mm512_maskz_loadu_ps(tail, w + j)));
}
#endif

static void rms_norm_row_generic(const float *x, const float *w, float *out, int cols, float eps) {
    float sum = 0.0f;
    for (int j = 0; j < cols; j++) sum += x[j] * x[j];
    float scale = 1.0f / sqrtf(sum / (float)cols + eps);
    for (int j = 0; j < cols; j++) out[j] = x[j] * scale * w[j];
}

static void silu_mul_generic(const float *g, const float *u, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = silu_scalar(g[i]) * u[i];
}

static void softmax_row_generic(const float *x, float *out, int cols, int valid) {
    float top = -INFINITY, sum = 0.0f;
    for (int j = 0; j < valid; j++) top = x[j] > top ? x[j] : top;
    for (int j = 0; j < valid; j++) sum += out[j] = exp_scalar(x[j] - top);
    float inv = 1.0f / sum;
    for (int j = 0; j < valid; j++) out[j] *= inv;
    for (int j = valid; j < cols; j++) out[j] = 0.0f;
}

/* A row's argmax as MLX's: the first NaN if the row has one, else the first of its
 * largest values (equal values, -0.0 and 0.0 included, go to the lower index). */
static int argmax_row_generic(const float *x, int cols) {
    int best = 0;
    for (int i = 1; i < cols; i++)
        if (x[i] > x[best] || (x[i] != x[i] && x[best] == x[best])) best = i;
    return best;
}

#ifdef HAVE_X86
/* 16 lanes each keep their first largest value (strict >); the lanes are then merged by
 * value, lower index first among equals. A row with a NaN takes the scalar loop. */
T512 static int argmax_row_avx512(const float *x, int cols) {
    if (cols < 16) return argmax_row_generic(x, cols);
    __m512 best = _mm512_loadu_ps(x);
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i best_at = at;
    __mmask16 nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
    int i = 16;
    for (; i + 16 <= cols; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        __mmask16 larger = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, larger, v);
        best_at = _mm512_mask_mov_epi32(best_at, larger, at);
    }
    for (int t = i; t < cols; t++) nan |= x[t] != x[t];
    if (nan) return argmax_row_generic(x, cols);
    float value[16];
    int32_t index[16];
    _mm512_storeu_ps(value, best);
    _mm512_storeu_si512(index, best_at);
    int lane = 0;
    for (int l = 1; l < 16; l++)
        if (value[l] > value[lane] || (value[l] == value[lane] && index[l] < index[lane])) lane = l;
    int result = index[lane];
    for (float top = value[lane]; i < cols; i++) /* the tail: later indices, strict > */
        if (x[i] > top) top = x[i], result = i;
    return result;
}
#endif

static int act_simd(void) {
#ifdef HAVE_X86
    return strcmp(ffai_quant_isa(), "avx512-vnni") == 0;
#else
    return 0;
#endif
}

struct act_job {
    const float *a, *b;
    float *out;
    size_t n;              /* silu_mul: elements */
    int rows, cols, causal; /* softmax: rows of cols; causal: row r sees offset + r % L + 1 */
    int length, offset;
    int simd;
    float eps; /* rms_norm */
};

enum { ACT_CHUNK = 1024 }; /* elements per unit of the silu split: whole cache lines */
/* Fewer elements run on the calling thread alone: a few microseconds of work, less
 * than waking a pool worker costs (a decode step's gate is 4864 x batch elements). */
#define ACT_SHARE_MIN ((size_t)1 << 16)

static void silu_mul_task(const void *ctx, int part, int parts) {
    const struct act_job *j = ctx;
    int lo, hi, chunks = (int)((j->n + ACT_CHUNK - 1) / ACT_CHUNK);
    pool_split(part, parts, chunks, 1, &lo, &hi);
    size_t i0 = (size_t)lo * ACT_CHUNK, i1 = (size_t)hi * ACT_CHUNK < j->n ? (size_t)hi * ACT_CHUNK : j->n;
    if (i0 >= i1) return;
#ifdef HAVE_X86
    if (j->simd) {
        silu_mul_avx512(j->a + i0, j->b + i0, j->out + i0, i1 - i0);
        return;
    }
#endif
    silu_mul_generic(j->a + i0, j->b + i0, j->out + i0, i1 - i0);
}

static void softmax_task(const void *ctx, int part, int parts) {
    const struct act_job *j = ctx;
    int r0, r1;
    pool_split(part, parts, j->rows, 1, &r0, &r1);
    for (int r = r0; r < r1; r++) {
        int valid = j->causal ? j->offset + r % j->length + 1 : j->cols;
        valid = valid > j->cols ? j->cols : (valid < 1 ? 1 : valid);
        const float *x = j->a + (size_t)r * j->cols;
        float *out = j->out + (size_t)r * j->cols;
#ifdef HAVE_X86
        if (j->simd) {
            softmax_row_avx512(x, out, j->cols, valid);
            continue;
        }
#endif
        softmax_row_generic(x, out, j->cols, valid);
    }
}

static void rms_norm_task(const void *ctx, int part, int parts) {
    const struct act_job *j = ctx;
    int r0, r1;
    pool_split(part, parts, j->rows, 1, &r0, &r1);
    for (int r = r0; r < r1; r++) {
        const float *x = j->a + (size_t)r * j->cols;
        float *out = j->out + (size_t)r * j->cols;
#ifdef HAVE_X86
        if (j->simd) {
            rms_norm_row_avx512(x, j->b, out, j->cols, j->eps);
            continue;
        }
#endif
        rms_norm_row_generic(x, j->b, out, j->cols, j->eps);
    }
}

struct argmax_job {
    const float *x;
    int32_t *out;
    int rows, cols, simd;
};

static void argmax_task(const void *ctx, int part, int parts) {
    const struct argmax_job *j = ctx;
    int r0, r1;
    pool_split(part, parts, j->rows, 1, &r0, &r1);
    for (int r = r0; r < r1; r++) {
        const float *x = j->x + (size_t)r * j->cols;
#ifdef HAVE_X86
        if (j->simd) {
            j->out[r] = argmax_row_avx512(x, j->cols);
            continue;
        }
#endif
        j->out[r] = argmax_row_generic(x, j->cols);
    }
}

static void act_configure_once(void) {
    if (!atomic_exchange(&configured, 1)) pool_configure(pool_cpus());
}

void ffai_silu_mul(const float *g, const float *u, float *out, size_t n) {
    act_configure_once();
    struct act_job j = {g, u, out, n, 0, 0, 0, 0, 0, act_simd(), 0.0f};
    pool_run(silu_mul_task, &j, n >= ACT_SHARE_MIN);
}

void ffai_softmax_rows(const float *x, float *out, int rows, int cols, int causal_length,
                       int causal_offset) {
    act_configure_once();
    struct act_job j = {x, NULL, out, 0, rows, cols, causal_length > 0, causal_length,
                        causal_offset, act_simd(), 0.0f};
    pool_run(softmax_task, &j, (size_t)rows * cols >= ACT_SHARE_MIN && rows >= 2);
}

void ffai_rms_norm(const float *x, const float *w, float *out, int rows, int cols, float eps) {
    act_configure_once();
    struct act_job j = {x, w, out, 0, rows, cols, 0, 0, 0, act_simd(), eps};
    pool_run(rms_norm_task, &j, (size_t)rows * cols >= ACT_SHARE_MIN && rows >= 2);
}

void ffai_argmax_rows(const float *x, int32_t *out, int rows, int cols) {
    act_configure_once();
    struct argmax_job j = {x, out, rows, cols, act_simd()};
    pool_run(argmax_task, &j, (size_t)rows * cols >= 4 * ACT_SHARE_MIN && rows >= 2);
}
