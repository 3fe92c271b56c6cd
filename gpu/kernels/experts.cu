// Routed experts in three launches over all selected experts at once, reading weights straight
// from their slots. An "assignment" is one (token row, expert) pair; assignments are grouped by
// expert, ascending, and `xs` holds the token rows in assignment order.
//
// ptrs: per expert, device addresses of gate [inter, hidden], up [inter, hidden] and
// down [hidden, inter]; starts: per expert, its first assignment (n_experts + 1 entries).

// act[a, j] = silu(xs[a] · gate[j]) * (xs[a] · up[j]);
// grid (ceil(inter / (8 / split)), experts), 256 threads, `split` warps per column.
extern "C" __global__ void experts_gate_up(const float* xs, int hidden, int inter, int dt,
                                           const u64* ptrs, const u32* starts, int split,
                                           float* act) {
    __shared__ float red[8][GEMV_ROWS];
    const int e = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.x * (8 / split) + warp / split;
    const int kslice = hidden / split, k0 = (warp % split) * kslice;
    const bool live = j < inter;
    const int esize = dt == DT_F32 ? 4 : 2;
    const long long off = ((long long)(live ? j : 0) * hidden + k0) * esize;
    const char* g = (const char*)ptrs[3 * e] + off;
    const char* u = (const char*)ptrs[3 * e + 1] + off;
    const u32 a1 = starts[e + 1];
    for (u32 a = starts[e]; a < a1; a += GEMV_ROWS) {
        float ga[GEMV_ROWS], ua[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) ga[r] = ua[r] = 0.0f;
        int mm = min(GEMV_ROWS, (int)(a1 - a));
        const float* x = xs + (long long)a * hidden + k0;
        if (live) {
            dot_rows(g, dt, x, hidden, mm, kslice, ga);
            dot_rows(u, dt, x, hidden, mm, kslice, ua);
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            ga[r] = warp_sum(ga[r]);
            ua[r] = warp_sum(ua[r]);
        }
        float gv = split_reduce(ga, split, mm, red);
        float uv = split_reduce(ua, split, mm, red);
        if (live && warp % split == 0 && lane < mm) {
            act[(long long)(a + lane) * inter + j] = silu(gv) * uv;
        }
    }
}

// y[a, c] = scale[a] * (act[a] · down[c]); grid (ceil(hidden / (8 / split)), experts)
extern "C" __global__ void experts_down(const float* act, int hidden, int inter, int dt,
                                        const u64* ptrs, const u32* starts, const float* scales,
                                        int split, float* y) {
    __shared__ float red[8][GEMV_ROWS];
    const int e = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c = blockIdx.x * (8 / split) + warp / split;
    const int kslice = inter / split, k0 = (warp % split) * kslice;
    const bool live = c < hidden;
    const int esize = dt == DT_F32 ? 4 : 2;
    const char* d =
        (const char*)ptrs[3 * e + 2] + ((long long)(live ? c : 0) * inter + k0) * esize;
    const u32 a1 = starts[e + 1];
    for (u32 a = starts[e]; a < a1; a += GEMV_ROWS) {
        float acc[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[r] = 0.0f;
        int mm = min(GEMV_ROWS, (int)(a1 - a));
        if (live) dot_rows(d, dt, act + (long long)a * inter + k0, inter, mm, kslice, acc);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[r] = warp_sum(acc[r]);
        float v = split_reduce(acc, split, mm, red);
        if (live && warp % split == 0 && lane < mm) {
            y[(long long)(a + lane) * hidden + c] = v * scales[a + lane];
        }
    }
}

// out[r, c] += y[a, c] for each assignment a of row r, in ascending expert order (the order
// transformers adds them); row_starts / row_assign list them per row (CSR).
extern "C" __global__ void experts_combine(float* out, const float* y, const u32* row_starts,
                                           const u32* row_assign, int rows, int hidden) {
    long long total = (long long)rows * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / hidden, c = i % hidden;
        float o = out[i];
        for (u32 t = row_starts[r]; t < row_starts[r + 1]; t++) {
            o += y[(long long)row_assign[t] * hidden + c];
        }
        out[i] = o;
    }
}
