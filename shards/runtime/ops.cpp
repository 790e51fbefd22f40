// The CPU kernels of the torch ops shardserve::qmatmul and shardserve::paged_decode_attention,
// registered through torch's stable C ABI (shards/runtime/ops.py builds and loads this file).
// They call our kernels (shards/compress/qmatmul.cpp, shards/model/attention.cpp) through
// function pointers that ops.py binds once those libraries are loaded, so the dispatcher goes
// straight from the compiled decode graph's call into C++: a Python kernel per op took ~3.5 us
// more a call (a 3072 x 576 qmatmul at batch 1, 1 thread: 38.5-39.4 against 34.6-35.1 us),
// paid at each of a step's ~5 calls a layer.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <stdint.h>
#include <string.h>

using torch::stable::Tensor;

typedef int (*qmatmul_fn)(const void *, const void *, const void *, void *, int64_t, int64_t, int64_t, int, int,
                          int, int);
typedef int (*attention_fn)(const void *, const void *, const void *, const void *, const void *, void *, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, float, int);
static qmatmul_fn qmatmul_kernel = nullptr;
static attention_fn attention_kernel = nullptr;

// op: the torch op's name; returns 0, or -1 for a name without a kernel here
extern "C" int shardserve_bind(const char *op, void *fn) {
    if (strcmp(op, "qmatmul") == 0) qmatmul_kernel = (qmatmul_fn)fn;
    else if (strcmp(op, "paged_decode_attention") == 0) attention_kernel = (attention_fn)fn;
    else return -1;
    return 0;
}

static Tensor dense(const Tensor &t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// x [rows, K] fp32 -> [rows, n] fp32 (shards/compress/qmatmul.py, qmatmul)
static Tensor qmatmul(Tensor x, Tensor packed, Tensor scales, int64_t n, int64_t bits, int64_t levels) {
    STD_TORCH_CHECK(qmatmul_kernel, "shardserve::qmatmul: its kernel is not loaded");
    const Tensor xc = dense(x);
    const int64_t rows = xc.size(0), k = xc.size(1);
    Tensor y = torch::stable::new_empty(xc, {rows, n});
    // scales [panels, groups, 2, 16] hold (d, m); [panels, groups, 16] d alone (symmetric groups)
    const int rc = qmatmul_kernel(xc.data_ptr(), packed.data_ptr(), scales.data_ptr(), y.data_ptr(), rows, n, k,
                                  (int)bits, (int)levels, scales.dim() == 4, (int)torch::stable::get_num_threads());
    STD_TORCH_CHECK(rc == 0, "qmatmul: ", n, " x ", k, " is not a multiple of 16 x 32, or ", bits, " bits / ",
                    levels, " levels is not 4 or 8 / 1 or 2");
    return y;
}

// q [B, heads, hd] -> [B, heads, hd] (shards/model/attention.py, paged_decode_attention)
static Tensor paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_ids, Tensor lens,
                                     double scale) {
    STD_TORCH_CHECK(attention_kernel, "shardserve::paged_decode_attention: its kernel is not loaded");
    const Tensor qc = dense(q), ids = dense(block_ids), lc = dense(lens);
    Tensor out = torch::stable::empty_like(qc);
    const int64_t b = qc.size(0), nh = qc.size(1), hd = qc.size(2), kv = k_pool.size(0);
    const int rc = attention_kernel(qc.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), ids.data_ptr(), lc.data_ptr(),
                                    out.data_ptr(), b, nh, kv, hd, ids.size(1), k_pool.size(1), (float)scale,
                                    (int)torch::stable::get_num_threads());
    STD_TORCH_CHECK(rc != -1, "paged_decode_attention has no kernel for ", nh, " heads over ", kv, " KV heads of ",
                    hd, " dims");
    STD_TORCH_CHECK(rc == 0, "paged_decode_attention: lengths or block ids outside ", ids.size(1),
                    " blocks of 16 a sequence, ", k_pool.size(1), " in the pool");
    return out;
}

STABLE_TORCH_LIBRARY_IMPL(shardserve, CPU, m) {
    m.impl("qmatmul", TORCH_BOX(&qmatmul));
    m.impl("paged_decode_attention", TORCH_BOX(&paged_decode_attention));
}
