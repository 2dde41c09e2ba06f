/* Loaded by llmlite.kernels.native with ctypes. Dequantizes a 4-bit GPTQ weight into the transposed
   float weight [K, N] that a float matrix product reads as it is:

       out[k, n] = code(k, n) * scale[g_idx[k], n] + offset[g_idx[k], n]

   with code(k, n) = bits 4*(k % 8) .. +3 of qweight[k / 8, n] (the GPTQ layout: int32 [K/8, N],
   packed along the input dimension) and offset = -zero * scale (float32 [groups, N] each).
   The inner loop runs over n, contiguous in every operand: compilers vectorise it, and
   target_clones builds an AVX-512, an AVX2 and a baseline version, chosen once at load time.
*/
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

typedef struct {
    const int32_t *qweight;
    const float *scale, *offset;
    const int32_t *g_idx;
    int64_t k0, k1, n;
    void *out;
    int bf16;
} job_t;

CLONES static void rows_f32(const job_t *j) {
    for (int64_t k = j->k0; k < j->k1; k++) {
        const int32_t *q = j->qweight + (k >> 3) * j->n;
        const int shift = (int)(k & 7) * 4;
        const float *s = j->scale + (int64_t)j->g_idx[k] * j->n, *o = j->offset + (int64_t)j->g_idx[k] * j->n;
        float *out = (float *)j->out + k * j->n;
        for (int64_t i = 0; i < j->n; i++) out[i] = (float)((q[i] >> shift) & 15) * s[i] + o[i];
    }
}

CLONES static void rows_bf16(const job_t *j) {
    for (int64_t k = j->k0; k < j->k1; k++) {
        const int32_t *q = j->qweight + (k >> 3) * j->n;
        const int shift = (int)(k & 7) * 4;
        const float *s = j->scale + (int64_t)j->g_idx[k] * j->n, *o = j->offset + (int64_t)j->g_idx[k] * j->n;
        uint16_t *out = (uint16_t *)j->out + k * j->n;
        for (int64_t i = 0; i < j->n; i++) {
            float w = (float)((q[i] >> shift) & 15) * s[i] + o[i];
            uint32_t u;
            memcpy(&u, &w, 4);
            out[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); /* round to nearest even */
        }
    }
}

/* out: float32 (bf16 = 0) or bfloat16 bits (bf16 = 1), [k, n]. One thread: the caller's torch
   threads spin between their parallel regions, and a second set of threads here only competes
   with them (measured: 1.3-2x slower on 2 cores). */
void llmlite_dequant4(const int32_t *qweight, const float *scale, const float *offset, const int32_t *g_idx,
                      int64_t k, int64_t n, void *out, int bf16) {
    job_t j = {qweight, scale, offset, g_idx, 0, k, n, out, bf16};
    if (bf16) rows_bf16(&j); else rows_f32(&j);
}
