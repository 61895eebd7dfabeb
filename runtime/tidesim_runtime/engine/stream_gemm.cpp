// The `avx2-stream` CPU expert kernel's GEMM (engine/stream_backend.py builds and loads it):
// y[t, r] = sum_k w[r, k] * x[t, k] over a weight matrix w [R, K] (float32 or bfloat16 rows) and
// float32 tokens x [T, K], reading each weight from memory once for all tokens. AVX2 + FMA.
//
// Why it is shaped this way: at a few tokens an expert's time is the time to stream its weights,
// so the loop runs over blocks of adjacent weight rows; a block's columns are taken in chunks
// of KC that stay in L1 while every token passes over them (a few tokens at a time, one
// accumulator per row and token in registers), and the first pass over a chunk asks for the next block's same
// chunk (software prefetch), so the memory keeps streaming while the arithmetic of the passes
// runs. A bfloat16 is the top half of a float32: a weight is widened in registers (zero-extend,
// shift left 16), never copied.
//
// Why the bits are fixed: each (row, token) output has ONE 8-lane accumulator; lane j sums
// w[r, k] * x[t, k] for k = j, j + 8, ... in k order with a fused multiply-add; the lanes are then
// added in a fixed tree and the K % 8 leftover columns one by one (fmaf). Blocking only decides
// which accumulators share registers, so a token's output is the same whichever other tokens
// share the call and however the rows are split between threads. Built without -ffast-math and
// with -ffp-contract=off, so only the written FMAs fuse.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Rows per block x tokens per pass, by the call's token count: 3 x 4 (12 accumulators + 3 weights +
// 1 token = 16 registers); at 2 tokens 4 x 2 and at 1 token 6 x 1, so that 6 or 8 independent FMA
// chains (not 3) hide the FMA latency while the weights stream past. RB: the threads' split unit.
const int RB = 3;
const int RB_MAX = 6;
const int64_t KC = 512;  // columns per chunk

struct F32 {
    typedef float T;
    static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
    static inline float one(const float* p) { return *p; }
};

struct BF16 {
    typedef uint16_t T;
    static inline __m256 load8(const uint16_t* p) {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static inline float one(const uint16_t* p) {
        uint32_t u = static_cast<uint32_t>(*p) << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
};

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

// R rows x N tokens over columns [k0, k1) (a multiple of 8 apart): the accumulators acc[i * T + t]
// are loaded into registers, continued and stored back; PF: also prefetch the rows at pf.
template <class W, int R, int N, bool PF>
inline void pass(const typename W::T* w, int64_t ldw, const float* x, int64_t ldx, int64_t k0, int64_t k1,
                 __m256* acc, int64_t T, const typename W::T* pf) {
    __m256 a[R][N];
    for (int i = 0; i < R; ++i)
        for (int t = 0; t < N; ++t) a[i][t] = acc[i * T + t];
    for (int64_t k = k0; k < k1; k += 8) {
        __m256 wv[R];
        for (int i = 0; i < R; ++i) wv[i] = W::load8(w + i * ldw + k);
        if (PF)
            for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * ldw + k), _MM_HINT_T0);
        for (int t = 0; t < N; ++t) {
            __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
            for (int i = 0; i < R; ++i) a[i][t] = _mm256_fmadd_ps(wv[i], xv, a[i][t]);
        }
    }
    for (int i = 0; i < R; ++i)
        for (int t = 0; t < N; ++t) acc[i * T + t] = a[i][t];
}

template <class W, int R, int TB>
void rows(const typename W::T* w, int64_t ldw, const float* x, int64_t ldx, int64_t T, int64_t K,
          float* y, int64_t ldy, __m256* acc, const typename W::T* pf) {
    for (int64_t j = 0; j < R * T; ++j) acc[j] = _mm256_setzero_ps();
    const int64_t K8 = K & ~int64_t(7);
    for (int64_t k0 = 0; k0 < K8; k0 += KC) {
        const int64_t k1 = k0 + KC < K8 ? k0 + KC : K8;
        int64_t t = 0;
        if (pf) {   // the first pass over the chunk also asks for the next block's chunk
            if (TB >= 4 && T >= 4) { pass<W, R, (TB >= 4 ? 4 : 1), true>(w, ldw, x, ldx, k0, k1, acc, T, pf); t = 4; }
            else if (TB >= 2 && T >= 2) { pass<W, R, (TB >= 2 ? 2 : 1), true>(w, ldw, x, ldx, k0, k1, acc, T, pf); t = 2; }
            else { pass<W, R, 1, true>(w, ldw, x, ldx, k0, k1, acc, T, pf); t = 1; }
        }
        if (TB >= 4)
            for (; t + 4 <= T; t += 4)
                pass<W, R, (TB >= 4 ? 4 : 1), false>(w, ldw, x + t * ldx, ldx, k0, k1, acc + t, T, pf);
        if (TB >= 2)
            for (; t + 2 <= T; t += 2)
                pass<W, R, (TB >= 2 ? 2 : 1), false>(w, ldw, x + t * ldx, ldx, k0, k1, acc + t, T, pf);
        for (; t < T; ++t) pass<W, R, 1, false>(w, ldw, x + t * ldx, ldx, k0, k1, acc + t, T, pf);
    }
    for (int i = 0; i < R; ++i)
        for (int64_t t = 0; t < T; ++t) {
            float s = hsum(acc[i * T + t]);
            for (int64_t k = K8; k < K; ++k) s = fmaf(W::one(w + i * ldw + k), x[t * ldx + k], s);
            y[t * ldy + i] = s;
        }
}

// rows [r0, r1): blocks of R rows (passes of up to TB tokens), then single rows
template <class W, int R, int TB>
void gemm_rows(const typename W::T* w, int64_t ldw, int64_t r0, int64_t r1, const float* x, int64_t ldx, int64_t T,
               int64_t K, float* y, int64_t ldy, __m256* acc) {
    int64_t r = r0;
    for (; r + R <= r1; r += R)
        rows<W, R, TB>(w + r * ldw, ldw, x, ldx, T, K, y + r, ldy, acc, r + 2 * R <= r1 ? w + (r + R) * ldw : nullptr);
    for (; r < r1; ++r) rows<W, 1, TB>(w + r * ldw, ldw, x, ldx, T, K, y + r, ldy, acc, nullptr);
}

template <class W>
bool gemm(const typename W::T* w, int64_t ldw, int64_t r0, int64_t r1, const float* x, int64_t ldx, int64_t T,
          int64_t K, float* y, int64_t ldy) {
    __m256* acc = static_cast<__m256*>(_mm_malloc(sizeof(__m256) * RB_MAX * T, 32));
    if (!acc) return false;
    if (T == 1)
        gemm_rows<W, 6, 1>(w, ldw, r0, r1, x, ldx, T, K, y, ldy, acc);
    else if (T == 2)
        gemm_rows<W, 4, 2>(w, ldw, r0, r1, x, ldx, T, K, y, ldy, acc);
    else
        gemm_rows<W, 3, 4>(w, ldw, r0, r1, x, ldx, T, K, y, ldy, acc);
    _mm_free(acc);
    return true;
}

template <class W>
bool gemm_threads(const typename W::T* w, int64_t ldw, int64_t R, const float* x, int64_t ldx, int64_t T, int64_t K,
                  float* y, int64_t ldy, int threads) {
#ifdef _OPENMP
    const int64_t blocks = (R + RB - 1) / RB;
    if (threads > 1 && blocks > 1) {
        if (threads > blocks) threads = static_cast<int>(blocks);
        bool ok = true;
#pragma omp parallel num_threads(threads) reduction(&& : ok)
        {
            // each thread a contiguous run of whole blocks (rows split on block boundaries only)
            const int n = omp_get_num_threads(), id = omp_get_thread_num();
            const int64_t b0 = blocks * id / n, b1 = blocks * (id + 1) / n;
            const int64_t r0 = b0 * RB, r1 = b1 * RB < R ? b1 * RB : R;
            ok = gemm<W>(w, ldw, r0, r1, x, ldx, T, K, y, ldy);
        }
        return ok;
    }
#endif
    (void)threads;
    return gemm<W>(w, ldw, 0, R, x, ldx, T, K, y, ldy);
}

inline float widen(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// float32 -> bfloat16, round to nearest even (NaN stays a quiet NaN of the same sign)
inline uint16_t narrow(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

}  // namespace

extern "C" {

// the interface version engine/stream_backend.py expects
int tidesim_stream_abi(void) { return 3; }

// y[t * ldy + r] = sum_k w[r * ldw + k] * x[t * ldx + k], r < R, t < T, k < K; w float32 or bf16 (bf16 != 0);
// 0: done, 1: a negative size, 2: no memory for the accumulators
int tidesim_stream_gemm(const float* x, int64_t T, int64_t ldx, const void* w, int bf16, int64_t R, int64_t K,
                        int64_t ldw, float* y, int64_t ldy, int threads) {
    if (T < 0 || R < 0 || K < 0) return 1;
    if (T == 0 || R == 0) return 0;
    const bool ok = bf16 ? gemm_threads<BF16>(static_cast<const uint16_t*>(w), ldw, R, x, ldx, T, K, y, ldy, threads)
                         : gemm_threads<F32>(static_cast<const float*>(w), ldw, R, x, ldx, T, K, y, ldy, threads);
    return ok ? 0 : 2;
}

// One expert: out[T, H] = down(silu(gate(x)) * up(x)) with w13 [2I, H] (gate rows then up rows) and
// w2 [H, I]; x and out float32 or bf16 (x_bf16, out_bf16), weights float32 or bf16 (w_bf16). Both
// projections run the streaming GEMM above; SiLU and product in float32 (g / (1 + expf(-g)) * u);
// a bf16 output rounded once, to nearest even. 0: done, 1: a negative size, 2: no memory.
int tidesim_stream_swiglu(const void* x, int x_bf16, int64_t T, int64_t ldx, const void* w13, int64_t ld13,
                          const void* w2, int64_t ld2, int w_bf16, int64_t H, int64_t I, void* out, int out_bf16,
                          int64_t ldo, int threads) {
    if (T < 0 || H < 0 || I < 0) return 1;
    if (T == 0 || H == 0) return 0;
    const int64_t xs = x_bf16 ? T * H : 0, gs = T * 2 * I, ys = out_bf16 ? T * H : 0;
    float* scratch = static_cast<float*>(malloc(sizeof(float) * (xs + gs + ys + 1)));
    if (!scratch) return 2;
    const float* xf = static_cast<const float*>(x);
    int64_t ldxf = ldx;
    if (x_bf16) {
        float* wide = scratch;
        for (int64_t t = 0; t < T; ++t)
            for (int64_t k = 0; k < H; ++k) wide[t * H + k] = widen(static_cast<const uint16_t*>(x)[t * ldx + k]);
        xf = wide;
        ldxf = H;
    }
    float* gu = scratch + xs;
    int rc = tidesim_stream_gemm(xf, T, ldxf, w13, w_bf16, 2 * I, H, ld13, gu, 2 * I, threads);
    if (rc == 0) {
        for (int64_t t = 0; t < T; ++t) {   // h in place of the gate half: h[t, i] at gu[t * 2I + i]
            float* row = gu + t * 2 * I;
            for (int64_t i = 0; i < I; ++i) row[i] = row[i] / (1.0f + expf(-row[i])) * row[I + i];
        }
        float* y = out_bf16 ? gu + gs : static_cast<float*>(out);
        const int64_t ldy = out_bf16 ? H : ldo;
        rc = tidesim_stream_gemm(gu, T, 2 * I, w2, w_bf16, H, I, ld2, y, ldy, threads);
        if (rc == 0 && out_bf16)
            for (int64_t t = 0; t < T; ++t)
                for (int64_t k = 0; k < H; ++k) static_cast<uint16_t*>(out)[t * ldo + k] = narrow(y[t * H + k]);
    }
    free(scratch);
    return rc;
}


// A list of experts in ONE call (the CPU pool's layer job, the cpu-as-gpu side's resident experts):
// task i is tidesim_stream_swiglu on rows [starts[i], stops[i]) of x and of out with the weights at
// w13s[i] and w2s[i] (pointer arrays: the experts need not be adjacent, nothing is copied). The
// tasks are taken in list order from the counter *next (an atomic fetch-add; NULL: a counter of
// this call's own), so several callers given the same counter share the list, each task run by
// exactly one of them: the pool's longest-first list scheduling, without a foreign call per
// expert. threads > 1 with at least 2 x threads tasks: an OpenMP team takes tasks from the counter,
// each task on one thread; otherwise the tasks run in turn, each split over `threads` by rows.
// Each task's bits are those of tidesim_stream_swiglu (which do not depend on the thread count), so
// the list gives the same output however it is shared. 0: done, 1: a negative size or row range,
// 2: no memory (the first failure; the remaining tasks are still taken and run).
int tidesim_stream_swiglu_batch(int64_t n, const int64_t* starts, const int64_t* stops, const void* const* w13s,
                                int64_t ld13, const void* const* w2s, int64_t ld2, int w_bf16, int64_t H, int64_t I,
                                const void* x, int x_bf16, int64_t ldx, void* out, int out_bf16, int64_t ldo,
                                int threads, int64_t* next) {
    if (n < 0 || H < 0 || I < 0) return 1;
    for (int64_t i = 0; i < n; ++i)
        if (starts[i] < 0 || stops[i] < starts[i]) return 1;
    int64_t own = 0;
    int64_t* counter = next ? next : &own;
    const int64_t xe = x_bf16 ? 2 : 4, oe = out_bf16 ? 2 : 4;
    int rc = 0;
    auto run = [&](int inner) {
        int mine = 0;
        for (;;) {
            const int64_t i = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
            if (i >= n) break;
            const int64_t a = starts[i];
            const int r = tidesim_stream_swiglu(static_cast<const char*>(x) + a * ldx * xe, x_bf16, stops[i] - a, ldx,
                                                w13s[i], ld13, w2s[i], ld2, w_bf16, H, I,
                                                static_cast<char*>(out) + a * ldo * oe, out_bf16, ldo, inner);
            if (r && !mine) mine = r;
        }
        return mine;
    };
#ifdef _OPENMP
    if (threads > 1 && n >= 2 * static_cast<int64_t>(threads)) {
#pragma omp parallel num_threads(threads)
        {
            const int mine = run(1);
            if (mine) {
#pragma omp critical(tidesim_stream_batch_rc)
                if (!rc) rc = mine;
            }
        }
        return rc;
    }
#endif
    return run(threads);
}

}
