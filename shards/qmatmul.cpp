// y = x W^T with W in groups of 32 inputs (4-bit codes, as GGUF's Q4_1, or 8-bit, as Q8_0) and x
// rounded to int8 per group: llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products, laid out so
// that one AVX-512 VNNI instruction serves 16 output rows at once (shards/qmatmul.py loads and
// calls it; shards/kernels.py builds it).
//
// W [N, K]: per output row and group of 32 inputs, unsigned codes u (0..15, or 0..255), a scale
// d and a minimum m (fp16, as the GGUF stores them): w = d u + m (Q4_1 as it is; Q8_0's signed
// q as u = q + 128, m = -128 d). x [B, K] fp32: per row and group, xq = round(x / a) with
// a = max|x| / 127, and the group's fp32 sum s. Then
//     y[b, n] = sum over groups g of  d[n, g] a[b, g] sum_k u[n, k] xq[b, k]  +  m[n, g] s[b, g],
// the integer sums exact (vpdpbusd: unsigned weight bytes times signed activation bytes).
// With levels = 2 the residual of x's rounding is rounded to int8 per group again, x ~ a1 xq1 +
// a2 xq2 (~15 bits a group), and both products are summed.
//
// Packed weights: panels of 16 output rows. 4-bit: [N / 16, K / 8, 64] bytes, byte 4 r + j of
// chunk c holding u[16 p + r, 8 c + j] in its low nibble and u[16 p + r, 8 c + 4 + j] in its
// high one; 8-bit: [N / 16, K / 4, 64], byte 4 r + j of chunk c holding u[16 p + r, 4 c + j]. So
// a 64-byte load gives (4-bit: after an and / shift) the 16 rows x 4 inputs one dpbusd takes,
// against one broadcast 4-byte word of xq: no horizontal sums. Scales: [N / 16, K / 32, 2, 16]
// fp16, (d, m) of the panel's 16 rows per group. A row's result is computed the same way
// whatever the batch (tiles of up to 8 activation rows share each weight vector). The portable
// path (no AVX-512 VNNI, or SHARDSERVE_GENERIC) does the same arithmetic in the same order, so
// both give the same bits.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(SHARDSERVE_GENERIC)
#include <immintrin.h>
#define QM_FAST 1
#else
#define QM_FAST 0
#endif

static const int64_t PANEL = 16;   // output rows per panel: the int32 lanes of a vector
static const int64_t GROUP = 32;   // inputs per (d, m) and per activation scale
static const int64_t TILE = 8;     // activation rows (x rows times levels) sharing a weight vector

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef int8_t c16 __attribute__((vector_size(16)));

// one row x [K] -> per level l: xq [l][K] int8 (rows K apart), a [l][K / 32] (scales, rows
// ng apart); s [K / 32] the group's sum, in a fixed order. GCC vector extensions: the same
// code, and bits, in both paths.
static void quantize_row(const float *x, int64_t K, int levels, int8_t *xq, float *a, float *s) {
    const int64_t ng = K / GROUP;
    const v16 magic = v16{} + 12582912.f;        // 1.5 * 2^23: adding it rounds to nearest even
    for (int64_t g = 0; g < ng; g++) {
        v16 u, v;
        memcpy(&u, x + g * GROUP, 64);
        memcpy(&v, x + g * GROUP + 16, 64);
        const v16 t = u + v;
        float h[8];
        for (int i = 0; i < 8; i++) h[i] = t[i] + t[i + 8];
        for (int i = 0; i < 4; i++) h[i] += h[i + 4];
        s[g] = (h[0] + h[2]) + (h[1] + h[3]);
        for (int l = 0; l < levels; l++) {
            const v16 au = u < 0 ? -u : u, av = v < 0 ? -v : v;
            const v16 mx = au > av ? au : av;
            float amax = 0.f;
            for (int i = 0; i < 16; i++) amax = mx[i] > amax ? mx[i] : amax;
            const float inv = amax > 0.f ? 127.f / amax : 0.f, scale = amax / 127.f;
            const v16 ru = (u * inv + magic) - magic, rv = (v * inv + magic) - magic;
            const c16 qu = __builtin_convertvector(__builtin_convertvector(ru, i16), c16);
            const c16 qv = __builtin_convertvector(__builtin_convertvector(rv, i16), c16);
            memcpy(xq + l * K + g * GROUP, &qu, 16);
            memcpy(xq + l * K + g * GROUP + 16, &qv, 16);
            a[l * ng + g] = scale;
            u = u - ru * scale;                      // the residual, for the next level
            v = v - rv * scale;
        }
    }
}

static inline float half_to_float(uint16_t h) {
    return (float)*reinterpret_cast<const _Float16 *>(&h);
}

// 64-byte weight chunks per group, and inputs each chunk covers
template <int BITS> struct Layout {
    static const int chunks = BITS == 4 ? 4 : 8;
    static const int inputs = GROUP / chunks;
};

// NB rows of x (NB * L activation rows, levels interleaved) against one panel of 16 output rows
#if QM_FAST
template <int BITS, int NB, int L>
static void tile(const uint8_t *w, const uint16_t *sc, const int8_t *xq, const float *a, const float *s,
                 int64_t K, float *y, int64_t N) {
    typedef Layout<BITS> lay;
    const int64_t ng = K / GROUP;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[NB];
    for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i dot[NB * L];
        for (int r = 0; r < NB * L; r++) dot[r] = _mm512_setzero_si512();
        for (int c = 0; c < lay::chunks; c++) {
            const __m512i v = _mm512_loadu_si512(w + (g * lay::chunks + c) * 64);
            const __m512i lo = BITS == 4 ? _mm512_and_si512(v, low) : v;
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            for (int r = 0; r < NB * L; r++) {
                const int8_t *q = xq + r * K + g * GROUP + c * lay::inputs;
                int32_t q0, q1;
                memcpy(&q0, q, 4);
                dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(q0));
                if (BITS == 4) {
                    memcpy(&q1, q + 4, 4);
                    dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(q1));
                }
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + g * 32)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + g * 32 + 16)));
        for (int b = 0; b < NB; b++) {
            for (int l = 0; l < L; l++)
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[b * L + l]),
                                         _mm512_mul_ps(d, _mm512_set1_ps(a[(b * L + l) * ng + g])), acc[b]);
            acc[b] = _mm512_fmadd_ps(m, _mm512_set1_ps(s[b * ng + g]), acc[b]);
        }
    }
    for (int b = 0; b < NB; b++) _mm512_storeu_ps(y + b * N, acc[b]);
}
#else
template <int BITS, int NB, int L>
static void tile(const uint8_t *w, const uint16_t *sc, const int8_t *xq, const float *a, const float *s,
                 int64_t K, float *y, int64_t N) {
    typedef Layout<BITS> lay;
    const int64_t ng = K / GROUP;
    float acc[NB][PANEL] = {};
    for (int64_t g = 0; g < ng; g++) {
        int32_t dot[NB * L][PANEL] = {};
        for (int c = 0; c < lay::chunks; c++) {
            const uint8_t *v = w + (g * lay::chunks + c) * 64;
            for (int r = 0; r < NB * L; r++) {
                const int8_t *q = xq + r * K + g * GROUP + c * lay::inputs;
                for (int n = 0; n < PANEL; n++)
                    for (int j = 0; j < 4; j++)
                        dot[r][n] += BITS == 4 ? (v[4 * n + j] & 15) * q[j] + (v[4 * n + j] >> 4) * q[4 + j]
                                               : v[4 * n + j] * q[j];
            }
        }
        for (int b = 0; b < NB; b++)
            for (int n = 0; n < PANEL; n++) {
                const float d = half_to_float(sc[g * 32 + n]), m = half_to_float(sc[g * 32 + 16 + n]);
                for (int l = 0; l < L; l++)
                    acc[b][n] = fmaf((float)dot[b * L + l][n], d * a[(b * L + l) * ng + g], acc[b][n]);
                acc[b][n] = fmaf(m, s[b * ng + g], acc[b][n]);
            }
    }
    for (int b = 0; b < NB; b++) memcpy(y + b * N, acc[b], sizeof acc[b]);
}
#endif

typedef void (*tile_fn)(const uint8_t *, const uint16_t *, const int8_t *, const float *, const float *,
                        int64_t, float *, int64_t);

template <int BITS> struct Tiles {   // [levels - 1][x rows - 1]
    static constexpr tile_fn one[TILE] = {tile<BITS, 1, 1>, tile<BITS, 2, 1>, tile<BITS, 3, 1>, tile<BITS, 4, 1>,
                                          tile<BITS, 5, 1>, tile<BITS, 6, 1>, tile<BITS, 7, 1>, tile<BITS, 8, 1>};
    static constexpr tile_fn two[TILE / 2] = {tile<BITS, 1, 2>, tile<BITS, 2, 2>, tile<BITS, 3, 2>, tile<BITS, 4, 2>};
};

extern "C" {

int qmatmul_fast() { return QM_FAST; }

// x [B, K] fp32, packed (layout above, `bits` 4 or 8), scales [N / 16, K / 32, 2, 16] fp16 ->
// y [B, N] fp32, with x rounded to `levels` (1 or 2) int8 levels. Returns -1 when N is not a
// multiple of 16, K of 32, bits is not 4 or 8, or levels not 1 or 2.
int qmatmul(const float *x, const uint8_t *packed, const uint16_t *scales, float *y,
            int64_t B, int64_t N, int64_t K, int bits, int levels, int threads) {
    if (N % PANEL || K % GROUP || B < 0 || (bits != 4 && bits != 8) || (levels != 1 && levels != 2)) return -1;
    const int64_t ng = K / GROUP, rows = TILE / levels, panel_bytes = K * PANEL * bits / 8;
    const tile_fn *tiles = bits == 4 ? (levels == 1 ? Tiles<4>::one : Tiles<4>::two)
                                     : (levels == 1 ? Tiles<8>::one : Tiles<8>::two);
    std::vector<int8_t> xq(B * levels * K);
    std::vector<float> a(B * levels * ng), s(B * ng);
    #pragma omp parallel for schedule(static) num_threads(threads) if (B >= 16)
    for (int64_t b = 0; b < B; b++)
        quantize_row(x + b * K, K, levels, &xq[b * levels * K], &a[b * levels * ng], &s[b * ng]);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < N / PANEL; p++) {
        const uint8_t *w = packed + p * panel_bytes;
        const uint16_t *sc = scales + p * ng * 32;
        for (int64_t b0 = 0; b0 < B; b0 += rows) {
            const int64_t nb = B - b0 < rows ? B - b0 : rows;
            tiles[nb - 1](w, sc, &xq[b0 * levels * K], &a[b0 * levels * ng], &s[b0 * ng], K,
                          y + b0 * N + p * PANEL, N);
        }
    }
    return 0;
}
}
