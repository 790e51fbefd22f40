// Decode attention over the paged KV pool, read in place (shards/attention.py builds and loads it).
//
// One query token per sequence. Pools are [n_kv, blocks, 16, head_dim] fp32 (shards/kv_cache.py);
// each (sequence, KV head) walks its blocks once, scores its G = heads / n_kv queries against a
// block's 16 keys, updates an online softmax and accumulates the block's values, so K and V are
// read once from memory (the next block is prefetched while this one computes) and the
// accumulators stay in registers (G and head_dim are template constants).
// Written with GCC vector extensions: AVX-512 with -march=native where the CPU has it, AVX2 or
// SSE otherwise, from the same source.
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
static const int64_t BS = 16;      // keys per block: the vector width

// lanes 0-7: sums of a's lane pairs, 8-15: b's; four levels keep the keys in order
static inline v16 pairsum(v16 a, v16 b) {
    const i16 ev = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const i16 od = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    return __builtin_shuffle(a, b, ev) + __builtin_shuffle(a, b, od);
}

// r[u] = the sum of a[u]'s 16 lanes
static inline v16 reduce16(const v16 *a) {
    v16 r1[8], r2[4], r3[2];
    for (int i = 0; i < 8; i++) r1[i] = pairsum(a[2 * i], a[2 * i + 1]);
    for (int i = 0; i < 4; i++) r2[i] = pairsum(r1[2 * i], r1[2 * i + 1]);
    for (int i = 0; i < 2; i++) r3[i] = pairsum(r2[2 * i], r2[2 * i + 1]);
    return pairsum(r3[0], r3[1]);
}

static inline float hsum(v16 v) {
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

static inline float hmax(v16 v) {        // a tree of vector maxima: max is exact in any order
    const i16 hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    const i16 hi4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const i16 hi2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const i16 hi1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    v16 w = __builtin_shuffle(v, hi8);
    v = v > w ? v : w;
    w = __builtin_shuffle(v, hi4);
    v = v > w ? v : w;
    w = __builtin_shuffle(v, hi2);
    v = v > w ? v : w;
    w = __builtin_shuffle(v, hi1);
    v = v > w ? v : w;
    return v[0];
}

// exp(x) for x <= 0: Cephes' expf (range reduction by ln 2, degree-6 polynomial), relative
// error ~2e-7; below -87 it gives exp(-87) ~ 1.6e-38 instead of 0 (a weight no sum notices)
static inline v16 vexp(v16 x) {
    const v16 lo = x * 0.f - 87.f;
    x = x < lo ? lo : x;
    const v16 t = x * 1.44269504f + 0.5f;
    // floor(t) in vectors (a lane-by-lane floorf compiled to 16 scalar rounds): truncate, then
    // step down where that rounded up; exact for t in [-125, 1], all it sees
    v16 n = __builtin_convertvector(__builtin_convertvector(t, i16), v16);
    n = n > t ? n - 1.f : n;
    const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const i16 e = (__builtin_convertvector(n, i16) + 127) << 23;
    v16 s;
    memcpy(&s, &e, sizeof s);
    return p * s;
}

static inline void prefetch(const float *p, int64_t floats) {
    for (int64_t o = 0; o < floats; o += 16) __builtin_prefetch(p + o);
}

// One (sequence, KV head): G queries (q, [G, 16 * C]) over the first T keys of the blocks `ids`
// of pools kp, vp (already offset to the head); writes o [G, 16 * C].
template <int G, int C>
static void attend(const float *q_in, const float *kp, const float *vp, const int64_t *ids,
                   int64_t T, float *o, float scale) {
    const int64_t hd = 16 * C, be = BS * hd, nbl = (T + BS - 1) / BS;
    v16 q[G][C], acc[G][C];
    float m[G], l[G];
    for (int j = 0; j < G; j++) {
        for (int c = 0; c < C; c++) {
            memcpy(&q[j][c], q_in + j * hd + 16 * c, 64);
            q[j][c] *= scale;
            acc[j][c] = q[j][c] * 0.f;
        }
        m[j] = -3.0e38f;
        l[j] = 0.f;
    }
    for (int64_t i = 0; i < nbl; i++) {
        const float *kb = kp + ids[i] * be, *vb = vp + ids[i] * be;
        if (i + 1 < nbl) {
            prefetch(kp + ids[i + 1] * be, be);
            prefetch(vp + ids[i + 1] * be, be);
        }
        const int64_t tn = T - BS * i < BS ? T - BS * i : BS;   // keys of this block in use
        v16 p[G];
        for (int j = 0; j < G; j++) {
            v16 a[BS];
            for (int u = 0; u < BS; u++) {
                v16 k;
                memcpy(&k, kb + u * hd, 64);
                a[u] = q[j][0] * k;
                for (int c = 1; c < C; c++) {
                    memcpy(&k, kb + u * hd + 16 * c, 64);
                    a[u] += q[j][c] * k;
                }
            }
            v16 s = reduce16(a);
            for (int64_t u = tn; u < BS; u++) s[u] = -3.0e38f;
            const float bm = hmax(s), nm = bm > m[j] ? bm : m[j];
            p[j] = vexp(s - nm);
            v16 d = {};
            d += m[j] - nm;
            const float alpha = vexp(d)[0];       // rescales what earlier blocks summed
            m[j] = nm;
            l[j] = l[j] * alpha + hsum(p[j]);
            for (int c = 0; c < C; c++) acc[j][c] *= alpha;
        }
        for (int64_t u = 0; u < tn; u++) {
            v16 v[C];
            for (int c = 0; c < C; c++) memcpy(&v[c], vb + u * hd + 16 * c, 64);
            for (int j = 0; j < G; j++)
                for (int c = 0; c < C; c++) acc[j][c] += p[j][u] * v[c];
        }
    }
    for (int j = 0; j < G; j++)
        for (int c = 0; c < C; c++) {
            const v16 r = acc[j][c] / l[j];
            memcpy(o + j * hd + 16 * c, &r, 64);
        }
}

typedef void (*attend_fn)(const float *, const float *, const float *, const int64_t *, int64_t,
                          float *, float);

template <int C>
static attend_fn pick_g(int64_t g) {
    switch (g) {
        case 1: return attend<1, C>;
        case 2: return attend<2, C>;
        case 3: return attend<3, C>;
        case 4: return attend<4, C>;
        case 5: return attend<5, C>;
        case 6: return attend<6, C>;
        case 7: return attend<7, C>;
        case 8: return attend<8, C>;
        default: return nullptr;
    }
}

static attend_fn pick(int64_t g, int64_t hd) {
    switch (hd) {
        case 16: return pick_g<1>(g);
        case 32: return pick_g<2>(g);
        case 64: return pick_g<4>(g);
        case 128: return pick_g<8>(g);
        default: return nullptr;
    }
}

extern "C" {

// 1 when (group, head_dim) has a kernel: group 1-8, head_dim 16 / 32 / 64 / 128
int paged_decode_attention_supports(int64_t g, int64_t hd) { return pick(g, hd) != nullptr; }

// q, out: [B, nh, hd]; kp, vp: [nkv, nblk, 16, hd]; block_ids: [B, nb]; lens: [B] keys to
// attend per sequence (1 to nb * 16). Returns 0; -1 for an unsupported shape; -2 when a length
// or a block id it would read lies outside those bounds (nothing is read or written then).
int paged_decode_attention(const float *q, const float *kp, const float *vp,
                           const int64_t *block_ids, const int64_t *lens, float *out,
                           int64_t B, int64_t nh, int64_t nkv, int64_t hd, int64_t nb,
                           int64_t nblk, float scale, int threads) {
    const int64_t g = nh / nkv;
    const attend_fn f = pick(g, hd);
    if (f == nullptr || g * nkv != nh) return -1;
    for (int64_t b = 0; b < B; b++) {       // a bad table must not become a wild read
        if (lens[b] < 1 || lens[b] > nb * BS) return -2;
        for (int64_t i = 0; i < (lens[b] + BS - 1) / BS; i++)
            if (block_ids[b * nb + i] < 0 || block_ids[b * nb + i] >= nblk) return -2;
    }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t job = 0; job < B * nkv; job++) {
        const int64_t b = job / nkv, h = job % nkv, off = (b * nh + h * g) * hd;
        f(q + off, kp + h * nblk * BS * hd, vp + h * nblk * BS * hd, block_ids + b * nb, lens[b],
          out + off, scale);
    }
    return 0;
}

}
