// out[m, n] = x[m, k] · w[n, k]ᵀ for small m (decode): a warp per output column reads its
// weight row once per GEMV_ROWS rows of x.
extern "C" __global__ void gemv(const float* x, int m, int k, const void* w, int dt, int n,
                                float* out) {
    const int col = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (col >= n) return;
    const int esize = dt == DT_F32 ? 4 : 2;
    const char* wrow = (const char*)w + (long long)col * k * esize;
    for (int r0 = 0; r0 < m; r0 += GEMV_ROWS) {
        float acc[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[r] = 0.0f;
        int mm = min(GEMV_ROWS, m - r0);
        dot_rows(wrow, dt, x + (long long)r0 * k, k, mm, k, acc);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            float v = warp_sum(acc[r]);
            if (lane == 0 && r < mm) out[(long long)(r0 + r) * n + col] = v;
        }
    }
}
