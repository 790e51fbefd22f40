// Decode attention over the paged KV pool, read in place (shards/model/attention.py builds and loads it).
//
// One query token per sequence. Pools are [n_kv, blocks, 16, head_dim] fp32 (shards/model/kv_cache.py);
// each (sequence, KV head) walks its blocks once (a long one in segments of 512 keys, see SEG),
// scores its G = heads / n_kv queries against a block's 16 keys, updates an online softmax and
// accumulates the block's values, so K and V are read once from memory (the next block is
// prefetched while this one computes) and the accumulators stay in registers (G and head_dim
// are template constants). A step on one torch thread shares its jobs with the 4-bit kernel's
// team where that is on (paged_decode_attention_team).
// Written with GCC vector extensions: with -march=native, AVX-512 where the CPU has it; elsewhere
// (AVX2, SSE; or SHARDSERVE_ATTN8; SHARDSERVE_ATTN16 keeps attend) attend8 below, the same arithmetic in 8-lane vectors whose
// loops fit 16 registers (the 16-lane source split into AVX2 halves spilled: us a layer, 1
// thread, 3 KV heads x 3 queries x 64 dims, 280 keys, 15 layers' pools cycled, on an AMD EPYC
// (Zen 3) at batch 1 / 16 / 32: 177 / 2430 / 4710 against attend8's 82 / 1140 / 2187); the
// two give the same bits.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

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

// One (sequence, KV head): G queries (q, [G, 16 * C]) over blocks [i0, i1) of the blocks `ids`
// of pools kp, vp (already offset to the head), of which the first T keys are the sequence's.
// ml null: writes the attention o [G, 16 * C]; else a segment's partials for combine(): o the
// unnormalized sums, ml [G, 2] each query's running maximum and sum of weights.
template <int G, int C>
static void attend(const float *q_in, const float *kp, const float *vp, const int64_t *ids,
                   int64_t T, int64_t i0, int64_t i1, float *o, float *ml, float scale) {
    const int64_t hd = 16 * C, be = BS * hd;
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
    for (int64_t i = i0; i < i1; i++) {
        const float *kb = kp + ids[i] * be, *vb = vp + ids[i] * be;
        if (i + 1 < i1) {
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
    for (int j = 0; j < G; j++) {
        if (ml) ml[2 * j] = m[j], ml[2 * j + 1] = l[j];
        for (int c = 0; c < C; c++) {
            const v16 r = ml ? acc[j][c] : acc[j][c] / l[j];
            memcpy(o + j * hd + 16 * c, &r, 64);
        }
    }
}

#if defined(SHARDSERVE_ATTN8) || (!defined(__AVX512F__) && !defined(SHARDSERVE_ATTN16))
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

// adjacent pair sums, AVX's vhaddps: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]
static inline v8 hadd(v8 a, v8 b) {
    const i8 ev = {0, 2, 8, 10, 4, 6, 12, 14}, od = {1, 3, 9, 11, 5, 7, 13, 15};
    return __builtin_shuffle(a, b, ev) + __builtin_shuffle(a, b, od);
}

// r[u] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) of a[u]: reduce16's tree over 8 lanes
static inline v8 reduce8(const v8 *a) {
    const v8 x = hadd(hadd(a[0], a[1]), hadd(a[2], a[3])), y = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
    const i8 lo = {0, 1, 2, 3, 8, 9, 10, 11}, hi = {4, 5, 6, 7, 12, 13, 14, 15};
    return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}

// 8 keys' scores (from key k0 of block kb) for query q [16 * C]: lane i of a 16-lane chunk is lane
// i % 8 of its half, so the sums are attend's; s = tree(low halves) + tree(high halves)
template <int C>
static inline v8 scores8(const float *q, const float *kb, int64_t hd) {
    v8 t[2];
    for (int h = 0; h < 2; h++) {
        v8 a[8];
        for (int u = 0; u < 8; u++) {
            v8 k, qc;
            memcpy(&k, kb + u * hd + 8 * h, 32);
            memcpy(&qc, q + 8 * h, 32);
            a[u] = qc * k;
            for (int c = 1; c < C; c++) {
                memcpy(&k, kb + u * hd + 16 * c + 8 * h, 32);
                memcpy(&qc, q + 16 * c + 8 * h, 32);
                a[u] += qc * k;
            }
        }
        t[h] = reduce8(a);
    }
    return t[0] + t[1];
}

static inline v8 vexp8(v8 x) {     // vexp in 8 lanes: the same operations
    const v8 lo = x * 0.f - 87.f;
    x = x < lo ? lo : x;
    const v8 t = x * 1.44269504f + 0.5f;
    v8 n = __builtin_convertvector(__builtin_convertvector(t, i8), v8);
    n = n > t ? n - 1.f : n;
    const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const i8 e = (__builtin_convertvector(n, i8) + 127) << 23;
    v8 s;
    memcpy(&s, &e, sizeof s);
    return p * s;
}

// a power of two dividing C2 (a row's 8-lane chunks) with G x it accumulators in 12 registers
constexpr int row_chunks(int G, int C2) {
    int n = 1;
    while (2 * n * G <= 12 && 2 * n <= C2) n *= 2;
    return n;
}

// attend in 8 lanes: the G queries' scores of a block first (q from L1), their softmax updates
// (independent chains side by side), then the values in passes of CC chunks of every query's
// row (G x CC accumulators in registers); rows and probabilities live in memory between
template <int G, int C>
static void attend8(const float *q_in, const float *kp, const float *vp, const int64_t *ids,
                    int64_t T, int64_t i0, int64_t i1, float *o, float *ml, float scale) {
    const int64_t hd = 16 * C, be = BS * hd;
    constexpr int CC = row_chunks(G, 2 * C);
    float q[G][16 * C], acc[G][16 * C], m[G], l[G];
    for (int j = 0; j < G; j++) {
        for (int d = 0; d < hd; d++) q[j][d] = q_in[j * hd + d] * scale, acc[j][d] = q[j][d] * 0.f;
        m[j] = -3.0e38f;
        l[j] = 0.f;
    }
    for (int64_t i = i0; i < i1; i++) {
        const float *kb = kp + ids[i] * be, *vb = vp + ids[i] * be;
        if (i + 1 < i1) {
            prefetch(kp + ids[i + 1] * be, be);
            prefetch(vp + ids[i + 1] * be, be);
        }
        const int64_t tn = T - BS * i < BS ? T - BS * i : BS;
        v8 s[G][2];
        for (int j = 0; j < G; j++) {
            s[j][0] = scores8<C>(q[j], kb, hd);
            s[j][1] = scores8<C>(q[j], kb + 8 * hd, hd);
            for (int64_t u = tn; u < BS; u++) s[j][u / 8][u % 8] = -3.0e38f;
        }
        alignas(32) float p[G][BS];
        float alpha[G];
        for (int j = 0; j < G; j++) {
            const v8 mx2 = s[j][0] > s[j][1] ? s[j][0] : s[j][1];
            float bm = mx2[0];
            for (int u = 1; u < 8; u++) bm = mx2[u] > bm ? mx2[u] : bm;
            const float nm = bm > m[j] ? bm : m[j];
            for (int h = 0; h < 2; h++) {
                const v8 e = vexp8(s[j][h] - nm);
                memcpy(p[j] + 8 * h, &e, 32);
            }
            v8 d = {};
            d += m[j] - nm;
            alpha[j] = vexp8(d)[0];
            m[j] = nm;
            float ps = 0.f;
            for (int u = 0; u < BS; u++) ps += p[j][u];
            l[j] = l[j] * alpha[j] + ps;
        }
        for (int c0 = 0; c0 < 2 * C; c0 += CC) {
            v8 a[G][CC];
            for (int j = 0; j < G; j++)
                for (int c = 0; c < CC; c++) {
                    memcpy(&a[j][c], acc[j] + 8 * (c0 + c), 32);
                    a[j][c] *= alpha[j];
                }
            for (int64_t u = 0; u < tn; u++)
                for (int c = 0; c < CC; c++) {
                    v8 v;
                    memcpy(&v, vb + u * hd + 8 * (c0 + c), 32);
                    for (int j = 0; j < G; j++) a[j][c] += p[j][u] * v;
                }
            for (int j = 0; j < G; j++)
                for (int c = 0; c < CC; c++) memcpy(acc[j] + 8 * (c0 + c), &a[j][c], 32);
        }
    }
    for (int j = 0; j < G; j++) {
        if (ml) ml[2 * j] = m[j], ml[2 * j + 1] = l[j];
        for (int d = 0; d < hd; d++) o[j * hd + d] = ml ? acc[j][d] : acc[j][d] / l[j];
    }
}
#define ATTEND attend8
#define LANES 8
#else
#define ATTEND attend
#define LANES 16
#endif

typedef void (*attend_fn)(const float *, const float *, const float *, const int64_t *, int64_t,
                          int64_t, int64_t, float *, float *, float);

template <int C>
static attend_fn pick_g(int64_t g) {
    switch (g) {
        case 1: return ATTEND<1, C>;
        case 2: return ATTEND<2, C>;
        case 3: return ATTEND<3, C>;
        case 4: return ATTEND<4, C>;
        case 5: return ATTEND<5, C>;
        case 6: return ATTEND<6, C>;
        case 7: return ATTEND<7, C>;
        case 8: return ATTEND<8, C>;
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

// A sequence longer than SEG blocks is cut into segments of SEG blocks, each a job of its own
// whose softmax partials combine() joins, so one long sequence's keys are read by every thread of
// the step (at batch 1 there are only as many (sequence, KV head) jobs as KV heads). SEG is fixed,
// not per thread count: a sequence's bits depend on its length alone, and one of at most SEG
// blocks is computed in one pass, as without segments.
static const int64_t SEG = 32;

// One (sequence, KV head)'s segments -> its g rows of out [g][hd]. Segment s's partials start at
// part + s * g * (hd + 2): the unnormalized sums [g][hd], then (maximum, sum of weights) [g][2].
static void combine(const float *part, int64_t nseg, int64_t g, int64_t hd, float *out, float *w) {
    const int64_t stride = g * (hd + 2);
    for (int64_t j = 0; j < g; j++) {
        float mx = -3.0e38f, l = 0.f;
        for (int64_t s = 0; s < nseg; s++) {
            const float m = part[s * stride + g * hd + 2 * j];
            mx = m > mx ? m : mx;
        }
        for (int64_t s = 0; s < nseg; s++) {
            const float *ml = part + s * stride + g * hd + 2 * j;
            w[s] = expf(ml[0] - mx);
            l += w[s] * ml[1];
        }
        for (int64_t d = 0; d < hd; d++) {
            float a = 0.f;
            for (int64_t s = 0; s < nseg; s++) a += w[s] * part[s * stride + j * hd + d];
            out[j * hd + d] = a / l;
        }
    }
}

// The kernel team of the 4-bit matmul (shards/compress/qmatmul.cpp), set by
// paged_decode_attention_team: a step on one torch thread splits its jobs over the team's threads.
typedef void (*team_run_fn)(void (*)(const void *, int64_t, int64_t), const void *, int64_t);
static team_run_fn team_run = nullptr;
static int (*team_threads)() = nullptr;

template <class F>
static void run_range(const void *f, int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j++) (*(const F *)f)(j);
}

struct Job { int64_t b, h, s, at; };   // sequence, KV head, segment; at: its partials' offset, -1: none

extern "C" {

// the team of qmatmul.cpp (qmatmul_team_run, qmatmul_team_threads), or nulls for none
void paged_decode_attention_team(void *run, void *threads) {
    team_run = (team_run_fn)run;
    team_threads = (int (*)())threads;
}

// the vector width of the build's path: 16 (attend), 8 (attend8)
int paged_decode_attention_lanes() { return LANES; }

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
    std::vector<Job> jobs;
    jobs.reserve(B * nkv);                  // a segment more per 512 keys past the first
    int64_t parts = 0;                      // partials' floats: g x (hd + 2) a segment
    for (int64_t b = 0; b < B; b++) {
        const int64_t nseg = ((lens[b] + BS - 1) / BS + SEG - 1) / SEG;
        for (int64_t h = 0; h < nkv; h++)
            for (int64_t s = 0; s < nseg; s++, parts += nseg > 1 ? g * (hd + 2) : 0)
                jobs.push_back({b, h, s, nseg > 1 ? parts : -1});
    }
    std::vector<float> part(parts);
    auto job = [&](int64_t j) {
        const Job &J = jobs[j];
        const int64_t off = (J.b * nh + J.h * g) * hd, nbl = (lens[J.b] + BS - 1) / BS;
        const int64_t i0 = J.s * SEG, i1 = i0 + SEG < nbl ? i0 + SEG : nbl;
        f(q + off, kp + J.h * nblk * BS * hd, vp + J.h * nblk * BS * hd, block_ids + J.b * nb, lens[J.b], i0, i1,
          J.at < 0 ? out + off : part.data() + J.at, J.at < 0 ? nullptr : part.data() + J.at + g * hd, scale);
    };
    const int64_t n = (int64_t)jobs.size();
    if (threads > 1) {
        #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t j = 0; j < n; j++) job(j);
    } else if (team_run != nullptr && n > 1 && team_threads() > 1) {
        team_run(run_range<decltype(job)>, &job, n);
    } else {                  // no OpenMP region at all: entering one cost more than the jobs
        for (int64_t j = 0; j < n; j++) job(j);
    }
    std::vector<float> w;
    for (int64_t j = 0; parts && j < n; j++) {   // segments of one (sequence, KV head) are adjacent
        if (jobs[j].at < 0 || jobs[j].s > 0) continue;
        int64_t nseg = 1;
        while (j + nseg < n && jobs[j + nseg].s > 0) nseg++;
        w.resize(nseg);
        combine(part.data() + jobs[j].at, nseg, g, hd, out + (jobs[j].b * nh + jobs[j].h * g) * hd, w.data());
    }
    return 0;
}

}
