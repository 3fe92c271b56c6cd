// A layer's q, k and v made ready for attention in one launch (Backend::prepare_attention):
// the q and k RMSNorms, the clamp, RoPE of q and k, then q written back in place and k and v
// stored at their KV slots. The same arithmetic as rms_norm, clamp, rope and write_kv.

// RMSNorm of each g-wide group of the `cols` floats at x (shared memory), in place: a warp per
// group when there are enough groups to go round, else the block on one group after another.
__device__ void rms_groups_shared(float* x, int cols, int g, const float* w, float eps,
                                  double* partial) {
    const int tid = threadIdx.x, nt = blockDim.x, warp = tid >> 5, lane = tid & 31;
    const int nw = nt >> 5, groups = cols / g;
    if (groups >= nw) {
        for (int gi = warp; gi < groups; gi += nw) {
            float* xg = x + gi * g;
            double s = 0.0;
            for (int i = lane; i < g; i += 32) {
                double t = xg[i];
                s += t * t;
            }
            s = warp_sum_d(s);
            const float r = 1.0f / sqrtf((float)(s / g) + eps);
            for (int i = lane; i < g; i += 32) xg[i] = w[i] * (xg[i] * r);
        }
        return;
    }
    for (int gi = 0; gi < groups; gi++) {
        float* xg = x + gi * g;
        double s = 0.0;
        for (int i = tid; i < g; i += nt) {
            double t = xg[i];
            s += t * t;
        }
        const float r = 1.0f / sqrtf((float)(block_sum_d(s, partial) / g) + eps);
        for (int i = tid; i < g; i += nt) xg[i] = w[i] * (xg[i] * r);
    }
}

// grid (rows, 3): blockIdx.y is q (0), k (1) or v (2); q is [rows, q_cols], k and v
// [rows, kv_cols]. q_norm / k_norm may be null (qg / kg their group widths); `clip` applies
// when has_clip. Each row is staged in dynamic shared memory (max(q_cols, kv_cols) floats).
extern "C" __global__ void qkv_prepare(float* q, const float* k, const float* v, int q_cols,
                                       int kv_cols, const float* q_norm, int qg,
                                       const float* k_norm, int kg, float eps, int has_clip,
                                       float clip, const u32* positions, const float* inv_freq,
                                       float scale, int half, const u32* slots, float* kpool,
                                       float* vpool) {
    pdl_launch_next();
    pdl_wait();
    extern __shared__ float prep_sh[];
    __shared__ double partial[32];
    const int r = blockIdx.x, which = blockIdx.y, tid = threadIdx.x, nt = blockDim.x;
    const int cols = which == 0 ? q_cols : kv_cols;
    const float* src = (which == 0 ? (const float*)q : which == 1 ? k : v) + (long long)r * cols;
    for (int i = tid; i < cols; i += nt) prep_sh[i] = src[i];
    __syncthreads();
    const float* w = which == 0 ? q_norm : which == 1 ? k_norm : nullptr;
    if (w != nullptr) {
        rms_groups_shared(prep_sh, cols, which == 0 ? qg : kg, w, eps, partial);
        __syncthreads();
    }
    if (has_clip) {
        for (int i = tid; i < cols; i += nt) prep_sh[i] = fminf(fmaxf(prep_sh[i], -clip), clip);
        __syncthreads();
    }
    if (which < 2) {
        const float pos = (float)positions[r];
        for (int p = tid; p < cols / 2; p += nt) {
            const int head = p / half, i = p % half;
            const float angle = inv_freq[i] * pos;
            const float c = cosf(angle) * scale, s = sinf(angle) * scale;
            float* h = prep_sh + head * 2 * half;
            const float x1 = h[i], x2 = h[i + half];
            h[i] = x1 * c - x2 * s;
            h[i + half] = x2 * c + x1 * s;
        }
        __syncthreads();
    }
    float* dst = which == 0 ? q + (long long)r * cols
                            : (which == 1 ? kpool : vpool) + (long long)slots[r] * cols;
    for (int i = tid; i < cols; i += nt) dst[i] = prep_sh[i];
}
