// out[m, n] = x[m, k] · w[n, k]ᵀ for small m (decode): `split` warps per output column (see
// split_reduce), each reading its slice of the weight row once per GEMV_ROWS rows of x.
// grid: ceil(n / (8 / split)) blocks of 256 threads.
extern "C" __global__ void gemv(const float* x, int m, int k, const void* w, int dt, int n,
                                int split, float* out) {
    pdl_launch_next();
    pdl_wait();
    __shared__ float red[8][GEMV_ROWS];
    const int warp = threadIdx.x >> 5;
    const int col = blockIdx.x * (8 / split) + warp / split;
    const int kslice = k / split, k0 = (warp % split) * kslice;
    const int esize = dt == DT_F32 ? 4 : 2;
    const bool live = col < n;
    const char* wrow = (const char*)w + ((long long)(live ? col : 0) * k + k0) * esize;
    for (int r0 = 0; r0 < m; r0 += GEMV_ROWS) {
        float acc[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[r] = 0.0f;
        int mm = min(GEMV_ROWS, m - r0);
        if (live) dot_rows(wrow, dt, x + (long long)r0 * k + k0, k, mm, kslice, acc);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[r] = warp_sum(acc[r]);
        float v = split_reduce(acc, split, mm, red);
        const int lane = threadIdx.x & 31;
        if (live && warp % split == 0 && lane < mm) out[(long long)(r0 + lane) * n + col] = v;
    }
}

// out[c] = x · w[c] for the C columns c0 .. c0 + C - 1 of w that lie below n (one row of x,
// 16-bit weights, see dot_stream), by one warp; lane c writes column c0 + c.
template <int C>
__device__ __forceinline__ void gemv_cols(const float* x, int k, const u16* w, int bf, int n,
                                          int c0, float* out) {
    const float v = rows_dot<C>(w, n, c0, bf, x, k);
    const int lane = threadIdx.x & 31;
    if (lane < C && c0 + lane < n) out[c0 + lane] = v;
}

// out[n] = x[k] · w[n, k]ᵀ for one row of x and 16-bit weights: C columns per warp (1, 2, 4 or
// 8: fewer for a small matrix, so that every SM gets warps; more for a large one, each lane's
// x read once for more rows), grid ceil(n / (8 * C)) blocks of 256 threads. One kernel per C,
// gemv_one_row_c<C>, so that each gets the registers it needs.
template <int C>
__device__ __forceinline__ void gemv_one_row(const float* x, int k, const u16* w, int bf, int n,
                                             float* out) {
    pdl_launch_next();  // waits in dot_stream, after its first weight loads
    const int c0 = (blockIdx.x * 8 + (threadIdx.x >> 5)) * C;
    if (c0 < n) gemv_cols<C>(x, k, w, bf, n, c0, out);
}

// The matrix (w, n, o) and first column c0 of column group g among up to three matrices
// (ceil(n / C) groups each, in order); false when g lies past them.
template <int C>
__device__ __forceinline__ bool column_group(int g, const u16* w0, int n0, float* o0,
                                             const u16* w1, int n1, float* o1, const u16* w2,
                                             int n2, float* o2, const u16*& w, int& n, float*& o,
                                             int& c0) {
    const int g0 = (n0 + C - 1) / C, g1 = (n1 + C - 1) / C, g2 = (n2 + C - 1) / C;
    if (g < g0) {
        w = w0, n = n0, o = o0;
    } else if ((g -= g0) < g1) {
        w = w1, n = n1, o = o1;
    } else if ((g -= g1) < g2) {
        w = w2, n = n2, o = o2;
    } else {
        return false;
    }
    c0 = g * C;
    return true;
}

// The same for up to three matrices of one x in one launch (a layer's q, k and v): warp g
// takes group g of their column groups (see column_group); an unused matrix has n = 0.
// grid ceil(groups / 8) blocks of 256 threads; gemv_one_row3_c<C>.
template <int C>
__device__ __forceinline__ void gemv_one_row3(const float* x, int k, int bf, const u16* w0, int n0,
                                              float* o0, const u16* w1, int n1, float* o1,
                                              const u16* w2, int n2, float* o2) {
    pdl_launch_next();  // waits in dot_stream, after its first weight loads
    const u16* w;
    int n, c0;
    float* o;
    if (column_group<C>(blockIdx.x * 8 + (threadIdx.x >> 5), w0, n0, o0, w1, n1, o1, w2, n2, o2,
                        w, n, o, c0)) {
        gemv_cols<C>(x, k, w, bf, n, c0, o);
    }
}

// gemv_one_row3 of the normed residual stream: s = x + delta (x where delta is null), h =
// nw * (s * rsqrt(mean(s²) + eps)) as add_rms_norm computes it, then h's products, in one
// launch. Every block norms the row into shared memory (k floats, dynamic) while its warps'
// first weight chunks are in flight; block 0 also writes s to x_sum (unless null; never x
// itself, which the other blocks still read) and h. k % 4 == 0 and k <= 4 * NORM_VEC * 256
// (the norm's vector path). gemv_norm_one_row3_c<C>.
template <int C>
__device__ __forceinline__ void gemv_norm_one_row3(
    const float* x, const float* delta, const float* nw, float eps, float* x_sum, float* h, int k,
    int bf, const u16* w0, int n0, float* o0, const u16* w1, int n1, float* o1, const u16* w2,
    int n2, float* o2) {
    pdl_launch_next();
    extern __shared__ float4 xs4[];
    float* xs = (float*)xs4;
    constexpr int L = STREAM_LOADS / C;
    const u16* w = nullptr;
    int n = 0, c0 = 0;
    float* o = nullptr;
    const bool live = column_group<C>(blockIdx.x * 8 + (threadIdx.x >> 5), w0, n0, o0, w1, n1, o1,
                                      w2, n2, o2, w, n, o, c0);
    const u16* rows[C];
    uint4 a[C][L];
    if (live) {
        column_rows<C>(w, n, c0, k, rows);
        stream_first<C, L>(a, rows, k);
    }
    pdl_wait();
    const bool first = blockIdx.x == 0;
    rms_group(x, delta, first ? x_sum : nullptr, nw, k, eps, xs);
    __syncthreads();
    if (first) {
        for (int i = threadIdx.x; i < k; i += blockDim.x) h[i] = xs[i];
    }
    if (!live) return;
    float acc[C];
    dot_stream_from<C, L>(a, rows, bf, xs, k, acc);
    warp_sums<C>(acc);
    const float v = lane_value<C>(acc);
    const int lane = threadIdx.x & 31;
    if (lane < C && c0 + lane < n) o[c0 + lane] = v;
}

#define GEMV_ONE_ROW(C)                                                                        \
    extern "C" __global__ void gemv_one_row_c##C(const float* x, int k, const u16* w, int bf,  \
                                                 int n, float* out) {                          \
        gemv_one_row<C>(x, k, w, bf, n, out);                                                  \
    }                                                                                          \
    extern "C" __global__ void gemv_one_row3_c##C(                                             \
        const float* x, int k, int bf, const u16* w0, int n0, float* o0, const u16* w1, int n1,  \
        float* o1, const u16* w2, int n2, float* o2) {                                         \
        gemv_one_row3<C>(x, k, bf, w0, n0, o0, w1, n1, o1, w2, n2, o2);                        \
    }                                                                                          \
    extern "C" __global__ void gemv_norm_one_row3_c##C(                                        \
        const float* x, const float* delta, const float* nw, float eps, float* x_sum, float* h, \
        int k, int bf, const u16* w0, int n0, float* o0, const u16* w1, int n1, float* o1,      \
        const u16* w2, int n2, float* o2) {                                                    \
        gemv_norm_one_row3<C>(x, delta, nw, eps, x_sum, h, k, bf, w0, n0, o0, w1, n1, o1, w2,  \
                              n2, o2);                                                         \
    }
GEMV_ONE_ROW(1)
GEMV_ONE_ROW(2)
GEMV_ONE_ROW(4)
GEMV_ONE_ROW(8)
