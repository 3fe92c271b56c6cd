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

// out[col] = x · w[col] for one row of x and 16-bit weights (see dot_one_row), by one warp.
__device__ __forceinline__ void gemv_one_col(const float* x, int k, const u16* w, int bf, int col,
                                             float* out) {
    const u16* rows[1] = {w + (long long)col * k};
    float acc[1];
    dot_one_row<1>(rows, bf, x, k, acc);
    float v = warp_sum(acc[0]);
    if ((threadIdx.x & 31) == 0) out[col] = v;
}

// out[n] = x[k] · w[n, k]ᵀ for one row of x and 16-bit weights: one warp per output column,
// grid ceil(n / 8) blocks of 256 threads.
extern "C" __global__ void gemv_one_row(const float* x, int k, const u16* w, int bf, int n,
                                        float* out) {
    pdl_launch_next();  // waits in dot_one_row, after its weight loads
    const int col = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (col < n) gemv_one_col(x, k, w, bf, col, out);
}

// The same for up to three matrices of one x in one launch (a layer's q, k and v): warp c
// takes column c of their concatenation; an unused matrix has n = 0.
// grid ceil((n0 + n1 + n2) / 8) blocks of 256 threads.
extern "C" __global__ void gemv_one_row3(const float* x, int k, int bf, const u16* w0, int n0,
                                         float* o0, const u16* w1, int n1, float* o1,
                                         const u16* w2, int n2, float* o2) {
    pdl_launch_next();  // waits in dot_one_row, after its weight loads
    int col = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (col < n0) {
        gemv_one_col(x, k, w0, bf, col, o0);
    } else if ((col -= n0) < n1) {
        gemv_one_col(x, k, w1, bf, col, o1);
    } else if ((col -= n1) < n2) {
        gemv_one_col(x, k, w2, bf, col, o2);
    }
}
