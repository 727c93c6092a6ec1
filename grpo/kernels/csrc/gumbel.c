/* Sampling of each row's next token by the Gumbel-max trick, fused into one pass.
 *
 * token = argmax_v logits[v] / temperature - log(-log(u_v)): an exact sample of
 * softmax(logits / temperature). u_v is uniform number `offset + v` of the row's stream: the
 * SplitMix64 sequence of the row's seed, whose element i is mix(seed + (i + 1) * GAMMA), so any
 * element is computed directly from (seed, i), and its top 24 bits make a float in [0, 1).
 * grpo/sampling.py computes the same stream and noise in torch where the kernels are not built;
 * this kernel draws, takes the two logs, divides, adds and finds the argmax in one pass over the
 * vocabulary per row (AVX2) instead of seven passes over (rows, vocabulary) tensors. Used on the
 * HF path and on our own decode loop alike, so both pick the same token from the same logits.
 * Ties go to the lowest index, as torch.argmax.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "vector_math.h"

#define GAMMA 0x9E3779B97F4A7C15ULL

/* 8 uniforms: elements first .. first + 7 of the stream of `seed` */
static inline __m256 uniforms8(uint64_t seed, uint64_t first) {
    float u[8];
    for (int k = 0; k < 8; k++) {
        uint64_t z = seed + (first + k + 1) * GAMMA;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        u[k] = (float)(z >> 40) * 0x1.0p-24f;
    }
    return _mm256_loadu_ps(u);
}

/* -log(-log(u)) of 8 uniforms, u clamped to the smallest normal float */
static inline __m256 gumbel8(__m256 u) {
    const __m256 zero = _mm256_setzero_ps();
    u = _mm256_max_ps(u, _mm256_set1_ps(FLT_MIN));
    return _mm256_sub_ps(zero, log8(_mm256_sub_ps(zero, log8(u))));
}

static long gumbel_argmax_row(const float *logits, long V, float temperature, uint64_t seed,
                              uint64_t offset) {
    const __m256 t = _mm256_set1_ps(temperature);
    __m256 best = _mm256_set1_ps(-INFINITY);
    __m256i arg = _mm256_setzero_si256(), index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i eight = _mm256_set1_epi32(8);
    long v = 0;
    for (; v + 8 <= V; v += 8) {
        __m256 noise = gumbel8(uniforms8(seed, offset + v));
        __m256 score = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(logits + v), t), noise);
        __m256 better = _mm256_cmp_ps(score, best, _CMP_GT_OQ);
        best = _mm256_blendv_ps(best, score, better);
        arg = _mm256_blendv_epi8(arg, index, _mm256_castps_si256(better));
        index = _mm256_add_epi32(index, eight);
    }
    float lanes[8];
    int args[8];
    _mm256_storeu_ps(lanes, best);
    _mm256_storeu_si256((__m256i *)args, arg);
    float top = -INFINITY;
    long token = -1;
    for (long k = 0; k < 8; k++)
        if (lanes[k] > top || (lanes[k] == top && lanes[k] > -INFINITY && args[k] < token)) {
            top = lanes[k];
            token = args[k];
        }
    if (v < V) {  /* the last V % 8 tokens, through the same vector code */
        float l[8], s[8];
        for (long k = 0; k < 8; k++)
            l[k] = v + k < V ? logits[v + k] : -INFINITY;
        __m256 noise = gumbel8(uniforms8(seed, offset + v));
        _mm256_storeu_ps(s, _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(l), t), noise));
        for (long k = 0; v + k < V; k++)
            if (s[k] > top) {
                top = s[k];
                token = v + k;
            }
    }
    return token < 0 ? 0 : token;  /* every score -inf (or NaN): token 0, as torch.argmax */
}

/* tokens (n,) of logits (n, V), row i with uniforms offsets[i] .. offsets[i] + V - 1 of the
 * stream of seeds[i] */
void gumbel_argmax(const float *logits, long n, long V, float temperature, const uint64_t *seeds,
                   const uint64_t *offsets, long *tokens, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < n; i++)
        tokens[i] = gumbel_argmax_row(logits + i * V, V, temperature, seeds[i], offsets[i]);
}
