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

   salient-scheme key scores (llmlite/kvcache/salient.py): per token, every channel in channel
   order as a plain one (symmetric, (code - 2^(bits-1) + 1/2) * step[t]), the salient ones then
   rewritten ((low + high * 2^bits) * sscale[t] + smin[t]), k[c] = mean[c] + std[c] * that over
   all H * D channels, then RoPE and the dot products per head as above.

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

/* A float16 (its bits) as float, exactly, by integer operations that vectorise and need no F16C
   instructions (GCC calls a library routine for a _Float16 cast unless F16C is enabled, ~5 ns a
   value): normal numbers rebias the exponent (+112), subnormals are mantissa * 2^-24, and
   infinities and NaNs keep their mantissa. */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, rest = h & 0x7fffu;
    const float subnormal = (float)rest * 5.9604644775390625e-8f;
    uint32_t small;
    memcpy(&small, &subnormal, sizeof small);
    const uint32_t normal = (rest << 13) + 0x38000000u, special = (rest << 13) | 0x7f800000u;
    const uint32_t bits = sign | (rest >= 0x7c00u ? special : rest >= 0x0400u ? normal : small);
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
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

/* codes [H, T, D*bits/8], kscale/kmin float16 [H, ceil(T/group), D], each head's rows `code_rows`
   and `stat_rows` apart (buffers with room to grow); cos/sin [T, D/2], query [H, G, D], scores
   [H, G, T]. D <= MAX_CHANNELS, D even and a multiple of 8/bits. */
CLONES void llmlite_kv_key_scores(const uint8_t *codes, const uint16_t *kscale, const uint16_t *kmin,
                                  int64_t code_rows, int64_t stat_rows, const float *cos, const float *sin,
                                  const float *query, int64_t heads, int64_t tokens, int64_t dim,
                                  int64_t group_queries, int bits, int64_t group, float *scores) {
    const int64_t width = dim * bits / 8, half = dim / 2, groups = stat_rows;
    float k[MAX_CHANNELS], r[MAX_CHANNELS], s[MAX_CHANNELS], m[MAX_CHANNELS];
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t t = 0; t < tokens; t++) {
            if (t % group == 0) { /* a new group of tokens: its channels' scales and minima */
                const uint16_t *s16 = kscale + (h * groups + t / group) * dim, *m16 = kmin + (h * groups + t / group) * dim;
                for (int64_t c = 0; c < dim; c++) {
                    s[c] = half_to_float(s16[c]);
                    m[c] = half_to_float(m16[c]);
                }
            }
            const float *ct = cos + t * half, *st = sin + t * half;
            unpack(codes + (h * code_rows + t) * width, bits, dim, k);
            for (int64_t c = 0; c < dim; c++) k[c] = k[c] * s[c] + m[c];
            rotate_and_score(k, ct, st, query + h * group_queries * dim, dim, group_queries, tokens, t, r,
                             scores + h * group_queries * tokens);
        }
    }
}

/* The salient scheme's keys (see llmlite_kv_encode_salient): low [T, H*D*bits/8] with step [T];
   high [T, ceil(n_salient*(sbits-bits)/8)] with sscale/smin [T]; chosen int32 [n_salient]; mean/std
   [H*D]; statistics float16; cos/sin [T, D/2]; query [H, G, D]; scores [H, G, T]. Every channel is
   read in channel order (no gather), then the salient ones are rewritten; H*D <= MAX_CHANNELS and
   a multiple of 8/bits. */
CLONES void llmlite_kv_salient_scores(const uint8_t *low, const uint16_t *step, int bits, const uint8_t *high,
                                      const uint16_t *sscale, const uint16_t *smin, int sbits,
                                      const int32_t *chosen, int64_t n_salient, const uint16_t *mean16,
                                      const uint16_t *std16, const float *cos, const float *sin,
                                      const float *query, int64_t heads, int64_t tokens, int64_t dim,
                                      int64_t group_queries, float *scores) {
    const int64_t channels = heads * dim, half = dim / 2, high_bits = sbits - bits;
    const int64_t lwidth = channels * bits / 8, hwidth = (n_salient * high_bits + 7) / 8;
    const float offset = 0.5f - (float)(1 << (bits - 1)), lift = (float)(1 << bits);
    float codes[MAX_CHANNELS], k[MAX_CHANNELS], r[MAX_CHANNELS], up[MAX_CHANNELS];
    float mean[MAX_CHANNELS], std[MAX_CHANNELS];
    for (int64_t c = 0; c < channels; c++) {
        mean[c] = half_to_float(mean16[c]);
        std[c] = half_to_float(std16[c]);
    }
    for (int64_t j = 0; j < n_salient; j++) up[j] = 0.0f;
    for (int64_t t = 0; t < tokens; t++) {
        unpack(low + t * lwidth, bits, channels, codes);
        const float s = half_to_float(step[t]);
        for (int64_t c = 0; c < channels; c++) k[c] = mean[c] + std[c] * ((codes[c] + offset) * s);
        if (n_salient > 0) {
            if (high_bits) unpack_any(high + t * hwidth, high_bits, n_salient, up);
            const float ss = half_to_float(sscale[t]), sm = half_to_float(smin[t]);
            for (int64_t j = 0; j < n_salient; j++) {
                const int64_t c = chosen[j];
                k[c] = mean[c] + std[c] * ((codes[c] + up[j] * lift) * ss + sm);
            }
        }
        for (int64_t h = 0; h < heads; h++)
            rotate_and_score(k + h * dim, cos + t * half, sin + t * half, query + h * group_queries * dim, dim,
                             group_queries, tokens, t, r, scores + h * group_queries * tokens);
    }
}

/* codes [T, H*D*bits/8], vscale/vmin float16 [T, ceil(H*D/group)] (a last group may be short),
   probs [H, G, T] with rows `stride` apart, out [H, G, D] (added to). With `rotation` [D, D]
   (the salient scheme's values, stored rotated within each head), the sums are taken in the rotated
   basis and turned back once: out += sums @ rotation. H*D <= MAX_CHANNELS, a multiple of 8/bits. */
CLONES void llmlite_kv_value_sums(const uint8_t *codes, const uint16_t *vscale, const uint16_t *vmin,
                                  const float *probs, int64_t stride, int64_t heads, int64_t tokens, int64_t dim,
                                  int64_t group_queries, int bits, int64_t group, const float *rotation,
                                  float *out) {
    const int64_t channels = heads * dim, width = channels * bits / 8, groups = (channels + group - 1) / group;
    float v[MAX_CHANNELS], sums[MAX_CHANNELS * 8], *acc = out;
    if (rotation != NULL) {
        if (heads * group_queries * dim > MAX_CHANNELS * 8) return; /* fused.unsupported refuses these */
        acc = sums;
        for (int64_t i = 0; i < heads * group_queries * dim; i++) acc[i] = 0.0f;
    }
    for (int64_t t = 0; t < tokens; t++) {
        unpack(codes + t * width, bits, channels, v);
        for (int64_t g = 0; g < groups; g++) {
            const int64_t end = (g + 1) * group < channels ? (g + 1) * group : channels;
            const float s = half_to_float(vscale[t * groups + g]), m = half_to_float(vmin[t * groups + g]);
            for (int64_t c = g * group; c < end; c++) v[c] = v[c] * s + m;
        }
        for (int64_t h = 0; h < heads; h++) {
            for (int64_t j = 0; j < group_queries; j++) {
                const float p = probs[(h * group_queries + j) * stride + t];
                float *o = acc + (h * group_queries + j) * dim;
                const float *vh = v + h * dim;
                for (int64_t c = 0; c < dim; c++) o[c] += p * vh[c];
            }
        }
    }
    if (rotation != NULL) {
        for (int64_t i = 0; i < heads * group_queries; i++)
            for (int64_t r = 0; r < dim; r++) {
                const float a = acc[i * dim + r];
                for (int64_t c = 0; c < dim; c++) out[i * dim + c] += a * rotation[r * dim + c];
            }
    }
}

/* Per-token asymmetric quantization of rows x [rows, channels] (float32) in groups of `group`
   channels (a last group may be short), as llmlite/kvcache/quant.py's quantize(axis=-1) with
   float16 statistics, bit for bit: scale = (max - min) / (2^bits - 1) and minimum rounded to
   float16, codes round((x - minimum) / scale) from the rounded values (ties to even), clamped,
   packed along the channels (first in the lowest bits, padding bits zero).
   codes [rows, ceil(channels*bits/8)], scale/minimum float16 bits [rows, ceil(channels/group)]. */
static void quantize_codes(const float *row, int64_t n, int bits, uint8_t *codes, _Float16 *scale,
                           _Float16 *minimum) {
    const float qmax = (float)((1 << bits) - 1);
    float lo = row[0], hi = row[0];
    for (int64_t c = 1; c < n; c++) {
        lo = row[c] < lo ? row[c] : lo;
        hi = row[c] > hi ? row[c] : hi;
    }
    const _Float16 s16 = (_Float16)((hi - lo) / qmax), m16 = (_Float16)lo;
    *scale = s16;
    *minimum = m16;
    const float s = (float)s16 == 0.0f ? 1.0f : (float)s16, m = (float)m16;
    for (int64_t c = 0; c < n; c++) {
        float q = __builtin_nearbyintf((row[c] - m) / s);
        codes[c] = (uint8_t)(q < 0.0f ? 0.0f : (q > qmax ? qmax : q));
    }
}

/* codes [n] (each < 2^bits) packed 8/bits to a byte, the first in the lowest bits, padding zero */
static void pack_codes(const uint8_t *codes, int64_t n, int bits, uint8_t *out) {
    const int per_byte = 8 / bits;
    for (int64_t b = 0; b < (n * bits + 7) / 8; b++) out[b] = 0;
    for (int64_t c = 0; c < n; c++) out[c / per_byte] |= (uint8_t)(codes[c] << (bits * (c % per_byte)));
}

static void quantize_row(const float *row, int64_t channels, int bits, int64_t group, uint8_t *out,
                         _Float16 *scale, _Float16 *minimum) {
    uint8_t codes[MAX_CHANNELS];
    for (int64_t g = 0, start = 0; start < channels; g++, start += group) {
        const int64_t n = start + group < channels ? group : channels - start;
        quantize_codes(row + start, n, bits, codes + start, scale + g, minimum + g);
    }
    pack_codes(codes, channels, bits, out);
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
   the H*D channels: z = (k - mean) / std; step = (float16)(alpha * (float)sqrt(sum of z^2 over
   the n_plain plain channels, in double, / n_plain)); every channel's code clamp(floor(z / step)
   + 2^(bits-1)); the salient channels (`chosen`, ascending) quantized together at sbits
   (quantize_codes), their low `bits` bits replacing their codes and the rest in `high`.
   Written from the given rows on: low [tokens, H*D*bits/8], step [tokens], high [tokens,
   ceil(n_salient*(sbits-bits)/8)], sscale/smin [tokens]. H*D <= MAX_CHANNELS. */
__attribute__((optimize("fp-contract=off")))
void llmlite_kv_encode_salient(const float *keys, int64_t heads, int64_t window, int64_t tokens, int64_t dim,
                               const float *cos, const float *sin, const _Float16 *mean16,
                               const _Float16 *std16, const int32_t *chosen, int64_t n_salient, int bits,
                               int sbits, float alpha, uint8_t *low, _Float16 *step, uint8_t *high,
                               _Float16 *sscale, _Float16 *smin) {
    const int64_t channels = heads * dim, n_plain = channels - n_salient, half = dim / 2;
    const int high_bits = sbits - bits, levels = 1 << (bits - 1);
    const int64_t lwidth = (channels * bits + 7) / 8, hwidth = (n_salient * high_bits + 7) / 8;
    const float top = (float)(2 * levels - 1);
    float k[MAX_CHANNELS], z[MAX_CHANNELS], zs[MAX_CHANNELS], mean[MAX_CHANNELS], std[MAX_CHANNELS];
    uint8_t codes[MAX_CHANNELS], scodes[MAX_CHANNELS], is_salient[MAX_CHANNELS];
    for (int64_t c = 0; c < channels; c++) {
        mean[c] = (float)mean16[c];
        std[c] = (float)std16[c];
        is_salient[c] = 0;
    }
    for (int64_t j = 0; j < n_salient; j++) is_salient[chosen[j]] = 1;
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
        double squares = 0.0;
        for (int64_t c = 0; c < channels; c++) {
            z[c] = (k[c] - mean[c]) / std[c];
            if (!is_salient[c]) squares += (double)z[c] * (double)z[c];
        }
        const float rms = n_plain ? (float)__builtin_sqrt(squares / (double)n_plain) : 0.0f;
        const _Float16 s16 = (_Float16)(alpha * rms);
        step[t] = s16;
        const float s = (float)s16 == 0.0f ? 1.0f : (float)s16;
        for (int64_t c = 0; c < channels; c++) {
            float q = __builtin_floorf(z[c] / s) + (float)levels;
            codes[c] = (uint8_t)(q < 0.0f ? 0.0f : (q > top ? top : q));
        }
        if (n_salient > 0) {
            for (int64_t j = 0; j < n_salient; j++) zs[j] = z[chosen[j]];
            quantize_codes(zs, n_salient, sbits, scodes, sscale + t, smin + t);
            for (int64_t j = 0; j < n_salient; j++) {
                codes[chosen[j]] = scodes[j] & ((1 << bits) - 1);
                scodes[j] >>= bits;
            }
            if (high_bits) pack_codes(scodes, n_salient, high_bits, high + t * hwidth);
        }
        pack_codes(codes, channels, bits, low + t * lwidth);
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

static inline float dot_half(const float *q, const uint16_t *k, int64_t dim) {
    float acc = 0.0f;
    for (int64_t c = 0; c < dim; c++) acc += q[c] * half_to_float(k[c]);
    return acc;
}

/* The float parts of one decode step and the softmax, for one sequence. Keys are, in token order,
   sinks [H, S, D], the quantized ones (their scores given: qscores [H, G, Tq]) and the recent
   window [H, Rk, D]; values sinks, Tv quantized, recent [H, Rv, D]; S + Tq + Rk = S + Tv + Rv = L.
   Sinks and recent tokens are float16 (their bits), as the cache stores them. The last token's
   key and value are new_k/new_v [H, D] (float32, exact), not the stored ones.
   Writes probs [H, G, L] (the last token's set to 0 once its exact value is added) and out [H, G, D]: the
   weighted sum of every value except the quantized ones (which llmlite_kv_value_sums adds). */
CLONES void llmlite_kv_combine(const float *query, const uint16_t *sink_k, const uint16_t *sink_v, int64_t sinks,
                        const float *qscores, int64_t tq, int64_t tv, const uint16_t *recent_k, int64_t rk,
                        const uint16_t *recent_v, int64_t rv, const float *new_k, const float *new_v,
                        int64_t heads, int64_t group_queries, int64_t dim, float *probs, float *out) {
    const int64_t length = sinks + tq + rk;
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t j = 0; j < group_queries; j++) {
            const float *q = query + (h * group_queries + j) * dim, *nk = new_k + h * dim;
            float *p = probs + (h * group_queries + j) * length, *o = out + (h * group_queries + j) * dim;
            for (int64_t t = 0; t < length - 1; t++) {
                if (t < sinks) p[t] = dot_half(q, sink_k + (h * sinks + t) * dim, dim);
                else if (t >= sinks + tq) p[t] = dot_half(q, recent_k + (h * rk + t - sinks - tq) * dim, dim);
                else p[t] = qscores[(h * group_queries + j) * tq + t - sinks];
            }
            float acc = 0.0f;
            for (int64_t c = 0; c < dim; c++) acc += q[c] * nk[c];
            p[length - 1] = acc;
            float top = p[0], total = 0.0f;
            for (int64_t t = 1; t < length; t++) top = p[t] > top ? p[t] : top;
            for (int64_t t = 0; t < length; t++) p[t] = exp_nonpositive(p[t] - top);
            for (int64_t t = 0; t < length; t++) total += p[t];
            for (int64_t t = 0; t < length; t++) p[t] /= total;
            for (int64_t c = 0; c < dim; c++) o[c] = p[length - 1] * new_v[h * dim + c];
            for (int64_t t = 0; t < length - 1; t++) {
                const uint16_t *v = NULL;
                if (t < sinks) v = sink_v + (h * sinks + t) * dim;
                else if (t >= sinks + tv) v = recent_v + (h * rv + t - sinks - tv) * dim;
                if (v == NULL) continue;
                for (int64_t c = 0; c < dim; c++) o[c] += p[t] * half_to_float(v[c]);
            }
            p[length - 1] = 0.0f; /* its value entered exactly, above */
        }
    }
}
