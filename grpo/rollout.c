/* Sampling of each row's next token by the Gumbel-max trick, fused into one pass.
 *
 * token = argmax_v logits[v] / temperature - log(-log(u[v])), u the row's uniforms: an exact
 * sample of softmax(logits / temperature). grpo/rollout.py computes the same in torch where the
 * kernels are not built; here the division, the two logs, the add and the argmax run over the
 * vocabulary once per row (AVX2), instead of six passes over (rows, vocabulary) tensors. Used on
 * the HF path and on our own decode loop alike, so both pick the same token from the same logits
 * and uniforms. Ties go to the lowest index, as torch.argmax.
 */
#include <float.h>
#include <math.h>

#include "vector_math.h"

static long gumbel_argmax_row(const float *logits, const float *uniforms, long V,
                              float temperature) {
    const __m256 t = _mm256_set1_ps(temperature), tiny = _mm256_set1_ps(FLT_MIN);
    const __m256 zero = _mm256_setzero_ps();
    __m256 best = _mm256_set1_ps(-INFINITY);
    __m256i arg = _mm256_setzero_si256(), index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i eight = _mm256_set1_epi32(8);
    long v = 0;
    for (; v + 8 <= V; v += 8) {
        __m256 u = _mm256_max_ps(_mm256_loadu_ps(uniforms + v), tiny);
        __m256 noise = _mm256_sub_ps(zero, log8(_mm256_sub_ps(zero, log8(u))));
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
        float l[8], u[8], s[8];
        for (long k = 0; k < 8; k++) {
            l[k] = v + k < V ? logits[v + k] : -INFINITY;
            u[k] = v + k < V ? uniforms[v + k] : 0.5f;
        }
        __m256 uu = _mm256_max_ps(_mm256_loadu_ps(u), tiny);
        __m256 noise = _mm256_sub_ps(zero, log8(_mm256_sub_ps(zero, log8(uu))));
        _mm256_storeu_ps(s, _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(l), t), noise));
        for (long k = 0; v + k < V; k++)
            if (s[k] > top) {
                top = s[k];
                token = v + k;
            }
    }
    return token < 0 ? 0 : token;  /* every score -inf (or NaN): token 0, as torch.argmax */
}

/* tokens (n,) of logits (n, V) with uniforms (n, V) in [0, 1), all row-major */
void gumbel_argmax(const float *logits, const float *uniforms, long n, long V, float temperature,
                   long *tokens, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < n; i++)
        tokens[i] = gumbel_argmax_row(logits + i * V, uniforms + i * V, V, temperature);
}
