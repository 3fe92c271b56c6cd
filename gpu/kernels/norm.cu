// RMSNorm over groups of `g` elements (a whole row, or one head), optionally after adding a
// residual. One block per group; the sum of squares in double, as the CPU reference.

__device__ void rms_group(const float* x, const float* w, int g, float eps, float* out) {
    __shared__ double partial[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < g; i += blockDim.x) {
        double v = x[i];
        s += v * v;
    }
    s = warp_sum_d(s);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) >> 5;
        double t = lane < nw ? partial[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) partial[0] = t;
    }
    __syncthreads();
    float mean = (float)(partial[0] / g);
    float r = 1.0f / sqrtf(mean + eps);
    for (int i = threadIdx.x; i < g; i += blockDim.x) out[i] = w[i] * (x[i] * r);
}

// grid: one block per group (rows * cols / g)
extern "C" __global__ void rms_norm(const float* x, const float* w, int g, float eps,
                                    float* out) {
    long long off = (long long)blockIdx.x * g;
    rms_group(x + off, w, g, eps, out + off);
}

// x += delta, then out = rms_norm(x). Each block owns its group, so the add is race-free.
extern "C" __global__ void add_rms_norm(float* x, const float* delta, const float* w, int g,
                                        float eps, float* out) {
    long long off = (long long)blockIdx.x * g;
    for (int i = threadIdx.x; i < g; i += blockDim.x) x[off + i] += delta[off + i];
    __syncthreads();
    rms_group(x + off, w, g, eps, out + off);
}
