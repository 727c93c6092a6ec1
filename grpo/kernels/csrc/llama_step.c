/* The decoder layers of one llama/qwen2 decode step in fp32, over a KV cache that shares prompts.
 *
 * Everything of a step between the token embedding and the LM head, in one call: per layer
 * RMSNorm -> q/k/v GEMM (+bias) -> rotary -> append k, v -> attention over [prompt KV, own KV]
 * -> o GEMM -> residual -> RMSNorm -> gate/up GEMM -> SiLU(gate) * up -> down GEMM -> residual,
 * then the final RMSNorm. In torch this is ~40 small ops per layer whose dispatch costs more than
 * their arithmetic at 16-64 rows; in C it is plain loops around `skinny_gemm`.
 *
 * Layout: the residual stream and every activation are feature-major, (features, width): column
 * r is live row r, width a multiple of 16 (the GEMM's column block; the padding columns are
 * computed and never read). KV caches are (rows, kv heads, tokens, head dim) as in
 * grpo/decoding/llama.py. Built with the other csrc/ files into one library by grpo/kernels.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "vector_math.h"

void skinny_gemm(const float *w, const float *x, float *y, long O, long K, long n, int threads,
                 int transposed);

/* s[0..m) = softmax(s[0..m)) */
static void softmax(float *s, long m) {
    float top = -INFINITY;
    for (long j = 0; j < m; j++)
        top = s[j] > top ? s[j] : top;
    __m256 shift = _mm256_set1_ps(top), total = _mm256_setzero_ps();
    long j = 0;
    for (; j + 8 <= m; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
        _mm256_storeu_ps(s + j, e);
        total = _mm256_add_ps(total, e);
    }
    float tail[8] = {0};
    if (j < m) {
        for (long k = 0; k < 8; k++)
            tail[k] = j + k < m ? s[j + k] - top : -INFINITY;
        _mm256_storeu_ps(tail, exp8(_mm256_loadu_ps(tail)));
        for (long k = 0; j + k < m; k++)
            s[j + k] = tail[k];
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, total);
    float sum = 0;
    for (long k = 0; k < 8; k++)
        sum += lanes[k] + tail[k];
    float scale = 1.0f / sum;
    for (long k = 0; k < m; k++)
        s[k] *= scale;
}

static inline float dot(const float *a, const float *b, long D) {
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (long d = 0; d < D; d++)
        s += a[d] * b[d];
    return s;
}

static inline void axpy(float *y, float a, const float *x, long D) {
#pragma omp simd
    for (long d = 0; d < D; d++)
        y[d] += a * x[d];
}

/* out (C, width) = RMSNorm(x (C, width)) per column, times the weight */
static void rms_norm(const float *x, const float *weight, float *out, long C, long width,
                     float eps) {
    float inv[width];
    for (long r = 0; r < width; r++)
        inv[r] = 0;
    for (long c = 0; c < C; c++)
#pragma omp simd
        for (long r = 0; r < width; r++)
            inv[r] += x[c * width + r] * x[c * width + r];
    for (long r = 0; r < width; r++)
        inv[r] = 1.0f / sqrtf(inv[r] / C + eps);
    for (long c = 0; c < C; c++)
#pragma omp simd
        for (long r = 0; r < width; r++)
            out[c * width + r] = weight[c] * (x[c * width + r] * inv[r]);
}

static void add_bias(float *y, const float *bias, long O, long width) {
    if (!bias)
        return;
    for (long o = 0; o < O; o++)
#pragma omp simd
        for (long r = 0; r < width; r++)
            y[o * width + r] += bias[o];
}

/* Shapes and settings of a step; the caller fills it (see grpo/decoding/llama.py). */
typedef struct {
    long layers, hidden, heads, kv_heads, head_dim, inner;
    long groups, group, prefix, capacity;  /* B prompts, G rows each, P prompt tokens, KV cap */
    long n, width, t;                       /* live rows, GEMM columns, own tokens before step */
    float eps, scaling;
    int threads;
} Shape;

/* per layer, in this order */
enum { NORM1, QKV, QKV_B, O, O_B, NORM2, GATE_UP, GATE_UP_B, DOWN, DOWN_B,
       PREFIX_K, PREFIX_V, OWN_K, OWN_V, SLOTS };

/* attention of the live rows of prompt b on kv head h; q rows of `qkv` already rotated */
static void attend(const Shape *s, long b, long h, long r0, long r1, const long *first,
                   const float *qkv, const float *pk, const float *pv, const float *ok,
                   const float *ov, float *attn) {
    const long D = s->head_dim, rep = s->heads / s->kv_heads, width = s->width;
    const long P = s->prefix, own = s->t + 1, start = first[b], m = P - start + own;
    const long Q = (r1 - r0) * rep;
    float *q = malloc(sizeof(float) * Q * D), *out = calloc(Q * D, sizeof(float));
    float *score = malloc(sizeof(float) * Q * m);
    for (long r = r0; r < r1; r++)
        for (long i = 0; i < rep; i++)
            for (long d = 0; d < D; d++)
                q[((r - r0) * rep + i) * D + d] = qkv[((h * rep + i) * D + d) * width + r];
    const float *keys = pk + (b * s->kv_heads + h) * P * D;
    const float *values = pv + (b * s->kv_heads + h) * P * D;
    for (long p = start; p < P; p++)
        for (long j = 0; j < Q; j++)
            score[j * m + p - start] = dot(q + j * D, keys + p * D, D);
    for (long r = r0; r < r1; r++) {
        const float *mine = ok + (r * s->kv_heads + h) * s->capacity * D;
        for (long i = 0; i < rep; i++) {
            long j = (r - r0) * rep + i;
            for (long k = 0; k < own; k++)
                score[j * m + P - start + k] = dot(q + j * D, mine + k * D, D);
        }
    }
    for (long j = 0; j < Q; j++)
        softmax(score + j * m, m);
    for (long p = start; p < P; p++)
        for (long j = 0; j < Q; j++)
            axpy(out + j * D, score[j * m + p - start], values + p * D, D);
    for (long r = r0; r < r1; r++) {
        const float *mine = ov + (r * s->kv_heads + h) * s->capacity * D;
        for (long i = 0; i < rep; i++) {
            long j = (r - r0) * rep + i;
            for (long k = 0; k < own; k++)
                axpy(out + j * D, score[j * m + P - start + k], mine + k * D, D);
        }
    }
    for (long r = r0; r < r1; r++)
        for (long i = 0; i < rep; i++)
            for (long d = 0; d < D; d++)
                attn[((h * rep + i) * D + d) * width + r] = out[((r - r0) * rep + i) * D + d];
    free(q);
    free(out);
    free(score);
}

/* x (C, width): in, the embeddings of the fed tokens; out, the final-normed hidden states.
 * cos, sin (D, n): rotary of each row's position. alive (n,): the rows' numbers (sorted; row
 * a belongs to prompt a / G). first (B,): first non-padding prompt position of each prompt.
 * scratch: (C + (H + 2 Hkv) D + H D + C + 3 I) x width floats. */
void llama_step(const Shape *s, float *x, const float *cos, const float *sin, const long *alive,
                const long *first, void *const *weights, const float *final_norm,
                float *scratch) {
    const long C = s->hidden, H = s->heads, Hkv = s->kv_heads, D = s->head_dim, I = s->inner;
    const long n = s->n, width = s->width, F = (H + 2 * Hkv) * D, half = D / 2;
    float *h = scratch, *qkv = h + C * width, *attn = qkv + F * width;
    float *proj = attn + H * D * width, *gate_up = proj + C * width;
    float *gated = gate_up + 2 * I * width;
    long bounds[s->groups + 1];  /* live rows of prompt b: bounds[b] .. bounds[b + 1] - 1 */
    for (long b = 0, r = 0; b <= s->groups; b++) {
        while (r < n && alive[r] / s->group < b)
            r++;
        bounds[b] = r;
    }
    for (long l = 0; l < s->layers; l++) {
        void *const *w = weights + l * SLOTS;
        rms_norm(x, w[NORM1], h, C, width, s->eps);
        skinny_gemm(w[QKV], h, qkv, F, C, width, s->threads, 0);
        add_bias(qkv, w[QKV_B], F, width);
        for (long head = 0; head < H + Hkv; head++) {
            float *base = qkv + head * D * width;
            float scale = head < H ? s->scaling : 1.0f;
            for (long d = 0; d < half; d++) {
                float *lo = base + d * width, *hi = base + (d + half) * width;
                const float *cl = cos + d * n, *ch = cos + (d + half) * n;
                const float *sl = sin + d * n, *sh = sin + (d + half) * n;
#pragma omp simd
                for (long r = 0; r < n; r++) {
                    float a = lo[r], b = hi[r];
                    lo[r] = (a * cl[r] - b * sl[r]) * scale;
                    hi[r] = (b * ch[r] + a * sh[r]) * scale;
                }
            }
        }
        float *ok = w[OWN_K], *ov = w[OWN_V];
        for (long r = 0; r < n; r++)
            for (long kv = 0; kv < Hkv; kv++) {
                float *kd = ok + ((r * Hkv + kv) * s->capacity + s->t) * D;
                float *vd = ov + ((r * Hkv + kv) * s->capacity + s->t) * D;
                for (long d = 0; d < D; d++) {
                    kd[d] = qkv[((H + kv) * D + d) * width + r];
                    vd[d] = qkv[((H + Hkv + kv) * D + d) * width + r];
                }
            }
        memset(attn, 0, sizeof(float) * H * D * width);
#pragma omp parallel for num_threads(s->threads) schedule(dynamic)
        for (long task = 0; task < s->groups * Hkv; task++) {
            long b = task / Hkv, kv = task % Hkv;
            if (bounds[b] < bounds[b + 1])
                attend(s, b, kv, bounds[b], bounds[b + 1], first, qkv, w[PREFIX_K], w[PREFIX_V],
                       ok, ov, attn);
        }
        skinny_gemm(w[O], attn, proj, C, H * D, width, s->threads, 0);
        add_bias(proj, w[O_B], C, width);
        for (long i = 0; i < C * width; i++)
            x[i] += proj[i];
        rms_norm(x, w[NORM2], h, C, width, s->eps);
        skinny_gemm(w[GATE_UP], h, gate_up, 2 * I, C, width, s->threads, 0);
        add_bias(gate_up, w[GATE_UP_B], 2 * I, width);
        for (long i = 0; i < I * width; i += 8) {  /* SiLU(gate) * up; width % 8 == 0 */
            __m256 g = _mm256_loadu_ps(gate_up + i), u = _mm256_loadu_ps(gate_up + I * width + i);
            __m256 sig = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
            _mm256_storeu_ps(gated + i, _mm256_mul_ps(_mm256_div_ps(g, sig), u));
        }
        skinny_gemm(w[DOWN], gated, proj, C, I, width, s->threads, 0);
        add_bias(proj, w[DOWN_B], C, width);
        for (long i = 0; i < C * width; i++)
            x[i] += proj[i];
    }
    rms_norm(x, final_norm, h, C, width, s->eps);
    memcpy(x, h, sizeof(float) * C * width);
}
