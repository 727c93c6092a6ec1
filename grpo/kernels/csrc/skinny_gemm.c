/* y (O, n) = w (O, K) @ x (K, n) in fp32, all row-major and contiguous, n a multiple of 16;
 * or its transpose y (n, O), as the LM head's logits are wanted (one row per sequence).
 *
 * The GEMM of a decode step: a weight matrix times the few columns (one per live row) of the
 * transposed residual stream. MKL packs w into its own layout on every call, which at 16-32
 * columns costs about as much as the multiply; this kernel reads each block of w rows once,
 * straight from memory, into register accumulators (AVX2 + FMA). Built and loaded by
 * grpo/kernels; the OpenMP threads are the ones torch already runs (same libgomp).
 */
#include <immintrin.h>

#define FMA(acc, b, v) acc = _mm256_fmadd_ps(b, v, acc)

/* 3 rows of w x 32 columns of x: 12 accumulators, 4 vector loads + 3 broadcasts per k */
static void rows3_cols32(const float *w, long K, const float *x, long n, float *y, long ld) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K;
    for (long k = 0; k < K; k++) {
        const float *xk = x + k * n;
        __m256 x0 = _mm256_loadu_ps(xk), x1 = _mm256_loadu_ps(xk + 8);
        __m256 x2 = _mm256_loadu_ps(xk + 16), x3 = _mm256_loadu_ps(xk + 24);
        __m256 b = _mm256_broadcast_ss(w0 + k);
        FMA(a00, b, x0); FMA(a01, b, x1); FMA(a02, b, x2); FMA(a03, b, x3);
        b = _mm256_broadcast_ss(w1 + k);
        FMA(a10, b, x0); FMA(a11, b, x1); FMA(a12, b, x2); FMA(a13, b, x3);
        b = _mm256_broadcast_ss(w2 + k);
        FMA(a20, b, x0); FMA(a21, b, x1); FMA(a22, b, x2); FMA(a23, b, x3);
    }
    _mm256_storeu_ps(y, a00); _mm256_storeu_ps(y + 8, a01);
    _mm256_storeu_ps(y + 16, a02); _mm256_storeu_ps(y + 24, a03);
    y += ld;
    _mm256_storeu_ps(y, a10); _mm256_storeu_ps(y + 8, a11);
    _mm256_storeu_ps(y + 16, a12); _mm256_storeu_ps(y + 24, a13);
    y += ld;
    _mm256_storeu_ps(y, a20); _mm256_storeu_ps(y + 8, a21);
    _mm256_storeu_ps(y + 16, a22); _mm256_storeu_ps(y + 24, a23);
}

/* 6 rows of w x 16 columns of x: 12 accumulators, 2 vector loads + 6 broadcasts per k */
static void rows6_cols16(const float *w, long K, const float *x, long n, float *y, long ld) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K;
    const float *w3 = w + 3 * K, *w4 = w + 4 * K, *w5 = w + 5 * K;
    for (long k = 0; k < K; k++) {
        __m256 x0 = _mm256_loadu_ps(x + k * n), x1 = _mm256_loadu_ps(x + k * n + 8);
        __m256 b = _mm256_broadcast_ss(w0 + k);
        FMA(a00, b, x0); FMA(a01, b, x1);
        b = _mm256_broadcast_ss(w1 + k);
        FMA(a10, b, x0); FMA(a11, b, x1);
        b = _mm256_broadcast_ss(w2 + k);
        FMA(a20, b, x0); FMA(a21, b, x1);
        b = _mm256_broadcast_ss(w3 + k);
        FMA(a30, b, x0); FMA(a31, b, x1);
        b = _mm256_broadcast_ss(w4 + k);
        FMA(a40, b, x0); FMA(a41, b, x1);
        b = _mm256_broadcast_ss(w5 + k);
        FMA(a50, b, x0); FMA(a51, b, x1);
    }
    _mm256_storeu_ps(y, a00); _mm256_storeu_ps(y + 8, a01);
    _mm256_storeu_ps(y + ld, a10); _mm256_storeu_ps(y + ld + 8, a11);
    _mm256_storeu_ps(y + 2 * ld, a20); _mm256_storeu_ps(y + 2 * ld + 8, a21);
    _mm256_storeu_ps(y + 3 * ld, a30); _mm256_storeu_ps(y + 3 * ld + 8, a31);
    _mm256_storeu_ps(y + 4 * ld, a40); _mm256_storeu_ps(y + 4 * ld + 8, a41);
    _mm256_storeu_ps(y + 5 * ld, a50); _mm256_storeu_ps(y + 5 * ld + 8, a51);
}

/* 1 row of w x 16 columns: the rows left over after the blocks */
static void row1_cols16(const float *w, long K, const float *x, long n, float *y) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (long k = 0; k < K; k++) {
        __m256 b = _mm256_broadcast_ss(w + k);
        FMA(a0, b, _mm256_loadu_ps(x + k * n));
        FMA(a1, b, _mm256_loadu_ps(x + k * n + 8));
    }
    _mm256_storeu_ps(y, a0);
    _mm256_storeu_ps(y + 8, a1);
}

/* block b of `rows` w rows times columns j .. j + step - 1 of x, into y (O, n), or into
 * y (n, O) transposed: through a tile, each column's `rows` outputs then lie side by side */
static void block(const float *w, long K, const float *x, long n, float *y, long O, long b,
                  long rows, long j, int transposed) {
    const long step = rows == 3 ? 32 : 16;
    float tile[6 * 32];
    float *out = transposed ? tile : y + b * rows * n + j;
    const long ld = transposed ? step : n;
    if (rows == 3)
        rows3_cols32(w + b * rows * K, K, x + j, n, out, ld);
    else if (rows == 6)
        rows6_cols16(w + b * rows * K, K, x + j, n, out, ld);
    else
        row1_cols16(w + b * rows * K, K, x + j, n, out);
    if (transposed)
        for (long c = 0; c < step; c++)
            for (long r = 0; r < rows; r++)
                y[(j + c) * O + b * rows + r] = tile[r * step + c];
}

/* y = w @ x, (O, n); transposed: y = (w @ x)^T, (n, O) */
void skinny_gemm(const float *w, const float *x, float *y, long O, long K, long n, int threads,
                 int transposed) {
    const int wide = n % 32 == 0;
    const long rows = wide ? 3 : 6, step = wide ? 32 : 16, blocks = O / rows;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++)
        for (long j = 0; j < n; j += step)
            block(w, K, x, n, y, O, b, rows, j, transposed);
    for (long o = blocks * rows; o < O; o++)
        for (long j = 0; j < n; j += 16)
            block(w + o * K, K, x, n, y + (transposed ? o : o * n), O, 0, 1, j, transposed);
}
