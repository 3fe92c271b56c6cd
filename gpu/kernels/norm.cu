// RMSNorm over groups of `g` elements (a whole row, or one head), optionally after adding a
// residual. One block per group; the sum of squares in double, as the CPU reference.

// Values a thread keeps in registers (as float4) on the vector path.
#define NORM_VEC 4

// s = x + delta (x when delta is null), stored to x_sum when that is not null (which may be
// x itself), then out = w * (s * rsqrt(mean(s²) + eps)).
// Vector path (g % 4 == 0, 16-byte aligned, g <= 4 * NORM_VEC * blockDim.x): x is read once
// into registers with all loads in flight. Otherwise a grid-stride loop reading x twice.
__device__ void rms_group(const float* x, const float* delta, float* x_sum, const float* w, int g,
                          float eps, float* out) {
    __shared__ double partial[32];
    const bool vec =
        (g & 3) == 0 && g <= 4 * NORM_VEC * (int)blockDim.x &&
        ((((u64)x) | ((u64)w) | ((u64)out) | ((u64)delta) | ((u64)x_sum)) & 15) == 0;
    float4 xv[NORM_VEC];
    double s = 0.0;
    if (vec) {
#pragma unroll
        for (int j = 0; j < NORM_VEC; j++) {
            const int i = (threadIdx.x + j * blockDim.x) * 4;
            if (i < g) xv[j] = *(const float4*)(x + i);
        }
        if (delta != nullptr) {
#pragma unroll
            for (int j = 0; j < NORM_VEC; j++) {
                const int i = (threadIdx.x + j * blockDim.x) * 4;
                if (i < g) {
                    float4 d = *(const float4*)(delta + i);
                    xv[j].x += d.x;
                    xv[j].y += d.y;
                    xv[j].z += d.z;
                    xv[j].w += d.w;
                }
            }
        }
        if (x_sum != nullptr) {
#pragma unroll
            for (int j = 0; j < NORM_VEC; j++) {
                const int i = (threadIdx.x + j * blockDim.x) * 4;
                if (i < g) *(float4*)(x_sum + i) = xv[j];
            }
        }
#pragma unroll
        for (int j = 0; j < NORM_VEC; j++) {
            const int i = (threadIdx.x + j * blockDim.x) * 4;
            if (i < g) {
                s += (double)xv[j].x * xv[j].x + (double)xv[j].y * xv[j].y;
                s += (double)xv[j].z * xv[j].z + (double)xv[j].w * xv[j].w;
            }
        }
    } else {
        // Each thread reads and writes only its own elements.
        for (int i = threadIdx.x; i < g; i += blockDim.x) {
            const float v = delta != nullptr ? x[i] + delta[i] : x[i];
            if (x_sum != nullptr) x_sum[i] = v;
            s += (double)v * v;
        }
    }
    float mean = (float)(block_sum_d(s, partial) / g);
    float r = 1.0f / sqrtf(mean + eps);
    if (vec) {
#pragma unroll
        for (int j = 0; j < NORM_VEC; j++) {
            const int i = (threadIdx.x + j * blockDim.x) * 4;
            if (i < g) {
                float4 wv = *(const float4*)(w + i), o;
                o.x = wv.x * (xv[j].x * r);
                o.y = wv.y * (xv[j].y * r);
                o.z = wv.z * (xv[j].z * r);
                o.w = wv.w * (xv[j].w * r);
                *(float4*)(out + i) = o;
            }
        }
    } else {
        // x_sum (possibly x itself) holds this thread's sums already.
        for (int i = threadIdx.x; i < g; i += blockDim.x) {
            const float v = x_sum != nullptr ? x_sum[i] : delta != nullptr ? x[i] + delta[i] : x[i];
            out[i] = w[i] * (v * r);
        }
    }
}

// grid: one block per group (rows * cols / g)
extern "C" __global__ void rms_norm(const float* x, const float* w, int g, float eps,
                                    float* out) {
    pdl_launch_next();
    pdl_wait();
    long long off = (long long)blockIdx.x * g;
    rms_group(x + off, nullptr, nullptr, w, g, eps, out + off);
}

// x += delta, then out = rms_norm(x). Each block owns its group, so the add is race-free.
extern "C" __global__ void add_rms_norm(float* x, const float* delta, const float* w, int g,
                                        float eps, float* out) {
    pdl_launch_next();
    pdl_wait();
    long long off = (long long)blockIdx.x * g;
    rms_group(x + off, delta == nullptr ? nullptr : delta + off, x + off, w, g, eps, out + off);
}
