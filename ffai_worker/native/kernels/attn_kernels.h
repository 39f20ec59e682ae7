/* A decode step's attention for every row of a batch in two kernels: ffai_kv_write
 * stores the new key (after RoPE) or value at the row's position of its slot, and
 * ffai_decode_attention runs each query head (after RoPE) over its row's positions
 * (softmax with MLX's exp polynomial, as in act_kernels.h).
 *
 * Why: in MLX's graph the same work is about 30 nodes per layer (views of the fused
 * projection, reshapes, transposes, RoPE, two scatters, two matmuls, the mask, softmax);
 * here it is three (key write, value write, attention), each an MLX primitive with one
 * output, so that MLX donates the cache buffers and the writes happen in place (a
 * primitive with several outputs gives each output its own copy of the inputs, so its
 * inputs are never donatable). On a CPU a decode step's cost beyond reading the weights
 * is mostly the dispatch of its nodes (benchmarks/NOTES.md).
 *
 * A row attends positions [start, pos] of its own slot (start = pos - window + 1 with a
 * sliding window, else 0), so its result never depends on the other rows; the sums run
 * in the same order whatever the split over threads. Included once, by quant_gemm.c,
 * after act_kernels.h. */

/* Dot product of n floats (n a multiple of 16 or not), 16 partial sums in lanes. */
#ifdef HAVE_X86
T512 static float attn_dot_avx512(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16)
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + i),
                                               _mm512_maskz_loadu_ps(m, b + i)));
    }
    return _mm512_reduce_add_ps(acc);
}

/* acc[i] += p * v[i] for i < n. */
T512 static void attn_axpy_avx512(float *acc, float p, const float *v, int n) {
    __m512 pv = _mm512_set1_ps(p);
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i),
                                                _mm512_mul_ps(pv, _mm512_loadu_ps(v + i))));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + i),
                                   _mm512_mul_ps(pv, _mm512_maskz_loadu_ps(m, v + i)));
        _mm512_mask_storeu_ps(acc + i, m, sum);
    }
}
#endif

/* Eight partial sums: a loop the compiler vectorizes without reassociating. */
static float attn_dot_generic(const float *a, const float *b, int n) {
    float part[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) part[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; i++, j++) part[j] += a[i] * b[i];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

static void attn_axpy_generic(float *acc, float p, const float *v, int n) {
    for (int i = 0; i < n; i++) acc[i] += p * v[i];
}

/* cos then sin of each row's angles: (batch, 2, rope_dims / 2). */
static float *attn_rope_tables(const struct ffai_rope *r, const int32_t *positions, int batch) {
    const int half = r->rope_dims / 2;
    float *tables = malloc(sizeof(float) * ((size_t)batch * 2 * half + 1));
    if (!tables) return NULL;
    for (int b = 0; b < batch; b++) {
        float *cs = tables + (size_t)b * 2 * half, pos = (float)positions[b] * r->rope_scale;
        for (int i = 0; i < half; i++) {
            float theta = pos * r->inv_freq[i];
            cs[i] = cosf(theta), cs[half + i] = sinf(theta);
        }
    }
    return tables;
}

/* The non-interleaved rotation (HF's rotate_half) of the first 2 * half features of x
 * with a row's cos/sin table; the rest is copied. mscale (LongRoPE) multiplies the
 * rotated features first, as the model's RoPE does. */
static void attn_rope(const float *x, float *out, const float *cs, int half, int dims,
                      float mscale) {
    const float *cosv = cs, *sinv = cs + half;
    for (int i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        if (mscale != 1.0f) x1 *= mscale, x2 *= mscale;
        out[i] = x1 * cosv[i] + x2 * -sinv[i];
        out[i + half] = x2 * cosv[i] + x1 * sinv[i];
    }
    for (int i = 2 * half; i < dims; i++) out[i] = x[i];
}

static int attn_rope_ok(const struct ffai_rope *r, int head_dim) {
    return !r->inv_freq || (r->rope_dims >= 0 && r->rope_dims <= head_dim && r->rope_dims % 2 == 0);
}

static int attn_positions_ok(const int32_t *positions, int batch, int capacity) {
    for (int b = 0; b < batch; b++)
        if (positions[b] < 0 || positions[b] >= capacity) return 0;
    return 1;
}

int ffai_kv_write(float *cache, const float *x, long x_stride, const int32_t *positions,
                  int batch, int kv_heads, int capacity, int head_dim, const struct ffai_rope *rope) {
    if (batch < 1 || kv_heads < 1 || head_dim < 1 || capacity < 1 || !attn_rope_ok(rope, head_dim) ||
        !attn_positions_ok(positions, batch, capacity))
        return -1;
    float *tables = rope->inv_freq ? attn_rope_tables(rope, positions, batch) : NULL;
    if (rope->inv_freq && !tables) return -1;
    for (int b = 0; b < batch; b++)
        for (int g = 0; g < kv_heads; g++) {
            const float *src = x + (size_t)b * x_stride + (size_t)g * head_dim;
            float *dst = cache + (((size_t)b * kv_heads + g) * capacity + positions[b]) * head_dim;
            if (tables)
                attn_rope(src, dst, tables + (size_t)b * rope->rope_dims, rope->rope_dims / 2,
                          head_dim, rope->rope_mscale);
            else
                memcpy(dst, src, sizeof(float) * head_dim);
        }
    free(tables);
    return 0;
}

struct attn_job {
    const float *q, *k_cache, *v_cache;
    long q_stride;
    const int32_t *positions;
    float *out;
    int batch, heads, kv_heads, capacity, head_dim, window;
    const struct ffai_rope *rope;
    const float *tables; /* per row: cos[half], sin[half] */
    float scale, softcap;
    int simd;
};

/* One query head of one row: scores over the row's positions, softmax, weighted values. */
static void attn_head(const struct attn_job *a, int b, int h, float *q, float *scores) {
    const int D = a->head_dim, half = a->rope->rope_dims / 2;
    const int g = h / (a->heads / a->kv_heads), pos = a->positions[b];
    const int start = a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
    const int n = pos - start + 1;
    const float *x = a->q + (size_t)b * a->q_stride + (size_t)h * D;
    if (a->tables)
        attn_rope(x, q, a->tables + (size_t)b * 2 * half, half, D, a->rope->rope_mscale);
    else
        memcpy(q, x, sizeof(float) * D);
    for (int i = 0; i < D; i++) q[i] *= a->scale;
    const size_t slot = (((size_t)b * a->kv_heads + g) * a->capacity + start) * D;
    const float *keys = a->k_cache + slot, *values = a->v_cache + slot;
    float (*dot)(const float *, const float *, int) = attn_dot_generic;
    void (*axpy)(float *, float, const float *, int) = attn_axpy_generic;
    void (*softmax_row)(const float *, float *, int, int) = softmax_row_generic;
#ifdef HAVE_X86
    if (a->simd) dot = attn_dot_avx512, axpy = attn_axpy_avx512, softmax_row = softmax_row_avx512;
#endif
    for (int j = 0; j < n; j++) scores[j] = dot(q, keys + (size_t)j * D, D);
    if (a->softcap > 0.0f)
        for (int j = 0; j < n; j++) scores[j] = tanhf(scores[j] / a->softcap) * a->softcap;
    softmax_row(scores, scores, n, n);
    float *out = a->out + ((size_t)b * a->heads + h) * D;
    memset(out, 0, sizeof(float) * D);
    for (int j = 0; j < n; j++) axpy(out, scores[j], values + (size_t)j * D, D);
}

/* Units are (row, query head) pairs. */
static void attn_task(const void *ctx, int part, int parts) {
    const struct attn_job *a = ctx;
    int u0, u1;
    pool_split(part, parts, a->batch * a->heads, 1, &u0, &u1);
    if (u0 >= u1) return;
    float *scratch = malloc(sizeof(float) * ((size_t)a->head_dim + a->capacity));
    if (!scratch) abort(); /* a few KB: nothing sensible is left to do without them */
    for (int u = u0; u < u1; u++) attn_head(a, u / a->heads, u % a->heads, scratch, scratch + a->head_dim);
    free(scratch);
}

int ffai_decode_attention(const float *q, long q_stride, const float *k_cache,
                          const float *v_cache, const int32_t *positions, float *out, int batch,
                          int heads, int kv_heads, int capacity, int head_dim,
                          const struct ffai_rope *rope, float scale, int window, float softcap) {
    if (batch < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || head_dim < 1 || capacity < 1 ||
        !attn_rope_ok(rope, head_dim) || !attn_positions_ok(positions, batch, capacity))
        return -1;
    if (!atomic_exchange(&configured, 1)) pool_configure(pool_cpus());
    struct attn_job a = {q, k_cache, v_cache, q_stride, positions, out, batch, heads, kv_heads,
                         capacity, head_dim, window, rope, NULL, scale, softcap, act_simd()};
    if (rope->inv_freq && !(a.tables = attn_rope_tables(rope, positions, batch))) return -1;
    size_t work = 0;
    for (int b = 0; b < batch; b++) work += (size_t)(positions[b] + 1) * heads * head_dim;
    pool_run(attn_task, &a, work >= ACT_SHARE_MIN && batch * heads >= 2);
    free((void *)a.tables);
    return 0;
}
