// y = x W^T with W in groups of 32 inputs (4-bit codes, as GGUF's Q4_1, or 8-bit, as Q8_0) and x
// rounded to int8 per group: llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products, laid out so
// that one AVX-512 VNNI instruction serves 16 output rows at once (shards/compress/qmatmul.py loads and
// calls it; shards/runtime/kernels.py builds it).
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
// fp16, (d, m) of the panel's 16 rows per group; or, where every group is symmetric (m = -Z d,
// Z = 8 for 4 bits, 128 for 8: GGUF's Q4_0 and Q8_0), [N / 16, K / 32, 16], d alone, and the
// kernel makes m = -Z d itself (the value a stored m would hold, bit for bit: Z is a power of
// two), so a group of 32 weights takes 18 bytes instead of 20 (4-bit) and 34 instead of 36
// (8-bit). A row's result is computed the same way
// whatever the batch (tiles of up to 8 activation rows share each weight vector). The portable
// path (no AVX-512 VNNI, or SHARDSERVE_GENERIC) does the same arithmetic in the same order, so
// both give the same bits; so does the AMX path (qmatmul_amx below) that takes steps of 16
// activation rows and more where the CPU has AMX-INT8: its integer sums are exact too.
#include <math.h>
#include <omp.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>
#include <stdint.h>
#include <string.h>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

// Paths (QM_PATH): 2 AVX-512 VNNI, 1 AVX2 (CPUs without AVX-512, as AMD Zen 2 / 3; built for
// it on any AVX2 CPU with SHARDSERVE_AVX2), 0 portable loops (SHARDSERVE_GENERIC forces them)
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(SHARDSERVE_GENERIC) && !defined(SHARDSERVE_AVX2)
#include <immintrin.h>
#define QM_PATH 2
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(SHARDSERVE_GENERIC)
#include <immintrin.h>
#define QM_PATH 1
#else
#define QM_PATH 0
#endif
#if QM_PATH == 2 && defined(__AMX_TILE__) && defined(__AMX_INT8__) && !defined(SHARDSERVE_NO_AMX)
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#define QM_AMX 1
#else
#define QM_AMX 0
#endif

static const int64_t PANEL = 16;   // output rows per panel: the int32 lanes of a vector
static const int64_t GROUP = 32;   // inputs per (d, m) and per activation scale
// activation rows (x rows times levels) sharing a weight vector; AVX2's 16 registers hold 4 rows'
// int16 sums beside a chunk's nibbles (8: ~40% slower at 4 rows, spilling)
static const int64_t TILE = QM_PATH == 1 ? 4 : 8;
static const int64_t AMX_ROWS = 16; // activation rows from which AMX tiles take over (when on)
// bytes ahead of a tile's weight loads that it asks the cache for. The hardware prefetcher alone
// leaves a panel's stream waiting on memory between dot products: a 4096 x 4096 4-bit call with
// its weights beyond the L3, one thread, 1 / 8 / 32 rows at two levels took 0.43 / 1.43 / 3.61 ms
// without, 0.29 / 0.89 / 3.14 with 4096 bytes (1024: 0.40 / 1.09 / 3.24; 8192 and 16384 as 4096)
static const int64_t PREFETCH = 4096;

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

// zero: Z of symmetric scales (d alone), 0 where they hold (d, m). fp16 numbers a group's
// scales take in a panel
static inline int64_t scale_step(float zero) { return zero ? PANEL : 2 * PANEL; }

// 64-byte weight chunks per group, and inputs each chunk covers
template <int BITS> struct Layout {
    static const int chunks = BITS == 4 ? 4 : 8;
    static const int inputs = GROUP / chunks;
};

// NB rows of x (NB * L activation rows, levels interleaved) against one panel of 16 output rows
#if QM_PATH == 2
// group g's d and m of the panel's 16 rows (m made from d where the scales are symmetric)
static inline void group_scales(const uint16_t *sc, int64_t g, float zero, __m512 &d, __m512 &m) {
    const int64_t sg = scale_step(zero);
    d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + g * sg)));
    m = zero ? _mm512_mul_ps(d, _mm512_set1_ps(-zero))
             : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + g * sg + 16)));
}

template <int BITS, int NB, int L>
static void tile(const uint8_t *w, const uint16_t *sc, const int8_t *xq, const float *a, const float *s,
                 int64_t K, float *y, int64_t N, float zero) {
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
            _mm_prefetch((const char *)(w + (g * lay::chunks + c) * 64 + PREFETCH), _MM_HINT_T0);
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
        __m512 d, m;
        group_scales(sc, g, zero, d, m);
        for (int b = 0; b < NB; b++) {
            for (int l = 0; l < L; l++)
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[b * L + l]),
                                         _mm512_mul_ps(d, _mm512_set1_ps(a[(b * L + l) * ng + g])), acc[b]);
            acc[b] = _mm512_fmadd_ps(m, _mm512_set1_ps(s[b * ng + g]), acc[b]);
        }
    }
    for (int b = 0; b < NB; b++) _mm512_storeu_ps(y + b * N, acc[b]);
}
#elif QM_PATH == 1
// AVX2 has no vpdpbusd: vpmaddubsw multiplies unsigned weight bytes by signed activation bytes
// and adds pairs into int16 lanes, which saturate, so it takes nibbles only (4-bit codes as
// they are, 8-bit codes as u = 16 uh + ul): a lane's pair is at most 2 x 15 x 127 and a group
// adds 8 pairs into it (30480 < 32767), so the int16 sums are exact; vpmaddwd then adds the
// lane pairs of a row into its int32 dot. Each 64-byte chunk is two halves of 8 output rows.
// A chunk's nibbles stay in 4 registers while each of the tile's rows adds its products into
// its 2 (4-bit) or 4 (8-bit) int16 sums; the empty asm pins each sum in a register after its add,
// so GCC can not hoist every product first and spill them (it did: 1.8x slower on one core).
#define PIN(v) asm volatile("" : "+x"(v))
template <int BITS, int NB, int L>
static void tile(const uint8_t *w, const uint16_t *sc, const int8_t *xq, const float *a, const float *s,
                 int64_t K, float *y, int64_t N, float zero) {
    typedef Layout<BITS> lay;
    constexpr int R = NB * L, P = BITS == 4 ? 1 : 2;
    const int64_t ng = K / GROUP, sg = scale_step(zero);
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[NB][2];
    for (int b = 0; b < NB; b++) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256i p[R][P][2];
        for (int r = 0; r < R; r++)
            for (int q = 0; q < P; q++) p[r][q][0] = p[r][q][1] = _mm256_setzero_si256();
        for (int c = 0; c < lay::chunks; c++) {
            const uint8_t *v = w + (g * lay::chunks + c) * 64;
            _mm_prefetch((const char *)(v + PREFETCH), _MM_HINT_T0);
            __m256i nb[2][2];
            for (int h = 0; h < 2; h++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(v + 32 * h));
                nb[0][h] = _mm256_and_si256(x, low);
                nb[1][h] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
            }
            for (int r = 0; r < R; r++) {
                const int8_t *q = xq + r * K + g * GROUP + c * lay::inputs;
                int32_t q0, q1;
                memcpy(&q0, q, 4);
                memcpy(&q1, q + (BITS == 4 ? 4 : 0), 4);
                const __m256i x0 = _mm256_set1_epi32(q0), x1 = _mm256_set1_epi32(q1);
                for (int h = 0; h < 2; h++) {
                    p[r][0][h] = _mm256_add_epi16(p[r][0][h], _mm256_maddubs_epi16(nb[0][h], x0));
                    PIN(p[r][0][h]);
                    p[r][P - 1][h] = _mm256_add_epi16(p[r][P - 1][h], _mm256_maddubs_epi16(nb[1][h], x1));
                    PIN(p[r][P - 1][h]);
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g * sg + 8 * h)));
            const __m256 m = zero ? _mm256_mul_ps(d, _mm256_set1_ps(-zero))
                                  : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g * sg + 16 + 8 * h)));
            for (int r = 0; r < R; r++) {
                const int b = r / L;
                __m256i dot = _mm256_madd_epi16(p[r][0][h], ones);
                if (BITS == 8) dot = _mm256_add_epi32(dot, _mm256_slli_epi32(_mm256_madd_epi16(p[r][P - 1][h], ones), 4));
                acc[b][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(a[r * ng + g])), acc[b][h]);
                if (r % L == L - 1) acc[b][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(s[b * ng + g]), acc[b][h]);
            }
        }
    }
    for (int b = 0; b < NB; b++) {
        _mm256_storeu_ps(y + b * N, acc[b][0]);
        _mm256_storeu_ps(y + b * N + 8, acc[b][1]);
    }
}
#else
template <int BITS, int NB, int L>
static void tile(const uint8_t *w, const uint16_t *sc, const int8_t *xq, const float *a, const float *s,
                 int64_t K, float *y, int64_t N, float zero) {
    typedef Layout<BITS> lay;
    const int64_t ng = K / GROUP, sg = scale_step(zero);
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
                const float d = half_to_float(sc[g * sg + n]);
                const float m = zero ? d * -zero : half_to_float(sc[g * sg + 16 + n]);
                for (int l = 0; l < L; l++)
                    acc[b][n] = fmaf((float)dot[b * L + l][n], d * a[(b * L + l) * ng + g], acc[b][n]);
                acc[b][n] = fmaf(m, s[b * ng + g], acc[b][n]);
            }
    }
    for (int b = 0; b < NB; b++) memcpy(y + b * N, acc[b], sizeof acc[b]);
}
#endif

// The team: helper threads that share a decode step's panels with the calling thread while a
// step no other group overlaps runs (qmatmul_team), so a shard's step reads its weights with
// every core the node gives the pipeline. They poll between calls only while the step runs,
// where waking an OpenMP worker from sleep costs tens of us, tens of times a step; after the
// step they sleep, so overlapping steps of other shards keep their cores.
// Panels are independent, so a row's bits do not depend on who computed them.
//
// Nothing waits for a helper that is not running. A call is cut into chunks; whoever is free
// claims the next one, and the call ends when every claimed chunk is done. A helper that the OS
// runs late (another process's work on its core: on a 2-core node the router, Serve's proxy and
// the client deliver the previous token while the first shard steps) leaves its share to the
// caller, and while it waits for a call it yields its core to any runnable thread (sched_yield),
// so it takes only what no one else wants.
//
// Lending (qmatmul_lend): while steps of other shards overlap this one, the helpers sleep and
// join a call only if, when it starts, no other shard of the machine is stepping (a table in
// shared memory, qmatmul_node_join / qmatmul_stepping): the other shard waits for its next group
// and its core would idle. Woken per call (a few us against calls of 0.1-50 ms), and a helper
// claims no further chunk once another shard's step begins, so that step gets its core back
// within a chunk.
struct Team {
    std::vector<std::thread> threads;
    std::atomic<bool> active{false};
    std::atomic<bool> lend{false};  // helpers join calls only while no other shard steps
    // the current call's chunk count (high 32 bits) and next unclaimed chunk (low 32) in one
    // word: a claim reads both at once, so a helper can never take a chunk of one call by
    // another's count. The call's fields below are written before the word (release) and read
    // after a claim (acquire); they cannot change before every claimed chunk is done.
    std::atomic<uint64_t> claims{0};
    std::atomic<int64_t> done{0};   // chunks of the current call finished
    void (*run)(const void *ctx, int64_t begin, int64_t end) = nullptr;
    const void *ctx = nullptr;
    int64_t count = 0, chunk = 1;   // panels, and panels a chunk
    std::mutex m;
    std::condition_variable wake;
    int size = 1;                   // threads a call is split over, the caller's included
};

static Team &team = *new Team;   // never destroyed: helpers may still wait on its condition at exit

// Which shard processes of this machine are stepping now: a slot each (pid, stepping) in memory
// they all map (qmatmul_node_join). Without one, lending never sees the machine idle.
struct NodeSlot { int32_t pid, stepping; };
static const int NODE_SLOTS = 64;
static NodeSlot *node_slots = nullptr;
static int node_slot = -1;

static bool others_stepping() {
    if (!node_slots) return true;
    for (int i = 0; i < NODE_SLOTS; i++)
        if (i != node_slot && __atomic_load_n(&node_slots[i].stepping, __ATOMIC_ACQUIRE)) return true;
    return false;
}

static bool unclaimed(uint64_t c) { return (c & 0xffffffffu) < (c >> 32); }

// a lending helper stops claiming once another shard steps
static bool holds_back() { return team.lend.load(std::memory_order_relaxed) && others_stepping(); }

static std::atomic<int64_t> lent_chunks{0};   // chunks helpers ran in lending calls (qmatmul_lent)

static void share_chunks(bool helper) {
    for (;;) {
        if (helper && holds_back()) return;
        const uint64_t c = team.claims.fetch_add(1, std::memory_order_acq_rel);
        if (!unclaimed(c)) return;
        const int64_t begin = (int64_t)(c & 0xffffffffu) * team.chunk;
        team.run(team.ctx, begin, begin + team.chunk < team.count ? begin + team.chunk : team.count);
        if (helper && team.lend.load(std::memory_order_relaxed)) lent_chunks.fetch_add(1, std::memory_order_relaxed);
        team.done.fetch_add(1, std::memory_order_release);
    }
}

static void helper() {
    for (;;) {
        if (!team.active.load(std::memory_order_acquire)) {
            std::unique_lock<std::mutex> lock(team.m);
            team.wake.wait(lock, [] { return team.active.load(std::memory_order_acquire); });
        }
        if (unclaimed(team.claims.load(std::memory_order_acquire)) && !holds_back())
            share_chunks(true);
        else
            sched_yield();
    }
}

// calls split over n threads: the caller and n - 1 helpers, started on first use (team.m held)
static void team_size(int n) {
    while ((int)team.threads.size() < n - 1) {
        team.threads.emplace_back(helper);
        team.threads.back().detach();
    }
    team.size = n;
}

static bool team_on() {
    return team.size > 1 && (team.active.load(std::memory_order_relaxed) || team.lend.load(std::memory_order_relaxed));
}

// run(ctx, begin, end) over [0, count) on the team, the caller included; chunks of about a
// quarter of a thread's share
static void team_run(void (*run)(const void *, int64_t, int64_t), const void *ctx, int64_t count) {
    const bool lending = team.lend.load(std::memory_order_relaxed);
    if (lending && others_stepping()) {
        run(ctx, 0, count);
        return;
    }
    const int64_t chunk = count / (4 * team.size) > 1 ? count / (4 * team.size) : 1;
    const int64_t chunks = (count + chunk - 1) / chunk;
    team.run = run, team.ctx = ctx, team.count = count, team.chunk = chunk;
    team.done.store(0, std::memory_order_relaxed);
    team.claims.store((uint64_t)chunks << 32, std::memory_order_release);
    if (lending) {                    // wake the helpers for this call alone
        {
            std::lock_guard<std::mutex> lock(team.m);
            team.active.store(true, std::memory_order_release);
        }
        team.wake.notify_all();
    }
    share_chunks(false);
    while (team.done.load(std::memory_order_acquire) < chunks) __builtin_ia32_pause();
    if (lending) team.active.store(false, std::memory_order_release);
}

#if QM_AMX
// AMX: one TDPBSUD multiplies 16 activation rows by a group's 32 inputs of 16
// output rows (8192 products; vpdpbusd does 64), the int32 tile is stored and folded into y
// with the same fp32 operations, in the same order, as tile() above, so the bits are the same.
// Linux hands out the tile state on request (arch_prctl ARCH_REQ_XCOMP_PERM); a kernel that
// refuses keeps the VNNI path, as do SHARDSERVE_AMX=0 and qmatmul_use_amx(0) (A/B runs, tests).
static bool amx_granted() {
    static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return granted;
}

static int amx_wanted = -1;          // -1: SHARDSERVE_AMX decides

static bool amx_on() {
    if (amx_wanted < 0) {
        const char *e = getenv("SHARDSERVE_AMX");
        amx_wanted = !(e && e[0] == '0');
    }
    return amx_wanted && amx_granted();
}

struct TileConfig { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };

static void amx_configure() {        // per thread: the tile configuration is thread state
    TileConfig c = {};
    c.palette = 1;
    for (int t = 0; t < 2; t++) {        // two sets, for consecutive groups: one computes while
        c.rows[3 * t] = 16, c.colsb[3 * t] = 64;          // the other folds. C: int32 sums [16 rows, 16 outputs]
        c.rows[3 * t + 1] = 16, c.colsb[3 * t + 1] = 32;  // A: int8 activations [16 rows, a group's 32 inputs]
        c.rows[3 * t + 2] = 8, c.colsb[3 * t + 2] = 64;   // B: codes [8 x 4 inputs, 16 outputs x 4] (VNNI order)
    }
    _tile_loadconfig(&c);
}

// acc[b] += group g's share for the tile's x rows b (sums: the tile's [16 rows, 16 outputs]),
// the fp32 operations of tile() above, in its order
template <int L>
static inline void fold(__m512 *acc, const int32_t *sums, const uint16_t *sc, const float *a, const float *s,
                        int64_t g, int64_t ng, int64_t b0, int nb, float zero) {
    __m512 d, m;
    group_scales(sc, g, zero, d, m);
    for (int b = 0; b < nb; b++) {
        for (int l = 0; l < L; l++)
            acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums + (b * L + l) * 16)),
                                     _mm512_mul_ps(d, _mm512_set1_ps(a[((b0 + b) * L + l) * ng + g])), acc[b]);
        acc[b] = _mm512_fmadd_ps(m, _mm512_set1_ps(s[(b0 + b) * ng + g]), acc[b]);
    }
}

// tile C = the tile's 16 activation rows (tile A, loaded from x) times a group's codes (tile W).
// A macro: GCC's tile intrinsics paste their tile numbers into the assembly text
#define GROUP_DOT(C, A, W, x, codes, K) \
    do { _tile_zero(C); _tile_loadd(A, x, K); _tile_loadd(W, codes, 64); _tile_dpbsud(C, A, W); } while (0)

// One panel of 16 outputs against all R = B * L activation rows (xq padded with zero rows to a
// multiple of 16; 16 % L == 0, so a tile holds whole x rows). codes: the panel's codes in VNNI
// order, a group per 512 bytes. y: the panel's first output column.
template <int L>
static void panel_amx(const uint8_t *codes, const uint16_t *sc, const int8_t *xq, const float *a, const float *s,
                      int64_t K, int64_t B, float *y, int64_t N, float zero) {
    const int64_t ng = K / GROUP, rows = 16 / L;
    alignas(64) int32_t sums[2][16 * 16];
    for (int64_t b0 = 0; b0 < B; b0 += rows) {
        const int nb = B - b0 < rows ? (int)(B - b0) : (int)rows;
        const int8_t *x = xq + b0 * L * K;
        __m512 acc[16 / L];
        for (int b = 0; b < rows; b++) acc[b] = _mm512_setzero_ps();
        // group g + 1 computes (tiles 3-5) while g folds, and g + 2 is issued on tiles 0-2 as soon
        // as g's sums are stored, before g's fold: the tile unit always has a group queued. One
        // 8B layer's four projections, 1 thread, 3 interleaved rounds, medians: 16 / 32 / 64
        // rows 47.4 / 79.2 / 143.9 ms -> 44.6 / 70.3 / 130.2 against issuing g + 2 after the folds.
        GROUP_DOT(0, 1, 2, x, codes, K);
        for (int64_t g = 0; g < ng; g += 2) {
            if (g + 1 < ng) GROUP_DOT(3, 4, 5, x + (g + 1) * GROUP, codes + (g + 1) * 512, K);
            _tile_stored(0, sums[0], 64);
            if (g + 2 < ng) GROUP_DOT(0, 1, 2, x + (g + 2) * GROUP, codes + (g + 2) * 512, K);
            fold<L>(acc, sums[0], sc, a, s, g, ng, b0, nb, zero);
            if (g + 1 < ng) {
                _tile_stored(3, sums[1], 64);
                fold<L>(acc, sums[1], sc, a, s, g + 1, ng, b0, nb, zero);
            }
        }
        for (int b = 0; b < nb; b++) _mm512_storeu_ps(y + (b0 + b) * N, acc[b]);
    }
}

// a panel's codes in AMX's B layout, 512 bytes a group: 8-bit chunks are it already; a 4-bit
// chunk's nibbles are two of its rows (inputs 8c + j and 8c + 4 + j)
static const uint8_t *vnni_codes(const uint8_t *w, int bits, int64_t ng, uint8_t *buf) {
    if (bits == 8) return w;
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t c = 0; c < ng * 4; c++) {
        const __m512i v = _mm512_loadu_si512(w + c * 64);
        _mm512_store_si512(buf + 2 * c * 64, _mm512_and_si512(v, low));
        _mm512_store_si512(buf + (2 * c + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
    return buf;
}

struct AmxJob {
    const uint8_t *packed;
    const uint16_t *scales;
    const int8_t *xq;
    const float *a, *s;
    float *y;
    int64_t B, N, K;
    int bits, levels;
    float zero;                          // as tile()'s
};

// panels [begin, end) of j on this thread, with its tile configuration and a buffer of its own
// for a panel's codes (kept: a fresh one of 100s of KiB was an mmap and its page faults per call)
static void amx_panels(const AmxJob &j, int64_t begin, int64_t end) {
    const int64_t ng = j.K / GROUP, panel_bytes = j.K * PANEL * j.bits / 8;
    thread_local std::vector<uint8_t> buf;
    if (buf.size() < (size_t)(ng * 512 + 64)) buf.resize(ng * 512 + 64);
    uint8_t *aligned = buf.data() + (64 - (uintptr_t)buf.data() % 64) % 64;
    amx_configure();
    for (int64_t p = begin; p < end; p++) {
        const uint8_t *codes = vnni_codes(j.packed + p * panel_bytes, j.bits, ng, aligned);
        (j.levels == 1 ? panel_amx<1> : panel_amx<2>)(codes, j.scales + p * ng * scale_step(j.zero), j.xq, j.a, j.s,
                                                      j.K, j.B, j.y + p * PANEL, j.N, j.zero);
    }
    _tile_release();
}

static void qmatmul_amx(const AmxJob &j, int threads) {
    const int64_t panels = j.N / PANEL;
    if (team_on()) {
        team_run([](const void *ctx, int64_t begin, int64_t end) {
            amx_panels(*static_cast<const AmxJob *>(ctx), begin, end);
        }, &j, panels);
        return;
    }
    #pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        amx_panels(j, panels * t / n, panels * (t + 1) / n);
    }
}
#endif

typedef void (*tile_fn)(const uint8_t *, const uint16_t *, const int8_t *, const float *, const float *,
                        int64_t, float *, int64_t, float);

template <int BITS> struct Tiles {   // [levels - 1][x rows - 1], for tiles of up to 8 activation rows
    static constexpr tile_fn one[8] = {tile<BITS, 1, 1>, tile<BITS, 2, 1>, tile<BITS, 3, 1>, tile<BITS, 4, 1>,
                                          tile<BITS, 5, 1>, tile<BITS, 6, 1>, tile<BITS, 7, 1>, tile<BITS, 8, 1>};
    static constexpr tile_fn two[4] = {tile<BITS, 1, 2>, tile<BITS, 2, 2>, tile<BITS, 3, 2>, tile<BITS, 4, 2>};
};

extern "C" {

int qmatmul_path() { return QM_PATH; }

// n > 1: from now on, steps split their panels over n threads (the caller
// and n - 1 helpers, started on first use, spinning until qmatmul_team(1)); n <= 1: helpers sleep.
// One caller at a time while the team is on (a shard's steps are serialized by its actor).
void qmatmul_team(int n) {
    std::lock_guard<std::mutex> lock(team.m);
    if (n > 1) {
        team_size(n);
        team.active.store(true, std::memory_order_release);
        team.wake.notify_all();
    } else {
        team.active.store(false, std::memory_order_release);
        team.size = 1;
    }
}

// Other kernels' work on the same team (decode attention, shards/model/attention.cpp):
// run(ctx, begin, end) over [0, count), split as a qmatmul call is while the team is on (or
// lending), else on the caller alone. Callers split their work so its bits do not depend on who
// runs which part.
void qmatmul_team_run(void (*run)(const void *, int64_t, int64_t), const void *ctx, int64_t count) {
    if (count > 1 && team_on()) team_run(run, ctx, count);
    else run(ctx, 0, count);
}

// threads a team_run call is split over now (1: the caller alone)
int qmatmul_team_threads() { return team_on() ? team.size : 1; }

// n > 1: from now on, calls are split over n threads only while no other shard of the machine
// steps (the helpers sleep between calls); n <= 1: no lending. Not while the team is on.
void qmatmul_lend(int n) {
    std::lock_guard<std::mutex> lock(team.m);
    if (n > 1) {
        team_size(n);
        team.lend.store(true, std::memory_order_release);
    } else {
        team.lend.store(false, std::memory_order_release);
        if (!team.active.load(std::memory_order_relaxed)) team.size = 1;
    }
}

// Take a slot of the machine's table (NODE_SLOTS x (pid, stepping) int32, zeroed when new,
// shared by the shard processes): first the slots of processes that are gone are cleared (one
// killed mid-step left its flag set), then a free one is claimed. Returns the slot, or -1 when
// the table is full (no lending).
int qmatmul_node_join(void *table) {
    NodeSlot *t = static_cast<NodeSlot *>(table);
    const int32_t me = (int32_t)getpid();
    for (int i = 0; i < NODE_SLOTS; i++) {
        int32_t p = __atomic_load_n(&t[i].pid, __ATOMIC_ACQUIRE);
        if (p && p != me && kill(p, 0) != 0 && errno == ESRCH) {
            __atomic_store_n(&t[i].stepping, 0, __ATOMIC_RELEASE);
            __atomic_compare_exchange_n(&t[i].pid, &p, 0, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        }
    }
    for (int i = 0; i < NODE_SLOTS; i++) {
        int32_t free_ = 0;
        if (__atomic_compare_exchange_n(&t[i].pid, &free_, me, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&t[i].stepping, 0, __ATOMIC_RELEASE);
            node_slots = t, node_slot = i;
            return i;
        }
    }
    return -1;
}

// chunks this process's helpers ran in lending calls so far
int64_t qmatmul_lent() { return lent_chunks.load(std::memory_order_relaxed); }

// this process's step begins (1) or ends (0)
void qmatmul_stepping(int on) {
    if (node_slots) __atomic_store_n(&node_slots[node_slot].stepping, on, __ATOMIC_RELEASE);
}

// Whether steps of AMX_ROWS activation rows and more (x rows times levels) take the AMX path;
// want 0 / 1 turns it off / on (where the CPU and kernel allow), -1 only asks
int qmatmul_use_amx(int want) {
#if QM_AMX
    if (want >= 0) amx_wanted = want;
    return amx_on();
#else
    (void)want;
    return 0;
#endif
}

// x [B, K] fp32, packed (layout above, `bits` 4 or 8), scales [N / 16, K / 32, 2, 16] fp16
// (minimum 1) or [N / 16, K / 32, 16] (minimum 0: symmetric, d alone) -> y [B, N] fp32, with x
// rounded to `levels` (1 or 2) int8 levels. Returns -1 when N is not a multiple of 16, K of 32,
// bits is not 4 or 8, or levels not 1 or 2.
int qmatmul(const float *x, const uint8_t *packed, const uint16_t *scales, float *y,
            int64_t B, int64_t N, int64_t K, int bits, int levels, int minimum, int threads) {
    if (N % PANEL || K % GROUP || B < 0 || (bits != 4 && bits != 8) || (levels != 1 && levels != 2)) return -1;
    const float zero = minimum ? 0.f : (float)(1 << (bits - 1));
    const int64_t ng = K / GROUP, rows = TILE / levels, panel_bytes = K * PANEL * bits / 8;
    const tile_fn *tiles = bits == 4 ? (levels == 1 ? Tiles<4>::one : Tiles<4>::two)
                                     : (levels == 1 ? Tiles<8>::one : Tiles<8>::two);
    std::vector<int8_t> xq((B * levels + 15) / 16 * 16 * K);   // zero rows pad AMX's last tile
    std::vector<float> a(B * levels * ng), s(B * ng);
    auto quantize = [&](int64_t b) {
        quantize_row(x + b * K, K, levels, &xq[b * levels * K], &a[b * levels * ng], &s[b * ng]);
    };
    if (B >= 16 && threads > 1) {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t b = 0; b < B; b++) quantize(b);
    } else {               // no OpenMP region on one thread (libgomp had 12% of a decode step's samples)
        for (int64_t b = 0; b < B; b++) quantize(b);
    }
#if QM_AMX
    if (B * levels >= AMX_ROWS && amx_on()) {
        qmatmul_amx(AmxJob{packed, scales, xq.data(), a.data(), s.data(), y, B, N, K, bits, levels, zero}, threads);
        return 0;
    }
#endif
    auto panel = [&](int64_t p) {
        const uint8_t *w = packed + p * panel_bytes;
        const uint16_t *sc = scales + p * ng * scale_step(zero);
        for (int64_t b0 = 0; b0 < B; b0 += rows) {
            const int64_t nb = B - b0 < rows ? B - b0 : rows;
            tiles[nb - 1](w, sc, &xq[b0 * levels * K], &a[b0 * levels * ng], &s[b0 * ng], K,
                          y + b0 * N + p * PANEL, N, zero);
        }
    };
    if (team_on()) {
        team_run([](const void *ctx, int64_t begin, int64_t end) {
            for (int64_t p = begin; p < end; p++) (*static_cast<const decltype(panel) *>(ctx))(p);
        }, &panel, N / PANEL);
        return 0;
    }
    if (threads <= 1) {
        for (int64_t p = 0; p < N / PANEL; p++) panel(p);
        return 0;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < N / PANEL; p++) panel(p);
    return 0;
}
}

// Rows `ids` [R] of an 8-bit packed table [N, K] (scales as qmatmul's) -> out [R, K] fp32,
// w = d u + m as GroupQuantLinear.dequantized computes it: the embedding lookup. u d is exact
// in fp32 (8 + 11 bits at most), so the bits are those of torch's product then sum. Returns -1
// for a shape qmatmul refuses, -2 for an id outside [0, N).
extern "C" int qmatmul_rows(const uint8_t *packed, const uint16_t *scales, const int64_t *ids, float *out,
                            int64_t R, int64_t N, int64_t K, int minimum) {
    if (N % PANEL || K % GROUP) return -1;
    const int64_t ng = K / GROUP, chunks = K / 4, per_group = minimum ? 2 * PANEL : PANEL;
    for (int64_t r = 0; r < R; r++) {
        if (ids[r] < 0 || ids[r] >= N) return -2;
        const int64_t p = ids[r] / PANEL, lane = ids[r] % PANEL;
        float *o = out + r * K;
        for (int64_t c = 0; c < chunks; c++) {       // a chunk: 4 bytes (inputs) of each of a panel's rows
            const uint8_t *b = packed + ((p * chunks + c) * PANEL + lane) * 4;
            for (int j = 0; j < 4; j++) o[4 * c + j] = b[j];
        }
        for (int64_t g = 0; g < ng; g++) {
            const uint16_t *sc = scales + (p * ng + g) * per_group + lane;
            const float d = half_to_float(sc[0]);
            const float m = minimum ? half_to_float(sc[PANEL]) : d * -128.f;
            for (int64_t i = g * GROUP; i < (g + 1) * GROUP; i++) o[i] = o[i] * d + m;
        }
    }
    return 0;
}
