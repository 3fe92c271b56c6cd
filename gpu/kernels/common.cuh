// Shared helpers of every kernel (compiled first, in one NVRTC program with the others).
//
// Element types travel as an int (DT_*) and are resolved inside the kernel: one kernel per op
// instead of one per op and type, at the cost of a branch every warp takes the same way.
// bf16 and f16 are converted by hand (exact widening) so no CUDA header is needed.

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Programmatic dependent launch (gpu/src/cuda/launch.rs): each kernel lets the next one on
// the stream start launching at once, and waits for the grids before it to finish (their
// writes visible) before it reads anything they may have written or writes anything itself.
// Without the launch attribute, or before sm_90, both do nothing.
__device__ __forceinline__ void pdl_launch_next() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float bf16_to_f32(u16 v) {
    return __uint_as_float(((u32)v) << 16);
}

__device__ __forceinline__ float f16_to_f32(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

// Round to nearest even, as torch's bf16 conversion.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
        return (u16)((u >> 16) | 0x40);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float load_elem(const void* p, long long i, int dt) {
    if (dt == DT_F32) return ((const float*)p)[i];
    if (dt == DT_BF16) return bf16_to_f32(((const u16*)p)[i]);
    return f16_to_f32(((const u16*)p)[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The sum over the block of every thread's s (double), returned to every thread; `partial` is
// 32 doubles of shared memory, free again when this returns.
__device__ __forceinline__ double block_sum_d(double s, double* partial) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
    s = warp_sum_d(s);
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    if (warp == 0) {
        double t = lane < nw ? partial[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) partial[0] = t;
    }
    __syncthreads();
    const double total = partial[0];
    __syncthreads();
    return total;
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// Rows of x a warp accumulates at once in the matrix-vector kernels.
#define GEMV_ROWS 8

// acc[r] += Σ_k w[k] * x[r * ldx + k] for r < m (m <= GEMV_ROWS), summed over the warp's lanes
// (each lane holds a partial sum; the caller reduces). `w` is one weight row of `k` elements.
// Vector loads of 8 elements (16 or 32 bytes) when the row and x are aligned for them.
__device__ __forceinline__ void dot_rows(const void* w, int dt, const float* x, long long ldx,
                                         int m, int k, float acc[GEMV_ROWS]) {
    const int lane = threadIdx.x & 31;
    const int esize = dt == DT_F32 ? 4 : 2;
    bool vec = ((((u64)w) | ((u64)x)) & 15) == 0 && (k & 7) == 0 && (ldx & 3) == 0;
    if (vec) {
        for (int k0 = lane * 8; k0 < k; k0 += 256) {
            float wv[8];
            if (dt == DT_F32) {
                const float4* p = (const float4*)((const float*)w + k0);
                float4 a = p[0], b = p[1];
                wv[0] = a.x; wv[1] = a.y; wv[2] = a.z; wv[3] = a.w;
                wv[4] = b.x; wv[5] = b.y; wv[6] = b.z; wv[7] = b.w;
            } else {
                uint4 q = *(const uint4*)((const char*)w + (long long)k0 * esize);
                u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    u16 lo = (u16)(words[j] & 0xffffu), hi = (u16)(words[j] >> 16);
                    wv[2 * j] = dt == DT_BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
                    wv[2 * j + 1] = dt == DT_BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
                }
            }
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                if (r < m) {
                    const float4* xp = (const float4*)(x + r * ldx + k0);
                    float4 a = xp[0], b = xp[1];
                    acc[r] += wv[0] * a.x + wv[1] * a.y + wv[2] * a.z + wv[3] * a.w
                            + wv[4] * b.x + wv[5] * b.y + wv[6] * b.z + wv[7] * b.w;
                }
            }
        }
    } else {
        for (int kk = lane; kk < k; kk += 32) {
            float wv = load_elem(w, kk, dt);
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                if (r < m) acc[r] += wv * x[r * ldx + kk];
            }
        }
    }
}

// Split-K: `split` warps (1, 2, 4 or 8) of a 256-thread block share one output column, each
// summing k / split of it, so that enough loads are in flight when the columns are few.
// Block-wide reduction of acc (GEMV_ROWS partial sums per warp, already warp-reduced in lane 0)
// into the column's first warp: returns, in every lane r < m of that warp, the total of row r.
// Every thread of the block must call it (it synchronises).
__device__ __forceinline__ float split_reduce(float acc_lane0[GEMV_ROWS], int split, int m,
                                              float red[8][GEMV_ROWS]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) red[warp][r] = acc_lane0[r];
    }
    __syncthreads();
    float total = 0.0f;
    if (warp % split == 0 && lane < m) {
        for (int p = 0; p < split; p++) total += red[warp + p][lane];
    }
    __syncthreads();
    return total;
}

// Σ_j w[j] * x[j] over eight 16-bit weights packed in q (bf16 when bf, else f16).
__device__ __forceinline__ float dot8(uint4 q, int bf, float4 a, float4 b) {
    u32 words[4] = {q.x, q.y, q.z, q.w};
    float wv[8];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        u16 lo = (u16)(words[j] & 0xffffu), hi = (u16)(words[j] >> 16);
        wv[2 * j] = bf ? bf16_to_f32(lo) : f16_to_f32(lo);
        wv[2 * j + 1] = bf ? bf16_to_f32(hi) : f16_to_f32(hi);
    }
    return wv[0] * a.x + wv[1] * a.y + wv[2] * a.z + wv[3] * a.w + wv[4] * b.x + wv[5] * b.y +
           wv[6] * b.z + wv[7] * b.w;
}

// One-row matrix-vector products (a decode step of one token), streamed: one warp computes R
// 16-bit weight rows against the same f32 x of k elements (k % 8 == 0, rows and x 16-byte
// aligned). The rows are read in chunks of 256 * L elements, R * L loads of 16 bytes per lane
// (4 KiB per warp when R * L == 8), and the next chunk's loads are issued before the current
// one is computed, so the warp keeps a chunk in flight from its first load to its last and
// reads its lanes' x once per chunk for all R rows. acc[r] gets this lane's partial sum for
// row r, accumulated in ascending k as dot_rows does; the caller reduces over the warp.
//
// The first chunk is requested before pdl_wait: weights are never written during a step, only
// x waits for the grids before (a caller that waited already loses nothing).
template <int R, int L>
__device__ __forceinline__ void stream_load(uint4 (&q)[R][L], const u16* const (&w)[R], int k0,
                                            int k) {
#pragma unroll
    for (int u = 0; u < L; u++) {
        const int kk = k0 + u * 256;
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (kk < k) {
                q[r][u] = *(const uint4*)(w[r] + kk);
            } else {
                q[r][u].x = q[r][u].y = q[r][u].z = q[r][u].w = 0;
            }
        }
    }
}

template <int R, int L>
__device__ __forceinline__ void stream_dot(const uint4 (&q)[R][L], int bf, const float* x, int k0,
                                           int k, float (&acc)[R]) {
#pragma unroll
    for (int u = 0; u < L; u++) {
        const int kk = k0 + u * 256;
        if (kk < k) {
            const float4* xp = (const float4*)(x + kk);
            const float4 a = xp[0], b = xp[1];
#pragma unroll
            for (int r = 0; r < R; r++) acc[r] += dot8(q[r][u], bf, a, b);
        }
    }
}

// The first chunk's loads of dot_stream (into `a`, for dot_stream_from).
template <int R, int L>
__device__ __forceinline__ void stream_first(uint4 (&a)[R][L], const u16* const (&w)[R], int k) {
    stream_load<R, L>(a, w, (threadIdx.x & 31) * 8, k);
}

// dot_stream once the first chunk was requested into `a` (stream_first) and x is ready.
template <int R, int L>
__device__ __forceinline__ void dot_stream_from(uint4 (&a)[R][L], const u16* const (&w)[R], int bf,
                                                const float* x, int k, float (&acc)[R]) {
    const int lane8 = (threadIdx.x & 31) * 8;
    constexpr int CH = 256 * L;
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    uint4 b[R][L];
    for (int c0 = 0; c0 < k; c0 += 2 * CH) {
        stream_load<R, L>(b, w, c0 + CH + lane8, k);
        stream_dot<R, L>(a, bf, x, c0 + lane8, k, acc);
        if (c0 + CH >= k) break;
        stream_load<R, L>(a, w, c0 + 2 * CH + lane8, k);
        stream_dot<R, L>(b, bf, x, c0 + CH + lane8, k, acc);
    }
}

template <int R, int L>
__device__ __forceinline__ void dot_stream(const u16* const (&w)[R], int bf, const float* x, int k,
                                           float (&acc)[R]) {
    uint4 a[R][L];
    stream_first<R, L>(a, w, k);
    pdl_wait();
    dot_stream_from<R, L>(a, w, bf, x, k, acc);
}

// Loads of 16 bytes per lane and chunk in the one-row kernels: R * L (see dot_stream).
#define STREAM_LOADS 8

// Sums each of the R values of acc over the warp, into every lane.
template <int R>
__device__ __forceinline__ void warp_sums(float (&acc)[R]) {
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = warp_sum(acc[r]);
}

// v[lane] for lanes below C (v[0] for the others): spreads C per-row totals over the warp.
template <int C>
__device__ __forceinline__ float lane_value(const float* v) {
    const int lane = threadIdx.x & 31;
    float out = v[0];
#pragma unroll
    for (int c = 1; c < C; c++) {
        if (lane == c) out = v[c];
    }
    return out;
}

// x · w[c0 + c] for the C rows c0 .. c0 + C - 1 of w (n rows of k 16-bit weights; rows past
// the last read the last again), streamed by one warp (see dot_stream): lane c gets row
// c0 + c's total.
template <int C>
__device__ __forceinline__ void column_rows(const u16* w, int n, int c0, int k,
                                            const u16* (&rows)[C]) {
#pragma unroll
    for (int c = 0; c < C; c++) rows[c] = w + (long long)min(c0 + c, n - 1) * k;
}

template <int C>
__device__ __forceinline__ float rows_dot(const u16* w, int n, int c0, int bf, const float* x,
                                          int k) {
    const u16* rows[C];
    column_rows<C>(w, n, c0, k, rows);
    float acc[C];
    dot_stream<C, STREAM_LOADS / C>(rows, bf, x, k, acc);
    warp_sums<C>(acc);
    return lane_value<C>(acc);
}
