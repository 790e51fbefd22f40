// A decode step through a stage's layers in one call: RMSNorm, the projections (our 4- or 8-bit
// kernel, shards/compress/qmatmul.cpp), RoPE, the KV write, paged attention
// (shards/model/attention.cpp), SwiGLU and the residuals, with no Python between them
// (shards/model/fused.py builds the layer table and calls it; shards/runtime/kernels.py builds it).
//
// It computes what compiled.py's layer_decode computes, op for op in fp32, with the vector type
// inductor's kernels use (ATen's Vectorized<float>, built against this torch's headers and
// Sleef's exp in libtorch_cpu): the norms' sums in the same lanes and reduction order, the same
// elementwise expressions, so the same bits. The kernels are called exactly as the graph calls
// them, with the same thread count.
// inductor's vector ISA on this CPU (torch._inductor.cpu_vec_isa): the same Vectorized<float>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <cmath>
#include <vector>

using Vec = at::vec::Vectorized<float>;

typedef int (*qmatmul_fn)(const void *, const void *, const void *, void *, int64_t, int64_t, int64_t, int, int,
                          int, int);
typedef int (*attention_fn)(const void *, const void *, const void *, const void *, const void *, void *, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, float, int);
static qmatmul_fn qmatmul_kernel = nullptr;
static attention_fn attention_kernel = nullptr;

static const int64_t BS = 16;    // KV block size (attention.cpp's)

// one projection: packed codes and scales as shards/compress/qmatmul.py lays them out; y = x W^T
// (+ bias); minimum: the scales hold (d, m), not d alone
struct Proj {
    const void *packed, *scales;
    const float *bias;           // [n] or null
    int64_t n, k;
    int32_t bits, levels, minimum, pad;
};

// one decoder layer (mirrored by fused.py's _Layer)
struct Layer {
    Proj qkv, o, gate_up, down;
    const float *attn_norm, *mlp_norm;     // [hidden]
    float *k_pool, *v_pool;                // [n_kv, pool_blocks, 16, head_dim], written at slots
    int64_t n_heads, n_kv, head_dim, pool_blocks;
    float eps, scale;                      // RMSNorm's epsilon; attention's head_dim ** -0.5
};

// grown, never shrunk: a shard's steps come from one thread at a time
struct Work {
    std::vector<float> h, qkv, q, att, o, gu, act;
    void fit(int64_t B, int64_t hidden, const Layer &L) {
        grow(h, B * hidden);
        grow(qkv, B * L.qkv.n);
        grow(q, B * L.n_heads * L.head_dim);
        grow(att, B * L.n_heads * L.head_dim);
        grow(o, B * hidden);                      // o_proj's and down's outputs
        grow(gu, B * L.gate_up.n);
        grow(act, B * L.down.k);
    }
    static void grow(std::vector<float> &v, int64_t n) { if ((int64_t)v.size() < n) v.resize(n); }
};
static thread_local Work work;

// out = w * (x / sqrt(sum(x^2) / n + eps)), a row of n at a time: inductor's kernel for the
// graph's RMSNorm, step for step (squares summed in one vector, its lanes reduced by
// vec_reduce_all, then a division, not a multiply by 1 / n)
static void rms_norm(const float *x, const float *w, float eps, float *out, int64_t B, int64_t n) {
    const int64_t L = Vec::size();
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * n;
        Vec acc(0.f);
        for (int64_t i = 0; i < n; i += L) {
            const Vec v = Vec::loadu(xr + i, n - i < L ? n - i : L);   // zeros past the row: exact
            acc = acc + v * v;
        }
        const float sum = 0.f + at::vec::vec_reduce_all<float>([](Vec &a, Vec &c) { return a + c; }, acc);
        const Vec r(1 / std::sqrt(float(sum / (float)n + eps)));
        for (int64_t i = 0; i < n; i += L) {
            const int64_t c = n - i < L ? n - i : L;
            (Vec::loadu(w + i, c) * (Vec::loadu(xr + i, c) * r)).store(out + b * n + i, c);
        }
    }
}

// act[b, i] = silu(gate) * up = gate / (exp(-gate) + 1) * up, gate_up [B, 2 inter] rows as
// [gate | up]; exp is torch's (Sleef's, within 1 ulp), as in the graph
static void swiglu(const float *gu, float *act, int64_t B, int64_t inter) {
    const int64_t L = Vec::size();
    for (int64_t b = 0; b < B; b++) {
        const float *g = gu + b * 2 * inter, *u = g + inter;
        for (int64_t i = 0; i < inter; i += L) {
            const int64_t c = inter - i < L ? inter - i : L;
            const Vec gv = Vec::loadu(g + i, c);
            (gv / (gv.neg().exp() + Vec(1.f)) * Vec::loadu(u + i, c)).store(act + b * inter + i, c);
        }
    }
}

// qk * cos + rotate_half(qk) * sin over the first `heads` heads of each row of qkv [B, width]
static void rope(float *qkv, int64_t width, const float *cos, const float *sin, int64_t B, int64_t heads, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < heads; h++) {
            float *v = qkv + b * width + h * hd;
            const float *c = cos + b * hd, *s = sin + b * hd;
            float rot[256];                         // head_dim <= 256 (fused.py checks)
            for (int64_t i = 0; i < half; i++) {
                rot[i] = -v[half + i];
                rot[half + i] = v[i];
            }
            for (int64_t i = 0; i < hd; i++) v[i] = v[i] * c[i] + rot[i] * s[i];
        }
}

static int project(const Proj &p, const float *x, float *y, int64_t B, int threads) {
    if (qmatmul_kernel(x, p.packed, p.scales, y, B, p.n, p.k, p.bits, p.levels, p.minimum, threads)) return -1;
    if (p.bias)
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < p.n; j++) y[b * p.n + j] += p.bias[j];
    return 0;
}

static void add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

// one layer; returns 0, 1 + the failing call (qkv, attention, o, gate_up, down) otherwise
static int layer(const Layer &L, float *x, int64_t B, int64_t hidden, const int64_t *slots, const int64_t *block_ids,
                 int64_t nb, const int64_t *lens, const float *cos, const float *sin, int threads) {
    Work &w = work;
    w.fit(B, hidden, L);
    const int64_t nh = L.n_heads, nkv = L.n_kv, hd = L.head_dim, width = L.qkv.n;
    rms_norm(x, L.attn_norm, L.eps, w.h.data(), B, hidden);
    if (project(L.qkv, w.h.data(), w.qkv.data(), B, threads)) return 1;
    rope(w.qkv.data(), width, cos, sin, B, nh + nkv, hd);
    for (int64_t b = 0; b < B; b++) {
        const float *row = w.qkv.data() + b * width;
        memcpy(w.q.data() + b * nh * hd, row, nh * hd * sizeof(float));
        for (int64_t h = 0; h < nkv; h++) {        // pool [n_kv, blocks * 16, hd] at slots[b]
            const int64_t at = (h * L.pool_blocks * BS + slots[b]) * hd;
            memcpy(L.k_pool + at, row + (nh + h) * hd, hd * sizeof(float));
            memcpy(L.v_pool + at, row + (nh + nkv + h) * hd, hd * sizeof(float));
        }
    }
    if (attention_kernel(w.q.data(), L.k_pool, L.v_pool, block_ids, lens, w.att.data(), B, nh, nkv, hd, nb,
                         L.pool_blocks, L.scale, threads))
        return 2;
    if (project(L.o, w.att.data(), w.o.data(), B, threads)) return 3;
    add(x, w.o.data(), B * hidden);
    rms_norm(x, L.mlp_norm, L.eps, w.h.data(), B, hidden);
    if (project(L.gate_up, w.h.data(), w.gu.data(), B, threads)) return 4;
    swiglu(w.gu.data(), w.act.data(), B, L.down.k);
    if (project(L.down, w.act.data(), w.o.data(), B, threads)) return 5;
    add(x, w.o.data(), B * hidden);
    return 0;
}

extern "C" {

// the elementwise parts alone (tests/test_fused.py compares them with torch's)
void fused_rms_norm(const float *x, const float *w, float eps, float *out, int64_t B, int64_t n) {
    rms_norm(x, w, eps, out, B, n);
}
void fused_swiglu(const float *gu, float *act, int64_t B, int64_t inter) { swiglu(gu, act, B, inter); }

// the kernels this library calls (qmatmul.cpp's qmatmul, attention.cpp's paged_decode_attention)
void fused_bind(void *qmatmul, void *attention) {
    qmatmul_kernel = (qmatmul_fn)qmatmul;
    attention_kernel = (attention_fn)attention;
}

// x [B, hidden] fp32, updated in place through layers [0, n_layers) of `layers`; slots [B] where
// each sequence's K and V go; block_ids [B, nb]; lens [B] keys each attends; cos, sin [B, head_dim].
// Returns 0; -1 when a slot lies outside a pool (nothing written); else 8 * layer + the failing
// call (1 qkv, 2 attention, 3 o, 4 gate_up, 5 down), x then holding a partial result.
int fused_decode(const Layer *layers, int64_t n_layers, float *x, int64_t B, int64_t hidden, const int64_t *slots,
                 const int64_t *block_ids, int64_t nb, const int64_t *lens, const float *cos, const float *sin,
                 int threads) {
    if (!qmatmul_kernel || !attention_kernel) return -2;
    for (int64_t i = 0; i < n_layers; i++)
        for (int64_t b = 0; b < B; b++)
            if (slots[b] < 0 || slots[b] >= layers[i].pool_blocks * BS) return -1;
    for (int64_t i = 0; i < n_layers; i++) {
        const int rc = layer(layers[i], x, B, hidden, slots, block_ids, nb, lens, cos, sin, threads);
        if (rc) return (int)(8 * i + rc);
    }
    return 0;
}

}
