/* Loaded by llmlite.kvcache.fused with ctypes. Decode attention over the quantized part of a KIVI
   key/value cache, read where it lies: each token's codes are dequantized into registers and used
   at once, so the float cache is never written out.

   Codes are packed along the channels, 8/bits to a byte, the first channel in the lowest bits
   (llmlite/kvcache/quant.py). Keys are quantized per channel in groups of `group` tokens, before
   RoPE; values per token in groups of `group` channels counted across the heads of a token.

   key scores, for head h, query j of its group, token t (g = t / group):
       k[c]  = code(t, c) * kscale[h, g, c] + kmin[h, g, c]                  (before RoPE)
       r[c]  = k[c] cos[t, c] - k[c + D/2] sin[t, c],  r[c + D/2] = k[c + D/2] cos[t, c] + k[c] sin[t, c]
       scores[h, j, t] = sum_c query[h, j, c] r[c]
   value sums, over tokens t:
       v[c] = code(t, c) * vscale[t, c / group] + vmin[t, c / group]          (c over H * D channels)
       out[h, j, :] += probs[h, j, t] * v[h * D : (h + 1) * D]

   salient-scheme key scores (llmlite/kvcache/salient.py): per token, the plain channels (symmetric,
   (code - 2^(bits-1) + 1/2) * step[t]) and the salient ones (code * sscale[t] + smin[t]) in the
   stored channel order, then k[c] = mean[c] + std[c] * ordered[inverse[c]] over all H * D
   channels, then RoPE and the dot products per head as above.

   One thread (see dequant4.c); target_clones builds AVX-512, AVX2 and baseline versions.
*/
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define MAX_CHANNELS 4096

/* A byte's four 2-bit codes as floats, LUT2[b] = {b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6}: one
   load per byte, where four interleaved shifts do not vectorise (measured: 2-bit value sums 1.7x
   faster at 8k tokens). 4-bit codes unpack faster by shifts than from a table. */
static float LUT2[256][4];

__attribute__((constructor)) static void fill_table(void) {
    for (int b = 0; b < 256; b++)
        for (int i = 0; i < 4; i++) LUT2[b][i] = (float)((b >> (2 * i)) & 3);
}

static inline void unpack(const uint8_t *codes, int bits, int64_t channels, float *out) {
    if (bits == 8) {
        for (int64_t c = 0; c < channels; c++) out[c] = (float)codes[c];
    } else if (bits == 4) {
        for (int64_t b = 0; b < channels / 2; b++) {
            out[2 * b] = (float)(codes[b] & 15);
            out[2 * b + 1] = (float)(codes[b] >> 4);
        }
    } else {
        for (int64_t b = 0; b < channels / 4; b++) memcpy(out + 4 * b, LUT2[codes[b]], sizeof LUT2[0]);
    }
}

/* any channel count: whole bytes by unpack, then the channels of a partly filled last byte */
static inline void unpack_any(const uint8_t *codes, int bits, int64_t channels, float *out) {
    const int per_byte = 8 / bits, mask = (1 << bits) - 1;
    const int64_t whole = channels / per_byte * per_byte;
    unpack(codes, bits, whole, out);
    for (int64_t c = whole; c < channels; c++)
        out[c] = (float)((codes[c / per_byte] >> (bits * (c % per_byte))) & mask);
}

static inline void rotate_and_score(const float *k, const float *ct, const float *st, const float *query,
                                    int64_t dim, int64_t group_queries, int64_t tokens, int64_t t,
                                    float *r, float *scores) {
    const int64_t half = dim / 2;
    for (int64_t c = 0; c < half; c++) {
        r[c] = k[c] * ct[c] - k[c + half] * st[c];
        r[c + half] = k[c + half] * ct[c] + k[c] * st[c];
    }
    for (int64_t j = 0; j < group_queries; j++) {
        const float *q = query + j * dim;
        float acc = 0.0f;
        for (int64_t c = 0; c < dim; c++) acc += q[c] * r[c];
        scores[j * tokens + t] = acc;
    }
}

/* codes [H, T, D*bits/8], kscale/kmin [H, ceil(T/group), D], cos/sin [T, D/2], query [H, G, D],
   scores [H, G, T]. D <= MAX_CHANNELS, D even and a multiple of 8/bits. */
CLONES void llmlite_kv_key_scores(const uint8_t *codes, const float *kscale, const float *kmin,
                                  const float *cos, const float *sin, const float *query, int64_t heads,
                                  int64_t tokens, int64_t dim, int64_t group_queries, int bits,
                                  int64_t group, float *scores) {
    const int64_t width = dim * bits / 8, half = dim / 2, groups = (tokens + group - 1) / group;
    float k[MAX_CHANNELS], r[MAX_CHANNELS];
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t t = 0; t < tokens; t++) {
            const float *s = kscale + (h * groups + t / group) * dim, *m = kmin + (h * groups + t / group) * dim;
            const float *ct = cos + t * half, *st = sin + t * half;
            unpack(codes + (h * tokens + t) * width, bits, dim, k);
            for (int64_t c = 0; c < dim; c++) k[c] = k[c] * s[c] + m[c];
            rotate_and_score(k, ct, st, query + h * group_queries * dim, dim, group_queries, tokens, t, r,
                             scores + h * group_queries * tokens);
        }
    }
}

/* plain codes [T, ceil(n_plain*bits/8)] with step [T]; salient codes [T, ceil(n_salient*sbits/8)]
   with sscale/smin [T]; inverse int32 [H*D]; mean/std [H*D]; cos/sin [T, D/2]; query [H, G, D];
   scores [H, G, T]. H*D <= MAX_CHANNELS. */
CLONES void llmlite_kv_salient_scores(const uint8_t *plain, const float *step, int bits, int64_t n_plain,
                                      const uint8_t *salient, const float *sscale, const float *smin,
                                      int sbits, const int32_t *inverse, const float *mean, const float *std,
                                      const float *cos, const float *sin, const float *query, int64_t heads,
                                      int64_t tokens, int64_t dim, int64_t group_queries, float *scores) {
    const int64_t channels = heads * dim, n_salient = channels - n_plain, half = dim / 2;
    const int64_t pwidth = (n_plain * bits + 7) / 8, swidth = (n_salient * sbits + 7) / 8;
    const float offset = 0.5f - (float)(1 << (bits - 1));
    float ordered[MAX_CHANNELS], k[MAX_CHANNELS], r[MAX_CHANNELS];
    for (int64_t t = 0; t < tokens; t++) {
        unpack_any(plain + t * pwidth, bits, n_plain, ordered);
        for (int64_t c = 0; c < n_plain; c++) ordered[c] = (ordered[c] + offset) * step[t];
        if (n_salient > 0) {
            unpack_any(salient + t * swidth, sbits, n_salient, ordered + n_plain);
            for (int64_t c = n_plain; c < channels; c++) ordered[c] = ordered[c] * sscale[t] + smin[t];
        }
        for (int64_t c = 0; c < channels; c++) k[c] = mean[c] + std[c] * ordered[inverse[c]];
        for (int64_t h = 0; h < heads; h++)
            rotate_and_score(k + h * dim, cos + t * half, sin + t * half, query + h * group_queries * dim, dim,
                             group_queries, tokens, t, r, scores + h * group_queries * tokens);
    }
}

/* codes [T, H*D*bits/8], vscale/vmin [T, ceil(H*D/group)] (a last group may be short), probs
   [H, G, T] with rows `stride` apart, out [H, G, D] (added to). H*D <= MAX_CHANNELS, a multiple of 8/bits. */
CLONES void llmlite_kv_value_sums(const uint8_t *codes, const float *vscale, const float *vmin,
                                  const float *probs, int64_t stride, int64_t heads, int64_t tokens, int64_t dim,
                                  int64_t group_queries, int bits, int64_t group, float *out) {
    const int64_t channels = heads * dim, width = channels * bits / 8, groups = (channels + group - 1) / group;
    float v[MAX_CHANNELS];
    for (int64_t t = 0; t < tokens; t++) {
        const float *s = vscale + t * groups, *m = vmin + t * groups;
        unpack(codes + t * width, bits, channels, v);
        for (int64_t g = 0; g < groups; g++) {
            const int64_t end = (g + 1) * group < channels ? (g + 1) * group : channels;
            for (int64_t c = g * group; c < end; c++) v[c] = v[c] * s[g] + m[g];
        }
        for (int64_t h = 0; h < heads; h++) {
            for (int64_t j = 0; j < group_queries; j++) {
                const float p = probs[(h * group_queries + j) * stride + t];
                float *o = out + (h * group_queries + j) * dim;
                const float *vh = v + h * dim;
                for (int64_t c = 0; c < dim; c++) o[c] += p * vh[c];
            }
        }
    }
}

/* Per-token asymmetric quantization of rows x [rows, channels] (float32) in groups of `group`
   channels (a last group may be short), as llmlite/kvcache/quant.py's quantize(axis=-1) with
   float16 statistics, bit for bit: scale = (max - min) / (2^bits - 1) and minimum rounded to
   float16, codes round((x - minimum) / scale) from the rounded values (ties to even), clamped,
   packed along the channels (first in the lowest bits, padding bits zero).
   codes [rows, ceil(channels*bits/8)], scale/minimum float16 bits [rows, ceil(channels/group)]. */
static void quantize_row(const float *row, int64_t channels, int bits, int64_t group, uint8_t *out,
                         _Float16 *scale, _Float16 *minimum) {
    const int per_byte = 8 / bits;
    const int64_t width = (channels * bits + 7) / 8, groups = (channels + group - 1) / group;
    const float qmax = (float)((1 << bits) - 1);
    for (int64_t b = 0; b < width; b++) out[b] = 0;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t start = g * group, end = start + group < channels ? start + group : channels;
        float lo = row[start], hi = row[start];
        for (int64_t c = start + 1; c < end; c++) {
            lo = row[c] < lo ? row[c] : lo;
            hi = row[c] > hi ? row[c] : hi;
        }
        const _Float16 s16 = (_Float16)((hi - lo) / qmax), m16 = (_Float16)lo;
        scale[g] = s16;
        minimum[g] = m16;
        const float s = (float)s16 == 0.0f ? 1.0f : (float)s16, m = (float)m16;
        for (int64_t c = start; c < end; c++) {
            float q = __builtin_nearbyintf((row[c] - m) / s);
            q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
            out[c / per_byte] |= (uint8_t)((int)q << (bits * (c % per_byte)));
        }
    }
}

void llmlite_kv_quantize_rows(const float *x, int64_t rows, int64_t channels, int bits, int64_t group,
                              uint8_t *codes, _Float16 *scale, _Float16 *minimum) {
    const int64_t width = (channels * bits + 7) / 8, groups = (channels + group - 1) / group;
    for (int64_t r = 0; r < rows; r++)
        quantize_row(x + r * channels, channels, bits, group, codes + r * width, scale + r * groups,
                     minimum + r * groups);
}

/* The salient scheme's store of keys (llmlite/kvcache/backend.py's TorchBackend.store_keys with
   float16 statistics: mean16/std16 [H*D]), bit for bit, for one sequence. keys [H, window, D]
   float32 as the cache holds them, after RoPE; the first `tokens` of each head's window are
   taken, rotated back to before RoPE when cos/sin [tokens, D/2] are given (kvcache/rope.py's
   order: lo*c + hi*s, hi*c + (-lo)*s, each product rounded, no fused multiply-add), then, over
   the H*D channels: z = (k - mean) / std, taken in `order` (plain channels first, n_plain of
   them); plain: step = (float16)(alpha * (float)sqrt(sum z^2 / n_plain in double)), codes
   clamp(floor(z / step) + 2^(bits-1)); salient: quantize_row at sbits, one group.
   Written from the given rows on: plain [tokens, ceil(n_plain*bits/8)], step [tokens];
   salient [tokens, ceil(n_salient*sbits/8)], sscale/smin [tokens]. H*D <= MAX_CHANNELS. */
__attribute__((optimize("fp-contract=off")))
void llmlite_kv_encode_salient(const float *keys, int64_t heads, int64_t window, int64_t tokens, int64_t dim,
                               const float *cos, const float *sin, const _Float16 *mean16,
                               const _Float16 *std16, const int32_t *order, int64_t n_plain, int bits,
                               int sbits, float alpha, uint8_t *plain, _Float16 *step, uint8_t *salient,
                               _Float16 *sscale, _Float16 *smin) {
    const int64_t channels = heads * dim, n_salient = channels - n_plain, half = dim / 2;
    const int64_t pwidth = (n_plain * bits + 7) / 8, swidth = (n_salient * sbits + 7) / 8;
    const int per_byte = 8 / bits, levels = 1 << (bits - 1);
    const float top = (float)(2 * levels - 1);
    float k[MAX_CHANNELS], z[MAX_CHANNELS], mean[MAX_CHANNELS], std[MAX_CHANNELS];
    for (int64_t c = 0; c < channels; c++) {
        mean[c] = (float)mean16[c];
        std[c] = (float)std16[c];
    }
    for (int64_t t = 0; t < tokens; t++) {
        for (int64_t h = 0; h < heads; h++) {
            const float *src = keys + (h * window + t) * dim;
            float *dst = k + h * dim;
            if (cos == NULL) {
                memcpy(dst, src, dim * sizeof *dst);
                continue;
            }
            const float *ct = cos + t * half, *st = sin + t * half;
            for (int64_t c = 0; c < half; c++) {
                const float lo_c = src[c] * ct[c], hi_s = src[c + half] * st[c];
                const float hi_c = src[c + half] * ct[c], lo_s = -src[c] * st[c];
                dst[c] = lo_c + hi_s;
                dst[c + half] = hi_c + lo_s;
            }
        }
        for (int64_t i = 0; i < channels; i++) z[i] = (k[order[i]] - mean[order[i]]) / std[order[i]];
        double squares = 0.0;
        for (int64_t i = 0; i < n_plain; i++) squares += (double)z[i] * (double)z[i];
        const float rms = n_plain ? (float)__builtin_sqrt(squares / (double)n_plain) : 0.0f;
        const _Float16 s16 = (_Float16)(alpha * rms);
        step[t] = s16;
        const float s = (float)s16 == 0.0f ? 1.0f : (float)s16;
        uint8_t *out = plain + t * pwidth;
        for (int64_t i = 0; i < pwidth; i++) out[i] = 0;
        for (int64_t i = 0; i < n_plain; i++) {
            float q = __builtin_floorf(z[i] / s) + (float)levels;
            q = q < 0.0f ? 0.0f : (q > top ? top : q);
            out[i / per_byte] |= (uint8_t)((int)q << (bits * (i % per_byte)));
        }
        if (n_salient > 0)
            quantize_row(z + n_plain, n_salient, sbits, n_salient, salient + t * swidth, sscale + t, smin + t);
    }
}

/* e^x for x <= 0 (Cephes' expf: a degree-6 polynomial on [-ln2/2, ln2/2] times 2^n), within two
   units in the last place and clamped at 2^-126 below x = -87; unlike the C library's, it
   vectorises. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_nearbyintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The float parts of one decode step and the softmax, for one sequence. Keys are, in token order,
   sinks [H, S, D], the quantized ones (their scores given: qscores [H, G, Tq]) and the recent
   window [H, Rk, D]; values sinks, Tv quantized, recent [H, Rv, D]; S + Tq + Rk = S + Tv + Rv = L.
   The last token's key and value are new_k/new_v [H, D] (exact), not the stored ones.
   Writes probs [H, G, L] (the last token's set to 0 once its exact value is added) and out [H, G, D]: the
   weighted sum of every value except the quantized ones (which llmlite_kv_value_sums adds). */
CLONES void llmlite_kv_combine(const float *query, const float *sink_k, const float *sink_v, int64_t sinks,
                        const float *qscores, int64_t tq, int64_t tv, const float *recent_k, int64_t rk,
                        const float *recent_v, int64_t rv, const float *new_k, const float *new_v,
                        int64_t heads, int64_t group_queries, int64_t dim, float *probs, float *out) {
    const int64_t length = sinks + tq + rk;
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t j = 0; j < group_queries; j++) {
            const float *q = query + (h * group_queries + j) * dim;
            float *p = probs + (h * group_queries + j) * length, *o = out + (h * group_queries + j) * dim;
            for (int64_t t = 0; t < length; t++) {
                const float *k = NULL;
                if (t < sinks) k = sink_k + (h * sinks + t) * dim;
                else if (t >= sinks + tq) k = recent_k + (h * rk + t - sinks - tq) * dim;
                if (t == length - 1) k = new_k + h * dim;
                if (k == NULL) {
                    p[t] = qscores[(h * group_queries + j) * tq + t - sinks];
                } else {
                    float acc = 0.0f;
                    for (int64_t c = 0; c < dim; c++) acc += q[c] * k[c];
                    p[t] = acc;
                }
            }
            float top = p[0], total = 0.0f;
            for (int64_t t = 1; t < length; t++) top = p[t] > top ? p[t] : top;
            for (int64_t t = 0; t < length; t++) p[t] = exp_nonpositive(p[t] - top);
            for (int64_t t = 0; t < length; t++) total += p[t];
            for (int64_t t = 0; t < length; t++) p[t] /= total;
            for (int64_t c = 0; c < dim; c++) o[c] = 0.0f;
            for (int64_t t = 0; t < length; t++) {
                const float *v = NULL;
                if (t == length - 1) v = new_v + h * dim;
                else if (t < sinks) v = sink_v + (h * sinks + t) * dim;
                else if (t >= sinks + tv) v = recent_v + (h * rv + t - sinks - tv) * dim;
                if (v == NULL) continue;
                for (int64_t c = 0; c < dim; c++) o[c] += p[t] * v[c];
            }
            p[length - 1] = 0.0f; /* its value entered exactly, above */
        }
    }
}
