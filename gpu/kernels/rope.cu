// Rotary embedding of every head of every row: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin,
// with cos and sin of inv_freq[i] * position, times `scale`.
extern "C" __global__ void rope(float* x, const u32* positions, const float* inv_freq,
                                float scale, int rows, int cols, int half) {
    pdl_launch_next();
    pdl_wait();
    int pairs_per_row = cols / 2;
    long long total = (long long)rows * pairs_per_row;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        long long r = t / pairs_per_row;
        int p = (int)(t % pairs_per_row);
        int head = p / half, i = p % half;
        float angle = inv_freq[i] * (float)positions[r];
        float c = cosf(angle) * scale, s = sinf(angle) * scale;
        float* h = x + r * cols + (long long)head * 2 * half;
        float x1 = h[i], x2 = h[i + half];
        h[i] = x1 * c - x2 * s;
        h[i + half] = x2 * c + x1 * s;
    }
}
